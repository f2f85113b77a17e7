"""Can the ``cuda`` backend run here?  Answers without importing numba at fastprop
import time: numba is imported only when one of these functions is called.

``problem()`` is None when the backend is usable (a CUDA GPU, or the CUDA simulator
under ``NUMBA_ENABLE_CUDASIM=1``), else a sentence saying what is missing.
``availability()`` is the line ``fp.show_config()`` prints; it never raises.
"""

from __future__ import annotations

import importlib.util

# (the cuda extra's requirements by name: "fastprop" on PyPI is another project)
INSTALL_HINT = 'pip install "numba-cuda[cu12]>=0.30" (the cuda extra; Python 3.10+)'


_import_error: str | None = None  # (why an installed numba.cuda failed to import)


def _numba_cuda():
    """The ``numba.cuda`` module, or None when numba-cuda is not installed or does not
    import (``_import_error`` then says why: a missing cuda-bindings package, a NumPy
    numba does not support; reinstalling as the install hint says would not help)."""
    global _import_error
    if importlib.util.find_spec("numba") is None:
        return None
    try:
        from numba import cuda
    except ImportError as exc:
        _import_error = f"{type(exc).__name__}: {exc}"
        return None
    _import_error = None
    return cuda


def _installed_version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def is_simulator() -> bool:
    """Whether numba.cuda is the CUDA simulator (NUMBA_ENABLE_CUDASIM=1 at its import)."""
    try:
        from numba.cuda.core import config
    except ImportError:  # older numba: the configuration lives in numba itself
        try:
            from numba import config
        except ImportError:
            return False
    return bool(getattr(config, "ENABLE_CUDASIM", 0))


def problem() -> str | None:
    """None when the cuda backend can run, else why not (which part is missing)."""
    cuda = _numba_cuda()
    if cuda is None:
        if _import_error is not None:
            cuda_version = _installed_version("numba-cuda")
            numba_version = _installed_version("numba")
            what = (f"numba-cuda {cuda_version}" if cuda_version else
                    f"numba {numba_version}" if numba_version else "numba")
            return (f"{what} is installed, but numba.cuda failed to import: "
                    f"{_import_error} (the cuda extra's requirements are "
                    f"numba-cuda[cu12]>=0.30 and numba>=0.60, Python 3.10+)")
        return f"numba-cuda is not installed ({INSTALL_HINT})"
    if is_simulator():
        return None
    try:
        ok = cuda.is_available()
    except Exception as exc:  # pragma: no cover - depends on the driver
        return f"no CUDA GPU found (numba-cuda is installed; the CUDA driver failed: {exc})"
    if not ok:
        return "no CUDA GPU found (numba-cuda is installed, but no CUDA driver or GPU was detected)"
    return None


def availability() -> str:
    """One line for show_config(): "available (GPU name, compute capability x.y)",
    "simulator (NUMBA_ENABLE_CUDASIM=1)", or what is missing.  Never raises."""
    try:
        why = problem()
        if why is not None:
            return why
        if is_simulator():
            return "simulator (NUMBA_ENABLE_CUDASIM=1)"
        from numba import cuda
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        cc = ".".join(str(v) for v in dev.compute_capability)
        return f"available ({name}, compute capability {cc})"
    except Exception as exc:  # pragma: no cover - defensive: show_config must not fail
        return f"unknown ({type(exc).__name__}: {exc})"
