"""Optimizers, ordered by increasing complexity: SGD, Adagrad, RMSprop, Adam/AdamW.

Each ``step()`` updates every parameter in place with one backend call per dtype
(the kernels of :mod:`fastprop.backends`), reading ``Parameter.grad``.  State
(momentum buffers, moments) is created lazily at the first step.  Semantics follow
PyTorch: ``weight_decay`` is L2 added to the gradient, except in AdamW where it is
decoupled (``p *= 1 - lr * wd``).

A step validates every gradient before it changes anything, so a rejected step leaves
parameters and state unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import sys

import numpy as np

from . import backends
from ._checks import as_array, flag, real
from .nn import Module, Parameter

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "clip_grad_norm",
           "clip_grad_value", "clip_grad_norm_", "clip_grad_value_", "get"]


def _param_list(params) -> list:
    if isinstance(params, Module):
        params = params.parameters()
    elif isinstance(params, Parameter):
        raise TypeError("params must be an iterable of Parameters (e.g. model.parameters()), "
                        "got a single Parameter")
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"params must be an iterable of Parameters, got "
                        f"{type(params).__name__}") from None
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    seen = set()
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise TypeError(f"params[{i}] must be a fastprop Parameter, got {type(p).__name__}")
        if id(p) in seen:
            raise ValueError(f"params[{i}] appears more than once in the parameter list")
        seen.add(id(p))
    return params


_UPDATE_TAKES_STEP: dict = {}
_INIT_ACCEPTS: dict = {}

#: keys a parameter group may hold besides "params" and hyperparameters, as in
#: PyTorch: a label, and the base rate a learning-rate scheduler keeps there
_GROUP_EXTRAS = ("name", "initial_lr")


def _same(old, new) -> bool:
    """Whether ``new`` is the checked value ``old``, of the same type (True, a 0-d
    array or a list equal to a checked float or tuple is checked again)."""
    if type(new) is not type(old):
        return False
    try:
        return bool(new == old)
    except (ValueError, TypeError):  # (an array compares elementwise)
        return False


def _same_values(old: dict, new: dict) -> bool:
    for k, v in new.items():
        if not _same(old[k], v):
            return False
    return True


def _count(value) -> int:
    """A step count from a state_dict: a whole number (2.0 is 2; 2.7 is refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"a step count must be an integer, got {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not float(value).is_integer():
        raise ValueError(f"a step count must be a whole number, got {value!r}")
    return int(value)


def _group_extras(group: dict, where: str) -> dict:
    """The checked extra keys of a parameter group."""
    extras = {k: group[k] for k in _GROUP_EXTRAS if k in group}
    if "name" in extras and not isinstance(extras["name"], str):
        raise TypeError(f"{where}: 'name' must be a str, got {type(extras['name']).__name__}")
    if "initial_lr" in extras:
        v = extras["initial_lr"]
        extras["initial_lr"] = real(v, "initial_lr", low=0)
        if not math.isfinite(extras["initial_lr"]):
            raise ValueError(f"Invalid initial_lr: {v!r}; expected a finite rate >= 0")
    return extras


def _finite(value, name):
    """A hyperparameter >= 0 and finite (lr = inf turned the parameters into inf/NaN in
    one step; the schedulers already refused such a rate)."""
    v = real(value, name, low=0)
    if not math.isfinite(v):
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite number >= 0")
    return v


def _lr(lr):
    return _finite(lr, "lr")


def _eps(eps):
    return _finite(eps, "eps")


def _weight_decay(wd):
    return _finite(wd, "weight_decay")


def _group_specs(params):
    """[(parameters, overrides)] when ``params`` is a list of PyTorch-style parameter
    groups (dicts with "params" and hyperparameters), else None."""
    if not isinstance(params, (list, tuple)) or not params or not all(
            isinstance(g, dict) for g in params):
        return None
    specs = []
    for i, g in enumerate(params):
        if "params" not in g:
            raise ValueError(f"parameter group {i} has no 'params'")
        plist = g["params"]
        try:
            plist = _param_list([plist] if isinstance(plist, Parameter) else plist)
        except ValueError as exc:
            if "empty" not in str(exc):
                raise
            raise ValueError(
                f"parameter group {i} has no parameters (PyTorch keeps an empty group; "
                f"here each group needs one: leave that group out, e.g. a no-decay group "
                f"when no layer has a bias)") from None
        specs.append((plist, {k: v for k, v in g.items() if k != "params"}))
    return specs


class Optimizer:
    """Base class.  Subclasses set ``state_names`` (the state the current
    hyperparameters use), ``all_state_names`` (every state the type can hold: a buffer
    stays when an option turns it off, e.g. ``momentum = 0``, as in PyTorch) and
    implement ``_update``.

    ``params`` is a list of Parameters, or of parameter groups as in PyTorch: dicts
    with "params" and any hyperparameters that differ from the defaults given, e.g.
    ``AdamW([{"params": weights}, {"params": biases, "weight_decay": 0.0}], lr=1e-3)``.
    ``param_groups`` lists the groups, each a dict with its "params" and every
    hyperparameter; a value changed there (``opt.param_groups[1]["lr"] = 0.1``) is
    checked and used from the next step.  ``opt.lr = x`` sets it in every group.
    :meth:`add_param_group` adds a group (``defaults``, the constructor's values, fill
    in what it does not give).  Besides hyperparameters a group may hold "name" (a
    str label) and "initial_lr" (a scheduler's base rate); both are kept in
    ``state_dict``.

    ``step_count`` counts the steps taken.  As in PyTorch, each parameter also counts
    its own: a frozen parameter (``requires_grad`` False) sits a step out, so a layer
    unfrozen after n steps, or added by ``add_param_group``, takes its first update
    with Adam's bias corrections of step 1, not n + 1.

    PyTorch's keyword-only options are taken so that its code runs unchanged:
    ``foreach``, ``fused`` and ``capturable`` with any value (fastprop's updates are
    always fused, one native call); ``maximize``, ``differentiable``, ``dampening``,
    ``centered``, ``decoupled_weight_decay``, ``lr_decay`` and
    ``initial_accumulator_value`` at PyTorch's defaults only (another value, which
    fastprop does not implement, is a ValueError naming the option).
    """

    state_names: tuple = ()
    all_state_names: tuple = ()
    #: the state every configuration of the type keeps (a parameter with state has
    #: all of it); buffers of an option (momentum, amsgrad) start at 0 when missing
    core_state_names: tuple = ()
    _lag = None  # (an optimizer pickled before per-parameter step counts: none sat out)

    def __init__(self, params, **hyper):
        if not isinstance(params, (list, tuple, Module, Parameter)):
            try:
                params = list(params)  # (a generator of parameters or of groups)
            except TypeError:
                raise TypeError(f"params must be an iterable of Parameters, got "
                                f"{type(params).__name__}") from None
        specs = _group_specs(params)
        if specs is None:
            specs = [(_param_list(params), {})]
        self.params = _param_list([p for plist, _ in specs for p in plist])
        self.hyper = hyper
        self.state: list = [dict() for _ in self.params]
        self.step_count = 0
        # per parameter, the steps it sat out (frozen): its own count is step_count -
        # _lag[i]; int64, updated in place (the native step reads it)
        self._lag = np.zeros(len(self.params), np.int64)
        self.defaults = dict(hyper)
        index = {id(p): i for i, p in enumerate(self.params)}
        groups, members = [], []
        for i, (plist, overrides) in enumerate(specs):
            extras = _group_extras(overrides, f"parameter group {i}")
            overrides = {k: v for k, v in overrides.items() if k not in extras}
            unknown = sorted(set(overrides) - set(hyper))
            if unknown:
                raise ValueError(f"parameter group {i}: unknown hyperparameters {unknown}; "
                                 f"{type(self).__name__} has {sorted(hyper)}")
            values = dict(hyper)
            if overrides:  # (checked as the constructor checks them)
                values.update(self._construct(plist, {**hyper, **overrides}).hyper)
            groups.append({"params": plist, **values, **extras})
            members.append([index[id(p)] for p in plist])
        self.param_groups = groups
        self._members = members
        self._checked = [None] * len(groups)
        self._hyper_seen = dict(hyper)

    def __getstate__(self):
        self._sync_device()  # (a pickle or a copy holds the moments, as state_dict)
        state = self.__dict__.copy()
        state.pop("_device_step", None)  # (a weak reference: not picklable, nor wanted)
        state.pop("_member_params", None)  # (derived from params: made again)
        state.pop("_fused_memo", None)  # (made again at the next compiled step)
        return state

    def _sync_device(self) -> None:
        """Bring the state up to date when a compiled step trains on a device with
        this optimizer (it holds the moments there between syncs; after a sync its
        next step uploads the host's, so a state loaded here is the one it uses)."""
        ref = self.__dict__.get("_device_step")
        step = ref() if ref is not None else None
        if step is not None:
            step.sync()

    def __setstate__(self, state):
        self.__dict__.update(state)
        # an optimizer pickled before a hyperparameter was added (Adam's amsgrad): it
        # had the default
        hyper = self.__dict__.get("hyper")
        if hyper is not None:
            for key, default in getattr(type(self), "_added_hyper", {}).items():
                if key not in hyper:
                    hyper[key] = default
                    self.__dict__.get("_hyper_seen", {}).setdefault(key, default)
                    for g in self.__dict__.get("param_groups", ()):
                        g.setdefault(key, default)

    def __getattr__(self, name):
        hyper = self.__dict__.get("hyper")
        if hyper is not None and name in hyper:
            return self._current(name)
        if name == "defaults" and hyper is not None:
            # (an optimizer pickled before `defaults`: its constructor's values are
            # gone; the current ones stand in)
            return dict(hyper)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _current(self, name):
        """Hyperparameter ``name`` as the next step uses it: a value written into
        ``hyper`` since the last step (which that step gives every group), else the
        first parameter group's (a group edited, or set by a scheduler, since; every
        group's when they agree, as ``opt.lr = x`` makes them)."""
        d = self.__dict__
        value = d["hyper"][name]
        seen, groups = d.get("_hyper_seen"), d.get("param_groups")
        if not groups or seen is None or name not in seen or seen[name] != value:
            return value
        return groups[0].get(name, value)

    def __setattr__(self, name, value):
        hyper = self.__dict__.get("hyper")
        if hyper is not None and name in hyper and name in _CHEAP_CHECKS and self._own_type():
            # (a schedule's ``opt.lr = x`` at every step: checked alone, see _CHEAP_CHECKS)
            v = _CHEAP_CHECKS[name](value)
            hyper[name] = v
            for g in self.__dict__.get("param_groups", ()):
                g[name] = v
            self.__dict__["_hyper_seen"][name] = v
        elif hyper is not None and name in hyper:
            # e.g. ``opt.momentum = 0.9``: validated as in __init__, and set in every
            # parameter group
            probe = self._validate({**hyper, name: value})
            groups = self.__dict__.get("param_groups", ())
            for i in range(len(groups)):  # (each group with it must be valid too)
                self._validate({**self._group_hyper(i)[0], name: value})
            hyper[name] = probe.hyper[name]
            object.__setattr__(self, "state_names", probe.state_names)
            for g in groups:
                g[name] = probe.hyper[name]
            self.__dict__["_hyper_seen"][name] = probe.hyper[name]
        else:
            object.__setattr__(self, name, value)

    def _pull_hyper(self) -> None:
        """Values written into ``hyper`` itself since the last look (``opt.hyper["lr"]
        = x``) go to every group, as ``opt.lr = x`` does.  (First, groups whose
        parameter lists were edited are refused.)"""
        self._check_members()
        seen = self._hyper_seen
        if seen != self.hyper:
            changed = {k: v for k, v in self.hyper.items() if k not in seen or seen[k] != v}
            for g in self.param_groups:
                g.update(changed)
            self._hyper_seen = dict(self.hyper)

    def _check_members(self) -> None:
        """ValueError when ``param_groups`` or a group's ``"params"`` list no longer
        holds the parameters the optimizer was made with (PyTorch code removes or adds
        parameters there; here state and step counts are kept by position, so an edit
        would be ignored, or worse)."""
        held = self.__dict__.get("_member_params")
        if held is None:
            held = self._member_params = [[self.params[j] for j in members]
                                         for members in self._members]
        groups = self.param_groups
        if len(groups) != len(held):
            raise ValueError(f"param_groups holds {len(groups)} groups, the optimizer was "
                             f"given {len(held)}: add a group with opt.add_param_group(...)")
        for i, g in enumerate(groups):
            plist = g.get("params")
            # (list == list compares element by element, by identity first, in C; a
            # Parameter equals only itself)
            if type(plist) is list and plist == held[i]:
                continue
            try:
                same = len(plist) == len(held[i]) and all(
                    a is b for a, b in zip(plist, held[i]))
            except TypeError:
                same = False
            if not same:
                raise ValueError(
                    f"param_groups[{i}]['params'] no longer holds the parameters it was "
                    f"made with; to stop training a parameter, freeze it "
                    f"(p.requires_grad = False) or leave it without a gradient "
                    f"(p.grad = None), add parameters with opt.add_param_group(...), or "
                    f"make a new optimizer")
        sizes = self.__dict__.get("_group_sizes")
        if sizes is None or sizes != [len(g) for g in groups]:
            # a key written into a group since (PyTorch code sets e.g. "dampening"):
            # one of PyTorch's options fastprop takes at its default only is refused
            # rather than ignored (another key is the user's own, kept as PyTorch does)
            present = False
            for i, g in enumerate(groups):
                for name in _TORCH_ONLY.keys() & g.keys():
                    present = True
                    try:
                        _torch_options(f"param_groups[{i}]: {type(self).__name__}",
                                       **{name: g[name]})
                    except TypeError as exc:
                        raise TypeError(f"param_groups[{i}]: {exc}") from None
            # (while such a key is there, at its default, it is checked every time: a
            # value written into it later changes no key count)
            self._group_sizes = None if present else [len(g) for g in groups]

    def _probe(self) -> "Optimizer":
        """A throwaway optimizer of this type with the same groups (to check a
        state_dict on)."""
        return self._construct([{"params": g["params"]} for g in self.param_groups], self.hyper)

    def _group_hyper(self, i):
        """(hyperparameters, state names) of parameter group ``i`` as it is now,
        checked (ValueError/TypeError) when it changed since the last check."""
        g = self.param_groups[i]
        try:
            h = {k: g[k] for k in self.hyper}
        except KeyError as exc:
            raise ValueError(f"param_groups[{i}] lost its hyperparameter {exc}") from None
        cached = self._checked[i]
        if cached is None or not _same_values(cached[0], h):
            new = self._checked_alone(cached[0], h) if cached is not None else None
            if new is not None:  # (only values checked alone changed: lr, betas, ...)
                h, names = new, cached[1]
            else:
                probe = self._validate(h)
                h, names = dict(probe.hyper), probe.state_names
            g.update(h)  # (normalised: betas as a tuple, ...)
            cached = self._checked[i] = (h, names)
        return cached

    def _own_type(self) -> bool:
        """One of fastprop's optimizers (a user's subclass may check its values its
        own way: those always go through its constructor)."""
        return type(self).__module__ == __name__

    def _checked_alone(self, old: dict, h: dict):
        """``h`` checked, when it differs from the checked ``old`` only in values of
        :data:`_CHEAP_CHECKS`; else None (check it whole)."""
        if not self._own_type():
            return None
        new = dict(old)
        for k, v in h.items():
            if not _same(old[k], v):
                if k == "momentum":  # (its buffer stays while it stays > 0, or 0)
                    m = _finite(v, "momentum")
                    if (m > 0) != (old[k] > 0):
                        return None
                    new[k] = m
                    continue
                check = _CHEAP_CHECKS.get(k)
                if check is None:
                    return None
                new[k] = check(v)
        return new

    def _fused_setup(self):
        """(runs fused, decay mask) for a whole-step kernel: groups that agree run as
        one (mask None); groups that differ only in weight decay, between 0 and one
        other value (no decay on biases), run with that value and a per-parameter
        mask (1: decayed) that the native kernel takes; anything else: (False, None).
        ``hyper`` and ``state_names`` are set to what the kernel is to read."""
        memo = self.__dict__.get("_fused_memo")
        if memo is not None and self._unchanged_since(memo):
            return memo[-1]  # (a compiled step asks every call: ~3 us on a tiny model)
        result = self._fused_setup_checked()
        groups = self.param_groups
        snaps = []
        for g in groups:
            d = dict(g)
            d["params"] = list(g["params"])  # (an edit in place is seen)
            snaps.append((d, tuple(map(type, g.values()))))
        self._fused_memo = (groups, snaps, dict(self.hyper),
                            tuple(map(type, self.hyper.values())), result)
        return result

    def _unchanged_since(self, memo) -> bool:
        """Whether ``param_groups`` and ``hyper`` hold the very values (and types) they
        held when ``memo`` was taken (compared in C: dicts, lists)."""
        groups, snaps, hyper, hyper_types, _ = memo
        mine = self.param_groups
        try:
            return (mine is groups and len(mine) == len(snaps) and self.hyper == hyper
                    and tuple(map(type, self.hyper.values())) == hyper_types
                    and all(g == d and tuple(map(type, g.values())) == t
                            for g, (d, t) in zip(mine, snaps)))
        except (TypeError, ValueError):  # (a value NumPy compares elementwise, e.g. an
            return False                 # array for betas: the checks name it)

    def _fused_setup_checked(self):
        self._pull_hyper()
        checked = [self._group_hyper(i) for i in range(len(self.param_groups))]
        if self._agree(checked):
            return True, None
        h0, names0 = checked[0]
        if "weight_decay" not in h0:
            return False, None
        rest = {k: v for k, v in h0.items() if k != "weight_decay"}
        for h, names in checked:
            if names != names0 or {k: v for k, v in h.items() if k != "weight_decay"} != rest:
                return False, None
        decays = {h["weight_decay"] for h, _ in checked} - {0.0}
        if len(decays) != 1:
            return False, None
        wd = decays.pop()
        key = tuple(h["weight_decay"] != 0 for h, _ in checked)
        mask = self.__dict__.get("_mask_made")
        if mask is None or mask[0] != key:  # (made again only when a group's changed)
            arr = np.zeros(len(self.params), np.uint8)
            for decayed, members in zip(key, self._members):
                if decayed:
                    arr[members] = 1
            mask = self._mask_made = (key, arr)
        if self.hyper != {**rest, "weight_decay": wd}:
            self.hyper.update(rest, weight_decay=wd)
            self._hyper_seen = dict(self.hyper)
        object.__setattr__(self, "state_names", names0)
        return True, mask[1]

    def _agree(self, checked) -> bool:
        """Whether the groups' checked hyperparameters agree; if so they become
        ``hyper`` and ``state_names`` too (a schedule that wrote every group's lr is
        seen in ``opt.lr``, and a whole-step kernel reads what the groups hold)."""
        h0, names0 = checked[0]
        if any(h != h0 for h, _ in checked[1:]):
            return False
        if h0 != self.hyper:  # (a value changed in the groups only)
            self.hyper.update(h0)
            self._hyper_seen = dict(self.hyper)
        object.__setattr__(self, "state_names", names0)
        return True

    def _construct(self, params, hyper: dict) -> "Optimizer":
        """An optimizer of this type over ``params`` with ``hyper`` (how values are
        checked).  A user's subclass whose constructor predates a hyperparameter added
        since (``_added_hyper``, e.g. Adam's amsgrad) is built without it while it
        holds its default; another value is refused, the subclass cannot take it."""
        cls = type(self)
        added = getattr(cls, "_added_hyper", {})
        if added and not self._own_type():
            accepts = _INIT_ACCEPTS.get(cls)
            if accepts is None:
                try:
                    sig = inspect.signature(cls.__init__).parameters
                    accepts = (None if any(q.kind is q.VAR_KEYWORD for q in sig.values())
                               else frozenset(sig))
                except (TypeError, ValueError):
                    accepts = None
                _INIT_ACCEPTS[cls] = accepts
            if accepts is not None:
                hyper = dict(hyper)
                for key, default in added.items():
                    if key in hyper and key not in accepts:
                        if hyper[key] != default:
                            raise ValueError(f"{cls.__name__} does not take {key!r} (its "
                                             f"constructor has no such argument)")
                        del hyper[key]
        return cls(params, **hyper)

    def _validate(self, hyper: dict) -> "Optimizer":
        """Check hyperparameters by building a throwaway optimizer of this type."""
        return self._construct(self.params, hyper)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        groups = (f", {len(self.param_groups)} parameter groups"
                  if len(self.__dict__.get("param_groups", ())) > 1 else "")
        return f"{type(self).__name__}({len(self.params)} params, {args}{groups})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every parameter's ``.grad``; with ``set_to_none`` (the default, as
        PyTorch's) a parameter that no backward reaches before the next step is
        skipped by it (:class:`~fastprop.nn.Parameter`)."""
        set_to_none = flag(set_to_none, "set_to_none")
        for p in self.params:
            p._zero_grad(set_to_none)

    def _check(self) -> None:
        # (the common case, every array as it should be, in as few operations as
        # possible: a dtype is compared by identity first, flags read once; ~0.6 us a
        # parameter instead of ~1.3; any doubt goes to the checks that name the fault)
        ndarray = np.ndarray
        for i, p in enumerate(self.params):
            v, g = p._value, p._grad
            vd = v.dtype
            if type(g) is not ndarray or g.shape != v.shape \
                    or (g.dtype is not vd and g.dtype != vd):
                break
            vf, gf = v.flags, g.flags
            if not (vf.c_contiguous and gf.c_contiguous and vf.writeable and gf.writeable):
                break
            for arr in self.state[i].values():
                if type(arr) is not ndarray or arr.shape != v.shape \
                        or (arr.dtype is not vd and arr.dtype != vd):
                    break
                af = arr.flags
                if not (af.c_contiguous and af.writeable):
                    break
            else:
                continue
            break
        else:
            return
        for i, p in enumerate(self.params):
            g = p._grad
            if not isinstance(g, np.ndarray) or g.shape != p.value.shape or g.dtype != p.value.dtype:
                raise ValueError(
                    f"params[{i}].grad must be an array of shape {p.value.shape} and dtype "
                    f"{p.value.dtype}, got {getattr(g, 'shape', None)} / {getattr(g, 'dtype', None)}")
            if not (p.value.flags.c_contiguous and g.flags.c_contiguous
                    and p.value.flags.writeable and g.flags.writeable):
                raise ValueError(f"params[{i}] value and grad must be C-contiguous and writable")
            for key, arr in self.state[i].items():
                if not isinstance(arr, np.ndarray):
                    raise TypeError(f"optimizer state {key!r} of params[{i}] must be a NumPy "
                                    f"array, got {type(arr).__name__}")
                if arr.shape != p.value.shape or arr.dtype != p.value.dtype:
                    raise ValueError(
                        f"optimizer state {key!r} of params[{i}] has shape {arr.shape} / dtype "
                        f"{arr.dtype}, the parameter {p.value.shape} / {p.value.dtype}")
                if not (arr.flags.c_contiguous and arr.flags.writeable):
                    raise ValueError(f"optimizer state {key!r} of params[{i}] must be a "
                                     f"writable C-contiguous array (the update writes it in "
                                     f"place)")

    def _lags(self) -> np.ndarray:
        if self._lag is None:
            self._lag = np.zeros(len(self.params), np.int64)
        return self._lag

    def _groups(self, members, lag, frozen):
        """[(indices, own step)]: the parameters of ``members`` to update, grouped by
        dtype and by their own step count (a backend call takes one of each).  Frozen
        ones and ones without a gradient are skipped, as PyTorch skips a parameter
        whose gradient is None, and listed in ``frozen`` (they sit the step out)."""
        groups: dict = {}
        for i in members:
            p = self.params[i]
            if p.requires_grad and p.has_grad:
                groups.setdefault((p.value.dtype, int(lag[i])), []).append(i)
            else:
                frozen.append(i)
        return [(idx, max(1, self.step_count + 1 - behind))
                for (_, behind), idx in groups.items()]

    def _takes_step(self) -> bool:
        """Whether this type's ``_update`` takes the parameters' own step count (an
        optimizer written before it did reads ``self.step_count``)."""
        cls = type(self)
        known = _UPDATE_TAKES_STEP.get(cls)
        if known is None:
            try:  # (by the count of positional parameters: self, be, ..., h[, step])
                params = inspect.signature(cls._update).parameters.values()
                known = any(q.kind is q.VAR_POSITIONAL for q in params) or sum(
                    q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD) for q in params) >= 7
            except (TypeError, ValueError):
                known = True
            _UPDATE_TAKES_STEP[cls] = known
        return known

    def _precheck(self) -> list:
        """What ``step`` checks before it changes anything (hyperparameters, gradient
        and state shapes and dtypes), so that a training step can refuse before its
        forward and backward change buffers and gradients; returns the groups'
        checked hyperparameters."""
        checked = self._checked_hyper()
        self._check()
        return checked

    def _checked_hyper(self) -> list:
        """The groups' hyperparameters, checked (the part of :meth:`_precheck` that
        does not look at the gradients)."""
        self._pull_hyper()
        checked = [self._group_hyper(g) for g in range(len(self.param_groups))]
        self._agree(checked)
        return checked

    def step(self, closure=None):
        """Apply one update to every parameter from its ``.grad``.

        ``closure``, as PyTorch's: a callable that computes the gradients (zero them,
        forward, loss, backward) and returns the loss, called once before the update;
        ``step`` returns what it returned (None without a closure).  If it raises,
        nothing is updated; invalid hyperparameters are refused before it runs (its
        forward would move BatchNorm's statistics for nothing)."""
        if closure is None:
            self._apply(self._precheck())
            return None
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self._checked_hyper()
        loss = closure()
        self._apply(self._precheck())  # (again: the closure may set a group's lr)
        return loss

    def _apply(self, checked) -> None:
        """The update, once ``_precheck`` (which returned ``checked``) has passed."""
        for (_, names), members in zip(checked, self._members):
            for i in members:
                for key in names:
                    if key not in self.state[i]:
                        self.state[i][key] = np.zeros_like(self.params[i].value)
        lag = self._lags()
        frozen: list = []
        work = [(h, names, idx, step) for (h, names), members in zip(checked, self._members)
                for idx, step in self._groups(members, lag, frozen)]
        takes_step = self._takes_step()
        self.step_count += 1
        if frozen:  # (an empty fancy index costs ~2 us: most steps freeze nothing)
            lag[frozen] += 1
        be = backends.current()
        done = 0
        try:
            for h, names, idx, step in work:
                params = [self.params[i].value for i in idx]
                grads = [self.params[i]._grad for i in idx]
                states = {k: [self.state[i][k] for i in idx] for k in names}
                if takes_step:
                    self._update(be, params, grads, states, h, step)
                else:
                    self._update(be, params, grads, states, h)
                done += 1
        except BaseException:
            if not done:  # (the first call refused: nothing changed, counts included)
                self.step_count -= 1
                if frozen:
                    lag[frozen] -= 1
            else:  # (the parts not reached sat this step out; the others took it)
                for _, _, idx, _ in work[done:]:
                    lag[idx] += 1
            raise

    def _update(self, be, params, grads, states, h, step) -> None:
        """One backend call for parameters of one dtype whose own step count (from
        1) is ``step``."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group, as PyTorch's: a dict with "params" and any
        hyperparameters that differ from ``defaults`` (the constructor's values), e.g.
        layers unfrozen for fine-tuning with a smaller lr.  Its parameters start with no
        state and their own step count at 0.  Checked before anything changes."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("param_group has no 'params'")
        plist = param_group["params"]
        plist = _param_list([plist] if isinstance(plist, Parameter) else plist)
        extras = _group_extras(param_group, "param_group")
        overrides = {k: v for k, v in param_group.items() if k != "params" and k not in extras}
        held = {id(q) for q in self.params}
        if any(id(p) in held for p in plist):
            raise ValueError("some parameters appear in more than one parameter group")
        unknown = sorted(set(overrides) - set(self.hyper))
        if unknown:
            raise ValueError(f"param_group: unknown hyperparameters {unknown}; "
                             f"{type(self).__name__} has {sorted(self.hyper)}")
        values = dict(self._construct(plist, {**self.defaults, **overrides}).hyper)
        lag = np.concatenate([self._lags(), np.full(len(plist), self.step_count, np.int64)])
        start = len(self.params)
        self.params = self.params + plist
        self.state = self.state + [dict() for _ in plist]
        self._lag = lag
        self.param_groups.append({"params": plist, **values, **extras})
        self._members.append(list(range(start, start + len(plist))))
        self.__dict__.pop("_member_params", None)
        self._checked.append(None)

    # -- checkpointing ----------------------------------------------------------
    def state_dict(self) -> dict:
        """A copy of hyperparameters (each parameter group's too), the step count,
        each parameter's own step count ("steps") and per-parameter state."""
        self._sync_device()
        return {
            "type": type(self).__name__,
            "hyper": {k: self._current(k) for k in self.hyper},
            "param_groups": [{**{k: g[k] for k in (*self.hyper, *_GROUP_EXTRAS) if k in g},
                              "size": len(g["params"])}  # (checked when loaded)
                             for g in self.param_groups],
            "step": self.step_count,
            "steps": [self.step_count - int(lag) for lag in self._lags()],
            "state": [{k: v.copy() for k, v in s.items()} for s in self.state],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from :meth:`state_dict`; checks everything before changing anything."""
        # (a device step's moments first: a later sync would write them over the loaded
        # state, and its next step would not upload it)
        self._sync_device()
        if not isinstance(state_dict, dict) or "state" not in state_dict:
            raise ValueError("state_dict must be a dict produced by Optimizer.state_dict()")
        if "type" not in state_dict and "param_groups" in state_dict:
            raise ValueError("state_dict has no 'type': it looks like a PyTorch optimizer's "
                             "state_dict, whose layout (tensors keyed by parameter index, "
                             "in param_groups) fastprop's does not read; load the model's "
                             "weights and start the optimizer afresh, or copy the moments "
                             "into opt.state by hand")
        if state_dict.get("type") != type(self).__name__:
            raise ValueError(f"state_dict is for {state_dict.get('type')!r}, "
                             f"not {type(self).__name__!r}")
        states = state_dict["state"]
        if not isinstance(states, (list, tuple)):
            raise TypeError(f"state_dict['state'] must be a list (one dict per parameter), "
                            f"got {type(states).__name__}")
        if len(states) != len(self.params):
            raise ValueError(f"state_dict has state for {len(states)} parameters, "
                             f"the optimizer has {len(self.params)}")
        added = getattr(type(self), "_added_hyper", {})
        saved_hyper = state_dict.get("hyper", self.hyper)
        if not isinstance(saved_hyper, dict):
            raise TypeError(f"state_dict['hyper'] must be a dict, got "
                            f"{type(saved_hyper).__name__}")
        hyper = {**added, **saved_hyper}
        if isinstance(hyper.get("betas"), list):
            hyper["betas"] = tuple(hyper["betas"])
        try:
            probe = self._validate(hyper)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"state_dict has invalid hyperparameters: {exc}") from None
        groups = state_dict.get("param_groups")
        if groups is None:  # (a state_dict from before parameter groups: one group)
            if len(self.param_groups) != 1:
                raise ValueError(f"state_dict has no parameter groups (it predates them: "
                                 f"one group), the optimizer {len(self.param_groups)}")
            group_hypers = [dict(probe.hyper)]
        else:
            if not isinstance(groups, list) or len(groups) != len(self.param_groups):
                raise ValueError(f"state_dict has {len(groups) if isinstance(groups, list) else groups!r} "
                                 f"parameter groups, the optimizer {len(self.param_groups)}")
            group_hypers = []
            for i, gh in enumerate(groups):
                gh = {**added, **gh} if isinstance(gh, dict) else {}
                size = gh.pop("size", None)  # (absent before it was saved)
                if size is not None and size != len(self.param_groups[i]["params"]):
                    raise ValueError(f"state_dict's parameter group {i} has {size!r} "
                                     f"parameters, the optimizer's "
                                     f"{len(self.param_groups[i]['params'])}")
                if isinstance(gh.get("betas"), list):
                    gh["betas"] = tuple(gh["betas"])
                try:
                    extras = _group_extras(gh, f"state_dict's parameter group {i}")
                except TypeError as exc:
                    raise ValueError(str(exc)) from None
                gh = {k: v for k, v in gh.items() if k not in extras}
                if set(gh) != set(self.hyper):
                    raise ValueError(f"state_dict's parameter group {i} has hyperparameters "
                                     f"{sorted(gh)}, expected {sorted(self.hyper)}")
                try:
                    group_hypers.append({**self._validate(gh).hyper, **extras})
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"state_dict's parameter group {i} is invalid: {exc}") from None
        new = []
        for i, (p, s) in enumerate(zip(self.params, states)):
            if not isinstance(s, dict):
                raise TypeError(f"state_dict['state'][{i}] must be a dict of arrays, got "
                                f"{type(s).__name__}")
            entry = {}
            for key, arr in s.items():
                if key not in probe.state_names and key not in type(self).all_state_names:
                    raise ValueError(f"unexpected state {key!r} for params[{i}]")
                arr = as_array(arr, f"state {key!r} of params[{i}]")  # (real numbers)
                if arr.shape != p.value.shape:
                    raise ValueError(f"state {key!r} of params[{i}] has shape {arr.shape}, "
                                     f"expected {p.value.shape}")
                entry[key] = np.array(arr, dtype=p.value.dtype, order="C")
            # (the buffers of an option, e.g. momentum on in one group only, or switched
            # on since the last step, are made at 0 by the next step if missing)
            if entry and not set(self.core_state_names) <= set(entry):
                raise ValueError(f"state of params[{i}] has {sorted(entry)}; a parameter "
                                 f"that has state has all of {list(self.core_state_names)}")
            new.append(entry)
        try:
            step = _count(state_dict.get("step", 0))
            steps = state_dict.get("steps")  # (absent before per-parameter counts)
            steps = [step] * len(self.params) if steps is None else [_count(t) for t in steps]
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"state_dict has an invalid step count: {exc}") from None
        if step < 0:
            raise ValueError(f"state_dict's step must be >= 0, got {step}")
        if len(steps) != len(self.params) or not all(0 <= t <= step for t in steps):
            raise ValueError(f"state_dict's per-parameter step counts must be {len(self.params)} "
                             f"integers in [0, step={step}], got {state_dict.get('steps')!r}")
        self.state = new
        self.hyper.update(probe.hyper)
        self.state_names = probe.state_names
        self.step_count = step
        self._lags()[...] = [step - t for t in steps]  # (in place: a bound kernel reads it)
        for g, gh in zip(self.param_groups, group_hypers):
            g.update(gh)
        self._checked = [None] * len(self.param_groups)
        self._hyper_seen = dict(self.hyper)


#: PyTorch optimizer arguments fastprop takes at their default only (ported code spells
#: them out): the default, and what to do instead of another value.
_TORCH_ONLY = {
    "dampening": (0, "fastprop's SGD has no dampening"),
    "maximize": (False, "minimize the negated objective instead"),
    "differentiable": (False, "fastprop has no autograd through the update"),
    "centered": (False, "fastprop's RMSprop is the uncentered one"),
    "lr_decay": (0, "decay lr with a scheduler (fastprop.lr_scheduler) instead"),
    "initial_accumulator_value": (0, "fastprop's Adagrad starts its sum at 0"),
    "decoupled_weight_decay": (False, "use fastprop.optim.AdamW"),
}


def _torch_options(owner, foreach=None, fused=None, capturable=False, **fixed):
    """Check PyTorch's optimizer arguments: ``foreach``/``fused``/``capturable`` choose
    PyTorch's implementation (None or a bool; fastprop's update is always one fused
    native call), the others are taken at their default only (ValueError otherwise)."""
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None:
            flag(value, name)
    flag(capturable, "capturable")
    for name, value in fixed.items():
        default, instead = _TORCH_ONLY[name]
        if isinstance(default, bool):
            value = flag(value, name)
        else:
            value = real(value, name)
        if value != default:
            raise ValueError(f"{owner}({name}={value!r}) is not supported: only PyTorch's "
                             f"default {default!r}; {instead}")


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 decay.

    Update: ``g = grad + wd p``; with momentum ``buf = momentum buf + g`` (``buf = g`` at
    the first step) and ``g = buf`` (Nesterov: ``g = g + momentum buf``); ``p -= lr g``.
    """

    all_state_names = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, *,
                 dampening=0, maximize=False, foreach=None, differentiable=False,
                 fused=None):
        _torch_options("SGD", foreach, fused, dampening=dampening, maximize=maximize,
                       differentiable=differentiable)
        lr = _lr(lr)
        momentum = _finite(momentum, "momentum")
        wd = _weight_decay(weight_decay)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
        if nesterov and momentum <= 0:
            raise ValueError(f"Nesterov momentum requires momentum > 0, got momentum={momentum}")
        super().__init__(params, lr=lr, momentum=momentum, nesterov=bool(nesterov),
                         weight_decay=wd)
        self.state_names = ("momentum_buffer",) if momentum > 0 else ()

    def _update(self, be, params, grads, states, h, step):
        bufs = states.get("momentum_buffer")
        be.sgd_update(params, grads, bufs, h["lr"], h["momentum"], h["nesterov"],
                      h["weight_decay"], step == 1)


class Adagrad(Optimizer):
    """Adagrad: ``s += g^2; p -= lr g / (sqrt(s) + eps)``, ``g = grad + wd p``."""

    state_names = ("sum",)
    core_state_names = ("sum",)

    def __init__(self, params, lr=1e-2, eps=1e-10, weight_decay=0.0, *, lr_decay=0,
                 initial_accumulator_value=0, foreach=None, maximize=False,
                 differentiable=False, fused=None):
        _torch_options("Adagrad", foreach, fused, lr_decay=lr_decay,
                       initial_accumulator_value=initial_accumulator_value,
                       maximize=maximize, differentiable=differentiable)
        super().__init__(params, lr=_lr(lr), eps=_eps(eps), weight_decay=_weight_decay(weight_decay))

    def _update(self, be, params, grads, states, h, step):
        be.adagrad_update(params, grads, states["sum"], h["lr"], h["eps"], h["weight_decay"])


class RMSprop(Optimizer):
    """RMSprop: ``s = alpha s + (1 - alpha) g^2``; ``p -= lr g / (sqrt(s) + eps)``
    (with momentum: ``buf = momentum buf + g / (sqrt(s) + eps); p -= lr buf``), with
    ``g = grad + weight_decay p``, as PyTorch's."""

    all_state_names = ("square_avg", "momentum_buffer")
    core_state_names = ("square_avg",)

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0,
                 *, centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False):
        _torch_options("RMSprop", foreach, None, capturable, centered=centered,
                       maximize=maximize, differentiable=differentiable)
        lr = _lr(lr)
        alpha = _alpha(alpha)
        momentum = _finite(momentum, "momentum")
        super().__init__(params, lr=lr, alpha=alpha, eps=_eps(eps), momentum=momentum,
                         weight_decay=_weight_decay(weight_decay))
        self.state_names = ("square_avg", "momentum_buffer") if momentum > 0 else ("square_avg",)

    def _update(self, be, params, grads, states, h, step):
        be.rmsprop_update(params, grads, states["square_avg"], states.get("momentum_buffer"),
                          h["lr"], h["alpha"], h["eps"], h["momentum"], h["weight_decay"])


