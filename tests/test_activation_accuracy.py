"""Accuracy of the vectorised activations over the whole floating-point range.

The native kernels evaluate exp/tanh with branch-free polynomials (csrc/vmath.hpp)
so that their loops vectorise.  Documented bounds (vmath.hpp, activations.cpp),
checked here against float64/longdouble NumPy on a sweep spanning every binade from
the smallest subnormal to the largest finite value, both signs, plus +-inf and NaN:

    tanh     <= 4 ulp          sigmoid  <= 6 ulp (normal results; subnormal: 4 steps)
    gelu     8 ulp of min(|x|, 1): of the result where |result| >= 0.1; relative to
             smaller results (x << 0) about (3 |w| + 8) ulp, w = 2u, as w is rounded
             before exp (float32, every input: 7.5-9 ulp in [-2, -1], 20-24 in
             [-4, -2], 94-121 in [-8, -4], at most 214 at x = -10.04; below ~-10.1
             the results are subnormal)
    softmax  rows sum to 1 within a few ulp; +-inf and NaN propagate as in NumPy
Special values: sigmoid(-inf) = 0, sigmoid(inf) = 1, tanh(+-inf) = +-1,
gelu(inf) = inf, gelu(-inf) = -0, and NaN in gives NaN out for every activation
(relu's backward gives 0 where y is NaN, the mask y > 0 being false; PyTorch passes
the gradient there, its mask being not y <= 0).
"""

import math
import os

import numpy as np
import pytest

from _support import run_module_on_isa
from conftest import NATIVE_BUILT
from fastprop.backends import ACTIVATIONS

pytestmark = pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")

DTYPES = [np.float32, np.float64]


def _nat():
    import fastprop.backends.native as nat
    return nat


def _sweep(dtype):
    """Every binade of the format, both signs, a dense middle, and the extremes."""
    info = np.finfo(dtype)
    with np.errstate(over="ignore"):
        top = np.geomspace(float(info.smallest_subnormal), float(info.max) * 0.999, 40_001)
    mags = np.concatenate([
        top,
        np.linspace(0, 30, 60_001),
        [info.tiny, info.max, info.smallest_subnormal],
    ])
    x = np.concatenate([mags, -mags]).astype(dtype)
    return x[np.isfinite(x)]


def _run(name, x):
    y = np.empty_like(x)
    _nat().activation_forward(ACTIVATIONS[name], 0.01, x, y)
    return y


