"""Gradient checking by central finite differences in float64.

``gradcheck`` compares analytic gradients with ``(f(x + eps) - f(x - eps)) / (2 eps)``
element by element, and passes when ``|analytic - numeric| <= atol + rtol |numeric|``
everywhere.  It accepts:

* a Module: checks the gradient of ``sum(r * module(x))`` (``r`` a fixed random
  projection) with respect to the input and to every parameter, on a float64 copy
  of the module (dropout masks are frozen during the check);
* a Loss: ``inputs = (pred, target)``; checks the gradient with respect to ``pred``;
* a function ``fn(*inputs) -> (value, grads)`` returning the scalar value and the
  gradient of each input.
"""

from __future__ import annotations

import copy

import numpy as np

from ._checks import as_array, check_finite, real
from .losses import Loss
from .nn import Dropout, Module

__all__ = ["gradcheck", "GradcheckError"]


class GradcheckError(AssertionError):
    """Analytic and numerical gradients disagree."""


def _numeric(f, x, eps):
    """Central differences of scalar f() with respect to array x (perturbed in place)."""
    grad = np.zeros(x.shape)
    for i in np.ndindex(x.shape):  # (x itself, whatever its memory order)
        orig = x[i]
        x[i] = orig + eps
        fp = f()
        x[i] = orig - eps
        fm = f()
        x[i] = orig
        grad[i] = (fp - fm) / (2 * eps)
    return grad


def _compare(name, analytic, numeric, atol, rtol, failures):
    analytic = np.asarray(analytic, dtype=np.float64)
    if analytic.shape != numeric.shape:
        failures.append(f"{name}: analytic gradient has shape {analytic.shape}, "
                        f"expected {numeric.shape}")
        return
    with np.errstate(invalid="ignore"):
        err = np.abs(analytic - numeric)
        # NaN on either side fails (err <= tol is False for NaN); equal infinities pass
        bad = ~((analytic == numeric) | (err <= atol + rtol * np.abs(numeric)))
    if bad.any():
        score = np.where(np.isnan(err), np.inf, err - rtol * np.abs(numeric))
        i = np.unravel_index(np.argmax(np.where(bad, score, -np.inf)), err.shape)
        failures.append(f"{name}: {int(bad.sum())} of {err.size} elements differ; worst at "
                        f"{tuple(int(j) for j in i)}: analytic {analytic[i]!r}, "
                        f"numeric {numeric[i]!r}")


def gradcheck(module_or_fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, raise_exception=True,
              seed=0) -> bool:
    """Check gradients by central differences in float64.

    Args:
        module_or_fn: a Module, a Loss, or ``fn(*inputs) -> (value, grads)``.
        inputs: the input array (Module), ``(pred, target)`` (Loss) or a tuple of arrays.
        eps: finite-difference step; atol, rtol: tolerances.
        raise_exception: raise GradcheckError on mismatch (else return False).
        seed: seed of the random output projection used for modules.

    Returns:
        True when every gradient matches.
    """
    eps = real(eps, "eps", low=0, low_inclusive=False)
    atol = real(atol, "atol", low=0)
    rtol = real(rtol, "rtol", low=0)
    failures: list = []
    if isinstance(module_or_fn, Module):
        _check_module(module_or_fn, inputs, eps, atol, rtol, seed, failures)
    elif isinstance(module_or_fn, Loss):
        _check_loss(module_or_fn, inputs, eps, atol, rtol, failures)
    elif callable(module_or_fn):
        _check_fn(module_or_fn, inputs, eps, atol, rtol, failures)
    else:
        raise TypeError("gradcheck needs a Module, a Loss or a callable, got "
                        f"{type(module_or_fn).__name__}")
    if failures and raise_exception:
        raise GradcheckError("gradcheck failed:\n  " + "\n  ".join(failures))
    return not failures


def _float64(a, name) -> np.ndarray:
    """A finite float64 copy of ``a`` (NaN or inf is bad input, not a failed check:
    the finite differences through it are NaN)."""
    arr = as_array(a, name)
    check_finite(arr, name)
    return np.array(arr, dtype=np.float64, order="C")


def _check_module(module, inputs, eps, atol, rtol, seed, failures):
    # (a tuple holds the inputs, as torch's gradcheck takes them; a list is an array,
    # unless it holds exactly one array)
    if isinstance(inputs, tuple) or (isinstance(inputs, list) and len(inputs) == 1
                                     and isinstance(inputs[0], np.ndarray)):
        inputs = inputs[0]
    x = _float64(inputs, "inputs")
    # (the copy needs no compile settings: the optimizer's state is not copied, and a
    # user's loss holding a lock would refuse to be)
    args = module.__dict__.get("_compile_args")
    model = copy.deepcopy(module, {} if args is None else {id(args): None})
    model._cast(np.float64)
    out = model.forward(x)
    for m in model.modules():
        if isinstance(m, Dropout):
            m.freeze_mask = True
    proj = np.random.default_rng(seed).standard_normal(out.shape)
    model.zero_grad()
    out = model.forward(x)
    grad_x = model.backward(proj)
    params = model.parameters()
    analytic = [p.grad.copy() for p in params]

    def f():
        return float(np.sum(proj * model.forward(x)))

    _compare("input", grad_x, _numeric(f, x, eps), atol, rtol, failures)
    for k, p in enumerate(params):
        if not p.requires_grad:  # frozen: no gradient to check (as in PyTorch)
            continue
        label = f"parameter {k} ({p.name or 'unnamed'}, shape {p.shape})"
        _compare(label, analytic[k], _numeric(f, p.value, eps), atol, rtol, failures)


def _check_loss(loss, inputs, eps, atol, rtol, failures):
    pred, target = inputs
    pred = _float64(pred, "pred")
    target = np.asarray(target)
    if target.dtype.kind == "f":
        target = target.astype(np.float64)
    loss.forward(pred, target)
    analytic = loss.backward().copy()
    _compare("pred", analytic, _numeric(lambda: loss.value(pred, target), pred, eps),
             atol, rtol, failures)


def _check_fn(fn, inputs, eps, atol, rtol, failures):
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    arrays = [_float64(a, f"inputs[{i}]") for i, a in enumerate(inputs)]
    out = fn(*arrays)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("fn must return (value, grads): the scalar value and the gradient "
                        f"of each input, got {type(out).__name__}"
                        + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    grads = out[1]
    if isinstance(grads, np.ndarray):
        grads = (grads,)
    if len(grads) != len(arrays):
        raise ValueError(f"fn returned {len(grads)} gradients for {len(arrays)} inputs")
    for k, a in enumerate(arrays):
        num = _numeric(lambda: float(fn(*arrays)[0]), a, eps)
        _compare(f"input {k}", grads[k], num, atol, rtol, failures)