def _betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return tuple(
        real(b, f"betas[{i}]", low=0, high=1, high_inclusive=False,
             message=f"Invalid beta parameter at index {i}: {b!r}; expected 0 <= betas[{i}] < 1")
        for i, b in enumerate(betas))


def _alpha(alpha):
    return real(alpha, "alpha", low=0, high=1)


#: Hyperparameters whose check does not involve the others and whose change leaves the
#: state an optimizer keeps as it is (unlike momentum, which can add a buffer): on
#: fastprop's own optimizers a new value is checked alone, as its constructor checks
#: it, instead of by building a throwaway optimizer (a per-batch schedule sets lr, and
#: OneCycleLR Adam's betas, at every step).
_CHEAP_CHECKS = {"lr": _lr, "eps": _eps, "weight_decay": _weight_decay, "betas": _betas,
                 "alpha": _alpha}


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, as torch.optim.Adam.

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``, ``g = grad + wd p``.
    ``amsgrad``: v in the denominator is the running maximum of v (Reddi et al.;
    "max_exp_avg_sq"), computed with NumPy on every backend; the compiled step runs
    layer by layer while it is on.
    """

    state_names = ("exp_avg", "exp_avg_sq")
    all_state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    core_state_names = ("exp_avg", "exp_avg_sq")
    decoupled = False
    # hyperparameters added after state_dicts were first written: an older one lacks
    # them, and means these values
    _added_hyper = {"amsgrad": False}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False):
        _torch_options(type(self).__name__, foreach, fused, capturable, maximize=maximize,
                       differentiable=differentiable,
                       decoupled_weight_decay=decoupled_weight_decay)
        if not isinstance(amsgrad, (bool, np.bool_)):
            raise TypeError(f"amsgrad must be a bool, got {type(amsgrad).__name__}")
        super().__init__(params, lr=_lr(lr), betas=_betas(betas), eps=_eps(eps),
                         weight_decay=_weight_decay(weight_decay), amsgrad=bool(amsgrad))
        if amsgrad:
            self.state_names = self.all_state_names

    def _update(self, be, params, grads, states, h, step):
        b1, b2 = h["betas"]
        if h.get("amsgrad"):
            be = backends.load("numpy")  # (the reference kernel takes the maximum)
            be.adam_update(params, grads, states["exp_avg"], states["exp_avg_sq"], step,
                           h["lr"], b1, b2, h["eps"], h["weight_decay"], self.decoupled,
                           states["max_exp_avg_sq"])
            return
        be.adam_update(params, grads, states["exp_avg"], states["exp_avg_sq"], step,
                       h["lr"], b1, b2, h["eps"], h["weight_decay"], self.decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``p *= 1 - lr wd`` before
    the Adam update, the gradient itself is not decayed."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused)


_BY_NAME = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop, "adagrad": Adagrad}


def get(optimizer, params) -> Optimizer:
    """An Optimizer from an instance, or from a name with default hyperparameters
    (SGD: lr=0.01)."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, str) and optimizer.lower() in _BY_NAME:
        optimizer = _BY_NAME[optimizer.lower()]
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        # (a class, as a Loss class is taken: made over params with its defaults)
        return optimizer(params, lr=0.01) if optimizer is SGD else optimizer(params)
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be a fastprop.optim.Optimizer or a name, got "
                        f"{type(optimizer).__name__}; names: {sorted(_BY_NAME)}")
    raise ValueError(f"unknown optimizer {optimizer!r}; expected a fastprop.optim.Optimizer "
                     f"or one of {sorted(_BY_NAME)}")


