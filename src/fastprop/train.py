"""Training loop: ``fit``, ``predict``, ``evaluate`` and ``compile``.

``compile_step(model, loss, optimizer)`` returns a callable ``step(x, y) -> loss``
that runs the four steps of backpropagation — forward, loss, backward, update —
on one batch.  ``fit`` validates all of its inputs before the first step (a rejected
call leaves the model untouched), then runs mini-batch epochs with a tqdm progress
bar and returns a :class:`History`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os
import threading
import time
import weakref
from typing import NamedTuple

import numpy as np

from . import backends
from . import checkpoint as _checkpoint
from . import losses as _losses
from . import optim as _optim
from ._checks import (as_array, as_float, c_array, check_finite, finite_float, flag, integer, real,
                      warn_user as _warn_user)
from .backends import ACTIVATIONS, NonFiniteError
from . import lr_scheduler as _sched
from .lr_scheduler import _set_rates
from .nn import (Activation, BatchNorm1d, Dense, Dropout, Identity, Module, Parameter, Residual,
                 Sequential,
                 _LayerList, _check_each_module_once, _structure as _nn_structure,
                 inference_mode)
from .ops import softmax_targets

__all__ = ["History", "EarlyStopping", "LearningRateScheduler", "TrainStep", "DenseStage", "dense_stages", "NonFiniteError", "fit", "predict", "evaluate",
           "compile_step"]


class History:
    """Per-epoch metrics of a ``fit`` run, as Keras' History: ``history["loss"]``,
    ``["accuracy"]``, ``["val_loss"]``, ``["val_accuracy"]`` (the keys that apply; the
    dict itself is ``.history``), and the attributes ``epoch`` (the epoch numbers, from
    0), ``skipped_steps`` (batches whose non-finite step was skipped, with
    ``on_nonfinite="skip"``) and ``stopped_epoch`` (the epoch after which a callback
    stopped the fit, or None)."""

    stopped_epoch = None  # the epoch after which a callback stopped the fit (class
                          # default: a History pickled before callbacks has none)

    def __init__(self):
        self.history: dict = {}
        self.epoch: list = []
        self.skipped_steps = 0
        self.stopped_epoch = None

    def append(self, epoch: int, logs: dict) -> None:
        """Record ``epoch``'s figures (fit calls it after each epoch)."""
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)

    def __getitem__(self, key):
        return self.history[key]

    def __repr__(self):
        last = {k: round(v[-1], 6) for k, v in self.history.items() if v}
        return f"History(epochs={len(self.epoch)}, last={last})"


class DenseStage(NamedTuple):
    """One dense layer of a chain a backend can train in one call."""
    weight: Parameter
    bias: Parameter | None
    act: int
    alpha: float


def _as_built(layer) -> bool:
    """Whether ``layer`` computes what fastprop's own class of it does: its class keeps
    that class's forward and backward (a user's subclass that changes them is run as
    it is, layer by layer: a subclass of Dense was fused as a plain Dense, its own
    code ignored)."""
    cls = type(layer)
    base = next((c for c in cls.__mro__ if c.__module__ == Module.__module__), None)
    return base is not None and all(
        getattr(cls, name) is getattr(base, name) for name in ("forward", "backward"))


def dense_stages(model) -> list | None:
    """The model as a chain of dense stages (activation layers folded into the dense
    layer before them), or None when it holds any other kind of layer (or a layer
    whose class changes forward or backward)."""
    if not _as_built(model):
        return None
    layers = list(model.layers) if isinstance(model, Sequential) else [model]
    stages: list = []
    for layer in layers:
        if not _as_built(layer):
            return None
        if isinstance(layer, Sequential):
            inner = dense_stages(layer)
            if inner is None:
                return None
            stages.extend(inner)
        elif isinstance(layer, Dense):
            stages.append(DenseStage(layer.weight, layer.bias, layer.act, layer.alpha))
        elif (isinstance(layer, Activation) and stages and stages[-1].act == 0
              and getattr(layer, "dim", -1) in (-1, 1)):  # (a Softmax over the rows)
            stages[-1] = stages[-1]._replace(act=layer.act, alpha=layer.alpha)
        elif isinstance(layer, Identity) or (isinstance(layer, Dropout) and layer.p == 0):
            continue
        else:
            return None
    return stages or None


def _output_act(model):
    """The kernel code of the activation the model's output passes through last (a
    Dense layer's or an activation layer's; Dropout and Identity skipped), or None."""
    layer = model
    while isinstance(layer, Sequential):
        rest = [m for m in layer.layers
                if not isinstance(m, Dropout) and not (isinstance(m, Activation) and m.act == 0)]
        if not rest:
            return None
        layer = rest[-1]
    return layer.act if isinstance(layer, (Dense, Activation)) else None


def _warn_double_activation(model, loss):
    """A softmax (sigmoid) output trained with a loss that applies it itself: softmax
    twice trains, silently, towards the wrong optimum (a Keras model ported with its
    softmax output and "categorical_crossentropy", which takes logits here)."""
    act = _output_act(model)
    if isinstance(loss, _losses.SoftmaxCrossEntropy) and act == ACTIVATIONS["softmax"]:
        _warn_user(
            "the model ends in a softmax, and SoftmaxCrossEntropy (also named "
            "'cross_entropy' and 'categorical_crossentropy') applies softmax itself: it "
            "takes logits, as PyTorch's CrossEntropyLoss does. Remove the final softmax "
            "(the predicted classes stay the same) or softmax the outputs of predict.")
    if (isinstance(loss, _losses.BinaryCrossEntropy) and loss.from_logits
            and act == ACTIVATIONS["sigmoid"]):
        _warn_user(
            "the model ends in a sigmoid, and BinaryCrossEntropy(from_logits=True) applies "
            "sigmoid itself: remove the final sigmoid or use from_logits=False.")


def _warn_mixed_dtypes(model):
    """float32 and float64 layers in one model: the float64 ones' values are rounded
    at every float32 layer, silently (BatchNorm1d/LayerNorm/Dense default to float32,
    so a float64 model needs dtype= on each)."""
    first = {}
    for mod in model.modules():
        for attr in mod._params:
            p = getattr(mod, attr)
            if p is not None:
                first.setdefault(p.dtype, mod)
                break
    if len(first) > 1:
        names = ", ".join(f"{mod!r} is {dt}" for dt, mod in first.items())
        _warn_user(
            f"the model mixes float32 and float64 layers ({names}): values are rounded to "
            f"float32 at each float32 layer. Give every layer the same dtype= or call "
            f"model.astype(np.float64) (or np.float32) before making the optimizer.")


# Every live step: a child forked while another thread ran one gets free locks (the
# thread that held it does not exist there).
_STEPS: "weakref.WeakSet" = weakref.WeakSet()


def _sync_device_steps_before_fork():
    """A device kernel's values go to the host arrays (CUDA does not survive a fork)."""
    for step in list(_STEPS):
        before = getattr(step.__dict__.get("_fast"), "_before_fork", None)
        if before is not None:
            before()


def _free_locks_in_child():
    for step in list(_STEPS):
        step._busy = threading.Lock()
        step.__dict__.pop("_owner", None)
        # (the kernel object has its own busy flag, copied set from a parent thread
        # that was running it: its _after_fork clears it; one that cannot go on in
        # the child, a device kernel, says so by returning False)
        fast = step._fast
        if fast is not None:
            after = getattr(fast, "_after_fork", None)
            if after is None or after() is False:  # (None: another backend's kernel)
                step._fast = None
                step._fast_key = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_sync_device_steps_before_fork,
                        after_in_child=_free_locks_in_child)


def _shares_a_grad(x, params) -> bool:
    """Whether x is, or views, memory of a parameter's gradient (a view of another
    array is checked against each: ~0.2 us a parameter; an array owning its data
    only needs to not be one of them)."""
    if x.flags.owndata:
        return any(x is p._grad for p in params)
    return any(np.may_share_memory(x, p._grad) for p in params)


