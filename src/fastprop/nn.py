"""Layers: each keeps its forward and its backward side by side.

A module's ``forward(x)`` (or ``module(x)``) computes the output and remembers what
its ``backward`` needs; ``backward(grad_out)`` returns the gradient with respect to
the input and *accumulates* parameter gradients into ``Parameter.grad`` (call
``zero_grad()`` between steps).  Arrays are NumPy arrays; parameterised layers
compute in their ``dtype`` (float32 by default) and convert their input to it.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from . import backends
from . import init as _init
from ._checks import as_array, as_float, c_array, flag, float_dtype, integer, real, warn_user
from .backends import ACTIVATIONS, PREACT_ACTIVATIONS
from .ops import activation_code

__all__ = ["Parameter", "Module", "Dense", "Activation", "ReLU", "LeakyReLU", "Sigmoid",
           "Tanh", "GELU", "Softmax", "Identity", "Dropout", "BatchNorm1d", "LayerNorm",
           "Residual", "Sequential", "inference_mode", "is_inference_mode_enabled"]

# inference_mode's flag, per thread and, within one, per asyncio task (a coroutine
# suspended inside the block leaves the others' modules in their own mode)
_inference: contextvars.ContextVar = contextvars.ContextVar("fastprop_inference",
                                                            default=False)
# (what each open inference_mode block restores, innermost last, per thread and task)
_inference_saved: contextvars.ContextVar = contextvars.ContextVar("fastprop_inference_saved",
                                                                  default=())


class inference_mode(contextlib.ContextDecorator):
    """Every module runs in eval mode for the calling thread (and asyncio task) inside
    this block, and keeps nothing for backward.

    No module's ``training`` flag is changed for other threads: ``predict`` and
    ``evaluate`` use this, so that forward passes of one model from several threads
    at once, or alongside ``fit`` in another thread, see the mode they expect.
    Works as a decorator too, and one object may be shared (a module-level
    ``no_grad = inference_mode()``): what each ``with`` restores is kept per thread and
    task, not on the object.  (A class, not a generator-based context manager: ~0.5 us
    instead of ~1.2, paid by every ``predict``.)
    """

    def __enter__(self):
        prev, saved = _inference.get(), _inference_saved.get()
        try:  # (set inside: a KeyboardInterrupt right after a set still restores both)
            _inference_saved.set(saved + (prev,))
            _inference.set(True)
        except BaseException:
            _inference.set(prev)
            _inference_saved.set(saved)
            raise
        return None

    def __exit__(self, *exc):
        saved = _inference_saved.get()
        prev = saved[-1] if saved else False  # (entered in another context: off)
        try:  # (an interrupt between the two sets: both finished, then raised)
            _inference_saved.set(saved[:-1])
            _inference.set(prev)
        except BaseException:
            _inference_saved.set(saved[:-1])
            _inference.set(prev)
            raise
        return False

    def __call__(self, func):
        if inspect.isgeneratorfunction(func) or inspect.iscoroutinefunction(func) \
                or inspect.isasyncgenfunction(func):
            # (the decorator would enter and leave around making the generator or
            # coroutine, not around its body: PyTorch wraps each resume; refused here)
            raise TypeError(f"inference_mode() cannot decorate the generator or coroutine "
                            f"function {getattr(func, '__qualname__', func)!r}: use "
                            f"`with fp.nn.inference_mode():` inside its body")
        return super().__call__(func)

    def _recreate_cm(self):  # (as a decorator: a fresh one per call, for threads)
        return type(self)()


# (set while a model file is being read: a saved model's settings were warned about
# when they were made)
_loading = contextvars.ContextVar("fastprop_loading", default=False)


def is_inference_mode_enabled() -> bool:
    """Whether this thread (and asyncio task) is inside :func:`inference_mode`, as
    PyTorch's ``torch.is_inference_mode_enabled()``.  A layer of your own whose
    forward keeps something for its backward keeps nothing when this is True (else an
    evaluation, or ``predict`` from another thread, between a training forward and its
    backward replaces what that backward needs): ``if not
    fp.nn.is_inference_mode_enabled(): self._x = x``."""
    return _inference.get()


def _keeps() -> bool:
    """Whether a forward keeps what backward needs: not inside :func:`inference_mode`,
    so that ``predict`` (from this or another thread) between a training forward and
    its backward leaves that forward's caches alone."""
    return not _inference.get()


class _IncompatibleKeys(NamedTuple):
    """What ``load_state_dict`` skipped, as PyTorch's (a pair: ``missing, unexpected =
    model.load_state_dict(d, strict=False)`` unpacks it)."""
    missing_keys: list
    unexpected_keys: list


class Parameter:
    """A trainable array and its accumulated gradient.

    Attributes:
        value: the parameter (np.ndarray), updated in place by optimizers.
        grad: np.ndarray of the same shape and dtype, zeros until backward adds to it.
        requires_grad: False freezes the parameter (as in PyTorch): backward leaves
            its ``grad`` alone (zeros), optimizers and the gradient clipping skip it.

    As PyTorch's optimizers skip a parameter whose gradient is None, fastprop's skip
    one that has no gradient: one whose ``grad`` nothing has used since the parameter
    was made, since ``zero_grad()`` (``set_to_none=True``, the default, as PyTorch's)
    or since ``p.grad = None``.  Backward marks each gradient it adds to, and so does
    any use of ``p.grad`` (a user's ``p.grad += g`` or ``p.grad[...] = g``), so a
    branch of a model that a step does not use keeps its values, its optimizer state
    and its own step count, as in PyTorch.  ``grad`` itself is always an array (zeros
    when there is no gradient): ``p.grad = g`` copies ``g`` into it (the parameter's
    shape; converted to its dtype).
    """

    __slots__ = ("_value", "_grad", "name", "_frozen", "_no_grad")

    def __init__(self, value, name: str | None = None):
        value = np.array(as_array(value, "value"), copy=True)
        if value.dtype not in (np.float32, np.float64):  # (also a byte-swapped float64)
            wide = value.dtype.kind in "biu" or value.dtype.itemsize >= 8
            value = value.astype(np.float64 if wide else np.float32)
        self._value = c_array(value)
        self._grad = np.zeros_like(self._value)
        self.name = name
        self._frozen = False
        self._no_grad = True

    @property
    def grad(self) -> np.ndarray:
        """The accumulated gradient (an array of the parameter's shape and dtype).
        Using it marks the parameter as having a gradient for the next optimizer
        step (see the class docstring)."""
        self._no_grad = False
        return self._grad

    @grad.setter
    def grad(self, new) -> None:
        old = getattr(self, "_grad", None)
        if old is None:  # (unpickling an older Parameter, whose slot was `grad`)
            self._grad = new
            return
        if new is None:  # (PyTorch's idiom for "no gradient")
            old.fill(0)
            self._no_grad = True
            return
        arr = as_array(new, "grad")
        if arr.shape != old.shape:
            label = f"Parameter {self.name!r}" if getattr(self, "name", None) else "Parameter"
            raise ValueError(f"{label}: grad must have the parameter's shape {old.shape}, "
                             f"got {arr.shape}")
        np.copyto(old, arr, casting="unsafe")
        self._no_grad = False

    @property
    def has_grad(self) -> bool:
        """Whether the next optimizer step updates this parameter: False when nothing
        used ``grad`` since ``zero_grad()`` (or ``p.grad = None``), where PyTorch's
        ``p.grad`` is None.  (Reading this does not count as a use.)"""
        return not getattr(self, "_no_grad", False)

    @property
    def requires_grad(self) -> bool:
        """Whether backward accumulates into ``grad`` and optimizers update this
        parameter (True unless frozen)."""
        return not getattr(self, "_frozen", False)  # (older pickles: no slot value)

    @requires_grad.setter
    def requires_grad(self, flag) -> None:
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"requires_grad must be a bool, got {type(flag).__name__}")
        self._frozen = not flag
        _structure[0] += 1  # (a compiled step rechecks whether it can run fused)

    @property
    def value(self) -> np.ndarray:
        """The parameter's array (C-contiguous), updated in place by optimizers.

        Assigning keeps the parameter's shape and dtype: the parameter gets a copy
        of the array, converted to them (C order), so ``p.value = w_torch.numpy().T``
        sets the values as ``Parameter(...)`` does and training never writes into the
        caller's array (nor ties two parameters set from one array); another shape is
        a ValueError."""
        return self._value

    @value.setter
    def value(self, new):
        old = getattr(self, "_value", None)
        label = f"Parameter {self.name!r}" if getattr(self, "name", None) else "Parameter"
        arr = as_array(new, "value")
        if old is None:  # (unpickling an older Parameter, whose slot was `value`)
            self._value = c_array(arr)
            return
        if arr.shape != old.shape:
            raise ValueError(f"{label}: value must have the parameter's shape {old.shape}, "
                             f"got {arr.shape}")
        self._value = np.array(arr, dtype=old.dtype, order="C", copy=True)

    @property
    def data(self) -> np.ndarray:
        """``value`` under PyTorch's name (assigning copies in, as ``value`` does)."""
        return self._value

    @data.setter
    def data(self, new) -> None:
        self.value = new

    @property
    def shape(self):
        """The value's shape."""
        return self.value.shape

    @property
    def dtype(self):
        """The value's dtype (its gradient's too)."""
        return self.value.dtype

    @property
    def size(self):
        """The value's number of elements (an int, as NumPy's ``a.size``; PyTorch's
        ``p.size()`` is the shape: ``p.shape`` here, and its count ``p.numel()``)."""
        return self.value.size

    @property
    def ndim(self):
        """The value's number of dimensions (PyTorch's ``p.ndim``, ``p.dim()``)."""
        return self.value.ndim

    def dim(self):
        """The value's number of dimensions, as PyTorch's ``p.dim()``."""
        return self.value.ndim

    def numel(self):
        """The value's number of elements, as PyTorch's ``p.numel()`` (counting
        parameters: ``sum(p.numel() for p in model.parameters())``)."""
        return self.value.size

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero ``grad``; with ``set_to_none`` (as PyTorch) the parameter also has no
        gradient until something uses ``grad`` again (an optimizer step skips it).
        Without, one that had none still has none, as PyTorch's None stays None."""
        self._zero_grad(flag(set_to_none, "set_to_none"))

    def _zero_grad(self, set_to_none: bool) -> None:
        self._grad.fill(0)
        if set_to_none:
            self._no_grad = True

    def __repr__(self):
        label = f"{self.name}, " if self.name else ""
        return f"Parameter({label}shape={self.value.shape}, dtype={self.value.dtype})"


