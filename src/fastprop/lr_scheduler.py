"""Learning-rate schedules, as ``torch.optim.lr_scheduler`` (also ``fp.optim.lr_scheduler``).

A scheduler sets the ``"lr"`` of each of an optimizer's parameter groups:
``sched.step()`` once per epoch (or per batch, in a loop of your own), after
``optimizer.step()``.  Making one sets the rates of epoch 0 (a warm-up starts low).
Each group's base rate is its ``"initial_lr"`` (its lr when the first scheduler on
the optimizer was made), so several schedulers on one optimizer share one base.

The rates are computed as PyTorch computes them, step by step from each group's
current rate (its "chainable" forms: two schedulers stepped together multiply, and a
rate written by hand between steps is what the next step starts from), and equal
its rates (tested against it).  ``step(epoch)`` jumps to an epoch with the closed
form.  A group added with ``add_param_group`` after the scheduler was made is
scheduled too, from its rate then.

Every scheduler is also a ``fit`` callback: ``model.fit(..., callbacks=[sched])``
steps it after each epoch, ``callbacks=[every_batch(sched)]`` after each batch's
update; a resumed fit (``checkpoint=..., resume=True``) puts it at the restored
epoch (or update).  :class:`ReduceLROnPlateau` reads its ``monitor`` from the
epoch's logs there ("val_loss" by default).

A rate that is not a finite number >= 0 is refused (ValueError) before any group
changes.
"""

from __future__ import annotations

import bisect
import math
import numbers

from ._checks import flag, integer, real

__all__ = ["LRScheduler", "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR",
           "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR", "CosineAnnealingLR",
           "CosineAnnealingWarmRestarts", "OneCycleLR", "SequentialLR", "ReduceLROnPlateau",
           "every_batch"]


def _optimizer(optimizer):
    from .optim import Optimizer
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a fastprop.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    return optimizer


# (state entries that count something: integers, from 1 for these, from 0 for the
# rest, from -1 for last_epoch; every other number may be fractional, as T_cur after a
# fractional step(epoch), and is a finite number >= 0 but for ``best``)
_POSITIVE = frozenset(("step_size", "T_0", "T_mult", "T_i", "total_steps"))
_COUNTS = _POSITIVE | {"last_epoch", "_step_count", "total_iters", "patience", "cooldown",
                       "num_bad_epochs", "cooldown_counter"}
# (numbers a constructor requires > 0: a schedule divides by them)
_POSITIVE_REAL = frozenset(("T_max", "start_factor"))
_CHOICES = {"mode": ("min", "max"), "threshold_mode": ("rel", "abs"),
            "anneal_strategy": ("cos", "linear")}


