"""fastprop: neural-network layers with native kernels — backprop done right, fast.

NumPy arrays in, NumPy arrays out.  The hot kernels (GEMM, fused dense layers,
activations, losses, optimizer updates) run on the selected backend: ``native``
(C++ through Cython, the default), ``numpy`` (the pure-NumPy reference) or ``cuda``.

Example:
    >>> import numpy as np, fastprop as fp
    >>> model = fp.nn.Sequential(fp.nn.Dense(4, 16, "relu"), fp.nn.Dense(16, 3))
    >>> opt = fp.optim.Adam(model.parameters(), lr=1e-2)
    >>> history = model.fit(np.random.rand(64, 4), np.arange(64) % 3,
    ...                     loss="cross_entropy", optimizer=opt, epochs=2, verbose=0)
"""

from . import backends, init, losses, nn, ops, optim
from ._config import get_num_threads, set_num_threads, show_config
from .backends import get_backend, set_backend, use_backend, BackendUnavailableError
from .gradcheck import GradcheckError, gradcheck
from .nn import Parameter, Sequential
from .optim import clip_grad_norm, clip_grad_norm_, clip_grad_value, clip_grad_value_
from .serialization import load, save
from .train import EarlyStopping, History, LearningRateScheduler, NonFiniteError

__version__ = "0.1.0"


def _load_native_runtime():
    """The native module is loaded at import, not at the first kernel: its fork handler
    (a fork child of a process whose OpenMP pool had started runs serially, instead of
    waiting forever at its first barrier: PyTorch's pool shares the runtime) and the
    OpenMP runtime threadpoolctl limits are there from the start.  A broken build is
    reported when a kernel first needs it (or by fp.show_config())."""
    try:
        from . import _native
    except Exception:
        return
    import warnings
    note = _native.isa_note()
    if note.startswith("unknown"):  # (a mistyped FASTPROP_ISA: the ISA changes results)
        warnings.warn(note, RuntimeWarning, stacklevel=3)
    import os
    if "FASTPROP_BACKOFF" in os.environ and backends.backoff_env()[1] is None:
        warnings.warn(f"FASTPROP_BACKOFF={os.environ['FASTPROP_BACKOFF']!r} is not one of "
                      f"0/false/off/no or 1/true/on/yes: the back-off stays on",
                      RuntimeWarning, stacklevel=3)


_load_native_runtime()

__all__ = [
    "backends", "init", "losses", "nn", "ops", "optim",
    "get_num_threads", "set_num_threads", "show_config",
    "get_backend", "set_backend", "use_backend", "BackendUnavailableError",
    "gradcheck", "GradcheckError", "Parameter", "Sequential",
    "clip_grad_norm", "clip_grad_value", "clip_grad_norm_", "clip_grad_value_", "load", "save", "History", "EarlyStopping", "LearningRateScheduler",
    "NonFiniteError",
    "__version__",
]
