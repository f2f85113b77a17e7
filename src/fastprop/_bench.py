"""Benchmark cases shared by ``fastprop bench`` and ``benchmarks/bench_step.py``.

Each ``*_case(impl, ...)`` builds the operation for one implementation — "native" or
"numpy" (fastprop backends) or "torch" (PyTorch CPU eager, when installed) — checks
its result once, and returns a zero-argument callable to time.  A missing
implementation raises :class:`Unavailable`.
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


def mlp_step_case(impl, batch):
    """One training step of MLP 784-256-128-10 (ReLU, softmax cross-entropy, Adam)."""
    torch = _require(impl)
    x, y = _mlp_data(batch)
    pairs = list(zip(MLP_SIZES[:-1], MLP_SIZES[1:]))
    if torch is not None:
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        layers = []
        for i, (a, b) in enumerate(pairs):
            layers.append(torch.nn.Linear(a, b))
            if i < len(pairs) - 1:
                layers.append(torch.nn.ReLU())
        model = torch.nn.Sequential(*layers)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        loss_fn = torch.nn.CrossEntropyLoss()

        def run():
            opt.zero_grad(set_to_none=False)
            loss = loss_fn(model(xt), yt)
            loss.backward()
            opt.step()
            return loss.item()
    else:
        fp = _fp()
        rng = np.random.default_rng(0)
        with fp.use_backend(impl):
            model = fp.nn.Sequential(*[
                fp.nn.Dense(a, b, activation="relu" if i < len(pairs) - 1 else None, rng=rng)
                for i, (a, b) in enumerate(pairs)])
            step = model.compile(fp.losses.SoftmaxCrossEntropy(),
                                 fp.optim.Adam(model.parameters()))

        def run():
            with fp.use_backend(impl):
                return step(x, y)
    if not math.isfinite(run()):
        raise AssertionError("non-finite loss")
    return run


def adam_case(impl, n):
    """One Adam update of ``n`` float32 parameters."""
    torch = _require(impl)
    rng = np.random.default_rng(0)
    if torch is not None:
        p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n).astype(np.float32)))
        p.grad = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        opt = torch.optim.Adam([p], lr=1e-3, fused=True)
        opt.step()
        return opt.step
    fp = _fp()
    p = fp.Parameter(rng.standard_normal(n).astype(np.float32))
    p.grad[...] = rng.standard_normal(n).astype(np.float32)
    with fp.use_backend(impl):
        opt = fp.optim.Adam([p], lr=1e-3)
        opt.step()

    def run():
        with fp.use_backend(impl):
            opt.step()
    return run


def numpy_activation(name):
    """The plain NumPy expression of an activation (the NumPy baseline)."""
    if name == "sigmoid":
        return lambda x: 1.0 / (1.0 + np.exp(-x))
    if name == "tanh":
        return np.tanh
    c = np.float32(math.sqrt(2 / math.pi))
    k = np.float32(0.044715)
    return lambda x: 0.5 * x * (1.0 + np.tanh(c * (x + k * x * x * x)))


def activation_case(impl, name, n):
    """Forward of sigmoid/tanh/gelu (tanh approximation) on n float32 values;
    impl "numpy" is the plain NumPy expression."""
    torch = _require(impl)
    x = (np.random.default_rng(0).standard_normal(n) * 3).astype(np.float32)
    ref = numpy_activation(name)(x)
    if torch is not None:
        xt = torch.from_numpy(x)
        out = torch.empty_like(xt)
        if name == "gelu":
            def run():
                return torch.nn.functional.gelu(xt, approximate="tanh")
        else:
            fn = torch.sigmoid if name == "sigmoid" else torch.tanh

            def run():
                return fn(xt, out=out)
        got = run().numpy()
    elif impl == "numpy":
        fn = numpy_activation(name)

        def run():
            return fn(x)
        got = run()
    else:
        fp = _fp()
        out = np.empty_like(x)

        def run():
            with fp.use_backend(impl):
                return fp.ops.activation(name, x, out=out)
        got = run()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    return run


def softmax_xent_case(impl, rows, classes):
    """Softmax cross-entropy forward + backward (loss and grad_logits)."""
    torch = _require(impl)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, classes)).astype(np.float32)
    labels = rng.integers(0, classes, size=rows)
    fp = _fp()
    with fp.use_backend("numpy"):
        ref_loss, ref_grad = fp.ops.softmax_cross_entropy(logits, labels)
    if torch is not None:
        lt = torch.from_numpy(logits).requires_grad_()
        yt = torch.from_numpy(labels)

        def run():
            lt.grad = None
            loss = torch.nn.functional.cross_entropy(lt, yt)
            loss.backward()
            return loss.item(), lt.grad.numpy()
    else:
        def run():
            with fp.use_backend(impl):
                return fp.ops.softmax_cross_entropy(logits, labels)
    loss, grad = run()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
    return run


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


def main(quick=True, plot=None, threads=2) -> int:
    fp = _fp()
    fp.set_num_threads(threads)
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        pass
    impls = ("native", "numpy", "torch")
    min_time, repeats = (0.3, 5) if quick else (1.0, 11)
    rows = []
    print(f"fastprop bench ({'quick' if quick else 'full'} profile, {threads} threads, "
          f"median seconds; ratio = other / native time)\n")
    header = f"{'case':<24}" + "".join(f"{i:>12}" for i in impls) + f"{'vs numpy':>10}{'vs torch':>10}"
    print(header)
    print("-" * len(header))
    for label, make in cases(quick):
        times = {}
        for impl in impls:
            time.sleep(0.3)  # idle BLAS/OpenMP workers of the previous run busy-wait
            try:
                times[impl] = _median_time(make(impl), min_time, repeats)
            except Unavailable:
                times[impl] = None
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
