"""Benchmark cases shared by ``fastprop bench`` and ``benchmarks/bench_step.py``.

Each ``*_case(impl, ...)`` builds the operation for one implementation — "native" or
"numpy" (fastprop backends) or "torch" (PyTorch CPU eager, when installed) — checks
its result once against an independent reference (float64 NumPy formulas, not one of
the implementations under test), and returns a zero-argument callable to time.  A
missing implementation raises :class:`Unavailable`.

Like for like: where an API can write into a preallocated output, every side does
(``out=`` for fastprop, torch and NumPy's ufuncs), so no side pays for an allocation
the others skip.

Threads: :func:`limit_threads` gives fastprop's OpenMP, NumPy's BLAS (through
threadpoolctl, when installed) and torch the same count.  NumPy's elementwise ufuncs
are single-threaded whatever that count is, so the NumPy side of the Adam, activation
and softmax cross-entropy cases, and the non-GEMM parts of the numpy-backend MLP step,
run on 1 thread while fastprop native and torch use them all.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

MLP_SIZES = (784, 256, 128, 10)


class Unavailable(Exception):
    """The implementation cannot run here (backend or PyTorch missing)."""


def _fp():
    import fastprop as fp
    return fp


def _require(impl):
    fp = _fp()
    if impl == "torch":
        try:
            import torch
        except ImportError:
            raise Unavailable("PyTorch is not installed") from None
        return torch
    try:
        fp.backends.load(impl)
    except fp.BackendUnavailableError as exc:
        raise Unavailable(str(exc)) from None
    return None


def _mlp_data(batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, MLP_SIZES[0])).astype(np.float32)
    y = rng.integers(0, MLP_SIZES[-1], size=batch)
    return x, y


def _mlp_init():
    """The initial parameters [w0, b0, w1, b1, ...] (float32, w as (in, out)) every
    implementation starts from."""
    fp = _fp()
    rng = np.random.default_rng(0)
    pairs = list(zip(MLP_SIZES[:-1], MLP_SIZES[1:]))
    params = []
    for i, (a, b) in enumerate(pairs):
        act = "relu" if i < len(pairs) - 1 else None
        layer = fp.nn.Dense(a, b, activation=act, rng=rng)
        params += [layer.weight.value.copy(), layer.bias.value.copy()]
    return params


def torch_mlp(torch, sizes, params):
    """``nn.Sequential`` of ``nn.Linear`` / ``nn.ReLU`` for layer widths ``sizes``,
    holding fastprop's weights ``params`` ([w0, b0, w1, b1, ...], w stored (in, out);
    torch's Linear stores (out, in)); returns (model, the Linear layers)."""
    layers, linears = [], []
    for k, (i, o) in enumerate(zip(sizes, sizes[1:])):
        lin = torch.nn.Linear(i, o)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(params[2 * k].T)))
            lin.bias.copy_(torch.from_numpy(params[2 * k + 1]))
        layers.append(lin)
        linears.append(lin)
        if k < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers), linears


def reference_mlp_step(params, x, y, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    """Textbook first step in float64: relu MLP forward, mean softmax cross-entropy,
    backward, Adam update (t = 1).  Returns (loss, new params, grads, |grad| scale):
    the scale is each gradient entry's sum of absolute terms, what its float32 rounding
    error is proportional to."""
    P = [np.asarray(p, np.float64) for p in params]
    layers = len(P) // 2
    h = np.asarray(x, np.float64)
    acts, zs = [h], []
    for i in range(layers):
        z = h @ P[2 * i] + P[2 * i + 1]
        zs.append(z)
        h = np.maximum(z, 0.0) if i < layers - 1 else z
        acts.append(h)
    n = len(y)
    z = zs[-1] - zs[-1].max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(n), y].mean())
    g = np.exp(logp)
    g[np.arange(n), y] -= 1.0
    g /= n
    grads, scales = [None] * len(P), [None] * len(P)
    for i in reversed(range(layers)):
        if i < layers - 1:
            g = g * (zs[i] > 0)
        grads[2 * i], scales[2 * i] = acts[i].T @ g, np.abs(acts[i]).T @ np.abs(g)
        grads[2 * i + 1], scales[2 * i + 1] = g.sum(axis=0), np.abs(g).sum(axis=0)
        g = g @ P[2 * i].T
    new = []
    for p, gr in zip(P, grads):
        m_hat = (1 - b1) * gr / (1 - b1)
        v_hat = (1 - b2) * gr * gr / (1 - b2)
        new.append(p - lr * m_hat / (np.sqrt(v_hat) + eps))
    return loss, new, grads, scales


