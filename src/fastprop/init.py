"""Weight initializers (Glorot/Xavier and He/Kaiming), for weights stored (in, out).

Each takes the weight ``shape`` and returns a new array.  ``fan_in`` is
``shape[0]`` and ``fan_out`` is ``shape[1]`` (the dense layer's layout).

Defaults per activation (used by :class:`fastprop.nn.Dense` when ``init=None``):
He (Kaiming) uniform for relu, leaky_relu and gelu, which keep the variance of the
activations constant through a ReLU; Glorot (Xavier) uniform for identity, sigmoid,
tanh and softmax, which balances forward and backward variance.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._checks import float_dtype, real

__all__ = ["xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "zeros",
           "calculate_gain", "seed", "default_for", "get",
           "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
           "uniform_", "normal_", "constant_", "zeros_", "ones_"]

_rng = np.random.default_rng()
_masks = None  # (a SeedSequence after seed(int): the Dropout layers' generators)


def seed(value) -> None:
    """Seed the generator the initializers use when no ``rng`` is given, and, for an
    int seed, the mask generators of the Dropout layers made afterwards without
    ``seed=`` (each its own, in the order they are made, from the seed's own sequence:
    the weights drawn are the same whether Dropout layers are made between the layers
    or not).  Any other seed np.random.default_rng takes seeds the weights only."""
    global _rng, _masks
    _rng = np.random.default_rng(value)
    _masks = (np.random.SeedSequence(int(value), spawn_key=(0x6D61736B,))
              if isinstance(value, (int, np.integer)) and not isinstance(value, bool)
              else None)


def _mask_generator() -> np.random.Generator:
    """A new Dropout's generator: from :func:`seed`'s sequence when seeded with an int,
    else from fresh OS entropy."""
    seq = _masks
    return np.random.default_rng(None if seq is None else seq.spawn(1)[0])


# Every initializer checks all of its arguments before it draws a random number, so a
# rejected call leaves the generator (the global one or the caller's) where it was.

def _generator(rng):
    """The generator to draw from; a seed becomes a new generator (TypeError naming
    ``rng`` for anything np.random.default_rng does not take, and for bool)."""
    if rng is None:
        return _rng
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (bool, np.bool_)):
        raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got {rng!r}")
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as exc:
        raise type(exc)(
            f"rng must be None, an int seed or a numpy.random.Generator, got {rng!r}: {exc}"
        ) from exc


def _shape(shape) -> tuple:
    """``shape`` as a tuple of 1 or 2 positive ints (TypeError/ValueError naming it)."""
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a tuple of ints (in, out), got "
                        f"{type(shape).__name__} ({shape!r})")
    if len(shape) not in (1, 2):
        raise ValueError(f"shape must be 1-D or 2-D (in, out), got {tuple(shape)}")
    for s in shape:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral):
            raise TypeError(f"shape must hold ints, got {type(s).__name__} ({s!r}) in {shape!r}")
        if s < 1:
            raise ValueError(f"shape must hold positive sizes, got {tuple(shape)}")
    return tuple(int(s) for s in shape)


def _fans(shape):
    shape = _shape(shape)
    if len(shape) == 1:
        return shape[0], shape[0]
    return shape[0], shape[1]


def _gain(gain) -> float:
    """A finite gain >= 0 (TypeError/ValueError naming ``gain``)."""
    g = real(gain, "gain", low=0)
    if not math.isfinite(g):
        raise ValueError(f"Invalid gain: {gain!r}; expected a finite gain >= 0")
    return g


def _scale(scale, gain, dtype) -> float:
    """Reject a gain whose weights would not be finite in ``dtype``."""
    if not scale <= float(np.finfo(dtype).max) / 16:
        raise ValueError(f"Invalid gain: {gain!r}; the weights' scale {scale:g} would "
                         f"overflow {dtype}")
    return scale


def _check(shape, gain, rng, dtype):
    """Check every argument (nothing is drawn): (fan_in, fan_out, shape, gain,
    generator, dtype)."""
    shape = _shape(shape)
    fan_in, fan_out = _fans(shape)
    gain = _gain(gain)
    dtype = float_dtype(dtype)
    return fan_in, fan_out, shape, gain, _generator(rng), dtype


_LINEAR_GAIN = ("linear", "identity", "sigmoid", "softmax", None, "conv1d", "conv2d",
                "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """Recommended gain for an activation, as ``torch.nn.init.calculate_gain``: 1 for
    linear (and torch's conv names) and sigmoid, 5/3 for tanh, sqrt(2) for relu,
    sqrt(2 / (1 + slope^2)) for leaky_relu, 3/4 for selu.  fastprop adds identity,
    softmax and None (1) and gelu (sqrt(2), relu's).

    ``param`` is leaky_relu's negative slope (None: 0.01) and, as in torch, is looked at
    only for leaky_relu, where a value that is not a finite number (a str, a bool,
    NaN, ...) is a ValueError.  Another nonlinearity is a ValueError."""
    if nonlinearity in _LINEAR_GAIN:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3.0
    if nonlinearity in ("relu", "gelu", "gelu_erf"):
        return math.sqrt(2.0)
    if nonlinearity == "selu":
        return 0.75
    if nonlinearity == "leaky_relu":
        if param is None:
            param = 0.01
        if isinstance(param, (bool, np.bool_)) or not isinstance(param, numbers.Real):
            raise ValueError(f"param (leaky_relu's negative slope) {param!r} is not a valid number")
        if not math.isfinite(float(param)):
            raise ValueError(f"param (leaky_relu's negative slope) {param!r} is not finite")
        param = float(param)
        return math.sqrt(2.0 / (1.0 + param * param))
    raise ValueError(f"no gain known for nonlinearity {nonlinearity!r}")


def xavier_uniform(shape, gain=1.0, rng=None, dtype=np.float32):
    """U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out, shape, gain, gen, dtype = _check(shape, gain, rng, dtype)
    a = _scale(gain * math.sqrt(6.0 / (fan_in + fan_out)), gain, dtype)
    return gen.uniform(-a, a, size=shape).astype(dtype)


def xavier_normal(shape, gain=1.0, rng=None, dtype=np.float32):
    """N(0, std^2) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out, shape, gain, gen, dtype = _check(shape, gain, rng, dtype)
    std = _scale(gain * math.sqrt(2.0 / (fan_in + fan_out)), gain, dtype)
    return (gen.standard_normal(size=shape) * std).astype(dtype)


def he_uniform(shape, gain=math.sqrt(2.0), rng=None, dtype=np.float32):
    """U(-a, a) with a = gain * sqrt(3 / fan_in) (Kaiming, fan_in mode)."""
    fan_in, _, shape, gain, gen, dtype = _check(shape, gain, rng, dtype)
    a = _scale(gain * math.sqrt(3.0 / fan_in), gain, dtype)
    return gen.uniform(-a, a, size=shape).astype(dtype)


def he_normal(shape, gain=math.sqrt(2.0), rng=None, dtype=np.float32):
    """N(0, std^2) with std = gain / sqrt(fan_in) (Kaiming, fan_in mode)."""
    fan_in, _, shape, gain, gen, dtype = _check(shape, gain, rng, dtype)
    std = _scale(gain / math.sqrt(fan_in), gain, dtype)
    return (gen.standard_normal(size=shape) * std).astype(dtype)


def zeros(shape, gain=None, rng=None, dtype=np.float32):
    """All zeros (``gain`` and ``rng`` are checked like the others' but unused)."""
    shape = _shape(shape)
    if gain is not None:
        _gain(gain)
    dtype = float_dtype(dtype)
    _generator(rng)
    return np.zeros(shape, dtype=dtype)


# ------------------------------------------------- in place, as torch.nn.init's "_" forms
def _target(tensor):
    """(the array to fill, its shape, its dtype) of a Parameter or a float ndarray."""
    from .nn import Parameter
    if isinstance(tensor, Parameter):
        arr = tensor.value
    elif isinstance(tensor, np.ndarray) and tensor.dtype in (np.float32, np.float64):
        if not tensor.flags.writeable:
            raise ValueError("tensor is a read-only array")
        arr = tensor
    else:
        raise TypeError(f"tensor must be a fastprop Parameter or a float32/float64 ndarray, "
                        f"got {type(tensor).__name__}")
    if arr.size == 0:
        raise ValueError(f"tensor is empty (shape {arr.shape})")
    return arr


def _write(tensor, values):
    from .nn import Parameter
    dtype = _target(tensor).dtype
    with np.errstate(over="ignore"):
        cast = np.asarray(values).astype(dtype)
    if not np.isfinite(cast).all():  # (1e300 in float32: inf, refused as the gains are)
        raise ValueError(f"Invalid values: they overflow {dtype} (largest "
                         f"{float(np.max(np.abs(values))):g})")
    values = cast
    if isinstance(tensor, Parameter):
        tensor.value = values  # (a copy, in the parameter's dtype)
    else:
        np.copyto(tensor, values, casting="unsafe")
    return tensor


def _fans_of(arr, where):
    if arr.ndim != 2:
        raise ValueError(f"{where}: fan in and fan out need a 2-D weight (in, out), got "
                         f"shape {arr.shape}")
    return arr.shape[0], arr.shape[1]


def xavier_uniform_(tensor, gain=1.0, rng=None):
    """Fill a weight (in, out) from U(-a, a), a = gain sqrt(6 / (fan_in + fan_out)),
    in place, as ``torch.nn.init.xavier_uniform_``; returns it.  ``tensor`` is a
    Parameter (its value replaced by a filled copy) or a float ndarray (written in
    place)."""
    arr = _target(tensor)
    fan_in, fan_out = _fans_of(arr, "xavier_uniform_")
    gain, gen = _gain(gain), _generator(rng)
    a = _scale(gain * math.sqrt(6.0 / (fan_in + fan_out)), gain, arr.dtype)
    return _write(tensor, gen.uniform(-a, a, size=arr.shape))


def xavier_normal_(tensor, gain=1.0, rng=None):
    """N(0, std^2), std = gain sqrt(2 / (fan_in + fan_out)), in place."""
    arr = _target(tensor)
    fan_in, fan_out = _fans_of(arr, "xavier_normal_")
    gain, gen = _gain(gain), _generator(rng)
    std = _scale(gain * math.sqrt(2.0 / (fan_in + fan_out)), gain, arr.dtype)
    return _write(tensor, gen.standard_normal(size=arr.shape) * std)


def _kaiming(tensor, a, mode, nonlinearity, where):
    arr = _target(tensor)
    fan_in, fan_out = _fans_of(arr, where)
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    gain = calculate_gain(nonlinearity, a)
    return arr, gain, fan_in if mode == "fan_in" else fan_out


def kaiming_uniform_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    """U(-b, b), b = gain sqrt(3 / fan), gain = calculate_gain(nonlinearity, a), in
    place, as ``torch.nn.init.kaiming_uniform_`` (same defaults; fan_in is the
    weight's ``shape[0]`` here, its inputs)."""
    arr, gain, fan = _kaiming(tensor, a, mode, nonlinearity, "kaiming_uniform_")
    gen = _generator(rng)
    b = _scale(gain * math.sqrt(3.0 / fan), gain, arr.dtype)
    return _write(tensor, gen.uniform(-b, b, size=arr.shape))


def kaiming_normal_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    """N(0, std^2), std = gain / sqrt(fan), in place, as
    ``torch.nn.init.kaiming_normal_``."""
    arr, gain, fan = _kaiming(tensor, a, mode, nonlinearity, "kaiming_normal_")
    gen = _generator(rng)
    std = _scale(gain / math.sqrt(fan), gain, arr.dtype)
    return _write(tensor, gen.standard_normal(size=arr.shape) * std)


def _finite(value, name):
    v = real(value, name, message=f"Invalid {name}: {value!r}; expected a finite number")
    if not math.isfinite(v):
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite number")
    return v


def uniform_(tensor, a=0.0, b=1.0, rng=None):
    """U(a, b) in place (a <= b)."""
    arr = _target(tensor)
    a, b = _finite(a, "a"), _finite(b, "b")
    if a > b:
        raise ValueError(f"uniform_ needs a <= b, got a={a}, b={b}")
    return _write(tensor, _generator(rng).uniform(a, b, size=arr.shape))


def normal_(tensor, mean=0.0, std=1.0, rng=None):
    """N(mean, std^2) in place (std >= 0)."""
    arr = _target(tensor)
    mean, std = _finite(mean, "mean"), _finite(std, "std")
    if std < 0:
        raise ValueError(f"normal_ needs std >= 0, got {std}")
    return _write(tensor, mean + std * _generator(rng).standard_normal(size=arr.shape))


def constant_(tensor, val):
    """Every element ``val``, in place."""
    arr = _target(tensor)
    return _write(tensor, np.full(arr.shape, _finite(val, "val")))


def zeros_(tensor):
    """Zeros in place (a bias, typically)."""
    return constant_(tensor, 0.0)


def ones_(tensor):
    """Fill with 1, in place, as ``torch.nn.init.ones_`` (see :func:`constant_`)."""
    return constant_(tensor, 1.0)


_BY_NAME = {
    "xavier_uniform": xavier_uniform, "glorot_uniform": xavier_uniform,
    "xavier_normal": xavier_normal, "glorot_normal": xavier_normal,
    "he_uniform": he_uniform, "kaiming_uniform": he_uniform,
    "he_normal": he_normal, "kaiming_normal": he_normal,
    "zeros": zeros,
}


def _filling(fill):
    """An initializer ``f(shape, rng=, dtype=)`` from an in-place one (``init=
    fp.init.kaiming_normal_`` as PyTorch code applies it to a fresh weight)."""
    takes_rng = fill not in (zeros_, ones_)

    def make(shape, rng=None, dtype=np.float32):
        arr = np.zeros(shape, float_dtype(dtype))
        fill(arr, rng=rng) if takes_rng else fill(arr)
        return arr
    make.__name__ = make.__qualname__ = fill.__name__
    return make


def get(init):
    """An initializer from a name or a callable ``f(shape, rng=..., dtype=...)`` (or one
    of the in-place ``xavier_*_``/``kaiming_*_``/``uniform_``/``normal_``/``zeros_``/
    ``ones_`` with their defaults, applied to a new array)."""
    if init in _IN_PLACE:
        return _filling(init)
    if callable(init):
        return init
    if isinstance(init, str) and init in _BY_NAME:
        return _BY_NAME[init]
    raise ValueError(f"unknown init {init!r}; expected a callable or one of {sorted(_BY_NAME)}")


_IN_PLACE = (xavier_uniform_, xavier_normal_, kaiming_uniform_, kaiming_normal_, uniform_,
             normal_, zeros_, ones_)


def default_for(activation, alpha=0.01):
    """(initializer, gain) suited to ``activation``."""
    if activation in ("relu", "gelu", "gelu_erf"):
        return he_uniform, math.sqrt(2.0)
    if activation == "leaky_relu":
        return he_uniform, calculate_gain("leaky_relu", alpha)
    return xavier_uniform, 1.0
