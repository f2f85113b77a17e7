"""The pure-NumPy reference backend.

Implements the kernel contract of :mod:`fastprop.backends` with plain NumPy
expressions, written for clarity: it is the oracle the native and CUDA backends are
tested against.  Outputs are written in place into the arrays the caller passes.
"""

from __future__ import annotations

import math

import numpy as np

from . import ACTIVATIONS

name = "numpy"

_IDENTITY = ACTIVATIONS["identity"]
_RELU = ACTIVATIONS["relu"]
_LEAKY = ACTIVATIONS["leaky_relu"]
_SIGMOID = ACTIVATIONS["sigmoid"]
_TANH = ACTIVATIONS["tanh"]
_GELU = ACTIVATIONS["gelu"]
_GELU_ERF = ACTIVATIONS["gelu_erf"]
_SOFTMAX = ACTIVATIONS["softmax"]

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715
_GELU_CLIP = 20.0


def get_num_threads() -> int:
    return 1


def set_num_threads(n: int) -> None:  # NumPy's own BLAS threads are not ours to set
    pass


def config() -> dict:
    return {"numpy": np.__version__}


# --------------------------------------------------------------------- GEMM, dense
def gemm(a, b, c, trans_a, trans_b, accumulate):
    opa = a.T if trans_a else a
    opb = b.T if trans_b else b
    if accumulate:
        c += opa @ opb
    else:
        np.matmul(opa, opb, out=c)


def _check_linear(x, w, b, y):
    """ValueError for w or b not of the shapes x and y imply, as the native kernel
    refuses them (a (1,) b would broadcast here; the device kernels read out of
    bounds)."""
    if w.shape != (x.shape[1], y.shape[1]):
        raise ValueError(f"w must have shape {(x.shape[1], y.shape[1])}, got shape {w.shape}")
    if b is not None and b.shape != (y.shape[1],):
        raise ValueError(f"b must have shape ({y.shape[1]},), got shape {b.shape}")


def linear_forward(x, w, b, act, alpha, y, z):
    _check_linear(x, w, b, y)
    pre = z if z is not None else y
    np.matmul(x, w, out=pre)
    if b is not None:
        pre += b
    activation_forward(act, alpha, pre, y)


def linear_backward(grad_y, x, w, y, z, act, alpha, grad_x, grad_w, grad_b, work, accumulate):
    if act == _IDENTITY:
        grad_z = grad_y
    else:
        activation_backward(act, alpha, grad_y, z, y, work)
        grad_z = work
    # (the bias gradient summed in float64, as the native kernels do: NumPy sums down
    # axis 0 one row at a time, not pairwise; 3e-5 relative error at 1e6 float32 rows)
    if accumulate:
        grad_w += x.T @ grad_z
        if grad_b is not None:
            with np.errstate(over="ignore"):  # (beyond float32: inf, as a float32 sum)
                grad_b += grad_z.sum(axis=0, dtype=np.float64).astype(grad_b.dtype)
    else:
        np.matmul(x.T, grad_z, out=grad_w)
        if grad_b is not None:
            with np.errstate(over="ignore"):
                grad_b[...] = grad_z.sum(axis=0, dtype=np.float64)
    if grad_x is not None:
        np.matmul(grad_z, w.T, out=grad_x)


# --------------------------------------------------------------------- activations
def _sigmoid(x, out):
    # exp(-|x|) never overflows: sigmoid(x) = 1/(1+e) for x >= 0, e/(1+e) for x < 0.
    e = np.exp(-np.abs(x))
    r = 1.0 / (1.0 + e)
    np.copyto(out, np.where(x >= 0, r, e * r))


def _gelu_parts(x):
    """s = sigmoid(2u), s (1 - s) and x clamped to [-20, 20], u = c (x + k x^3)."""
    xc = np.clip(x, -_GELU_CLIP, _GELU_CLIP)
    w = xc * (2 * _GELU_C + (2 * _GELU_C * _GELU_K) * (xc * xc))
    e = np.exp(-np.abs(w))
    r = 1.0 / (1.0 + e)
    er = e * r
    return np.where(w >= 0, r, er), er * r, xc


_ERFC = np.frompyfunc(math.erfc, 1, 1)


def _erfc(v):
    """erfc of a float64 array through libm's (math.erfc), element by element: slow
    (~0.1 us an element), but within an ulp (SciPy's is 5x faster and up to ~14 ulp
    off near 1; NumPy has none)."""
    return np.asarray(_ERFC(v), dtype=np.float64)  # (a 0-d input gives a float)