def check_mlp_step(impl, loss, params, ref, lr=1e-3):
    """One step's loss and every parameter against the float64 reference.

    Adam's first update is lr * g / (|g| + eps), about lr * sign(g): where a gradient
    is within float32 rounding of 0 its sign (and the update, by up to 2 lr) is not
    determined by the maths, so those entries are only held to 2 lr; everywhere else
    (|g| well above its rounding error and above eps) the update must agree to 1% of
    lr.  An update that is skipped, halved or of the wrong sign fails."""
    ref_loss, ref_params, grads, scales = ref
    if not math.isclose(loss, ref_loss, rel_tol=1e-5, abs_tol=1e-6):
        raise AssertionError(f"{impl}: first-step loss {loss!r}, reference {ref_loss!r}")
    checked = 0
    for k, (got, want, g, sc) in enumerate(zip(params, ref_params, grads, scales)):
        got = np.asarray(got, np.float64)
        if got.shape != want.shape:
            raise AssertionError(f"{impl}: parameter {k} has shape {got.shape}, "
                                 f"expected {want.shape}")
        err = np.abs(got - want)
        sure = (np.abs(g) > 1e-3 * sc) & (np.abs(g) > 100 * 1e-8)
        tight = err[sure] <= 1e-2 * lr + 1e-6 * np.abs(want[sure])
        loose = err <= 2.01 * lr
        if not (tight.all() and loose.all()):
            raise AssertionError(
                f"{impl}: parameter {k} after the first step differs from the reference "
                f"(max error {err.max():.3g}, lr {lr})")
        checked += int(sure.sum())
    if checked == 0:  # pragma: no cover - the data makes every gradient nonzero
        raise AssertionError("no parameter update could be checked")


_CYCLE = 16  # distinct batches a timed MLP step cycles through


def _jax():
    """jax, jax.numpy and optax, or Unavailable.  XLA is asked for one thread per
    op before jax is first imported (it may still use more cores than the others:
    the comparison then favours JAX)."""
    import os
    import sys
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                           "intra_op_parallelism_threads=1")
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        raise Unavailable("JAX and optax are not installed") from None
    return jax, jnp, optax


