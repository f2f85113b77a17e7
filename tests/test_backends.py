"""Backend selection: set_backend / get_backend / use_backend, FASTPROP_BACKEND,
unavailable backends, configuration report, and agreement between backends."""

import os
import pathlib
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import fastprop as fp
from fastprop import backends, nn, optim
from conftest import NATIVE_BUILT

# the directory holding the fastprop this process imported (src/ for an editable
# install, site-packages for a normal one: src/ has no built extension there)
SRC = str(pathlib.Path(fp.__file__).resolve().parents[1])
AVAILABLE = ["native", "numpy"] if NATIVE_BUILT else ["numpy"]


def _cuda_available():
    try:
        backends.load("cuda")
    except fp.BackendUnavailableError:
        return False
    return True


def _run(code, env_backend=None):
    env = dict(os.environ)
    env.pop("FASTPROP_BACKEND", None)
    if env_backend is not None:
        env["FASTPROP_BACKEND"] = env_backend
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    return proc


def _marker(proc):
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result; stdout={proc.stdout!r} stderr={proc.stderr[-2000:]!r}"
    return lines[-1][len("RESULT "):]


PROBE = ("import numpy as np, fastprop as fp\n"
         "fp.ops.matmul(np.ones((2, 2)), np.ones((2, 2)))\n"
         "print('RESULT', fp.get_backend(), fp.backends.current().name)\n")


def test_default_backend_in_fresh_process():
    proc = _run(PROBE)
    expected = "native" if NATIVE_BUILT else "numpy"
    assert _marker(proc) == f"{expected} {expected}"


@pytest.mark.parametrize("value", ["numpy", " NumPy "])
def test_env_var_selects_numpy(value):
    assert _marker(_run(PROBE, value)) == "numpy numpy"


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
def test_env_var_selects_native():
    assert _marker(_run(PROBE, "native")) == "native native"


def test_env_var_unknown_or_unavailable_backend_raises_clearly():
    code = ("import fastprop as fp\n"
            "try:\n"
            "    fp.get_backend()\n"
            "except Exception as e:\n"
            "    print('RESULT', type(e).__name__, '|', e)\n"
            "else:\n"
            "    print('RESULT', 'ok')\n")
    out = _marker(_run(code, "bogus"))
    assert out.startswith("ValueError |") and "bogus" in out and "FASTPROP_BACKEND" in out
    if not _cuda_available():
        out = _marker(_run(code, "cuda"))
        assert out.startswith("BackendUnavailableError |") and "cuda" in out


def test_set_and_get_backend(backend):
    for name in AVAILABLE:
        fp.set_backend(name)
        assert fp.get_backend() == name
        assert backends.current().name == name
        assert backends.current() is backends.load(name)  # cached module


def test_use_backend_restores_on_exit_and_on_error(monkeypatch):
    fp.set_backend("numpy")
    # a stand-in second backend, so that the test means something without native
    monkeypatch.setitem(backends._loaded, "cuda", types.SimpleNamespace(name="stub"))
    other = "cuda"
    with fp.use_backend(other) as mod:
        assert mod.name == "stub" and fp.get_backend() == "stub"
        with fp.use_backend("numpy"):
            assert fp.get_backend() == "numpy"
        assert fp.get_backend() == "stub"
    assert fp.get_backend() == "numpy"
    with pytest.raises(KeyError):
        with fp.use_backend(other):
            raise KeyError("boom")
    assert fp.get_backend() == "numpy"
    with pytest.raises(ValueError):
        with fp.use_backend("nope"):
            pass  # pragma: no cover
    assert fp.get_backend() == "numpy"


def test_use_backend_is_per_thread(monkeypatch):
    monkeypatch.setitem(backends._loaded, "cuda", types.SimpleNamespace(name="stub"))
    fp.set_backend("cuda")  # process-wide default: the stub
    seen = []
    with fp.use_backend("numpy"):
        t = threading.Thread(target=lambda: seen.append(fp.get_backend()))
        t.start()
        t.join()
        assert fp.get_backend() == "numpy"
    assert seen == ["stub"]
    assert fp.get_backend() == "stub"


_NO_CUDA = """
import numpy as np, pytest, fastprop as fp
from fastprop import backends, nn
try:
    backends.load("cuda")
except fp.BackendUnavailableError:
    pass
else:
    print("RESULT gpu")
    raise SystemExit
fp.set_backend("numpy")
assert issubclass(fp.BackendUnavailableError, RuntimeError)
with pytest.raises(fp.BackendUnavailableError, match="cuda") as info:
    fp.set_backend("cuda")
assert len(str(info.value)) > len("cuda") + 10  # says why
with pytest.raises(fp.BackendUnavailableError, match="cuda"):
    with fp.use_backend("cuda"):
        pass
with pytest.raises(fp.BackendUnavailableError, match="cuda"):
    nn.Dense(2, 2).to("cuda")
assert fp.get_backend() == "numpy"
print("RESULT ok")
"""


def test_cuda_unavailable_raises_backend_unavailable_error():
    """In a fresh process without the CUDA simulator (tests/test_cuda.py turns it on
    in this one when it is collected, which made this test skip every time)."""
    env_sim = os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    try:
        out = _marker(_run(_NO_CUDA))
    finally:
        if env_sim is not None:
            os.environ["NUMBA_ENABLE_CUDASIM"] = env_sim
    if out == "gpu":
        pytest.skip("a CUDA device is available here")
    assert out == "ok"


