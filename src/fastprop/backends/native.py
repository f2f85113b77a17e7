"""The native backend: C++ kernels through Cython (:mod:`fastprop._native`).

Implements the kernel contract of :mod:`fastprop.backends`.  The kernels are
compiled once per instruction set (a baseline x86-64-v2 / generic unit, an AVX2+FMA
unit and an AVX-512 unit); one set is chosen at import by CPU detection, and the
environment variable ``FASTPROP_ISA=generic`` (or ``avx2``) forces a lower one.  Threads: OpenMP,
controlled by :func:`set_num_threads` (or ``OMP_NUM_THREADS``, or threadpoolctl).
"""

from __future__ import annotations

from .. import _native
from . import backoff_env
from .._native import (  # noqa: F401  (re-exported: the kernel contract)
    activation_backward,
    activation_forward,
    adagrad_update,
    adam_update,
    batchnorm_backward,
    batchnorm_forward,
    batchnorm_forward_eval,
    batchnorm_forward_train,
    batchnorm_running_update,
    bce,
    clip_,
    clip_grad_norm_,
    gemm,
    get_num_threads,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    mse,
    rmsprop_update,
    scale_,
    set_num_threads,
    sgd_update,
    softmax_xent,
    sum_squares,
)

# Not part of the kernel contract: fastprop.ops.matmul's one-call path on this backend
# (it checks its arguments and allocates its output itself, returning None for any
# call it does not take, which the Python layer then handles).
from .._native import matmul_fast  # noqa: F401

name = "native"


def make_train_step(stages, loss, optimizer):
    """The whole training step in one C++ call (csrc/train_step.cpp), or None."""
    from .. import losses, optim
    from . import ACTIVATIONS
    # (exact types: a user's subclass may compute something else; it takes the layer
    # path, which calls its own methods)
    if type(loss) is losses.SoftmaxCrossEntropy:
        loss_kind = 0
    elif type(loss) is losses.MSE:
        loss_kind = 1
    elif type(loss) is losses.BinaryCrossEntropy:
        # probabilities must lie in [0, 1]: only a sigmoid/softmax output guarantees it
        if not loss.from_logits and stages[-1].act not in (ACTIVATIONS["sigmoid"],
                                                           ACTIVATIONS["softmax"]):
            return None
        loss_kind = 2
    else:
        return None
    kinds = {optim.SGD: 0, optim.Adam: 1, optim.AdamW: 1, optim.RMSprop: 2, optim.Adagrad: 3}
    opt_kind = kinds.get(type(optimizer))
    if opt_kind is None:
        return None
    return _native.NativeTrainStep(stages, loss, optimizer, loss_kind, opt_kind)


def _backoff_state() -> str:
    state = _native.backoff_state()
    if state == "off":
        value, off = backoff_env()
        return f"off (FASTPROP_BACKOFF={value})" if off else "off (set_backoff(False))"
    return {"on": "on",
            "pinned": "on, this process' own threads (it is pinned to some CPUs)"}[state]


def config() -> dict:
    """What ``fastprop.show_config()`` prints for this backend."""
    info = {
        "isa": _native.isa(),
        "available_isas": _native.available_isas(),
        "isa_requested": _native.isa_requested() or "auto",
        "cpu_features": _native.cpu_features(),
        "num_threads": _native.get_num_threads(),
        "openmp": _native.openmp(),
        # (fewer threads while other processes keep the cores busy; FASTPROP_BACKOFF=0)
        "backoff": _backoff_state(),
    }
    if not _native.threads_usable():
        info["num_threads"] = (f"1 (serial: a fork child of a process whose OpenMP pool "
                               f"had started, or that had other threads)")
    note = _native.isa_note()
    if note:
        info["isa_note"] = note
    info.update(_native.build_info())
    return info
