"""fp.ops kernels against plain NumPy expressions evaluated in float64.

Every test runs on each available backend (fixture ``backend``) in float32 and
float64.  Oracles are computed in float64 from exactly the arrays handed to
fastprop; reductions are compared with a tolerance scaled by the magnitude of the
terms summed (see ``_support.assert_close``).
"""

import numpy as np
import pytest

import fastprop as fp
from _support import ALPHA, GELU_C, TOL, act_ref, assert_close

ACTS = ["identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softmax"]

# (m, k, n): empty, unit, primes, and sizes just past powers of two (not multiples of
# any plausible tile: 4, 6, 8, 16, 32, 64, 128, 256).
GEMM_SHAPES = [
    (0, 5, 3), (4, 0, 3), (4, 5, 0), (1, 1, 1), (1, 7, 1), (7, 1, 31),
    (7, 31, 127), (33, 65, 17), (65, 33, 257), (127, 257, 7), (257, 129, 65),
    (3, 517, 521), (6, 33, 1031),  # a few rows times a wide B (the multi-row axpy form)
]
TRANS = [(False, False), (False, True), (True, False), (True, True)]
TRANS_IDS = ["NN", "NT", "TN", "TT"]


# --------------------------------------------------------------------------- oracles
def act_grad_ref(name, g, x=None, y=None, alpha=ALPHA):
    """(grad_x, scale): the activation's vector-Jacobian product in float64 from the
    arrays the kernel receives (y for relu-likes/sigmoid/tanh/softmax, x for gelu),
    and the magnitude of the terms behind each element (for the tolerance)."""
    g = np.asarray(g, np.float64)
    if name == "softmax":
        y = np.asarray(y, np.float64)
        dot = np.sum(g * y, axis=-1, keepdims=True)
        scale = y * (np.abs(g) + np.sum(np.abs(g * y), axis=-1, keepdims=True))
        return y * (g - dot), scale
    if name == "identity":
        d = np.ones_like(g)
    elif name == "relu":
        d = (np.asarray(y) > 0).astype(np.float64)
    elif name == "leaky_relu":
        d = np.where(np.asarray(y) > 0, 1.0, alpha)
    elif name == "sigmoid":
        y = np.asarray(y, np.float64)
        d = y * (1.0 - y)
    elif name == "tanh":
        y = np.asarray(y, np.float64)
        d = 1.0 - y * y
    elif name == "gelu":
        x = np.asarray(x, np.float64)
        t = np.tanh(GELU_C * (x + 0.044715 * x ** 3))
        d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * GELU_C * (1 + 3 * 0.044715 * x * x)
    else:
        raise AssertionError(name)
    # |d| + 1: the derivative is formed from y/x in the working precision.
    return g * d, np.abs(g) * (np.abs(d) + 1.0)


def op(a, trans):
    return a.T if trans else a


def gemm_inputs(rng, m, k, n, ta, tb, dtype):
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    return a, b


def gemm_ref(a, b, ta, tb):
    a64, b64 = op(a.astype(np.float64), ta), op(b.astype(np.float64), tb)
    return a64 @ b64, np.abs(a64) @ np.abs(b64)


