"""Backends: one kernel contract, several implementations.

A backend is a module (``fastprop.backends.native``, ``.numpy``, ``.cuda``) that
exposes the functions below.  The Python layer (``fastprop.ops``, ``fastprop.nn``,
``fastprop.losses``, ``fastprop.optim``) validates every argument, converts dtypes
and layouts, and allocates every output before it calls a backend; a backend trusts
its arguments and never allocates an output itself.

The kernel contract
-------------------
Common rules for every function:

* All floating arrays of one call share one dtype, ``float32`` or ``float64``.
* Arrays are C-contiguous, except the ``gemm`` operands, whose last axis has unit
  stride and whose first axis has any non-negative stride (a leading dimension);
  every array is aligned (the Python layer copies a view at an odd byte offset).
* No array is empty unless stated (the Python layer short-circuits empty work).
* ``act`` is an integer activation code from :data:`ACTIVATIONS`; ``alpha`` is the
  leaky-relu negative slope (ignored by other activations).
* Outputs are written, never reallocated.  Functions return ``None`` unless stated.

GEMM and the dense layer::

    gemm(a, b, c, trans_a, trans_b, accumulate)
        c[m, n] (+)= op(a) @ op(b); op(a) = a.T if trans_a.  a is (m, k) or (k, m),
        b is (k, n) or (n, k).  k may be 0 (then c = 0, or unchanged if accumulate).
    linear_forward(x, w, b, act, alpha, y, z)
        z = x @ w + b (b may be None); y = act(z).  x (n, in), w (in, out), y (n, out).
        z is None or an (n, out) array that receives the pre-activation.
    linear_backward(grad_y, x, w, y, z, act, alpha, grad_x, grad_w, grad_b, work, accumulate)
        grad_z = grad_y * act'(.)   (into ``work``, an (n, out) scratch array; grad_y is
                                     never modified)
        grad_w (+)= x.T @ grad_z;  grad_b (+)= grad_z.sum(0) (grad_b may be None);
        grad_x = grad_z @ w.T      (grad_x may be None: not computed).
        '+=' when accumulate, '=' otherwise.  y is the forward output; z the
        pre-activation (required for gelu, may be None otherwise).

Activations (any shape; softmax works on the last axis)::

    activation_forward(act, alpha, x, y)                  y = act(x); y may be x
    activation_backward(act, alpha, grad_y, x, y, grad_x) grad_x may be grad_y;
        relu/leaky_relu/sigmoid/tanh/softmax use y, gelu uses x, identity neither
        (the unused one may be None).

Losses (each returns the mean loss as a Python float, and writes the gradient of
that mean with respect to the prediction into ``grad`` unless grad is None)::

    softmax_xent(logits, labels, targets, grad) -> float
        logits (n, c); exactly one of labels ((n,) int64 class ids, already checked to
        lie in [0, c)) and targets ((n, c) probabilities) is not None.
        loss = mean_i(-sum_j t_ij log softmax(logits)_ij);  grad = (softmax - t) / n
        (target rows: (softmax * sum_j t_ij - t) / n, exact when a row does not sum to 1)
    bce(pred, target, from_logits, grad) -> float
        mean over all elements; probabilities: log clamped at -100 as PyTorch,
        grad = (p - t) / max(p (1 - p), 1e-12) / N; logits: the stable form
        max(x, 0) - x t + log1p(exp(-|x|)), grad = (sigmoid(x) - t) / N.
    mse(pred, target, half, grad) -> float
        mean((p - t)^2), times 1/2 when half; grad = 2 (p - t) / N (times 1/2).

Optimizers (lists of same-length arrays, updated in place; grads are read only)::

    sgd_update(params, grads, bufs, lr, momentum, nesterov, weight_decay, first)
        g = grad + wd p; if momentum: buf = g if first else momentum buf + g;
        g = g + momentum buf if nesterov else buf.  p -= lr g.  bufs is None when
        momentum == 0.
    adam_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                weight_decay, decoupled)
        decoupled (AdamW): p *= 1 - lr wd; else g = grad + wd p.
        m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
        p -= (lr / (1 - b1^step)) m / (sqrt(v) / sqrt(1 - b2^step) + eps)
        (bias corrections computed once, in double; step counts from 1).
    rmsprop_update(params, grads, square_avgs, bufs, lr, alpha, eps, momentum, weight_decay)
        g = grad + wd p; s = alpha s + (1 - alpha) g^2; d = sqrt(s) + eps;
        if momentum > 0: buf = momentum buf + g / d; p -= lr buf  else p -= lr g / d.
        bufs is None when momentum == 0.
    adagrad_update(params, grads, sums, lr, eps, weight_decay)
        g = grad + wd p; s += g^2; p -= lr g / (sqrt(s) + eps).
    sum_squares(arrays) -> float   sum of squares of every element, accumulated in double
    scale_(arrays, factor)         a *= factor, in place
    clip_(arrays, lo, hi)          a = min(max(a, lo), hi), in place
    clip_grad_norm_(arrays, max_norm) -> float   (optional) global-norm clipping in one
                                   call: norm of all arrays, then, if it is finite,
                                   scale by min(1, max_norm / (norm + 1e-6)) (PyTorch)

Normalization (x is (n, f); statistics are float arrays of the same dtype)::

    batchnorm_forward(x, gamma, beta, eps, y, mean, invstd)
        training mode: mean/invstd (f,) receive the batch mean and 1/sqrt(var + eps)
        (biased variance); y = (x - mean) invstd gamma + beta.
    batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, eps, y)
    batchnorm_running_update(x, momentum, running_mean, running_var)
        x (n >= 2, f): r = (1 - momentum) r + momentum s, in place, for s the column
        mean (running_mean) and the unbiased column variance (running_var) of x, both
        computed in double from x and rounded once (PyTorch's running statistics).
    batchnorm_forward_train(x, gamma, beta, eps, y, mean, invstd, momentum,
                            running_mean, running_var)   (optional) batchnorm_forward
        and then batchnorm_running_update of the same x (n >= 2), the statistics
        computed once; every argument checked before anything is written.
    batchnorm_backward(grad_y, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta)
        grad_gamma/grad_beta accumulate (+=); grad_x is overwritten.
    layernorm_forward(x, gamma, beta, eps, y, mean, invstd)
        statistics over the last axis; mean/invstd are (n,).
    layernorm_backward(grad_y, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta)
        grad_gamma/grad_beta accumulate (+=); grad_x is overwritten.

Whole training steps (optional; a backend without it gets the Python path)::

    make_train_step(stages, loss, optimizer) -> step or None
        stages: list of fastprop.train.DenseStage(weight, bias, act, alpha), a chain of
        dense layers (activation layers already folded into the preceding stage);
        loss: a fastprop.losses.Loss (SoftmaxCrossEntropy, MSE or BinaryCrossEntropy);
        optimizer: a fastprop.optim.Optimizer over exactly the stages' parameters.
        Returns None when the backend cannot run this combination.  The returned
        object is callable as ``step(x, y, check_finite) -> float``: x (n, in) and y
        already validated and converted (y as the loss's prepare_target returns it;
        a step whose ``checks_labels`` attribute is true gets softmax class ids
        unchecked for range and refuses ids outside [0, classes) itself with
        ValueError before anything runs);
        it zeroes the gradients, runs forward, loss, backward and the optimizer update
        (incrementing ``optimizer.step_count``), and returns the batch loss.  With
        check_finite, a non-finite loss or gradient raises NonFiniteError *before* the
        update.  ``step.output`` is the last forward output (n, out) and
        ``step.sync()`` makes Parameter values/grads and optimizer state on the host
        current (a no-op for CPU backends that work on them in place).

Configuration::

    name: str                       "native", "numpy" or "cuda"
    get_num_threads() -> int; set_num_threads(n)
    config() -> dict                what show_config() prints for this backend
"""