_registry: dict = {}


def _registry_key(cls) -> str:
    """The name model files give a layer class: fastprop's own by their class name,
    any other by module and qualified name (a user's class named ``Dense`` does not
    take the place of fastprop's)."""
    module = cls.__module__ or ""
    if module == "fastprop" or module.startswith("fastprop."):
        return cls.__name__
    return f"{module}.{cls.__qualname__}"

# Bumped by every change that can alter what a model computes: a public attribute set
# on a module (a Dense's activation, a Dropout's p, a replaced Parameter) and any
# change to a Sequential's layer list.  A compiled training step compares it with the
# value it was built at (one integer per step) and rechecks its layer chain when it
# moved.  (Private attributes, the forward caches, are set on every pass and do not
# count.)
_structure = [0]


def _holds_modules(value) -> bool:
    """Whether a list, tuple or dict holds a Module (among its first 64 entries)."""
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(v, Module) for v in itertools.islice(items, 64))


class _LayerList(list):
    """A Sequential's ``layers``: a list whose changes bump ``_structure``."""


def _bumping(name):
    method = getattr(list, name)

    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            _structure[0] += 1
    wrapper.__name__ = name
    return wrapper


for _name in ("append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse",
              "__setitem__", "__delitem__", "__iadd__", "__imul__"):
    setattr(_LayerList, _name, _bumping(_name))
del _name


def _pickles(obj) -> bool:
    """Whether ``obj`` (a compiled loss or optimizer) can be pickled: fastprop's own
    classes can; a user's subclass is tried (it may hold a lock, or be a local class:
    the copy of a model would then fail for a setting it can do without)."""
    if type(obj).__module__.startswith("fastprop."):
        return True
    import pickle
    try:
        pickle.dumps(obj)
    except Exception:  # (PicklingError, TypeError, AttributeError: any refusal)
        return False
    return True


