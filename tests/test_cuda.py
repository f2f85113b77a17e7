"""The cuda backend under the CUDA simulator: every kernel of the contract against the
numpy backend (float32 and float64), and short training runs against the numpy backend.

NUMBA_ENABLE_CUDASIM=1 is set before numba is imported (numba reads it once), so these
tests need numba-cuda but no GPU; without numba-cuda the module is skipped.  The
simulator runs every GPU thread as a Python thread: shapes are tiny, and the launch
geometry of ``cuda_kernels`` is the simulator's (the GPU tile shapes get one test).

On a machine with a GPU, ``FASTPROP_CUDA_TESTS=gpu python -m pytest tests/test_cuda.py``
runs the same tests on the device (the simulator is not forced; the kernels compile for
it, which takes minutes the first time).
"""

import os
import subprocess
import sys
import warnings

_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM")
if os.environ.get("FASTPROP_CUDA_TESTS", "").strip().lower() != "gpu":
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
try:
    from numba import cuda as _numba_cuda  # noqa: F401
except ImportError as _exc:
    _numba_cuda = None
    import importlib.util
    # (installed but not importable is said, not skipped as "not installed")
    _why = (f"numba is installed, but numba.cuda failed to import: {_exc}"
            if importlib.util.find_spec("numba") is not None else "numba-cuda is not installed")
finally:  # numba has read it: do not leak it into subprocesses of other tests
    if _SIM is None:
        os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    else:
        os.environ["NUMBA_ENABLE_CUDASIM"] = _SIM

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fastprop as fp  # noqa: E402
from fastprop import backends  # noqa: E402
from fastprop.backends import ACTIVATIONS, cuda_support  # noqa: E402
from _support import in_fork_child  # noqa: E402
from fastprop.backends import numpy as ref  # noqa: E402

if _numba_cuda is None:
    pytest.skip(_why, allow_module_level=True)
if cuda_support.problem() is not None:
    if not os.environ.get("NUMBA_ENABLE_CUDASIM") and _SIM is None and \
            os.environ.get("FASTPROP_CUDA_TESTS", "").strip().lower() == "gpu":
        pytest.skip(f"FASTPROP_CUDA_TESTS=gpu: {cuda_support.problem()}",
                    allow_module_level=True)
    pytest.skip("numba.cuda was imported without the simulator before this module, and "
                "there is no GPU", allow_module_level=True)

from fastprop.backends import cuda as cu  # noqa: E402

K = cu.ensure_available()

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
DTYPES = [F32, F64]
#: (rtol, atol) of the cuda result against the numpy backend's
TOL = {F32: (2e-5, 2e-6), F64: (1e-12, 1e-13)}


@pytest.fixture(autouse=True, scope="module")
def _fast_simulator():
    """The simulator's scheduler polls its threads: a short GIL switch interval makes
    it several times faster.  It also makes a race in the simulator likely: the first
    threads of a block to reach ``cuda.shared.array`` may each create their own array
    (a check-then-set on a dict without a lock), so the allocation is serialized here."""
    if not cuda_support.is_simulator():
        yield
        return
    import threading
    import traceback

    from numba.cuda.simulator import kernelapi

    original = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # paths without the race
            return original(self, shape, dtype, alignment)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]  # as the original
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, np.dtype(str(dtype)))
        return res

    old = sys.getswitchinterval()
    kernelapi.FakeCUDAShared.array = array
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(old)
    kernelapi.FakeCUDAShared.array = original


def close(actual, expected, dtype, scale=None, factor=1.0, what=""):
    rtol, atol = TOL[np.dtype(dtype)]
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    scale = np.abs(expected) if scale is None else scale
    err = np.abs(actual - expected)
    bound = factor * (atol + rtol * scale)
    assert np.all(err <= bound), f"{what}: max error {err.max()} (bound {np.min(bound)})"


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------ availability
def test_simulator_counts_as_available():
    assert cuda_support.problem() is None
    assert cuda_support.availability().startswith("simulator")
    assert fp._config.config()["cuda"].startswith("simulator")
    assert cu.config()["device"].startswith("simulator")


def test_unavailable_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(cu, "_K", None)
    monkeypatch.setattr(cuda_support, "_numba_cuda", lambda: None)
    with pytest.raises(fp.BackendUnavailableError, match="numba-cuda is not installed"):
        cu.ensure_available()
    assert cuda_support.availability().startswith("numba-cuda is not installed")
    # installed, but its import fails (numba-cuda without cuda-bindings, a NumPy numba
    # does not support): the reason is said, not "not installed"
    monkeypatch.setattr(cuda_support, "_import_error",
                        "ImportError: CUDA bindings not found")
    with pytest.raises(fp.BackendUnavailableError,
                       match=r"is installed, but numba.cuda failed to import: ImportError: "
                             r"CUDA bindings not found"):
        cu.ensure_available()
    monkeypatch.setattr(cuda_support, "_import_error", None)

    class NoGPU:
        @staticmethod
        def is_available():
            return False

    monkeypatch.setattr(cuda_support, "_numba_cuda", lambda: NoGPU)
    monkeypatch.setattr(cuda_support, "is_simulator", lambda: False)
    with pytest.raises(fp.BackendUnavailableError, match="no CUDA GPU found"):
        cu.ensure_available()
    monkeypatch.setattr(backends, "_loaded", {})
    with pytest.raises(fp.BackendUnavailableError, match="no CUDA GPU found"):
        fp.nn.Dense(2, 2).to("cuda")


def test_import_needs_no_numba():
    code = ("import sys; sys.modules['numba'] = None\n"
            "import fastprop as fp\n"
            "assert 'numba' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
            "try:\n    fp.set_backend('cuda')\nexcept fp.BackendUnavailableError as e:\n"
            "    assert 'numba-cuda is not installed' in str(e), e\nelse:\n"
            "    raise SystemExit('set_backend(cuda) did not raise')\n"
            "assert fp._config.config()['cuda'].startswith('numba-cuda is not installed')\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ GEMM
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False),
                                             (True, True)], ids=["NN", "NT", "TN", "TT"])
def test_gemm(dtype, trans_a, trans_b, rng):
    m, n, k = 9, 11, 6  # partial tiles in every direction
    a = randn(rng, (k, m) if trans_a else (m, k), dtype)
    b = randn(rng, (n, k) if trans_b else (k, n), dtype)
    scale = np.abs(a.T if trans_a else a) @ np.abs(b.T if trans_b else b)
    for accumulate in (False, True):
        c0 = randn(rng, (m, n), dtype)
        got, want = c0.copy(), c0.copy()
        cu.gemm(a, b, got, trans_a, trans_b, accumulate)
        ref.gemm(a, b, want, trans_a, trans_b, accumulate)
        close(got, want, dtype, scale + np.abs(c0), what=f"accumulate={accumulate}")