from __future__ import annotations

import contextvars
import importlib
import math
import os
import sys
import warnings
from contextlib import contextmanager

import numpy as _np

#: Activation name -> integer code used by every backend.
ACTIVATIONS = {
    "identity": 0,
    "relu": 1,
    "leaky_relu": 2,
    "sigmoid": 3,
    "tanh": 4,
    "gelu": 5,        # tanh approximation
    "gelu_erf": 6,    # exact form (PyTorch's default GELU)
    "softmax": 7,
}
ACTIVATION_NAMES = {code: name for name, code in ACTIVATIONS.items()}
#: the codes whose backward reads the pre-activation z (the others read the output y)
PREACT_ACTIVATIONS = (ACTIVATIONS["gelu"], ACTIVATIONS["gelu_erf"])

BACKENDS = ("native", "numpy", "cuda")

_loaded: dict = {}


# The backend use_backend selected for the calling thread and, within it, the calling
# asyncio task (a context variable: a coroutine suspended inside use_backend does not
# change the backend of the others); None follows the process default.
_backend_var: contextvars.ContextVar = contextvars.ContextVar("fastprop_backend",
                                                              default=None)


class _State:
    """``_state.backend`` reads and sets the calling context's selection."""

    @property
    def backend(self):
        return _backend_var.get()

    @backend.setter
    def backend(self, mod):
        _backend_var.set(mod)


