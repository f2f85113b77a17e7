"""Property-based tests (hypothesis) of every public op, layer, loss and optimizer.

Each property draws shapes (0, 1, small sizes and primes up to 257), dtypes (float32,
float64, and integer / float16 inputs that promote), memory layouts (C, Fortran,
strided, offset by one element, reversed) and ``out`` arguments (fresh, aliasing an
input, non-contiguous), runs the call on the native backend and on the NumPy
reference backend, and asserts that both return the same result within the dtype's
tolerance or both raise the same exception with the same message.

The last group fuzzes the raw kernel API (``fastprop.backends.native``, the Cython
bridge) with near-valid arguments -- one array of a valid call given a wrong shape,
dtype, layout, rank or writability -- inside guard-banded buffers: every call either
succeeds or raises TypeError/ValueError, and never writes outside its outputs.  Run
under tools/sanitize.sh, the same tests prove the C++ side reads and writes nothing
out of bounds.

Examples per property: FASTPROP_PROPERTY_EXAMPLES (default 25).  The examples are
derandomized, so CI runs are repeatable; FASTPROP_PROPERTY_RANDOM=1 draws new ones
(e.g. ``FASTPROP_PROPERTY_EXAMPLES=2000 FASTPROP_PROPERTY_RANDOM=1 pytest
tests/test_properties.py`` for a long search).
"""

import contextlib
import importlib.util
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fastprop as fp
from fastprop import backends, losses, nn, ops, optim

pytestmark = pytest.mark.skipif(importlib.util.find_spec("fastprop._native") is None,
                                reason="fastprop._native is not built")

PROP = settings(max_examples=int(os.environ.get("FASTPROP_PROPERTY_EXAMPLES", "25")),
                deadline=None, derandomize=not os.environ.get("FASTPROP_PROPERTY_RANDOM"),
                database=None,
                suppress_health_check=list(HealthCheck))

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
TOL = {F32: (1e-5, 1e-6), F64: (1e-12, 1e-12)}
#: 0, 1, small sizes, and primes that are not multiples of any SIMD width or tile.
DIM = st.one_of(st.integers(0, 9), st.sampled_from([17, 31, 61, 127, 257]))
POS = st.one_of(st.integers(1, 9), st.sampled_from([17, 31, 61, 127]))
LAYOUTS = ["C", "F", "strided", "offset", "reversed"]
FLOATS = [F32, F64]
IN_DTYPES = st.sampled_from([F32, F64, F32, F64, np.dtype(np.float16), np.dtype(np.int32)])
ACTS = ["identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softmax"]
SCALES = st.sampled_from([1.0, 1.0, 30.0, 1e4])


# ------------------------------------------------------------------ helpers
def make(seed, shape, dtype=F64, layout="C", scale=1.0):
    """A deterministic array of ``shape`` with the given dtype and memory layout."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        vals = rng.integers(-4, 5, size=shape)
    else:
        vals = rng.standard_normal(shape) * scale
    vals = np.asarray(vals).astype(dtype)
    nd = vals.ndim
    if nd == 0 or layout == "C":
        return np.ascontiguousarray(vals)
    if layout == "F":
        return np.asfortranarray(vals)
    if layout == "strided":
        base = np.zeros(tuple(2 * s + 1 for s in shape), dtype)
        view = base[tuple(slice(1, None, 2) for _ in shape)][tuple(slice(0, s) for s in shape)]
    elif layout == "offset":
        base = np.zeros(vals.size + 1, dtype)
        view = base[1:].reshape(shape)
    else:  # reversed: negative strides on every axis
        base = np.zeros(shape, dtype)
        view = base[tuple(slice(None, None, -1) for _ in shape)]
    view[...] = vals
    return view


def run(backend, fn):
    """(result, None) or (None, exception) of ``fn()`` on ``backend``."""
    with fp.use_backend(backend), np.errstate(all="ignore"):
        try:
            return fn(), None
        except (TypeError, ValueError, RuntimeError) as exc:
            return None, exc


def both(fn):
    """Run ``fn`` on both backends; fail unless they agree on raising.  Returns the
    two results (None when both raised the same exception)."""
    got, err = run("native", fn)
    want, ref_err = run("numpy", fn)
    if ref_err is not None or err is not None:
        assert type(err) is type(ref_err) and str(err) == str(ref_err), (
            f"native raised {err!r}, the NumPy backend {ref_err!r}")
        return None, None
    return got, want


def agree(got, want, scale=0.0, factor=4.0, what="", dtype=None):
    """|got - want| <= factor (atol + rtol (|want| + scale)), elementwise, same dtype
    and shape; NaN and inf must match exactly."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: {got.shape}/{got.dtype} != {want.shape}/{want.dtype}")
    if got.dtype.kind != "f":
        assert np.array_equal(got, want), what
        return
    rtol, atol = TOL[compute_dtype(got.dtype if dtype is None else dtype)]
    g, w = got.astype(np.float64), want.astype(np.float64)
    fin = np.isfinite(w)
    assert np.array_equal(np.isnan(g), np.isnan(w)), f"{what}: NaN positions differ"
    assert np.array_equal(g[~fin & ~np.isnan(w)], w[~fin & ~np.isnan(w)]), f"{what}: inf differ"
    bound = factor * (atol + rtol * (np.abs(w) + np.broadcast_to(scale, w.shape)))
    err = np.where(fin, np.abs(g - w), 0.0)
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape)
        raise AssertionError(f"{what}: {int(bad.sum())}/{err.size} out of tolerance, worst at "
                             f"{i}: native {g[i]!r}, numpy {w[i]!r}")