def test_gemm_strided_operand_and_empty_k(rng):
    big = randn(rng, (7, 10), F64)
    a = big[:, :4]                           # leading dimension 10 > 4
    b = randn(rng, (4, 3), F64)
    c = np.empty((7, 3))
    cu.gemm(a, b, c, False, False, False)
    close(c, a @ b, F64, np.abs(a) @ np.abs(b))
    padded = np.ones((7, 5))
    with fp.use_backend("cuda"):                # through fp.ops, into a padded-row view
        fp.ops.matmul(a, b, out=padded[:, :3], accumulate=True)
    close(padded[:, :3], a @ b + 1, F64, np.abs(a) @ np.abs(b) + 1)
    assert (padded[:, 3:] == 1).all()
    c = np.ones((2, 3))
    cu.gemm(np.empty((2, 0)), np.empty((0, 3)), c, False, False, True)
    assert (c == 1).all()
    cu.gemm(np.empty((2, 0)), np.empty((0, 3)), c, False, False, False)
    assert (c == 0).all()


@pytest.mark.parametrize("tiles,shape,trans", [
    ((128, 128, 8, 8, 8), (100, 9, 9), (False, False)),   # GPU float32 large tiles
    ((64, 64, 8, 4, 4), (50, 20, 10), (True, True)),       # GPU small / float64 tiles
    ((64, 16, 16, 4, 1), (50, 5, 17), (True, False)),      # GPU narrow tiles
], ids=["large", "small", "narrow"])
def test_gemm_gpu_tiles(tiles, shape, trans, rng):
    """The GPU tile shapes (256 threads a block) on one partial tile, two K slabs (the
    simulator's small tiles cover the multi-block indexing)."""
    m, n, k = shape
    ta, tb = trans
    a = randn(rng, (k, m) if ta else (m, k), F64)
    b = randn(rng, (n, k) if tb else (k, n), F64)
    c = _numba_cuda.device_array((m, n), np.float64)
    K.gemm(_numba_cuda.to_device(a), _numba_cuda.to_device(b), c, ta, tb, tiles=K.Tiles(*tiles))
    want = (a.T if ta else a) @ (b.T if tb else b)
    close(c.copy_to_host(), want, F64, np.abs(a.T if ta else a) @ np.abs(b.T if tb else b))


