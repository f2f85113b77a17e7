"""Functional kernels: NumPy in, NumPy out, dispatched to the current backend.

Every function checks and converts its arguments (dtype, ndim, shapes, layout),
allocates its outputs, and calls the backend kernel named in the contract of
:mod:`fastprop.backends`.  Inputs of other real dtypes are converted following NumPy
promotion (integers -> float64), except float16, computed in float32; float32 and
float64 are computed natively.
"""

from __future__ import annotations

import numpy as np

from . import backends
from ._checks import (FLOAT_DTYPES, as_array, as_float, c_array, check_out, check_shape, flag,
                      class_labels, compute_dtype, real)
from .backends import ACTIVATIONS

__all__ = ["matmul", "linear", "linear_backward", "activation", "activation_backward",
           "softmax_cross_entropy", "activation_code"]


def activation_code(name) -> int:
    """Integer code of an activation name (None means identity)."""
    if name is None:
        return 0
    if not isinstance(name, str):
        raise TypeError(f"activation must be a str or None, got {type(name).__name__}")
    if name == "linear":  # (Keras' name of the identity)
        return 0
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def _gemm_operand(arr: np.ndarray, trans: bool):
    """View ``arr`` so that its last axis has unit stride (a transposed view flips
    ``trans``); copy only when neither axis is contiguous."""
    item = arr.itemsize
    s0, s1 = arr.strides
    if s1 == item and s0 >= 0 and s0 % item == 0:
        return arr, trans
    if s0 == item and s1 >= 0 and s1 % item == 0:
        return arr.T, not trans
    return np.ascontiguousarray(arr), trans


