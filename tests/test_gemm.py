"""The native GEMM (csrc/gemm) and its fused epilogue against NumPy.

Every layout (NN, NT, TN, TT) x dtype x shape: all (m, k, n) drawn from
0, 1, 2, 7, 31, 33, 65, 127, 257 (empty products, the GEMV forms, sizes on either
side of every tile and block edge, threaded sizes) and the MLP shapes, checked
against a float64 NumPy product with a per-dtype tolerance relative to |A| |B|.
Also: strided and offset views for every operand (leading dimensions, C a window
of a larger array whose border must stay untouched), accumulate and general
alpha/beta, beta = 0 ignoring NaN in C, bit-identical results for 1 and 2 threads,
and every epilogue step of gemm_ex (bias, pre-activation, activations 0..5,
derivative products, column sums, non-finite flag).

The module runs once per ISA path: in-process with the dispatched kernels, and
again in a subprocess for every other available ISA (test_subprocess_isa_suites).
"""

import importlib
import os

import numpy as np
import pytest

from _support import run_module_on_isa
from fastprop.backends import ACTIVATIONS

_native = importlib.import_module("fastprop._native")
nat = importlib.import_module("fastprop.backends.native")
ref = importlib.import_module("fastprop.backends.numpy")

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
DTYPES = [F32, F64]
DTYPE_IDS = ["f32", "f64"]
#: max |C - C_exact| / (|A| |B| + |beta C0|) per dtype (a sum of up to ~1000 products).
RTOL = {F32: 2e-6, F64: 4e-15}
#: elementwise epilogue results vs the float64 reference: (rtol, atol).
EP_TOL = {F32: (2e-5, 2e-6), F64: (1e-12, 1e-13)}
LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]
LAYOUT_IDS = ["NN", "NT", "TN", "TT"]
SIZES = [0, 1, 2, 7, 31, 33, 65, 127, 257]
#: (m, k, n) of the MLP benchmark shapes.
MLP_SHAPES = [(64, 784, 256), (64, 256, 256), (32, 128, 128), (128, 784, 256), (1, 784, 256),
              (256, 64, 784), (784, 64, 256), (64, 256, 784),
              (32, 784, 256), (48, 1000, 30),  # these two: threads split k (short A, deep k)
              (2, 2048, 2048), (4, 1024, 1024), (7, 600, 4096)]  # a few rows, a wide B
ACT_CODES = list(range(7))  # identity, relu, leaky_relu, sigmoid, tanh, gelu, gelu_erf
ALPHA = 0.01


def operands(rng, m, k, n, ta, tb, dtype):
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    return a, b


def expect(a, b, ta, tb, alpha=1.0, beta=0.0, c0=None):
    """(exact product in float64, error scale |alpha| |A| |B| + |beta C0|)."""
    oa = (a.T if ta else a).astype(np.float64)
    ob = (b.T if tb else b).astype(np.float64)
    exact = alpha * (oa @ ob)
    scale = abs(alpha) * (np.abs(oa) @ np.abs(ob))
    if beta != 0.0:
        exact = exact + beta * c0.astype(np.float64)
        scale = scale + abs(beta) * np.abs(c0.astype(np.float64))
    return exact, scale


def check(c, exact, scale, dtype, what):
    err = np.abs(c.astype(np.float64) - exact)
    bound = RTOL[np.dtype(dtype)] * (scale + 1e-30) + np.finfo(dtype).tiny
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / (scale + 1e-30), -1)), err.shape)
        raise AssertionError(f"{what}: {int(bad.sum())}/{err.size} out of tolerance; at {i}: "
                             f"got {c[i]!r}, want {exact[i]!r} (scale {scale[i]!r})")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------------ all shapes and layouts
@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
def test_gemm_every_shape(rng, m, dtype, ta, tb):
    for k in SIZES:
        for n in SIZES:
            a, b = operands(rng, m, k, n, ta, tb, dtype)
            c = np.full((m, n), np.nan, dtype)  # beta = 0: C is never read
            nat.gemm(a, b, c, ta, tb, False)
            exact, scale = expect(a, b, ta, tb)
            check(c, exact, scale, dtype, f"m={m} k={k} n={n}")