# ------------------------------------------------------------------ gradient clipping
def _grads_by_dtype(params):
    if isinstance(params, Parameter):  # (one, as torch takes one tensor)
        params = [params]
    # (an empty list stays a ValueError, unlike torch's norm of 0: it is most often an
    # exhausted generator, a silent no-op otherwise)
    params = _param_list(params)
    groups: dict = {}
    for p in params:
        # (frozen parameters and ones without a gradient are skipped, as in PyTorch)
        if p.requires_grad and p.has_grad:
            groups.setdefault(p._grad.dtype, []).append(p._grad)
    return list(groups.values())


def clip_grad_norm(params, max_norm, norm_type=2.0, error_if_nonfinite=False,
                   foreach=None) -> float:
    """Scale all gradients so that their global ``norm_type`` norm (2 by default, inf:
    the largest magnitude) is at most ``max_norm``; as
    ``torch.nn.utils.clip_grad_norm_`` (also named so here; ``foreach`` is accepted
    and ignored).

    Returns the total norm *before* clipping.  Gradients are scaled by
    ``min(1, max_norm / (norm + 1e-6))``, as PyTorch does (so a norm within 1e-6 below
    ``max_norm`` is scaled by less than 1e-6 relative).  A non-finite norm is a
    :class:`~fastprop.NonFiniteError` with ``error_if_nonfinite``; otherwise it is
    returned and nothing is scaled (PyTorch scales by NaN, or by 0 for an infinite
    norm).  Finite float64 gradients whose squares overflow (above ~1e154) have a
    finite norm, taken scaled by the largest magnitude, and are clipped (PyTorch
    returns inf and zeroes them).  Unlike PyTorch, a ``norm_type`` or ``max_norm``
    <= 0 is refused.
    """
    max_norm = real(max_norm, "max_norm", low=0, low_inclusive=False)
    if isinstance(norm_type, str) and norm_type == "inf":
        norm_type = math.inf
    norm_type = real(norm_type, "norm_type", low=0, low_inclusive=False)
    if not isinstance(error_if_nonfinite, (bool, np.bool_)):
        raise TypeError(f"error_if_nonfinite must be a bool, got {type(error_if_nonfinite).__name__}")
    groups = _grads_by_dtype(params)
    be = backends.current()
    fused = getattr(be, "clip_grad_norm_", None)
    if norm_type == 2.0 and fused is not None and len(groups) == 1 and not error_if_nonfinite:
        return fused(groups[0], max_norm)  # one pass to reduce, one to scale
    grads = [g for gs in groups for g in gs]
    if norm_type == 2.0:
        # (NumPy's dot warns of the overflow handled below; native kernels never warn)
        with np.errstate(over="ignore") if be.name != "native" else contextlib.nullcontext():
            total = math.sqrt(sum(be.sum_squares(g) for g in groups))
    elif math.isinf(norm_type):
        peaks = [float(np.abs(g).max()) for g in grads if g.size]
        total = math.nan if any(v != v for v in peaks) else max(peaks, default=0.0)
    else:
        with np.errstate(over="ignore"):
            total = float(sum(np.sum(np.abs(g, dtype=np.float64) ** norm_type)
                              for g in grads)) ** (1.0 / norm_type)
    if total == math.inf and not math.isinf(norm_type):
        # (finite float64 gradients whose powers overflow: scaled by the largest)
        peak = max((float(np.abs(g).max()) for g in grads if g.size), default=0.0)
        if math.isfinite(peak):
            total = peak * float(sum(np.sum((np.abs(g, dtype=np.float64) / peak) ** norm_type)
                                     for g in grads)) ** (1.0 / norm_type)
    if not math.isfinite(total):
        if error_if_nonfinite:
            raise backends.NonFiniteError(
                f"the total norm of order {norm_type} of the gradients is non-finite "
                f"({total}), so it cannot be clipped")
        return total
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in groups:
            be.scale_(g, coef)
    return total


def clip_grad_value(params, value, foreach=None) -> None:
    """Clamp every gradient element to [-value, value] (value > 0), as
    ``torch.nn.utils.clip_grad_value_`` (also named so here)."""
    value = real(value, "value", low=0, low_inclusive=False)
    be = backends.current()
    for g in _grads_by_dtype(params):
        be.clip_(g, -value, value)


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None) -> float:
    """:func:`clip_grad_norm` under PyTorch's name and argument names."""
    return clip_grad_norm(parameters, max_norm, norm_type, error_if_nonfinite, foreach)


def clip_grad_value_(parameters, clip_value, foreach=None) -> None:
    """:func:`clip_grad_value` under PyTorch's name and argument names."""
    clip_grad_value(parameters, clip_value, foreach)


from . import lr_scheduler  # noqa: E402  (fp.optim.lr_scheduler, as torch.optim's)

# (and importable by that name: `from fastprop.optim.lr_scheduler import StepLR`, as
# `from torch.optim.lr_scheduler import StepLR`)
sys.modules[__name__ + ".lr_scheduler"] = lr_scheduler