class TrainStep:
    """One training step on a batch: zero grads, forward, loss, backward, update.

    ``step(x, y)`` returns the batch loss; ``step.output`` is the batch's forward
    output, valid until the next call: the whole-step kernel writes each batch's
    output into the same buffer (no allocation per step), so copy it to keep it
    (``step.output.copy()``).  When the current backend can run the whole step in one call
    (``make_train_step`` in the kernel contract) it does; otherwise the layers'
    own forward/backward run from Python, with the same results.  With
    ``step.check_finite = True`` (an attribute, False by default; ``fit`` sets it
    for its run) the loss and the gradients are checked before the update; a
    non-finite one raises :class:`NonFiniteError`, and the parameters, optimizer
    state and buffers (BatchNorm running statistics) are as before the step.
    Without it, a step whose loss overflows applies its non-finite update.
    ``clip_grad_norm`` / ``clip_grad_value`` (attributes, None by default; also
    arguments of ``model.compile`` and ``fit``) clip the gradients of the
    optimizer's parameters before each update, as :func:`fastprop.clip_grad_norm`
    (global 2-norm) and :func:`fastprop.clip_grad_value` in a hand-written loop
    (both set: the values first); the native fused kernel clips the stored gradients
    itself before its update, a backend kernel that cannot (the CUDA one) leaves such
    steps to the layer path.
    """

    # (defaults for a step pickled by a version without these)
    _clip_norm = _clip_value = None
    _cache_slots = _cache_probes = ()
    _plain = _plain_at = ()
    _param_ids = None

    def __init__(self, model: Module, loss, optimizer, *, clip_grad_norm=None,
                 clip_grad_value=None):
        if not isinstance(model, Module):
            raise TypeError(f"model must be a fastprop Module, got {type(model).__name__}")
        _check_each_module_once(model, "compile")  # (.layers may have been edited)
        self.model = model
        if isinstance(loss, str) and loss.lower() in _optim._BY_NAME:
            raise ValueError(f"loss {loss!r} is an optimizer's name: compile takes the loss "
                             f"first, compile(loss, optimizer) (Keras' order is the other "
                             f"way round); or name them: compile(loss=..., optimizer=...)")
        if isinstance(loss, _optim.Optimizer) and isinstance(optimizer, (_losses.Loss, str)):
            raise TypeError(f"loss is an optimizer ({type(loss).__name__}): compile takes the "
                            f"loss first, compile(loss, optimizer) (Keras' order is the other "
                            f"way round); or name them: compile(loss=..., optimizer=...)")
        self.loss = _losses.get(loss)
        self.optimizer = _optim.get(optimizer, model.parameters())
        _warn_double_activation(model, self.loss)
        _warn_mixed_dtypes(model)
        params = {id(p) for p in model.parameters()}
        if params and not params & {id(p) for p in self.optimizer.params}:
            raise ValueError("optimizer does not hold any parameter of this model")
        self.output = None
        self.check_finite = False
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self._fast = None
        self._fast_key = None
        self._stages_key = None  # the layer chain the kernel was built for
        self._structure = -1     # nn._structure when that was last checked
        # (ids of the model's parameters when last checked: one replaced or added
        # since, which the optimizer does not hold, is warned about)
        self._param_ids = frozenset(id(p) for p in model.parameters())
        self._plain, self._plain_at = (), ()  # (Sequentials with plain layer lists)
        # (module __dict__, its cache names): dropped after a fused step that follows a
        # hand-run forward (the Dense layers' dicts, probed), as the layer path's
        # backward drops them
        self._cache_slots = self._cache_probes = ()
        self._kernel_labels = False
        self._mask_key = None    # the weight-decay mask array the kernel was bound with
        self._busy = threading.Lock()  # (a second thread's call is refused)
        _STEPS.add(self)  # (a fork child gets free locks)

    @property
    def clip_grad_norm(self):
        """``max_norm`` of the gradients' global 2-norm before each update, or None."""
        return self._clip_norm

    @clip_grad_norm.setter
    def clip_grad_norm(self, value):
        self._clip_norm = _clip_setting(value, "clip_grad_norm")
        self._keep_clips()

    @property
    def clip_grad_value(self):
        """Every gradient element clamped to [-value, value] before each update, or
        None."""
        return self._clip_value

    @clip_grad_value.setter
    def clip_grad_value(self, value):
        self._clip_value = _clip_setting(value, "clip_grad_value")
        self._keep_clips()

    def _keep_clips(self):
        """The model's record of its compiled step's clipping (for a fit after the step
        is gone) follows a change made on that step."""
        model = self.__dict__.get("model")
        if model is not None and model._compiled_step() is self:
            model._compile_clips = (self._clip_norm, self._clip_value)

    def _clip(self):
        """Clip the optimizer's gradients as set (before the update)."""
        params = self.optimizer.params
        if self._clip_value is not None:
            _optim.clip_grad_value(params, self._clip_value)
        if self._clip_norm is not None:
            _optim.clip_grad_norm(params, self._clip_norm)

    def __del__(self):
        # a step training on a device holds the newest values there: bring them to
        # the model's arrays before they go (the model may outlive its step)
        try:
            self.sync()
        except Exception:  # (interpreter shutdown, a half-built step)
            pass

    def __getstate__(self):
        """Pickled (and deep-copied) without the backend's kernel, which the next call
        rebuilds (a device step's values are brought to the host first)."""
        self.sync()
        state = dict(self.__dict__)
        state.update(_fast=None, _fast_key=None, _stages_key=None, _structure=-1,
                     _plain=(), _plain_at=(),
                     _mask_key=None, output=None, _cache_slots=(), _cache_probes=(),
                     _param_ids=None)  # (ids of this process' objects)
        state.pop("_busy", None)
        state.pop("_owner", None)
        state.pop("_walk", None)  # (keyed by this process's structure counter)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._busy = threading.Lock()
        _STEPS.add(self)
        # a step copied with its model (deepcopy or pickle of both) is again the
        # copy's compiled step: clipping set on it reaches the copy's fit
        model = state.get("model")
        args = getattr(model, "__dict__", {}).get("_compile_args")
        if (args is not None and args[0] is self.loss and args[1] is self.optimizer
                and model._compiled_step() is None):
            model._compiled = weakref.ref(self)

    def _refuse(self):
        """One call at a time (``_busy``, a lock): a second thread's call while one runs
        is refused on every path (the fused kernel's own guard covers only that path;
        two layer-path steps shared the layers' caches and gradients), and so is a
        call from inside the step (a loss or layer calling it).  Two threads that
        both find it free take turns."""
        if self.__dict__.get("_owner") == threading.get_ident():
            raise RuntimeError("this training step was called from inside itself (a "
                               "loss or layer of its model calling it)")
        raise RuntimeError("this training step is already running in another thread; "
                           "a model is trained from one thread at a time")

    def _fast_key_is_current(self, be) -> bool:
        """Same backend, loss, optimizer and parameter arrays as when the kernel was
        made (checked without allocating: this runs every step; ``step.loss`` or
        ``step.optimizer`` assigned since then trained with the old ones)."""
        key = self._fast_key
        if (key is None or key[0] is not be or key[2] is not self.loss
                or key[3] is not self.optimizer or len(key[1]) != len(self.optimizer.params)):
            return False
        for p, value in zip(self.optimizer.params, key[1]):
            if p.value is not value:
                return False
        return True

    def fused(self):
        """The backend's whole-step kernel for this model, or None (Python path)."""
        be = backends.current()
        plain = self._plain
        if self._structure != _nn_structure[0] or (plain and _plain_key(plain) != self._plain_at):
            # a layer, an activation, a Dropout rate or the layer list changed since
            # the last step (model.append(Sigmoid()), dropout.p = 0.5, a plain list
            # assigned to .layers and edited in place, ...): rebuild if the chain the
            # kernel runs is no longer the model's
            structure = _nn_structure[0]
            _check_each_module_once(self.model, "compile")  # (a layer may have been added)
            self._param_ids = _warn_untrained(self.model, self.optimizer, self._param_ids,
                                              "this compiled step")
            mods = list(self.model.modules())
            self._plain = _plain_lists(mods)
            self._plain_at = _plain_key(self._plain)
            self._cache_slots = _cache_slots(mods)
            self._cache_probes = [m.__dict__ for m in mods if isinstance(m, Dense)]
            stages = dense_stages(self.model)
            key = None if stages is None else (self.model.training, tuple(
                (id(st.weight), id(st.bias), st.act, st.alpha, st.weight.requires_grad,
                 st.bias is None or st.bias.requires_grad) for st in stages))
            if key != self._stages_key:
                if self._fast is not None:
                    # (a device kernel holds the parameters trained so far: bring them
                    # to the host arrays the layer path or the next kernel starts from)
                    self._fast.sync()
                self._stages_key = key
                self._fast_key = None
            # (last: a refused check is made again at the next call, which a model
            # holding a module twice once passed, training the old kernel's chain)
            self._structure = structure
        if not self._fast_key_is_current(be):
            if self._fast is not None:
                self._fast.sync()  # (a device kernel's steps: to the arrays it came from)
            self._fast_key = (be, [p.value for p in self.optimizer.params], self.loss,
                              self.optimizer)
            self._fast = None
            make = getattr(be, "make_train_step", None)
            stages = dense_stages(self.model) if make is not None else None
            if stages is not None:  # (arrays of other sizes assigned: refused, named, as
                for m in self.model.modules():  # the layer's own forward refuses them)
                    if isinstance(m, Dense):
                        m._check_params()
            if stages is not None and self.model.training:
                owned = [p for st in stages for p in (st.weight, st.bias) if p is not None]
                ids = {id(p) for p in owned}
                # (a parameter shared by two layers, tied weights, takes the Python
                # path: the kernel writes each layer's gradient over the other's)
                # (so does a frozen parameter: the kernel updates every one)
                if len(ids) == len(owned) and ids == {id(p) for p in self.optimizer.params} \
                        and len({p.dtype for p in owned}) == 1 \
                        and all(p.requires_grad for p in owned):
                    self._fast = make(stages, self.loss, self.optimizer)
                    self._shape = (stages[0].weight.shape[0], stages[-1].weight.shape[1])
                    # class ids whose range the kernel checks before it runs
                    self._kernel_labels = (type(self.loss) is _losses.SoftmaxCrossEntropy
                                           and getattr(self._fast, "checks_labels", False))
        return self._fast

    def _group_gate(self, fast):
        """The kernel when the optimizer's parameter groups allow one (they agree, or,
        on the native backend, differ only in weight decay, e.g. none on biases: a
        per-parameter mask, read when the kernel binds), else None (the layer path,
        group by group)."""
        opt = self.optimizer
        ok, mask = opt._fused_setup()  # (the same mask object while the groups' decays stay)
        if not ok or opt.hyper.get("amsgrad"):  # (no kernel takes AMSGrad's maximum)
            return self._layer_path(fast)
        if (opt._lag is not None and isinstance(opt, _optim.Adam)
                and backends.current().name != "native" and opt._lag.any()):
            # (the CUDA kernel takes one step count, hence one bias correction, for every
            # parameter; the others' updates do not depend on a parameter's count)
            return self._layer_path(fast)
        if mask is not self._mask_key:
            if mask is not None and backends.current().name != "native":
                return self._layer_path(fast)  # (the CUDA kernel has no decay mask)
            self._mask_key = mask
            opt._decay_mask = mask
            self._fast_key = None  # rebuild: the kernel reads the mask when it binds
            fast = self.fused()
        return fast

    @staticmethod
    def _layer_path(fast):
        """None (this step takes the layer path), after bringing what a device kernel
        trained so far to the host arrays the layer path trains."""
        if fast is not None:
            fast.sync()
        return None

    def sync(self):
        """Bring the parameters and optimizer state a device kernel trained to the
        host arrays (a no-op on the CPU backends, whose kernels train them in place)."""
        if self._fast is not None:
            self._fast.sync()

    def __call__(self, x, y) -> float:
        lock = self._busy
        if lock.locked():
            self._refuse()
        with lock:  # (no gap between taking it and the release a Ctrl-C could fall in)
            self._owner = threading.get_ident()
            with _on_device(self.model):
                return self._step(x, y)

    def _fit_batch(self, x, y) -> float:
        """A step on a batch of an X that fit validated whole (no NaN/inf check)."""
        lock = self._busy
        if lock.locked():
            self._refuse()
        with lock:
            self._owner = threading.get_ident()
            with _on_device(self.model):
                return self._step(x, y, x_checked=True)

    def _step(self, x, y, x_checked=False) -> float:
        x = as_array(x, "x")
        if x.ndim and x.shape[0] == 0:
            raise ValueError("x is empty: a training step needs at least one sample")
        fast = self.fused()
        if fast is not None:
            # (a loss option the fused kernels lack, e.g. class weights: the layer path;
            # clipping, which needs every gradient before any update, on a kernel that
            # cannot clip (the native one does: its `clips`): the layer path too)
            clipping = self._clip_norm is not None or self._clip_value is not None
            fast = (self._layer_path(fast) if self.loss._layer_only() or (
                clipping and not getattr(fast, "clips", False)) else self._group_gate(fast))
        if fast is not None:
            dtype = self.optimizer.params[0].dtype
            given = x
            if x.dtype == dtype:
                x = c_array(x)
            else:
                with np.errstate(over="ignore"):  # (beyond float32: inf, refused below)
                    x = c_array(x, dtype)
            if x.ndim != 2 or x.shape[1] != self._shape[0]:
                raise ValueError(f"x must have shape (batch, {self._shape[0]}), got {x.shape}")
            checks_x = getattr(fast, "checks_x", False)  # (the native kernel checks x)
            if not (x_checked or checks_x):
                check_finite(x, "x")
            if self._kernel_labels and not self.loss.label_smoothing:
                y = softmax_targets(y, (x.shape[0], self._shape[1]), dtype, check_range=False)
            else:
                y = self.loss.prepare_target(y, (x.shape[0], self._shape[1]), dtype)
            try:
                if clipping:  # (a kernel that clips: the native one)
                    value = fast(x, y, self.check_finite, not x_checked,
                                 self._clip_value or 0.0, self._clip_norm or 0.0)
                else:
                    value = (fast(x, y, self.check_finite, not x_checked) if checks_x
                             else fast(x, y, self.check_finite))
            except ValueError:  # (refused before it ran: the optimizer's own message,
                self.optimizer._precheck()  # naming the parameter, where it has one)
                if given is not x:  # (finite values beyond float32's range: said so)
                    finite_float(given, "x", dtype)
                raise
            self.output = fast.output
            # (a hand-run forward's caches, from the weights before this update: a
            # backward on them would mix the two, and they keep that batch alive; the
            # layer path drops them too)
            for d in self._cache_probes:  # (a hand forward ran through the Dense layers)
                if d.get("_x") is not None:
                    _drop_slots(self._cache_slots)
                    break
            return value
        model = self.model
        # Forward and loss run before the gradients are zeroed, so that bad input
        # leaves them as they were; buffers a training forward updates (BatchNorm
        # running statistics) are restored when the step fails (bad targets,
        # non-finite values).
        if not x_checked:  # NaN/inf in the batch is bad input, refused before anything
            dt = model.dtype  # (in the model's dtype: 1e39 in float64 is inf in float32)
            if dt is None:
                check_finite(x, "x")
            else:
                x = finite_float(x, "x", dt)
        # (a state of another dtype: refused before anything; checked once, the
        # update below runs on it)
        opt = self.optimizer
        checked = opt._precheck()
        buffered, drops, params, caches = self._layer_walk(model)
        if isinstance(x, np.ndarray) and _shares_a_grad(x, params):
            x = x.copy()  # (the layers keep x for backward, after the grads are zeroed)
        saved = [(b, b.copy()) for m in buffered for b in (getattr(m, a) for a in m._buffers)]
        # (and the Dropout generators: a refused step draws no masks, so that the
        # next step, and a seeded run, is as if it had not been called)
        draws = [(m.rng, m.rng.bit_generator.state) for m in drops
                 if isinstance(m.rng, np.random.Generator)]
        try:
            out = model.forward(x)
            if self.check_finite and saved and any(
                    b.dtype.kind == "f" and not np.isfinite(b).all() and np.isfinite(old).all()
                    for b, old in saved):
                # (finite activations of ~1e20 square to inf in a float32 running
                # variance: the model would keep it, and predict garbage; a buffer
                # that held inf before, a user's -inf mask, is the user's)
                raise NonFiniteError("a buffer (BatchNorm running statistics) became "
                                     "non-finite")
            value, grad = self.loss._value_and_grad(out, y)
            if self.check_finite:  # (a custom module may return a list: float64's range)
                backends.check_loss(value, getattr(out, "dtype", np.float64))
            self.output = out
            for p in params:  # (model.zero_grad())
                p._zero_grad(True)
            model.backward(grad, input_grad=False)
            if self.check_finite:
                grads = [p._grad for p in self.optimizer.params]
                # (the sum of squares overflows for finite gradients above ~1e154 in
                # float64: confirmed element by element before raising; one call per
                # dtype, as a kernel takes one)
                by_dtype: dict = {}
                for g in grads:
                    by_dtype.setdefault(g.dtype, []).append(g)
                be = backends.current()
                with np.errstate(over="ignore", invalid="ignore"):
                    norm2 = sum(be.sum_squares(gs) for gs in by_dtype.values())
                if not math.isfinite(norm2) and not all(np.isfinite(g).all() for g in grads):
                    raise NonFiniteError("non-finite gradient")
            if self._clip_norm is not None or self._clip_value is not None:
                self._clip()
            if type(opt).step is _optim.Optimizer.step:
                opt._apply(checked)
            else:  # (a subclass' own step)
                opt.step()
        except BaseException:
            for buf, old in saved:
                buf[...] = old
            for gen, state in draws:
                gen.bit_generator.state = state
            raise
        finally:
            _drop_slots(caches)  # (model._drop_caches(): backward has run, keep no batch alive)
        return value

    def _layer_walk(self, model):
        """(modules with buffers, Dropout modules, parameters, (module __dict__, cache
        names)) of the model, for the layer path; kept while nothing public changed on
        any module (``nn._structure``), when every module lists its children the way
        fastprop's do (a subclass' own ``children`` may change without telling).  The
        tree walks took ~10-20% of a step of a Residual or BatchNorm model."""
        walk = self.__dict__.get("_walk")
        if walk is not None and walk[0] == _nn_structure[0] and (
                not walk[2] or _plain_key(walk[2]) == walk[3]):
            return walk[1]
        structure = _nn_structure[0]
        mods = list(model.modules())
        plain = _plain_lists(mods)
        params = model.parameters()
        ids = {id(p) for p in params}
        # (and the optimizer's parameters the model no longer has, a layer's replaced
        # one: their gradients are zeroed to none, as opt.zero_grad() would, so the
        # update skips them instead of applying their last gradient again)
        params += [p for p in self.optimizer.params if id(p) not in ids]
        found = ([m for m in mods if m._buffers], [m for m in mods if isinstance(m, Dropout)],
                 params, _cache_slots(mods))
        if all(type(m).children in _STANDARD_CHILDREN for m in mods) \
                and all(type(m)._drop_caches is Module._drop_caches for m in mods):
            self._walk = (structure, found, plain, _plain_key(plain))
        else:
            self.__dict__.pop("_walk", None)
        return found


