"""Losses: ``forward(pred, target) -> float`` and ``backward() -> grad_pred``.

Each loss is the *mean* over the batch (and, for elementwise losses, over all
elements); ``backward`` returns the gradient of that mean with respect to ``pred``,
computed in the same kernel pass as the loss.
"""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np

from . import backends
from ._checks import as_array, as_float, finite_float, flag, real
from .ops import softmax_targets

__all__ = ["Loss", "MSE", "L1", "Huber", "SmoothL1", "BinaryCrossEntropy", "SoftmaxCrossEntropy",
           "get"]


# A Loss subclass' own forward and backward are called as a pair by training steps
# that may share the object across threads: one lock per object (made on first use;
# one for all where the object cannot be a weak key), made anew in a fork child (a
# lock a parent thread held at the fork would stay held there).
def _fresh_pair_locks():
    global _PAIR_GUARD, _PAIR_LOCKS, _PAIR_ANY
    _PAIR_GUARD = threading.Lock()
    _PAIR_LOCKS = weakref.WeakKeyDictionary()
    _PAIR_ANY = threading.RLock()


_fresh_pair_locks()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_pair_locks)


def _pair_lock(loss):
    try:
        lock = _PAIR_LOCKS.get(loss)
        if lock is None:
            with _PAIR_GUARD:
                lock = _PAIR_LOCKS.setdefault(loss, threading.RLock())
        return lock
    except TypeError:  # (unhashable, or no weak reference to it)
        return _PAIR_ANY


class Loss:
    """Base class: subclasses implement ``_kernel`` and ``prepare_target``."""

    def __init__(self):
        self._grad = None

    def __call__(self, pred, target) -> float:
        return self.forward(pred, target)

    def _pred(self, pred):
        pred = as_float(pred, "pred")
        if pred.size == 0:
            raise ValueError(f"pred is empty (shape {pred.shape}): the mean loss is undefined")
        return pred

    def prepare_target(self, target, pred_shape, dtype):
        """Check and convert ``target`` for predictions of ``pred_shape``."""
        raise NotImplementedError

    def _kernel(self, pred, target, grad) -> float:
        raise NotImplementedError

    def _compute(self, pred, target):
        """(loss, gradient), kept nowhere."""
        pred = self._pred(pred)
        target = self.prepare_target(target, pred.shape, pred.dtype)
        grad = np.empty_like(pred)
        return self._kernel(pred, target, grad), grad

    def forward(self, pred, target) -> float:
        """The mean loss of ``pred`` against ``target``; its gradient with respect to
        ``pred`` is kept for :meth:`backward`."""
        loss, self._grad = self._compute(pred, target)
        return loss

    def _value_and_grad(self, pred, target):
        """(loss, gradient) for a training step: the gradient is returned, so that
        steps in several threads may share one loss object (``forward`` keeps it on
        the object for ``backward``; it is still left there).  A subclass that
        overrides ``forward`` or ``backward`` is called through them."""
        cls = type(self)
        if cls.forward is not Loss.forward or cls.backward is not Loss.backward:
            # (backward reads what forward kept on the shared object: the pair runs
            # under one lock, or another thread's forward, in a gap where the
            # subclass' code let the GIL go, hands this step its gradient)
            with _pair_lock(self):
                value = self.forward(pred, target)
                return value, self.backward()
        value, grad = self._compute(pred, target)
        self._grad = grad
        return value, grad

    def value(self, pred, target) -> float:
        """The loss alone (no gradient kept)."""
        pred = self._pred(pred)
        return self._kernel(pred, self.prepare_target(target, pred.shape, pred.dtype), None)

    def backward(self):
        """The gradient of the last :meth:`forward`'s loss with respect to ``pred``."""
        if self._grad is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return self._grad

    def get_config(self) -> dict:
        """The constructor arguments that differ from the defaults (what a saved
        model or checkpoint records of the loss)."""
        return {}

    def _batch_weight(self, target) -> float:
        """The weight of a batch's mean loss in a mean over several batches: the
        normaliser of that mean (its rows, unless an option weighs them), so that
        fit's epoch loss and ``evaluate`` are the loss of the whole data."""
        return float(len(target))

    def _layer_only(self) -> bool:
        """True when an option asks for more than the backend's fused loss kernels
        compute (a compiled step then takes the layer path, which calls ``forward``)."""
        return False

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _elementwise_target(target, pred_shape, dtype):
    t = as_array(target, "target")
    if t.shape != tuple(pred_shape):
        if t.ndim == 1 and len(pred_shape) == 2 and pred_shape[1] == 1 and t.shape[0] == pred_shape[0]:
            t = t.reshape(-1, 1)
        else:
            raise ValueError(f"target must have the prediction's shape {tuple(pred_shape)}, "
                             f"got {t.shape}")
    if t.dtype == dtype:
        out = np.asarray(t, order="C")
    else:
        with np.errstate(over="ignore"):  # (beyond float32: inf, said so below)
            out = np.asarray(t, dtype=dtype, order="C")
    out = out if out.flags.aligned else out.copy()  # (the kernels load whole floats)
    if out.size and not np.isfinite(out).all():
        finite_float(t, "target", dtype, "the prediction's dtype")  # (the message)
    return out