def f64(a):
    return np.asarray(a, dtype=np.float64)


def compute_dtype(dt):
    """The float dtype fastprop computes in for inputs of dtype ``dt``."""
    dt = np.dtype(dt)
    return F64 if dt.kind in "iu" or dt.itemsize > 4 else F32


def act_slope(name):
    """Bound on |act'| (gelu's is about 1.13), to carry an error bound through act."""
    return 1.2


# ------------------------------------------------------------------ fp.ops
@PROP
@given(m=DIM, k=DIM, n=DIM, ta=st.booleans(), tb=st.booleans(), da=IN_DTYPES, db=IN_DTYPES,
       la=st.sampled_from(LAYOUTS), lb=st.sampled_from(LAYOUTS),
       out=st.sampled_from(["none", "fresh", "F", "strided", "alias_a", "alias_b"]),
       accumulate=st.booleans(), seed=st.integers(0, 2**32 - 1))
# (cases 25 drawn examples did not reach: accumulate into C, F-order and strided
# outputs, an output that is an input, in each dtype; k not a multiple of a tile)
@example(m=7, k=31, n=9, ta=False, tb=False, da=F32, db=F32, la="C", lb="C", out="fresh",
         accumulate=True, seed=1)
@example(m=17, k=9, n=31, ta=True, tb=True, da=F64, db=F64, la="F", lb="strided", out="F",
         accumulate=True, seed=2)
@example(m=9, k=33, n=7, ta=False, tb=True, da=F32, db=F32, la="offset", lb="C", out="strided",
         accumulate=True, seed=3)
@example(m=7, k=7, n=7, ta=False, tb=False, da=F32, db=F32, la="C", lb="C", out="alias_a",
         accumulate=False, seed=4)
@example(m=9, k=9, n=9, ta=True, tb=False, da=F64, db=F64, la="C", lb="C", out="alias_b",
         accumulate=True, seed=5)
@example(m=5, k=5, n=5, ta=False, tb=False, da=F64, db=F64, la="F", lb="C", out="alias_a",
         accumulate=True, seed=6)
def test_matmul(m, k, n, ta, tb, da, db, la, lb, out, accumulate, seed):
    sa = (k, m) if ta else (m, k)
    sb = (n, k) if tb else (k, n)
    dt = np.result_type(da, db)
    rdt = F64 if dt.kind in "iu" or dt.itemsize > 4 else F32

    def call():
        a = make(seed, sa, da, la)
        b = make(seed + 1, sb, db, lb)
        o = None
        if out == "alias_a" and a.shape == (m, n) and a.dtype == rdt:
            o = a
        elif out == "alias_b" and b.shape == (m, n) and b.dtype == rdt:
            o = b
        elif out in ("fresh", "F", "strided"):
            o = make(seed + 2, (m, n), rdt, {"fresh": "C"}.get(out, out))
        acc = accumulate and o is not None
        o0 = None if o is None else f64(o).copy()
        r = ops.matmul(a, b, trans_a=ta, trans_b=tb, out=o, accumulate=acc)
        assert o is None or r is o
        return r.copy(), a, b, o0, acc

    got, want = both(call)
    if got is None:
        return
    r, a, b, o0, acc = want
    opa, opb = (f64(a).T if ta else f64(a)), (f64(b).T if tb else f64(b))
    scale = np.abs(opa) @ np.abs(opb) + (np.abs(o0) if acc else 0.0)
    agree(got[0], r, scale, what="matmul")


@PROP
@given(n=DIM, fin=DIM, fout=DIM, act=st.sampled_from(ACTS + [None]), bias=st.booleans(),
       dt=IN_DTYPES, lx=st.sampled_from(LAYOUTS), lw=st.sampled_from(LAYOUTS),
       preact=st.booleans(), scale=SCALES, seed=st.integers(0, 2**32 - 1))