def _two_prod(a, b):
    """a * b = p + e exactly (Dekker's product; |a|, |b| well below 1e150)."""
    p = a * b

    def split(v):
        c = 134217729.0 * v  # 2^27 + 1
        hi = c - (c - v)
        return hi, v - hi
    (ah, al), (bh, bl) = split(a), split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


_SQRT_HALF_LO = -4.833646656726457e-17  # 1/sqrt(2) - math.sqrt(0.5)


def _gelu_erf_parts(x):
    """(Phi(x), exp(-x^2 / 2), x clamped to [-40, 40]) in float64: the normal CDF as
    erfc(-x/sqrt 2)/2 (no cancellation in the negative tail, where 1 + erf would lose
    every digit), with the rounding of -x/sqrt 2 corrected to first order, as the native
    kernel does (it alone cost up to 2 t^2 ulp, ~700 at x = -38), and x^2 split exactly."""
    xc = np.clip(np.asarray(x, np.float64), -40.0, 40.0)
    th, tl = _two_prod(-xc, math.sqrt(0.5))
    tl = tl - xc * _SQRT_HALF_LO
    erfc = _erfc(th) - tl * (2 / math.sqrt(math.pi)) * np.exp(-th * th)
    h, l = _two_prod(xc, xc)
    return 0.5 * erfc, np.exp(-0.5 * h) * (1.0 - 0.5 * l), xc


def _softmax(x, out):
    shifted = x - x.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    np.divide(e, e.sum(axis=-1, keepdims=True), out=out)


def activation_forward(act, alpha, x, y):
    if act == _IDENTITY:
        if y is not x:
            np.copyto(y, x)
    elif act == _RELU:
        np.maximum(x, 0, out=y)
    elif act == _LEAKY:
        np.copyto(y, np.where(x > 0, x, x * y.dtype.type(alpha)))
    elif act == _SIGMOID:
        _sigmoid(x, y)
    elif act == _TANH:
        np.tanh(x, out=y)
    elif act == _GELU:
        # beyond |x| = 20 gelu is x or -0 to the last bit; clamping keeps x^3 and
        # inf * 0 out of the formula (NaN still propagates).  0.5 (1 + tanh(u)) is
        # sigmoid(2u): no cancellation for x << 0 (the tanh form loses all digits there)
        s, _, _ = _gelu_parts(x)
        with np.errstate(invalid="ignore"):
            val = x * s
        np.copyto(y, np.where(x < -_GELU_CLIP, -0.0, val))
    elif act == _GELU_ERF:
        # x Phi(x); beyond |x| = 40 Phi is 0 or 1 to the last bit (and -inf * 0 is NaN)
        cdf, _, _ = _gelu_erf_parts(x)
        with np.errstate(invalid="ignore"):
            val = x * cdf
        np.copyto(y, np.where(x < -40.0, -0.0, val), casting="unsafe")
    elif act == _SOFTMAX:
        _softmax(x, y)
    else:
        raise ValueError(f"unknown activation code {act}")


def activation_backward(act, alpha, grad_y, x, y, grad_x):
    if act == _IDENTITY:
        if grad_x is not grad_y:
            np.copyto(grad_x, grad_y)
    elif act == _RELU:
        np.multiply(grad_y, y > 0, out=grad_x)
    elif act == _LEAKY:
        np.multiply(grad_y, np.where(y > 0, 1.0, alpha).astype(grad_x.dtype), out=grad_x)
    elif act == _SIGMOID:
        np.multiply(grad_y, y * (1 - y), out=grad_x)
    elif act == _TANH:
        np.multiply(grad_y, 1 - y * y, out=grad_x)
    elif act == _GELU:
        # gelu' = s + 2 x s (1 - s) du/dx with s (1 - s) = e / (1 + e)^2 (1 - s would
        # cancel where s rounds to 1)
        s, ss, xc = _gelu_parts(x)
        d = s + xc * ss * (2 * _GELU_C) * (1.0 + 3.0 * _GELU_K * xc * xc)
        np.multiply(grad_y, d.astype(grad_x.dtype, copy=False), out=grad_x)
    elif act == _GELU_ERF:
        # gelu' = Phi(x) + x phi(x)
        cdf, e, xc = _gelu_erf_parts(x)
        d = cdf + xc * (e / math.sqrt(2.0 * math.pi))
        np.multiply(grad_y, d.astype(grad_x.dtype, copy=False), out=grad_x)
    elif act == _SOFTMAX:
        dot = np.sum(grad_y * y, axis=-1, keepdims=True)
        np.multiply(y, grad_y - dot, out=grad_x)
    else:
        raise ValueError(f"unknown activation code {act}")