class MSE(Loss):
    """Mean squared error ``mean((pred - target)^2)``.

    Args:
        half: multiply by 1/2 (the ``1/(2n) sum`` form whose gradient is ``(pred - t)/n``).
    """

    def __init__(self, half=False):
        super().__init__()
        self.half = flag(half, "half")

    def get_config(self):
        return {"half": self.half}

    def prepare_target(self, target, pred_shape, dtype):
        return _elementwise_target(target, pred_shape, dtype)

    def _kernel(self, pred, target, grad):
        return backends.current().mse(pred, target, self.half, grad)


class BinaryCrossEntropy(Loss):
    """Binary cross-entropy averaged over all elements.

    Args:
        from_logits: ``pred`` are logits (numerically stable form, recommended);
            otherwise ``pred`` are probabilities in [0, 1] and log is clamped at -100.
        pos_weight: (with ``from_logits=True``) the weight of the positive term, per
            output column (broadcast over the rows) or one number, as PyTorch's
            BCEWithLogitsLoss(pos_weight=...).
    Targets must lie in [0, 1].
    """

    pos_weight = None  # (instances pickled before the option)

    def __init__(self, from_logits=False, *, pos_weight=None):
        super().__init__()
        self.from_logits = flag(from_logits, "from_logits")
        if pos_weight is not None:
            if not self.from_logits:
                raise ValueError("pos_weight needs from_logits=True (as PyTorch, which has it "
                                 "on BCEWithLogitsLoss only)")
            pos_weight = _weights(pos_weight, "pos_weight", ndim=None)
        self.pos_weight = pos_weight

    def get_config(self):
        config = {"from_logits": self.from_logits}
        if self.pos_weight is not None:
            config["pos_weight"] = self.pos_weight.tolist()
        return config

    def _layer_only(self):
        return self.pos_weight is not None

    def prepare_target(self, target, pred_shape, dtype):
        t = _elementwise_target(target, pred_shape, dtype)
        if t.size and (t.min() < 0 or t.max() > 1):
            raise ValueError(f"target must lie in [0, 1], got values in [{t.min()}, {t.max()}]")
        return t

    def _kernel(self, pred, target, grad):
        if not self.from_logits and (pred.min() < 0 or pred.max() > 1 or np.isnan(pred).any()):
            raise ValueError(
                "pred must be probabilities in [0, 1] (use from_logits=True for logits), "
                f"got values in [{pred.min()}, {pred.max()}]")
        if self.pos_weight is not None:
            return self._weighted(pred, target, grad)
        return backends.current().bce(pred, target, self.from_logits, grad)

    def _weighted(self, pred, target, grad):
        """PyTorch's BCEWithLogitsLoss(pos_weight): ``-(w t log s(x) + (1 - t) log(1 - s(x)))``
        with ``w`` broadcast over the rows, averaged (NumPy, in float64)."""
        w = self.pos_weight
        try:
            w = np.broadcast_to(w, pred.shape)
        except ValueError:
            raise ValueError(f"pos_weight of shape {self.pos_weight.shape} does not broadcast "
                             f"to the predictions' shape {pred.shape}") from None
        x = pred.astype(np.float64)
        t = target.astype(np.float64)
        # -log s(x) = softplus(-x), -log(1 - s(x)) = softplus(x); s(x) = exp(-softplus(-x))
        sp_neg, sp_pos = np.logaddexp(0.0, -x), np.logaddexp(0.0, x)
        terms = w * t * sp_neg + (1 - t) * sp_pos
        if grad is not None:
            np.divide((1 - t) * np.exp(-sp_neg) - w * t * np.exp(-sp_pos), x.size, out=grad,
                      casting="unsafe")
        return float(terms.sum() / x.size)