def test_linear_and_linear_backward(n, fin, fout, act, bias, dt, lx, lw, preact, scale, seed):
    def fwd():
        x = make(seed, (n, fin), dt, lx, scale)
        w = make(seed + 1, (fin, fout), dt, lw)
        b = make(seed + 2, (fout,), dt, lx) if bias else None
        return ops.linear(x, w, b, activation=act, return_preact=preact)

    got, want = both(fwd)
    if got is None:
        return
    x, w = f64(make(seed, (n, fin), dt, lx, scale)), f64(make(seed + 1, (fin, fout), dt, lw))
    zscale = np.abs(x) @ np.abs(w) + (np.abs(f64(make(seed + 2, (fout,), dt))) if bias else 0)
    if act == "softmax":  # every output of a row depends on the whole row of z
        zscale = np.broadcast_to(zscale.max(axis=1, keepdims=True, initial=0), zscale.shape)
    if preact:
        agree(got[1], want[1], zscale, what="linear z")
        got, want = got[0], want[0]
    agree(got, want, act_slope(act) * zscale, what="linear y")

    # backward, from the reference forward values
    y_ref = want

    def bwd():
        gy = make(seed + 3, (n, fout), dt, lx)
        xx = make(seed, (n, fin), dt, lx, scale)
        ww = make(seed + 1, (fin, fout), dt, lw)
        z = None
        if act == "gelu":
            with fp.use_backend("numpy"):
                z = ops.linear(xx, ww, make(seed + 2, (fout,), dt) if bias else None)
        return ops.linear_backward(gy, xx, ww, y_ref, activation=act, z=z)

    got, want = both(bwd)
    if got is None:
        return
    gy = np.abs(f64(make(seed + 3, (n, fout), dt, lx))) * act_slope(act)
    if act == "softmax":
        gy = gy.sum(axis=1, keepdims=True) * np.ones((1, fout))
    agree(got[0], want[0], gy @ np.abs(w).T, what="grad_x")
    agree(got[1], want[1], np.abs(x).T @ gy, what="grad_w")
    agree(got[2], want[2], gy.sum(axis=0), what="grad_b")


SHAPES = st.lists(DIM, min_size=0, max_size=3).map(tuple)


@PROP
@given(name=st.sampled_from(ACTS), shape=SHAPES, dt=IN_DTYPES, layout=st.sampled_from(LAYOUTS),
       out=st.sampled_from(["none", "alias", "fresh", "strided"]), scale=SCALES,
       alpha=st.sampled_from([0.0, 0.01, 0.3]), seed=st.integers(0, 2**32 - 1))
def test_activation_forward_and_backward(name, shape, dt, layout, out, scale, alpha, seed):
    def fwd():
        x = make(seed, shape, dt, layout, scale)
        o = None
        if out == "alias" and x.dtype in FLOATS:
            o = x  # in place
        elif out in ("fresh", "strided"):
            o = make(seed + 1, shape, compute_dtype(dt), "C" if out == "fresh" else out)
        return ops.activation(name, x, alpha=alpha, out=o).copy()

    got, want = both(fwd)
    if got is None:
        return
    x = f64(make(seed, shape, dt, layout, scale))
    agree(got, want, np.abs(x) if name == "gelu" else 1.0 if name == "softmax" else 0.0,
          what=f"{name} forward")

    y = want

    def bwd():
        g = make(seed + 2, shape, dt, layout)
        xx = make(seed, shape, dt, layout, scale)
        return ops.activation_backward(name, g, xx, y, alpha=alpha)

    got, want = both(bwd)
    if got is None:
        return
    g = np.abs(f64(make(seed + 2, shape, dt, layout)))
    if name == "softmax" and g.ndim:
        g = g + (g * np.abs(f64(y))).sum(axis=-1, keepdims=True)
    agree(got, want, g * (1 + np.abs(x) if name == "gelu" else 1.0), what=f"{name} backward")


@PROP
@given(n=DIM, c=DIM, kind=st.sampled_from(["int64", "int32", "uint8", "float", "probs"]),
       dt=IN_DTYPES, layout=st.sampled_from(LAYOUTS), scale=SCALES,
       seed=st.integers(0, 2**32 - 1))