class Module:
    """Base class of every layer.

    Subclasses implement ``forward`` and ``backward`` and list their parameters in
    ``_params`` (attribute names) and their non-trainable state in ``_buffers``.  As
    in PyTorch, a Parameter or a Module set as a public attribute (``self.fc =
    Dense(...)``, ``self.scale = Parameter(...)``) is registered: it is in
    ``parameters()``, ``state_dict()``, ``children()``, ``train()``/``eval()`` and
    saved files.  What ``forward`` keeps for ``backward`` is named in ``_caches``
    (``_caches = ("_x",)``): a training step drops it once its backward has run, and
    copies and pickles leave it out; ``forward`` keeps nothing inside
    :func:`inference_mode` (:func:`is_inference_mode_enabled`).
    """

    _params: tuple = ()
    _buffers: tuple = ()
    _caches: tuple = ()  # what forward keeps for backward (dropped after a step, not pickled)
    # hyperparameters checked whenever they are set (layer.p = 1.5 after construction
    # is the constructor's ValueError, not a silently wrong forward): name -> check
    _attr_checks: dict = {}
    _holds_layers = False  # (a container whose .layers list holds its modules)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        key = _registry_key(cls)
        # (fastprop's private bases are no layers to load; a user's class is, a
        # script's too, whose key "__main__.Name" also starts with "_")
        if key != cls.__name__ or not key.startswith("_"):
            _registry[key] = cls

    @classmethod
    def _from_file(cls, config: dict, budget: list) -> "Module":
        """The module a model file's ``config`` describes (its arrays are filled in
        next).  ``budget[0]``: the bytes of array data the file holds; a config whose
        parameters need more is refused (ValueError) before anything is allocated."""
        need = cls._file_bytes(config)
        if need > budget[0]:
            raise ValueError(f"{cls.__name__} with config {config} needs {need} bytes of "
                             f"arrays; the file holds {budget[0]}")
        budget[0] -= need
        return cls(**config)

    @classmethod
    def _file_bytes(cls, config: dict) -> int:
        """A lower bound on the bytes of the arrays ``config`` makes (0: unknown)."""
        return 0

    def __init__(self):
        self.training = True

    @property
    def training(self) -> bool:
        """Training mode (Dropout drops, BatchNorm uses batch statistics); False inside
        :func:`inference_mode` on this thread."""
        return self._training and not _inference.get()

    @training.setter
    def training(self, mode) -> None:
        self._training = flag(mode, "training")

    # -- the two passes --------------------------------------------------------
    def forward(self, x):
        """The module's output for the batch ``x``; keeps what backward needs."""
        raise NotImplementedError(f"{type(self).__name__} defines no forward(x)")

    def backward(self, grad_out, input_grad: bool = True):
        """Given the gradient of the loss with respect to the last forward's output,
        add the parameters' gradients to their ``.grad`` and return the gradient with
        respect to the input (with ``input_grad`` False a layer may skip computing it
        and return None, as Dense does)."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no backward(grad_out, input_grad=True): "
            f"fastprop has no autograd, so a module of your own computes its gradients "
            f"itself (or is built from fastprop's layers in a Sequential, whose backward "
            f"chains theirs)")

    def __call__(self, x):
        return self.forward(x)

    def _backward_shapes(self):
        """The shapes of the last forward's input and output, which backward will take
        its gradients in: None for either where the module cannot tell (a user's
        module).  A fastprop layer without a kept forward raises backward's own
        RuntimeError, and a container whose parts no longer chain (a part run alone on
        another batch since) a ValueError: Sequential.backward asks before any layer
        adds to a gradient, so that a refused backward changes none."""
        return None, None

    def __setattr__(self, name, value):
        if name[0] != "_":
            if name == "trainable" and type(self).__module__ == __name__:
                # (Keras' flag would be a silently ignored attribute on fastprop's layers)
                raise AttributeError(
                    "fastprop modules have no 'trainable': freeze a layer's parameters with "
                    "layer.requires_grad_(False) (and a BatchNorm's statistics with bn.eval())")
            _structure[0] += 1
            check = type(self)._attr_checks.get(name)
            if check is not None:
                value = check(value)
            params = self._params
            if name in params:
                if value is not None and not isinstance(value, Parameter):
                    raise TypeError(f"cannot assign {type(value).__name__} as parameter "
                                    f"{name!r} of {type(self).__name__} (a fastprop "
                                    f"Parameter or None expected)")
                dtype = self.__dict__.get("_dtype")
                if value is not None and dtype is not None and value.dtype != dtype:
                    raise TypeError(
                        f"cannot assign a {value.dtype} Parameter as {name!r} of a {dtype} "
                        f"{type(self).__name__} (convert it, or the whole model with "
                        f"model.astype({value.dtype.name!r}))")
            elif isinstance(value, Parameter):
                # (as PyTorch's Module.__setattr__: a Parameter or a module set on a
                # module of the user's is registered, so that parameters(), state_dict,
                # train/eval, save and fit see it)
                object.__setattr__(self, "_params", tuple(params) + (name,))
            elif isinstance(value, Module):
                kids = self.__dict__.get("_children", ())
                if name not in kids:
                    object.__setattr__(self, "_children", kids + (name,))
            elif value is not None and name in self.__dict__.get("_children", ()):
                raise TypeError(f"cannot assign {type(value).__name__} as child module "
                                f"{name!r} of {type(self).__name__} (a Module or None "
                                f"expected)")
            elif isinstance(value, (list, tuple, dict)) and not (
                    name == "layers" and self._holds_layers) and _holds_modules(value):
                # (PyTorch's nn.ModuleList / ModuleDict idiom, ported as a plain list:
                # its modules would be trained by nothing, and saved by nothing)
                warn_user(
                    f"{type(self).__name__}.{name} is a {type(value).__name__} holding "
                    f"fastprop modules: they are not registered, so parameters() (and the "
                    f"optimizer made from it), train()/eval(), state_dict and fp.save do "
                    f"not see them. Hold them in a fp.nn.Sequential (it is indexed and "
                    f"iterated like PyTorch's ModuleList), or set each as an attribute")
        object.__setattr__(self, name, value)

    def __getstate__(self):
        """The module without its compiled training step (``compile`` / ``fit`` cache
        it on the model): a copy or a pickle gets the weights and buffers, and builds
        its own step when it trains (the step holds native pointers to this model's
        arrays and cannot be copied).  What ``compile`` set is kept, as Keras' saved
        models keep it: the loss, the optimizer (with its state, bound to the copy's
        parameters; pickled with the model, the same object as an optimizer pickled
        beside it) and the clipping, so that ``fit`` trains a copy as the original;
        unless a user's loss or optimizer class does not pickle (a lock held, a local
        class): then none of it, and the copy is as an uncompiled model."""
        self._sync_device()
        state = self.__dict__.copy()
        state.pop("_compiled", None)
        ids = state.pop("_compiled_ids", None)
        args = state.get("_compile_args")
        if args is not None and not all(_pickles(a) for a in args):
            state.pop("_compile_args")
            state.pop("_compile_clips", None)
        elif args is not None and ids is not None:
            # (the parameters the model had at compile time, as objects: ids are this
            # process's; fit warns of one added since that the optimizer lacks)
            state["_compiled_params"] = [p for p in self.parameters() if id(p) in ids]
        for name in self._kept_caches():  # (activations of the last forward: not state)
            state[name] = None
        # (caches keyed by this process's structure counter: another process's
        # counter may happen to match)
        state.pop("_checked_at", None)
        state.pop("_prefix_at", None)
        return state

    def _sync_device(self):
        """Bring the host arrays up to date when the model's compiled step trains on a
        device (a no-op otherwise); returns that step or None."""
        compiled = self._compiled_step()
        if compiled is not None:
            compiled.sync()
        return compiled

    def _kept_caches(self):
        """The cache attributes :meth:`_drop_caches` clears (a Dropout reusing its
        mask for gradcheck keeps it)."""
        return self._caches

    def _drop_caches(self) -> None:
        """Forget what the last forward kept for backward, in this module and its
        submodules (a training step does once backward has run: the caches would
        otherwise keep the batch, and with it the whole array it is a view of)."""
        for mod in self.modules():
            for name in mod._kept_caches():
                mod.__dict__[name] = None

    def _compiled_step(self):
        """The training step ``compile``/``fit`` made for this model while it lives
        (held weakly: a model and its step would otherwise form a cycle, and a model
        dropped after ``fit`` would wait for the cyclic garbage collector, with all
        its arrays, to be freed), else None."""
        ref = self.__dict__.get("_compiled")
        return ref() if ref is not None else None

    # -- structure -------------------------------------------------------------
    def children(self) -> list:
        """The direct submodules: those set as attributes (in the order they were
        first set), as PyTorch's; containers list theirs."""
        kids = (self.__dict__.get(n) for n in self.__dict__.get("_children", ()))
        return [m for m in kids if m is not None]

    def modules(self):
        """This module and every submodule, in pre-order.  A module held twice (an
        alias in a second attribute) is listed at both places, as the names of
        ``state_dict`` and saved files have always counted it (a model holding one
        twice is refused when it trains, see the README); a back-reference to a
        module on the way down (a cycle) is not followed."""
        return _walk(self)

    def named_modules(self) -> list:
        """(name, module) for this module ("", as PyTorch's) and every submodule, in
        :meth:`modules` order.  A submodule's name is its index there, the prefix of
        its parameters' names in :meth:`state_dict` (not PyTorch's dotted paths:
        ``Sequential(Dense, Dense)`` names its layers "1" and "2", their weights
        "1.weight" and "2.weight")."""
        return [(str(i) if i else "", mod) for i, mod in enumerate(self.modules())]

    def _extra_children(self, held) -> list:
        """For a subclass of a container: the modules its own code set as attributes
        besides those the container holds (registered as any module's; the base
        containers have none, and their files list their layers only)."""
        if type(self).__module__ == __name__:
            return []
        ids = {id(m) for m in held}
        return [m for m in Module.children(self) if id(m) not in ids]

    def named_children(self) -> list:
        """(name, module) for each direct submodule: its attribute name, or its index
        in a container."""
        kids = self.children()
        named = [(n, self.__dict__.get(n)) for n in self.__dict__.get("_children", ())]
        named = [(n, m) for n, m in named if m is not None]
        if len(named) == len(kids) and all(m is k for (_, m), k in zip(named, kids)):
            return named
        return [(str(i), m) for i, m in enumerate(kids)]

    def buffers(self) -> list:
        """Every buffer array (BatchNorm's running statistics) of this module and its
        submodules, as PyTorch's ``buffers()``."""
        return [arr for _, arr in self.named_buffers()]

    def named_buffers(self) -> list:
        """(name, buffer array) for every buffer, named as in :meth:`state_dict`."""
        return [(f"{i}.{attr}", getattr(mod, attr))
                for i, mod in enumerate(self.modules()) for attr in mod._buffers]

    def apply(self, fn):
        """Call ``fn(module)`` on every submodule, then on this one (children first,
        as PyTorch's ``Module.apply``), e.g. to initialise weights; returns self."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    def parameters(self) -> list:
        """Every Parameter of this module and its children (frozen ones too, as
        PyTorch's), once each."""
        seen, out = set(), []
        for mod in self.modules():
            for attr in mod._params:
                p = getattr(mod, attr)
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def state_arrays(self) -> list:
        """(name, array) for every parameter value and buffer, in a fixed order."""
        out = []
        for i, mod in enumerate(self.modules()):
            for attr in mod._params:
                p = getattr(mod, attr)
                if p is not None:
                    out.append((f"{i}.{attr}", p.value))
            for attr in mod._buffers:
                out.append((f"{i}.{attr}", getattr(mod, attr)))
        return out

    def named_parameters(self) -> list:
        """(name, Parameter) for every parameter (frozen ones too), once each, named as in
        :meth:`state_dict`."""
        seen, out = set(), []
        for i, mod in enumerate(self.modules()):
            for attr in mod._params:
                p = getattr(mod, attr)
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{i}.{attr}", p))
        return out

    def state_dict(self) -> dict:
        """Every parameter value and buffer by name, as PyTorch's ``state_dict``, but
        copies: one kept aside (the best epoch's) does not change as training goes
        on.  A name is ``"<index>.<attribute>"``, the index of the module in
        :meth:`modules` order (the names :func:`fastprop.save` uses)."""
        self._sync_device()
        return {name: arr.copy() for name, arr in self.state_arrays()}

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy the arrays of ``state_dict`` into the parameters and buffers, in place
        (converted to their dtypes).  Everything is checked before anything changes:
        a name missing or unknown (with ``strict``; else skipped) or a shape that
        differs is a ValueError, a non-numeric array a TypeError.  A BatchNorm's
        ``num_batches_tracked`` may be missing (dicts saved by older versions): it
        keeps its value.  Returns
        ``(missing, unexpected)``, the names skipped on either side."""
        strict = flag(strict, "strict")
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict of arrays (from state_dict()), got "
                            f"{type(state_dict).__name__}")
        targets = self.state_arrays()
        names = {name for name, _ in targets}
        # (a BatchNorm's batch count, absent from dicts saved before it was kept for
        # every momentum, keeps its value, as PyTorch's loads of older dicts)
        missing = [name for name, _ in targets
                   if name not in state_dict and not name.endswith(_COUNT_KEY)]
        unexpected = [name for name in state_dict if name not in names]
        if strict and (missing or unexpected):
            raise ValueError(f"state_dict does not match the model: missing {missing}, "
                             f"unexpected {unexpected} (strict=False skips them)")
        pairs = []
        for name, target in targets:
            if name not in state_dict:
                continue
            src = as_array(state_dict[name], f"state_dict[{name!r}]")
            if src.dtype.kind not in "biuf":
                raise TypeError(f"state_dict[{name!r}] must be numeric, got dtype {src.dtype}")
            if src.shape != target.shape:
                raise ValueError(f"state_dict[{name!r}] has shape {src.shape}, the model's "
                                 f"array {target.shape}")
            if name.endswith(_COUNT_KEY):
                _check_count_array(src, f"state_dict[{name!r}]")
            pairs.append((target, src))
        compiled = self._sync_device()  # (device-trained values first, then ours)
        for target, src in pairs:
            np.copyto(target, src, casting="unsafe")
        if compiled is not None:
            compiled._fast_key = None  # (changed in place: a device kernel re-uploads)
        return _IncompatibleKeys(missing, unexpected)

    def requires_grad_(self, requires_grad: bool = True):
        """Freeze (False) or unfreeze every parameter of this module and its
        submodules, as PyTorch's ``module.requires_grad_``; returns the module.  A
        frozen BatchNorm still updates its running statistics in training mode: put
        it in eval mode too (``bn.eval()``) to freeze those."""
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Set every parameter's ``.grad`` to zeros.  With ``set_to_none`` (the default,
        as PyTorch's) a parameter that the next backward does not reach has no
        gradient, and an optimizer step skips it as PyTorch's skips a None gradient
        (see :class:`Parameter`); gradients stay arrays."""
        set_to_none = flag(set_to_none, "set_to_none")
        for p in self.parameters():
            p._zero_grad(set_to_none)

    def train(self, mode: bool = True):
        """Put this module and all its submodules in training mode (eval mode when
        ``mode`` is False); returns the module."""
        mode = flag(mode, "mode")
        for mod in self.modules():
            mod.training = mode
        return self

    def eval(self):
        """Put this module and all its submodules in eval mode; returns the module."""
        return self.train(False)

    def to(self, device: str):
        """Run this model's fit/predict/evaluate on ``device``: "cuda" (the Numba CUDA
        backend: parameters, gradients and optimizer state stay on the GPU during
        fit) or "cpu" (the process-wide CPU backend).  Returns the module."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda":
            backends.load("cuda")  # raises BackendUnavailableError saying what is missing
        for mod in self.modules():
            mod._device = None if device == "cpu" else device
        return self

    @property
    def device(self) -> str:
        """"cpu", or "cuda" after ``to("cuda")``."""
        return getattr(self, "_device", None) or "cpu"

    @property
    def dtype(self):
        """The dtype of the module's first parameter (None for a module without
        parameters: an activation takes any float input)."""
        for mod in self.modules():  # (stops at the first: predict asks on every call)
            for attr in mod._params:
                p = getattr(mod, attr)
                if p is not None:
                    return p.dtype
        return None

    def get_config(self) -> dict:
        """Constructor arguments (JSON-able) that rebuild this module's architecture."""
        return {}

    def double(self):
        """``astype(np.float64)``, as PyTorch's ``module.double()``."""
        return self.astype(np.float64)

    def float(self):
        """``astype(np.float32)``, as PyTorch's ``module.float()``."""
        return self.astype(np.float32)

    def cpu(self):
        """``to("cpu")``, as PyTorch's."""
        return self.to("cpu")

    def cuda(self):
        """``to("cuda")``, as PyTorch's."""
        return self.to("cuda")

    def astype(self, dtype):
        """Convert every parameter and buffer of this module and its submodules to
        ``dtype`` (float32 or float64) in place, and return the module (as PyTorch's
        ``model.double()`` / ``model.float()``).  Gradients are reset to zeros.  Make
        the optimizer afterwards: one whose state was made in the old dtype refuses
        to step (ValueError)."""
        dtype = float_dtype(dtype)
        self._sync_device()
        self._cast(dtype)
        return self

    def _cast(self, dtype) -> None:
        """Convert parameters and buffers to ``dtype`` in place (gradients reset)."""
        dtype = float_dtype(dtype)
        for mod in self.modules():
            for attr in mod._params:
                p = getattr(mod, attr)
                if p is not None:
                    p._value = p.value.astype(dtype)
                    p._grad = np.zeros_like(p.value)
            if hasattr(mod, "_dtype"):  # (first: buffers of the layer's dtype are set)
                mod._dtype = dtype
            for attr in mod._buffers:
                buf = getattr(mod, attr)
                if buf.dtype.kind == "f":
                    setattr(mod, attr, buf.astype(dtype))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    # -- training helpers (implemented in fastprop.train) -----------------------
    # (each one's full docstring is :mod:`fastprop.train`'s, copied there at import)
    def fit(self, X, y=None, *, loss=None, optimizer=None, epochs=1, batch_size=32,
            validation_data=None, validation_split=0.0, shuffle=True, seed=None, verbose=1,
            on_nonfinite="raise", checkpoint=None, checkpoint_every=1, resume=False,
            callbacks=None, clip_grad_norm=None, clip_grad_value=None, **unsupported):
        """Train on (X, y) with mini-batch gradient descent (:func:`fastprop.train.fit`)."""
        from .train import fit
        return fit(self, X, y, loss=loss, optimizer=optimizer, epochs=epochs,
                   batch_size=batch_size, validation_data=validation_data,
                   validation_split=validation_split, shuffle=shuffle, seed=seed,
                   verbose=verbose, on_nonfinite=on_nonfinite, checkpoint=checkpoint,
                   checkpoint_every=checkpoint_every, resume=resume, callbacks=callbacks,
                   clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
                   **unsupported)

    def predict(self, X, batch_size=1024):
        """The forward pass of X in eval mode, ``batch_size`` rows at a time
        (:func:`fastprop.train.predict`)."""
        from .train import predict
        return predict(self, X, batch_size=batch_size)

    def evaluate(self, X, y, loss=None, batch_size=1024, return_dict=False):
        """Mean loss on (X, y) in eval mode, ``batch_size`` rows at a time;
        ``return_dict``: with the accuracy (:func:`fastprop.train.evaluate`)."""
        from .train import evaluate
        return evaluate(self, X, y, loss=loss, batch_size=batch_size, return_dict=return_dict)

    def compile(self, loss, optimizer, *, clip_grad_norm=None, clip_grad_value=None):
        """A whole training step ``step(x, y) -> loss`` (:func:`fastprop.train.compile_step`;
        ``clip_grad_norm``/``clip_grad_value`` clip the gradients before each update)."""
        from .train import compile_step
        return compile_step(self, loss, optimizer, clip_grad_norm=clip_grad_norm,
                            clip_grad_value=clip_grad_value)