@pytest.mark.parametrize("shape", MLP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
def test_gemm_mlp_shapes(rng, shape, dtype, ta, tb):
    m, k, n = shape
    a, b = operands(rng, m, k, n, ta, tb, dtype)
    c = np.empty((m, n), dtype)
    nat.gemm(a, b, c, ta, tb, False)
    check(c, *expect(a, b, ta, tb), dtype, "mlp")
    c0 = rng.standard_normal((m, n)).astype(dtype)
    c = c0.copy()
    nat.gemm(a, b, c, ta, tb, True)  # accumulate: beta = 1
    check(c, *expect(a, b, ta, tb, 1.0, 1.0, c0), dtype, "mlp accumulate")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("shape", [(1, 33, 17), (7, 1, 9), (31, 65, 33), (127, 300, 129),
                                   (300, 257, 301), (1, 700, 300), (300, 700, 1),
                                   (20, 800, 37),
                                   # (matrix-vector products of k = 1-3: a strided
                                   # vector of 2 read as contiguous went unseen)
                                   (1, 2, 9), (5, 2, 1), (1, 3, 7), (6, 1, 1), (1, 2, 1)],
                         ids=lambda s: "x".join(map(str, s)))  # threaded GEMV; split k
def test_gemm_strided_offset_views(rng, dtype, ta, tb, shape):
    """Every operand a window of a larger array (offset start, leading dim > cols)."""
    m, k, n = shape
    a0, b0 = operands(rng, m, k, n, ta, tb, dtype)
    big_a = rng.standard_normal((a0.shape[0] + 3, a0.shape[1] + 11)).astype(dtype)
    big_b = rng.standard_normal((b0.shape[0] + 2, b0.shape[1] + 5)).astype(dtype)
    a = big_a[2:2 + a0.shape[0], 3:3 + a0.shape[1]]
    b = big_b[1:1 + b0.shape[0], 4:4 + b0.shape[1]]
    a[...] = a0
    b[...] = b0
    big_c = rng.standard_normal((m + 4, n + 7)).astype(dtype)
    before = big_c.copy()
    c = big_c[1:1 + m, 5:5 + n]
    c0 = c.copy()
    nat.gemm(a, b, c, ta, tb, True)
    check(c, *expect(a0, b0, ta, tb, 1.0, 1.0, c0), dtype, "strided accumulate")
    mask = np.ones(big_c.shape, bool)
    mask[1:1 + m, 5:5 + n] = False
    np.testing.assert_array_equal(big_c[mask], before[mask], err_msg="wrote outside C")
    nat.gemm(a, b, c, ta, tb, False)
    check(c, *expect(a0, b0, ta, tb), dtype, "strided")
    np.testing.assert_array_equal(big_c[mask], before[mask], err_msg="wrote outside C")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.5, 0.0), (2.0, 1.0), (0.75, -1.5),
                                        (0.0, 0.5), (1.0, 0.0)])