def _ulps(got, exact, dtype):
    with np.errstate(over="ignore"):
        spacing = np.spacing(np.abs(exact.astype(dtype))).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_whole_range(dtype):
    x = _sweep(dtype)
    y = _run("tanh", x)
    exact = np.tanh(x.astype(np.longdouble)).astype(np.float64)
    assert _ulps(y, exact, dtype).max() <= 4
    assert np.all(np.abs(y) <= 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_whole_range(dtype):
    x = _sweep(dtype)
    y = _run("sigmoid", x)
    xl = x.astype(np.longdouble)
    e = np.exp(-np.abs(xl))
    exact = np.where(xl >= 0, 1 / (1 + e), e / (1 + e)).astype(np.float64)
    normal = exact >= np.finfo(dtype).tiny
    assert _ulps(y[normal], exact[normal], dtype).max() <= 6
    assert np.all(np.abs(y[~normal] - exact[~normal]) <= 4 * np.finfo(dtype).smallest_subnormal)
    assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_whole_range(dtype):
    x = _sweep(dtype)
    y = _run("gelu", x)
    xl = x.astype(np.longdouble)
    xc = np.clip(xl, -40, 40)
    u = np.sqrt(np.longdouble(2) / np.pi) * (xc + np.longdouble(0.044715) * xc ** 3)
    exact = (xl * (0.5 * (1 + np.tanh(u)))).astype(np.float64)
    err = np.abs(y.astype(np.float64) - exact)
    with np.errstate(over="ignore"):
        bound = 8 * np.maximum(np.spacing(np.abs(exact.astype(dtype))),
                               np.finfo(dtype).eps * np.minimum(np.abs(x), 1)).astype(np.float64)
    bound = np.maximum(bound, 4 * np.finfo(dtype).smallest_subnormal)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (x[worst], y[worst], exact[worst])


def test_gelu_negative_tail_relative_accuracy():
    """float32 gelu for x in [-10.1, -0.5] (results down to ~1e-37), every 31st input,
    relative to the result: within (3 |w| + 8) ulp, w = 2u (the bound above is an
    absolute 1e-6 there, which a form that cancels to 0, 0.5 x (1 + tanh(u)) in
    float32, passes)."""
    lo, hi = np.float32(-10.1).view(np.int32), np.float32(-0.5).view(np.int32)
    x = np.arange(hi, lo, 31, dtype=np.int32).view(np.float32)
    y = _run("gelu", x)
    xl = x.astype(np.longdouble)
    u = np.sqrt(np.longdouble(2) / np.pi) * (xl + np.longdouble(0.044715) * xl ** 3)
    exact = (xl / (1 + np.exp(-2 * u))).astype(np.float64)
    ulps = _ulps(y, exact, np.float32)
    bound = 3 * np.abs(2 * u).astype(np.float64) + 8
    worst = np.argmax(ulps - bound)
    assert np.all(ulps <= bound), (x[worst], y[worst], exact[worst], ulps[worst])
    assert ulps.max() > 50  # (the tail's conditioning is there: the test can tell)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu"])
def test_special_values(dtype, name):
    x = np.array([-np.inf, np.inf, np.nan], dtype)
    y = _run(name, x)
    expected = {
        "identity": [-np.inf, np.inf, np.nan],
        "relu": [0.0, np.inf, np.nan],
        "leaky_relu": [-np.inf, np.inf, np.nan],
        "sigmoid": [0.0, 1.0, np.nan],
        "tanh": [-1.0, 1.0, np.nan],
        "gelu": [0.0, np.inf, np.nan],
    }[name]
    np.testing.assert_array_equal(y, np.array(expected, dtype))
    # backward at the extremes: finite slopes, NaN propagates through smooth ones
    big = np.array([-np.finfo(dtype).max, np.finfo(dtype).max, -np.inf, np.inf, np.nan], dtype)
    yb = _run(name, big)
    g = np.empty_like(big)
    _nat().activation_backward(ACTIVATIONS[name], 0.01, np.ones_like(big), big, yb, g)
    slopes = {"identity": [1, 1, 1, 1, 1], "relu": [0, 1, 0, 1, 0],
              "leaky_relu": [0.01, 1, 0.01, 1, 0.01], "sigmoid": [0, 0, 0, 0, np.nan],
              "tanh": [0, 0, 0, 0, np.nan], "gelu": [0, 1, 0, 1, np.nan]}[name]
    np.testing.assert_allclose(g, np.array(slopes, dtype), rtol=1e-6, atol=1e-200)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_keeps_the_sign_of_zero(dtype):
    """tanh(-0) = -0, as NumPy and PyTorch (the polynomial branch gave +0), in full
    vectors and in tails alike."""
    x = np.zeros(37, dtype)
    x[::2] = -0.0
    y = _run("tanh", x)
    np.testing.assert_array_equal(np.signbit(y), np.signbit(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_rows_with_extremes(dtype):
    info = np.finfo(dtype)
    x = np.array([[info.max, info.max, -info.max], [1e4, 0, -1e4], [0, 0, 0],
                  [-np.inf, 0, 1], [np.nan, 0, 1]], dtype)
    y = _run("softmax", x)
    np.testing.assert_allclose(y[:4].sum(axis=1), 1, rtol=4 * info.eps)
    np.testing.assert_allclose(y[0], [0.5, 0.5, 0], atol=info.eps)
    np.testing.assert_allclose(y[3], np.exp([0, 0, 1] - np.logaddexp(0, 1) * 0) * 0 +
                               np.array([0, 1, np.e]) / (1 + np.e), rtol=8 * info.eps)
    assert np.isnan(y[4]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_reference_agrees_on_special_values(dtype):
    """The numpy backend (the oracle elsewhere) has the same special-value semantics."""
    import fastprop.backends.numpy as ref
    x = np.array([-np.inf, np.inf, np.nan, -np.finfo(dtype).max, np.finfo(dtype).max], dtype)
    for name in ("sigmoid", "tanh", "gelu", "relu", "leaky_relu"):
        a, b = np.empty_like(x), np.empty_like(x)
        ref.activation_forward(ACTIVATIONS[name], 0.01, x, a)
        _nat().activation_forward(ACTIVATIONS[name], 0.01, x, b)
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_derivative_whole_range(dtype):
    """gelu' = s + 2 x s (1 - s) c (1 + 3k x^2), s = sigmoid(w), w = 2u, within
    (8 + 2|w|) eps of its terms' magnitude: the terms cancel near x = -0.75, so the
    bound is on them, not on the result; and w is rounded before exp, whose relative
    error then grows with |w| (exp's condition number).  Where s rounds to 1 the
    slope is 1 + 2e-6 at x = 5 in float32, not 1: s (1 - s) must not be 1 - s."""
    x = _sweep(dtype)
    gy = np.ones_like(x)
    g = np.empty_like(x)
    _nat().activation_backward(ACTIVATIONS["gelu"], 0.01, gy, x, _run("gelu", x), g)
    xc = np.clip(x.astype(np.longdouble), -40, 40)
    c = np.sqrt(np.longdouble(2) / np.pi)
    k = np.longdouble(0.044715)
    w = 2 * c * (xc + k * xc ** 3)
    e = np.exp(-np.abs(w))  # no cancellation on either side
    s = np.where(w >= 0, 1 / (1 + e), e / (1 + e))
    second = 2 * xc * (e / (1 + e) ** 2) * c * (1 + 3 * k * xc ** 2)
    exact = (s + second).astype(np.float64)
    scale = (np.abs(s) + np.abs(second)).astype(np.float64)
    cond = 8 + 2 * np.abs(w).astype(np.float64)
    # absolute slack for results that are 0 in effect: s (1 - s) in the subnormals is
    # rounded to a subnormal step and then multiplied by 2 x c (1 + 3k x^2) (~300 at
    # x = -10); below the clamp x = -20 the slope is taken as 0, below e^-590 in double
    atol = 1e3 * float(np.finfo(np.float32).smallest_subnormal) if dtype == np.float32 else 1e-250
    bound = cond * np.finfo(dtype).eps * scale + atol
    err = np.abs(g.astype(np.float64) - exact)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (x[worst], g[worst], exact[worst])
    assert np.all(g[(x > 4.5) & (x < 5)] > 1) and np.all(g[x >= 20] == 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["sigmoid", "tanh", "gelu", "gelu_erf"])
def test_result_does_not_depend_on_position(dtype, name):
    """A value's result is the same bits wherever it lies: in a full vector, in the
    masked tail, or in another thread's share (offsets 1..17 shift every lane)."""
    x = np.random.default_rng(3).standard_normal(70_001).astype(dtype) * 4
    y = _run(name, x)
    gy = np.random.default_rng(4).standard_normal(x.size).astype(dtype)
    g = np.empty_like(x)
    _nat().activation_backward(ACTIVATIONS[name], 0.01, gy, x, y, g)
    for k in list(range(1, 18)) + [35_003]:
        np.testing.assert_array_equal(_run(name, x[k:]), y[k:], err_msg=f"offset {k}")
        gk = np.empty_like(x[k:])
        _nat().activation_backward(ACTIVATIONS[name], 0.01, gy[k:], x[k:], y[k:], gk)
        np.testing.assert_array_equal(gk, g[k:], err_msg=f"backward, offset {k}")
    for n in range(1, 20):  # arrays shorter than a vector: the tail alone
        np.testing.assert_array_equal(_run(name, x[:n].copy()), y[:n], err_msg=f"n={n}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_backend_gelu_relative_accuracy(dtype):
    """The numpy backend (the oracle of the other tests) computes gelu and gelu' with
    relative accuracy for x << 0 too: 0.5 (1 + tanh(u)) cancels there (4% relative
    error at x = -5 in float32), sigmoid(2u) does not; nor does s (1 - s) = e/(1+e)^2."""
    import fastprop.backends.numpy as ref
    x = np.linspace(-9, 9, 20_001).astype(dtype)
    xl = x.astype(np.longdouble)
    w = 2 * np.sqrt(np.longdouble(2) / np.pi) * (xl + np.longdouble(0.044715) * xl ** 3)
    e = np.exp(-np.abs(w))
    s = np.where(w >= 0, 1 / (1 + e), e / (1 + e))
    y = np.empty_like(x)
    ref.activation_forward(ACTIVATIONS["gelu"], 0.01, x, y)
    cond = (8 + 2 * np.abs(w)).astype(np.float64) * np.finfo(dtype).eps
    exact = (xl * s).astype(np.float64)
    assert np.all(np.abs(y - exact) <= cond * np.abs(exact) + np.finfo(dtype).tiny)
    g = np.empty_like(x)
    ref.activation_backward(ACTIVATIONS["gelu"], 0.01, np.ones_like(x), x, y, g)
    second = 2 * xl * (e / (1 + e) ** 2) * np.sqrt(np.longdouble(2) / np.pi) * (
        1 + 3 * np.longdouble(0.044715) * xl ** 2)
    scale = (np.abs(s) + np.abs(second)).astype(np.float64)
    assert np.all(np.abs(g - (s + second).astype(np.float64)) <= cond * scale)


_GELU_ERF_F64 = {}  # (the mpmath reference, computed once)


def _gelu_erf_exact(x):
    """(x Phi(x), Phi(x) + x phi(x), the terms' magnitude) for float32 inputs, in
    double through math.erfc (its argument's rounding, ~x^2 ulp of double, is far below
    float's ulp); the limits beyond |x| = 40."""
    xd = x.astype(np.float64)
    erfc = np.vectorize(math.erfc, otypes=[np.float64])
    xc = np.clip(xd, -40, 40)
    cdf = 0.5 * erfc(-xc * math.sqrt(0.5))
    xpdf = xc * np.exp(-0.5 * xc * xc) / math.sqrt(2 * math.pi)
    y = np.where(xd < -40, -0.0, np.where(xd > 40, xd, xc * cdf))
    return y, cdf + xpdf, np.abs(cdf) + np.abs(xpdf)


def _gelu_erf_exact_f64(x):
    """The same for float64 inputs, in 40-digit arithmetic (mpmath): a double
    reference would carry the ~x^2 ulp of its own argument's rounding."""
    mpmath = pytest.importorskip("mpmath")
    key = x.tobytes()
    if key not in _GELU_ERF_F64:
        with mpmath.workdps(40):
            out = []
            for v in x.tolist():
                if abs(v) > 40:
                    out.append((v if v > 0 else -0.0, 1.0 if v > 0 else 0.0,
                                1.0 if v > 0 else 0.0))
                    continue
                m = mpmath.mpf(v)
                cdf, xpdf = mpmath.ncdf(m), m * mpmath.npdf(m)
                out.append((float(m * cdf), float(cdf + xpdf), float(cdf + abs(xpdf))))
        _GELU_ERF_F64[key] = tuple(np.array(c) for c in zip(*out))
    return _GELU_ERF_F64[key]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_gelu_erf_whole_range(dtype, backend):
    """The exact GELU x Phi(x) (PyTorch's default) and its derivative Phi(x) + x phi(x):
    float32 within 1 ulp of math.erfc's (the native kernel's float form is a double
    polynomial for erfc, 8.1e-11 relative: one rounding to float); float64 within 4 ulp
    of 40-digit values (mpmath; on every 16th point of the sweep) down to results of
    4e-307 (below, erfc(-x / sqrt 2) is itself subnormal: 32 ulp), which needs the
    argument -x / sqrt 2 corrected for its rounding: that alone cost 2 t^2 ulp (erfc's
    condition number), ~700 at x = -38.  The derivative on its terms' magnitude (they
    cancel near x = -0.75).  Special values: -inf -> -0, inf -> inf, NaN -> NaN; the
    slope 0 and 1 at the ends."""
    import fastprop.backends.numpy as ref
    be = _nat() if backend == "native" else ref
    x = _sweep(dtype)
    if dtype == np.float64:
        # (and densely where erfc turns subnormal: the bound changes there)
        x = np.concatenate([x[::16], np.linspace(-37.7, -37.4, 301)])
        exact, dexact, scale = _gelu_erf_exact_f64(x)
        ulps = np.where(np.abs(exact) < 4.2e-307, 32, 4)
    else:
        exact, dexact, scale = _gelu_erf_exact(x)
        ulps = 1
    y = np.empty_like(x)
    be.activation_forward(ACTIVATIONS["gelu_erf"], 0.01, x, y)
    eps = np.finfo(dtype).eps
    tiny = 64 * float(np.finfo(dtype).smallest_subnormal)
    with np.errstate(over="ignore"):
        bound = ulps * np.spacing(np.abs(exact.astype(dtype))).astype(np.float64) + tiny
    err = np.abs(y.astype(np.float64) - exact)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (x[worst], y[worst], exact[worst])
    g = np.empty_like(x)
    be.activation_backward(ACTIVATIONS["gelu_erf"], 0.01, np.ones_like(x), x, y, g)
    bound = 2 * ulps * eps * scale + tiny
    err = np.abs(g.astype(np.float64) - dexact)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (x[worst], g[worst], dexact[worst])
    special = np.array([-np.inf, np.inf, np.nan, -np.finfo(dtype).max, np.finfo(dtype).max],
                       dtype)
    ys, gs = np.empty_like(special), np.empty_like(special)
    be.activation_forward(ACTIVATIONS["gelu_erf"], 0.01, special, ys)
    np.testing.assert_array_equal(ys, np.array([-0.0, np.inf, np.nan, -0.0, special[-1]], dtype))
    assert np.signbit(ys[0])
    be.activation_backward(ACTIVATIONS["gelu_erf"], 0.01, np.ones_like(special), special,
                           ys, gs)
    np.testing.assert_array_equal(gs, np.array([0, 1, np.nan, 0, 1], dtype))


# ------------------------------------------------------------------ every ISA path
@pytest.mark.skipif(os.environ.get("FASTPROP_ACT_ISA_CHILD") == "1",
                    reason="already a per-ISA child run")
def test_subprocess_isa_suites():
    """This module again in a subprocess for each available kernel unit but the
    current one: the avx512 and avx2 units have their own intrinsics (vmath.hpp), and
    CI's runs cover only the auto unit and generic."""
    from fastprop import _native
    for isa in _native.available_isas():
        if isa != _native.isa():
            run_module_on_isa(__file__, isa, "FASTPROP_ACT_ISA_CHILD")


@pytest.mark.skipif(os.environ.get("FASTPROP_ACT_ISA_CHILD") != "1",
                    reason="only in a per-ISA child run")
def test_child_runs_the_requested_isa():
    from fastprop import _native
    assert _native.isa() == os.environ["FASTPROP_ISA"]