def _grad_out(p):
    """Where a backward adds ``p``'s gradient: ``p.grad``, or a scratch array that is
    dropped when ``p`` is frozen (None for no parameter).  (Only a trainable one is
    marked as having a gradient: PyTorch's frozen one keeps grad None.)"""
    if p is None:
        return None
    return p.grad if p.requires_grad else np.zeros_like(p._grad)


def _mark_grads(*params):
    """Mark trainable parameters as having a gradient (zeros) where a backward adds
    nothing, an empty batch: PyTorch's gradient is a zero tensor there, not None, and
    its optimizer step updates them (momentum, weight decay)."""
    for p in params:
        if p is not None and p.requires_grad:
            p._no_grad = False


def _apart(arr, written):
    """``arr``, or a copy of it where it shares memory with one of the arrays
    ``written`` (a kernel reads it while it writes those).  An array that owns its
    memory overlaps only itself and views of it (no np.may_share_memory calls: the
    common case of a tiny layer's backward)."""
    if arr.base is None:
        for a in written:
            base = a.base
            if a is arr or base is arr or (base is not None
                                           and not isinstance(base, np.ndarray)):
                break  # (overlapping, or a view through another buffer: ask NumPy)
        else:
            return arr
    for a in written:
        if np.may_share_memory(arr, a):
            return arr.copy()
    return arr


def _need(cache, name, module):
    if cache is None:
        raise RuntimeError(f"{type(module).__name__}.backward called before forward")
    return cache


def _input_dtype(x, name="x"):
    arr = as_array(x, name)
    return as_float(arr, name)


def _grad_like(grad_out, ref, module):
    g = as_float(grad_out, "grad_out", ref.dtype)
    if g.shape != ref.shape:
        raise ValueError(
            f"{type(module).__name__}.backward: grad_out must have the output's shape "
            f"{ref.shape}, got {g.shape}")
    return g