def test_gemm_grid_stays_in_cudas_limits(monkeypatch, rng):
    """The rows go on grid x (up to 2^31 - 1 blocks), the column tiles on grid y, which
    CUDA caps at 65535 (m on y refused any batch over 4,194,240 rows with 64-row tiles):
    the launch geometry for huge shapes (recorded, not run), and the kernel's loop over
    column tiles when they outnumber grid y (the cap lowered to 2)."""
    launches = []

    class Recorder:
        def __getitem__(self, config):
            launches.append(config)
            return lambda *args: None

    class Fake:  # (only shape and dtype are read)
        def __init__(self, shape, dtype):
            self.shape, self.dtype = shape, np.dtype(dtype)

    monkeypatch.setattr(K, "gemm_kernel", lambda *args: Recorder())
    small = K.Tiles(64, 64, 8, 4, 4)  # (the GPU's tiles: cuda_kernels._geometry)
    gpu = K.Geometry({np.dtype(F32): K.Tiles(128, 128, 8, 8, 8), np.dtype(F64): small},
                     {np.dtype(F32): small, np.dtype(F64): small}, K.Tiles(64, 16, 16, 4, 1),
                     threads=256, max_blocks=1024, reduce=256, partials=256, col_block=(32, 8),
                     row_min=32, sms=132)
    m = 65535 * 64 + 1
    for dtype, n in ((np.float32, 10), (np.float64, 64), (np.float32, 64), (np.float32, 10**7)):
        tiles = K.choose_tiles(np.dtype(dtype), m, n, gpu)
        K.gemm(Fake((m, 8), dtype), Fake((8, n), dtype), Fake((m, n), dtype), tiles=tiles)
        (gx, gy), _ = launches[-1]
        assert gx == -(-m // tiles.bm) and gx < 2**31
        assert gy == min(-(-n // tiles.bn), 65535), (dtype, n, launches[-1])
    monkeypatch.undo()
    monkeypatch.setattr(K, "_MAX_GRID_Y", 2)
    tiles = K.Tiles(4, 4, 4, 2, 2)
    m, n, k = 5, 23, 6  # 6 column tiles on a grid y of 2
    a, b = randn(rng, (m, k), F64), randn(rng, (k, n), F64)
    bias = randn(rng, n, F64)
    c = _numba_cuda.device_array((m, n), np.float64)
    z = _numba_cuda.device_array((m, n), np.float64)
    K.gemm(_numba_cuda.to_device(a), _numba_cuda.to_device(b), c, bias=_numba_cuda.to_device(bias),
           z=z, act=ACTIVATIONS["relu"], tiles=tiles)
    want = a @ b + bias
    close(z.copy_to_host(), want, F64, np.abs(a) @ np.abs(b) + np.abs(bias))
    close(c.copy_to_host(), np.maximum(want, 0), F64, np.abs(a) @ np.abs(b) + np.abs(bias))


def test_no_launch_of_zero_blocks(monkeypatch, rng):
    """A GPU refuses a launch of 0 blocks (the simulator runs nothing): 0 columns."""
    launches = []
    real = K.kernels

    class Recorder:
        def __init__(self, kern):
            self.kern = kern

        def __getitem__(self, config):
            launches.append(config)
            return self.kern[config]

    class Wrapped:
        def __init__(self, k):
            self.k = k

        def __getattr__(self, name):
            return Recorder(getattr(self.k, name))

    monkeypatch.setattr(K, "kernels", lambda dtype: Wrapped(real(dtype)))
    g = _numba_cuda.to_device(np.zeros((3, 0)))
    K.act_grad_colsum(g, None, g, ACTIVATIONS["relu"], 0.0, g, _numba_cuda.to_device(np.zeros(0)),
                      False)
    assert all(np.prod(grid) > 0 for grid, _ in launches), launches
    assert K._col_grid(0)[0] >= 1


@pytest.mark.slow
def test_gpu_geometry_reductions(monkeypatch, rng):
    """The GPU launch geometry of the reduction kernels (256-thread blocks, 32 x 8
    column blocks, row blocks of 32 and more) on tiny shapes: losses, the fused
    activation-gradient + bias-gradient kernel, normalization."""
    gpu = K.Geometry(K.GEOMETRY.large, K.GEOMETRY.small, K.GEOMETRY.narrow, threads=256,
                     max_blocks=2, reduce=256, partials=2, col_block=(32, 8), row_min=32, sms=1)
    monkeypatch.setattr(K, "GEOMETRY", gpu)
    factories = (K.kernels, K.reductions, K.norms, K._finish_kernel)
    for f in factories:
        f.cache_clear()
    try:
        # one block per launch where possible: 256-thread blocks are slow to simulate
        logits, labels = randn(rng, (2, 40), F64), rng.integers(0, 40, 2)
        grad, want_grad = np.empty_like(logits), np.empty_like(logits)
        close(cu.softmax_xent(logits, labels, None, grad),
              ref.softmax_xent(logits, labels, None, want_grad), F64, factor=10)
        close(grad, want_grad, F64)
        pred, target = randn(rng, (8, 30), F64), randn(rng, (8, 30), F64)
        close(cu.mse(pred, target, False, None), ref.mse(pred, target, False, None), F64,
              factor=10)
        x, w, b = randn(rng, (8, 4), F64), randn(rng, (4, 30), F64), randn(rng, 30, F64)
        y, gb = np.empty((8, 30)), np.zeros(30)
        cu.linear_forward(x, w, b, ACTIVATIONS["relu"], 0.0, y, None)
        g = randn(rng, (8, 30), F64)
        dy, dg, dgb = (_numba_cuda.to_device(a) for a in (y, g, gb))
        dwork = _numba_cuda.device_array((8, 30), np.float64)
        K.act_grad_colsum(dg, None, dy, ACTIVATIONS["relu"], 0.0, dwork, dgb, True)
        close(dwork.copy_to_host(), g * (y > 0), F64)
        close(dgb.copy_to_host(), (g * (y > 0)).sum(0), F64, np.abs(g).sum(0))
        xs = randn(rng, (8, 30), F64)
        gamma, beta = randn(rng, 30, F64), randn(rng, 30, F64)
        for kind, stats in (("batchnorm", 30), ("layernorm", 8)):
            res = []
            for be in (cu, ref):
                out, mean, inv = np.empty_like(xs), np.empty(stats), np.empty(stats)
                getattr(be, f"{kind}_forward")(xs, gamma, beta, 1e-5, out, mean, inv)
                gx, gg, gbeta = np.empty_like(xs), np.zeros(30), np.zeros(30)
                getattr(be, f"{kind}_backward")(g, xs, gamma, mean, inv, gx, gg, gbeta)
                res.append((out, mean, inv, gx, gg, gbeta))
            for a, e in zip(*res):
                close(a, e, F64, np.abs(e).max(), factor=10, what=kind)
    finally:
        for f in factories:
            f.cache_clear()


# ------------------------------------------------------------------ dense layer
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_linear_forward_backward(dtype, act, rng):
    code, alpha = ACTIVATIONS[act], 0.1
    n, i, o = 5, 4, 6
    x, w, b = randn(rng, (n, i), dtype), randn(rng, (i, o), dtype), randn(rng, o, dtype)
    gy = randn(rng, (n, o), dtype)
    gw0, gb0 = randn(rng, (i, o), dtype), randn(rng, o, dtype)
    res = []
    for be in (cu, ref):
        y, z = np.empty((n, o), dtype), np.empty((n, o), dtype)
        be.linear_forward(x, w, b, code, alpha, y, z)
        gx, gw, gb, work = np.empty((n, i), dtype), gw0.copy(), gb0.copy(), np.empty((n, o), dtype)
        be.linear_backward(gy, x, w, y, z, code, alpha, gx, gw, gb, work, True)
        res.append(dict(y=y, z=z, gx=gx, gw=gw, gb=gb, work=work))
    got, want = res
    # work is scratch for grad_z: neither backend writes it for identity (grad_z is
    # grad_y), so there it holds whatever np.empty gave and is not compared.
    for key in ("y", "z") if act == "identity" else ("y", "z", "work"):
        close(got[key], want[key], dtype, factor=4, what=key)
    gz = np.abs(gy if act == "identity" else want["work"])
    close(got["gw"], want["gw"], dtype, np.abs(x).T @ gz + np.abs(gw0), factor=4, what="gw")
    close(got["gb"], want["gb"], dtype, gz.sum(0) + np.abs(gb0), factor=4, what="gb")
    close(got["gx"], want["gx"], dtype, gz @ np.abs(w).T, factor=4, what="gx")


def test_linear_without_bias_nor_grad_x(rng):
    n, i, o = 3, 5, 2
    x, w, gy = randn(rng, (n, i), F64), randn(rng, (i, o), F64), randn(rng, (n, o), F64)
    y = np.empty((n, o))
    cu.linear_forward(x, w, None, ACTIVATIONS["identity"], 0.0, y, None)
    close(y, x @ w, F64, np.abs(x) @ np.abs(w))
    gw = np.full((i, o), 7.0)
    cu.linear_backward(gy, x, w, y, None, ACTIVATIONS["identity"], 0.0, None, gw, None, None,
                       False)
    close(gw, x.T @ gy, F64, np.abs(x).T @ np.abs(gy))


# ------------------------------------------------------------------ activations
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_activation(dtype, act, rng):
    code, alpha = ACTIVATIONS[act], 0.2
    x = randn(rng, (2, 3, 5), dtype) * 2
    g = randn(rng, x.shape, dtype)
    y, want_y = np.empty_like(x), np.empty_like(x)
    cu.activation_forward(code, alpha, x, y)
    ref.activation_forward(code, alpha, x, want_y)
    close(y, want_y, dtype, factor=2, what="forward")
    gx, want_gx = np.empty_like(x), np.empty_like(x)
    cu.activation_backward(code, alpha, g, x, want_y, gx)
    ref.activation_backward(code, alpha, g, x, want_y, want_gx)
    close(gx, want_gx, dtype, np.abs(g) * 2, factor=2, what="backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_activation_extreme_inputs(dtype):
    """Huge |x|, infinities and NaN as the numpy backend (gelu's backward took x^3 to
    inf and returned 0 * inf = NaN for |x| > 1.8e19 in float32)."""
    big = np.finfo(dtype).max
    x = np.array([[1e20, -1e20, big, -big, np.inf, -np.inf, np.nan, 5.0]], dtype)
    if dtype == F64:
        x[0, :2] = [1e160, -1e160]
    g = np.ones_like(x)
    for act, code in ACTIVATIONS.items():
        y, want_y = np.empty_like(x), np.empty_like(x)
        gx, want_gx = np.empty_like(x), np.empty_like(x)
        # (the simulator's threads evaluate with NumPy scalars, which warn on inf - inf
        # as the numpy backend would without its errstate; a GPU does not)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cu.activation_forward(code, 0.2, x, y)
            ref.activation_forward(code, 0.2, x, want_y)
            cu.activation_backward(code, 0.2, g, x, want_y, gx)
            ref.activation_backward(code, 0.2, g, x, want_y, want_gx)
        np.testing.assert_allclose(y, want_y, rtol=TOL[dtype][0], err_msg=act)
        np.testing.assert_allclose(gx, want_gx, rtol=TOL[dtype][0], atol=TOL[dtype][1],
                                   err_msg=act)


def test_activation_in_place(rng):
    x = randn(rng, (4, 3), F32)
    want = np.tanh(x)
    cu.activation_forward(ACTIVATIONS["tanh"], 0.0, x, x)
    close(x, want, F32)
    g = randn(rng, (4, 3), F32)
    want = g * (1 - x * x)
    cu.activation_backward(ACTIVATIONS["tanh"], 0.0, g, None, x, g)
    close(g, want, F32, factor=2)


# ------------------------------------------------------------------ losses
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["labels", "targets", "unnormalised"])
def test_softmax_xent(dtype, kind, rng):
    n, c = 6, 5
    logits = randn(rng, (n, c), dtype) * 3
    labels, targets = None, None
    if kind == "labels":
        labels = rng.integers(0, c, n).astype(np.int64)
    else:
        targets = rng.random((n, c)).astype(dtype)
        if kind == "targets":
            targets /= targets.sum(1, keepdims=True)
        # (rows not summing to 1: the contract's gradient softmax * sum(t) - t)
    grad, want_grad = np.empty_like(logits), np.empty_like(logits)
    loss = cu.softmax_xent(logits, labels, targets, grad)
    want = ref.softmax_xent(logits, labels, targets, want_grad)
    close(loss, want, F64, factor=10)
    close(grad, want_grad, dtype, 1.0 / n)
    assert cu.softmax_xent(logits, labels, targets, None) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
def test_bce(dtype, from_logits, rng):
    if from_logits:
        pred = randn(rng, (4, 3), dtype) * 4
    else:
        pred = rng.random((4, 3)).astype(dtype)
        pred[0, :2] = [0.0, 1.0]                       # log clamped at -100
    target = rng.random((4, 3)).astype(dtype)
    target[0, :2] = [1.0, 0.0]
    grad, want_grad = np.empty_like(pred), np.empty_like(pred)
    loss = cu.bce(pred, target, from_logits, grad)
    want = ref.bce(pred, target, from_logits, want_grad)
    close(loss, want, F64, factor=10)
    close(grad, want_grad, dtype)
    assert cu.bce(pred, target, from_logits, None) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("half", [False, True])
def test_mse(dtype, half, rng):
    pred, target = randn(rng, (5, 3), dtype), randn(rng, (5, 3), dtype)
    grad, want_grad = np.empty_like(pred), np.empty_like(pred)
    loss = cu.mse(pred, target, half, grad)
    want = ref.mse(pred, target, half, want_grad)
    close(loss, want, F64, factor=10)
    close(grad, want_grad, dtype)


# ------------------------------------------------------------------ optimizers, norms
OPTIMIZER_CASES = {
    "sgd": ("sgd_update", dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
                               first=True), []),
    "sgd_momentum_first": ("sgd_update", dict(lr=0.1, momentum=0.9, nesterov=False,
                                              weight_decay=0.01, first=True), ["buf"]),
    "sgd_nesterov": ("sgd_update", dict(lr=0.1, momentum=0.9, nesterov=True,
                                        weight_decay=0.01, first=False), ["buf"]),
    "adam": ("adam_update", dict(step=3, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8,
                                 weight_decay=0.01, decoupled=False), ["m", "v"]),
    "adamw": ("adam_update", dict(step=1, lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6,
                                  weight_decay=0.1, decoupled=True), ["m", "v"]),
    "rmsprop": ("rmsprop_update", dict(lr=0.01, alpha=0.9, eps=1e-8, momentum=0.0,
                                       weight_decay=0.0), ["sq", None]),
    "rmsprop_momentum": ("rmsprop_update", dict(lr=0.01, alpha=0.9, eps=1e-8, momentum=0.5,
                                                weight_decay=0.1), ["sq", "buf"]),
    "adagrad": ("adagrad_update", dict(lr=0.1, eps=1e-10, weight_decay=0.05), ["sum"]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_optimizer_update(dtype, case, rng):
    fn, hyper, states = OPTIMIZER_CASES[case]
    shapes = [(3, 4), (4,)]
    params = [randn(rng, s, dtype) for s in shapes]
    grads = [randn(rng, s, dtype) for s in shapes]
    state = {k: [np.abs(randn(rng, s, dtype)) for s in shapes] for k in states if k}
    runs = []
    for be in (cu, ref):
        p = [a.copy() for a in params]
        st = {k: [a.copy() for a in v] for k, v in state.items()}
        args = [p, [g.copy() for g in grads]] + [st[k] if k else None for k in states]
        if fn == "sgd_update" and not states:
            args.append(None)
        getattr(be, fn)(*args, **hyper)
        runs.append((p, st))
    (p1, s1), (p2, s2) = runs
    for a, b in zip(p1, p2):
        close(a, b, dtype, factor=4, what="params")
    for k in s1:
        for a, b in zip(s1[k], s2[k]):
            close(a, b, dtype, factor=4, what=k)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_sum_squares_scale_clip(dtype, rng):
    arrays = [randn(rng, (3, 5), dtype), randn(rng, (7,), dtype)]
    assert cu.sum_squares(arrays) == pytest.approx(ref.sum_squares(arrays), rel=1e-12)
    assert cu.sum_squares([]) == 0.0
    got = [a.copy() for a in arrays]
    ids = [id(a) for a in got]
    cu.scale_(got, 0.5)
    for a, b in zip(got, arrays):
        close(a, b * dtype.type(0.5), dtype)
    cu.clip_(got, -0.25, 0.3)
    for a, b in zip(got, arrays):
        close(a, np.clip(b * dtype.type(0.5), -0.25, 0.3), dtype)
    assert [id(a) for a in got] == ids


# ------------------------------------------------------------------ normalization
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["batchnorm", "layernorm"])
def test_norm_forward_backward(dtype, kind, rng):
    n, f = 6, 5
    x = randn(rng, (n, f), dtype) * 2 + 1
    gamma, beta = randn(rng, f, dtype), randn(rng, f, dtype)
    g = randn(rng, (n, f), dtype)
    gg0, gb0 = randn(rng, f, dtype), randn(rng, f, dtype)
    stats = f if kind == "batchnorm" else n
    res = []
    for be in (cu, ref):
        y, mean, invstd = np.empty_like(x), np.empty(stats, dtype), np.empty(stats, dtype)
        getattr(be, f"{kind}_forward")(x, gamma, beta, 1e-5, y, mean, invstd)
        gx, gg, gb = np.empty_like(x), gg0.copy(), gb0.copy()
        getattr(be, f"{kind}_backward")(g, x, gamma, mean, invstd, gx, gg, gb)
        res.append(dict(y=y, mean=mean, invstd=invstd, gx=gx, gg=gg, gb=gb))
    for key in res[1]:
        scale = np.abs(res[1][key]).max() if key in ("gx", "gg", "gb") else None
        close(res[0][key], res[1][key], dtype, scale, factor=4, what=key)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_batchnorm_forward_eval(dtype, rng):
    x = randn(rng, (4, 3), dtype)
    gamma, beta, rm = randn(rng, 3, dtype), randn(rng, 3, dtype), randn(rng, 3, dtype)
    rv = np.abs(randn(rng, 3, dtype)) + dtype.type(0.5)
    y, want = np.empty_like(x), np.empty_like(x)
    cu.batchnorm_forward_eval(x, gamma, beta, rm, rv, 1e-5, y)
    ref.batchnorm_forward_eval(x, gamma, beta, rm, rv, 1e-5, want)
    close(y, want, dtype, factor=2)


# ------------------------------------------------------------------ training
def _mlp(dtype, acts, seed=0, sizes=(5, 8, 6, 3)):
    layers = [fp.nn.Dense(i, o, a, dtype=dtype, rng=seed + k)
              for k, (i, o, a) in enumerate(zip(sizes, sizes[1:], acts))]
    return fp.nn.Sequential(*layers)


def _train_both(build, make_opt, loss, X, y, steps=3):
    """Run ``steps`` compiled steps on the numpy backend and on cuda; returns both."""
    out = []
    for device in ("cpu", "cuda"):
        model = build().to(device)
        opt = make_opt(model.parameters())
        step = model.compile(loss, opt)
        with fp.use_backend("numpy"):  # the "cpu" model's backend
            losses = [step(X, y) for _ in range(steps)]
        output = step.output.copy()
        step.sync()
        out.append(dict(model=model, opt=opt, step=step, losses=losses, output=output))
    assert out[1]["step"]._fast is not None, "the cuda step did not run on the device"
    assert out[0]["step"]._fast is None
    return out


def _compare_training(cpu, gpu, dtype, factor):
    close(gpu["losses"], cpu["losses"], dtype, factor=factor, what="losses")
    close(gpu["output"], cpu["output"], dtype, factor=factor, what="output")
    assert gpu["opt"].step_count == cpu["opt"].step_count
    for p, q in zip(gpu["model"].parameters(), cpu["model"].parameters()):
        close(p.value, q.value, dtype, factor=factor, what="value")
        close(p.grad, q.grad, dtype, np.abs(q.grad).max(), factor=factor, what="grad")
    for s, t in zip(gpu["opt"].state, cpu["opt"].state):
        assert s.keys() == t.keys()
        for key in s:
            close(s[key], t[key], dtype, np.abs(t[key]).max(), factor=factor, what=key)


def test_train_cross_entropy_adam_f32(rng):
    X = randn(rng, (7, 5), F32)
    y = rng.integers(0, 3, 7)
    cpu, gpu = _train_both(lambda: _mlp(np.float32, ["relu", "tanh", None]),
                           lambda ps: fp.optim.Adam(ps, lr=0.01), "cross_entropy", X, y)
    _compare_training(cpu, gpu, F32, factor=20)


def test_train_cross_entropy_label_smoothing(rng):
    X = randn(rng, (7, 5), F64)
    y = rng.integers(0, 3, 7)
    cpu, gpu = _train_both(lambda: _mlp(np.float64, ["relu", "tanh", None]),
                           lambda ps: fp.optim.Adam(ps, lr=0.01),
                           fp.losses.SoftmaxCrossEntropy(label_smoothing=0.2), X, y)
    _compare_training(cpu, gpu, F64, factor=100)
    plain, _ = _train_both(lambda: _mlp(np.float64, ["relu", "tanh", None]),
                           lambda ps: fp.optim.Adam(ps, lr=0.01), "cross_entropy", X, y)
    assert not np.allclose(plain["losses"], gpu["losses"])  # (the smoothing was applied)


def test_train_mse_sgd_momentum_f64(rng):
    X = randn(rng, (6, 5), F64)
    y = randn(rng, (6, 3), F64)
    cpu, gpu = _train_both(lambda: _mlp(np.float64, ["gelu", "leaky_relu", "sigmoid"]),
                           lambda ps: fp.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
                           fp.losses.MSE(), X, y)
    _compare_training(cpu, gpu, F64, factor=100)


@pytest.mark.parametrize("case", ["adamw", "rmsprop", "adagrad", "nesterov", "bce"])
def test_train_other_optimizers_and_losses(case, rng):
    X = randn(rng, (4, 3), F64)
    y = rng.integers(0, 2, (4, 2)).astype(np.float64)
    loss = "mse"
    make = {
        "adamw": lambda ps: fp.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
        "rmsprop": lambda ps: fp.optim.RMSprop(ps, lr=0.01, momentum=0.5, weight_decay=0.01),
        "adagrad": lambda ps: fp.optim.Adagrad(ps, lr=0.1, weight_decay=0.01),
        "nesterov": lambda ps: fp.optim.SGD(ps, lr=0.1, momentum=0.5, nesterov=True),
        "bce": lambda ps: fp.optim.Adam(ps, lr=0.01),
    }[case]
    act = "softmax"
    if case == "bce":
        loss, act = fp.losses.BinaryCrossEntropy(from_logits=True), None
    cpu, gpu = _train_both(lambda: _mlp(np.float64, [act], sizes=(3, 2)), make, loss, X, y,
                           steps=2)
    _compare_training(cpu, gpu, F64, factor=100)


def test_fit_predict_and_sync_keep_host_arrays(rng):
    X = randn(rng, (9, 5), F32)
    y = rng.integers(0, 3, 9)
    hist, models = [], []
    for device in ("cpu", "cuda"):
        model = _mlp(np.float32, ["relu", "sigmoid", None]).to(device)
        arrays = [(p.value, p.grad) for p in model.parameters()]
        opt = fp.optim.RMSprop(model.parameters(), lr=0.01)
        with fp.use_backend("numpy"):
            h = model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=4,
                          shuffle=False, verbose=0)
            pred = model.predict(X)
        assert [(p.value, p.grad) for p in model.parameters()] == arrays  # same objects
        assert isinstance(pred, np.ndarray) and pred.shape == (9, 3)
        hist.append(h)
        models.append((model, pred))
    close(hist[1]["loss"], hist[0]["loss"], F32, factor=20)
    close(hist[1]["accuracy"], hist[0]["accuracy"], F64)
    close(models[1][1], models[0][1], F32, factor=20)
    for p, q in zip(models[1][0].parameters(), models[0][0].parameters()):
        close(p.value, q.value, F32, factor=20)


def test_host_changes_between_steps_are_uploaded(rng):
    X, y = randn(rng, (4, 3), F64), randn(rng, (4, 2), F64)
    model = _mlp(np.float64, [None], sizes=(3, 2)).to("cuda")
    opt = fp.optim.SGD(model.parameters(), lr=0.1)
    step = model.compile("mse", opt)
    step(X, y)
    step.sync()
    model[0].weight.value[...] = 0.0
    model[0].bias.value[...] = 0.0
    opt.hyper["lr"] = 0.0
    step(X, y)
    step.sync()
    assert (model[0].weight.value == 0).all() and (model[0].bias.value == 0).all()
    close(model[0].weight.grad, X.T @ (-2 * y / y.size), F64, factor=10)


@pytest.mark.parametrize("hook", ["on_train_batch_end", "on_train_batch_begin"])
def test_a_batch_callback_that_writes_the_weights_in_place_works_on_the_device(rng, hook):
    """A fit callback clipping the weights in place after (or before) each batch, as
    a Keras weight constraint: the same weights as on the CPU (the device's values
    overwrote the write at the next step, and the hook read stale values)."""
    X = randn(rng, (12, 5), F64)
    y = rng.integers(0, 3, 12)
    seen, runs = [], []
    for device in ("cpu", "cuda"):
        model = _mlp(np.float64, ["tanh", None], sizes=(5, 8, 3)).to(device)
        opt = fp.optim.SGD(model.parameters(), lr=0.5)

        class Clip:
            def _clip(self, batch, logs=None):
                seen.append(float(np.abs(model[0].weight.value).sum()))
                for p in model.parameters():
                    np.clip(p.value, -0.05, 0.05, out=p.value)

        clip = Clip()
        setattr(clip, hook, clip._clip)
        model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=4,
                  shuffle=False, verbose=0, callbacks=[clip])
        runs.append([p.value.copy() for p in model.parameters()])
    half = len(seen) // 2
    close(np.array(seen[half:]), np.array(seen[:half]), F64, factor=10)  # (what it read)
    for p, q in zip(*runs):
        close(p, q, F64, factor=10)
    if hook == "on_train_batch_end":  # (clipped after the last update too)
        assert max(float(np.abs(p).max()) for p in runs[1]) <= 0.05


def test_predict_and_evaluate_after_compiled_steps_see_trained_weights(rng):
    X, y = randn(rng, (4, 3), F64), randn(rng, (4, 2), F64)
    preds = []
    for device in ("cpu", "cuda"):
        model = _mlp(np.float64, ["tanh"], sizes=(3, 2)).to(device)
        step = model.compile("mse", fp.optim.Adam(model.parameters(), lr=0.1))
        with fp.use_backend("numpy"):
            for _ in range(2):
                step(X, y)
            preds.append((model.predict(X), model.evaluate(X, y)))  # no explicit sync
    close(preds[1][0], preds[0][0], F64, factor=100)
    close(preds[1][1], preds[0][1], F64, factor=100)


def test_predict_and_evaluate_keep_a_dense_chain_on_the_device(rng, monkeypatch):
    """predict/evaluate of a ``.to("cuda")`` dense chain upload each weight once per
    call and only the batches after (the host contract uploaded every weight and
    brought every activation back, per layer and batch); the results are the CPU's,
    over batches with a smaller last one; a model that is not a dense chain, and an X
    of the wrong width, take the layer path (which refuses the width in its words)."""
    X = randn(rng, (11, 5), F64)
    labels = rng.integers(0, 3, 11)
    uploads = []
    real = cu._dev
    monkeypatch.setattr(cu, "_dev", lambda a: uploads.append(a.shape) or real(a))
    results = []
    for device in ("cpu", "cuda"):
        model = fp.nn.Sequential(fp.nn.Dense(5, 7, activation="gelu", dtype=F64),
                                 fp.nn.Dropout(0.0), fp.nn.Dense(7, 4, dtype=F64),
                                 fp.nn.Tanh(), fp.nn.Dense(4, 3, dtype=F64), fp.nn.Softmax(),
                                 fp.nn.Identity())
        model.load_state_dict(results[0][2] if results else model.state_dict())
        model.to(device)
        shapes = {p.shape for p in model.parameters()}  # (no batch has one of these)
        uploads.clear()
        pred = model.predict(X, batch_size=5)  # (batches of 5 and 6 rows)
        n_pred = (sum(s in shapes for s in uploads), len(uploads))
        uploads.clear()
        ev = model.evaluate(X, np.eye(3)[labels], loss="mse", batch_size=5)
        n_eval = sum(s in shapes for s in uploads)
        results.append((pred, ev, model.state_dict(), n_pred, n_eval))
    close(results[1][0], results[0][0], F64, factor=100)
    close(results[1][1], results[0][1], F64, factor=100)
    # 3 weights and 3 biases, once each (the batches go into buffers made once)
    assert results[1][3] == (6, 6) and results[1][4] == 6, results[1][3:]
    bn = fp.nn.Sequential(fp.nn.Dense(5, 3, dtype=F64), fp.nn.BatchNorm1d(3, dtype=F64))
    want = bn.predict(X)
    close(bn.to("cuda").predict(X), want, F64, factor=100)
    with pytest.raises(ValueError, match="5"):
        model.predict(X[:, :4])


def test_save_and_optimizer_state_after_compiled_device_steps(rng):
    """fp.save and the optimizer's state_dict between compiled device steps hold the
    trained values and moments (fp.save wrote the first weights; the optimizer's
    state was empty with step 3); the optimizer still pickles."""
    import io
    import pickle
    X, y = randn(rng, (4, 3), F64), randn(rng, (4, 2), F64)
    model = _mlp(np.float64, ["tanh"], sizes=(3, 2)).to("cuda")
    start = [p.value.copy() for p in model.parameters()]
    opt = fp.optim.Adam(model.parameters(), lr=0.1)
    step = model.compile("mse", opt)
    with fp.use_backend("numpy"):
        for _ in range(3):
            step(X, y)
        buf = io.BytesIO()
        fp.save(model, buf)
        sd = opt.state_dict()
    buf.seek(0)
    back = fp.load(buf)
    for p, q, s in zip(model.parameters(), back.parameters(), start):
        np.testing.assert_array_equal(q.value, p.value)
        assert not np.array_equal(q.value, s)
    assert sd["step"] == 3 and all(np.abs(s["exp_avg"]).max() > 0 for s in sd["state"])
    assert pickle.loads(pickle.dumps(opt)).state_dict()["step"] == 3


def test_optimizer_state_loaded_or_copied_between_device_steps(rng):
    """Between compiled device steps: a pickle or copy of the optimizer holds the
    moments (it held step 3 with none); a state loaded into it is what its state_dict
    returns (the device's moments were synced over it) and what the next step uses,
    also when the model's state is loaded after it (that load synced over it too): the
    step then equals a CPU step from the same states."""
    import copy
    import pickle
    X, y = randn(rng, (4, 3), F64), randn(rng, (4, 2), F64)
    model = _mlp(np.float64, ["tanh"], sizes=(3, 2)).to("cuda")
    opt = fp.optim.Adam(model.parameters(), lr=0.1)
    step = model.compile("mse", opt)
    with fp.use_backend("numpy"):
        step(X, y)
        step(X, y)
        for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
            assert clone.step_count == 2 and all("exp_avg" in st for st in clone.state)
        sd1, msd1 = opt.state_dict(), model.state_dict()
        step(X, y)
        step(X, y)
        opt.load_state_dict(sd1)
        for got, want in zip(opt.state_dict()["state"], sd1["state"]):
            np.testing.assert_array_equal(got["exp_avg"], want["exp_avg"])
        model.load_state_dict(msd1)
        step(X, y)
        after = list(model.state_dict().values())
    cpu = _mlp(np.float64, ["tanh"], sizes=(3, 2))
    cpu.load_state_dict(msd1)
    copt = fp.optim.Adam(cpu.parameters(), lr=0.1)
    copt.load_state_dict(sd1)
    with fp.use_backend("numpy"):
        cpu.compile("mse", copt)(X, y)
    for got, want in zip(after, cpu.state_dict().values()):
        close(got, want, F64, factor=100)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's NumPy sees inf * 0
def test_nonfinite_step_raises_before_update(rng):
    X, y = randn(rng, (4, 3), F64), randn(rng, (4, 2), F64)
    model = _mlp(np.float64, [None], sizes=(3, 2)).to("cuda")
    model[0].weight.value[0, 0] = np.inf
    before = [p.value.copy() for p in model.parameters()]
    opt = fp.optim.Adam(model.parameters())
    step = model.compile("mse", opt)
    step.check_finite = True
    with pytest.raises(fp.NonFiniteError):
        step(X, y)
    step.sync()
    assert opt.step_count == 0
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.value, b)