def test_softmax_cross_entropy(n, c, kind, dt, layout, scale, seed):
    def call():
        logits = make(seed, (n, c), dt, layout, scale)
        rng = np.random.default_rng(seed)
        if kind == "probs":
            t = rng.random((n, c))
            labels = t / np.maximum(t.sum(axis=1, keepdims=True), 1e-300)
        else:
            labels = rng.integers(0, max(c, 1), n).astype(kind if kind != "float" else F64)
        return ops.softmax_cross_entropy(logits, labels)

    got, want = both(call)
    if got is None:
        return
    row = np.abs(f64(make(seed, (n, c), dt, layout, scale))).max(axis=1, keepdims=True)
    agree(np.float64(got[0]), np.float64(want[0]), float(row.mean()) + 1, what="loss",
          dtype=compute_dtype(dt))
    agree(got[1], want[1], 1.0 / max(n, 1), what="grad")


# ------------------------------------------------------------------ layers
def _layer(kind, f, f_out, act, dt, seed):
    if kind == "dense":
        return nn.Dense(f, f_out, activation=act, dtype=dt, rng=seed)
    if kind == "dense_nobias":
        return nn.Dense(f, f_out, activation=act, bias=False, dtype=dt, rng=seed)
    if kind == "batchnorm":
        return nn.BatchNorm1d(f, dtype=dt)
    if kind == "layernorm":
        return nn.LayerNorm(f, dtype=dt)
    if kind == "dropout":
        return nn.Dropout(0.3, seed=seed)
    if kind == "residual":
        return nn.Residual(nn.Dense(f, f, activation=act, dtype=dt, rng=seed))
    if kind == "sequential":
        return nn.Sequential(nn.Dense(f, f_out, activation=act, dtype=dt, rng=seed),
                             nn.LayerNorm(f_out, dtype=dt), nn.LeakyReLU(0.2),
                             nn.Dense(f_out, 3, dtype=dt, rng=seed + 1))
    cls = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU,
           "softmax": nn.Softmax, "identity": nn.Identity}.get(kind)
    return cls() if cls is not None else nn.LeakyReLU(0.1)


LAYERS = ["dense", "dense_nobias", "batchnorm", "layernorm", "dropout", "residual",
          "sequential", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softmax", "identity"]


@PROP
@given(kind=st.sampled_from(LAYERS), n=DIM, f=POS, f_out=POS, act=st.sampled_from(ACTS + [None]),
       dt=st.sampled_from(FLOATS), xdt=IN_DTYPES, layout=st.sampled_from(LAYOUTS),
       training=st.booleans(), seed=st.integers(0, 2**31))
def test_layer_forward_backward(kind, n, f, f_out, act, dt, xdt, layout, training, seed):
    def call():
        layer = _layer(kind, f, f_out, act, dt, seed)
        layer.train(training)
        x = make(seed, (n, f), xdt, layout)
        y = layer(x)
        g = make(seed + 1, y.shape, xdt, layout)
        gx = layer.backward(g)
        grads = [p.grad.copy() for p in layer.parameters()]
        state = [a.copy() for _, a in layer.state_arrays()]
        return y, gx, grads, state

    got, want = both(call)
    if got is None:
        return
    # Normalisation layers divide by a batch/row deviation that may be tiny: compare on
    # the reference's own magnitudes (factor covers the 1/std amplification).
    low = F32 if F32 in (dt, compute_dtype(xdt)) else F64  # the least precise in play
    big = 64.0 if kind in ("batchnorm", "layernorm", "sequential") else 4.0
    y_scale = np.abs(f64(want[0])).max(initial=0) + f
    agree(got[0], want[0], y_scale, factor=big, what=f"{kind} forward", dtype=low)
    g_scale = (np.abs(f64(want[1])).max(initial=0) + 1) * max(f, f_out)
    agree(got[1], want[1], g_scale, factor=big, what=f"{kind} grad_x", dtype=low)
    for i, (a, b) in enumerate(zip(got[2], want[2])):
        agree(a, b, (np.abs(f64(b)).max(initial=0) + 1) * max(n, 1), factor=big,
              what=f"{kind} param grad {i}", dtype=low)
    for i, (a, b) in enumerate(zip(got[3], want[3])):
        agree(a, b, np.abs(f64(b)).max(initial=0) + 1, factor=big, what=f"{kind} state {i}",
              dtype=low)


@PROP
@given(loss=st.sampled_from(["mse", "mse_half", "bce", "bce_logits", "xent"]), shape=SHAPES,
       dt=IN_DTYPES, layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**32 - 1))