# --------------------------------------------------------------------------- matmul
@pytest.mark.parametrize("ta,tb", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_matmul_matches_numpy(backend, dtype, rng, m, k, n, ta, tb):
    a, b = gemm_inputs(rng, m, k, n, ta, tb, dtype)
    a0, b0 = a.copy(), b.copy()
    c = fp.ops.matmul(a, b, trans_a=ta, trans_b=tb)
    assert c.dtype == dtype and c.shape == (m, n)
    ref, scale = gemm_ref(a, b, ta, tb)
    assert_close(c, ref, dtype, scale, what="matmul")
    assert np.array_equal(a, a0) and np.array_equal(b, b0), "inputs modified"


@pytest.mark.parametrize("ta,tb", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("m,k,n", [(0, 3, 2), (5, 0, 3), (1, 1, 1), (7, 31, 33), (65, 127, 17)])
def test_matmul_accumulate_and_out(backend, dtype, rng, m, k, n, ta, tb):
    a, b = gemm_inputs(rng, m, k, n, ta, tb, dtype)
    c0 = rng.standard_normal((m, n)).astype(dtype)
    out = c0.copy()
    res = fp.ops.matmul(a, b, trans_a=ta, trans_b=tb, out=out, accumulate=True)
    assert res is out
    ref, scale = gemm_ref(a, b, ta, tb)
    assert_close(out, ref + c0, dtype, scale + np.abs(c0), what="accumulate")

    out = np.full((m, n), np.nan, dtype)  # without accumulate, out's contents are ignored
    res = fp.ops.matmul(a, b, trans_a=ta, trans_b=tb, out=out)
    assert res is out
    assert_close(out, ref, dtype, scale, what="out=")


def test_matmul_k0_accumulate_leaves_out_unchanged(backend, dtype, rng):
    a = np.empty((3, 0), dtype)
    b = np.empty((0, 4), dtype)
    out = rng.standard_normal((3, 4)).astype(dtype)
    before = out.copy()
    fp.ops.matmul(a, b, out=out, accumulate=True)
    assert np.array_equal(out, before)
    assert np.array_equal(fp.ops.matmul(a, b), np.zeros((3, 4)))


def _layouts(base):
    """Views of the same logical matrix in various memory layouts: (name, array)."""
    m, k = base.shape
    big = np.zeros((m + 3, 2 * k + 5), base.dtype)
    big[2:2 + m, 3:3 + k] = base
    strided = np.zeros((2 * m, 3 * k), base.dtype)
    strided[::2, ::3] = base
    rev = base[::-1, ::-1].copy()
    return [
        ("C", base),
        ("F", np.asfortranarray(base)),
        ("offset", big[2:2 + m, 3:3 + k]),
        ("strided", strided[::2, ::3]),
        ("negative", rev[::-1, ::-1]),
        ("byteswapped", base.astype(base.dtype.newbyteorder())),
        ("transposed-view", np.ascontiguousarray(base.T).T),
    ]


@pytest.mark.parametrize("layout_b", ["C", "F", "offset", "strided", "negative", "byteswapped"])
@pytest.mark.parametrize("layout_a", ["C", "F", "offset", "strided", "negative", "byteswapped",
                                      "transposed-view"])
def test_matmul_layouts(backend, dtype, rng, layout_a, layout_b):
    m, k, n = 9, 17, 5
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    va = dict(_layouts(a))[layout_a]
    vb = dict(_layouts(b))[layout_b]
    assert np.array_equal(va, a) and np.array_equal(vb, b)
    ref, scale = gemm_ref(a, b, False, False)
    for ta, tb in TRANS:
        # op(x.T) with trans=True is the original matrix again.
        c = fp.ops.matmul(va.T if ta else va, vb.T if tb else vb, trans_a=ta, trans_b=tb)
        assert c.dtype == dtype  # byte-swapped input gives a native-order result
        assert c.dtype.isnative
        assert_close(c, ref, dtype, scale, what=f"{layout_a} x {layout_b} ta={ta} tb={tb}")


def test_matmul_integer_inputs_promote_to_float64(backend):
    a = np.arange(6).reshape(2, 3)
    b = np.arange(12).reshape(3, 4)
    c = fp.ops.matmul(a, b)
    assert c.dtype == np.float64
    assert np.array_equal(c, (a @ b).astype(np.float64))


def test_matmul_mixed_dtypes_promote(backend, rng):
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal((4, 2))
    c = fp.ops.matmul(a, b)
    assert c.dtype == np.float64
    assert_close(c, a.astype(np.float64) @ b, np.float64, np.abs(a) @ np.abs(b))


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("which", ["a", "b"])
def test_matmul_out_aliases_an_input(backend, dtype, rng, which, accumulate):
    n = 33
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    ref, scale = gemm_ref(a, b, False, False)
    if accumulate:
        ref = ref + (a if which == "a" else b)
        scale = scale + np.abs(a if which == "a" else b)
    out = a if which == "a" else b
    res = fp.ops.matmul(a, b, out=out, accumulate=accumulate)
    assert res is out
    assert_close(out, ref, dtype, scale, what=f"out is {which}")


def test_matmul_out_aliases_transposed_input(backend, dtype, rng):
    n = 17
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    ref, scale = gemm_ref(a, b, True, False)
    fp.ops.matmul(a, b, trans_a=True, out=a)
    assert_close(a, ref, dtype, scale, what="out is a, trans_a")


@pytest.mark.parametrize("kind", ["F", "offset", "strided"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_noncontiguous_out(backend, dtype, rng, kind, accumulate):
    m, k, n = 13, 7, 11
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    c0 = rng.standard_normal((m, n)).astype(dtype)
    holder = np.full((m + 4, 2 * n + 3), 7.0, dtype)
    if kind == "F":
        out = np.asfortranarray(c0)
    elif kind == "offset":
        out = holder[1:1 + m, 2:2 + n]
        out[...] = c0
    else:
        out = holder[1:1 + m, 1:1 + 2 * n:2]
        out[...] = c0
    guard = holder.copy()
    res = fp.ops.matmul(a, b, out=out, accumulate=accumulate)
    assert res is out
    ref, scale = gemm_ref(a, b, False, False)
    if accumulate:
        ref, scale = ref + c0, scale + np.abs(c0)
    assert_close(out, ref, dtype, scale, what=kind)
    if kind != "F":  # the elements of holder outside the view are untouched
        covered = np.zeros(holder.shape, bool)
        if kind == "offset":
            covered[1:1 + m, 2:2 + n] = True
        else:
            covered[1:1 + m, 1:1 + 2 * n:2] = True
        assert np.array_equal(holder[~covered], guard[~covered])


def _odd_operands(rng, dtype, m=5, k=9, n=7):
    """(name, a, b, trans_a, trans_b, out, where): operands whose strides the buffer
    protocol reports otherwise than ndarray.strides, or that only the general path
    takes; out None, an array, or the string "big" for the view big[where] of the
    last entry's array ``big``, which also holds an operand."""
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    col = rng.standard_normal(k).astype(dtype)
    row = rng.standard_normal(k).astype(dtype)
    raw = np.zeros(m * k * a.itemsize + 1, np.uint8)  # an unaligned copy of a
    unaligned = raw[1:].view(dtype).reshape(m, k)
    unaligned[...] = a
    overlapping = np.lib.stride_tricks.as_strided(  # rows 1 element apart, read only
        row, shape=(3, k - 2), strides=(a.itemsize, a.itemsize), writeable=False)
    # out's elements apart from the operand's but within its bounds
    big = rng.standard_normal((m + k + 1, k + n)).astype(dtype)
    return big, [
        ("newaxis row x newaxis column", row[None, :], col[:, None], False, False, None, None),
        ("newaxis column as (1, k) by trans", col[:, None], b, True, False, None, None),
        ("matrix x newaxis column", a, col[:, None], False, False, None, None),
        ("broadcast rows", np.broadcast_to(row, (m, k)), b, False, False, None, None),
        ("broadcast rows, transposed", np.broadcast_to(row, (n, k)), a, False, True, None,
         None),
        ("overlapping rows", overlapping, b[:k - 2], False, False, None, None),
        ("unaligned", unaligned, b, False, False, None, None),
        ("F x F into F", np.asfortranarray(a), np.asfortranarray(b), False, False,
         np.asfortranarray(np.zeros((m, n), dtype)), None),
        ("out beside a in one array", big[:m, :k], b, False, False, "big",
         np.s_[1:1 + m, k:]),
        ("out beside b in one array", a, big[:k, :n], False, False, "big",
         np.s_[k:k + m, n:2 * n]),
        ("numpy bool flags", a.T.copy(), b, np.True_, np.False_, None, None),
        ("integer flags", a, b.T.copy(), 0, 1, None, None),
    ]


@pytest.mark.parametrize("case", range(12))
def test_matmul_odd_operands(backend, dtype, rng, case):
    """Operands and flags off the common path (the native backend's one-call path
    hands them to the general one, or reads the buffer's strides, which NumPy
    normalises for length-1 axes): the product is right and nothing else changes."""
    big, cases = _odd_operands(rng, dtype)
    name, a, b, ta, tb, out, where = cases[case]
    if where is not None:
        out = big[where]
    a0, b0, big0 = np.array(a), np.array(b), big.copy()
    opa = a0.astype(np.float64).T if ta else a0.astype(np.float64)
    opb = b0.astype(np.float64).T if tb else b0.astype(np.float64)
    ref, scale = opa @ opb, np.abs(opa) @ np.abs(opb)
    got = fp.ops.matmul(a, b, trans_a=ta, trans_b=tb, out=out)
    assert out is None or got is out
    assert got.shape == ref.shape and got.dtype == dtype
    assert_close(got, ref, dtype, scale, what=name)
    assert np.array_equal(np.asarray(a), a0) and np.array_equal(np.asarray(b), b0), name
    outside = np.ones(big.shape, bool)
    if where is not None:
        outside[where] = False
    assert np.array_equal(big[outside], big0[outside]), f"{name}: wrote outside out"


def _unaligned(arr):
    """A copy of arr at an odd byte offset (NumPy marks it not aligned)."""
    raw = np.zeros(arr.nbytes + 1, np.uint8)
    out = raw[1:].view(arr.dtype).reshape(arr.shape)
    out[...] = arr
    assert not out.flags.aligned
    return out


@pytest.mark.parametrize("shape", [(40, 3, 100), (1, 30, 1), (300, 9, 1), (1, 9, 300),
                                   (33, 17, 65)],
                         ids=lambda s: "x".join(map(str, s)))
def test_unaligned_arrays_reach_no_kernel(backend, dtype, rng, shape, monkeypatch):
    """A view at an odd byte offset is copied before a kernel loads whole floats from
    it (the shallow, dot and GEMV forms did: undefined behaviour, which UBSan reports);
    the results are right and an unaligned out receives them."""
    m, k, n = shape
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    be = fp.backends.current()
    seen = []

    def watch(name):
        kernel = getattr(be, name)

        def checked(*args):
            seen.append(name)
            for arr in args:
                if isinstance(arr, np.ndarray):
                    assert arr.flags.aligned, f"{name} got an unaligned array"
            return kernel(*args)
        monkeypatch.setattr(be, name, checked)

    for name in ("gemm", "linear_forward", "activation_forward"):
        watch(name)
    ua, ub, uout = _unaligned(a), _unaligned(b), _unaligned(np.zeros((m, n), dtype))
    ref = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    assert_close(fp.ops.matmul(ua, ub), ref, dtype, scale)
    assert fp.ops.matmul(ua, b, out=uout) is uout
    assert_close(uout, ref, dtype, scale)
    assert_close(fp.ops.linear(ua, ub), ref, dtype, scale)
    x = _unaligned(rng.standard_normal((m, n)).astype(dtype))
    assert_close(fp.ops.activation("relu", x), np.maximum(x, 0).astype(np.float64), dtype,
                 np.abs(x))
    assert {"gemm", "linear_forward", "activation_forward"} <= set(seen) or \
        be.name != "native"


def test_matmul_one_call_path_takes(rng):
    """The native backend's one-call path (_native.matmul_fast) takes every flag form
    fastprop accepts and rows repeated through a zero stride; it leaves the rest to
    the general path (None), which converts, copies or refuses."""
    _native = pytest.importorskip("fastprop._native")
    a = rng.standard_normal((6, 5))
    b = rng.standard_normal((5, 4))
    want = a @ b
    for ta, tb, acc in [(np.False_, np.False_, np.False_), (0, 0, 0), (False, 0, np.False_)]:
        got = _native.matmul_fast(a, b, ta, tb, None, acc)
        assert got is not None
        np.testing.assert_allclose(got, want, rtol=1e-13)
    got = _native.matmul_fast(a.T.copy(), b, np.True_, 0, None, False)
    np.testing.assert_allclose(got, want, rtol=1e-13)
    rows = np.broadcast_to(a[0], (6, 5))
    got = _native.matmul_fast(rows, b, False, False, None, False)
    assert got is not None
    np.testing.assert_allclose(got, np.asarray(rows) @ b, rtol=1e-13)
    for args in [(a, b, "False", False, None, False), (a, b, 2, False, None, False),
                 (a, b, False, False, None, True),  # accumulate without out
                 (_unaligned(a), b, False, False, None, False),
                 (a.astype(np.float32), b, False, False, None, False),
                 (a, b, False, False, np.empty((6, 4), np.float32), False),
                 (a, b, False, False, a[:, :4], False)]:  # out overlapping a
        assert _native.matmul_fast(*args) is None


@pytest.mark.parametrize("bad", ["read-only out", "out dtype", "out shape", "str flag",
                                 "accumulate without out"])
def test_matmul_refusals_change_nothing(backend, rng, bad):
    a = rng.standard_normal((4, 6)).astype(np.float32)
    b = rng.standard_normal((6, 3)).astype(np.float32)
    out = np.full((4, 3), 5.0, np.float32)
    kw = {"out": out}
    if bad == "read-only out":
        out.flags.writeable = False
        err, match = ValueError, "read-only"
    elif bad == "out dtype":
        kw["out"] = out = np.full((4, 3), 5.0)
        err, match = (TypeError, ValueError), "out"
    elif bad == "out shape":
        kw["out"] = out = np.full((3, 4), 5.0, np.float32)
        err, match = ValueError, "out"
    elif bad == "str flag":
        kw["trans_a"] = "False"
        err, match = TypeError, "trans_a"
    else:
        kw = {"accumulate": True}
        err, match = ValueError, "accumulate"
    before = out.copy()
    with pytest.raises(err, match=match):
        fp.ops.matmul(a, b, **kw)
    assert np.array_equal(out, before)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_out_of_a_masked_array_or_matrix_is_refused(backend):
    """out= a masked array or an np.matrix: refused on both backends (native wrote the
    values, leaving the mask as it was; numpy failed with a broadcasting message)."""
    a, b = np.ones((4, 5)), np.ones((5, 3))
    for out in (np.ma.zeros((4, 3)), np.asmatrix(np.zeros((4, 3)))):
        with pytest.raises(ValueError, match="out must be a numpy.ndarray"):
            fp.ops.matmul(a, b, out=out)
        with pytest.raises(ValueError, match="out must be a numpy.ndarray"):
            fp.ops.activation("relu", np.ones((4, 3)), out=out)


def test_matmul_does_not_write_outside_out(backend, dtype, rng):
    """A row-padded out (leading dimension > n) keeps its padding intact."""
    m, k, n = 31, 65, 33
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    holder = np.full((m, n + 7), -3.0, dtype)
    out = holder[:, :n]
    fp.ops.matmul(a, b, out=out)
    ref, scale = gemm_ref(a, b, False, False)
    assert_close(out, ref, dtype, scale)
    assert (holder[:, n:] == -3.0).all()


# --------------------------------------------------------------------------- activations
ACT_SHAPES = [(0,), (0, 5), (1,), (7,), (1, 1), (31, 33), (3, 5, 7), (2, 257)]


@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
@pytest.mark.parametrize("name", ACTS)
def test_activation_forward(backend, dtype, rng, name, shape):
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    x0 = x.copy()
    y = fp.ops.activation(name, x, alpha=ALPHA)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, act_ref(name, x), dtype, what=name)
    assert np.array_equal(x, x0)


@pytest.mark.parametrize("name", ACTS)
def test_activation_forward_in_place_and_strided_out(backend, dtype, rng, name):
    x = (3 * rng.standard_normal((7, 33))).astype(dtype)
    ref = act_ref(name, x)
    inplace = x.copy()
    assert fp.ops.activation(name, inplace, out=inplace) is inplace
    assert_close(inplace, ref, dtype, what="out=x")
    holder = np.zeros((7, 66), dtype)
    out = holder[:, ::2]
    assert fp.ops.activation(name, x, out=out) is out
    assert_close(out, ref, dtype, what="strided out")
    assert (holder[:, 1::2] == 0).all()


@pytest.mark.parametrize("name", ACTS)
def test_activation_strided_and_byteswapped_input(backend, dtype, rng, name):
    base = (3 * rng.standard_normal((9, 34))).astype(dtype)
    ref = act_ref(name, base[:, ::2])
    assert_close(fp.ops.activation(name, base[:, ::2]), ref, dtype, what="strided")
    swapped = base[:, ::2].astype(dtype.newbyteorder())
    y = fp.ops.activation(name, swapped)
    assert y.dtype.isnative
    assert_close(y, ref, dtype, what="byteswapped")
    assert_close(fp.ops.activation(name, np.asfortranarray(base)), act_ref(name, base), dtype,
                 what="F-ordered")


@pytest.mark.parametrize("name", ACTS)
def test_activation_extreme_inputs_are_stable(backend, dtype, name):
    """No overflow (warnings are errors here) and exact saturation for |x| up to 1e4."""
    big = [1e4, -1e4, 100.0, -100.0, 88.5, -88.5, 30.0, -30.0, 0.5, 0.0]
    x = np.array([big, big[::-1]], dtype)
    y = fp.ops.activation(name, x)
    assert np.isfinite(y).all()
    assert_close(y, act_ref(name, x), dtype, what=name)
    g = np.ones_like(x)
    grad = fp.ops.activation_backward(name, g, x, y)
    assert np.isfinite(grad).all()


def test_softmax_rows_sum_to_one_and_extreme_row(backend, dtype):
    x = np.array([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0], [-1e4, -1e4, -1e4]], dtype)
    y = fp.ops.activation("softmax", x)
    assert_close(y, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]], dtype)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.5])