def mlp_step_case(impl, batch):
    """One training step of MLP 784-256-128-10 (ReLU, softmax cross-entropy, Adam).

    Every implementation starts from the same weights; its first step (loss and all
    parameters after the update) is checked against a float64 NumPy reference.  The
    timed steps then cycle through 16 distinct batches (one batch repeated is learnt
    by heart within ~20 steps at batch 1, and its vanishing gradients are not a
    training step's arithmetic).  PyTorch: fused Adam, ``zero_grad()`` as by default
    (gradients set to None); JAX (``impl="jax"``): ``jax.jit`` of value_and_grad and
    ``optax.adam``, parameters and state donated, the loss fetched each step as the
    others return it."""
    x, y = _mlp_data(batch)
    xs, ys = _mlp_data(batch * _CYCLE, seed=1)
    batches = [(np.ascontiguousarray(xs[i * batch:(i + 1) * batch]), ys[i * batch:(i + 1) * batch])
               for i in range(_CYCLE)]
    p0 = _mlp_init()
    ref = reference_mlp_step(p0, x, y)
    pairs = list(zip(MLP_SIZES[:-1], MLP_SIZES[1:]))
    turn = [0]

    if impl == "jax":
        jax, jnp, optax = _jax()
        tx = optax.adam(1e-3)

        def loss_fn(params, xb, yb):
            h = xb
            for i in range(len(pairs)):
                h = h @ params[2 * i] + params[2 * i + 1]
                if i < len(pairs) - 1:
                    h = jax.nn.relu(h)
            return optax.softmax_cross_entropy_with_integer_labels(h, yb).mean()

        def jstep(params, state, xb, yb):
            loss, g = jax.value_and_grad(loss_fn)(params, xb, yb)
            upd, state = tx.update(g, state, params)
            return optax.apply_updates(params, upd), state, loss

        jstep = jax.jit(jstep, donate_argnums=(0, 1))
        params = [jnp.asarray(p) for p in p0]
        held = [params, tx.init(params)]
        batches_c = [(jnp.asarray(a), jnp.asarray(b)) for a, b in batches]

        def run_on(xb, yb):
            held[0], held[1], loss = jstep(held[0], held[1], xb, yb)
            return float(loss)  # (a host sync, as the others' losses)

        def params():
            return [np.asarray(p) for p in held[0]]

        first = run_on(jnp.asarray(x), jnp.asarray(y))
    elif impl == "torch":
        torch = _require(impl)
        model, linears = torch_mlp(torch, list(MLP_SIZES), p0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        loss_fn = torch.nn.CrossEntropyLoss()
        batches_c = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in batches]

        def run_on(xb, yb):
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            return loss.item()

        def params():
            return [a for lin in linears
                    for a in (lin.weight.detach().numpy().T, lin.bias.detach().numpy())]

        first = run_on(torch.from_numpy(x), torch.from_numpy(y))
    else:
        _require(impl)
        fp = _fp()
        with fp.use_backend(impl):
            layers = []
            for i, (a, b) in enumerate(pairs):
                layer = fp.nn.Dense(a, b, activation="relu" if i < len(pairs) - 1 else None,
                                    rng=0)
                layer.weight.value[...] = p0[2 * i]
                layer.bias.value[...] = p0[2 * i + 1]
                layers.append(layer)
            model = fp.nn.Sequential(*layers)
            step = model.compile(fp.losses.SoftmaxCrossEntropy(),
                                 fp.optim.Adam(model.parameters(), lr=1e-3))
        batches_c = batches

        def run_on(xb, yb):
            with fp.use_backend(impl):
                return step(xb, yb)

        def params():
            return [p.value for p in model.parameters()]

        first = run_on(x, y)
    check_mlp_step(impl, first, params(), ref)

    def run():
        xb, yb = batches_c[turn[0] % _CYCLE]
        turn[0] += 1
        return run_on(xb, yb)
    return run


def adam_case(impl, n):
    """One Adam update of ``n`` float32 parameters.

    Two steps (with different gradients, so both moments matter) are checked against
    the textbook Adam update in float64 before the case is timed."""
    torch = _require(impl)
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(np.float32)
    g1 = rng.standard_normal(n).astype(np.float32)
    g2 = rng.standard_normal(n).astype(np.float32)
    lr = 1e-3
    if torch is not None:
        p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        opt = torch.optim.Adam([p], lr=lr, fused=True)
        run = opt.step

        def first_steps():
            for g in (g1, g2):
                p.grad = torch.from_numpy(g.copy())
                run()
            return p.detach().numpy()
    else:
        fp = _fp()
        p = fp.Parameter(p0.copy())
        with fp.use_backend(impl):
            opt = fp.optim.Adam([p], lr=lr)

        def run():
            with fp.use_backend(impl):
                opt.step()

        def first_steps():
            for g in (g1, g2):
                p.grad[...] = g
                run()
            return p.value
    got = first_steps()
    want = _reference_adam(p0, (g1, g2), lr=lr)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * lr,
                               err_msg=f"{impl}: Adam differs from the textbook update")
    return run