_state = _State()
_default = None


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot be used on this machine (the message says why)."""


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient (the update was not applied)."""


def backoff_env() -> tuple[str | None, bool | None]:
    """``(value, off)`` of ``FASTPROP_BACKOFF`` as runtime.cpp reads it: the value
    without ASCII blanks (C's), and True for 0/false/off/no in any case, False for
    1/true/on/yes, None for anything else (the back-off stays on: warned about at
    import) or when it is not set."""
    value = os.environ.get("FASTPROP_BACKOFF")
    if value is None:
        return None, None
    value = value.strip(" \t\n\r\v\f")
    word = value.lower()
    return value, True if word in ("0", "false", "off", "no") else (
        False if word in ("1", "true", "on", "yes") else None)


def check_loss(value: float, dtype) -> None:
    """Raise NonFiniteError unless ``value`` (a loss summed in double) is finite in the
    model's ``dtype``.  A float32 model's loss above float32's largest value is inf in
    PyTorch (which sums in float32): its gradients square to inf in Adam's, RMSprop's
    and Adagrad's second moments, which then stop those weights for good, silently."""
    value = float(value)
    largest = float(_np.finfo(dtype).max)
    if not abs(value) <= largest:  # (NaN fails too)
        if math.isfinite(value):
            raise NonFiniteError(f"loss {value:.6g} overflows {_np.dtype(dtype).name} "
                                 f"(its largest value is {largest:.6g})")
        raise NonFiniteError(f"non-finite loss {value}")


def load(name: str):
    """Import and return the backend module ``name`` (cached)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}; got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    mod = _loaded.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(f"fastprop.backends.{name}")
        except Exception as exc:  # pragma: no cover - depends on the install
            # ImportError for a missing/broken extension; an editable install whose
            # rebuild fails raises CalledProcessError from the import hook
            raise BackendUnavailableError(f"backend {name!r} is not available: {exc}") from exc
        check = getattr(mod, "ensure_available", None)
        if check is not None:
            check()
        _loaded[name] = mod
    return mod


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside fastprop (a warning is then the
    caller's line, which the caller's filters see)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "fastprop":
        frame, level = frame.f_back, level + 1
    return level


def _initial_default():
    global _default
    if _default is None:
        env = os.environ.get("FASTPROP_BACKEND", "").strip().lower()
        if env:
            if env not in BACKENDS:  # (a value the code never passed: name its source)
                raise ValueError(f"environment variable FASTPROP_BACKEND={env!r} is not a "
                                 f"backend; expected one of {BACKENDS} (or unset)")
            _default = load(env)
        else:
            try:
                _default = load("native")
            except BackendUnavailableError as exc:  # a broken or partial install
                warnings.warn(f"fastprop's native backend is unavailable ({exc}); using the "
                              f"numpy backend, several times slower (fp.show_config() says "
                              f"which backend runs)", RuntimeWarning,
                              stacklevel=_caller_level())
                _default = load("numpy")
    return _default


def current():
    """The backend module in effect for the calling thread."""
    mod = _backend_var.get()
    if mod is None:
        mod = _default if _default is not None else _initial_default()
    return mod


def set_backend(name: str) -> None:
    """Set the process' default backend, used by every later call of every thread
    outside a ``use_backend`` block (a thread or asyncio task inside one keeps that
    block's backend until it leaves it; in the calling thread, an enclosing block's
    choice is dropped)."""
    global _default
    mod = load(name)
    _default = mod
    _backend_var.set(None)


def get_backend() -> str:
    """Name of the backend in effect: "native", "numpy" or "cuda"."""
    return current().name


@contextmanager
def use_backend(name: str):
    """Use backend ``name`` inside a ``with`` block (for the calling thread, and the
    calling asyncio task)."""
    mod = load(name)
    prev = _backend_var.get()
    try:  # (set inside: a KeyboardInterrupt right after the set still restores it)
        _backend_var.set(mod)
        yield mod
    finally:
        _backend_var.set(prev)
