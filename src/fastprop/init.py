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

import numpy as np

from ._checks import float_dtype, real

__all__ = ["xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "zeros",
           "calculate_gain", "seed", "default_for", "get"]

_rng = np.random.default_rng()


def seed(value) -> None:
    """Seed the generator the initializers use when no ``rng`` is given."""
    global _rng
    _rng = np.random.default_rng(value)


def _generator(rng):
    if rng is None:
        return _rng
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _fans(shape):
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) != 2:
        raise ValueError(f"shape must be 1-D or 2-D (in, out), got {shape}")
    return shape[0], shape[1]


def calculate_gain(nonlinearity: str, param: float = 0.01) -> float:
    """Recommended gain for an activation (as torch.nn.init.calculate_gain)."""
    if nonlinearity in ("identity", "linear", "sigmoid", "softmax", None):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3.0
    if nonlinearity in ("relu", "gelu"):
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1.0 + param * param))
    raise ValueError(f"no gain known for nonlinearity {nonlinearity!r}")


def xavier_uniform(shape, gain=1.0, rng=None, dtype=np.float32):
    """U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(shape)
    a = real(gain, "gain", low=0) * math.sqrt(6.0 / max(fan_in + fan_out, 1))
    return _generator(rng).uniform(-a, a, size=shape).astype(float_dtype(dtype))


def xavier_normal(shape, gain=1.0, rng=None, dtype=np.float32):
    """N(0, std^2) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(shape)
    std = real(gain, "gain", low=0) * math.sqrt(2.0 / max(fan_in + fan_out, 1))
    return (_generator(rng).standard_normal(size=shape) * std).astype(float_dtype(dtype))


def he_uniform(shape, gain=math.sqrt(2.0), rng=None, dtype=np.float32):
    """U(-a, a) with a = gain * sqrt(3 / fan_in) (Kaiming, fan_in mode)."""
    fan_in, _ = _fans(shape)
    a = real(gain, "gain", low=0) * math.sqrt(3.0 / max(fan_in, 1))
    return _generator(rng).uniform(-a, a, size=shape).astype(float_dtype(dtype))


def he_normal(shape, gain=math.sqrt(2.0), rng=None, dtype=np.float32):
    """N(0, std^2) with std = gain / sqrt(fan_in) (Kaiming, fan_in mode)."""
    fan_in, _ = _fans(shape)
    std = real(gain, "gain", low=0) / math.sqrt(max(fan_in, 1))
    return (_generator(rng).standard_normal(size=shape) * std).astype(float_dtype(dtype))


def zeros(shape, gain=None, rng=None, dtype=np.float32):
    return np.zeros(shape, dtype=float_dtype(dtype))


_BY_NAME = {
    "xavier_uniform": xavier_uniform, "glorot_uniform": xavier_uniform,
    "xavier_normal": xavier_normal, "glorot_normal": xavier_normal,
    "he_uniform": he_uniform, "kaiming_uniform": he_uniform,
    "he_normal": he_normal, "kaiming_normal": he_normal,
    "zeros": zeros,
}


def get(init):
    """An initializer from a name or a callable ``f(shape, rng=..., dtype=...)``."""
    if callable(init):
        return init
    if isinstance(init, str) and init in _BY_NAME:
        return _BY_NAME[init]
    raise ValueError(f"unknown init {init!r}; expected a callable or one of {sorted(_BY_NAME)}")


def default_for(activation, alpha=0.01):
    """(initializer, gain) suited to ``activation``."""
    if activation in ("relu", "gelu"):
        return he_uniform, math.sqrt(2.0)
    if activation == "leaky_relu":
        return he_uniform, calculate_gain("leaky_relu", alpha)
    return xavier_uniform, 1.0
