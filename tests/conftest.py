"""Shared fixtures: the available backends, dtypes, and backend-state isolation.

``backend`` runs a test once per backend.  "native" is skipped (not failed) only
while the extension ``fastprop._native`` cannot be imported; once it imports, a
native backend that fails to load is an error, so no test silently stops running
on it.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

if os.environ.get("FASTPROP_TESTS_NO_TORCH"):
    # (the sanitizer run: PyTorch's libraries under AddressSanitizer are not what it
    # checks; its comparisons skip, as without PyTorch installed)
    sys.modules["torch"] = None

import fastprop as fp
from fastprop import backends as _backends

NATIVE_BUILT = importlib.util.find_spec("fastprop._native") is not None
BACKEND_NAMES = ["native", "numpy"]

if NATIVE_BUILT:
    # The threaded kernels are tested threaded, however busy the machine: the
    # back-off (fewer threads while other processes keep the cores busy) would run
    # every "threaded size" test on one thread on a loaded CI runner, and a fault in
    # how the work is split between threads would pass unseen.  (Results do not
    # depend on it; the tests of the back-off itself turn it on.)
    from fastprop import _native as _native_module
    _native_module.set_backoff(False)


@pytest.fixture(params=BACKEND_NAMES)
def backend(request):
    """Name of the backend in effect for the test (selected with use_backend)."""
    name = request.param
    if name == "native" and not NATIVE_BUILT:
        pytest.skip("fastprop._native is not built")
    with fp.use_backend(name):
        yield name


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(autouse=True)
def _restore_backend_state():
    """Undo any set_backend/use_backend a test leaves behind; a test that leaves the
    thread count or the back-off changed fails (a benchmark helper left 1 thread, and
    every module after it ran its threaded sizes on one thread, unseen)."""
    default = _backends._default
    override = getattr(_backends._state, "backend", None)
    threads = fp.get_num_threads()
    backoff = _native_module.backoff() if NATIVE_BUILT else None
    yield
    _backends._default = default
    _backends._state.backend = override
    leaked = []
    if fp.get_num_threads() != threads:
        leaked.append(f"the thread count ({threads} -> {fp.get_num_threads()})")
        fp.set_num_threads(threads)
    if NATIVE_BUILT and _native_module.backoff() != backoff:
        leaked.append(f"the back-off ({backoff} -> {_native_module.backoff()})")
        _native_module.set_backoff(backoff)
    if leaked:
        pytest.fail(f"the test left {' and '.join(leaked)} changed")


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(params=["formulas", "torch"])
def peer(request):
    """For a test that checks against formulas and then against PyTorch: None (the
    formulas' checks only, always run), or torch's module (those and PyTorch's own
    results; skipped without torch, an optional peer)."""
    return pytest.importorskip("torch") if request.param == "torch" else None