def test_losses(loss, shape, dt, layout, seed):
    def call():
        fn = {"mse": losses.MSE(), "mse_half": losses.MSE(half=True),
              "bce": losses.BinaryCrossEntropy(), "xent": losses.SoftmaxCrossEntropy(),
              "bce_logits": losses.BinaryCrossEntropy(from_logits=True)}[loss]
        pred = make(seed, shape, dt, layout)
        rng = np.random.default_rng(seed)
        if loss == "bce":
            pred = 1 / (1 + np.exp(-f64(pred)))
        if loss == "xent":
            target = rng.integers(0, max(shape[-1] if len(shape) == 2 else 1, 1),
                                  shape[0] if shape else 0)
        elif loss.startswith("bce"):
            target = (rng.random(shape) > 0.5).astype(F64)
        else:
            target = make(seed + 1, shape, dt, layout)
        value = fn(pred, target)
        return value, fn.backward().copy()

    got, want = both(call)
    if got is None:
        return
    agree(np.float64(got[0]), np.float64(want[0]), 4.0, what=f"{loss} value",
          dtype=got[1].dtype)
    size = max(int(np.prod(shape, dtype=np.int64)), 1)
    agree(got[1], want[1], 8.0 / size, what=f"{loss} grad")


@PROP
@given(name=st.sampled_from(["sgd", "sgd_m", "nesterov", "adam", "adamw", "rmsprop",
                             "rmsprop_m", "adagrad"]),
       shapes=st.lists(st.lists(DIM, min_size=1, max_size=2).map(tuple), min_size=1,
                       max_size=3),
       dt=st.sampled_from(FLOATS), wd=st.sampled_from([0.0, 0.01]), steps=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_optimizers(name, shapes, dt, wd, steps, seed):
    def call():
        params = [fp.Parameter(make(seed + i, s, dt)) for i, s in enumerate(shapes)]
        kw = {"weight_decay": wd}
        opt = {"sgd": lambda: optim.SGD(params, lr=0.1, **kw),
               "sgd_m": lambda: optim.SGD(params, lr=0.1, momentum=0.9, **kw),
               "nesterov": lambda: optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, **kw),
               "adam": lambda: optim.Adam(params, lr=0.01, **kw),
               "adamw": lambda: optim.AdamW(params, lr=0.01, **kw),
               "rmsprop": lambda: optim.RMSprop(params, lr=0.01, **kw),
               "rmsprop_m": lambda: optim.RMSprop(params, lr=0.01, momentum=0.5, **kw),
               "adagrad": lambda: optim.Adagrad(params, lr=0.1, **kw)}[name]()
        for t in range(steps):
            for i, p in enumerate(params):
                p.grad[...] = make(seed + 100 * t + i, p.shape, dt)
            opt.step()
        return [p.value.copy() for p in params]

    got, want = both(call)
    for a, b in zip(got or [], want or []):
        agree(a, b, 1.0, factor=16.0, what=name)


# ------------------------------------------------------------------ raw kernel fuzz
NAT = backends.load("native")
CODE = backends.ACTIVATIONS


class Guarded:
    """Arrays carved out of guard-banded buffers; ``check()`` asserts that nothing
    outside the writable views changed."""

    def __init__(self):
        self.bases = []

    def array(self, shape, dtype, writable=True, layout="C", seed=0, values=None):
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        step = 2 if layout == "strided" else 1
        pad = 16
        base = np.full(pad + step * max(size, 1) + pad, 7, dtype)
        rng = np.random.default_rng(seed)
        base[...] = (rng.integers(0, 3, base.size) if dtype.kind in "iu"
                     else rng.standard_normal(base.size)).astype(dtype)
        flat = base[pad:pad + step * size:step]
        view = flat.reshape(shape) if layout != "F" else flat.reshape(shape[::-1]).T
        if values is not None:
            view[...] = values
        mask = np.zeros(base.shape, bool)
        if writable:
            idx = np.arange(base.size)[pad:pad + step * size:step]
            mask[idx] = True
        self.bases.append((base, base.copy(), mask))
        if not writable:
            view.flags.writeable = False
        return view

    def check(self):
        for base, before, mask in self.bases:
            same = (base == before) | (np.isnan(base) & np.isnan(before)) \
                if base.dtype.kind == "f" else base == before
            assert same[~mask].all(), "a kernel wrote outside its output arrays"


