"""Tolerances and comparison helpers shared by the tests."""

import math
import os
import subprocess
import sys

import numpy as np

ALPHA = 0.01  # leaky-relu slope used by the tests
GELU_C = math.sqrt(2.0 / math.pi)

#: (rtol, atol) per dtype for results compared with a float64 NumPy oracle.
TOL = {
    np.dtype(np.float32): (1e-5, 1e-6),
    np.dtype(np.float64): (1e-12, 1e-12),
}


def assert_close(actual, expected, dtype, scale=None, factor=1.0, what=""):
    """|actual - expected| <= factor * (atol + rtol * scale), elementwise.

    ``scale`` defaults to |expected|.  For reductions pass the magnitude of the
    terms summed (e.g. |a| @ |b| for a product): a sum that cancels has a small
    result but a rounding error proportional to its terms, and that is the only
    honest yardstick for it (the classic bound |fl(a.b) - a.b| <= k u |a|.|b|).
    """
    dtype = np.dtype(dtype)
    rtol, atol = TOL[dtype]
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        scale = np.abs(expected)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), expected.shape)
    err = np.abs(actual.astype(np.float64) - expected)
    bound = factor * (atol + rtol * scale)
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements out of tolerance "
            f"(rtol={rtol * factor:g}, atol={atol * factor:g}); worst at {i}: "
            f"actual {actual[i]!r}, expected {expected[i]!r}")


def snapshot(model=None, optimizer=None):
    """Bytes of every parameter value and grad, buffer, and optimizer state."""
    snap = []
    if model is not None:
        for p in model.parameters():
            snap.append(("value", p.value.dtype.str, p.value.shape, p.value.tobytes()))
            g = p._grad  # (not p.grad: reading that gives the parameter a gradient)
            snap.append(("grad", g.dtype.str, g.shape, g.tobytes(), p.has_grad)
                        if isinstance(g, np.ndarray) else ("grad", repr(g)))
        for name, arr in model.state_arrays():
            snap.append((name, arr.dtype.str, arr.shape, arr.tobytes()))
        snap.append(("training", tuple(m.training for m in model.modules())))
        # (a Dropout's generator: a refused call draws no masks)
        snap.extend(("rng", repr(m.rng.bit_generator.state)) for m in model.modules()
                    if isinstance(getattr(m, "rng", None), np.random.Generator))
    if optimizer is not None:
        sd = optimizer.state_dict()
        snap.append(("step", sd["step"]))
        snap.append(("hyper", repr(sorted(sd["hyper"].items()))))
        for i, s in enumerate(sd["state"]):
            for k in sorted(s):
                snap.append((i, k, s[k].dtype.str, s[k].shape, s[k].tobytes()))
    return snap


def act_ref(name, x, alpha=ALPHA):
    """act(x) in float64 (sigmoid via tanh: an independent, overflow-free formula)."""
    x = np.asarray(x, np.float64)
    if name == "identity":
        return x.copy()
    if name == "relu":
        return np.where(x > 0, x, 0.0)
    if name == "leaky_relu":
        return np.where(x > 0, x, alpha * x)
    if name == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * x))
    if name == "tanh":
        return np.tanh(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * x ** 3)))
    if name == "gelu_erf":  # (through erf, where the kernels use erfc)
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))) if x.size else x.copy()
    if name == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True, initial=-np.inf))
        return e / e.sum(axis=-1, keepdims=True)
    raise AssertionError(name)


def run_module_on_isa(path, isa, child_flag, select="not subprocess", timeout=900):
    """Run the test module at ``path`` in a subprocess with FASTPROP_ISA=isa (and the
    environment variable ``child_flag`` set to 1, so the child does not recurse);
    assert that it passed."""
    env = dict(os.environ, FASTPROP_ISA=isa, **{child_flag: "1"})
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         os.path.abspath(path), "-k", select],
        env=env, capture_output=True, text=True, timeout=timeout,
        cwd=os.path.dirname(os.path.abspath(path)))
    assert out.returncode == 0, f"{isa}\n" + out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout, isa


def in_fork_child(target, *args, timeout=60):
    """``target(*args, conn)`` run in a forked child; returns what it sent on ``conn``
    (the fork warning about threads, which fastprop's OpenMP pool has, silenced)."""
    import multiprocessing as mp
    import warnings
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads
        proc = ctx.Process(target=target, args=args + (child,))
        proc.start()
    assert parent.poll(timeout), "the child sent nothing"
    result = parent.recv()
    proc.join(10)
    return result