def matmul(a, b, *, trans_a=False, trans_b=False, out=None, accumulate=False):
    """``op(a) @ op(b)`` (``+ out`` when ``accumulate``) for 2-D arrays.

    Args:
        a, b: 2-D arrays; ``op(a) = a.T`` when ``trans_a`` (no copy is made).
        out: optional output of exactly the result's shape and dtype, writable.
        accumulate: add the product to ``out`` (requires ``out``).

    Shape: ``op(a)`` is (m, k), ``op(b)`` is (k, n), the result (m, n).
    """
    mod = backends.current()
    if mod is backends._loaded.get("native"):  # (the common case in one C call)
        fast = mod.matmul_fast(a, b, trans_a, trans_b, out, accumulate)
        if fast is not None:
            return fast
    elif type(a) is np.ndarray and type(b) is np.ndarray and a.ndim == 2 and b.ndim == 2:
        fast = _matmul_fast(a, b, flag(trans_a, "trans_a"), flag(trans_b, "trans_b"), out,
                            flag(accumulate, "accumulate"))
        if fast is not None:
            return fast
    trans_a, trans_b = flag(trans_a, "trans_a"), flag(trans_b, "trans_b")
    accumulate = flag(accumulate, "accumulate")
    a = as_array(a, "a")
    b = as_array(b, "b")
    for name, arr in (("a", a), ("b", b)):
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got a {arr.ndim}-D array of shape {arr.shape}")
    dtype = compute_dtype(a, b)
    # (an unaligned array, a view at an odd byte offset, is copied: the kernels load
    # whole floats from it)
    a = a.astype(dtype) if (a.dtype != dtype or not a.dtype.isnative
                            or not a.flags.aligned) else a
    b = b.astype(dtype) if (b.dtype != dtype or not b.dtype.isnative
                            or not b.flags.aligned) else b
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k2, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != k2:
        raise ValueError(
            f"matmul: inner dimensions differ: op(a) has shape ({m}, {k}) "
            f"and op(b) has shape ({k2}, {n})")
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True requires out")
        out = np.empty((m, n), dtype=dtype)
    else:
        check_out(out, (m, n), dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        if not accumulate:
            out.fill(0)
        return out
    a, trans_a = _gemm_operand(a, trans_a)
    b, trans_b = _gemm_operand(b, trans_b)
    target = out
    if (out.strides[1] != out.itemsize or out.strides[0] < n * out.itemsize
            or out.strides[0] % out.itemsize or not out.flags.aligned
            or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
        target = out.copy() if accumulate else np.empty((m, n), dtype=dtype)
    backends.current().gemm(a, b, target, trans_a, trans_b, accumulate)
    if target is not out:
        out[...] = target
    return out


def _matmul_fast(a, b, trans_a, trans_b, out, accumulate):
    """``matmul`` for two same-dtype float32/float64 2-D arrays whose rows are
    contiguous, and an ``out`` (if any) of that dtype and the result's shape with
    contiguous rows, writable, apart from both (the common case, checked in a few
    attribute reads: the general path costs ~3 us of Python, more than a 32^3
    product); None otherwise (the general path: copies, messages, empty cases)."""
    dtype = a.dtype
    if dtype is not b.dtype or dtype not in FLOAT_DTYPES:
        return None
    item = dtype.itemsize
    sa, sb = a.strides, b.strides
    if (sa[1] != item or sb[1] != item or sa[0] < 0 or sb[0] < 0
            or sa[0] % item or sb[0] % item or not (a.flags.aligned and b.flags.aligned)):
        return None
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k2, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != k2 or m == 0 or n == 0 or k == 0:
        return None  # the general path raises the message or handles the empty case
    if out is None:
        if accumulate:
            return None
        out = np.empty((m, n), dtype=dtype)
    elif (type(out) is not np.ndarray or out.dtype != dtype or out.shape != (m, n)
          or not out.flags.writeable or out.strides[1] != item
          or out.strides[0] < n * item or out.strides[0] % item or not out.flags.aligned
          or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
        return None
    backends.current().gemm(a, b, out, trans_a, trans_b, accumulate)
    return out


def _linear_args(x, w, b):
    if (type(x) is np.ndarray and type(w) is np.ndarray and x.dtype in FLOAT_DTYPES
            and w.dtype == x.dtype and x.ndim == 2 and w.ndim == 2
            and x.shape[1] == w.shape[0] and x.flags.c_contiguous and w.flags.c_contiguous
            and x.flags.aligned and w.flags.aligned
            and (b is None or (type(b) is np.ndarray and b.dtype == x.dtype
                               and b.shape == (w.shape[1],) and b.flags.c_contiguous
                               and b.flags.aligned))):
        return x, w, b, x.dtype  # (what the checks below return for these, in ~0.5 us)
    x = as_array(x, "x")
    w = as_array(w, "w")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (batch, in_features), got shape {x.shape}")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D (in_features, out_features), got shape {w.shape}")
    if x.shape[1] != w.shape[0]:
        raise ValueError(
            f"x has {x.shape[1]} features but w expects {w.shape[0]} (w has shape {w.shape})")
    arrays = [x, w] if b is None else [x, w, as_array(b, "b")]
    dtype = compute_dtype(*arrays)
    x = c_array(x, dtype)
    w = c_array(w, dtype)
    if b is not None:
        b = as_float(b, "b", dtype)
        check_shape(b, (w.shape[1],), "b")
    return x, w, b, dtype


def linear(x, w, b=None, *, activation=None, return_preact=False, alpha=0.01):
    """``act(x @ w + b)``; with ``return_preact`` returns ``(y, z)``, z = x @ w + b.
    ``alpha``: the negative slope of "leaky_relu" (other activations ignore it).

    Shape: x (n, in), w (in, out), b (out,), y and z (n, out).
    """
    act = activation_code(activation)
    alpha = real(alpha, "alpha", low=0)
    return_preact = flag(return_preact, "return_preact")
    x, w, b, dtype = _linear_args(x, w, b)
    n, out_f = x.shape[0], w.shape[1]
    y = np.empty((n, out_f), dtype=dtype)
    z = np.empty((n, out_f), dtype=dtype) if return_preact else None
    if y.size:
        if x.shape[1] == 0:
            pre = np.zeros((n, out_f), dtype) if b is None else np.broadcast_to(b, (n, out_f)).copy()
            if z is not None:
                z[...] = pre
            backends.current().activation_forward(act, alpha, pre, y)
        else:
            backends.current().linear_forward(x, w, b, act, alpha, y, z)
    return (y, z) if return_preact else y


def linear_backward(grad_y, x, w, y, *, activation=None, z=None, alpha=0.01):
    """Gradients of a dense layer ``y = act(x @ w + b)``: ``(grad_x, grad_w, grad_b)``.

    ``y`` is the forward output (needed by relu, leaky_relu, sigmoid, tanh, softmax);
    ``z`` the pre-activation (needed by gelu and gelu_erf); ``alpha`` the forward's
    leaky_relu slope.
    """
    act = activation_code(activation)
    alpha = real(alpha, "alpha", low=0)
    x, w, _, dtype = _linear_args(x, w, None)
    n, out_f = x.shape[0], w.shape[1]
    shape = (n, out_f)
    if not (_ready(grad_y, dtype, shape) and (y is None or _ready(y, dtype, shape))
            and (z is None or _ready(z, dtype, shape))):
        # the computation dtype promotes over every operand (a float64 grad_y with
        # float32 x and w computes in float64, as linear promotes x, w and b)
        given = [as_array(a, nm) for a, nm in ((grad_y, "grad_y"), (y, "y"), (z, "z"))
                 if a is not None]
        wide = compute_dtype(x, w, *given)
        if wide != dtype:
            x, w, dtype = x.astype(wide), w.astype(wide), wide
        grad_y = as_float(grad_y, "grad_y", dtype)
        check_shape(grad_y, shape, "grad_y")
    # (else every operand is already what the checks above return)
    y, z = _act_operands(act, y, z, shape, dtype)
    grad_x = np.empty_like(x)
    grad_w = np.empty_like(w)
    grad_b = np.empty(out_f, dtype=dtype)
    if n and out_f:  # (the kernel writes every element of the three)
        work = None if act == 0 else np.empty(shape, dtype=dtype)
        backends.current().linear_backward(grad_y, x, w, y, z, act, alpha, grad_x, grad_w,
                                           grad_b, work, False)
    else:  # (an empty batch or no outputs: every gradient is 0)
        grad_x.fill(0)
        grad_w.fill(0)
        grad_b.fill(0)
    return grad_x, grad_w, grad_b


def _ready(a, dtype, shape):
    """``a`` is a C-contiguous aligned ndarray of ``dtype`` and ``shape``: what the
    conversions and shape checks would return unchanged."""
    return (type(a) is np.ndarray and a.dtype == dtype and a.shape == shape
            and a.flags.c_contiguous and a.flags.aligned)


def _act_operands(act, y, z, shape, dtype, z_name="z"):
    """Check the forward values an activation's backward needs (and the shape of one
    given but not needed: a wrong one is a mistake, not a value to ignore)."""
    for arr, arg in ((y, "y"), (z, z_name)):
        if arr is not None and not (type(arr) is np.ndarray and arr.shape == shape):
            check_shape(as_array(arr, arg), shape, arg)
    if act in backends.PREACT_ACTIVATIONS:
        if z is None:
            raise ValueError("gelu backward needs the pre-activation: pass x "
                             "(activation_backward) or z (linear_backward)")
        z = as_float(z, z_name, dtype)
        return None, z
    if act == 0:
        return None, None
    if y is None:
        name = next(k for k, v in ACTIVATIONS.items() if v == act)
        raise ValueError(f"{name} backward needs the forward output y")
    return as_float(y, "y", dtype), None


def activation(name, x, *, alpha=0.01, out=None):
    """Elementwise activation of any-shaped ``x`` (softmax: over the last axis).
    ``alpha``: the negative slope of "leaky_relu" (others ignore it); ``out``: an array
    of x's shape and dtype to write into (may be x itself), returned."""
    act = activation_code(name)
    alpha = real(alpha, "alpha", low=0)
    x = as_float(x, "x")
    if act == ACTIVATIONS["softmax"] and x.ndim == 0:
        raise ValueError("softmax needs at least 1-D input")
    if out is None:
        out = np.empty_like(x)
    else:
        check_out(out, x.shape, x.dtype)
        # the kernel may write y over x only when they are the same array: a partial
        # overlap would read inputs it has already overwritten
        if (not out.flags.c_contiguous or not out.flags.aligned
                or (out is not x and np.may_share_memory(out, x))):
            out[...] = activation(name, x, alpha=alpha)
            return out
    if x.size:
        backends.current().activation_forward(act, alpha, x, out)
    return out


def activation_backward(name, grad_y, x, y, *, alpha=0.01):
    """Gradient with respect to the activation input.

    relu, leaky_relu, sigmoid, tanh and softmax read the output ``y``; gelu and gelu_erf
    read the
    input ``x``; pass None for the one not needed.
    """
    act = activation_code(name)
    alpha = real(alpha, "alpha", low=0)
    if not (type(grad_y) is np.ndarray and grad_y.dtype in FLOAT_DTYPES
            and (y is None or _ready(y, grad_y.dtype, grad_y.shape))
            and (x is None or _ready(x, grad_y.dtype, grad_y.shape))):
        given = [as_array(a, nm) for a, nm in ((grad_y, "grad_y"), (y, "y"), (x, "x"))
                 if a is not None]
        grad_y = as_float(grad_y, "grad_y", compute_dtype(*given))
    else:  # (one float dtype over all: the conversion only makes it C-contiguous)
        grad_y = as_float(grad_y, "grad_y")
    if act == ACTIVATIONS["softmax"] and grad_y.ndim == 0:
        raise ValueError("softmax needs at least 1-D input")
    y_, x_ = _act_operands(act, y, x, grad_y.shape, grad_y.dtype, "x")
    grad_x = np.empty_like(grad_y)
    if grad_y.size:
        backends.current().activation_backward(act, alpha, grad_y, x_, y_, grad_x)
    return grad_x


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to ``logits``.

    Args:
        logits: (n, classes) scores.
        labels: (n,) integer class ids, or (n, classes) target probabilities / one-hot.

    Returns:
        (loss, grad_logits): a float and an array shaped like ``logits``.
    """
    logits = as_float(logits, "logits", ndim=2)
    labels_i, targets = softmax_targets(labels, logits.shape, logits.dtype)
    if logits.shape[0] == 0:
        raise ValueError("logits is empty: the mean loss of 0 samples is undefined")
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one class column")
    grad = np.empty_like(logits)
    loss = backends.current().softmax_xent(logits, labels_i, targets, grad)
    return loss, grad


def softmax_targets(labels, shape, dtype, check_range=True):
    """Split labels into (int64 class ids, None) or (None, float targets)
    (``check_range=False``: for a kernel that checks the class ids' range itself)."""
    n, classes = shape
    arr = as_array(labels, "labels")
    if arr.ndim == 2 and arr.shape == (n, 1) and classes > 1:  # (a column of class ids,
        arr = arr[:, 0]                                         # as Keras' sparse labels)
    if arr.ndim == 1:
        return class_labels(arr, n, classes, check_range=check_range), None
    if arr.ndim == 2:
        if arr.shape != (n, classes):
            raise ValueError(
                f"labels given as target probabilities must have shape {(n, classes)}, "
                f"got {arr.shape}")
        targets = c_array(arr, dtype)
        if not np.isfinite(targets).all():
            raise ValueError("labels (target probabilities) contain NaN or infinite values")
        return None, targets
    raise ValueError(
        f"labels must be (n,) class ids or (n, classes) targets, got shape {arr.shape}")