@pytest.mark.skipif(NATIVE_BUILT, reason="fastprop._native is built")
def test_native_unavailable_raises_backend_unavailable_error():
    with pytest.raises(fp.BackendUnavailableError, match="native"):
        fp.set_backend("native")


def test_show_config_and_threads(capsys):
    fp.set_backend("numpy")
    fp.show_config()
    out = capsys.readouterr().out
    assert "fastprop" in out and fp.__version__ in out
    assert any(line.split()[:2] == ["backend", "numpy"] for line in out.splitlines())
    assert fp.get_num_threads() >= 1
    if NATIVE_BUILT:
        assert "native" in out
        old = fp.get_num_threads()
        try:
            fp.set_num_threads(1)
            assert fp.get_num_threads() == 1
        finally:
            fp.set_num_threads(old)


@pytest.mark.skipif(not NATIVE_BUILT, reason="needs two backends")
@pytest.mark.parametrize("opt", ["sgd", "adam", "rmsprop", "adagrad", "adamw"])
def test_backends_train_alike(opt):
    """A few training steps give the same parameters on every backend (float64)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5))
    y = rng.integers(0, 3, 40)
    results = {}
    for name in AVAILABLE:
        with fp.use_backend(name):
            model = nn.Sequential(nn.Dense(5, 7, "gelu", rng=0, dtype=np.float64),
                                  nn.LayerNorm(7, dtype=np.float64),
                                  nn.Dense(7, 7, "tanh", rng=1, dtype=np.float64),
                                  nn.Dense(7, 3, rng=2, dtype=np.float64))
            model.fit(X, y, loss="cross_entropy", optimizer=optim.get(opt, model.parameters()),
                      epochs=3, batch_size=8, seed=0, verbose=0)
            results[name] = [p.value for p in model.parameters()]
    for a, b in zip(results["native"], results["numpy"]):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
def test_import_loads_the_native_runtime_so_threadpoolctl_limits_it_from_the_start():
    """``import fastprop`` loads the native module (it was loaded at the first kernel):
    a threadpoolctl limit set before any kernel ran reaches fastprop's OpenMP threads,
    and the fork handler is registered before any fork."""
    pytest.importorskip("threadpoolctl")
    code = ("import sys, fastprop as fp\n"
            "from threadpoolctl import threadpool_limits\n"
            "loaded = 'fastprop._native' in sys.modules\n"
            "with threadpool_limits(limits=1):\n"
            "    n = fp.get_num_threads()\n"
            "print('RESULT', loaded, n)\n")
    assert _marker(_run(code)) == "True 1"


@pytest.mark.skipif(not NATIVE_BUILT or not hasattr(os, "fork"), reason="native and fork")
def test_a_fork_after_another_librarys_openmp_pool_started_does_not_hang():
    """PyTorch's OpenMP pool (the same libgomp) started before fastprop's first kernel,
    then a fork: the child's kernel used to wait forever at its first barrier (the fork
    handler was registered only when the native module loaded, after the fork)."""
    pytest.importorskip("torch")
    code = ("import os, multiprocessing as mp\n"
            "os.environ['FASTPROP_BACKOFF'] = '0'\n"
            "import torch, numpy as np\n"
            "torch.ones(512, 512) @ torch.ones(512, 512)\n"
            "import fastprop as fp\n"
            "def work(_):\n"
            "    a = np.ones((600, 600), np.float32)\n"
            "    return float(fp.ops.matmul(a, a)[0, 0])\n"
            "with mp.get_context('fork').Pool(1) as pool:\n"
            "    r = pool.map_async(work, [0])\n"
            "    print('RESULT', r.get(timeout=60))\n")
    assert _marker(_run(code)) == "[600.0]"


def test_a_missing_native_backend_is_said_not_silent():
    """Without the native module (a broken build, a source tree shadowing the install)
    the numpy backend runs with a RuntimeWarning, and show_config says why."""
    code = ("import sys, warnings\n"
            "sys.modules['fastprop._native'] = None  # (its import fails)\n"
            "import fastprop as fp\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    name = fp.get_backend()\n"
            "info = fp._config.config()\n"
            "print('RESULT', name, [str(x.message)[:40] for x in w], info['native'][:17])\n")
    out = _marker(_run(code))
    assert out.startswith("numpy ['fastprop\\'s native backend is unavailable") or \
        out.startswith("numpy [\"fastprop's native backend is unavailable"), out
    assert out.endswith("'not available (b'") or "not available (" in out, out


def test_an_installed_numba_cuda_that_fails_to_import_is_named(tmp_path):
    """numba.cuda installed but not importable (numba-cuda without cuda-bindings, a
    NumPy numba does not support): the cuda backend's refusal gives that import error,
    not "numba-cuda is not installed" (reinstalling as that message says would not help)."""
    fake = tmp_path / "numba"
    (fake / "cuda").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cuda" / "__init__.py").write_text(
        "raise ImportError('CUDA bindings not found. Please pip install cuda-bindings')\n")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import fastprop as fp\n"
            "try:\n    fp.set_backend('cuda')\nexcept fp.BackendUnavailableError as e:\n"
            "    print('RESULT', e)\n" % str(tmp_path))
    out = _marker(_run(code))
    assert "is installed, but numba.cuda failed to import: " in out, out
    assert "Error: " in out and "not installed" not in out  # (the import's own error)