class SoftmaxCrossEntropy(Loss):
    """Softmax followed by cross-entropy, from logits, averaged over the batch.

    Targets: (n,) integer class ids, or (n, classes) probabilities / one-hot rows.

    Args:
        label_smoothing: in [0, 1], as PyTorch's CrossEntropyLoss: the target of each
            row becomes ``(1 - label_smoothing) target + label_smoothing / classes``
            (class ids as one-hot rows).
        weight: per-class weights, shape (classes,), finite and >= 0, as PyTorch's
            ``weight``: the term of class c counts ``weight[c]`` times.  With class ids
            the mean is taken over the weights of the rows' classes (``sum_i
            weight[y_i] loss_i / sum_i weight[y_i]``); with probability targets over
            the rows, as in PyTorch.
        ignore_index: a class id whose rows count for nothing (neither in the loss
            nor in the mean), as PyTorch's ``ignore_index`` (whose default, -100, is
            ``None`` here: every id must then be a class).  Class-id targets only.
            When every row is ignored the loss is NaN and the gradient 0, as in PyTorch.

    With ``weight`` or ``ignore_index`` the loss is computed with NumPy (in float64) on
    every backend, and a compiled step takes the layer path.
    """

    label_smoothing = 0.0  # (instances pickled before the options)
    weight = None
    ignore_index = None

    def __init__(self, label_smoothing=0.0, *, weight=None, ignore_index=None):
        super().__init__()
        self.label_smoothing = real(label_smoothing, "label_smoothing", low=0, high=1)
        self.weight = None if weight is None else _weights(weight, "weight", ndim=1)
        if ignore_index is not None:
            if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(
                    ignore_index, (int, np.integer)):
                raise TypeError(f"ignore_index must be an int or None, got "
                                f"{type(ignore_index).__name__}")
            ignore_index = int(ignore_index)
        self.ignore_index = ignore_index

    def get_config(self):
        config = {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}
        if self.weight is not None:
            config["weight"] = self.weight.tolist()
        if self.ignore_index is not None:
            config["ignore_index"] = self.ignore_index
        return config

    def _layer_only(self):
        return self.weight is not None or self.ignore_index is not None

    def _batch_weight(self, target):
        """With class ids, ``weight``/``ignore_index`` set the normaliser: the sum of
        the weights of the rows that count (0 for a batch of ignored rows only, whose
        mean loss is NaN, as PyTorch's, and whose gradient is 0)."""
        labels = np.asarray(target)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        n = float(len(target))
        if not self._layer_only() or labels.ndim != 1 or labels.dtype.kind not in "iuf":
            return n
        if self.ignore_index is not None:
            labels = labels[labels != self.ignore_index]
        if self.weight is None:
            return float(labels.shape[0])
        # (ids out of range or not integral: the loss itself says so)
        if labels.size and not (labels.min() >= 0 and labels.max() < self.weight.shape[0]):
            return n
        if labels.dtype.kind == "f":
            if np.any(labels != np.floor(labels)):
                return n
            labels = labels.astype(np.int64)
        return float(self.weight[labels].sum())

    def _pred(self, pred):
        pred = super()._pred(pred)
        if pred.ndim != 2:
            raise ValueError(f"logits must be 2-D (batch, classes), got shape {pred.shape}")
        return pred

    def prepare_target(self, target, pred_shape, dtype):
        if self._layer_only():
            return self._weighted_targets(target, pred_shape, dtype)
        labels, probs = softmax_targets(target, pred_shape, dtype)
        eps = self.label_smoothing
        if not eps:
            return labels, probs
        if labels is not None:
            smooth = np.full(pred_shape, eps / pred_shape[1], dtype)
            smooth[np.arange(pred_shape[0]), labels] += 1 - eps
        else:
            smooth = probs * np.asarray(1 - eps, dtype) + np.asarray(eps / pred_shape[1], dtype)
        return None, smooth

    def _kernel(self, pred, target, grad):
        if self._layer_only():
            return self._weighted(pred, target, grad)
        labels, probs = target
        return backends.current().softmax_xent(pred, labels, probs, grad)

    def _weighted_targets(self, target, pred_shape, dtype):
        """(class ids or None, probabilities or None, rows kept or None): the targets
        with ``weight``/``ignore_index``, checked (an ignored row may hold any id)."""
        n, classes = pred_shape
        if self.weight is not None and self.weight.shape[0] != classes:
            raise ValueError(f"weight has {self.weight.shape[0]} entries, the logits "
                             f"{classes} classes")
        labels, probs = softmax_targets(target, pred_shape, dtype, check_range=False)
        keep = None
        if labels is not None:
            keep = labels != self.ignore_index if self.ignore_index is not None else None
            used = labels if keep is None else labels[keep]
            if used.size and (used.min() < 0 or used.max() >= classes):
                ignored = ("" if self.ignore_index is None
                           else f" (or ignore_index={self.ignore_index})")
                raise ValueError(f"labels must lie in [0, {classes}) for {classes} classes"
                                 f"{ignored}, got values in [{used.min()}, {used.max()}]")
            if keep is not None:
                labels = np.where(keep, labels, 0)
        return labels, probs, keep

    def _weighted(self, pred, target, grad):
        """``-sum_c a_c log p_c`` per row, ``a`` the (smoothed) target times the class
        weights, over the normaliser above; its gradient ``(sum_c a_c) p - a``."""
        labels, probs, keep = target
        n, classes = pred.shape
        # (one errstate for all: a spread above the float range gives -inf, a row of
        # -inf logits NaN, which counts only if the row is not ignored)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            x = pred.astype(np.float64)
            x -= x.max(axis=1, keepdims=True)
            logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
            eps = self.label_smoothing
            w = self.weight if self.weight is not None else np.ones(classes)
            if labels is not None:
                a = np.full((n, classes), eps / classes)
                a[np.arange(n), labels] += 1 - eps
                row_w = w[labels]
                if keep is not None:
                    a[~keep] = 0.0
                    row_w = row_w[keep]
                den = row_w.sum()
            else:
                a = probs.astype(np.float64)
                if eps:
                    a = (1 - eps) * a + eps / classes
                den = float(n)
            a *= w
            # (only the classes with a weight: a masked -inf logit, or one below the
            # row's maximum by more than the float range, of a class with a = 0 adds
            # nothing (0 log 0 = 0, as the kernels), rather than 0 * -inf = NaN)
            total = (a * logp).sum()
            if total != total:  # (NaN: only then the sum without 0 * -inf and without
                # ignored rows (a row of -inf logits is NaN), ~30% slower; another NaN
                # term, a row of -inf logits that counts, stays NaN, as PyTorch's)
                skip = (a == 0) & np.isinf(logp)
                if keep is not None:
                    skip |= ~keep[:, None]
                terms = np.zeros_like(a)
                np.multiply(a, logp, out=terms, where=~skip)
                total = terms.sum()
            loss = float(-total / den)
            if grad is not None:
                if den == 0:
                    grad[...] = 0
                else:
                    rows = a.sum(axis=1, keepdims=True)
                    g = rows * np.exp(logp) - a
                    if keep is not None:  # (an ignored row: 0 * NaN for -inf logits)
                        g[~keep] = 0.0
                    np.divide(g, den, out=grad, casting="unsafe")
        return loss