def _kernel_call(name, d, dt, g, mutate):
    """A valid call of raw kernel ``name`` on dims ``d`` (n, k, m, act), with the array
    argument number ``mutate[0]`` replaced per ``mutate[1]``."""
    n, k, m, act = d
    A = lambda shape, w=False, **kw: g.array(shape, dt, writable=w, **kw)  # noqa: E731
    labels = g.array((n,), np.int64, values=np.arange(n) % max(m, 1))
    specs = {
        "gemm": lambda: ([A((n, k)), A((k, m)), A((n, m), True)], [False, False, False]),
        "linear_forward": lambda: ([A((n, k)), A((k, m)), A((m,)), act, 0.01, A((n, m), True),
                                    A((n, m), True)], []),
        "linear_backward": lambda: ([A((n, m)), A((n, k)), A((k, m)), A((n, m)), A((n, m)),
                                     act, 0.01, A((n, k), True), A((k, m), True),
                                     A((m,), True), A((n, m), True), True], []),
        "activation_forward": lambda: ([act, 0.01, A((n, m)), A((n, m), True)], []),
        "activation_backward": lambda: ([act, 0.01, A((n, m)), A((n, m)), A((n, m)),
                                         A((n, m), True)], []),
        "softmax_xent": lambda: ([A((n, m)), labels, None, A((n, m), True)], []),
        "softmax_xent_targets": lambda: ([A((n, m)), None, A((n, m)), A((n, m), True)], []),
        "mse": lambda: ([A((n, m)), A((n, m)), False, A((n, m), True)], []),
        "bce": lambda: ([A((n, m)), A((n, m)), True, A((n, m), True)], []),
        "sgd_update": lambda: ([[A((n, k), True), A((m,), True)], [A((n, k)), A((m,))],
                                [A((n, k), True), A((m,), True)], 0.1, 0.9, False, 0.0, True],
                               []),
        "adam_update": lambda: ([[A((n, k), True)], [A((n, k))], [A((n, k), True)],
                                 [A((n, k), True)], 1, 0.01, 0.9, 0.999, 1e-8, 0.0, False], []),
        "rmsprop_update": lambda: ([[A((n, k), True)], [A((n, k))], [A((n, k), True)],
                                    [A((n, k), True)], 0.01, 0.99, 1e-8, 0.5, 0.0], []),
        "adagrad_update": lambda: ([[A((n, k), True)], [A((n, k))], [A((n, k), True)], 0.1,
                                    1e-10, 0.0], []),
        "sum_squares": lambda: ([[A((n, k)), A((m,))]], []),
        "scale_": lambda: ([[A((n, k), True), A((m,), True)], 0.5], []),
        "clip_": lambda: ([[A((n, k), True)], -0.5, 0.5], []),
        "batchnorm_forward": lambda: ([A((n, k)), A((k,)), A((k,)), 1e-5, A((n, k), True),
                                       A((k,), True), A((k,), True)], []),
        "batchnorm_forward_eval": lambda: ([A((n, k)), A((k,)), A((k,)), A((k,)),
                                            g.array((k,), dt, values=1.0), 1e-5,
                                            A((n, k), True)], []),
        "batchnorm_running_update": lambda: ([A((n, k)), 0.1, A((k,), True), A((k,), True)],
                                             []),
        "batchnorm_backward": lambda: ([A((n, k)), A((n, k)), A((k,)), A((k,)), A((k,)),
                                        A((n, k), True), A((k,), True), A((k,), True)], []),
        "layernorm_forward": lambda: ([A((n, k)), A((k,)), A((k,)), 1e-5, A((n, k), True),
                                       A((n,), True), A((n,), True)], []),
        "layernorm_backward": lambda: ([A((n, k)), A((n, k)), A((k,)), A((n,)), A((n,)),
                                        A((n, k), True), A((k,), True), A((k,), True)], []),
    }
    args, flags = specs[name]()
    fn_name = "softmax_xent" if name == "softmax_xent_targets" else name
    if name == "gemm":
        args += flags
    slots = [i for i, a in enumerate(args) if isinstance(a, (np.ndarray, list))]
    if mutate is not None and slots:
        i = slots[mutate[0] % len(slots)]
        target = args[i]
        j = None
        if isinstance(target, list):
            j = mutate[0] % len(target)
            target = target[j]
        new = _mutated(target, mutate[1], g, dt, mutate[2])
        if j is None:
            args[i] = new
        else:
            args[i] = list(args[i])
            args[i][j] = new
    return getattr(NAT, fn_name), args


MUTATIONS = ["grow0", "shrink0", "grow_last", "shrink_last", "transpose", "other_dtype",
             "int64", "strided", "fortran", "readonly", "none", "scalar", "add_axis", "flat",
             "label_high", "label_negative", "list_short", "not_array"]