def _cache_slots(mods) -> list:
    """(module ``__dict__``, its cache names) for each of ``mods`` that keeps forward
    caches (what ``Module._drop_caches`` clears, found once)."""
    return [(m.__dict__, names) for m in mods if (names := tuple(m._kept_caches()))]


def _drop_slots(slots) -> None:
    for d, names in slots:
        for name in names:
            d[name] = None


def _plain_lists(mods) -> list:
    """The Sequentials among ``mods`` whose ``layers`` is a plain list (assigned by the
    user): edited in place, it does not bump ``nn._structure``."""
    return [m for m in mods if isinstance(m, Sequential) and type(m.layers) is not _LayerList]


def _plain_key(plain) -> tuple:
    """The layers those lists hold now (checked on every step where there are any)."""
    return tuple(id(layer) for seq in plain for layer in seq.layers)


# fastprop's own ways of listing a module's children (from registered attributes and
# a container's layers): what a cached walk of the module tree relies on
_STANDARD_CHILDREN = frozenset({Module.children, Sequential.children, Residual.children})


def _clip_setting(value, name):
    """None, or a clipping threshold > 0 (as the clip functions take)."""
    return None if value is None else real(value, name, low=0, low_inclusive=False)


def compile_step(model, loss, optimizer, *, clip_grad_norm=None,
                 clip_grad_value=None) -> TrainStep:
    """The training step of ``model`` with ``loss`` and ``optimizer`` (names allowed:
    ``loss="cross_entropy"``, ``optimizer="adam"``): a :class:`TrainStep`; set its
    ``check_finite = True`` to have a non-finite loss or gradient refused before the
    update (``fit`` does).  ``clip_grad_norm`` / ``clip_grad_value``: clip the
    gradients before each update (see :class:`TrainStep`; ``fit`` without its own
    clipping arguments keeps these)."""
    step = TrainStep(model, loss, optimizer, clip_grad_norm=clip_grad_norm,
                     clip_grad_value=clip_grad_value)
    _remember(model, step)
    return step