def _weights(value, name, ndim):
    """Class or positive-class weights: a finite float64 array >= 0 (read-only, a copy);
    ``ndim`` its required number of dimensions (None: any, for broadcasting)."""
    arr = as_array(value, name)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    arr = np.array(arr, dtype=np.float64)
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{name} must be finite and >= 0")
    arr.flags.writeable = False
    return arr


class _Robust(Loss):
    """A regression loss of ``d = pred - target`` that grows linearly for large ``|d|``
    (outliers pull less than with MSE), averaged over all elements as PyTorch's
    ``reduction="mean"``.  NumPy on every backend (the sum in float64, the gradient in
    the prediction's dtype); the compiled step takes the layer path with it."""

    def prepare_target(self, target, pred_shape, dtype):
        return _elementwise_target(target, pred_shape, dtype)

    def _kernel(self, pred, target, grad):
        d = pred - target
        with np.errstate(over="ignore", invalid="ignore"):  # (np.where's unused branch)
            terms, slope = self._terms(d)
        if grad is not None:
            np.divide(slope, d.size, out=grad, casting="unsafe")
        # (each term over n first: the sum of huge terms overflows before a finite mean)
        return float(np.sum(terms / np.float64(d.size), dtype=np.float64))

    def _terms(self, d):
        """(the per-element losses, their derivatives in d)"""
        raise NotImplementedError


