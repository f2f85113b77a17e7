"""Losses: ``forward(pred, target) -> float`` and ``backward() -> grad_pred``.

Each loss is the *mean* over the batch (and, for elementwise losses, over all
elements); ``backward`` returns the gradient of that mean with respect to ``pred``,
computed in the same kernel pass as the loss.
"""

from __future__ import annotations

import numpy as np

from . import backends
from ._checks import as_array, as_float, check_finite, real
from .ops import softmax_targets

__all__ = ["Loss", "MSE", "L1", "Huber", "SmoothL1", "BinaryCrossEntropy", "SoftmaxCrossEntropy",
           "get"]


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

    def forward(self, pred, target) -> float:
        pred = self._pred(pred)
        target = self.prepare_target(target, pred.shape, pred.dtype)
        grad = np.empty_like(pred)
        loss = self._kernel(pred, target, grad)
        self._grad = grad
        return loss

    def value(self, pred, target) -> float:
        """The loss alone (no gradient kept)."""
        pred = self._pred(pred)
        return self._kernel(pred, self.prepare_target(target, pred.shape, pred.dtype), None)

    def backward(self):
        if self._grad is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return self._grad

    def get_config(self) -> dict:
        return {}

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
    t = np.asarray(t, dtype=dtype, order="C")
    check_finite(t, "target")
    return t


class MSE(Loss):
    """Mean squared error ``mean((pred - target)^2)``.

    Args:
        half: multiply by 1/2 (the ``1/(2n) sum`` form whose gradient is ``(pred - t)/n``).
    """

    def __init__(self, half=False):
        super().__init__()
        self.half = bool(half)

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
    Targets must lie in [0, 1].
    """

    def __init__(self, from_logits=False):
        super().__init__()
        self.from_logits = bool(from_logits)

    def get_config(self):
        return {"from_logits": self.from_logits}

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
        return backends.current().bce(pred, target, self.from_logits, grad)


class SoftmaxCrossEntropy(Loss):
    """Softmax followed by cross-entropy, from logits, averaged over the batch.

    Targets: (n,) integer class ids, or (n, classes) probabilities / one-hot rows.

    Args:
        label_smoothing: in [0, 1], as PyTorch's CrossEntropyLoss: the target of each
            row becomes ``(1 - label_smoothing) target + label_smoothing / classes``
            (class ids as one-hot rows).
    """

    label_smoothing = 0.0  # (instances pickled before the option)

    def __init__(self, label_smoothing=0.0):
        super().__init__()
        self.label_smoothing = real(label_smoothing, "label_smoothing", low=0, high=1)

    def get_config(self):
        return {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}

    def _pred(self, pred):
        pred = super()._pred(pred)
        if pred.ndim != 2:
            raise ValueError(f"logits must be 2-D (batch, classes), got shape {pred.shape}")
        return pred

    def prepare_target(self, target, pred_shape, dtype):
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
        labels, probs = target
        return backends.current().softmax_xent(pred, labels, probs, grad)


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
        return float(np.sum(terms, dtype=np.float64) / d.size)

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
    raise ValueError(f"unknown loss {loss!r}; expected a fastprop.losses.Loss or one of "
                     f"{sorted(_ALIASES)}")