class Dense(Module):
    """Fully connected layer ``y = act(x @ weight + bias)``.

    Args:
        in_features, out_features: input and output widths.
        activation: None or one of "identity", "relu", "leaky_relu", "sigmoid", "tanh",
            "gelu" (tanh approximation), "gelu_erf" (exact, PyTorch's default GELU),
            "softmax".
        bias: whether to learn an additive bias.
        init: initializer name or callable ``f(shape, rng=, dtype=)`` for the weight
            (or one of ``fp.init``'s in-place ``xavier_*_``/``kaiming_*_``); None picks
            He uniform for this layer's own relu-like ``activation`` and Xavier uniform
            otherwise (a separate ReLU layer after it does not change that: pass
            ``activation="relu"`` or ``init="he_uniform"``).  The bias starts at zero
            (PyTorch's Linear draws it from U(-1/sqrt(in), 1/sqrt(in))).
        dtype: float32 (default) or float64.
        alpha: negative slope for leaky_relu.
        rng: seed or np.random.Generator for the initializer.

    Shape: input (batch, in_features) -> output (batch, out_features).
        ``weight`` is (in_features, out_features), ``bias`` (out_features,).

    ``forward`` keeps a reference to its input (no copy) for ``backward``: modifying
    that array in place between the two changes the weight gradient.

    Example:
        >>> layer = Dense(4, 3, activation="relu")
        >>> layer(np.ones((2, 4))).shape
        (2, 3)
    """

    _params = ("weight", "bias")
    _caches = ("_x", "_y", "_z")
    _attr_checks = {"alpha": lambda v: real(v, "alpha", low=0)}

    def __init__(self, in_features, out_features, activation=None, bias=True, init=None,
                 dtype=np.float32, alpha=0.01, rng=None):
        super().__init__()
        self.in_features = integer(in_features, "in_features", low=1)
        self.out_features = integer(out_features, "out_features", low=1)
        self.activation = activation  # (sets act, the kernels' code, too)
        self.alpha = real(alpha, "alpha", low=0)
        self._dtype = float_dtype(dtype)
        self.init = init
        shape = (self.in_features, self.out_features)
        if init is None:
            fn, gain = _init.default_for(activation, self.alpha)
            w = fn(shape, gain=gain, rng=rng, dtype=self._dtype)
        else:
            fn = _init.get(init)
            try:
                w = fn(shape, rng=rng, dtype=self._dtype)
            except TypeError as exc:
                if exc.__traceback__.tb_next is not None:
                    raise  # (raised inside the initializer: its own error)
                raise TypeError(
                    f"init {getattr(fn, '__name__', fn)!r} could not be called as "
                    f"f(shape, rng=, dtype=), which init= takes (or an initializer's "
                    f"name, or fp.init's in-place xavier_*_/kaiming_*_): {exc}") from exc
        w = np.asarray(w, dtype=self._dtype)
        if w.shape != shape:
            raise ValueError(f"init returned an array of shape {w.shape}, expected {shape}")
        self.weight = Parameter(w, "weight")
        bias = flag(bias, "bias")
        self.bias = Parameter(np.zeros(self.out_features, self._dtype), "bias") if bias else None
        self._x = self._y = self._z = None

    def __setstate__(self, state):
        # a Dense pickled before `activation` became a property kept the name in
        # `activation` itself
        state = dict(state)
        if "_activation" not in state and "activation" in state:
            state["_activation"] = state.pop("activation")
        # the kernel code from the name: codes are renumbered as activations are added
        # (softmax was 6 before gelu_erf took it)
        if "_activation" in state:
            state["act"] = activation_code(state["_activation"])
        self.__dict__.update(state)

    @property
    def activation(self):
        """The activation's name (None: identity); setting it changes the layer's
        activation (``act`` is its kernel code)."""
        return self._activation

    @activation.setter
    def activation(self, name):
        if name == "linear":  # (Keras' name)
            name = "identity"
        self.act = activation_code(name)
        self._activation = name

    @classmethod
    def _file_bytes(cls, config):
        n_in, n_out = config.get("in_features", 0), config.get("out_features", 0)
        if not all(isinstance(v, int) and v > 0 for v in (n_in, n_out)):
            return 0  # (the constructor refuses them)
        return 4 * (n_in * n_out + (n_out if config.get("bias", True) else 0))

    @classmethod
    def _from_file(cls, config, budget):
        # the file's arrays replace the weights: no random initialisation drawn for it
        config = dict(config)
        config.setdefault("init", "zeros")
        layer = super()._from_file(config, budget)
        layer.init = None
        return layer

    def get_config(self):
        cfg = {"in_features": self.in_features, "out_features": self.out_features,
               "activation": self.activation, "bias": self.bias is not None,
               "dtype": self._dtype.name}
        if self.act == ACTIVATIONS["leaky_relu"]:
            cfg["alpha"] = self.alpha
        return cfg

    def _check_input(self, x):
        arr = as_array(x, "x")
        if arr.ndim != 2 or arr.shape[1] != self.in_features:
            raise ValueError(
                f"Dense({self.in_features}, {self.out_features}): expected input of shape "
                f"(batch, {self.in_features}), got {arr.shape}")
        return c_array(arr, self._dtype)

    def _check_params(self):
        """ValueError naming the arrays when the parameters (assigned since, e.g.
        pruned) do not have the shapes the layer's sizes say; asked when a kernel
        refused them, not on assignment, which in a net surgery comes before the
        sizes are set."""
        shape = (self.in_features, self.out_features)
        if self.weight.value.shape != shape or (
                self.bias is not None and self.bias.value.shape != shape[1:]):
            raise ValueError(
                f"Dense({self.in_features}, {self.out_features}): weight must have shape "
                f"{shape} and bias {shape[1:]}, got {self.weight.value.shape} and "
                f"{None if self.bias is None else self.bias.value.shape}")

    def forward(self, x):
        x = self._check_input(x)
        n = x.shape[0]
        y = np.empty((n, self.out_features), self._dtype)
        z = np.empty_like(y) if self.act in PREACT_ACTIVATIONS else None
        if n:
            b = self.bias.value if self.bias is not None else None
            try:
                backends.current().linear_forward(x, self.weight.value, b, self.act,
                                                  self.alpha, y, z)
            except ValueError:
                self._check_params()  # (the parameters' shapes, named, where they are off)
                raise
        else:
            self._check_params()  # (no kernel ran to refuse them)
        if _keeps():
            d = self.__dict__  # (private caches: no __setattr__ call each, ~1 us a forward)
            d["_x"], d["_y"], d["_z"] = x, y, z
        return y

    def backward(self, grad_out, input_grad=True):
        x = _need(self._x, "x", self)
        g = _grad_like(grad_out, self._y, self)
        n = x.shape[0]
        grad_x = np.empty_like(x) if input_grad else None
        frozen = not self.weight.requires_grad and (self.bias is None
                                                    or not self.bias.requires_grad)
        if n == 0 or (frozen and not input_grad):  # (a frozen first layer: nothing to do)
            _mark_grads(self.weight, self.bias)
            return grad_x
        work = None if self.act == 0 else np.empty_like(g)
        grad_w, grad_b = _grad_out(self.weight), _grad_out(self.bias)
        # (an input that is one of the gradients written, e.g. backward(layer.weight.grad):
        # the kernels read it while they write those, so read a copy)
        written = [a for a in (grad_w, grad_b) if a is not None]
        g, x = _apart(g, written), _apart(x, written)
        backends.current().linear_backward(
            g, x, self.weight.value, self._y, self._z, self.act, self.alpha, grad_x,
            grad_w, grad_b, work, True)
        return grad_x

    def _backward_shapes(self):
        x = self._x
        if x is None:
            _need(x, "x", self)
        return x.shape, self._y.shape


class Activation(Module):
    """Elementwise activation layer (softmax: over the last axis)."""

    _caches = ("_x", "_y")
    name = "identity"

    def __init__(self):
        super().__init__()
        self.act = ACTIVATIONS[self.name]
        self.alpha = 0.01
        self._x = self._y = None

    def __setstate__(self, state):
        # the kernel code from the class's activation: codes are renumbered as
        # activations are added (softmax was 6 before gelu_erf took it; a GELU's code
        # says which form, and both have kept theirs)
        state = dict(state)
        if type(self).name != "gelu" and type(self).name in ACTIVATIONS:
            state["act"] = ACTIVATIONS[type(self).name]
        self.__dict__.update(state)

    def forward(self, x):
        x = _input_dtype(x)
        if self.act == ACTIVATIONS["softmax"] and x.ndim == 0:
            raise ValueError("Softmax needs at least 1-D input")
        y = np.empty_like(x)
        if x.size:
            backends.current().activation_forward(self.act, self.alpha, x, y)
        if _keeps():
            self._x, self._y = x, y
        return y

    def backward(self, grad_out, input_grad=True):
        y = _need(self._y, "y", self)
        g = _grad_like(grad_out, y, self)
        grad_x = np.empty_like(g)
        if g.size:
            backends.current().activation_backward(self.act, self.alpha, g, self._x, y, grad_x)
        return grad_x

    def _backward_shapes(self):
        shape = _need(self._y, "y", self).shape
        return shape, shape


class Identity(Activation):
    """The identity (a copy of its input); Keras' "linear"."""
    name = "identity"


class ReLU(Activation):
    """max(x, 0).  ``inplace`` is accepted for PyTorch code and has no effect."""
    name = "relu"

    def __init__(self, inplace: bool = False):
        super().__init__()
        flag(inplace, "inplace")


class Sigmoid(Activation):
    """1 / (1 + exp(-x)), elementwise."""
    name = "sigmoid"


class Tanh(Activation):
    """tanh(x), elementwise."""
    name = "tanh"


class GELU(Activation):
    """GELU.  ``approximate="tanh"`` (the default here, kept for the models written
    with it): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), activation "gelu";
    ``approximate="none"`` (PyTorch's default): the exact x Phi(x), Phi the normal CDF,
    activation "gelu_erf".  The two differ by up to 4.7e-4."""
    name = "gelu"

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        self.approximate = approximate

    @property
    def approximate(self) -> str:
        """"tanh" or "none" (exact); settable."""
        return "tanh" if self.act == ACTIVATIONS["gelu"] else "none"

    @approximate.setter
    def approximate(self, value) -> None:
        if value not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', got {value!r}")
        self.act = ACTIVATIONS["gelu" if value == "tanh" else "gelu_erf"]

    def get_config(self):
        return {} if self.approximate == "tanh" else {"approximate": "none"}


class Softmax(Activation):
    """Softmax over the last axis.  ``dim`` is PyTorch's argument: any value naming
    the last axis of the input (-1, or 1 for the usual (batch, classes)); another
    axis is a ValueError at forward."""
    name = "softmax"
    _attr_checks = {"dim": lambda v: integer(v, "dim")}
    dim = -1  # (a Softmax pickled before it had dim)

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = integer(-1 if dim is None else dim, "dim")

    def get_config(self):
        return {} if self.dim == -1 else {"dim": self.dim}

    def forward(self, x):
        ndim = np.ndim(x)
        if ndim and self.dim not in (-1, ndim - 1):
            raise ValueError(f"Softmax(dim={self.dim}) on a {ndim}-D input: fastprop's "
                             f"Softmax normalises the last axis (dim=-1 or {ndim - 1})")
        return super().forward(x)


class LeakyReLU(Activation):
    """max(x, 0) + alpha min(x, 0), alpha >= 0 (``negative_slope``, PyTorch's name for
    alpha, is accepted too; ``inplace`` is accepted and has no effect)."""
    name = "leaky_relu"
    _attr_checks = {"alpha": lambda v: real(v, "alpha", low=0)}

    def __init__(self, alpha=None, inplace: bool = False, *, negative_slope=None):
        super().__init__()
        flag(inplace, "inplace")
        if alpha is not None and negative_slope is not None:
            raise TypeError("give alpha or negative_slope (PyTorch's name for it), not both")
        alpha = negative_slope if alpha is None else alpha
        self.alpha = real(0.01 if alpha is None else alpha, "alpha", low=0)

    def get_config(self):
        return {"alpha": self.alpha}