def _reference_adam(p, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Kingma & Ba, Algorithm 1, in float64."""
    p = np.asarray(p, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


_GELU_C = math.sqrt(2 / math.pi)
_GELU_K = 0.044715


def numpy_activation_out(name):
    """The NumPy baseline: ``f(x, out)`` computes the activation with ufuncs writing
    into ``out`` (no temporary arrays), as the other sides write into theirs."""
    if name == "sigmoid":
        def sigmoid(x, out):
            np.negative(x, out=out)
            np.exp(out, out=out)
            out += 1
            return np.reciprocal(out, out=out)
        return sigmoid
    if name == "tanh":
        return lambda x, out: np.tanh(x, out=out)
    if name == "gelu_erf":  # (NumPy has no erf: SciPy's ufunc, the NumPy world's one)
        try:
            from scipy.special import erfc
        except ImportError:
            raise Unavailable("the NumPy side of gelu_erf needs SciPy's erfc") from None
        r = np.float32(-np.sqrt(0.5))

        def gelu_erf(x, out):  # 0.5 x erfc(-x / sqrt 2)
            np.multiply(x, r, out=out)
            erfc(out, out=out)
            out *= 0.5
            out *= x
            return out
        return gelu_erf
    c, k = np.float32(_GELU_C), np.float32(_GELU_K)

    def gelu(x, out):  # 0.5 x (1 + tanh(c x (1 + k x^2)))
        np.multiply(x, x, out=out)
        out *= k
        out += 1
        out *= x
        out *= c
        np.tanh(out, out=out)
        out += 1
        out *= x
        out *= 0.5
        return out
    return gelu


def _reference_activation(name, x):
    """float64 formulas (the reference every side is checked against)."""
    x = np.asarray(x, np.float64)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if name == "tanh":
        return np.tanh(x)
    if name == "gelu_erf":
        return 0.5 * x * np.frompyfunc(math.erfc, 1, 1)(x * -math.sqrt(0.5)).astype(np.float64)
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + _GELU_K * x ** 3)))


def _torch_gelu_out(torch, approximate="tanh"):
    """``f(x, out)``: gelu (by default the tanh approximation) into ``out`` (torch's
    out= variant when this torch has it; else the allocating functional form)."""
    fn = getattr(getattr(torch._C, "_nn", None), "gelu", None)
    if fn is not None:
        try:
            probe = torch.zeros(2)
            fn(probe, approximate=approximate, out=torch.empty_like(probe))
            return lambda x, out: fn(x, approximate=approximate, out=out)
        except (TypeError, RuntimeError):
            pass
    return lambda x, out: torch.nn.functional.gelu(x, approximate=approximate)


def activation_case(impl, name, n):
    """Forward of sigmoid/tanh/gelu (tanh approximation)/gelu_erf on n float32 values into a
    preallocated output on every side; impl "numpy" is NumPy's ufuncs with ``out=``
    (single-threaded)."""
    torch = _require(impl)
    x = (np.random.default_rng(0).standard_normal(n) * 3).astype(np.float32)
    ref = _reference_activation(name, x)
    if torch is not None:
        xt = torch.from_numpy(x)
        out = torch.empty_like(xt)
        if name == "gelu":
            fn = _torch_gelu_out(torch)
        elif name == "gelu_erf":
            fn = _torch_gelu_out(torch, "none")
        else:
            fn = torch.sigmoid if name == "sigmoid" else torch.tanh

            def fn(x, out, _f=fn):
                return _f(x, out=out)

        def run():
            return fn(xt, out)
        got = run().numpy()
    elif impl == "numpy":
        fn = numpy_activation_out(name)
        out = np.empty_like(x)

        def run():
            return fn(x, out)
        got = run()
    else:
        fp = _fp()
        out = np.empty_like(x)

        def run():
            with fp.use_backend(impl):
                return fp.ops.activation(name, x, out=out)
        got = run()
    # (torch's float32 exact gelu, 0.5 x (1 + erf(x / sqrt 2)), cancels in the negative
    # tail: 1e-3 relative, 1.1e-6 absolute, near x = -3.4; fastprop's is within 1 ulp)
    atol = 5e-6 if torch is not None and name == "gelu_erf" else 1e-6
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=atol,
                               err_msg=f"{impl} {name} differs from the float64 reference")
    return run


def _reference_softmax_xent(logits, labels):
    """Mean softmax cross-entropy and its gradient in float64 (textbook formulas)."""
    z = np.asarray(logits, np.float64)
    n = z.shape[0]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(s[:, 0]) - z[np.arange(n), labels]))
    grad = e / s
    grad[np.arange(n), labels] -= 1.0
    return loss, grad / n


def _checked_loss_run(run, ref_loss, ref_grad, grad_atol, what):
    """run, after its loss and gradient were checked against the float64 reference."""
    loss, grad = run()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=f"{what} loss")
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=grad_atol,
                               err_msg=f"{what} gradient")
    return run


def _torch_loss_run(torch, loss_fn, logits, target):
    """PyTorch's side of a loss case: run() -> (loss, grad_logits), forward + backward."""
    lt = torch.from_numpy(logits).requires_grad_()
    tt = torch.from_numpy(target)

    def run():
        lt.grad = None
        loss = loss_fn(lt, tt)
        loss.backward()
        return loss.item(), lt.grad.numpy()
    return run


def softmax_xent_case(impl, rows, classes):
    """Softmax cross-entropy forward + backward (loss and grad_logits), checked against
    the float64 formula (not against a backend)."""
    torch = _require(impl)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, classes)).astype(np.float32)
    labels = rng.integers(0, classes, size=rows)
    ref_loss, ref_grad = _reference_softmax_xent(logits, labels)
    fp = _fp()
    if torch is not None:
        run = _torch_loss_run(torch, torch.nn.functional.cross_entropy, logits, labels)
    else:
        def run():
            with fp.use_backend(impl):
                return fp.ops.softmax_cross_entropy(logits, labels)
    return _checked_loss_run(run, ref_loss, ref_grad, 1e-7, f"{impl}: softmax cross-entropy")