class L1(_Robust):
    """Mean absolute error ``mean(|pred - target|)`` (PyTorch's L1Loss, Keras' MAE);
    its gradient is ``sign(pred - target) / n`` (0 where they are equal)."""

    def _terms(self, d):
        return np.abs(d), np.sign(d)


class Huber(_Robust):
    """Huber loss (PyTorch's HuberLoss, Keras' Huber): ``d^2 / 2`` where ``|d| < delta``,
    ``delta (|d| - delta / 2)`` elsewhere; the gradient is ``d`` clipped to
    ``[-delta, delta]``, over n."""

    def __init__(self, delta=1.0):
        super().__init__()
        self.delta = real(delta, "delta", low=0, low_inclusive=False)

    def get_config(self):
        return {"delta": self.delta}

    def _terms(self, d):
        z = np.abs(d)
        delta = d.dtype.type(self.delta)
        small = z < delta
        terms = np.where(small, 0.5 * d * d, delta * (z - 0.5 * delta))
        return terms, np.clip(d, -delta, delta)


class SmoothL1(_Robust):
    """Smooth L1 loss (PyTorch's SmoothL1Loss): ``d^2 / (2 beta)`` where ``|d| < beta``,
    ``|d| - beta / 2`` elsewhere (Huber divided by beta; beta = 0 is L1); the gradient
    is ``d / beta`` clipped to ``[-1, 1]``, over n."""

    def __init__(self, beta=1.0):
        super().__init__()
        self.beta = real(beta, "beta", low=0)

    def get_config(self):
        return {"beta": self.beta}

    def _terms(self, d):
        beta = d.dtype.type(self.beta)
        if beta == 0:  # (also a beta below the dtype's smallest value)
            return np.abs(d), np.sign(d)
        z = np.abs(d)
        terms = np.where(z < beta, 0.5 * d * d / beta, z - 0.5 * beta)
        return terms, np.clip(d / beta, -1, 1)


_ALIASES = {
    "mse": MSE, "mean_squared_error": MSE,
    "l1": L1, "mae": L1, "mean_absolute_error": L1,
    "huber": Huber, "smooth_l1": SmoothL1,
    "bce": BinaryCrossEntropy, "binary_cross_entropy": BinaryCrossEntropy,
    "binary_crossentropy": BinaryCrossEntropy,
    "cross_entropy": SoftmaxCrossEntropy, "softmax_cross_entropy": SoftmaxCrossEntropy,
    "categorical_crossentropy": SoftmaxCrossEntropy,
    "sparse_categorical_crossentropy": SoftmaxCrossEntropy,
}


def get(loss) -> Loss:
    """A Loss from an instance or a name ("mse", "bce", "cross_entropy", ...).

    Every softmax cross-entropy name, the Keras-named "categorical_crossentropy" and
    "sparse_categorical_crossentropy" included, is :class:`SoftmaxCrossEntropy`,
    which takes logits (Keras' default takes probabilities: drop a final softmax;
    compile and fit warn about one).  "binary_crossentropy"/"bce" take
    probabilities, as in Keras; for logits use ``BinaryCrossEntropy(from_logits=True)``."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, type) and issubclass(loss, Loss):
        return loss()
    if isinstance(loss, str) and loss.lower() in _ALIASES:
        return _ALIASES[loss.lower()]()
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a fastprop.losses.Loss or a name, got "
                        f"{type(loss).__name__}; names: {sorted(_ALIASES)}")
    raise ValueError(f"unknown loss {loss!r}; expected a fastprop.losses.Loss or one of "
                     f"{sorted(_ALIASES)}")