def _remember(model, step) -> None:
    """Keep ``step``'s loss and optimizer on the model (for ``fit`` without them) and
    the step itself weakly (no model-step cycle)."""
    model._compiled = weakref.ref(step)
    model._compile_args = (step.loss, step.optimizer)
    model._compile_clips = (step.clip_grad_norm, step.clip_grad_value)
    model._compiled_ids = frozenset(id(p) for p in model.parameters())
    model.__dict__.pop("_compiled_params", None)


def _named_as(name, loss) -> bool:
    """Whether the loss ``name`` makes is ``loss`` up to identity (same class and
    options), so that ``fit(loss="mse")`` after ``compile("mse", ...)`` is the compiled
    loss with its clipping."""
    named = _losses.get(name)
    if type(named) is not type(loss):
        return False
    a, b = named.get_config(), loss.get_config()
    plain = (bool, int, float, str, type(None))
    return a.keys() == b.keys() and all(
        isinstance(v, plain) and type(v) is type(b[k]) and v == b[k] for k, v in a.items())


def _compiled_ids(model):
    """The ids of the parameters the model had at its last compile (None: none), from
    a copy's or a pickle's parameter list the first time (kept as ids from then on,
    as they hold no parameter a replaced layer had)."""
    ids = model.__dict__.get("_compiled_ids")
    if ids is None and "_compiled_params" in model.__dict__:
        ids = model._compiled_ids = frozenset(id(p) for p in model._compiled_params)
        del model._compiled_params
    return ids


def _warn_untrained(model, optimizer, before, who="fit"):
    """Warn when the model gained trainable parameters that ``optimizer`` (the one of
    its last compile or fit) does not hold: a layer replaced or added since the model
    had the parameters ``before`` (ids; Keras refuses; here ``who`` would leave them
    untrained).  Returns the ids the model has now."""
    params = model.named_parameters()
    now = frozenset(id(p) for _, p in params)
    if before is None or before == now:
        return now
    held = {id(p) for p in optimizer.params}
    missing = [name for name, p in params if p.requires_grad and id(p) not in held]
    if missing:
        _warn_user(
            f"the model has changed since its optimizer was made: {len(missing)} trainable "
            f"parameter(s) ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}) "
            f"are not in it, and {who} leaves them as they are; make a new optimizer "
            f"(fit(..., optimizer=fp.optim.Adam(model.parameters())) or compile again), "
            f"add them with opt.add_param_group({{'params': [...]}}), or freeze them "
            f"(requires_grad_(False))")
    return now


# ------------------------------------------------------------------ helpers
def _on_device(model):
    """Context selecting the backend of ``model.to(...)`` (no-op for "cpu")."""
    dev = getattr(model, "_device", None)
    return backends.use_backend(dev) if dev else contextlib.nullcontext()


def _device_aware(fn):
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        dev = getattr(model, "_device", None)
        if not dev:  # (the cpu: no backend to select)
            return fn(model, *args, **kwargs)
        with backends.use_backend(dev):
            return fn(model, *args, **kwargs)
    return wrapper


def _model_dtype(model):
    dt = model.dtype
    return np.dtype(np.float32) if dt is None else dt


def _features(X, name, dtype):
    X = as_array(X, name)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got shape {X.shape}")
    return finite_float(X, name, dtype)


def _targets(y, name, n):
    y = as_array(y, name)
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0] if y.ndim else 0} samples but X has {n}")
    if y.dtype.kind == "f":
        check_finite(y, name)
    return c_array(y)


def _input_width(model):
    """(width, layer): the input width the model's first sized layer expects (Dense
    in_features, a norm's num_features; what comes before it keeps the width), or
    (None, None) when a module of unknown kind comes first."""
    for mod in model.modules():
        width = getattr(mod, "in_features", None) or getattr(mod, "num_features", None)
        if width is not None:
            return width, mod
        if not isinstance(mod, (Sequential, Residual, Activation, Dropout)):
            break  # (a module of the user's may change the width)
    return None, None


_MISSING = object()


def _output_shape(model, X, name="X"):
    """The model's output shape for X, found on two samples in eval mode (a
    BatchNorm1d without running statistics normalizes by the batch's).  The probe
    leaves the modules' attributes as they were (the caches of the user's last
    forward included), so a fit rejected after it has changed nothing."""
    saved = [(mod, dict(mod.__dict__)) for mod in model.modules()]
    try:
        with inference_mode():
            return model.forward(X[:2]).shape[1:]
    except ValueError as exc:
        width, layer = _input_width(model)
        if width is not None and X.shape[1] != width:
            raise ValueError(f"{name} has {X.shape[1]} features (shape {X.shape}) but the "
                             f"model's first layer {layer!r} expects {width}") from None
        raise ValueError(f"{name} of shape {X.shape} does not fit the model: {exc}") from None
    finally:
        # key by key, never emptying a module's dict (a predict in another thread
        # may be reading it)
        for mod, state in saved:
            attrs = mod.__dict__
            for key in [k for k in attrs if k not in state]:
                attrs.pop(key, None)
            for key, value in state.items():
                if attrs.get(key, _MISSING) is not value:
                    attrs[key] = value


def _accuracy_fn(loss):
    """A function (outputs, targets) -> (hits, count) for a classification loss, or
    None: the rows SoftmaxCrossEntropy ignores (``ignore_index``) count for nothing;
    BinaryCrossEntropy counts every output (multilabel: each label)."""
    if isinstance(loss, _losses.SoftmaxCrossEntropy):
        ignore = loss.ignore_index
        def acc(out, y):
            pred = out.argmax(axis=1)
            if y.ndim == 2 and y.shape[1] == 1 and out.shape[1] > 1:
                y = y[:, 0]  # (a column of class ids)
            if y.ndim != 1:
                return int(np.count_nonzero(pred == y.argmax(axis=1))), y.shape[0]
            if ignore is None:
                return int(np.count_nonzero(pred == y)), y.shape[0]
            keep = y != ignore
            return int(np.count_nonzero((pred == y) & keep)), int(np.count_nonzero(keep))
        return acc
    if isinstance(loss, _losses.BinaryCrossEntropy):
        threshold = 0.0 if loss.from_logits else 0.5
        def acc(out, y):
            hits = np.count_nonzero((out > threshold) == (y.reshape(out.shape) > 0.5))
            return int(hits), out.size
        return acc
    return None