def test_make_train_step_declines_what_it_cannot_run():
    class MySGD(fp.optim.SGD):
        pass

    model = _mlp(np.float64, [None], sizes=(3, 2))
    stages = fp.train.dense_stages(model)
    assert cu.make_train_step(stages, fp.losses.MSE(), MySGD(model.parameters(), lr=0.1)) is None
    bce = fp.losses.BinaryCrossEntropy()     # probabilities from an unbounded output
    assert cu.make_train_step(stages, bce, fp.optim.SGD(model.parameters(), lr=0.1)) is None
    step = cu.make_train_step(stages, fp.losses.MSE(), fp.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(step, cu.DeviceTrainStep)


def test_python_path_on_cuda_matches_numpy(rng):
    """A model the device step cannot run (a LayerNorm in the chain) falls back to the
    layers' own forward/backward, which run on the cuda host kernels."""
    X, y = randn(rng, (4, 3), F64), rng.integers(0, 2, 4)
    results = []
    for device in ("cpu", "cuda"):
        model = fp.nn.Sequential(fp.nn.Dense(3, 4, dtype=np.float64, rng=1), fp.nn.ReLU(),
                                 fp.nn.LayerNorm(4, dtype=np.float64),
                                 fp.nn.Dense(4, 2, dtype=np.float64, rng=2)).to(device)
        step = model.compile("cross_entropy", fp.optim.SGD(model.parameters(), lr=0.1))
        with fp.use_backend("numpy"):
            losses = [step(X, y) for _ in range(2)]
        assert step._fast is None
        results.append((losses, [p.value for p in model.parameters()]))
    close(results[1][0], results[0][0], F64, factor=100)
    for a, b in zip(results[1][1], results[0][1]):
        close(a, b, F64, factor=100)


def test_fit_resumed_from_a_checkpoint_on_cuda(rng, tmp_path):
    """fit(checkpoint=, resume=True) on a device model whose compiled device step is
    already running with other parameters: the restored host state reaches the device,
    and the run ends where an uninterrupted 3-epoch run does."""
    X, y = randn(rng, (12, 3), F64), rng.integers(0, 2, 12)
    ends = []
    for resumed in (False, True):
        model = _mlp(np.float64, ["tanh"], sizes=(3, 4, 2)).to("cuda")
        opt = fp.optim.Adam(model.parameters(), lr=0.05)
        loss = fp.losses.SoftmaxCrossEntropy()  # one loss object: fit reuses the step
        kw = dict(loss=loss, optimizer=opt, batch_size=4, verbose=0)
        path = tmp_path / "run.ckpt"
        if resumed:
            model.fit(X, y, epochs=1, seed=3, checkpoint=path, **kw)
            model.fit(X, y, epochs=2, seed=99, **kw)  # the device moves on
        hist = model.fit(X, y, epochs=3, seed=3, checkpoint=path, resume=resumed, **kw)
        assert hist.epoch == [0, 1, 2]
        ends.append([p.value.copy() for p in model.parameters()])
    for a, b in zip(*ends):
        close(a, b, F64, factor=10)


def _sgd_step_on(device):
    """A 3-4-2 float64 model on ``device`` and its compiled SGD step."""
    model = _mlp(np.float64, ["tanh", None], sizes=(3, 4, 2)).to(device)
    return model, model.compile("mse", fp.optim.SGD(model.parameters(), lr=0.1))


def test_assigning_a_value_and_freezing_between_device_steps(rng):
    """Device steps, then `layer.weight.value = pretrained` and a freeze: the device's
    steps reach the other parameters (synced before the kernel is dropped) and the
    assigned value stays (the device's copy used to be written over it); the same on
    the CPU backend."""
    X, y = randn(rng, (4, 3), F64), randn(rng, (4, 2), F64)
    results = []
    for device in ("cpu", "cuda"):
        model, step = _sgd_step_on(device)
        with fp.use_backend("numpy"):
            for _ in range(3):
                step(X, y)
            model[0].weight.value = np.full((3, 4), 7.0)
            model[0].requires_grad_(False)
            step(X, y)
            step.sync()
        np.testing.assert_array_equal(model[0].weight.value, 7.0)
        results.append([p.value.copy() for p in model.parameters()])
    for a, b in zip(*results):
        close(b, a, F64, factor=100)


def test_unfrozen_layer_counts_its_own_steps_on_the_device(rng):
    """Adam after a freeze and unfreeze: the device step (one step count for every
    parameter) hands the steps to the layer path while the unfrozen layer's own
    count lags, so its bias corrections are those of its own steps, as on the CPU."""
    X, y = randn(rng, (4, 3), F64), randn(rng, (4, 2), F64)
    results = []
    for device in ("cpu", "cuda"):
        model = _mlp(np.float64, ["tanh", None], sizes=(3, 4, 2)).to(device)
        opt = fp.optim.Adam(model.parameters(), lr=0.05)
        step = model.compile("mse", opt)
        with fp.use_backend("numpy"):
            step(X, y)
            model[0].requires_grad_(False)
            for _ in range(2):
                step(X, y)
            model[0].requires_grad_(True)
            for _ in range(3):
                step(X, y)
            step.sync()
        assert opt.state_dict()["steps"] == [4, 4, 6, 6]
        results.append([p.value.copy() for p in model.parameters()])
    for a, b in zip(*results):
        close(b, a, F64, factor=100)


@pytest.mark.parametrize("change", ["lags", "decay", "groups"])
def test_device_steps_handed_to_the_layer_path_are_synced_first(change, rng):
    """After device steps, a change the device kernel cannot run (per-parameter step
    counts that differ, from a state_dict; a weight decay on one group only; groups
    with different lrs) hands the next steps to the layer path: what the device
    trained reaches the host arrays first (it was lost: the layer path trained the
    stale host values, and a later sync wrote the device's over them)."""
    X, y = randn(rng, (4, 3), F64), randn(rng, (4, 2), F64)
    results = []
    for device in ("cpu", "cuda"):
        model = _mlp(np.float64, ["tanh", None], sizes=(3, 4, 2)).to(device)
        opt = fp.optim.Adam([{"params": [model[0].weight, model[1].weight]},
                             {"params": [model[0].bias, model[1].bias]}], lr=0.05)
        step = model.compile("mse", opt)
        with fp.use_backend("numpy"):
            for _ in range(3):
                step(X, y)
            if change == "lags":
                sd = opt.state_dict()
                sd["steps"] = [1, 3, 1, 3]
                opt.load_state_dict(sd)
            elif change == "decay":
                opt.param_groups[0]["weight_decay"] = 0.1
            else:
                opt.param_groups[1]["lr"] = 0.01
            losses = [step(X, y) for _ in range(3)]
            step.sync()
        results.append((losses, [p.value.copy() for p in model.parameters()]))
    close(results[1][0], results[0][0], F64, factor=100)
    for a, b in zip(results[0][1], results[1][1]):
        close(b, a, F64, factor=100)


def test_state_dict_and_load_state_dict_between_device_steps(rng):
    """state_dict() after compiled device steps holds the trained values (synced), and
    a load_state_dict between steps is what the next device step trains from: the same
    as on the CPU backend."""
    X, y = randn(rng, (4, 3), F64), randn(rng, (4, 2), F64)
    results = []
    for device in ("cpu", "cuda"):
        model, step = _sgd_step_on(device)
        with fp.use_backend("numpy"):
            step(X, y)
            kept = model.state_dict()
            for _ in range(2):
                step(X, y)
            model.load_state_dict(kept)
            step(X, y)
            results.append((kept, model.state_dict()))
    for name in results[0][0]:
        close(results[1][0][name], results[0][0][name], F64, factor=100)
        close(results[1][1][name], results[0][1][name], F64, factor=100)


def test_one_optimizer_shared_by_two_device_steps(rng):
    """Two compiled device steps of one model and one optimizer (two losses), used in
    turn: each starts from the other's trained values and moments (the second used to
    upload host arrays the first had not synced, and trained from stale values); the
    same as on the CPU backend."""
    X, y = randn(rng, (4, 3), F64), randn(rng, (4, 2), F64)
    results = []
    for device in ("cpu", "cuda"):
        model = _mlp(np.float64, ["tanh", None], sizes=(3, 4, 2)).to(device)
        opt = fp.optim.Adam(model.parameters(), lr=0.05)
        mse, huber = model.compile("mse", opt), model.compile(fp.losses.MSE(), opt)
        with fp.use_backend("numpy"):
            losses = [mse(X, y), huber(X, y), mse(X, y), huber(X, y)]
            mse.sync()
            huber.sync()
        results.append((losses, model.state_dict(), opt.state_dict()))
    close(np.array(results[1][0]), np.array(results[0][0]), F64, factor=100)
    for name in results[0][1]:
        close(results[1][1][name], results[0][1][name], F64, factor=100)
    for s_gpu, s_cpu in zip(results[1][2]["state"], results[0][2]["state"]):
        for k in s_cpu:
            close(s_gpu[k], s_cpu[k], F64, factor=100)
    assert results[1][2]["step"] == results[0][2]["step"] == 4


def _device_step_in_child(step, X, y, conn):
    try:
        model = step.model
        before = [p.value.copy() for p in model.parameters()]
        try:
            step(X, y)
        except fp.BackendUnavailableError as exc:
            refused = str(exc)
        else:
            refused = None
        unchanged = all(np.array_equal(a, p.value) for a, p in zip(before, model.parameters()))
        try:
            fp.ops.matmul(X, X.T)
            with fp.use_backend("cuda"):
                fp.ops.matmul(X, X.T)
        except fp.BackendUnavailableError:
            ops_refused = True
        else:
            ops_refused = False
        model.to("cpu")
        with fp.use_backend("numpy"):
            conn.send(("ok", refused, unchanged, ops_refused, float(step(X, y))))
    except Exception as exc:  # (reported to the parent)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_fork_child_refuses_the_gpu_and_goes_on_from_the_device_steps_values(rng):
    """CUDA does not survive a fork: the child of a process that used the backend gets
    BackendUnavailableError naming spawn (state unchanged), while the parent synced
    its device step before the fork, so the child's model.to("cpu") goes on from the
    device's values (dropping them lost the parent's updates and moments): its next
    loss is the parent's next one on the same CPU backend."""
    X, y = randn(rng, (4, 3), F64), randn(rng, (4, 2), F64)
    model = _mlp(np.float64, ["tanh", None], sizes=(3, 4, 2)).to("cuda")
    step = model.compile("mse", fp.optim.Adam(model.parameters(), lr=0.05))
    step(X, y)
    step(X, y)
    result = in_fork_child(_device_step_in_child, step, X, y, timeout=120)
    assert result[0] == "ok", result
    _, refused, unchanged, ops_refused, value = result
    assert refused is not None and "fork" in refused and "spawn" in refused, refused
    assert unchanged and ops_refused
    model.to("cpu")
    with fp.use_backend("numpy"):
        expected = float(step(X, y))
    assert value == expected, (value, expected)
    model.to("cuda")  # (the parent keeps the GPU)
    assert np.isfinite(step(X, y))