class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability ``p`` and
    scale the rest by 1/(1-p); identity in eval mode.

    Args:
        p: drop probability in [0, 1].
        seed: seed of the layer's own generator (fit(seed=...) reseeds it).
        inplace: PyTorch's; accepted and without effect (the output is a new array,
            the input is left alone).
    """

    _caches = ("_mask", "_shape")
    _attr_checks = {"p": lambda v: real(v, "p", low=0, high=1)}

    def _kept_caches(self):
        return () if self.freeze_mask else self._caches

    def __init__(self, p=0.5, seed=None, *, inplace: bool = False):
        super().__init__()
        flag(inplace, "inplace")  # (PyTorch's; no effect)
        if isinstance(seed, (bool, np.bool_)):  # (PyTorch's Dropout(p, True) is inplace)
            raise TypeError("seed must be an int, a Generator or None, got a bool (PyTorch's "
                            "second argument, inplace, is inplace=True here)")
        self.p = real(p, "p", low=0, high=1)
        self.seed = seed
        # (without a seed: from fp.init.seed's sequence when one was set, as the
        # layers' initial weights; else fresh entropy)
        self.rng = _init._mask_generator() if seed is None else np.random.default_rng(seed)
        self._mask = None
        self._shape = None        # the last forward's shape (backward checks against it)
        self.freeze_mask = False  # reuse the last mask (used by gradcheck)

    def __setstate__(self, state):
        # a Dropout pickled before backward checked its input has no `_shape`
        self.__dict__.update(state)
        self.__dict__.setdefault("_shape", None if self._mask is None else self._mask.shape)

    def get_config(self):
        # (an integer seed is kept; a Generator or SeedSequence cannot be written out)
        seed = int(self.seed) if isinstance(self.seed, (int, np.integer)) else None
        return {"p": self.p, "seed": seed}

    def forward(self, x):
        x = _input_dtype(x)
        if not self.training or self.p == 0:
            if _keeps():
                self._shape, self._mask = x.shape, None
            return x.copy()
        self._shape = x.shape
        if not (self.freeze_mask and self._mask is not None and self._mask.shape == x.shape):
            keep = self.rng.random(x.shape) >= self.p
            scale = 0.0 if self.p >= 1 else 1.0 / (1.0 - self.p)
            self._mask = keep.astype(x.dtype) * x.dtype.type(scale)
        return x * self._mask

    def backward(self, grad_out, input_grad=True):
        g = as_float(grad_out, "grad_out")
        shape = _need(self._shape, "shape", self)
        if g.shape != shape:
            raise ValueError(f"Dropout.backward: grad_out must have the output's shape "
                             f"{shape}, got {g.shape}")
        if self._mask is None:
            return g.copy()
        return g * self._mask.astype(g.dtype, copy=False)

    def _backward_shapes(self):
        shape = _need(self._shape, "shape", self)
        return shape, shape


def _check_eps(v):
    return real(v, "eps", low=0, low_inclusive=False)


class _Norm(Module):
    _params = ("weight", "bias")
    _caches = ("_cache",)
    _attr_checks = {"eps": _check_eps}

    def _backward_shapes(self):
        cache = _need(self._cache, "cache", self)
        shape = (cache[1] if len(cache) == 2 else cache[0]).shape  # (BN eval: ("eval", x))
        return shape, shape

    def __init__(self, num_features, eps, dtype, weight=True, bias=True):
        super().__init__()
        self.num_features = integer(num_features, "num_features", low=1)
        self.eps = real(eps, "eps", low=0, low_inclusive=False)
        self._dtype = float_dtype(dtype)
        self.weight = (Parameter(np.ones(self.num_features, self._dtype), "weight")
                       if weight else None)
        self.bias = (Parameter(np.zeros(self.num_features, self._dtype), "bias")
                     if bias else None)
        self._cache = None

    @classmethod
    def _file_bytes(cls, config):
        n = config.get("num_features", 0)
        return 4 * cls._file_arrays(config) * n if isinstance(n, int) and n > 0 else 0

    def _scale_shift(self):
        """(scale, shift) arrays for the kernels: the parameters', or ones / zeros
        for those the layer does not have (affine=False, bias=False)."""
        w, b = self.weight, self.bias
        if w is not None and b is not None:
            return w.value, b.value
        return (np.ones(self.num_features, self._dtype) if w is None else w.value,
                np.zeros(self.num_features, self._dtype) if b is None else b.value)

    def _grads(self):
        """Where the kernels add the scale and shift gradients (scratch arrays for a
        frozen or absent parameter)."""
        return tuple(np.zeros(self.num_features, self._dtype) if p is None else _grad_out(p)
                     for p in (self.weight, self.bias))

    def _check_input(self, x):
        arr = as_array(x, "x")
        if arr.ndim != 2 or arr.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}): expected input of shape "
                f"(batch, {self.num_features}), got {arr.shape}")
        return c_array(arr, self._dtype)

    def _check_arrays(self):
        """ValueError naming the parameter or statistic whose shape (assigned since,
        e.g. pruned) is not (num_features,); asked when a kernel refused them."""
        shape = (self.num_features,)
        for name in self._params + tuple(self._buffers):
            a = getattr(self, name, None)
            a = a.value if isinstance(a, Parameter) else a
            if isinstance(a, np.ndarray) and a.ndim and a.shape != shape:
                raise ValueError(f"{type(self).__name__}({self.num_features}): {name} must "
                                 f"have shape {shape}, got {a.shape}")
            if (name in self._buffers and isinstance(a, np.ndarray) and a.ndim
                    and not (a.flags.writeable and a.flags.c_contiguous)):
                raise ValueError(f"{type(self).__name__}({self.num_features}): {name} must "
                                 f"be a writable C-contiguous array (training updates it "
                                 f"in place)")

    def forward(self, x):
        try:
            return self._forward(x)
        except ValueError:
            self._check_arrays()  # (arrays of other sizes assigned: named)
            raise


def _check_momentum(v):
    if v is None:
        return None
    v = real(v, "momentum", low=0, high=1)
    # (Keras' 0.99 or 0.9 ported as is: inference on the last few batches; 1, the
    # last batch alone, is a PyTorch idiom; a saved model was warned about when made)
    if 0.5 < v < 1 and not _loading.get():
        warn_user(
            f"BatchNorm1d momentum={v} weighs each new batch by {v} in the running "
            f"statistics (PyTorch's meaning); Keras' momentum is the weight of the old "
            f"value: its momentum={v} is momentum={1 - v:.3g} here")
    return v


_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_COUNT_KEY = ".num_batches_tracked"  # (optional in state dicts and files)


def _check_count_array(arr, where) -> None:
    """ValueError unless ``arr`` (a loaded ``num_batches_tracked``) is a whole number
    in [0, 2^63) (a negative count made the cumulative average divide by zero)."""
    a = np.asarray(arr)
    ok = a.shape == () and a.dtype.kind in "iuf"
    if ok:
        v = a.item()
        ok = v == v and v >= 0 and v < 2 ** 63 and float(v).is_integer()
    if not ok:
        raise ValueError(f"{where}: a batch count (num_batches_tracked) must be a whole "
                         f"number >= 0, got {a!r}")


def _check_count(v):
    """``num_batches_tracked``: a writable 0-d int64 array (an int or a 0-d integer
    array converted; the kernel counts in place), or None without statistics."""
    if v is None or (isinstance(v, np.ndarray) and v.shape == () and v.dtype == np.int64
                     and v.flags.writeable and v >= 0):
        return v
    if isinstance(v, np.ndarray) and v.shape == () and v.dtype.kind in "iu":
        v = v.item()
    return np.array(integer(v, "num_batches_tracked", low=0), np.int64)


class BatchNorm1d(_Norm):
    """Batch normalization over the batch axis of (batch, features) input.

    Training normalizes with the batch mean and biased variance and updates the
    running statistics (running_var uses the unbiased variance, as PyTorch);
    eval mode normalizes with the running statistics.

    Args:
        num_features: feature count; eps: added to the variance; momentum: weight of
        the new batch statistic in the running averages, in [0, 1], or None for
        their cumulative average (as PyTorch's: the k-th training batch counted in
        the buffer ``num_batches_tracked``, kept whatever the momentum, weighs 1/k);
        affine: learn a scale and shift (``weight``, ``bias``);
        track_running_stats: keep running statistics (False: batch statistics in
        eval mode too, and no buffers), as PyTorch's; dtype: of the parameters and
        statistics (float32 or float64; input is converted to it).
    """

    _buffers = _BN_BUFFERS
    _attr_checks = {"eps": _check_eps, "momentum": _check_momentum,
                    "num_batches_tracked": _check_count}

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=np.float32, *,
                 affine=True, track_running_stats=True):
        affine = flag(affine, "affine")
        track = flag(track_running_stats, "track_running_stats")
        super().__init__(num_features, eps, dtype, affine, affine)
        self.affine, self.track_running_stats = affine, track
        if track:
            self.running_mean = np.zeros(self.num_features, self._dtype)
            self.running_var = np.ones(self.num_features, self._dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:  # (a subclass' own buffers stay)
            self._buffers = tuple(b for b in type(self)._buffers if b not in _BN_BUFFERS)
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.momentum = momentum  # (checked by __setattr__)

    def __setattr__(self, name, value):
        if name == "running_mean" or name == "running_var":
            value = self._statistic(name, value)
        super().__setattr__(name, value)

    def _statistic(self, name, value):
        """A running statistic as assigned (ported ones, pruned ones): None, or a NumPy
        array of the layer's dtype, kept as given when training can update it in place
        (else a C-contiguous copy); its shape is checked by forward (named there)."""
        if value is None:
            return None
        if not isinstance(value, np.ndarray):
            raise TypeError(f"cannot assign {type(value).__name__} as {name!r} of "
                            f"BatchNorm1d (a NumPy array or None expected)")
        dtype = self.__dict__.get("_dtype")
        if dtype is not None and value.dtype != dtype:
            raise TypeError(f"cannot assign a {value.dtype} array as {name!r} of a {dtype} "
                            f"BatchNorm1d (convert it: .astype(np.{dtype.name}))")
        if type(value) is not np.ndarray or not (value.flags.c_contiguous
                                                 and value.flags.writeable):
            value = np.array(value, order="C", subok=False)  # (training writes it)
        return value

    def __setstate__(self, state):
        # (one pickled before the batch count was kept for every momentum has none)
        state = dict(state)
        if state.get("running_mean") is not None and state.get(
                "num_batches_tracked") is None:
            state["num_batches_tracked"] = np.zeros((), np.int64)
        self.__dict__.update(state)

    @staticmethod
    def _file_arrays(config) -> int:
        """The per-feature arrays a file of this config holds."""
        affine = 2 * (config.get("affine", True) is not False)
        return affine + 2 * (config.get("track_running_stats", True) is not False)

    def get_config(self):
        config = {"num_features": self.num_features, "eps": self.eps,
                  "momentum": self.momentum, "dtype": self._dtype.name}
        if not getattr(self, "affine", True):
            config["affine"] = False
        if not getattr(self, "track_running_stats", True):
            config["track_running_stats"] = False
        return config

    def _forward(self, x):
        x = self._check_input(x)
        n = x.shape[0]
        y = np.empty_like(x)
        be = backends.current()
        gamma, beta = self._scale_shift()
        tracks = self.running_mean is not None
        if tracks != (self.running_var is not None):
            raise ValueError("BatchNorm1d: running_mean and running_var must both be None "
                             "or neither (PyTorch's rule)")
        if (not self.training and tracks) or n == 0:  # (an empty batch: an empty output,
            if n:                                      # as PyTorch's, no statistics)
                be.batchnorm_forward_eval(x, gamma, beta, self.running_mean,
                                          self.running_var, self.eps, y)
            if _keeps():
                self._cache = ("eval", x)
            return y
        if n < 2:
            raise ValueError(
                f"BatchNorm1d needs more than 1 sample per batch in training mode"
                f"{'' if tracks else ' (and without running statistics, in eval mode)'}"
                f", got {n}")
        mean = np.empty(self.num_features, self._dtype)
        invstd = np.empty_like(mean)
        fused = getattr(be, "batchnorm_forward_train", None)
        if self.training and tracks and fused is not None:
            # (the forward and the running statistics from one pass over the column
            # statistics: the same results as the two calls below)
            self._track(x, lambda m, rm, rv: fused(x, gamma, beta, self.eps, y, mean, invstd,
                                                   m, rm, rv))
        else:
            be.batchnorm_forward(x, gamma, beta, self.eps, y, mean, invstd)
            if self.training and tracks:
                self._track(x)
        if _keeps():
            self._cache = (x, mean, invstd)
        return y

    def _track(self, x, update=None):
        # (the kernel recomputes the batch mean and the exact unbiased variance from x
        # in double: one from invstd would carry its rounding times (var + eps) / var)
        # (statistics of another size: the kernel refuses them before either changes,
        # and forward names them)
        # update(momentum, running_mean, running_var): the kernel call that updates
        # them (default: batchnorm_running_update of x)
        rm, rv = self.running_mean, self.running_var  # (in place: no attribute set)
        count = self.num_batches_tracked
        m = self.momentum
        if m is None:  # (the cumulative average: the k-th batch weighs 1/k)
            m = 1.0 / (float(count) + 1.0)
        if update is None:
            backends.current().batchnorm_running_update(x, m, rm, rv)
        else:
            update(m, rm, rv)
        np.add(count, 1, out=count)  # (every batch, as PyTorch's: a momentum set to
                                     # None later averages them all; in place)

    def backward(self, grad_out, input_grad=True):
        if self._cache is None:
            raise RuntimeError("BatchNorm1d.backward called before forward")
        gamma, _ = self._scale_shift()
        if len(self._cache) == 2:
            # eval mode is an affine map with the running statistics (frozen BN)
            x = self._cache[1]
            g = _grad_like(grad_out, x, self).astype(np.float64)
            if x.shape[0] == 0 or self.running_mean is None:  # (an empty batch)
                _mark_grads(self.weight, self.bias)
                return g.astype(self._dtype)
            inv = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
            xhat = (x - self.running_mean) * inv
            if self.weight is not None and self.weight.requires_grad:
                self.weight.grad += (g * xhat).sum(axis=0).astype(self._dtype)
            if self.bias is not None and self.bias.requires_grad:
                self.bias.grad += g.sum(axis=0).astype(self._dtype)
            return (g * (gamma * inv)).astype(self._dtype)
        x, mean, invstd = self._cache
        g = _grad_like(grad_out, x, self)
        grad_x = np.empty_like(x)
        backends.current().batchnorm_backward(g, x, gamma, mean, invstd, grad_x,
                                              *self._grads())
        return grad_x


class LayerNorm(_Norm):
    """Layer normalization over the feature axis of (batch, features) input, with a
    learned per-feature scale (``weight``) and shift (``bias``); as PyTorch's,
    ``elementwise_affine=False`` learns neither and ``bias=False`` no shift.  ``eps``
    is added to each row's variance; ``dtype`` (float32 or float64) is the parameters'
    (input is converted to it)."""

    def __init__(self, num_features, eps=1e-5, dtype=np.float32, *,
                 elementwise_affine=True, bias=True):
        affine = flag(elementwise_affine, "elementwise_affine")
        shift = flag(bias, "bias")
        super().__init__(num_features, eps, dtype, affine, affine and shift)
        self.elementwise_affine = affine

    @staticmethod
    def _file_arrays(config) -> int:
        """The per-feature arrays a file of this config holds."""
        affine = config.get("elementwise_affine", True) is not False
        return affine + (affine and config.get("bias", True) is not False)

    def get_config(self):
        config = {"num_features": self.num_features, "eps": self.eps,
                  "dtype": self._dtype.name}
        if not getattr(self, "elementwise_affine", True):
            config["elementwise_affine"] = False
        elif self.bias is None:
            config["bias"] = False
        return config

    def _forward(self, x):
        x = self._check_input(x)
        n = x.shape[0]
        y = np.empty_like(x)
        mean = np.empty(n, self._dtype)
        invstd = np.empty(n, self._dtype)
        if n:
            gamma, beta = self._scale_shift()
            backends.current().layernorm_forward(x, gamma, beta, self.eps, y, mean, invstd)
        if _keeps():
            self._cache = (x, mean, invstd)
        return y

    def backward(self, grad_out, input_grad=True):
        x, mean, invstd = _need(self._cache, "cache", self)
        g = _grad_like(grad_out, x, self)
        grad_x = np.empty_like(x)
        if x.shape[0]:
            backends.current().layernorm_backward(g, x, self._scale_shift()[0], mean,
                                                  invstd, grad_x, *self._grads())
        else:
            _mark_grads(self.weight, self.bias)
        return grad_x


def _shapes_of(module):
    """``module._backward_shapes()`` for fastprop's own classes; (None, None) for any
    other, a user's subclass included (its forward may reshape, or keep other caches)."""
    if type(module).__module__ != __name__:
        return None, None
    return module._backward_shapes()