def _check_entries(state_dict, current, who) -> None:
    """Each loaded entry of the kind the scheduler holds there (a bool, a count, a
    number, one of a string's choices, a list as long where it has one entry per
    parameter group), in range (TypeError / ValueError naming the entry)."""
    for key, v in state_dict.items():
        ref, name = current.get(key), f"{who} state_dict[{key!r}]"
        if ref is None:
            continue
        if isinstance(ref, bool):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
        elif key in _COUNTS:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
            low = -1 if key == "last_epoch" else 1 if key in _POSITIVE else 0
            if v < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")
        elif isinstance(ref, numbers.Real):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
            if key != "best" and not (math.isfinite(v) and v >= (-1 if key == "T_cur" else 0)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
            if key in _POSITIVE_REAL and not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        elif isinstance(ref, str):
            if not isinstance(v, str) or v not in _CHOICES.get(key, (v,)):
                raise ValueError(f"{name} must be one of {list(_CHOICES.get(key, [ref]))}, "
                                 f"got {v!r}")
        elif isinstance(ref, list):
            if not isinstance(v, (list, tuple)):
                raise TypeError(f"{name} must be a list, got {type(v).__name__}")
            if key in ("base_lrs", "_last_lr", "min_lrs", "_levels") and len(v) != len(ref):
                raise ValueError(f"{name} must hold {len(ref)} entries (one per parameter "
                                 f"group), got {len(v)}")
            if key in ("base_lrs", "_last_lr", "min_lrs") and not all(
                    isinstance(r, numbers.Real) and not isinstance(r, bool)
                    and math.isfinite(r) and r >= 0 for r in v):
                raise ValueError(f"{name} must hold finite rates >= 0, got {list(v)!r}")


def _set_rates(optimizer, rates, who) -> None:
    """Write one rate per group, all checked first."""
    groups = optimizer.param_groups
    if len(rates) != len(groups):  # (a subclass's get_lr)
        raise ValueError(f"{who} computed {len(rates)} rates for {len(groups)} parameter groups")
    rates = [float(r) for r in rates]
    for i, r in enumerate(rates):
        if not (math.isfinite(r) and r >= 0):
            raise ValueError(f"{who} computed lr={r!r} for parameter group {i}; a rate must "
                             f"be a finite number >= 0")
    if len(set(rates)) == 1:
        optimizer.lr = rates[0]  # (every group, and opt.lr reads it at once)
    else:
        for g, r in zip(groups, rates):
            g["lr"] = r


class LRScheduler:
    """Base class, as PyTorch's: subclasses give ``get_lr()`` (the rates of epoch
    ``last_epoch`` from the groups' current rates) and, where one exists,
    ``_closed_form(base, t)`` (group rate at epoch ``t`` from its base rate).

    ``last_epoch`` is the epoch whose rates are set (0 after making one; -1 as the
    argument starts from the groups' current rates, a value >= 0 resumes at the epoch
    after it from their ``"initial_lr"``, e.g. after ``opt.load_state_dict``).
    """

    def __init__(self, optimizer, last_epoch=-1):
        self.optimizer = _optimizer(optimizer)
        last_epoch = integer(last_epoch, "last_epoch", low=-1)
        groups = self.optimizer.param_groups
        added = []
        if last_epoch == -1:
            for g in groups:
                if "initial_lr" not in g:
                    g["initial_lr"] = g["lr"]
                    added.append(g)
        else:
            for i, g in enumerate(groups):
                if "initial_lr" not in g:
                    raise KeyError(f"param 'initial_lr' is not specified in param_groups[{i}] "
                                   f"when resuming a scheduler (last_epoch={last_epoch}): load "
                                   f"the optimizer's state_dict first")
        self.base_lrs = [float(g["initial_lr"]) for g in groups]
        self.last_epoch = last_epoch
        self._last_lr = [float(g["lr"]) for g in groups]
        try:
            self._initial_step()
        except BaseException:
            for g in added:  # (a refused scheduler leaves the groups as they were)
                g.pop("initial_lr", None)
            raise

    def _initial_step(self):
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def __repr__(self):
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, lr={self._last_lr})"

    def _current(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def _take_new_groups(self):
        """Base rates for groups added by add_param_group since: their rate then."""
        for g in self.optimizer.param_groups[len(self.base_lrs):]:
            self.base_lrs.append(float(g.setdefault("initial_lr", g["lr"])))

    def get_lr(self) -> list:
        """The rates of epoch ``last_epoch`` (what ``step`` sets)."""
        raise NotImplementedError

    _closed_form = None  # (base, t) -> rate, where the schedule has one

    def get_last_lr(self) -> list:
        """The rates the last step set, one per parameter group."""
        return list(self._last_lr)

    def step(self, epoch=None) -> None:
        """Move to the next epoch (or to ``epoch``, with the closed form) and set its
        rates; refused (nothing changes) when a rate is not finite and >= 0."""
        groups = self.optimizer.param_groups
        self._take_new_groups()
        saved = (self.last_epoch, self._step_count)
        self._step_count += 1
        try:
            if epoch is None:
                self.last_epoch += 1
                rates = self.get_lr()
            else:
                self.last_epoch = integer(epoch, "epoch", low=0)
                rates = ([self._closed_form(b, self.last_epoch) for b in self.base_lrs]
                         if self._closed_form is not None else self.get_lr())
            _set_rates(self.optimizer, rates, type(self).__name__)
        except BaseException:
            self.last_epoch, self._step_count = saved
            raise
        self._last_lr = [float(g["lr"]) for g in groups]

    # -- as a fit callback --------------------------------------------------------
    def __call__(self, epoch, logs=None):
        """``fit``'s callback: step after each epoch (returns None: never stops it)."""
        self.step()

    def _resume_at(self, epoch) -> None:
        self.last_epoch = epoch
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    def on_resume(self, history) -> None:
        """A resumed fit restored the optimizer's rates of epoch len(history.epoch):
        go on from there."""
        self._resume_at(len(history.epoch))

    # -- checkpointing ------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the optimizer and functions (a LambdaLR's lambdas), as a
        copy (OneCycleLR's per-group levels are dicts in a list)."""
        return {k: _copied(v) for k, v in self.__dict__.items()
                if k not in ("optimizer", "lr_lambdas", "_schedulers")}

    def _check_state(self, state_dict) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        current = self.state_dict()
        unknown = sorted(set(state_dict) - set(current))
        if unknown:
            raise ValueError(f"state_dict has keys {unknown} that {type(self).__name__} "
                             f"does not have")
        _check_entries(state_dict, current, type(self).__name__)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from :meth:`state_dict` (each entry's kind and range checked first;
        nothing changes on a refusal)."""
        self._check_state(state_dict)
        self.__dict__.update({k: _copied(v) for k, v in state_dict.items()})  # (the
        # caller's lists and dicts stay theirs)


def _copied(value):
    """A state_dict entry as a copy: lists, tuples and dicts (OneCycleLR's per-group
    levels are dicts in a list) copied through; any other value as is (a subclass'
    own attribute may be a lock or a model: not copied, as PyTorch's state_dict)."""
    if type(value) in (list, tuple):
        return type(value)(_copied(v) for v in value)
    if type(value) is dict:
        return {k: _copied(v) for k, v in value.items()}
    return value


def _lambdas(fn, optimizer, name):
    groups = len(optimizer.param_groups)
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn] * groups
    if len(fns) != groups:
        raise ValueError(f"Expected {groups} {name}s (one per parameter group), got {len(fns)}")
    for f in fns:
        if not callable(f):
            raise TypeError(f"{name} must be callable, got {type(f).__name__}")
    return fns


class LambdaLR(LRScheduler):
    """``lr = base * lr_lambda(t)``; one function, or one per parameter group."""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        self.lr_lambdas = _lambdas(lr_lambda, _optimizer(optimizer), "lr_lambda")
        super().__init__(optimizer, last_epoch)

    def _fns(self):
        """One function per group (one given for all serves groups added since)."""
        fns = self.lr_lambdas
        if len(fns) != len(self.base_lrs):
            if len(set(map(id, fns))) != 1:
                raise ValueError(f"{type(self).__name__} has {len(fns)} lr_lambdas for "
                                 f"{len(self.base_lrs)} parameter groups")
            fns = [fns[0]] * len(self.base_lrs)
        return fns

    def get_lr(self):
        return [b * f(self.last_epoch) for b, f in zip(self.base_lrs, self._fns())]


class MultiplicativeLR(LambdaLR):
    """``lr *= lr_lambda(t)`` at each step after the first (epoch 0 keeps the groups'
    rates)."""

    def get_lr(self):
        if self._is_initial:
            return self._current()
        return [lr * f(self.last_epoch) for lr, f in zip(self._current(), self._fns())]


class StepLR(LRScheduler):
    """``lr = base * gamma ** (t // step_size)`` (``lr *= gamma`` every
    ``step_size`` epochs)."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        self.step_size = integer(step_size, "step_size", low=1)
        self.gamma = real(gamma, "gamma", low=0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        t = self.last_epoch
        if t == 0 or t % self.step_size:
            return self._current()
        return [lr * self.gamma for lr in self._current()]

    def _closed_form(self, base, t):
        return base * self.gamma ** (t // self.step_size)


class MultiStepLR(LRScheduler):
    """``lr *= gamma`` at each milestone (a milestone given twice counts twice, as in
    PyTorch): ``lr = base * gamma ** (milestones passed)``."""

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1):
        self.milestones = sorted(integer(m, "milestones[i]", low=0) for m in milestones)
        self.gamma = real(gamma, "gamma", low=0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        hits = self.milestones.count(self.last_epoch)
        if not hits:
            return self._current()
        return [lr * self.gamma ** hits for lr in self._current()]

    def _closed_form(self, base, t):
        return base * self.gamma ** bisect.bisect_right(self.milestones, t)


class ConstantLR(LRScheduler):
    """``lr = base * factor`` for the first ``total_iters`` epochs, then ``base``."""

    def __init__(self, optimizer, factor=1.0 / 3, total_iters=5, last_epoch=-1):
        self.factor = real(factor, "factor", low=0, high=1)
        self.total_iters = integer(total_iters, "total_iters", low=0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        t = self.last_epoch
        if t == 0:
            return [lr * self.factor for lr in self._current()]
        if t != self.total_iters:
            return self._current()
        if self.factor == 0:  # (PyTorch divides by zero here)
            return list(self.base_lrs)
        return [lr * (1.0 / self.factor) for lr in self._current()]

    def _closed_form(self, base, t):
        return base * (self.factor + (t >= self.total_iters) * (1 - self.factor))


class LinearLR(LRScheduler):
    """Linear warm-up (or decay) of the factor from ``start_factor`` to ``end_factor``
    over ``total_iters`` epochs: ``lr = base * (start + (end - start) *
    min(t, total_iters) / total_iters)``."""

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5,
                 last_epoch=-1):
        self.start_factor = real(start_factor, "start_factor", low=0, low_inclusive=False,
                                 high=1)
        self.end_factor = real(end_factor, "end_factor", low=0, high=1)
        self.total_iters = integer(total_iters, "total_iters", low=1)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        t = self.last_epoch
        if t == 0:
            return [lr * self.start_factor for lr in self._current()]
        if self._is_initial or t > self.total_iters:
            return self._current()
        a, b, n = self.start_factor, self.end_factor, self.total_iters
        return [lr * (1.0 + (b - a) / (n * a + (t - 1) * (b - a))) for lr in self._current()]

    def _closed_form(self, base, t):
        return base * (self.start_factor + (self.end_factor - self.start_factor)
                       * min(self.total_iters, t) / self.total_iters)


class ExponentialLR(LRScheduler):
    """``lr = base * gamma ** t``."""

    def __init__(self, optimizer, gamma, last_epoch=-1):
        self.gamma = real(gamma, "gamma", low=0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self._is_initial:
            return self._current()
        return [lr * self.gamma for lr in self._current()]

    def _closed_form(self, base, t):
        return base * self.gamma ** t


class PolynomialLR(LRScheduler):
    """``lr = base * (1 - min(t, total_iters) / total_iters) ** power``."""

    def __init__(self, optimizer, total_iters=5, power=1.0, last_epoch=-1):
        self.total_iters = integer(total_iters, "total_iters", low=1)
        self.power = real(power, "power", low=0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        t, n = self.last_epoch, self.total_iters
        if self._is_initial or t > n:
            return self._current()
        decay = ((1.0 - t / n) / (1.0 - (t - 1) / n)) ** self.power
        return [lr * decay for lr in self._current()]

    def _closed_form(self, base, t):
        return base * (1.0 - min(self.total_iters, t) / self.total_iters) ** self.power


class CosineAnnealingLR(LRScheduler):
    """``lr = eta_min + (base - eta_min) (1 + cos(pi t / T_max)) / 2`` (SGDR without
    restarts; past ``T_max`` it rises again, as PyTorch's).  Each epoch's rate comes
    from the last one by PyTorch's recursive form (which follows a group's rate changed
    by hand); where that form dips below 0 (a group at or below ``eta_min``, a short
    ``T_max``) the rate is 0 for that epoch (PyTorch applies the negative rate, a step
    uphill; refusing it would refuse every later step too)."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        self.T_max = real(T_max, "T_max", low=0, low_inclusive=False)
        self.eta_min = real(eta_min, "eta_min", low=0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        t, T, low = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return self._current()
        if self._step_count == 1 and t > 0:
            return [self._closed_form(b, t) for b in self.base_lrs]
        if (t - 1 - T) % (2 * T) == 0:
            return [max(0.0, lr + (b - low) * (1 - math.cos(math.pi / T)) / 2)
                    for lr, b in zip(self._current(), self.base_lrs)]
        return [max(0.0, (1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T))
                    * (lr - low) + low) for lr in self._current()]

    def _closed_form(self, base, t):
        return self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * t / self.T_max)) / 2


