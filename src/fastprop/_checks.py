"""Argument checking shared by the Python layer.

Every public entry point converts and checks its inputs here before any kernel runs,
so that a backend only ever sees contiguous float32/float64 arrays of agreeing
shapes.  Messages name the argument, what was expected and what was received.
"""

from __future__ import annotations

import collections.abc
import numbers
import os
import sys
import warnings

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def float_dtype(dtype, name: str = "dtype") -> np.dtype:
    """Normalise a dtype argument to float32/float64 or raise TypeError."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from exc
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def compute_dtype(*arrays) -> np.dtype:
    """The floating dtype a kernel computes in for these inputs (NumPy promotion,
    integers and bool -> float64, float16 -> float32)."""
    dt = np.result_type(*arrays)
    if dt.kind in "biu":
        return np.dtype(np.float64)
    if dt.kind == "f":
        return np.dtype(np.float32) if dt.itemsize <= 4 else np.dtype(np.float64)
    raise TypeError(f"expected real numeric arrays, got dtype {dt}")


# NumPy < 1.24 makes an object array of a ragged list with a VisibleDeprecationWarning
# (an error under -W error, in place of as_array's TypeError); later ones raise
_RAGGED_WARNS = np.lib.NumpyVersion(np.__version__) < "1.24.0"


def _asarray(x) -> np.ndarray:
    if not _RAGGED_WARNS:
        return np.asarray(x)
    with warnings.catch_warnings():  # (the later NumPy's error, and its words)
        warnings.simplefilter("error", np.VisibleDeprecationWarning)
        try:
            return np.asarray(x)
        except np.VisibleDeprecationWarning:
            raise ValueError("setting an array element with a sequence: the nested "
                             "sequences have different lengths (an inhomogeneous "
                             "shape)") from None


def _pandas_dtypes(x) -> list:
    """The dtypes of a pandas DataFrame's columns, or a Series' dtype ([] otherwise)."""
    dtypes = getattr(x, "dtypes", None)
    if dtypes is not None and hasattr(dtypes, "tolist"):
        return list(dtypes.tolist())
    dt = getattr(x, "dtype", None)
    return [dt] if dt is not None else []


def as_array(x, name: str) -> np.ndarray:
    """np.asarray with a TypeError naming the argument for non-numeric input."""
    if isinstance(x, np.ndarray):
        arr = x
    else:
        if x is None:
            raise TypeError(f"{name} must be an array, got None")
        if isinstance(x, collections.abc.Iterator):  # (np.asarray: a 0-d object array)
            raise TypeError(
                f"{name} must be an array, got {type(x).__name__}, an iterator: fastprop's "
                f"fit, predict and evaluate take whole arrays; to train batch by batch, "
                f"make the step once, step = model.compile(loss, optimizer), and call "
                f"step(xb, yb) for each batch")
        if callable(getattr(x, "tocsr", None)) and callable(getattr(x, "toarray", None)):
            raise TypeError(f"{name} is a scipy.sparse matrix; fastprop's layers take dense "
                            f"arrays: pass {name}.toarray() (fastprop.sklearn's estimators "
                            f"take sparse input)")
        try:
            arr = _asarray(x)
            if arr.dtype == object and callable(getattr(x, "to_numpy", None)) and all(
                    getattr(dt, "kind", "O") in "biuf" for dt in _pandas_dtypes(x)):
                # (pandas' nullable Int64/Float64/boolean columns, or bool mixed with
                # float: object arrays; pd.NA becomes NaN, refused as NaN is; a
                # datetime or string column is not a number)
                arr = x.to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError, RuntimeError) as exc:  # (torch: requires grad)
            raise TypeError(f"{name} must be array-like of numbers: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"{name} must hold real numbers (bool, int or float), got dtype {arr.dtype}")
    return arr


def c_array(x, dtype=None) -> np.ndarray:
    """np.ascontiguousarray that also copies an unaligned array (a view at an odd byte
    offset): the kernels load whole elements from what they are given."""
    arr = np.ascontiguousarray(x, dtype=dtype)
    return arr if arr.flags.aligned else arr.copy()


def as_float(x, name: str, dtype=None, ndim=None) -> np.ndarray:
    """Convert to a C-contiguous, native-byte-order float array of ``dtype`` (or the
    array's own float dtype), checking ``ndim`` if given."""
    if (type(x) is np.ndarray and x.dtype in FLOAT_DTYPES
            and (dtype is None or x.dtype == dtype) and (ndim is None or x.ndim == ndim)
            and x.flags.c_contiguous and x.flags.aligned):
        return x  # (already so: what np.asarray returns, in a third of its time)
    arr = as_array(x, name)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got a {arr.ndim}-D array of shape {arr.shape}")
    dt = compute_dtype(arr) if dtype is None else np.dtype(dtype)
    if arr.dtype == dt:  # (no conversion: no errstate, ~1 us, on every layer's forward)
        out = np.asarray(arr, order="C")  # ascontiguousarray would make 0-d 1-d
    else:
        with np.errstate(over="ignore"):  # (beyond float32's range: inf, refused by callers)
            out = np.asarray(arr, dtype=dt, order="C")
    # (an unaligned array, a view at an odd byte offset: copied, since the kernels load
    # whole floats from it)
    return out if out.flags.aligned else out.copy()


def finite_float(x, name: str, dtype, whose="the model's dtype") -> np.ndarray:
    """:func:`as_float` to ``dtype``, refusing NaN and infinities (ValueError), and
    saying so when a value is finite but beyond ``dtype``'s range (``whose``)."""
    arr = as_array(x, name)
    out = as_float(arr, name, dtype)
    try:
        check_finite(out, name)
    except ValueError:
        if out is not arr and arr.dtype.kind == "f" and np.isfinite(arr).all():
            raise ValueError(
                f"{name} has values beyond the range of {out.dtype} ({whose}): "
                f"largest magnitude {np.abs(arr).max()}") from None
        raise
    return out


def check_shape(arr: np.ndarray, shape: tuple, name: str) -> None:
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")


def check_out(out, shape: tuple, dtype: np.dtype, name: str = "out") -> np.ndarray:
    if not isinstance(out, np.ndarray) or isinstance(out, (np.ma.MaskedArray, np.matrix)):
        # (a masked array's mask or a matrix's operators would not follow the values
        # written: the backends behaved differently on them)
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(
            f"{name} must have shape {tuple(shape)} and dtype {dtype}, "
            f"got shape {out.shape} and dtype {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def check_finite(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")


def flag(value, name: str) -> bool:
    """A yes/no option: a bool (or NumPy bool, or the integer 0 or 1); a string such as
    "False", which ``bool()`` would take as True, is refused (TypeError)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


def real(value, name: str, *, low=None, low_inclusive=True, high=None, high_inclusive=True,
         message=None) -> float:
    """Check a real-valued hyperparameter: a number (not bool) within bounds."""
    if type(value) is not float and type(value) is not int and (  # (the ABC check: ~0.4 us)
            isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    try:
        v = float(value)
    except OverflowError:  # (an int beyond float's range: 10 ** 400)
        raise ValueError(f"Invalid {name}: an integer too large for a float "
                         f"({len(str(abs(value)))} digits)") from None
    bad = v != v
    if low is not None:
        bad = bad or (v < low if low_inclusive else v <= low)
    if high is not None:
        bad = bad or (v > high if high_inclusive else v >= high)
    if bad:
        lo = "" if low is None else (f"{low} <= " if low_inclusive else f"{low} < ")
        hi = "" if high is None else (f" <= {high}" if high_inclusive else f" < {high}")
        raise ValueError(message or f"Invalid {name}: {value!r}; expected {lo}{name}{hi}")
    return v


def integer(value, name: str, *, low=None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"Invalid {name}: {v}; expected {name} >= {low}")
    return v


def class_labels(labels, n: int, classes: int, name: str = "labels",
                 check_range: bool = True) -> np.ndarray:
    """Validate integer class ids of shape (n,) in [0, classes); return int64 array.
    ``check_range=False`` leaves the range to a kernel that checks it itself."""
    arr = as_array(labels, name)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the batch, got {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must be integer class ids, got non-integral values")
    elif arr.dtype.kind == "b":
        raise TypeError(f"{name} must be integer class ids, got dtype bool")
    # (ids beyond int64 have no conversion: the range error, on the values given)
    # (float(): 2 ** 63 promoted to float16 overflows, with a RuntimeWarning)
    beyond = bool(n) and arr.dtype.kind in "fu" and float(np.abs(arr).max()) >= 2.0 ** 63
    out = None if beyond else c_array(arr, np.int64)
    if beyond or (check_range and n and (out.min() < 0 or out.max() >= classes)):
        raise ValueError(
            f"{name} must lie in [0, {classes}) for {classes} classes, "
            f"got values in [{arr.min()}, {arr.max()}]")  # (arr: uint64 unwrapped)
    return out


def warn_user(message) -> None:
    """A UserWarning attributed to the first caller outside fastprop (the user's
    line that called compile, fit or a constructor)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