# --------------------------------------------------------------------- losses
def softmax_xent(logits, labels, targets, grad):
    n = logits.shape[0]
    # (a spread above the float range: -inf; a row of -inf logits: NaN; silent, as native)
    with np.errstate(over="ignore", invalid="ignore"):
        shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - lse
    if labels is not None:
        loss = -log_p[np.arange(n), labels].sum() / n
    else:  # (0 log 0 = 0: a masked -inf logit of a class of target 0 adds nothing)
        with np.errstate(invalid="ignore"):
            total = (targets * log_p).sum()
            if total != total:  # (NaN: only then the sum without 0 * -inf; NaN counts)
                total = np.where((targets == 0) & np.isinf(log_p), 0.0, targets * log_p).sum()
        loss = -total / n
    if grad is not None:
        p = np.exp(log_p)
        if labels is not None:
            p[np.arange(n), labels] -= 1.0
        else:  # exact for rows that do not sum to 1: d/dx = softmax * sum(t) - t
            p = p * targets.sum(axis=1, keepdims=True) - targets
        np.divide(p, n, out=grad, casting="unsafe")
    return float(loss)


def bce(pred, target, from_logits, grad):
    count = pred.size
    x = pred.astype(np.float64)
    t = target.astype(np.float64)
    if from_logits:
        # max(x, 0) - x t as x (1 - t) or -x t (the native kernel's form: no
        # cancellation, and +-inf logits give inf or NaN the same way on both)
        with np.errstate(invalid="ignore"):
            lin = np.where(x >= 0, x * (1 - t), -x * t)
        loss = (lin + np.log1p(np.exp(-np.abs(x)))).sum() / count
        if grad is not None:
            s = np.empty_like(x)
            _sigmoid(x, s)
            np.divide(s - t, count, out=grad, casting="unsafe")
    else:
        with np.errstate(divide="ignore"):
            log_p = np.maximum(np.log(x), -100.0)
            log_1p = np.maximum(np.log1p(-x), -100.0)
        loss = -(t * log_p + (1 - t) * log_1p).sum() / count
        if grad is not None:
            denom = np.maximum(x * (1 - x), 1e-12)
            np.divide((x - t) / denom, count, out=grad, casting="unsafe")
    return float(loss)


def mse(pred, target, half, grad):
    count = pred.size
    diff = pred.astype(np.float64) - target
    scale = 0.5 if half else 1.0
    loss = scale * np.dot(diff.ravel(), diff.ravel()) / count
    if grad is not None:
        np.multiply(diff, 2.0 * scale / count, out=grad, casting="unsafe")
    return float(loss)


# --------------------------------------------------------------------- optimizers
def _decayed(p, g, weight_decay):
    return g + p.dtype.type(weight_decay) * p if weight_decay != 0 else g


def sgd_update(params, grads, bufs, lr, momentum, nesterov, weight_decay, first):
    for i, (p, g) in enumerate(zip(params, grads)):
        d = _decayed(p, g, weight_decay)
        if momentum != 0:
            buf = bufs[i]
            if first:
                np.copyto(buf, d)
            else:
                buf *= p.dtype.type(momentum)
                buf += d
            d = d + p.dtype.type(momentum) * buf if nesterov else buf
        p -= p.dtype.type(lr) * d


def adam_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                weight_decay, decoupled, max_exp_avg_sqs=None):
    """Adam (AdamW when decoupled); with ``max_exp_avg_sqs`` AMSGrad, which divides by
    the running maximum of v (fastprop.optim.Adam(amsgrad=True) calls this on every
    backend)."""
    bias_c1 = 1.0 - beta1 ** step
    bias_c2_sqrt = math.sqrt(1.0 - beta2 ** step)
    step_size = lr / bias_c1
    maxes = max_exp_avg_sqs if max_exp_avg_sqs is not None else [None] * len(params)
    for p, g, m, v, vmax in zip(params, grads, exp_avgs, exp_avg_sqs, maxes):
        t = p.dtype.type
        if decoupled:
            if weight_decay != 0:
                p *= t(1.0 - lr * weight_decay)
        else:
            g = _decayed(p, g, weight_decay)
        m *= t(beta1)
        m += t(1.0 - beta1) * g
        v *= t(beta2)
        v += t(1.0 - beta2) * g * g
        if vmax is not None:
            np.maximum(vmax, v, out=vmax)
            v = vmax
        denom = np.sqrt(v) / t(bias_c2_sqrt) + t(eps)
        p -= t(step_size) * m / denom