class CosineAnnealingWarmRestarts(LRScheduler):
    """Cosine annealing from the base rate to ``eta_min`` over ``T_0`` epochs, then
    again from the base over ``T_0 T_mult``, ... (SGDR), as PyTorch's.  ``step(epoch)``
    also takes a fractional epoch (``epoch + batch / batches``, per batch)."""

    def __init__(self, optimizer, T_0, T_mult=1, eta_min=0.0, last_epoch=-1):
        self.T_0 = integer(T_0, "T_0", low=1)
        self.T_mult = integer(T_mult, "T_mult", low=1)
        self.eta_min = real(eta_min, "eta_min", low=0)
        self.T_i = self.T_0
        self.T_cur = integer(last_epoch, "last_epoch", low=-1)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [self.eta_min + (b - self.eta_min) * (1 + math.cos(math.pi * self.T_cur / self.T_i)) / 2
                for b in self.base_lrs]

    def _place(self, epoch):
        """(T_cur, T_i) at ``epoch`` (>= 0), as PyTorch's step(epoch)."""
        if epoch >= self.T_0:
            if self.T_mult == 1:
                return epoch % self.T_0, self.T_0
            n = int(math.log(epoch / self.T_0 * (self.T_mult - 1) + 1, self.T_mult))
            return (epoch - self.T_0 * (self.T_mult ** n - 1) / (self.T_mult - 1),
                    self.T_0 * self.T_mult ** n)
        return epoch, self.T_0

    def step(self, epoch=None) -> None:
        groups = self.optimizer.param_groups
        self._take_new_groups()
        saved = (self.last_epoch, self._step_count, self.T_cur, self.T_i)
        self._step_count += 1
        try:
            if epoch is None and self.last_epoch < 0:
                epoch = 0
            if epoch is None:
                epoch = self.last_epoch + 1
                self.T_cur = self.T_cur + 1
                if self.T_cur >= self.T_i:
                    self.T_cur = self.T_cur % self.T_i
                    self.T_i = self.T_i * self.T_mult
            else:
                epoch = real(epoch, "epoch", low=0)
                self.T_cur, self.T_i = self._place(epoch)
            self.last_epoch = math.floor(epoch)
            _set_rates(self.optimizer, self.get_lr(), "CosineAnnealingWarmRestarts")
        except BaseException:
            self.last_epoch, self._step_count, self.T_cur, self.T_i = saved
            raise
        self._last_lr = [float(g["lr"]) for g in groups]

    def _resume_at(self, epoch) -> None:
        super()._resume_at(epoch)
        self.T_cur, self.T_i = self._place(epoch)


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin), as PyTorch's, stepped once per batch: the
    rate rises from ``max_lr / div_factor`` to ``max_lr`` over the first
    ``pct_start`` of ``total_steps`` (or ``epochs * steps_per_epoch``), then anneals
    ("cos" or "linear") to ``initial / final_div_factor``; with ``cycle_momentum`` the
    momentum (SGD's, or Adam's beta1) moves inversely between ``max_momentum`` and
    ``base_momentum``.  ``three_phase`` as PyTorch's.  Stepping past ``total_steps``
    is a ValueError.  (As a ``fit`` callback it steps once per epoch: give
    ``total_steps=epochs``.)  Its per-group rates and momenta are kept in the
    scheduler (PyTorch keeps them in the groups)."""

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None,
                 pct_start=0.3, anneal_strategy="cos", cycle_momentum=True,
                 base_momentum=0.85, max_momentum=0.95, div_factor=25.0,
                 final_div_factor=1e4, three_phase=False, last_epoch=-1):
        optimizer = _optimizer(optimizer)
        if total_steps is not None:
            self.total_steps = integer(total_steps, "total_steps", low=1)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = (integer(epochs, "epochs", low=1)
                                * integer(steps_per_epoch, "steps_per_epoch", low=1))
        else:
            raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")
        pct_start = real(pct_start, "pct_start", low=0, high=1)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', got "
                             f"{anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        div_factor = real(div_factor, "div_factor", low=0, low_inclusive=False)
        final_div_factor = real(final_div_factor, "final_div_factor", low=0, low_inclusive=False)
        groups = optimizer.param_groups
        n = len(groups)

        def per_group(value, name):
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ValueError(f"expected {n} values for {name}, got {len(values)}")
            return [real(v, name, low=0) for v in values]

        max_lrs = per_group(max_lr, "max_lr")
        T = self.total_steps
        if three_phase:
            self._phases = [(float(pct_start * T) - 1, "initial", "max", "max_m", "base_m"),
                            (float(2 * pct_start * T) - 2, "max", "initial", "base_m", "max_m"),
                            (T - 1, "initial", "min", "max_m", "max_m")]
        else:
            self._phases = [(float(pct_start * T) - 1, "initial", "max", "max_m", "base_m"),
                            (T - 1, "max", "min", "base_m", "max_m")]
        start = 0.0
        for end, *_ in self._phases:  # (a phase of no length: PyTorch divides by zero)
            if end == start:
                raise ValueError(f"OneCycleLR: pct_start={pct_start} with total_steps={T} "
                                 f"makes a phase of no length; change either")
            start = end
        self.cycle_momentum = flag(cycle_momentum, "cycle_momentum")
        self.use_beta1 = "betas" in optimizer.hyper
        if self.cycle_momentum:
            if "momentum" not in optimizer.hyper and not self.use_beta1:
                raise ValueError("optimizer must support momentum or beta1 with "
                                 "`cycle_momentum` option enabled")
            max_ms = per_group(max_momentum, "max_momentum")
            base_ms = per_group(base_momentum, "base_momentum")
        else:
            max_ms = base_ms = [0.0] * n
        last_epoch = integer(last_epoch, "last_epoch", low=-1)
        self._levels = [{"initial": m / div_factor, "max": m, "min": m / div_factor / final_div_factor,
                         "max_m": a, "base_m": b} for m, a, b in zip(max_lrs, max_ms, base_ms)]
        saved = [{k: g[k] for k in ("initial_lr", "momentum", "betas") if k in g} for g in groups]
        try:
            if last_epoch == -1:
                for g, lv in zip(groups, self._levels):
                    g["initial_lr"] = lv["initial"]
                if self.cycle_momentum:
                    self._set_momenta([lv["max_m"] for lv in self._levels], optimizer)
            super().__init__(optimizer, last_epoch)
        except BaseException:  # (a refused scheduler leaves the groups as they were)
            for g, old in zip(groups, saved):
                g.pop("initial_lr", None)
                g.update(old)
            raise

    def _set_momenta(self, values, optimizer=None):
        opt = optimizer or self.optimizer
        for g, m in zip(opt.param_groups, values):
            if self.use_beta1:
                g["betas"] = (m, *tuple(g["betas"])[1:])
            else:
                g["momentum"] = m

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self):
        t = self.last_epoch
        if t > self.total_steps:
            raise ValueError(f"Tried to step {t} times. The specified number of total steps "
                             f"is {self.total_steps}")
        groups = self.optimizer.param_groups
        while len(self._levels) < len(groups):  # (a group added since: its rate's cycle)
            lr = groups[len(self._levels)]["lr"]
            self._levels.append({"initial": lr, "max": lr, "min": lr, "max_m": 0.0,
                                 "base_m": 0.0})
        rates, momenta = [], []
        for lv in self._levels:
            start = 0.0
            for i, (end, lr0, lr1, m0, m1) in enumerate(self._phases):
                if t <= end or i == len(self._phases) - 1:
                    pct = (t - start) / (end - start)
                    rate = self._anneal(lv[lr0], lv[lr1], pct)
                    # (the step after the last update, t == total_steps, lies past the
                    # anneal's end: PyTorch's linear rate there may be negative, and is
                    # never used; 0 here, which the optimizer accepts)
                    rates.append(max(rate, 0.0) if t == self.total_steps else rate)
                    momenta.append(self._anneal(lv[m0], lv[m1], pct))
                    break
                start = end
        if self.cycle_momentum:
            self._pending_momenta = momenta
        return rates

    def step(self, epoch=None) -> None:
        self._pending_momenta = None
        super().step(epoch)
        if self._pending_momenta is not None:  # (the rates were accepted)
            self._set_momenta(self._pending_momenta)
        self._pending_momenta = None


class SequentialLR(LRScheduler):
    """``schedulers[k]`` from epoch ``milestones[k - 1]`` on, counting its own epochs
    from 0 there (e.g. ``LinearLR`` warm-up for 5 epochs, then ``CosineAnnealingLR``:
    ``milestones=[5]``), as PyTorch's.  The schedulers must be made on the same
    optimizer (making them set their epoch-0 rates; this undoes that and starts the
    first)."""

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1):
        optimizer = _optimizer(optimizer)
        schedulers = list(schedulers)
        if not schedulers:
            raise ValueError("SequentialLR expects at least one scheduler")
        for i, s in enumerate(schedulers):
            if not isinstance(s, LRScheduler) or isinstance(s, SequentialLR):
                raise TypeError(f"schedulers[{i}] must be an LRScheduler (not "
                                f"ReduceLROnPlateau, which needs a figure, nor a "
                                f"SequentialLR), got {type(s).__name__}")
            if s.optimizer is not optimizer:
                raise ValueError(f"schedulers[{i}] belongs to another optimizer")
        milestones = [integer(m, "milestones[i]", low=0) for m in milestones]
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR expects {len(schedulers) - 1} milestones for "
                             f"{len(schedulers)} schedulers, got {len(milestones)}")
        if milestones != sorted(milestones):
            raise ValueError(f"milestones must not decrease, got {milestones}")
        last_epoch = integer(last_epoch, "last_epoch", low=-1)
        self._schedulers = schedulers
        self._milestones = milestones
        self.optimizer = optimizer
        self.last_epoch = last_epoch + 1
        for g in optimizer.param_groups:  # (undo the schedulers' own first steps)
            g["lr"] = g["initial_lr"]
        for s in schedulers:
            s.last_epoch -= 1
        self._schedulers[bisect.bisect_right(milestones, 0)]._initial_step()
        self.base_lrs = [float(g["initial_lr"]) for g in optimizer.param_groups]
        self._step_count = 1
        self._last_lr = [float(g["lr"]) for g in optimizer.param_groups]

    def step(self) -> None:  # (no epoch argument, as PyTorch's)
        t = self.last_epoch + 1
        idx = bisect.bisect_right(self._milestones, t)
        sched = self._schedulers[idx]
        if idx > 0 and self._milestones[idx - 1] == t:
            sched.step(0)
        else:
            sched.step()
        self.last_epoch = t
        self._last_lr = sched.get_last_lr()

    def _resume_at(self, epoch) -> None:
        self.last_epoch = epoch
        idx = bisect.bisect_right(self._milestones, epoch)
        self._schedulers[idx]._resume_at(epoch - (self._milestones[idx - 1] if idx else 0))
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or not isinstance(
                state_dict.get("_schedulers"), list) or len(
                state_dict["_schedulers"]) != len(self._schedulers):
            raise ValueError(f"state_dict must be a SequentialLR's with "
                             f"{len(self._schedulers)} schedulers")
        own = {k: v for k, v in state_dict.items() if k != "_schedulers"}
        self._check_state(own)
        for s, sd in zip(self._schedulers, state_dict["_schedulers"]):
            s._check_state(sd)  # (all checked before any changes)
        self.__dict__.update({k: _copied(v) for k, v in own.items()})
        for s, sd in zip(self._schedulers, state_dict["_schedulers"]):
            s.load_state_dict(sd)


class ReduceLROnPlateau:
    """Multiply every group's rate by ``factor`` (not below ``min_lr``) when the
    monitored figure has not improved for more than ``patience`` epochs, as PyTorch's
    (same arguments, thresholds and cooldown; a NaN is never an improvement; a change
    smaller than ``eps`` is not made).  ``step(metric)`` in a loop of your own; as a
    ``fit`` callback it reads ``logs[monitor]`` (a fastprop addition, "val_loss" by
    default), refuses before training a fit whose logs lack it, and rebuilds its
    counts from the history of a resumed fit.  ``mode`` "min" or "max"; "auto" (the
    default, as Keras') is "max" for a ``monitor`` naming an accuracy, "min"
    otherwise (PyTorch's default "min", for the default "val_loss")."""

    def __init__(self, optimizer, mode="auto", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8, *,
                 monitor="val_loss"):
        self.optimizer = _optimizer(optimizer)
        if mode not in ("min", "max", "auto"):
            raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        self.factor = real(factor, "factor", low=0, high=1, high_inclusive=False,
                           message=f"Factor should be < 1.0 (and >= 0), got {factor!r}")
        groups = len(self.optimizer.param_groups)
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != groups:
                raise ValueError(f"expected {groups} min_lrs (one per parameter group), got "
                                 f"{len(min_lr)}")
            self.min_lrs = [real(m, "min_lr", low=0) for m in min_lr]
            self.default_min_lr = None
        else:
            self.default_min_lr = real(min_lr, "min_lr", low=0)
            self.min_lrs = [self.default_min_lr] * groups
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a History key (str), got {type(monitor).__name__}")
        if mode == "auto":  # (Keras': accuracies grow)
            mode = "max" if "acc" in monitor else "min"
        self.mode, self.threshold_mode, self.monitor = mode, threshold_mode, monitor
        self.patience = integer(patience, "patience", low=0)
        self.threshold = real(threshold, "threshold", low=0)
        self.cooldown = integer(cooldown, "cooldown", low=0)
        self.eps = real(eps, "eps", low=0)
        self._reset()
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    def _reset(self):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.last_epoch = 0

    def __repr__(self):
        return (f"ReduceLROnPlateau(monitor={self.monitor!r}, best={self.best}, "
                f"num_bad_epochs={self.num_bad_epochs}, lr={self._last_lr})")

    def _is_better(self, a, best):
        if self.mode == "min":
            return a < (best * (1 - self.threshold) if self.threshold_mode == "rel"
                        else best - self.threshold)
        return a > (best * (self.threshold + 1) if self.threshold_mode == "rel"
                    else best + self.threshold)

    def get_last_lr(self) -> list:
        """The groups' rates after the last step."""
        return list(self._last_lr)

    def step(self, metrics) -> None:
        """One epoch's figure (a float)."""
        if isinstance(metrics, (bool, str)):
            raise TypeError(f"metrics must be a number, got {type(metrics).__name__}")
        try:
            value = float(metrics)  # (NaN allowed: never an improvement)
        except (TypeError, ValueError):
            raise TypeError(f"metrics must be a number, got {type(metrics).__name__}") from None
        self._observe(value, apply=True)

    def _observe(self, current, apply):
        groups = self.optimizer.param_groups
        if apply and len(groups) != len(self.min_lrs):  # (add_param_group since)
            if self.default_min_lr is None:
                raise ValueError(f"ReduceLROnPlateau has {len(self.min_lrs)} min_lrs, the "
                                 f"optimizer {len(groups)} parameter groups now: set min_lrs")
            self.min_lrs = [self.default_min_lr] * len(groups)
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            if apply:
                rates = []
                for g, low in zip(groups, self.min_lrs):
                    old = float(g["lr"])
                    new = max(old * self.factor, low)
                    rates.append(new if old - new > self.eps else old)
                # (as the other schedulers set them: one rate for all is opt.lr at once)
                _set_rates(self.optimizer, rates, "ReduceLROnPlateau")
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    # -- as a fit callback --------------------------------------------------------
    def on_train_begin(self, keys=None) -> None:
        """Refuse, before training, a fit whose logs will not hold ``monitor``."""
        if keys is not None and self.monitor not in keys:
            raise ValueError(f"ReduceLROnPlateau monitors {self.monitor!r}, but this fit's "
                             f"logs hold {sorted(keys)} (val_* needs validation data)")

    def __call__(self, epoch, logs):
        self._observe(float(logs[self.monitor]), apply=True)

    def on_resume(self, history) -> None:
        """Rebuild best, bad epochs and cooldown from a resumed fit's history (the
        rates themselves were restored with the optimizer)."""
        self._reset()
        for value in history.history.get(self.monitor, []):
            self._observe(float(value), apply=False)

    def state_dict(self) -> dict:
        """Everything but the optimizer (a copy)."""
        return {k: _copied(v) for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore from :meth:`state_dict` (each entry's kind and range checked
        first; nothing changes on a refusal)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        current = self.state_dict()
        unknown = sorted(set(state_dict) - set(current))
        if unknown:
            raise ValueError(f"state_dict has keys {unknown} that ReduceLROnPlateau does "
                             f"not have")
        _check_entries(state_dict, current, "ReduceLROnPlateau")
        factor = state_dict.get("factor", self.factor)
        if not 0 <= factor < 1:
            raise ValueError(f"ReduceLROnPlateau state_dict['factor'] must be in [0, 1), "
                             f"got {factor!r}")
        self.__dict__.update({k: _copied(v) for k, v in state_dict.items()})


class every_batch:
    """A ``fit`` callback that steps ``scheduler`` after each batch's update instead of
    after each epoch (a warm-up over updates, ``OneCycleLR(total_steps=epochs *
    batches)``): ``fit(..., callbacks=[every_batch(sched)])``.  On a resumed fit it
    is put at the restored optimizer's update count (batches skipped for a
    non-finite loss took no update, and no step here)."""

    def __init__(self, scheduler):
        if not isinstance(scheduler, LRScheduler):
            raise TypeError(f"every_batch needs an LRScheduler (ReduceLROnPlateau watches an "
                            f"epoch's figure), got {type(scheduler).__name__}")
        self.scheduler = scheduler
        # the optimizer's update count when the scheduler was at its epoch 0
        self._offset = scheduler.optimizer.step_count - scheduler.last_epoch

    def __repr__(self):
        return f"every_batch({self.scheduler!r})"

    def on_train_batch_end(self, batch, logs=None) -> None:
        """Step the scheduler (fit calls it after each batch's update)."""
        self.scheduler.step()

    def __call__(self, epoch, logs=None) -> None:
        """(nothing at an epoch's end)"""

    def on_resume(self, history) -> None:
        """Put the scheduler at the restored optimizer's update count (a resumed fit)."""
        self.scheduler._resume_at(self.scheduler.optimizer.step_count - self._offset)