def test_gemm_ex_alpha_beta(rng, dtype, ta, tb, alpha, beta):
    for m, k, n in [(5, 3, 7), (33, 65, 17), (130, 400, 70), (1, 50, 40), (40, 50, 1),
                    (9, 900, 40)]:
        a, b = operands(rng, m, k, n, ta, tb, dtype)
        c0 = rng.standard_normal((m, n)).astype(dtype)
        c = c0.copy() if beta != 0.0 else np.full((m, n), np.nan, dtype)
        _native.gemm_ex(a, b, c, ta, tb, alpha, beta)
        check(c, *expect(a, b, ta, tb, alpha, beta, c0), dtype, f"{m}x{k}x{n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gemm_k_zero_scales_c(rng, dtype):
    c0 = rng.standard_normal((9, 13)).astype(dtype)
    a = np.empty((9, 0), dtype)
    b = np.empty((0, 13), dtype)
    c = c0.copy()
    _native.gemm_ex(a, b, c, False, False, 1.0, 0.5)
    np.testing.assert_array_equal(c, (c0 * dtype.type(0.5)))
    c = np.full((9, 13), np.nan, dtype)
    nat.gemm(a, b, c, False, False, False)
    np.testing.assert_array_equal(c, 0)


# Narrow outputs from a short k, many rows: the row form with whole-vector stores that
# spill into the next rows (gemv.hpp narrow_n_form; float32, n < 16 and not 8), and the
# blocked path for the shapes it leaves (n = 8, 16; float64).
NARROW_SHAPES = [(64, 1, 2), (65, 3, 3), (67, 8, 5), (130, 32, 7), (257, 17, 9),
                 (1001, 5, 10), (4099, 12, 15), (100, 32, 13), (70, 4, 8), (66, 9, 16),
                 (3001, 20, 1),
                 # rows split between threads with n < 8 (a whole-vector store reaching
                 # several rows next to a thread's last rows), A transposed included
                 (4099, 32, 3), (4101, 32, 7), (20003, 8, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
def test_gemm_narrow_outputs(rng, dtype, ta, tb):
    """Against the float64 product: C contiguous (nothing written past its end), rows
    apart (nothing written between them), alpha and beta (C read), the forward
    epilogue, and 1 against 2 threads bit for bit (each thread's last rows stored
    masked, so that no spill reaches the other's)."""
    before = nat.get_num_threads()
    for m, k, n in NARROW_SHAPES:
        a, b = operands(rng, m, k, n, ta, tb, dtype)
        exact, scale = expect(a, b, ta, tb)
        buf = np.full(m * n + 64, 7.0, dtype)
        c = buf[:m * n].reshape(m, n)
        nat.gemm(a, b, c, ta, tb, False)
        check(c, exact, scale, dtype, f"contiguous {m}x{k}x{n}")
        assert (buf[m * n:] == 7).all(), "written past the end of C"
        wide = np.full((m, n + 5), 7.0, dtype)
        nat.gemm(a, b, wide[:, :n], ta, tb, False)
        check(wide[:, :n], exact, scale, dtype, f"rows apart {m}x{k}x{n}")
        assert (wide[:, n:] == 7).all(), "written between the rows of C"
        c0 = rng.standard_normal((m, n)).astype(dtype)
        c = c0.copy()
        _native.gemm_ex(a, b, c, ta, tb, alpha=0.5, beta=-2.0)
        ex, sc = expect(a, b, ta, tb, 0.5, -2.0, c0)
        check(c, ex, sc, dtype, f"alpha, beta {m}x{k}x{n}")
        bias = rng.standard_normal(n).astype(dtype)
        outs = []
        try:
            for threads in (1, 2):
                nat.set_num_threads(threads)
                y, z = np.empty((m, n), dtype), np.empty((m, n), dtype)
                _native.gemm_ex(a, b, y, ta, tb, bias=bias, act=1, preact=z)
                outs.append((y, z))
        finally:
            nat.set_num_threads(before)
        zx = exact + bias
        check(outs[0][1], zx, scale + np.abs(bias), dtype, f"preact {m}x{k}x{n}")
        check(outs[0][0], np.maximum(zx, 0), scale + np.abs(bias), dtype, f"relu {m}x{k}x{n}")
        for got, want in zip(outs[1], outs[0]):
            np.testing.assert_array_equal(got, want)


#: Packed-A edges (A is packed for m > 128, n > 64 and enough work): k = 5-7, shorter
#: than the pack's 8-float (4-double) register transposes, so only their tails run;
#: 8 + 3; and m = 145 (float32) / 193 (float64) on one thread, whose last row block
#: (MC = 144 / 96 rows) is a single row: a partial panel with no whole one before it.
PACK_EDGE_SHAPES = [(400, 7, 400), (401, 5, 130), (300, 11, 200), (145, 300, 200),
                    (193, 300, 200)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
def test_gemm_packing_edges(rng, dtype, ta, tb):
    before = nat.get_num_threads()
    try:
        for threads in (1, 2):
            nat.set_num_threads(threads)
            for m, k, n in PACK_EDGE_SHAPES:
                a, b = operands(rng, m, k, n, ta, tb, dtype)
                c = np.empty((m, n), dtype)
                nat.gemm(a, b, c, ta, tb, False)
                check(c, *expect(a, b, ta, tb), dtype, f"{m}x{k}x{n}, {threads} threads")
    finally:
        nat.set_num_threads(before)


@pytest.mark.skipif(not _native.openmp(), reason="built without OpenMP")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
def test_gemm_bit_identical_across_thread_counts(rng, dtype, ta, tb):
    before = nat.get_num_threads()
    for m, k, n in [(300, 500, 260), (64, 784, 256), (1000, 300, 40), (20, 700, 1000),
                    (1, 784, 256), (1, 2000, 1000), (999, 700, 1),  # these two: GEMV forms
                    (32, 784, 256), (7, 1601, 45),  # threads split k
                    (2000, 3, 300), (1500, 1, 512),  # shallow (tiny_k_form: no colsum)
                    (20003, 3, 5)]:  # a narrow output (narrow_n_form in float32, rows split
                                     # between threads; no colsum)
        a, b = operands(rng, m, k, n, ta, tb, dtype)
        bias = rng.standard_normal(n).astype(dtype)
        outs = []
        try:
            for threads in (1, 2, 3):
                nat.set_num_threads(threads)
                c = np.empty((m, n), dtype)
                cs = np.zeros(n) if k > 4 else None
                _native.gemm_ex(a, b, c, ta, tb, bias=bias, act=4, colsum=cs)
                outs.append((c, cs))
        finally:
            nat.set_num_threads(before)
        for c, cs in outs[1:]:
            np.testing.assert_array_equal(c, outs[0][0])
            if cs is not None:
                np.testing.assert_array_equal(cs, outs[0][1])


# ------------------------------------------------------------------ fused epilogue
def act_ref(code, z):
    y = np.empty_like(z)
    ref.activation_forward(code, ALPHA, z, y)
    return y


def dact_ref(code, g, z, y):
    out = np.empty_like(g)
    ref.activation_backward(code, ALPHA, g, z, y, out)
    return out


def ep_close(actual, expected, dtype, what):
    rtol, atol = EP_TOL[np.dtype(dtype)]
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rtol, atol=atol,
                               err_msg=what)


EP_SHAPES = [(1, 9, 20), (7, 5, 3), (33, 17, 65), (130, 70, 200), (64, 784, 256), (257, 64, 33),
             (300, 19, 512),  # rows a multiple of 2 KiB apart: the backward epilogue by rows
             (32, 784, 256),  # threads split k, the epilogue after their sum
             (3, 700, 1030), (2, 40, 600),  # a few rows times a wide B (multi-row axpy)
             (6, 1100, 2048),  # (5-8 rows: B of 8 MiB and more)
             # shallow products into wide rows (tiny_k_form), one and two threads
             (17, 1, 128), (70, 2, 300), (33, 4, 64), (1030, 3, 256)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACT_CODES)
def test_epilogue_forward_bias_preact_activation(rng, dtype, act):
    for m, k, n in EP_SHAPES:
        x = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(dtype)
        w = rng.standard_normal((k, n)).astype(dtype)
        bias = rng.standard_normal(n).astype(dtype)
        y = np.empty((m, n), dtype)
        z = np.empty((m, n), dtype)
        _native.gemm_ex(x, w, y, bias=bias, preact=z, act=act, act_alpha=ALPHA)
        z64 = x.astype(np.float64) @ w.astype(np.float64) + bias
        ep_close(z, z64, dtype, "preact")
        # The activation of the kernel's own z: the elementwise kernel's result up to a
        # few ulp (same formulas, vmath.hpp); bit for bit for float32 in the avx2 and
        # avx512 units, where both run the same intrinsics (epilogue.hpp).
        y_elem = np.empty_like(z)
        nat.activation_forward(act, ALPHA, z, y_elem)
        np.testing.assert_allclose(y, y_elem, rtol=4 * np.finfo(dtype).eps,
                                   atol=4 * np.finfo(dtype).tiny, err_msg="act(z)")
        if dtype == np.float32 and _native.isa() != "generic":
            np.testing.assert_array_equal(y, y_elem, err_msg="act(z), bit for bit")
        ep_close(y, act_ref(act, z64), dtype, "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", [0, 1], ids=["identity", "relu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.5, 1.5)], ids=["plain", "scaled"])
def test_epilogue_bias_relu_in_registers_is_the_pass(rng, dtype, act, with_bias, alpha,
                                                     beta):
    """Bias + relu on packed-A full tiles is applied in the micro-kernel's registers
    (macro_kernel.hpp), elsewhere by the epilogue pass: both must give, bit for bit,
    the plain product followed by C + bias and relu (r < 0 ? 0 : r, NaN and -0 kept)."""
    for m, k, n in [(300, 64, 256), (257, 33, 70), (140, 7, 16), (9, 5, 3), (300, 3, 256)]:
        x = rng.standard_normal((m, k)).astype(dtype)
        x[3, 0] = np.nan  # row 3 of C is NaN: relu must keep it
        w = rng.standard_normal((k, n)).astype(dtype)
        bias = rng.standard_normal(n).astype(dtype) if with_bias else None
        c0 = rng.standard_normal((m, n)).astype(dtype)
        want = c0.copy()
        _native.gemm_ex(x, w, want, False, False, alpha, beta)
        if with_bias:
            want = want + bias
        if act == 1:
            want = np.where(want < 0, dtype.type(0), want)
        got = c0.copy()
        _native.gemm_ex(x, w, got, False, False, alpha, beta, bias=bias, act=act)
        np.testing.assert_array_equal(got, want, err_msg=f"{m}x{k}x{n}")
        assert np.isnan(got[3]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACT_CODES)
def test_epilogue_activation_matches_elementwise_kernels_at_extremes(dtype, act):
    """C = values exactly (k = 1, B = 1): the epilogue's act and act' against the
    elementwise kernels over the whole range (+-inf, +-max, NaN, the gelu clip)."""
    big = np.finfo(dtype).max
    vals = np.array([-np.inf, -big, -1e4, -30, -20.5, -20, -19.5, -3, -1, -1e-3, -0.0, 0.0,
                     1e-30, 1e-3, 0.5, 1, 3, 19.5, 20, 20.5, 30, 1e4, big, np.inf, np.nan],
                    dtype)
    a = vals.reshape(1, -1)
    one = np.ones((1, 1), dtype)
    c = np.empty((len(vals), 1), dtype)
    _native.gemm_ex(a, one, c, True, False, act=act, act_alpha=ALPHA)
    y = np.empty_like(vals)
    nat.activation_forward(act, ALPHA, vals, y)
    np.testing.assert_allclose(c[:, 0], y, rtol=4 * np.finfo(dtype).eps, atol=0,
                               err_msg="forward")
    c1 = c[:, 0].copy()
    g = np.linspace(-2, 2, len(vals)).astype(dtype).reshape(-1, 1)
    d = (vals if act in (5, 6) else y).reshape(-1, 1)  # (gelu and gelu_erf read z)
    finite = np.isfinite(d[:, 0]) if act in (3, 4) else np.ones(len(vals), bool)
    c = np.empty((len(vals), 1), dtype)
    _native.gemm_ex(g, one, c, False, False, dsrc=np.ascontiguousarray(d), dact=act,
                    dalpha=ALPHA)
    want = np.empty_like(g)
    nat.activation_backward(act, ALPHA, g, d, d, want)
    np.testing.assert_allclose(c[finite], want[finite], rtol=4 * np.finfo(dtype).eps, atol=0,
                               err_msg="backward")
    if dtype == np.float32 and _native.isa() != "generic" and act in (3, 4, 5):
        # the same intrinsics in both (epilogue.hpp, vmath.hpp): the same bits
        np.testing.assert_array_equal(c1, y, err_msg="forward, bit for bit")
        if act == 5:
            np.testing.assert_array_equal(c, want, err_msg="backward, bit for bit")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dact", ACT_CODES)
@pytest.mark.parametrize("ta,tb", [(False, True), (False, False)], ids=["NT", "NN"])
def test_epilogue_backward_derivative_and_colsum(rng, dtype, dact, ta, tb):
    """grad_z = (grad_y @ w^T) * act'(.) with the bias gradient summed in the pass."""
    for m, k, n in EP_SHAPES:
        g = rng.standard_normal((m, k)).astype(dtype)
        w = (rng.standard_normal((n, k) if tb else (k, n)) / np.sqrt(k)).astype(dtype)
        z = rng.standard_normal((m, n)).astype(dtype)
        y = act_ref(dact, z.astype(np.float64)).astype(dtype)
        dsrc = z if dact in (5, 6) else y  # (gelu and gelu_erf read z)
        c = np.empty((m, n), dtype)
        cs = np.full(n, 0.25)
        _native.gemm_ex(g, w, c, ta, tb, dsrc=dsrc, dact=dact, dalpha=ALPHA, colsum=cs)
        prod = g.astype(np.float64) @ (w.T if tb else w).astype(np.float64)
        want = dact_ref(dact, prod, z.astype(np.float64), y.astype(np.float64))
        ep_close(c, want, dtype, "grad_z")
        np.testing.assert_allclose(cs, 0.25 + c.astype(np.float64).sum(0), rtol=1e-12,
                                   atol=1e-12, err_msg="colsum")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dact", [0, 1, 2], ids=["identity", "relu", "leaky_relu"])
def test_epilogue_backward_products_exact(rng, dtype, dact):
    """The backward epilogue of the derivatives that are a product by 1, 0 or alpha
    (in vector registers, 16 columns at a time, in the float units; scalar for the
    rest of a row): C equals the plain product times act'(.) bit for bit, and each
    column sum is the rows of that C added in order in double, whatever the column
    group (full 16-column groups, a narrower last one) and the row count."""
    for m, k, n in [(32, 10, 128), (7, 33, 16), (33, 17, 50), (5, 3, 15), (64, 40, 200)]:
        g = rng.standard_normal((m, k)).astype(dtype)
        w = rng.standard_normal((n, k)).astype(dtype)
        d = rng.standard_normal((m, n)).astype(dtype)
        d[0, : min(n, 4)] = [np.nan, 0.0, -0.0, np.inf][: min(n, 4)]
        plain = np.empty((m, n), dtype)
        _native.gemm_ex(g, w, plain, False, True)
        c = np.empty((m, n), dtype)
        cs = np.full(n, 0.5)
        _native.gemm_ex(g, w, c, False, True, dsrc=d if dact else None, dact=dact,
                        dalpha=ALPHA, colsum=cs)
        factor = {0: np.ones_like(d), 1: np.where(d > 0, 1, 0).astype(dtype),
                  2: np.where(d > 0, 1, dtype.type(ALPHA)).astype(dtype)}[dact]
        want = plain * factor
        np.testing.assert_array_equal(c, want)
        sums = np.full(n, 0.5)
        for i in range(m):
            sums += want[i].astype(np.float64)
        np.testing.assert_array_equal(cs, sums)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [50, 512], ids=["strips", "by_rows"])
def test_epilogue_colsum_rows_in_order(rng, dtype, n):
    """Column sums: double accumulation of the final C, rows in increasing order, in
    both forms of the macro-kernel's backward epilogue (per strip, or by rows when
    rows are a multiple of 2 KiB apart), over several row blocks."""
    m, k = 300, 40
    a, b = operands(rng, m, k, n, False, False, dtype)
    c = np.empty((m, n), dtype)
    cs = np.zeros(n)
    _native.gemm_ex(a, b, c, colsum=cs)
    want = np.zeros(n)
    for i in range(m):
        want += c[i].astype(np.float64)
    np.testing.assert_array_equal(cs, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 5, 9), (9, 5, 1), (40, 30, 50), (200, 300, 100),
                                   (300, 2, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_epilogue_nonfinite_flag(rng, dtype, shape):
    m, k, n = shape
    a, b = operands(rng, m, k, n, False, False, dtype)
    flag = np.zeros(1, np.intc)
    c = np.empty((m, n), dtype)
    _native.gemm_ex(a, b, c, nonfinite=flag)
    assert flag[0] == 0
    for bad in (np.inf, -np.inf, np.nan):
        a2 = a.copy()
        a2[m // 2, k // 3] = bad
        _native.gemm_ex(a2, b, c, nonfinite=flag)
        assert flag[0] == 1
        flag[0] = 0
    huge = np.finfo(dtype).max
    a2 = np.full_like(a, huge)
    b2 = np.full_like(b, huge)
    _native.gemm_ex(a2, b2, c, nonfinite=flag)  # overflow to inf
    assert flag[0] == 1
    flag[0] = 7  # never cleared
    _native.gemm_ex(a, b, c, nonfinite=flag)
    assert flag[0] == 7


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_epilogue_all_steps_together_strided(rng, dtype):
    """Bias, pre-activation, activation, derivative, colsum and flag on views."""
    m, k, n = 70, 90, 45
    a, b = operands(rng, m, k, n, True, False, dtype)
    bias = rng.standard_normal(n).astype(dtype)
    zbig = np.zeros((m + 2, n + 9), dtype)
    z = zbig[1:1 + m, 3:3 + n]
    dbig = rng.standard_normal((m, n + 4)).astype(dtype)
    d = dbig[:, 2:2 + n]
    cbig = np.zeros((m + 1, n + 3), dtype)
    c = cbig[1:, :n]
    cs = np.zeros(n)
    flag = np.zeros(1, np.intc)
    _native.gemm_ex(a, b, c, True, False, 0.5, 0.0, bias=bias, preact=z, act=2, act_alpha=0.2,
                    dsrc=d, dact=4, colsum=cs, nonfinite=flag)
    z64 = 0.5 * (a.T.astype(np.float64) @ b.astype(np.float64)) + bias
    ep_close(z, z64, dtype, "z")
    y = np.where(z64 > 0, z64, 0.2 * z64) * (1 - d.astype(np.float64) ** 2)
    ep_close(c, y, dtype, "c")
    np.testing.assert_allclose(cs, c.astype(np.float64).sum(0), rtol=1e-12, atol=1e-12)
    assert flag[0] == 0
    assert not zbig[0].any() and not zbig[:, :3].any() and not zbig[:, 3 + n:].any()


def test_gemm_ex_rejects_softmax_epilogue():
    a = np.ones((2, 2))
    with pytest.raises(ValueError):
        _native.gemm_ex(a, a, np.empty((2, 2)), act=ACTIVATIONS["softmax"])


# ------------------------------------------------------------------ every ISA path
@pytest.mark.skipif(os.environ.get("FASTPROP_GEMM_ISA_CHILD") == "1",
                    reason="already a per-ISA child run")
@pytest.mark.parametrize("isa", [i for i in _native.available_isas()])
def test_subprocess_isa_suites(isa):
    """This module again in a subprocess for each available ISA but the current one."""
    if isa == _native.isa():
        pytest.skip(f"{isa} is the ISA of this run")
    run_module_on_isa(__file__, isa, "FASTPROP_GEMM_ISA_CHILD")


def test_matrix_vector_shapes_sum_long_k_in_blocks(rng):
    """The one-row / one-column forms sum k > 2^24 products in blocks (a single float32
    chain per output stops growing at 2^24 terms: all-ones sums of 2^24 + 2^22 came out
    2^24, and random dot products had 3e-4 relative error; now exact here)."""
    import fastprop as fp
    k = 2**24 + 2**22
    ones = np.ones(k, np.float32)
    with fp.use_backend("native"):
        assert fp.ops.matmul(ones[:, None], np.ones((k, 2), np.float32), trans_a=True)[0, 0] == k
        assert fp.ops.matmul(ones[None, :], np.ones((k, 3), np.float32))[0, 2] == k
    u = rng.random(k, dtype=np.float32)
    v = rng.random(k, dtype=np.float32)
    exact = float(u.astype(np.float64) @ v.astype(np.float64))
    with fp.use_backend("native"):
        got_all = (fp.ops.matmul(u[None, :], v[None, :], trans_b=True)[0, 0],
                   fp.ops.matmul(u[None, :], np.tile(v, (4, 1)), trans_b=True)[0, 3],
                   fp.ops.matmul(np.tile(u, (4, 1)), v[:, None])[3, 0],
                   fp.ops.matmul(u[None, :], v[:, None])[0, 0],
                   # (a dot product stored NN: was one chain, 5e-6 relative error)
                   fp.ops.matmul(u[None, :], v.reshape(k, 1).copy())[0, 0],
                   fp.ops.matmul(u.reshape(k, 1).copy(), v.reshape(k, 1).copy(),
                                 trans_a=True)[0, 0])
    for got in got_all:
        assert abs(got - exact) <= 2e-6 * exact
    # a dot product is one computation whatever the layouts: the same bits
    assert len(set(np.float32(g).tobytes() for g in got_all)) == 1