def test_leaky_relu_alpha(backend, dtype, rng, alpha):
    x = rng.standard_normal((5, 9)).astype(dtype)
    assert_close(fp.ops.activation("leaky_relu", x, alpha=alpha), act_ref("leaky_relu", x, alpha),
                 dtype)
    y = fp.ops.activation("leaky_relu", x, alpha=alpha)
    g = rng.standard_normal(x.shape).astype(dtype)
    ref, scale = act_grad_ref("leaky_relu", g, y=y, alpha=alpha)
    assert_close(fp.ops.activation_backward("leaky_relu", g, None, y, alpha=alpha), ref, dtype,
                 scale)


@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
@pytest.mark.parametrize("name", ACTS)
def test_activation_backward(backend, dtype, rng, name, shape):
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    y = act_ref(name, x).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    g0 = g.copy()
    grad = fp.ops.activation_backward(name, g, x, y)
    assert grad.dtype == dtype and grad.shape == shape
    ref, scale = act_grad_ref(name, g, x=x, y=y)
    assert_close(grad, ref, dtype, scale, what=name)
    assert np.array_equal(g, g0)


def test_activation_default_is_identity_code():
    assert fp.ops.activation_code(None) == 0
    assert fp.ops.activation_code("identity") == 0
    codes = {fp.ops.activation_code(n) for n in ACTS}
    assert len(codes) == len(ACTS)