# (set while a Sequential's backward runs: the containers inside it were checked with
# it, and skip their own check, which would make deep nesting quadratic)
_chain_checked = contextvars.ContextVar("fastprop_chain_checked", default=False)


def _unchecked_backward(module, *args):
    """``module.backward(*args)`` for a user's module inside a checked
    Sequential: the containers inside it check their own chain (the outer check does
    not look inside a user's class)."""
    prev = _chain_checked.get()
    try:
        _chain_checked.set(False)
        return module.backward(*args)
    finally:
        _chain_checked.set(prev)


def _walk(root):
    """:meth:`Module.modules`: pre-order, a module on the current path (a cycle) not
    entered again.  (A stack of iterators, not a recursive closure, which left a
    reference cycle for the garbage collector on every call.)"""
    path = {id(root)}
    yield root
    stack = [(root, iter(root.children()))]
    while stack:
        mod, kids = stack[-1]
        for child in kids:
            if id(child) not in path:
                path.add(id(child))
                yield child
                stack.append((child, iter(child.children())))
                break
        else:
            stack.pop()
            path.discard(id(mod))


def _check_each_module_once(root, where):
    """ValueError if a module instance occurs twice in ``root``'s tree: each module
    keeps the inputs of its last forward for its backward, so a second use in the same
    pass would give the first use's backward the wrong inputs (silently wrong
    gradients).  Weight tying shares a Parameter between two modules instead."""
    seen = set()
    todo = [root]  # (every edge, back-references too: modules() skips those; a stack,
    while todo:    # not a recursive closure, which left a reference cycle per call)
        mod = todo.pop()
        if id(mod) in seen:
            raise ValueError(
                f"{where}: the same {type(mod).__name__} instance is used twice; a module "
                f"keeps its last forward's inputs for backward, so each use needs its own "
                f"instance (to tie weights, share the Parameter: b.weight = a.weight; a "
                f"module of yours holding one twice, as an alias, is refused too)")
        seen.add(id(mod))
        todo.extend(reversed(mod.children()))