def bce_logits_case(impl, rows, cols):
    """Binary cross-entropy from logits, forward + backward (loss and grad_logits), as
    in multilabel classification; checked against the float64 formula."""
    torch = _require(impl)
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
    targets = (rng.random((rows, cols)) < 0.3).astype(np.float32)
    x, t = logits.astype(np.float64), targets.astype(np.float64)
    ref_loss = float(np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))))
    ref_grad = (1 / (1 + np.exp(-x)) - t) / x.size
    if torch is not None:
        run = _torch_loss_run(torch, torch.nn.functional.binary_cross_entropy_with_logits,
                              logits, targets)
    else:
        fp = _fp()
        with fp.use_backend(impl):
            loss_fn = fp.losses.BinaryCrossEntropy(from_logits=True)

        def run():
            with fp.use_backend(impl):
                return loss_fn.forward(logits, targets), loss_fn.backward()
    return _checked_loss_run(run, ref_loss, ref_grad, 1e-10, f"{impl}: binary cross-entropy")


# ------------------------------------------------------------------ `fastprop bench`
def _median_time(fn, min_time, repeats):
    fn()
    reps = 1
    while True:  # calibrate so one sample takes >= min_time / repeats
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time / repeats or reps >= 1 << 16:
            break
        reps *= 2
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def cases(quick=True):
    batches = (1, 32, 128, 2048) if quick else (1, 32, 128, 512, 2048)
    for b in batches:
        yield f"mlp step batch {b}", lambda impl, b=b: mlp_step_case(impl, b)
    for n in ((235_146, 4_000_000)):
        yield f"adam n={n}", lambda impl, n=n: adam_case(impl, n)
    for name in ("sigmoid", "tanh", "gelu"):
        yield f"{name} 4M", lambda impl, name=name: activation_case(impl, name, 4_000_000)
    for shape in ((128, 10), (512, 1000)):
        yield (f"softmax xent {shape[0]}x{shape[1]}",
               lambda impl, shape=shape: softmax_xent_case(impl, *shape))
    yield "bce logits 512x1000", lambda impl: bce_logits_case(impl, 512, 1000)


class _Limits:
    """What :func:`limit_threads` changed; ``restore_original_limits()`` (threadpoolctl's
    name) puts back fastprop's, PyTorch's and NumPy's BLAS thread counts."""

    def __init__(self, fp_threads, torch_threads, blas):
        self._fp_threads, self._torch_threads, self._blas = fp_threads, torch_threads, blas

    def restore_original_limits(self):
        if self._blas is not None:  # (first: threadpoolctl restores every library's
            self._blas.restore_original_limits()  # count as it was, OpenMP's too)
        if self._torch_threads is not None:
            import torch as _torch
            _torch.set_num_threads(self._torch_threads)
        _fp().set_num_threads(self._fp_threads)  # (last: PyTorch's libgomp is fastprop's)