def rmsprop_update(params, grads, square_avgs, bufs, lr, alpha, eps, momentum, weight_decay):
    for i, (p, g, s) in enumerate(zip(params, grads, square_avgs)):
        t = p.dtype.type
        g = _decayed(p, g, weight_decay)
        s *= t(alpha)
        s += t(1.0 - alpha) * g * g
        avg = np.sqrt(s) + t(eps)
        if momentum > 0:
            buf = bufs[i]
            buf *= t(momentum)
            buf += g / avg
            p -= t(lr) * buf
        else:
            p -= t(lr) * g / avg


def adagrad_update(params, grads, sums, lr, eps, weight_decay):
    for p, g, s in zip(params, grads, sums):
        t = p.dtype.type
        g = _decayed(p, g, weight_decay)
        s += g * g
        p -= t(lr) * g / (np.sqrt(s) + t(eps))


def sum_squares(arrays) -> float:
    total = 0.0
    for a in arrays:
        flat = a.ravel().astype(np.float64, copy=False)
        total += float(np.dot(flat, flat))
    return total


def scale_(arrays, factor):
    for a in arrays:
        a *= a.dtype.type(factor)


def clip_(arrays, lo, hi):
    for a in arrays:
        np.clip(a, lo, hi, out=a)


# --------------------------------------------------------------------- normalization
def _check_features(x, **arrays):
    """ValueError for a per-feature array not of shape (features,), as the native
    kernels refuse it (a (1,) array would broadcast)."""
    for name, a in arrays.items():
        if a.shape != (x.shape[-1],):
            raise ValueError(f"{name} must have shape ({x.shape[-1]},), got shape {a.shape}")


def batchnorm_forward(x, gamma, beta, eps, y, mean, invstd):
    _check_features(x, gamma=gamma, beta=beta)
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=0)
    var = ((x64 - mu) ** 2).mean(axis=0)
    mean[...] = mu
    invstd[...] = 1.0 / np.sqrt(var + eps)
    np.copyto(y, (x64 - mu) * (1.0 / np.sqrt(var + eps)) * gamma + beta, casting="unsafe")


def batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, eps, y):
    _check_features(x, gamma=gamma, beta=beta, running_mean=running_mean,
                    running_var=running_var)
    scale = gamma / np.sqrt(running_var.astype(np.float64) + eps)
    np.copyto(y, (x - running_mean) * scale + beta, casting="unsafe")


def batchnorm_running_update(x, momentum, running_mean, running_var):
    _check_features(x, running_mean=running_mean, running_var=running_var)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"x needs at least 2 rows (the unbiased variance), got {n}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    for name, a in (("running_mean", running_mean), ("running_var", running_var)):
        if not a.flags.writeable:  # (before either changes)
            raise ValueError(f"{name} is read-only")
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=0)
    var = ((x64 - mu) ** 2).sum(axis=0) / (n - 1)
    keep = 1.0 - momentum
    np.copyto(running_mean, keep * running_mean.astype(np.float64) + momentum * mu,
              casting="unsafe")
    np.copyto(running_var, keep * running_var.astype(np.float64) + momentum * var,
              casting="unsafe")


def batchnorm_backward(grad_y, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta):
    n = x.shape[0]
    xhat = (x.astype(np.float64) - mean) * invstd
    g = grad_y.astype(np.float64)
    sum_g = g.sum(axis=0)
    sum_gx = (g * xhat).sum(axis=0)
    grad_beta += sum_g.astype(grad_beta.dtype)
    grad_gamma += sum_gx.astype(grad_gamma.dtype)
    gx = (gamma * invstd / n) * (n * g - sum_g - xhat * sum_gx)
    np.copyto(grad_x, gx, casting="unsafe")


def layernorm_forward(x, gamma, beta, eps, y, mean, invstd):
    _check_features(x, gamma=gamma, beta=beta)
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=-1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(axis=-1, keepdims=True)
    inv = 1.0 / np.sqrt(var + eps)
    mean[...] = mu[:, 0]
    invstd[...] = inv[:, 0]
    np.copyto(y, (x64 - mu) * inv * gamma + beta, casting="unsafe")


def layernorm_backward(grad_y, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta):
    f = x.shape[-1]
    inv = invstd.astype(np.float64)[:, None]
    xhat = (x.astype(np.float64) - mean[:, None]) * inv
    g = grad_y.astype(np.float64)
    grad_beta += g.sum(axis=0).astype(grad_beta.dtype)
    grad_gamma += (g * xhat).sum(axis=0).astype(grad_gamma.dtype)
    gh = g * gamma
    gx = (inv / f) * (f * gh - gh.sum(axis=-1, keepdims=True)
                      - xhat * (gh * xhat).sum(axis=-1, keepdims=True))
    np.copyto(grad_x, gx, casting="unsafe")