def test_activation_int_input_promotes(backend):
    y = fp.ops.activation("relu", np.array([-2, 3]))
    assert y.dtype == np.float64 and np.array_equal(y, [0.0, 3.0])


# --------------------------------------------------------------------------- linear
LINEAR_SHAPES = [(0, 3, 4), (1, 1, 1), (4, 0, 3), (3, 5, 0), (7, 31, 5), (33, 65, 17), (127, 7, 257),
                 (5, 257, 3)]


def linear_ref(x, w, b, name):
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    z = x64 @ w64
    zscale = np.abs(x64) @ np.abs(w64)
    if b is not None:
        z = z + b
        zscale = zscale + np.abs(b)
    y = act_ref(name, z)
    # Every activation here is at most ~1.13-Lipschitz (gelu); softmax mixes a row.
    yscale = np.abs(y) + 2 * zscale.max(axis=-1, keepdims=True, initial=0.0) \
        if name == "softmax" else np.abs(y) + 1.2 * zscale
    return z, zscale, y, yscale


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,fin,fout", LINEAR_SHAPES)
@pytest.mark.parametrize("name", ACTS)
def test_linear_forward(backend, dtype, rng, name, n, fin, fout, bias):
    x = rng.standard_normal((n, fin)).astype(dtype)
    w = rng.standard_normal((fin, fout)).astype(dtype)
    b = rng.standard_normal(fout).astype(dtype) if bias else None
    z_ref, zscale, y_ref, yscale = linear_ref(x, w, b, name)
    y, z = fp.ops.linear(x, w, b, activation=name, return_preact=True)
    assert y.dtype == dtype and z.dtype == dtype
    assert_close(z, z_ref, dtype, zscale, what="z")
    assert_close(y, y_ref, dtype, yscale, what="y")
    y2 = fp.ops.linear(x, w, b, activation=name)
    assert np.array_equal(y2, y)