def limit_threads(threads, torch=True):
    """Give fastprop's OpenMP, NumPy's BLAS and (``torch=True``) PyTorch ``threads``
    threads.  Returns ``(limiter, note)``: a limiter whose
    ``restore_original_limits()`` puts all three back (call it when done), and a line
    to print when NumPy's BLAS could not be limited (threadpoolctl, an optional
    dependency, not installed), else None."""
    fp = _fp()
    fp_threads, torch_threads, blas, note = fp.get_num_threads(), None, None, None
    _torch = None
    if torch:
        try:
            import torch as _torch
        except ImportError:
            pass
        else:  # (read before any is set: PyTorch's libgomp is fastprop's)
            torch_threads = _torch.get_num_threads()
    try:  # (before the others: threadpoolctl's limiter restores every library's count)
        from threadpoolctl import threadpool_limits
    except ImportError:
        note = ("threadpoolctl is not installed: the NumPy side's BLAS thread count is "
                "not controlled (it uses OpenBLAS's default, often every core)")
    else:
        blas = threadpool_limits(threads, user_api="blas")
    if _torch is not None:
        _torch.set_num_threads(threads)
    fp.set_num_threads(threads)
    return _Limits(fp_threads, torch_threads, blas), note


def main(quick=True, plot=None, threads=2) -> int:
    limiter, note = limit_threads(threads)
    try:
        return _main(quick, plot, threads, note)
    finally:
        limiter.restore_original_limits()


def _main(quick, plot, threads, note):
    impls = ("native", "numpy", "torch")
    min_time, repeats = (0.3, 5) if quick else (1.0, 11)
    rows = []
    print(f"fastprop bench ({'quick' if quick else 'full'} profile, median seconds; "
          f"ratio = other / native time)")
    blas = "not controlled" if note else f"{threads}"
    import importlib.util
    peer = f"torch {threads}" if importlib.util.find_spec("torch") else "torch not installed"
    print(f"threads: fastprop {threads}, {peer}, NumPy's BLAS {blas}")
    if threads > 1:
        print(f"NumPy's elementwise ufuncs are single-threaded: the 'vs numpy' ratios of the "
              f"adam, activation and softmax xent rows (and the non-GEMM work of the "
              f"numpy-backend step) compare {threads} native threads with 1 NumPy thread")
    if note:
        print(f"note: {note}")
    print()
    header = (f"{'case':<24}" + "".join(f"{i:>12}" for i in impls)
              + f"{'vs numpy':>10}{'vs torch':>10}")
    print(header)
    print("-" * len(header))
    for label, make in cases(quick):
        times = {}
        for impl in impls:
            try:
                run = make(impl)
            except Unavailable:
                times[impl] = None
                continue
            # (the case's check against a float64 NumPy reference, and the previous
            # run, leave BLAS/OpenMP workers busy-waiting ~0.1 s, which would slow the
            # first samples, and make fastprop's kernels give up threads for as long)
            time.sleep(0.3)
            times[impl] = _median_time(run, min_time, repeats)
        cells = "".join(f"{times[i] * 1e3:>10.3f}ms" if times[i] else f"{'-':>12}" for i in impls)
        ratios = []
        for other in ("numpy", "torch"):
            if times["native"] and times[other]:
                ratios.append(times[other] / times["native"])
            else:
                ratios.append(None)
        cells += "".join(f"{r:>9.2f}x" if r else f"{'-':>10}" for r in ratios)
        print(f"{label:<24}{cells}", flush=True)
        rows.append((label, ratios))
    if plot:
        _plot(rows, plot)
    return 0


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no chart)")
        return
    labels = [r[0] for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    for k, (name, off) in enumerate((("vs numpy", -0.2), ("vs torch", 0.2))):
        vals = [r[1][k] or 0 for r in rows]
        ax.barh(y + off, vals, height=0.4, label=f"native speed-up {name}")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(y, labels)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up of fastprop native (x, log scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nchart saved to {path}")
