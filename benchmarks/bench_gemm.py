"""GEMM and the dense layer: fastprop native vs NumPy (OpenBLAS).

Threads: 2 for fastprop's OpenMP and for OpenBLAS (benchmarks/conftest.py).  The GEMMs
run on both threads on either side; the NumPy composition's elementwise steps (bias,
relu, the relu mask) are ufuncs, which are single-threaded, so in the dense rows the
NumPy side does that work on 1 thread where native uses 2.

Groups (one operation at one shape; ``benchmarks/report.py --flops`` turns them into
the GFLOP/s and ratio table of benchmarks/RESULTS.md):

* ``gemm <dtype> NN n=<n>``: square C = A @ B, n = 32 ... 2048 (2048: full profile);
* ``gemm <dtype> <layout> <m>x<k>x<n>``: the MLP shapes in NN, NT and TN (C = A B,
  A B^T, A^T B: forward, grad_x and grad_w of a dense layer);
* ``dense_fwd <in>x<out> relu batch=<b>``: y = relu(x @ w + b), fused native kernel vs
  the NumPy composition (``np.matmul(x, w, out=y)``, ``y += b``,
  ``np.maximum(y, 0, out=y)``);
* ``dense_fwd_bwd ...``: forward plus backward (grad_z, grad_w, grad_b, grad_x) vs the
  NumPy composition (grad_z = gy * (y > 0) through a preallocated mask, then
  ``np.matmul``/``np.sum`` with ``out=``).

Both sides are called at the kernel level and write into preallocated outputs: native
through ``fastprop.backends.native`` (the Cython wrapper: shape checks, GIL release,
C++), NumPy through ``np.matmul(..., out=)`` and ufuncs with ``out=`` (no temporary
arrays on either side).  Each case checks its result once against float64 NumPy
before it is timed.  ``extra_info["flops"]`` holds the flop count (2 m n k per GEMM).

Run: ``python -m pytest benchmarks/bench_gemm.py --benchmark-only
--benchmark-json=gemm.json`` (``--bench-full`` adds n = 2048), then
``python benchmarks/report.py gemm.json --flops``.
"""

import numpy as np
import pytest

IMPLS = ["native", "numpy"]
DTYPES = {"f32": np.float32, "f64": np.float64}
SQUARE = [32, 64, 128, 256, 512, 1024, pytest.param(2048, marks=pytest.mark.full)]
MLP_SHAPES = [(64, 784, 256), (64, 256, 256), (32, 128, 128), (128, 784, 256), (1, 784, 256)]
LAYOUTS = {"NN": (False, False), "NT": (False, True), "TN": (True, False)}
DENSE = (784, 256)
BATCHES = [1, 32, 128, 512]


def _nat():
    from fastprop.backends import native
    return native


def _gemm_case(impl, dtype, m, k, n, layout):
    ta, tb = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    c = np.empty((m, n), dtype)
    oa, ob = (a.T if ta else a), (b.T if tb else b)
    if impl == "native":
        nat = _nat()

        def run():
            nat.gemm(a, b, c, ta, tb, False)
    else:
        def run():
            np.matmul(oa, ob, out=c)
    run()
    want = oa.astype(np.float64) @ ob.astype(np.float64)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(c, want, rtol=tol, atol=tol * np.sqrt(k))
    return run


@pytest.mark.parametrize("n", SQUARE)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_gemm_square(benchmark, impl, dtype, n):
    benchmark.group = f"gemm {dtype} NN n={n}"
    benchmark.extra_info["flops"] = 2 * n ** 3
    benchmark(_gemm_case(impl, DTYPES[dtype], n, n, n, "NN"))


@pytest.mark.parametrize("shape", MLP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_gemm_mlp(benchmark, impl, dtype, layout, shape):
    m, k, n = shape
    benchmark.group = f"gemm {dtype} {layout} {m}x{k}x{n}"
    benchmark.extra_info["flops"] = 2 * m * k * n
    benchmark(_gemm_case(impl, DTYPES[dtype], m, k, n, layout))


def _dense_case(impl, batch, backward):
    n_in, n_out = DENSE
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32) * np.float32(0.1)
    gy = rng.standard_normal((batch, n_out)).astype(np.float32)
    y = np.empty((batch, n_out), np.float32)
    gx = np.empty((batch, n_in), np.float32)
    gw = np.empty((n_in, n_out), np.float32)
    gb = np.empty(n_out, np.float32)
    work = np.empty((batch, n_out), np.float32)
    if impl == "native":
        nat = _nat()

        def run():
            nat.linear_forward(x, w, b, 1, 0.01, y, None)
            if backward:
                nat.linear_backward(gy, x, w, y, None, 1, 0.01, gx, gw, gb, work, False)
            return y
    else:
        mask = np.empty((batch, n_out), bool)

        def run():  # the same arithmetic as np.maximum(x @ w + b, 0), into y
            np.matmul(x, w, out=y)
            np.add(y, b, out=y)
            np.maximum(y, 0, out=y)
            if backward:  # grad_z = gy * (y > 0), into work
                np.greater(y, 0, out=mask)
                np.multiply(gy, mask, out=work)
                np.matmul(x.T, work, out=gw)
                np.sum(work, axis=0, out=gb)
                np.matmul(work, w.T, out=gx)
            return y
    out = run()
    want = np.maximum(x.astype(np.float64) @ w + b, 0)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    if backward:
        gz = gy * (want > 0)
        np.testing.assert_allclose(gw, x.T.astype(np.float64) @ gz, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(gx, gz @ w.T.astype(np.float64), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(gb, gz.sum(0), rtol=1e-3, atol=1e-3)
    return run


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_dense_forward(benchmark, impl, batch):
    """y = relu(x @ w + b), float32, 784 -> 256."""
    benchmark.group = f"dense_fwd {DENSE[0]}x{DENSE[1]} relu f32 batch={batch}"
    benchmark.extra_info["flops"] = 2 * batch * DENSE[0] * DENSE[1]
    benchmark(_dense_case(impl, batch, False))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_dense_forward_backward(benchmark, impl, batch):
    """Forward, then grad_z, grad_w, grad_b, grad_x, float32, 784 -> 256 relu."""
    benchmark.group = f"dense_fwd_bwd {DENSE[0]}x{DENSE[1]} relu f32 batch={batch}"
    benchmark.extra_info["flops"] = 6 * batch * DENSE[0] * DENSE[1]
    benchmark(_dense_case(impl, batch, True))