def test_linear_default_activation_is_identity(backend, dtype, rng):
    x = rng.standard_normal((6, 4)).astype(dtype)
    w = rng.standard_normal((4, 3)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    z_ref, zscale, _, _ = linear_ref(x, w, b, "identity")
    assert_close(fp.ops.linear(x, w, b), z_ref, dtype, zscale)


def test_linear_noncontiguous_inputs(backend, dtype, rng):
    x = rng.standard_normal((33, 20)).astype(dtype)
    w = rng.standard_normal((10, 7)).astype(dtype)
    b = rng.standard_normal(14).astype(dtype)
    xv, bv = x[::3, ::2], b[::2]
    wv = np.asfortranarray(w).astype(dtype.newbyteorder())
    z_ref, zscale, y_ref, yscale = linear_ref(np.ascontiguousarray(xv), w, bv, "tanh")
    y = fp.ops.linear(xv, wv, bv, activation="tanh")
    assert_close(y, y_ref, dtype, yscale)


@pytest.mark.parametrize("n,fin,fout", LINEAR_SHAPES)
@pytest.mark.parametrize("name", ACTS)
def test_linear_backward(backend, dtype, rng, name, n, fin, fout):
    x = rng.standard_normal((n, fin)).astype(dtype)
    w = rng.standard_normal((fin, fout)).astype(dtype)
    b = rng.standard_normal(fout).astype(dtype)
    y, z = fp.ops.linear(x, w, b, activation=name, return_preact=True)
    g = rng.standard_normal((n, fout)).astype(dtype)
    g0 = g.copy()
    gx, gw, gb = fp.ops.linear_backward(g, x, w, y, activation=name, z=z)
    assert (gx.shape, gw.shape, gb.shape) == ((n, fin), (fin, fout), (fout,))
    assert gx.dtype == gw.dtype == gb.dtype == dtype
    gz, gzs = act_grad_ref(name, g, x=z, y=y)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    assert_close(gw, x64.T @ gz, dtype, np.abs(x64).T @ gzs, what="grad_w")
    assert_close(gb, gz.sum(axis=0), dtype, gzs.sum(axis=0), what="grad_b")
    assert_close(gx, gz @ w64.T, dtype, gzs @ np.abs(w64).T, what="grad_x")
    assert np.array_equal(g, g0), "grad_y modified"


def test_linear_backward_relu_needs_only_y(backend, dtype, rng):
    x = rng.standard_normal((5, 4)).astype(dtype)
    w = rng.standard_normal((4, 3)).astype(dtype)
    y = fp.ops.linear(x, w, activation="relu")
    g = rng.standard_normal((5, 3)).astype(dtype)
    gx, gw, gb = fp.ops.linear_backward(g, x, w, y, activation="relu")
    gz = g * (y > 0)
    assert_close(gb, gz.sum(0), dtype, np.abs(gz).sum(0))
    assert_close(gx, gz.astype(np.float64) @ w.T.astype(np.float64), dtype,
                 np.abs(gz) @ np.abs(w).T.astype(np.float64))


# --------------------------------------------------------------------------- softmax xent
def xent_ref(logits, targets):
    x = logits.astype(np.float64)
    n = x.shape[0]
    mx = x.max(axis=1, keepdims=True)
    lse = mx + np.log(np.exp(x - mx).sum(axis=1, keepdims=True))
    p = np.exp(x - lse)
    loss = -(targets * (x - lse)).sum() / n
    lscale = (np.abs(targets) * (np.abs(x) + np.abs(lse))).sum() / n
    return loss, lscale, (p - targets) / n, (p + np.abs(targets)) / n


@pytest.mark.parametrize("n,c", [(1, 1), (1, 2), (7, 3), (31, 10), (33, 65), (127, 257)])
@pytest.mark.parametrize("kind", ["labels", "onehot", "soft"])
def test_softmax_cross_entropy(backend, dtype, rng, n, c, kind):
    logits = (3 * rng.standard_normal((n, c))).astype(dtype)
    labels = rng.integers(0, c, n)
    onehot = np.eye(c)[labels]
    if kind == "labels":
        arg, t = labels, onehot
    elif kind == "onehot":
        arg, t = onehot.astype(dtype), onehot
    else:
        raw = rng.random((n, c))
        t = raw / raw.sum(axis=1, keepdims=True)
        arg = t.astype(dtype)
        t = arg.astype(np.float64)
    loss, grad = fp.ops.softmax_cross_entropy(logits, arg)
    assert isinstance(loss, float)
    assert grad.dtype == dtype and grad.shape == (n, c)
    lref, lscale, gref, gscale = xent_ref(logits, t)
    assert_close(loss, lref, dtype, lscale, what="loss")
    assert_close(grad, gref, dtype, gscale, what="grad")


def test_softmax_cross_entropy_label_dtypes_agree(backend, dtype, rng):
    logits = rng.standard_normal((9, 4)).astype(dtype)
    labels = rng.integers(0, 4, 9)
    results = [fp.ops.softmax_cross_entropy(logits, lab)
               for lab in (labels, labels.astype(np.int32), labels.astype(np.uint8),
                           labels.astype(np.float64), list(labels))]
    for loss, grad in results[1:]:
        assert loss == results[0][0]
        assert np.array_equal(grad, results[0][1])


def test_softmax_cross_entropy_extreme_logits(backend, dtype):
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0]], dtype)
    loss, grad = fp.ops.softmax_cross_entropy(logits, np.array([0, 0]))
    # row 0 is certain and right (loss 0); row 1 puts all mass on class 1 (loss 2e4)
    assert loss == pytest.approx(1e4, rel=TOL[dtype][0])
    assert_close(grad, [[0, 0, 0], [-0.5, 0.5, 0]], dtype)