def _mutated(a, how, g, dt, seed):
    shape = a.shape
    other = F64 if np.dtype(dt) == F32 else F32
    w = a.flags.writeable
    if how in ("grow0", "shrink0", "grow_last", "shrink_last") and a.ndim:
        s = list(shape)
        ax = 0 if how.endswith("0") else -1
        s[ax] = max(s[ax] + (1 if how.startswith("grow") else -1), 0)
        return g.array(tuple(s), a.dtype, w, seed=seed)
    if how == "transpose" and a.ndim == 2:
        return g.array(shape[::-1], a.dtype, w, seed=seed)
    if how == "other_dtype":
        return g.array(shape, other, w, seed=seed)
    if how == "int64":
        return g.array(shape, np.int64, w, seed=seed)
    if how == "strided":
        return g.array(shape, a.dtype, w, layout="strided", seed=seed)
    if how == "fortran" and a.ndim == 2:
        return g.array(shape, a.dtype, w, layout="F", seed=seed)
    if how == "readonly":
        return g.array(shape, a.dtype, False, seed=seed)
    if how == "none":
        return None
    if how == "scalar":
        return g.array((), a.dtype, w, seed=seed)
    if how == "add_axis":
        return g.array(shape + (1,), a.dtype, w, seed=seed)
    if how == "flat":
        return g.array((a.size,), a.dtype, w, seed=seed)
    if how in ("label_high", "label_negative") and a.dtype == np.int64 and a.size:
        vals = np.array(a)
        vals[seed % a.size] = 10**6 if how == "label_high" else -1
        return g.array(shape, np.int64, w, values=vals)
    if how == "list_short":
        return []
    if how == "not_array":
        return [[1.0, 2.0]]
    return a


KERNELS = ["gemm", "linear_forward", "linear_backward", "activation_forward",
           "activation_backward", "softmax_xent", "softmax_xent_targets", "mse", "bce",
           "sgd_update", "adam_update", "rmsprop_update", "adagrad_update", "sum_squares",
           "scale_", "clip_", "batchnorm_forward", "batchnorm_forward_eval",
           "batchnorm_running_update", "batchnorm_backward", "layernorm_forward", "layernorm_backward"]


@settings(PROP, max_examples=PROP.max_examples * 8)
@given(name=st.sampled_from(KERNELS), n=st.integers(0, 9), k=st.integers(0, 9),
       m=st.integers(0, 9), act=st.integers(-1, 7), dt=st.sampled_from(FLOATS),
       slot=st.integers(0, 40), how=st.sampled_from(MUTATIONS + ["none_at_all"]),
       seed=st.integers(0, 2**16))
def test_raw_kernels_reject_or_stay_in_bounds(name, n, k, m, act, dt, slot, how, seed):
    """No argument the Cython bridge accepts makes C++ touch memory outside the given
    arrays; everything else is a TypeError/ValueError."""
    g = Guarded()
    fn, args = _kernel_call(name, (n, k, m, act), dt, g,
                            None if how == "none_at_all" else (slot, how, seed))
    with contextlib.suppress(TypeError, ValueError), np.errstate(all="ignore"):
        fn(*args)
    g.check()


def test_guard_bands_catch_stray_writes():
    g = Guarded()
    a = g.array((3, 4), F32, layout="strided")
    a[...] = 1.0  # inside the view: allowed
    g.check()
    g.bases[0][0][1] += 1.0  # the element between two strided ones
    with pytest.raises(AssertionError, match="outside"):
        g.check()


# ------------------------------------------------------------------ whole training steps
@PROP
@given(n=POS, f=POS, h=POS, c=st.integers(2, 5), act=st.sampled_from(ACTS),
       loss=st.sampled_from(["cross_entropy", "mse", "bce_logits"]),
       opt=st.sampled_from(["sgd", "adam", "rmsprop", "adagrad"]), dt=st.sampled_from(FLOATS),
       xdt=IN_DTYPES, layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31))
def test_training_steps(n, f, h, c, act, loss, opt, dt, xdt, layout, seed):
    """compile()'s step (the backend's fused step where it has one) on both backends."""
    def call():
        model = nn.Sequential(nn.Dense(f, h, activation=act, dtype=dt, rng=seed),
                              nn.Dense(h, c, dtype=dt, rng=seed + 1))
        lossfn = losses.BinaryCrossEntropy(from_logits=True) if loss == "bce_logits" else loss
        # eps well above gradient rounding: the first adaptive steps are lr * sign(g),
        # which turns the rounding of a gradient near 0 into a difference of lr
        params = model.parameters()
        step = model.compile(lossfn, {"sgd": lambda: optim.SGD(params, lr=0.1, momentum=0.5),
                                      "adam": lambda: optim.Adam(params, lr=0.01, eps=0.1),
                                      "rmsprop": lambda: optim.RMSprop(params, eps=0.1),
                                      "adagrad": lambda: optim.Adagrad(params, eps=0.1)}[opt]())
        rng = np.random.default_rng(seed)
        out = []
        for t in range(3):
            x = make(seed + t, (n, f), xdt, layout)
            y = (rng.integers(0, c, n) if loss == "cross_entropy"
                 else (rng.random((n, c)) > 0.5).astype(dt))
            out.append(step(x, y))
        return out, [p.value.copy() for p in model.parameters()]

    got, want = both(call)
    if got is None:
        return
    for a, b in zip(got[0], want[0]):
        agree(np.float64(a), np.float64(b), 10.0, factor=64, what="step loss", dtype=dt)
    for a, b in zip(got[1], want[1]):
        agree(a, b, 1.0, factor=64, what="parameters after 3 steps")