_KEEPS = "keeps"  # (a layer that keeps its input's width)


def _widths(module):
    """(in, out) feature counts of fastprop's own layers and of Sequentials of them,
    ``_KEEPS`` for one that keeps its input's width, None where unknown (a user's
    class, a chain that does not fit)."""
    if type(module).__module__ != __name__:
        return None
    if isinstance(module, Dense):  # (its weight's: net surgery may have replaced it)
        shape = module.weight.value.shape
        return tuple(shape) if len(shape) == 2 else None
    if isinstance(module, (Activation, Dropout, Residual, _Norm)):
        return _KEEPS
    if isinstance(module, Sequential):
        ends = _KEEPS
        for layer in module.layers:
            w = _widths(layer)
            if w is None or (w is not _KEEPS and ends is not _KEEPS and ends[1] != w[0]):
                return None
            if w is not _KEEPS:
                ends = w if ends is _KEEPS else (ends[0], w[1])
        return ends
    return None


class Residual(Module):
    """Skip connection ``y = x + block(x)``; the block must keep the shape (a block of
    fastprop's layers that does not is refused when made, and before it runs)."""

    _caches = ("_out",)  # (an empty array of the output's shape and dtype: no data)

    def __init__(self, block):
        super().__init__()
        if not isinstance(block, Module):
            raise TypeError(f"block must be a fastprop Module, got {type(block).__name__}")
        self.block = block
        _check_each_module_once(self, "Residual")
        self._block_widths()
        self._widths_at = -1

    def _block_widths(self):
        """ValueError if the block, of fastprop's layers, maps n features to m != n
        (known from its layers' sizes: refused before it runs and changes a
        BatchNorm's statistics or draws Dropout masks)."""
        w = _widths(self.block)
        if w is not None and w is not _KEEPS and w[0] != w[1]:
            raise ValueError(f"Residual: the block maps {w[0]} features to {w[1]}; a skip "
                             f"connection needs the same width (add a projection Dense "
                             f"outside the Residual)")

    def children(self):
        return [self.block] + self._extra_children([self.block])

    def get_config(self):
        return {}

    def __repr__(self):
        inner = repr(self.block).replace("\n", "\n  ")
        return f"Residual(\n  {inner}\n)"

    def forward(self, x):
        x = _input_dtype(x)
        if self.__dict__.get("_widths_at") != _structure[0]:  # (the block changed since)
            self._block_widths()
            self._widths_at = _structure[0]
        h = self.block.forward(x)
        if h.shape != x.shape:
            raise ValueError(
                f"Residual: the block maps shape {x.shape} to {h.shape}; they must match")
        if _keeps():
            self._out = np.broadcast_to(np.empty((), h.dtype), h.shape)
        return h + x

    def backward(self, grad_out, input_grad=True):
        g = _grad_like(grad_out, _need(self.__dict__.get("_out"), "_out", self), self)
        block = self.block
        if type(block).__module__ == __name__:
            return g + block.backward(g)
        return g + _unchecked_backward(block, g)

    def _backward_shapes(self):
        shape = _need(self.__dict__.get("_out"), "_out", self).shape
        for got in _shapes_of(self.block):
            if got is not None and tuple(got) != shape:
                raise ValueError(
                    f"Residual.backward: its block's last forward was on shape {tuple(got)}, "
                    f"the Residual's on {shape} (was the block run alone since?); "
                    f"run the model's forward again")
        return shape, shape


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    ``.layers`` is the list of modules; a Sequential is iterable, indexable (a slice
    gives a Sequential sharing the layers) and has ``len``.  Each module instance may
    occur once in a model (ValueError otherwise: a module keeps its last forward's
    inputs for backward); tied weights share a Parameter between two modules.

    Example:
        >>> model = Sequential(Dense(64, 128, "relu"), Dense(128, 10))
        >>> model.predict(np.zeros((5, 64))).shape
        (5, 10)
    """

    _holds_layers = True

    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"layer {i} must be a fastprop Module, got {type(layer).__name__}")
        self.layers = _LayerList(layers)
        _check_each_module_once(self, "Sequential")

    def children(self):
        layers = list(self.layers)
        return layers + self._extra_children(layers)

    def append(self, layer):
        """Append ``layer``; returns self."""
        return self._edit(lambda ls: ls.append(layer), "Sequential.append")

    def _edit(self, edit, where):
        """Apply ``edit`` to the layer list; undone if the result holds a non-module
        or a module twice (TypeError / ValueError)."""
        before = list(self.layers)
        try:
            edit(self.layers)
            for i, layer in enumerate(self.layers):
                if not isinstance(layer, Module):
                    raise TypeError(f"layer {i} must be a fastprop Module, got "
                                    f"{type(layer).__name__}")
            _check_each_module_once(self, where)
        except BaseException:
            self.layers[:] = before
            raise
        return self

    def insert(self, index, layer):
        """Insert ``layer`` before ``index`` (as PyTorch's: -len <= index <= len, an
        IndexError otherwise); returns self."""
        index = integer(index, "index")
        if not -len(self.layers) <= index <= len(self.layers):
            raise IndexError(f"Sequential.insert: index {index} out of range for "
                             f"{len(self.layers)} layers")
        return self._edit(lambda ls: ls.insert(index, layer), "Sequential.insert")

    def extend(self, layers):
        """Append each of ``layers`` (as PyTorch's); returns self."""
        layers = list(layers)
        return self._edit(lambda ls: ls.extend(layers), "Sequential.extend")

    def pop(self, index=-1):
        """Remove and return the layer at ``index``."""
        layer = self.layers[index]
        self._edit(lambda ls: ls.pop(index), "Sequential.pop")
        return layer

    def __setitem__(self, index, layer):
        if isinstance(index, slice):
            layer = list(layer)
        self._edit(lambda ls: ls.__setitem__(index, layer), "Sequential[...] =")

    def __delitem__(self, index):
        self._edit(lambda ls: ls.__delitem__(index), "del Sequential[...]")

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(*self.layers[index])
        return self.layers[index]

    def __repr__(self):
        lines = [f"  ({i}): " + repr(layer).replace("\n", "\n  ")
                 for i, layer in enumerate(self.layers)]
        return "Sequential(\n" + "\n".join(lines) + "\n)" if lines else "Sequential()"

    def _layers_key(self):
        """What the Sequential's caches are keyed by: the structure counter and the
        layers themselves (a plain list assigned to .layers and edited in place does not
        bump the counter)."""
        return _structure[0], tuple(map(id, self.layers))

    def forward(self, x):
        key = self._layers_key()
        if self.__dict__.get("_checked_at") != key:
            # the layer list may have been edited in place since (insert, +=, ...)
            _check_each_module_once(self, "Sequential")
            self._checked_at = key
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def _frozen_prefix(self) -> int:
        """How many leading layers backward may skip when no input gradient is asked
        for: fastprop's own modules without a trainable parameter (a frozen
        pretrained body: nothing there needs a gradient, as PyTorch builds no graph
        for it).  A user's module ends the prefix (its backward may do more)."""
        key = self._layers_key()
        cached = self.__dict__.get("_prefix_at")
        if cached is not None and cached[0] == key:
            return cached[1]
        count = 0
        for layer in self.layers:
            mods = layer.modules()
            if any(type(m).__module__ != __name__ for m in mods) or any(
                    p.requires_grad for p in layer.parameters()):
                break
            count += 1
        self.__dict__["_prefix_at"] = (key, count)
        return count

    def _chain(self, first=0):
        """The backward shapes of layers[first:], checked to chain (see
        :meth:`Module._backward_shapes`)."""
        layers = self.layers
        start = prev = None
        for i in range(first, len(layers)):
            layer = layers[i]
            # (fastprop's own classes only: a user's subclass may reshape, or keep
            # other caches; _shapes_of, inlined: this runs on every backward)
            if type(layer).__module__ == __name__:
                shape_in, shape_out = layer._backward_shapes()
            else:
                shape_in = shape_out = None
            if i == first:
                start = shape_in
            elif prev != shape_in and prev is not None and shape_in is not None:
                raise ValueError(
                    f"Sequential.backward: layer {i - 1} ({type(layers[i - 1]).__name__})'s "
                    f"last forward gave shape {tuple(prev)}, but layer {i} "
                    f"({type(layers[i]).__name__})'s last forward took {tuple(shape_in)} "
                    f"(was a layer run alone since?); run the model's forward again")
            prev = shape_out
        return start, prev

    def _backward_shapes(self):
        return self._chain() if self.layers else (None, None)

    def backward(self, grad_out, input_grad=True):
        if not self.layers:  # (the identity: its gradient is grad_out, checked)
            return as_float(grad_out, "grad_out")
        g = grad_out
        if input_grad is not True and input_grad is not False:
            input_grad = flag(input_grad, "input_grad")
        first = 0 if input_grad else self._frozen_prefix()
        checked = _chain_checked.get()
        if not checked:
            self._chain(first)  # (refused before any layer adds to a gradient)
        try:
            if not checked:
                _chain_checked.set(True)
            for i in range(len(self.layers) - 1, first - 1, -1):
                layer = self.layers[i]
                if type(layer).__module__ == __name__:
                    g = layer.backward(g, input_grad if i == first else True)
                else:  # (a user's module: the containers inside it were not checked)
                    g = _unchecked_backward(layer, g, input_grad if i == first else True)
        finally:
            if not checked:
                _chain_checked.set(False)
        return None if first and not input_grad else g