def _batches(n, batch_size):
    """(start, stop) of the eval batches over n rows: a last batch of one row joins the
    one before (a BatchNorm1d without running statistics normalizes by the batch's
    and cannot take a single row; any other model gives the same rows either way)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _batch_forward(model, X):
    """The forward for eval batches of X: on a backend that runs a whole dense chain
    (``make_forward``: the cuda backend, keeping weights and activations on the GPU)
    when the model is one and X fits it, else ``model.forward`` (called inside
    ``inference_mode``: a dense chain has no layer that the mode changes)."""
    make = getattr(backends.current(), "make_forward", None)
    if make is None or X.ndim != 2 or X.shape[0] == 0:
        return model.forward
    stages = dense_stages(model)
    if stages is None or X.shape[1] != stages[0].weight.shape[0] \
            or len({p.dtype for st in stages for p in (st.weight, st.bias)
                    if p is not None} | {X.dtype}) != 1:
        return model.forward  # (which refuses what it must, in its words)
    for m in model.modules():
        if isinstance(m, Dense):
            m._check_params()  # (arrays of other sizes assigned: refused, named)
    return make(stages)


def _evaluate(model, X, y, loss, batch_size):
    """(mean loss, accuracy or None) over X in eval mode: the batches' means weighted
    by their normalisers (rows, or with class weights the weights' sum), so that the
    result is the loss of the whole of X."""
    acc_fn = _accuracy_fn(loss)
    total, weight, hits, count = 0.0, 0.0, 0, 0
    with inference_mode():
        forward = _batch_forward(model, X)
        for start, stop in _batches(X.shape[0], batch_size):
            xb, yb = X[start:stop], y[start:stop]
            out = forward(xb)
            w = loss._batch_weight(yb)
            if w:  # (a batch of ignored rows only counts for nothing: its mean is NaN)
                total += loss.value(out, yb) * w
                weight += w
            if acc_fn is not None:
                h, c = acc_fn(out, yb)
                hits, count = hits + h, count + c
    mean = total / weight if weight else math.nan
    return mean, (None if acc_fn is None else hits / count if count else math.nan)


# ------------------------------------------------------------------ public API
@_device_aware
def predict(model, X, batch_size=1024):
    """Forward ``X`` in eval mode, in batches of ``batch_size`` rows; returns a new
    NumPy array."""
    model._sync_device()  # (compiled steps on a device: their parameters)
    batch_size = integer(batch_size, "batch_size", low=1)
    X = as_float(X, "X", _model_dtype(model))
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (samples, features), got shape {X.shape}")
    n = X.shape[0]
    with inference_mode():
        if n == 0:
            return model.forward(X)  # (no rows: the output's shape, checked)
        forward = _batch_forward(model, X)
        if n <= batch_size:  # (one batch: no slicing and joining; ~2 us at batch 1)
            return forward(X).copy()
        outs = [forward(X[s:e]) for s, e in _batches(n, batch_size)]
    return np.concatenate(outs)


@_device_aware
def evaluate(model, X, y, loss=None, batch_size=1024, return_dict=False):
    """Mean loss of ``model`` on (X, y) in eval mode, computed in batches of
    ``batch_size`` rows (the loss of the whole of X); with ``return_dict`` (Keras'),
    ``{"loss": ..., "accuracy": ...}`` (the accuracy for classification losses, as
    fit's History)."""
    return_dict = flag(return_dict, "return_dict")
    model._sync_device()  # (compiled steps on a device: their parameters)
    if loss is None:
        # (the loss of the last compile or fit, whether its step is still held or not)
        args = model.__dict__.get("_compile_args")
        if args is None:
            raise ValueError("evaluate needs loss= (or a model compiled with a loss)")
        loss = args[0]
    loss = _losses.get(loss)
    batch_size = integer(batch_size, "batch_size", low=1)
    X = _features(X, "X", _model_dtype(model))
    y = _targets(y, "y", X.shape[0])
    if X.shape[0] == 0:
        raise ValueError("X is empty")
    value, acc = _evaluate(model, X, y, loss, batch_size)
    if not return_dict:
        return value
    return {"loss": value} if acc is None else {"loss": value, "accuracy": acc}


@_device_aware
def fit(model, X, y=None, *, loss=None, optimizer=None, epochs=1, batch_size=32,
        validation_data=None, validation_split=0.0, shuffle=True, seed=None, verbose=1,
        on_nonfinite="raise", checkpoint=None, checkpoint_every=1, resume=False,
        callbacks=None, clip_grad_norm=None, clip_grad_value=None, **unsupported):
    """Train ``model`` on (X, y) with mini-batch gradient descent.

    Args:
        X: (samples, features) inputs; y: targets as the loss expects them.
        loss: a Loss or its name (default: the compiled one).
        optimizer: an Optimizer or its name (default: the compiled one).  A name
            builds a new optimizer, with fresh state, on every call; to continue
            training with the optimizer's state (Adam's moments, momentum), pass the
            Optimizer object or ``model.compile`` once and call ``fit`` without it.
        epochs: passes over the data (>= 0); batch_size: samples per step (>= 1).
        validation_data: (X_val, y_val) evaluated after each epoch, or
        validation_split: fraction in [0, 1) of the *last* samples held out instead.
        shuffle: reshuffle every epoch with a generator seeded by ``seed``; ``seed``
            also reseeds every Dropout layer, so a seeded run is reproducible.
        verbose: 0 silent, 1 a progress bar per epoch, 2 one line per epoch.
        on_nonfinite: what to do when a batch's loss or any gradient is NaN or infinite
            (a float32 model's loss above float32's range counts as infinite: it is
            inf in PyTorch; checked before the update): "raise" (default) stops with NonFiniteError,
            "skip" drops that batch and goes on (``History.skipped_steps`` counts them).
            Either way that update is not applied and BatchNorm running statistics are
            rolled back, so the model keeps its last finite parameters and buffers.
        checkpoint: a file path; the model, optimizer state, generator states and
            history are saved there (atomically, see :func:`fastprop.save`) every
            ``checkpoint_every`` epochs and after the last one.
        resume: with ``checkpoint``, continue from that file when it exists (a fresh
            start otherwise): the finished epochs are skipped and training goes on to
            ``epochs`` in total.  With the same model architecture, data, settings,
            backend and thread count, a resumed run ends with bit-identical
            parameters to one that was never interrupted.  A checkpoint of another
            architecture, loss, optimizer type, sample count, batch size or shuffle
            setting is rejected (ValueError) before anything changes; the optimizer's
            hyperparameters (lr, ...) are restored from it, as its state is.

        callbacks: callables ``cb(epoch, logs)`` run after each epoch (``epoch``
            counts from 0; ``logs`` holds that epoch's loss, accuracy and validation
            figures, as in the History), in order.  One returning True stops the
            training after that epoch (``History.stopped_epoch``; True itself or a
            NumPy True: a returned number does not stop, and is warned about, as it
            is most often a Keras schedule(epoch, lr), which goes in
            :class:`LearningRateScheduler`).  Keras' ``set_params``,
            ``on_epoch_begin`` and ``on_train_batch_begin`` (or ``on_batch_begin``)
            hooks are called too (Keras' evaluate and predict hooks are not: fit's
            validation pass calls none).  A callback with an
            ``on_train_begin(keys)`` method has it called first, before anything
            changes, with the names the logs will hold (to reset, or refuse with a
            ValueError).  A learning-rate schedule sets the next epoch's rate:
            ``lambda epoch, logs: setattr(opt, "lr", 1e-3 * 0.9 ** (epoch + 1))``,
            or a scheduler of :mod:`fastprop.optim.lr_scheduler` itself
            (``callbacks=[CosineAnnealingLR(opt, T_max=epochs)]``);
            :class:`EarlyStopping` stops when a figure stops improving.  With
            ``checkpoint``, the checkpoint is written after the callbacks (a stopped
            run is saved as stopped: resuming it trains no more), but a callback's
            own state is not saved: on resume, one with an ``on_resume(history)``
            method gets the restored history (EarlyStopping rebuilds its count
            from it).  One with an ``on_train_batch_end(batch, logs)`` method (Keras'
            name) has it called after each batch's update too, with the batch's
            index in the epoch and ``logs = {"loss": that batch's loss}`` (Keras
            passes the epoch's running figures); ``lr_scheduler.every_batch(sched)``
            steps a scheduler there (warm-up, OneCycleLR).  One with a
            ``set_model(model)`` method gets the model before ``on_train_begin`` (as
            Keras'), and
            one with ``on_train_end()`` has it called after the last epoch (or the
            stop) once the parameters are final, as Keras' (EarlyStopping's
            ``restore_best_weights`` uses both).
        clip_grad_norm / clip_grad_value: clip the gradients of the optimizer's
            parameters before each update, to a global 2-norm of at most
            ``clip_grad_norm`` / elementwise to [-v, v], as :func:`fastprop.clip_grad_norm`
            and :func:`fastprop.clip_grad_value` in a hand-written loop (the remedy for
            exploding gradients; fused on the native backend, layer by layer on the
            CUDA one).  None (default):
            the compiled step's own settings (``model.compile(..., clip_grad_norm=)``).

    Training mode: a model in eval mode is put in training mode (``model.train()``).
    A model already in training mode is trained as its modules' modes are: a
    submodule set to eval mode after ``model.train()`` (``bn.eval()``, to freeze a
    BatchNorm's running statistics while fine-tuning) stays in eval mode.

    Returns:
        History of per-epoch loss (and accuracy for classification losses, and
        val_loss / val_accuracy with validation data).
    """
    # --- validate everything before touching the model
    if unsupported:
        _refuse_keras_arguments(unsupported)
    if not isinstance(model, Module):
        raise TypeError(f"model must be a fastprop Module, got {type(model).__name__}")
    epochs = integer(epochs, "epochs", low=0)
    batch_size = integer(batch_size, "batch_size", low=1)
    validation_split = real(validation_split, "validation_split", low=0, high=1,
                            high_inclusive=False)
    if verbose not in (0, 1, 2, False, True):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
    if not isinstance(shuffle, (bool, np.bool_)):
        raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
    if seed is not None:
        seed = integer(seed, "seed", low=0)
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    checkpoint_every = integer(checkpoint_every, "checkpoint_every", low=1)
    callbacks = _check_callbacks(callbacks)
    clip_grad_norm = _clip_setting(clip_grad_norm, "clip_grad_norm")
    clip_grad_value = _clip_setting(clip_grad_value, "clip_grad_value")
    if checkpoint is not None:
        checkpoint = _checkpoint.check_path(checkpoint, resume)
    elif resume:
        raise ValueError("resume=True needs checkpoint=<path>")
    compiled = model.__dict__.get("_compile_args")  # (loss, optimizer) of the last
    if isinstance(loss, str) and compiled is not None and _named_as(loss, compiled[0]):
        loss = compiled[0]  # (the compiled loss by its name: its clipping is kept)
    if loss is None or optimizer is None:              # compile or fit
        if compiled is None:
            raise ValueError("fit needs loss= and optimizer= (or call model.compile first)")
        loss = compiled[0] if loss is None else loss
        optimizer = compiled[1] if optimizer is None else optimizer
    params_now = None
    if compiled is not None and optimizer is compiled[1]:
        params_now = _warn_untrained(model, optimizer, _compiled_ids(model))
    step = model._compiled_step()
    if step is None or _losses.get(loss) is not step.loss or optimizer is not step.optimizer:
        step = TrainStep(model, loss, optimizer)
        if compiled is not None and step.loss is compiled[0] and optimizer is compiled[1]:
            # (the compiled step itself is gone, its settings are kept)
            step.clip_grad_norm, step.clip_grad_value = model.__dict__.get(
                "_compile_clips", (None, None))
    if params_now is not None:
        step._param_ids = params_now  # (warned about once: by fit, not again by the step)
    dtype = _model_dtype(model)
    X = _features(X, "X", dtype)
    y = _targets(y, "y", X.shape[0])
    if X.shape[0] == 0:
        raise ValueError("X is empty: fit needs at least one sample")
    out_shape = (X.shape[0],) + tuple(_output_shape(model, X))
    _prepare_named(step.loss, y, out_shape, dtype, "y")
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise TypeError("validation_data must be a pair (X_val, y_val)")
        Xv = _features(validation_data[0], "validation_data[0]", dtype)
        yv = _targets(validation_data[1], "validation_data[1]", Xv.shape[0])
        if Xv.shape[0] == 0:
            raise ValueError("validation_data[0] is empty: it needs at least one sample")
        if Xv.shape[1] != X.shape[1]:
            raise ValueError(f"validation_data[0] has {Xv.shape[1]} features, X has {X.shape[1]}")
        _prepare_named(step.loss, yv, (Xv.shape[0],) + out_shape[1:], dtype,
                       "validation_data[1]")
    elif validation_split > 0:
        # (as Keras: the first int(n (1 - split)) samples train; 0.29 of 100 holds 29
        # out, not floor(28.999...) = 28, and 0.1 of 5 holds 1 out)
        n_val = X.shape[0] - int(X.shape[0] * (1.0 - validation_split))
        if n_val < 1 or n_val >= X.shape[0]:
            raise ValueError(f"validation_split={validation_split} leaves {n_val} validation "
                             f"and {X.shape[0] - n_val} training samples; both must be >= 1")
        X, Xv = X[:-n_val], X[-n_val:]
        y, yv = y[:-n_val], y[-n_val:]
    else:
        Xv = yv = None

    settings = {"samples": int(X.shape[0]), "batch_size": batch_size, "shuffle": bool(shuffle),
                "loss": repr(step.loss)}  # (a resume with another loss is refused)
    for key, value in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value)):
        value = getattr(step, key) if value is None else value
        if value is not None:  # (and with other clipping; absent without, as before)
            settings[key] = value
    restore = None
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        restore = _checkpoint.prepare_resume(checkpoint, model, step.optimizer, settings)

    # --- train
    n = X.shape[0]
    # Training mode: a model in eval mode is switched to training mode whole
    # (model.train()).  In a model already in training mode, a submodule put in eval
    # mode on purpose stays so: model.train(); bn.eval() freezes that BatchNorm's
    # statistics while the rest trains (as in PyTorch fine-tuning).
    to_train = not getattr(model, "_training", False)  # (a module whose __init__ skipped
    # Module.__init__ has no mode yet: train() gives it one, as before)
    if Xv is not None and Xv.shape[0] < 2 and any(
            isinstance(m, BatchNorm1d) and m.running_mean is None for m in model.modules()):
        raise ValueError("a BatchNorm1d without running statistics normalizes validation "
                         "batches by their own statistics: it needs more than 1 validation "
                         f"sample, got {Xv.shape[0]}")
    if any(isinstance(m, BatchNorm1d) and (to_train or m._training or m.running_mean is None)
           for m in model.modules()):  # (without running statistics: batch ones, any mode)
        last = n % batch_size or batch_size
        if min(last, batch_size, n) < 2:
            raise ValueError(
                f"BatchNorm1d needs more than 1 sample per batch in training mode: "
                f"batch_size={batch_size} with {n} training samples leaves a batch of 1 sample; "
                f"choose another batch_size")
    if callbacks:  # (may refuse, e.g. an EarlyStopping watching a key this fit lacks)
        for i, cb in enumerate(callbacks):
            # (a scheduler of another optimizer would set rates nothing trains with:
            # fit(optimizer="sgd") builds a new one on every call)
            sched = cb.scheduler if isinstance(cb, _sched.every_batch) else cb
            if isinstance(sched, (_sched.LRScheduler, _sched.ReduceLROnPlateau)) \
                    and sched.optimizer is not step.optimizer:
                why = (f" (optimizer={optimizer!r} builds a new one)"
                       if isinstance(optimizer, str) or isinstance(optimizer, type) else "")
                raise ValueError(
                    f"callbacks[{i}] is a {type(sched).__name__} of another optimizer than "
                    f"the one this fit trains with{why}: make the scheduler on the optimizer "
                    f"fit gets, fit(..., optimizer=opt, callbacks=[StepLR(opt, ...)])")
        keys = ["loss"] + (["accuracy"] if _accuracy_fn(step.loss) is not None else [])
        keys += [f"val_{k}" for k in keys] if Xv is not None else []
        params = {"epochs": epochs, "steps": -(-X.shape[0] // batch_size), "verbose": verbose}
        for cb in callbacks:  # (set_model first, as Keras: on_train_begin may use it)
            set_model = getattr(cb, "set_model", None)
            if set_model is not None:
                set_model(model)
            set_params = getattr(cb, "set_params", None)
            if set_params is not None:
                set_params(dict(params))
            if isinstance(cb, LearningRateScheduler):
                cb.optimizer = step.optimizer
        for cb in callbacks:
            begin = getattr(cb, "on_train_begin", None)
            if begin is not None:
                begin(list(keys))
    step.optimizer._precheck()  # (e.g. a state made before model.astype: refused now)
    # (the last check above: from here on the model is changed)
    model.__dict__["stop_training"] = False  # (Keras' flag, for callbacks to set)
    dropouts = [mod for mod in model.modules() if isinstance(mod, Dropout)]
    seeds = np.random.SeedSequence(seed).spawn(1 + len(dropouts))
    rng = np.random.default_rng(seeds[0])
    if seed is not None:
        for m, s in zip(dropouts, seeds[1:]):
            m.rng = np.random.default_rng(s)
    _remember(model, step)
    acc_fn = _accuracy_fn(step.loss)
    weighs = step.loss._layer_only()  # (class weights: batches weigh their weights' sum)
    history = History()
    first_epoch = 0
    if restore is not None:
        first_epoch = restore(rng, history)
        for cb in callbacks:  # (EarlyStopping rebuilds its count from the history)
            resume_cb = getattr(cb, "on_resume", None)
            if resume_cb is not None:
                resume_cb(history)
        step._fast_key = None  # parameters changed in place: rebind (device copies too)
    n = X.shape[0]
    # (Keras' hooks; on_batch_begin/end are its older names of the train_batch ones)
    epoch_begins = [cb.on_epoch_begin for cb in callbacks if hasattr(cb, "on_epoch_begin")]
    batch_begins = [_hook(cb, "on_train_batch_begin", "on_batch_begin") for cb in callbacks]
    batch_begins = [h for h in batch_begins if h is not None]
    batch_ends = [_hook(cb, "on_train_batch_end", "on_batch_end") for cb in callbacks]
    batch_ends = [h for h in batch_ends if h is not None]
    # a batch hook of the user's may read or write the parameters (clip them in place,
    # as Keras' constraints): a device step's values are brought to the host arrays
    # before it, and those arrays are the ones the next step uploads (the write was
    # lost, and the hook read stale values); fastprop's every_batch only sets the lr
    batch_sync = any(not isinstance(cb, _sched.every_batch) for cb in callbacks
                     if _hook(cb, "on_train_batch_begin", "on_batch_begin") is not None
                     or _hook(cb, "on_train_batch_end", "on_batch_end") is not None)
    warned = set()  # (callbacks warned about a return value)
    if to_train:
        model.train()
    # shuffled batches are gathered into buffers allocated once
    xbuf = np.empty((min(batch_size, n),) + X.shape[1:], X.dtype)
    ybuf = np.empty((min(batch_size, n),) + y.shape[1:], y.dtype)
    checked = step.check_finite  # (the step's own settings, given back at the end)
    clips = step.clip_grad_norm, step.clip_grad_value
    step.check_finite = True
    if clip_grad_norm is not None:
        step.clip_grad_norm = clip_grad_norm
    if clip_grad_value is not None:
        step.clip_grad_value = clip_grad_value
    try:
        if history.stopped_epoch is not None:
            first_epoch = epochs  # (resumed from a run that a callback stopped)
        for epoch in range(first_epoch, epochs):
            order = rng.permutation(n) if shuffle else None
            total, weight, hits, count = 0.0, 0.0, 0, 0
            if epoch_begins:
                step.sync()  # (a device step: the callbacks see, and may set, the values)
                for hook in epoch_begins:
                    hook(epoch, {})
            bar = _progress(verbose, n, epoch, epochs)
            t0 = last_post = time.perf_counter()
            for start in range(0, n, batch_size):
                if order is None:
                    xb, yb = X[start:start + batch_size], y[start:start + batch_size]
                else:
                    idx = order[start:start + batch_size]
                    # (mode="clip": a permutation's indices are in range, and NumPy
                    # buffers out= in the default "raise" mode: 2.5x slower)
                    # (the methods: np.take's Python wrapper costs ~1 us a call)
                    xb = X.take(idx, axis=0, out=xbuf[:idx.shape[0]], mode="clip")
                    yb = y.take(idx, axis=0, out=ybuf[:idx.shape[0]], mode="clip")
                w = step.loss._batch_weight(yb) if weighs else float(xb.shape[0])
                if not w:
                    # (ignored rows only: nothing to learn from, a NaN mean and a zero
                    # gradient, with which an optimizer's momentum would still move)
                    if bar is not None:
                        bar.update(xb.shape[0])
                    continue
                if batch_begins and batch_sync:
                    step.sync()
                for hook in batch_begins:
                    hook(start // batch_size, {})
                try:
                    value = step._fit_batch(xb, yb)  # (X was validated whole)
                except NonFiniteError:
                    if on_nonfinite == "raise":
                        if bar is not None:
                            bar.close()
                        raise
                    history.skipped_steps += 1
                    continue
                m = xb.shape[0]
                total += value * w
                weight += w
                if acc_fn is not None:  # (before the callbacks: one may run the step)
                    h, c = acc_fn(step.output, yb)
                    hits, count = hits + h, count + c
                if batch_ends and batch_sync:
                    step.sync()
                for hook in batch_ends:  # (after each applied update)
                    hook(start // batch_size, {"loss": value})
                if bar is not None:
                    bar.update(m)
                    now = time.perf_counter()
                    if now - last_post > 0.2:
                        bar.set_postfix(_postfix(total / weight, hits, count, acc_fn),
                                        refresh=False)
                        last_post = now
            # an epoch whose every batch was skipped (on_nonfinite="skip") trained on
            # nothing: its loss and accuracy are NaN, not 0 (which reads as perfect)
            logs = {"loss": total / weight if weight else math.nan}
            if acc_fn is not None:
                logs["accuracy"] = hits / count if count else math.nan
            if Xv is not None:
                step.sync()
                # (evaluate's batches: a model whose eval-mode output depends on the
                # batch, a BatchNorm1d(track_running_stats=False), gets the val_loss
                # that model.evaluate(Xv, yv) reports)
                vloss, vacc = _evaluate(model, Xv, yv, step.loss, 1024)
                logs["val_loss"] = vloss
                if vacc is not None:
                    logs["val_accuracy"] = vacc
            history.append(epoch, logs)
            elapsed = time.perf_counter() - t0
            if bar is not None:
                # (the rate is tqdm's own, "...samples/s": a second figure in the
                # postfix disagreed with it)
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=True)
                bar.close()
            elif verbose == 2:
                parts = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
                print(f"Epoch {epoch + 1}/{epochs} - {elapsed:.2f}s - {parts}", flush=True)
            stop = False
            if callbacks:
                step.sync()  # (parameters trained on a device: the callbacks see them)
                for i, cb in enumerate(callbacks):  # (True itself stops: not a rate)
                    if callable(cb):
                        said = cb(epoch, dict(logs))
                    else:  # (an object with other hooks only: nothing here)
                        end = getattr(cb, "on_epoch_end", None)
                        said = end(epoch, dict(logs)) if end is not None else None
                    stop = said is True or type(said) is np.bool_ and bool(said) or stop
                    if (isinstance(said, numbers.Real) and not isinstance(said, (bool, np.bool_))
                            and i not in warned):  # (a number: a Keras schedule's rate)
                        warned.add(i)
                        _warn_user(
                            f"callbacks[{i}] returned {said!r}, which fit ignores (a "
                            f"callback returns True to stop, or nothing); a Keras "
                            f"schedule(epoch, lr) goes in "
                            f"fp.LearningRateScheduler(schedule)")
                # (Keras' way: a callback given the model sets model.stop_training)
                stop = stop or model.__dict__.get("stop_training") is True
                if stop:
                    history.stopped_epoch = epoch
            if checkpoint is not None and ((epoch + 1) % checkpoint_every == 0
                                           or epoch + 1 == epochs or stop):
                step.sync()
                _checkpoint.save(checkpoint, model, step.optimizer, epoch + 1, rng, history,
                                 settings)
            if stop:
                break
    finally:
        step.check_finite = checked
        step.clip_grad_norm, step.clip_grad_value = clips
        step.sync()
    for cb in callbacks:  # (after the sync: they see, and may set, the final parameters)
        end = getattr(cb, "on_train_end", None)
        if end is not None:
            end()
    return history


_HOOKS = frozenset(("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
                    "on_train_batch_begin", "on_train_batch_end", "on_batch_begin",
                    "on_batch_end", "on_resume"))


def _hook(cb, name, older):
    """A callback's Keras hook ``name``, else its older name, else None."""
    hook = getattr(cb, name, None)
    return hook if hook is not None else getattr(cb, older, None)


def _prepare_named(loss, y, shape, dtype, name):
    """The loss's target check, its message prefixed with the argument it is about (the
    loss names "labels" or "target": fit's y and validation_data[1] look alike)."""
    try:
        loss.prepare_target(y, shape, dtype)
    except (TypeError, ValueError) as exc:
        if type(exc) not in (TypeError, ValueError):  # (a user loss's own error: as is)
            raise
        raise type(exc)(f"{name}: {exc}") from exc


_KERAS_ONLY = {
    "clipnorm": "clip the gradients' global norm with fit(clip_grad_norm=...) (Keras' "
                "clipnorm clips each weight's gradient by its own norm)",
    "global_clipnorm": "fit(clip_grad_norm=...) clips the gradients' global norm",
    "clipvalue": "fit(clip_grad_value=...) clamps every gradient element",
    "class_weight": "weigh the classes in the loss instead: "
                    "SoftmaxCrossEntropy(weight=...) or BinaryCrossEntropy(from_logits=True, "
                    "pos_weight=...) (PyTorch's weighted mean, divided by the weights' sum "
                    "where Keras divides by the batch size)",
    "sample_weight": "per-class weights go in the loss (SoftmaxCrossEntropy(weight=...)); "
                     "for per-sample weights, train with a loop of your own over "
                     "fp.ops kernels",
    "initial_epoch": "resume a run from its checkpoint: fit(..., checkpoint=path, "
                     "resume=True)",
    "steps_per_epoch": "each epoch goes once over X in batches of batch_size",
    "validation_freq": "validation runs after every epoch",
    "validation_steps": "validation goes over all of validation_data, in batches of "
                        "1024 (as evaluate's)",
    "validation_batch_size": "validation goes over validation_data in batches of 1024 "
                             "(as evaluate's)",
    "workers": "fit takes whole arrays in this process; the kernels use "
               "fp.set_num_threads(n) threads",
    "use_multiprocessing": "fit takes whole arrays in this process; the kernels use "
                           "fp.set_num_threads(n) threads",
    "max_queue_size": "fit takes whole arrays in this process, no queue",
}


def _refuse_keras_arguments(unsupported) -> None:
    """TypeError for keyword arguments fit does not take; Keras' get a pointer to what
    does their job here."""
    name = sorted(unsupported)[0]
    hint = _KERAS_ONLY.get(name)
    if hint is None:
        raise TypeError(f"fit() got an unexpected keyword argument {name!r}")
    raise TypeError(f"fit() has no {name!r} (Keras'): {hint}")


def _check_callbacks(callbacks) -> list:
    if callbacks is None:
        return []
    if callable(callbacks) or not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of callables cb(epoch, logs), got "
                        f"{type(callbacks).__name__}")
    for i, cb in enumerate(callbacks):
        if isinstance(cb, type):
            raise TypeError(f"callbacks[{i}] is the class {cb.__name__}; pass an instance "
                            f"({cb.__name__}(...))")
        if not callable(cb) and not any(callable(getattr(cb, h, None)) for h in _HOOKS):
            raise TypeError(f"callbacks[{i}] must be callable as cb(epoch, logs) (or have "
                            f"Keras' on_epoch_end(epoch, logs)), got {type(cb).__name__}")
    return list(callbacks)


class LearningRateScheduler:
    """A ``fit`` callback setting the learning rate at the start of each epoch to
    ``schedule(epoch, lr)`` (epoch from 0, lr the current rate; or ``schedule(epoch)``
    for a function of one argument), as Keras' LearningRateScheduler, called once per
    epoch with the first parameter group's rate; the fit's optimizer's first group gets
    the rate it returns and the other groups keep their ratio to it.  A rate that is
    not a finite number >= 0 is refused (ValueError) before any is set.  ``verbose``:
    print the rates set.
    (PyTorch's schedulers are in :mod:`fastprop.optim.lr_scheduler`, and work as
    callbacks too.)"""

    def __init__(self, schedule, verbose=0):
        if not callable(schedule):
            raise TypeError(f"schedule must be callable as schedule(epoch, lr), got "
                            f"{type(schedule).__name__}")
        self.schedule = schedule
        self.verbose = integer(verbose, "verbose", low=0)
        try:
            positional = [p for p in inspect.signature(schedule).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                        p.VAR_POSITIONAL)]
            self._takes_lr = len(positional) >= 2 or any(
                p.kind is p.VAR_POSITIONAL for p in positional)
        except (TypeError, ValueError):  # (a builtin without a signature)
            self._takes_lr = True
        self.optimizer = None  # (fit sets it)

    def on_epoch_begin(self, epoch, logs=None) -> None:
        """Set the optimizer's rate for ``epoch`` (fit calls it)."""
        opt = self.optimizer
        if opt is None:
            raise RuntimeError("LearningRateScheduler runs as a fit callback "
                               "(fit(..., callbacks=[LearningRateScheduler(schedule)]))")
        groups = opt.param_groups
        lr = float(groups[0]["lr"])
        new = self.schedule(epoch, lr) if self._takes_lr else self.schedule(epoch)
        new = real(new, f"the rate schedule({epoch}, ...) returned", low=0)
        # (once per epoch, as Keras; the other groups keep their ratio to the first)
        rates = [new * float(g["lr"]) / lr if lr > 0 else new for g in groups]
        rates[0] = new
        _set_rates(opt, rates, "LearningRateScheduler")
        if self.verbose:
            shown = rates[0] if len(set(rates)) == 1 else rates
            print(f"\nEpoch {epoch + 1}: LearningRateScheduler setting learning rate to "
                  f"{shown}.", flush=True)


class EarlyStopping:
    """A ``fit`` callback that stops the training when ``monitor`` (a History key:
    "val_loss", "loss", "val_accuracy", ...) has not improved by more than
    ``min_delta`` for ``patience`` epochs in a row, as Keras' EarlyStopping (also its
    defaults).  ``mode`` "min", "max" or "auto" (max for accuracies, min otherwise).
    A NaN value never counts as an improvement.  Each ``fit`` starts it afresh
    (``on_train_begin``), and refuses, before training, a ``monitor`` its logs will
    not hold (ValueError).  ``best`` and ``best_epoch`` say where the best value was.

    As Keras': ``baseline``: an improvement restarts the patience only when it also
    beats this value (so training stops after ``patience`` epochs that never reach
    it); ``start_from_epoch``: the epochs before it are not watched (a warm-up);
    ``restore_best_weights``: at the end of the fit (stopped or not), the model gets
    the parameters and buffers of its best epoch back (kept as a copy in memory; a
    resumed fit restores the best of the epochs it ran itself, since the copy is not
    in the checkpoint)."""

    def __init__(self, monitor="val_loss", patience=0, min_delta=0.0, mode="auto", *,
                 baseline=None, restore_best_weights=False, start_from_epoch=0):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a History key (str), got {type(monitor).__name__}")
        self.monitor = monitor
        self.patience = integer(patience, "patience", low=0)
        self.min_delta = abs(real(min_delta, "min_delta"))  # (as Keras: its magnitude)
        self.sign = (1.0 if "acc" in self.monitor else -1.0) if mode == "auto" else (
            1.0 if mode == "max" else -1.0)
        self.baseline = None if baseline is None else real(baseline, "baseline")
        self.restore_best_weights = flag(restore_best_weights, "restore_best_weights")
        self.start_from_epoch = integer(start_from_epoch, "start_from_epoch", low=0)
        self.model = None
        self.on_train_begin()

    def set_model(self, model) -> None:
        """The model whose best weights ``restore_best_weights`` keeps (fit calls it)."""
        self.model = model

    def on_train_begin(self, keys=None) -> None:
        """Reset (called by ``fit`` before its first epoch with its logs' keys)."""
        if keys is not None and self.monitor not in keys:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, but this fit's logs "
                             f"hold {sorted(keys)} (val_* needs validation data)")
        self.best = None
        self.best_epoch = None
        self.best_weights = None
        self.wait = 0
        self._kept = None  # (after a resume: the monitored value of best_weights)

    def on_resume(self, history) -> None:
        """Rebuild ``best`` and the epochs without improvement from the history a
        resumed fit restored, so it stops where an uninterrupted run would (the
        best weights of those epochs are not known: none are kept from them)."""
        model, self.model = self.model, None
        try:
            self.on_train_begin()
            for epoch, value in zip(history.epoch, history.history.get(self.monitor, [])):
                self(epoch, {self.monitor: value})
        finally:
            self.model = model
        if self.best is not None:  # (the resumed epochs' own best is kept instead)
            self._kept = math.inf if self.sign < 0 else -math.inf

    def on_train_end(self) -> None:
        """With ``restore_best_weights``: the best epoch's parameters and buffers back."""
        if self.restore_best_weights and self.best_weights is not None and self.model:
            self.model.load_state_dict(self.best_weights)

    def _better(self, value, than) -> bool:
        return self.sign * (value - than) > self.min_delta

    def __call__(self, epoch, logs) -> bool:
        if epoch < self.start_from_epoch:
            return False
        value = logs[self.monitor]
        keep = self.restore_best_weights and self.model is not None
        if not math.isnan(value) and (self.best is None or self._better(value, self.best)):
            self.best, self.best_epoch = value, epoch
            self._kept = None  # (a best of its own: kept as usual from here)
            if keep:
                self.best_weights = self.model.state_dict()
            # (as Keras: the patience restarts only when the baseline is beaten too,
            # and an improvement never stops)
            beaten = self.baseline is None or self._better(value, self.baseline)
            self.wait = 0 if beaten else self.wait + 1
            return False
        if keep and self._kept is not None and not math.isnan(value) \
                and self.sign * (value - self._kept) > 0:
            # (resumed with the best epoch before the checkpoint, whose weights are not
            # in it: the best of the epochs this fit ran)
            self.best_weights, self._kept = self.model.state_dict(), value
        elif keep and self.best_weights is None:  # (Keras: the first watched epoch's)
            self.best_weights = self.model.state_dict()
        self.wait += 1
        return self.wait >= self.patience and epoch > 0  # (as Keras)


def _postfix(loss, hits, count, acc_fn):
    post = {"loss": f"{loss:.4f}"}
    if acc_fn is not None:
        post["accuracy"] = f"{hits / count if count else math.nan:.4f}"
    return post


def _progress(verbose, n, epoch, epochs):
    if verbose != 1:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=n, desc=f"Epoch {epoch + 1}/{epochs}", unit="samples", leave=True,
                dynamic_ncols=True)


# ``model.fit(...)`` etc. show the full documentation in help() and IDEs
Module.fit.__doc__ = fit.__doc__
Module.predict.__doc__ = predict.__doc__
Module.evaluate.__doc__ = evaluate.__doc__
Module.compile.__doc__ = compile_step.__doc__
