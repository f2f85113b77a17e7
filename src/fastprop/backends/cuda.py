"""The Numba CUDA backend (not implemented yet)."""

from . import BackendUnavailableError

name = "cuda"


def ensure_available():
    raise BackendUnavailableError("the cuda backend is not implemented in this build")
