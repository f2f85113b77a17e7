"""Configuration: the thread count (per Python thread, as OpenMP's) and the
configuration report."""

from __future__ import annotations

import platform
import sys

import numpy as np

from . import backends
from ._checks import integer


def _native():
    try:
        return backends.load("native")
    except (backends.BackendUnavailableError, ImportError):
        return None


def set_num_threads(n: int) -> None:
    """Threads used by the native kernels (OpenMP); n >= 1.

    Like ``omp_set_num_threads`` (and threadpoolctl) this applies to the calling
    Python thread; other threads start from ``OMP_NUM_THREADS`` (or every core).
    """
    n = integer(n, "n", low=1)
    native = _native()
    if native is not None:
        native.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the native kernels use (1 if the native backend is unavailable)."""
    native = _native()
    return native.get_num_threads() if native is not None else 1


def config() -> dict:
    from . import __version__
    info = {
        "fastprop": __version__,
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "numpy": np.__version__,
    }
    try:
        info["backend"] = backends.get_backend()
    except Exception as exc:  # e.g. FASTPROP_BACKEND=cuda without a GPU: say so, go on
        info["backend"] = f"unavailable ({type(exc).__name__}: {exc})"
    try:
        native = backends.load("native")
    except (backends.BackendUnavailableError, ImportError) as exc:
        native = None
        info["native"] = f"not available ({exc})"
    else:
        for k, v in native.config().items():
            info[f"native.{k}"] = v
    try:
        from .backends import cuda_support
        info["cuda"] = cuda_support.availability()
    except ImportError:
        info["cuda"] = "not built in"
    return info


def show_config() -> None:
    """Print version, backend, detected CPU features, chosen ISA and threads."""
    info = config()
    width = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk}={vv}" for kk, vv in v.items())
        print(f"{k:<{width}}  {v}")