@settings(PROP, max_examples=PROP.max_examples * 4)
@given(target=st.sampled_from(["weight", "weight.grad", "bias", "bias.grad", "state0", "state1"]),
       layer=st.integers(0, 1), how=st.sampled_from(MUTATIONS),
       opt=st.sampled_from(["sgd", "adam", "rmsprop"]), dt=st.sampled_from(FLOATS),
       seed=st.integers(0, 2**16))
def test_fused_step_with_replaced_arrays_rejects_or_stays_in_bounds(target, layer, how, opt, dt,
                                                                    seed):
    """Parameters, gradients or optimizer state replaced between two compiled steps by
    arrays of another shape, dtype, layout or writability: the next step (the
    backend's whole-step kernel where there is one) rebinds to them or raises
    TypeError/ValueError, and never writes outside them."""
    model = nn.Sequential(nn.Dense(5, 7, "relu", dtype=dt, rng=seed),
                          nn.Dense(7, 3, dtype=dt, rng=seed + 1))
    params = model.parameters()
    optimizer = {"sgd": lambda: optim.SGD(params, lr=0.1, momentum=0.9),
                 "adam": lambda: optim.Adam(params),
                 "rmsprop": lambda: optim.RMSprop(params)}[opt]()
    step = model.compile("cross_entropy", optimizer)
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((4, 5)).astype(dt), rng.integers(0, 3, 4)
    with fp.use_backend("native"):
        step(x, y)
        g = Guarded()
        p = model[layer].weight if target.startswith("weight") else model[layer].bias
        i = next(k for k, q in enumerate(optimizer.params) if q is p)
        names = list(optimizer.state[i])
        if target.startswith("state"):
            if len(names) <= int(target[-1]):
                return
            key = names[int(target[-1])]
            new = _mutated(optimizer.state[i][key], how, g, dt, seed)
            if isinstance(new, np.ndarray):
                optimizer.state[i][key] = new
        else:
            attr = "grad" if target.endswith(".grad") else "value"
            new = _mutated(getattr(p, attr), how, g, dt, seed)
            if isinstance(new, np.ndarray):
                if attr == "grad":  # (`p.grad = new` copies into the array: the
                    p._grad = new   # array itself replaced, as only code inside could)
                else:
                    try:
                        p.value = new
                    except ValueError:  # a Parameter's value keeps its shape (its
                        assert new.shape != p.shape  # setter converts the rest)
                        return
        with contextlib.suppress(TypeError, ValueError), np.errstate(all="ignore"):
            step(x, y)
    g.check()


@pytest.mark.parametrize("change", ["append_param", "drop_param", "truncate_state",
                                    "flat_weight"])
def test_fused_step_rejects_changed_parameter_lists(change):
    """The fused step's pointer tables are sized when it is built: an optimizer whose
    lists changed length afterwards is refused, not read or written past the end."""
    model = nn.Sequential(nn.Dense(5, 7, "relu", rng=0), nn.Dense(7, 3, rng=1))
    opt = optim.Adam(model.parameters())
    step = model.compile("cross_entropy", opt)
    x, y = np.ones((4, 5), np.float32), np.arange(4) % 3
    with fp.use_backend("native"):
        step(x, y)
        fast = step.fused()
        if change == "append_param":
            opt.params.append(fp.Parameter(np.zeros(3, np.float32)))
        elif change == "drop_param":
            opt.params.pop()
        elif change == "truncate_state":
            opt.state = opt.state[:1]
        else:
            with pytest.raises(ValueError, match=r"shape \(5, 7\), got \(35,\)"):
                model[0].weight.value = np.zeros(35, np.float32)  # (the setter refuses)
            model[0].weight._value = np.zeros(35, np.float32)  # (past the setter)
            with pytest.raises(ValueError, match=r"Dense\(5, 7\): weight must have shape"):
                step(x, y)  # (refused as the kernel binds)
            with pytest.raises(ValueError, match="must be 2-D"):
                fast(x, (np.asarray(y, np.int64), None), False)  # (the kernel's own check)
            return
        with pytest.raises(ValueError, match="changed length"):
            fast(x, (np.asarray(y, np.int64), None), False)