@pytest.mark.parametrize("name", [n for n in ACTS if n != "softmax"])
def test_activation_keeps_0d_shape(backend, dtype, name):
    x = np.array(-0.75, dtype)
    y = fp.ops.activation(name, x)
    assert y.shape == () and y.dtype == dtype
    assert_close(y, act_ref(name, x), dtype)
    g = fp.ops.activation_backward(name, np.array(2.0, dtype), x, y)
    assert g.shape == ()
    assert_close(g, act_grad_ref(name, 2.0, x=x, y=y)[0], dtype, 4.0)
    with pytest.raises(ValueError, match="softmax"):
        fp.ops.activation("softmax", x)


def test_activation_out_partially_overlapping_x(backend, dtype, rng):
    """out may be x itself (in place); an out that overlaps x otherwise must give the
    same result as separate arrays (the kernel would read inputs it has overwritten)."""
    buf = rng.standard_normal(41).astype(dtype)
    x, out = buf[:-1].reshape(5, 8), buf[1:].reshape(5, 8)
    for name in ("sigmoid", "softmax"):
        want = fp.ops.activation(name, x.copy())
        got = fp.ops.activation(name, x, out=out)
        assert got is out
        np.testing.assert_array_equal(out, want)
        buf[...] = rng.standard_normal(41)


def test_softmax_backward_rejects_0d_on_every_backend(backend):
    with pytest.raises(ValueError, match="softmax"):
        fp.ops.activation_backward("softmax", 1.0, None, 0.5)


def test_backward_promotes_like_forward(backend):
    """A float64 operand makes the backward compute in float64, as linear does."""
    x = np.ones((3, 2), np.float32)
    w = np.ones((2, 4), np.float32)
    gy = np.full((3, 4), 1 + 1e-10)
    gx, gw, gb = fp.ops.linear_backward(gy, x, w, None)
    assert gx.dtype == gw.dtype == gb.dtype == np.float64
    np.testing.assert_allclose(gb - 3, 3e-10, rtol=1e-6)
    g = fp.ops.activation_backward("tanh", np.ones(3, np.float32), None, np.full(3, 0.5))
    assert g.dtype == np.float64
    np.testing.assert_allclose(g, 0.75)
