"""Layers and losses: gradcheck in float64, forward values against NumPy, API details."""

import copy
import io
import math
import warnings

import numpy as np
import pytest

import fastprop as fp
from fastprop import nn
from _support import act_ref, assert_close

ACTS = [None, "identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softmax"]


def x64(rng, *shape, scale=1.0):
    return scale * rng.standard_normal(shape)


# --------------------------------------------------------------------------- gradcheck
def test_gradcheck_detects_a_wrong_backward(backend, rng):
    """The tool the layer tests rely on fails on a wrong gradient."""

    class HalfWrongTanh(nn.Tanh):
        def backward(self, grad_out, input_grad=True):
            return 0.5 * super().backward(grad_out, input_grad)

    with pytest.raises(fp.GradcheckError, match="input"):
        fp.gradcheck(HalfWrongTanh(), x64(rng, 3, 4))
    assert fp.gradcheck(HalfWrongTanh(), x64(rng, 3, 4), raise_exception=False) is False

    class DenseForgetsBias(nn.Dense):
        def backward(self, grad_out, input_grad=True):
            out = super().backward(grad_out, input_grad)
            self.bias.grad[...] = 0
            return out

    with pytest.raises(fp.GradcheckError, match="bias"):
        fp.gradcheck(DenseForgetsBias(3, 2, dtype=np.float64, rng=0), x64(rng, 4, 3))


def test_gradcheck_fails_on_nan_gradients(rng):
    """A NaN gradient, analytic or numeric, is a failure (NaN compares False with any
    tolerance, which had counted it as a pass); equal infinities agree."""
    x = np.array([0.5, -1.0, 2.0])
    assert not fp.gradcheck(lambda x: (float(x @ x), np.full_like(x, np.nan)), (x,),
                            raise_exception=False)
    assert not fp.gradcheck(lambda x: (float("nan"), 2 * x), (x,), raise_exception=False)

    class NanBackward(nn.Tanh):
        def backward(self, grad_out, input_grad=True):
            return np.full_like(super().backward(grad_out, input_grad), np.nan)

    with pytest.raises(fp.GradcheckError, match="nan"):
        fp.gradcheck(NanBackward(), x64(rng, 3, 4))
    assert fp.gradcheck(lambda x: (float(x @ x), 2 * x), (x,))


def test_gradcheck_says_what_fn_must_return():
    with pytest.raises(TypeError, match=r"fn must return \(value, grads\).*got float"):
        fp.gradcheck(lambda x: float(x @ x), (np.ones(3),))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_dense(backend, rng, act, bias):
    layer = nn.Dense(4, 3, activation=act, bias=bias, rng=1)
    if bias:  # a non-zero bias, so a bias bug cannot hide behind zeros
        layer.bias.value[...] = rng.standard_normal(3)
    assert fp.gradcheck(layer, x64(rng, 5, 4))


def test_gradcheck_dense_float64_layer(backend, rng):
    layer = nn.Dense(3, 4, activation="tanh", dtype=np.float64, rng=2)
    assert fp.gradcheck(layer, x64(rng, 6, 3), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("layer", [nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.Softmax, nn.Identity,
                                   lambda: nn.LeakyReLU(0.1), lambda: nn.LeakyReLU(0.0)],
                         ids=["relu", "sigmoid", "tanh", "gelu", "softmax", "identity",
                              "leaky0.1", "leaky0"])
def test_gradcheck_activation_layers(backend, rng, layer):
    assert fp.gradcheck(layer(), x64(rng, 4, 5, scale=2.0))


def test_gradcheck_softmax_3d(backend, rng):
    assert fp.gradcheck(nn.Softmax(), x64(rng, 2, 3, 4))


def test_gradcheck_batchnorm_train(backend, rng):
    bn = nn.BatchNorm1d(3)
    bn.weight.value[...] = [0.5, 2.0, -1.0]
    bn.bias.value[...] = [0.1, -0.2, 0.3]
    assert fp.gradcheck(bn, x64(rng, 6, 3, scale=2.0) + 1.0)


def test_gradcheck_layernorm(backend, rng):
    ln = nn.LayerNorm(5)
    ln.weight.value[...] = rng.standard_normal(5)
    ln.bias.value[...] = rng.standard_normal(5)
    assert fp.gradcheck(ln, x64(rng, 4, 5, scale=2.0))


def test_gradcheck_dropout(backend, rng):
    assert fp.gradcheck(nn.Dropout(0.4, seed=3), x64(rng, 6, 5))
    assert fp.gradcheck(nn.Dropout(0.4, seed=3).eval(), x64(rng, 6, 5))


def test_gradcheck_residual(backend, rng):
    block = nn.Sequential(nn.Dense(4, 4, "tanh", rng=4), nn.Dense(4, 4, rng=5))
    assert fp.gradcheck(nn.Residual(block), x64(rng, 3, 4))


def test_gradcheck_sequential(backend, rng):
    model = nn.Sequential(
        nn.Dense(4, 6, rng=6), nn.LayerNorm(6), nn.GELU(),
        nn.Dense(6, 5, "leaky_relu", rng=7), nn.BatchNorm1d(5), nn.Dropout(0.2, seed=1),
        nn.Residual(nn.Dense(5, 5, "sigmoid", rng=8)), nn.Dense(5, 3, "softmax", rng=9))
    assert fp.gradcheck(model, x64(rng, 6, 4))


@pytest.mark.parametrize("kind", ["labels", "onehot", "soft", "unnormalised"])
def test_gradcheck_softmax_cross_entropy(backend, rng, kind):
    pred = x64(rng, 5, 4, scale=2.0)
    labels = np.array([0, 3, 1, 1, 2])
    if kind == "labels":
        target = labels
    elif kind == "onehot":
        target = np.eye(4)[labels]
    elif kind == "soft":
        t = rng.random((5, 4))
        target = t / t.sum(1, keepdims=True)
    else:  # rows that do not sum to 1 (and one negative entry): the gradient is exact
        target = rng.random((5, 4)) * 2
        target[1, 2] = -0.5
    assert fp.gradcheck(fp.losses.SoftmaxCrossEntropy(), (pred, target))


@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
def test_gradcheck_bce(backend, rng, from_logits):
    target = rng.random((6, 2))
    if from_logits:
        pred = x64(rng, 6, 2, scale=3.0)
    else:
        pred = rng.uniform(0.05, 0.95, (6, 2))
    assert fp.gradcheck(fp.losses.BinaryCrossEntropy(from_logits=from_logits), (pred, target))


@pytest.mark.parametrize("half", [False, True])
def test_gradcheck_mse(backend, rng, half):
    assert fp.gradcheck(fp.losses.MSE(half=half), (x64(rng, 4, 3), x64(rng, 4, 3)))


def test_gradcheck_function(rng):
    def f(a, b):
        return float(np.sum(a * b ** 2)), (b ** 2, 2 * a * b)
    assert fp.gradcheck(f, (x64(rng, 3), x64(rng, 3)))

    def wrong(a):
        return float(np.sum(a ** 3)), 2 * a ** 2
    assert not fp.gradcheck(wrong, (x64(rng, 4),), raise_exception=False)


# --------------------------------------------------------------------------- loss values
def _loss_ref(kind, p, t):
    p, t = p.astype(np.float64), t.astype(np.float64)
    n = p.size
    if kind == "mse":
        return np.mean((p - t) ** 2), 2 * (p - t) / n
    if kind == "mse_half":
        return 0.5 * np.mean((p - t) ** 2), (p - t) / n
    if kind == "bce":
        loss = -np.mean(t * np.log(p) + (1 - t) * np.log1p(-p))
        return loss, (p - t) / (p * (1 - p)) / n
    if kind == "bce_logits":
        s = 0.5 * (1 + np.tanh(0.5 * p))
        loss = -np.mean(t * np.log(s) + (1 - t) * np.log1p(-s))
        return loss, (s - t) / n
    d = p - t
    if kind == "l1":
        return np.mean(np.abs(d)), np.sign(d) / n
    if kind in ("huber", "smooth_l1"):  # delta 0.7; beta 0.7 (Huber / beta)
        small = np.abs(d) < 0.7
        loss = np.where(small, 0.5 * d ** 2, 0.7 * (np.abs(d) - 0.35))
        grad = np.where(small, d, 0.7 * np.sign(d))
        scale = 1.0 if kind == "huber" else 1 / 0.7
        return scale * np.mean(loss), scale * grad / n
    raise AssertionError(kind)


LOSSES = {
    "mse": lambda: fp.losses.MSE(),
    "mse_half": lambda: fp.losses.MSE(half=True),
    "bce": lambda: fp.losses.BinaryCrossEntropy(),
    "bce_logits": lambda: fp.losses.BinaryCrossEntropy(from_logits=True),
    "l1": lambda: fp.losses.L1(),
    "huber": lambda: fp.losses.Huber(delta=0.7),
    "smooth_l1": lambda: fp.losses.SmoothL1(beta=0.7),
}


@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (31, 3), (65, 33)], ids=str)
@pytest.mark.parametrize("kind", list(LOSSES))
def test_loss_values_and_grads(backend, dtype, rng, kind, shape):
    if kind == "bce":
        p = rng.uniform(0.02, 0.98, shape).astype(dtype)
    else:
        p = (2 * rng.standard_normal(shape)).astype(dtype)
    t = (rng.random(shape) if kind.startswith("bce") else rng.standard_normal(shape)).astype(dtype)
    loss = LOSSES[kind]()
    value = loss(p, t)
    grad = loss.backward()
    assert isinstance(value, float)
    assert grad.dtype == dtype and grad.shape == shape
    ref_v, ref_g = _loss_ref(kind, p, t)
    # the mean of per-element terms: error relative to the mean of their magnitudes;
    # the BCE-of-probabilities gradient divides by p(1-p) >= 0.0196 (x51 amplification
    # of the input's representation error).
    factor = 60.0 if kind == "bce" else 1.0
    assert_close(value, ref_v, dtype, abs(ref_v) + 1.0, what="loss")
    assert_close(grad, ref_g, dtype, np.abs(ref_g), factor=factor, what="grad")
    assert loss.value(p, t) == pytest.approx(value, rel=1e-6, abs=1e-12)


def test_mse_half_is_half(backend, rng):
    p, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    full, half = fp.losses.MSE(), fp.losses.MSE(half=True)
    assert half(p, t) == pytest.approx(0.5 * full(p, t), rel=1e-14)
    assert np.allclose(half.backward(), 0.5 * full.backward(), rtol=1e-14, atol=0)
    assert full(p, t) == pytest.approx(np.mean((p - t) ** 2), rel=1e-13)


def test_mse_accepts_1d_target_for_column_prediction(backend, rng):
    p = rng.standard_normal((6, 1))
    t = rng.standard_normal(6)
    assert fp.losses.MSE()(p, t) == pytest.approx(np.mean((p[:, 0] - t) ** 2), rel=1e-13)


def test_bce_stable_at_the_extremes(backend, dtype):
    logits = np.array([[1e4, -1e4, 50.0, -50.0, 0.0]], dtype)
    target = np.array([[1.0, 0.0, 0.0, 1.0, 0.5]], dtype)
    loss = fp.losses.BinaryCrossEntropy(from_logits=True)
    value = loss(logits, target)
    assert np.isfinite(value)
    assert value == pytest.approx((50 + 50 + np.log(2)) / 5, rel=1e-5)
    assert_close(loss.backward(), [[0, 0, 1 / 5, -1 / 5, 0]], dtype)

    probs = np.array([[0.0, 1.0, 1.0, 0.0]], dtype)
    target = np.array([[0.0, 1.0, 0.0, 1.0]], dtype)
    loss = fp.losses.BinaryCrossEntropy()
    value = loss(probs, target)   # log clamped at -100, as PyTorch
    assert value == pytest.approx(200 / 4, rel=1e-6)
    assert np.isfinite(loss.backward()).all()


@pytest.mark.parametrize("kind", ["labels", "onehot"])
def test_softmax_cross_entropy_loss_matches_ops(backend, dtype, rng, kind):
    logits = rng.standard_normal((7, 5)).astype(dtype)
    labels = rng.integers(0, 5, 7)
    target = labels if kind == "labels" else np.eye(5)[labels]
    loss = fp.losses.SoftmaxCrossEntropy()
    value = loss(logits, target)
    ref_loss, ref_grad = fp.ops.softmax_cross_entropy(logits, target)
    assert value == ref_loss
    assert np.array_equal(loss.backward(), ref_grad)
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x).sum(1))
    assert value == pytest.approx(np.mean(lse - x[np.arange(7), labels]), rel=1e-5)


def test_loss_names():
    assert isinstance(fp.losses.get("mse"), fp.losses.MSE)
    assert isinstance(fp.losses.get("bce"), fp.losses.BinaryCrossEntropy)
    assert isinstance(fp.losses.get("cross_entropy"), fp.losses.SoftmaxCrossEntropy)
    loss = fp.losses.MSE(half=True)
    assert fp.losses.get(loss) is loss
    assert repr(loss) == "MSE(half=True)"


# --------------------------------------------------------------------------- layer values
@pytest.mark.parametrize("act", ["relu", "sigmoid", "gelu", "softmax"])
def test_dense_forward_and_parameter_layout(backend, dtype, rng, act):
    layer = nn.Dense(5, 3, activation=act, dtype=dtype, rng=0)
    assert layer.weight.shape == (5, 3) and layer.bias.shape == (3,)
    assert layer.weight.dtype == dtype == layer.bias.dtype
    assert np.array_equal(layer.bias.value, np.zeros(3))
    layer.bias.value[...] = [0.5, -1.0, 2.0]
    x = rng.standard_normal((4, 5))
    y = layer(x)
    assert y.dtype == dtype
    xd = x.astype(dtype).astype(np.float64)
    z = xd @ layer.weight.value.astype(np.float64) + layer.bias.value
    assert_close(y, act_ref(act, z), dtype, np.abs(z).max() + 1)


def test_dense_zero_rows(backend, dtype):
    layer = nn.Dense(3, 2, "relu", dtype=dtype)
    y = layer(np.empty((0, 3)))
    assert y.shape == (0, 2) and y.dtype == dtype
    gx = layer.backward(np.empty((0, 2)))
    assert gx.shape == (0, 3)
    assert not layer.weight.grad.any()


def test_dense_backward_accumulates_into_grads(backend, dtype, rng):
    layer = nn.Dense(4, 3, "tanh", dtype=dtype, rng=0)
    x = rng.standard_normal((6, 4))
    g = rng.standard_normal((6, 3))
    layer(x)
    layer.backward(g)
    first = [p.grad.copy() for p in layer.parameters()]
    assert all(f.any() for f in first)
    layer(x)
    layer.backward(g)
    for p, f in zip(layer.parameters(), first):
        assert_close(p.grad, 2 * f.astype(np.float64), dtype, np.abs(2 * f))
    layer.zero_grad()
    assert not any(p.grad.any() for p in layer.parameters())


def test_dense_init_defaults(rng):
    # 120000 uniform draws reach within 1e-4 of the bound (P(miss) ~ e^-12)
    relu = nn.Dense(400, 300, "relu", rng=0)
    bound = np.sqrt(6.0 / 400)  # He uniform
    assert 0.9999 * bound < np.abs(relu.weight.value).max() <= bound
    tanh = nn.Dense(400, 300, "tanh", rng=0)
    bound = np.sqrt(6.0 / 700)  # Xavier uniform
    assert 0.9999 * bound < np.abs(tanh.weight.value).max() <= bound
    leaky = nn.Dense(400, 300, "leaky_relu", alpha=0.2, rng=0)
    bound = np.sqrt(2.0 / (1 + 0.04)) * np.sqrt(3.0 / 400)
    assert 0.9999 * bound < np.abs(leaky.weight.value).max() <= bound
    z = nn.Dense(3, 2, init="zeros")
    assert not z.weight.value.any()
    assert np.array_equal(nn.Dense(5, 4, rng=3).weight.value, nn.Dense(5, 4, rng=3).weight.value)


@pytest.mark.parametrize("name,std", [
    ("xavier_normal", lambda fi, fo: np.sqrt(2 / (fi + fo))),
    ("he_normal", lambda fi, fo: np.sqrt(2 / fi)),
    ("xavier_uniform", lambda fi, fo: np.sqrt(6 / (fi + fo)) / np.sqrt(3)),
    ("he_uniform", lambda fi, fo: np.sqrt(6 / fi) / np.sqrt(3)),
])
def test_initializer_statistics(name, std):
    w = getattr(fp.init, name)((300, 500), rng=0, dtype=np.float64)
    assert w.shape == (300, 500) and w.dtype == np.float64
    assert abs(w.mean()) < 0.01 * std(300, 500) * 10
    assert w.std() == pytest.approx(std(300, 500), rel=0.02)


INITS = ["xavier_uniform", "xavier_normal", "he_uniform", "he_normal"]

# (kwargs of a call that must be rejected, exception, message): every argument is named
BAD_INIT_CALLS = [
    (dict(shape=5), TypeError, r"^shape must be a tuple"),
    (dict(shape=None), TypeError, r"^shape must be a tuple"),
    (dict(shape=(2.7, 3)), TypeError, r"^shape must hold ints"),
    (dict(shape=(2, "3")), TypeError, r"^shape must hold ints"),
    (dict(shape=(True, 3)), TypeError, r"^shape must hold ints"),
    (dict(shape=(2, 3, 4)), ValueError, r"^shape must be 1-D or 2-D"),
    (dict(shape=()), ValueError, r"^shape must be 1-D or 2-D"),
    (dict(shape=(0, 3)), ValueError, r"^shape must hold positive sizes"),
    (dict(shape=(-2, 3)), ValueError, r"^shape must hold positive sizes"),
    (dict(gain=float("inf")), ValueError, r"gain"),
    (dict(gain=float("nan")), ValueError, r"gain"),
    (dict(gain=-1.0), ValueError, r"gain"),
    (dict(gain=1e300), ValueError, r"gain"),
    (dict(gain="1"), TypeError, r"^gain must be a real number"),
    (dict(gain=True), TypeError, r"^gain must be a real number"),
    (dict(dtype=np.int32), TypeError, r"^dtype must be float32 or float64"),
    (dict(dtype="not a dtype"), TypeError, r"^dtype must be float32 or float64"),
    (dict(rng="abc"), TypeError, r"^rng must be"),
    (dict(rng=True), TypeError, r"^rng must be"),
]


# zeros draws nothing, so a huge finite gain cannot overflow there
BAD_ZEROS_CALLS = [c for c in BAD_INIT_CALLS if c[0].get("gain") != 1e300]


def _ids(calls):
    return [",".join(f"{k}={v!r}" for k, v in c[0].items()) for c in calls]


@pytest.fixture
def _restore_init_rng():
    saved = fp.init._rng
    yield
    fp.init._rng = saved


def _init_call(name, kwargs):
    kwargs = dict(kwargs)
    shape = kwargs.pop("shape", (30, 20))
    return getattr(fp.init, name)(shape, **kwargs)


@pytest.mark.parametrize("kwargs,exc,match", BAD_INIT_CALLS, ids=_ids(BAD_INIT_CALLS))
@pytest.mark.parametrize("name", INITS)
def test_rejected_init_leaves_the_global_generator_untouched(name, kwargs, exc, match,
                                                             _restore_init_rng):
    """Arguments are checked before any draw: a caught error does not shift the seeded
    stream (it used to, e.g. a bad dtype was rejected after the draw)."""
    fp.init.seed(0)
    want = getattr(fp.init, name)((30, 20))
    fp.init.seed(0)
    with pytest.raises(exc, match=match):
        _init_call(name, kwargs)
    assert np.array_equal(getattr(fp.init, name)((30, 20)), want)


@pytest.mark.parametrize("kwargs,exc,match", [c for c in BAD_INIT_CALLS if "rng" not in c[0]],
                         ids=_ids([c for c in BAD_INIT_CALLS if "rng" not in c[0]]))
@pytest.mark.parametrize("name", INITS)
def test_rejected_init_leaves_a_given_generator_untouched(name, kwargs, exc, match):
    gen = np.random.default_rng(7)
    state = gen.bit_generator.state
    with pytest.raises(exc, match=match):
        _init_call(name, dict(kwargs, rng=gen))
    assert gen.bit_generator.state == state
    assert np.array_equal(getattr(fp.init, name)((30, 20), rng=gen),
                          getattr(fp.init, name)((30, 20), rng=np.random.default_rng(7)))


@pytest.mark.parametrize("kwargs,exc,match", BAD_ZEROS_CALLS, ids=_ids(BAD_ZEROS_CALLS))
def test_zeros_checks_its_arguments_like_the_others(kwargs, exc, match):
    kwargs = dict(kwargs)
    shape = kwargs.pop("shape", (3, 2))
    with pytest.raises(exc, match=match):
        fp.init.zeros(shape, **kwargs)
    z = fp.init.zeros([3, 2], gain=2.0, rng=0, dtype=np.float64)
    assert z.shape == (3, 2) and z.dtype == np.float64 and not z.any()


def test_init_accepts_numpy_ints_and_lists_and_1d_shapes():
    w = fp.init.he_uniform([np.int64(4), np.int32(3)], gain=np.float32(1.0), rng=0)
    assert w.shape == (4, 3) and np.abs(w).max() <= np.sqrt(3.0 / 4)
    assert np.array_equal(w, fp.init.he_uniform((4, 3), gain=1.0, rng=0))
    v = fp.init.xavier_normal((5,), rng=1, dtype=np.float64)
    assert v.shape == (5,) and v.dtype == np.float64
    assert fp.init.xavier_uniform((2, 3), gain=0.0, rng=0).tolist() == [[0.0] * 3] * 2


@pytest.mark.parametrize("param", [True, False, "a", "0.2", [0.2], float("nan"), float("inf")])
def test_calculate_gain_rejects_a_param_that_is_not_a_number(param):
    # torch.nn.init.calculate_gain: ValueError "negative_slope ... not a valid number"
    with pytest.raises(ValueError, match=r"param"):
        fp.init.calculate_gain("leaky_relu", param)


def test_calculate_gain_values():
    assert fp.init.calculate_gain("leaky_relu", None) == fp.init.calculate_gain("leaky_relu")
    assert fp.init.calculate_gain("leaky_relu", 0.2) == pytest.approx(np.sqrt(2 / 1.04))
    assert fp.init.calculate_gain("leaky_relu", np.float32(0.2)) == pytest.approx(
        np.sqrt(2 / 1.04))
    assert fp.init.calculate_gain("leaky_relu", 1) == pytest.approx(1.0)
    assert fp.init.calculate_gain("tanh") == pytest.approx(5 / 3)
    assert fp.init.calculate_gain("relu") == pytest.approx(np.sqrt(2))
    assert fp.init.calculate_gain("selu") == 0.75
    assert fp.init.calculate_gain("conv2d") == fp.init.calculate_gain("linear") == 1.0
    assert fp.init.calculate_gain("relu", "ignored") == pytest.approx(np.sqrt(2))  # as torch
    with pytest.raises(ValueError, match="no gain known"):
        fp.init.calculate_gain("swish")


def test_calculate_gain_matches_torch():
    torch = pytest.importorskip("torch")
    cases = [("linear", None), ("conv1d", None), ("conv_transpose3d", None), ("sigmoid", None),
             ("tanh", None), ("relu", None), ("relu", "abc"), ("selu", None),
             ("leaky_relu", None), ("leaky_relu", 0.2), ("leaky_relu", 3), ("tanh", [1])]
    for name, param in cases:
        assert fp.init.calculate_gain(name, param) == pytest.approx(
            torch.nn.init.calculate_gain(name, param), rel=1e-15), (name, param)
    for name, param in [("swish", None), ("leaky_relu", "a"), ("leaky_relu", True)]:
        for fn in (fp.init.calculate_gain, torch.nn.init.calculate_gain):
            with pytest.raises(ValueError):
                fn(name, param)


def test_batchnorm_train_forward_and_running_stats(backend, dtype, rng):
    bn = nn.BatchNorm1d(4, momentum=0.25, dtype=dtype)
    bn.weight.value[...] = [1.0, 2.0, 0.5, -1.0]
    bn.bias.value[...] = [0.0, 1.0, -1.0, 0.5]
    x = (rng.standard_normal((9, 4)) * [1, 3, 0.5, 2] + [0, 5, -2, 1]).astype(dtype)
    y = bn(x)
    xd = x.astype(np.float64)
    mu, var = xd.mean(0), xd.var(0)
    ref = (xd - mu) / np.sqrt(var + 1e-5) * bn.weight.value + bn.bias.value
    assert_close(y, ref, dtype, np.abs(ref) + 1, factor=4, what="y")
    # PyTorch semantics: the running variance uses the unbiased batch variance
    assert_close(bn.running_mean, 0.25 * mu, dtype, np.abs(mu) + 1, what="running_mean")
    assert_close(bn.running_var, 0.75 + 0.25 * xd.var(0, ddof=1), dtype,
                 xd.var(0) + 1, what="running_var")
    x2 = (2 * rng.standard_normal((5, 4)) + 3).astype(dtype)
    bn(x2)
    x2d = x2.astype(np.float64)
    rm = 0.75 * 0.25 * mu + 0.25 * x2d.mean(0)
    rv = 0.75 * (0.75 + 0.25 * xd.var(0, ddof=1)) + 0.25 * x2d.var(0, ddof=1)
    assert_close(bn.running_mean, rm, dtype, np.abs(rm) + 1, what="running_mean, 2 steps")
    assert_close(bn.running_var, rv, dtype, rv + 1, what="running_var, 2 steps")

    bn.eval()
    y_eval = bn(x)
    ref_eval = ((xd - bn.running_mean) / np.sqrt(bn.running_var.astype(np.float64) + 1e-5)
                * bn.weight.value + bn.bias.value)
    assert_close(y_eval, ref_eval, dtype, np.abs(ref_eval) + 1, factor=4, what="eval")
    before = bn.running_mean.copy(), bn.running_var.copy()
    bn(x)  # eval does not update running statistics
    assert np.array_equal(bn.running_mean, before[0]) and np.array_equal(bn.running_var, before[1])


def test_batchnorm_running_var_small_variance(backend, dtype, rng):
    """Variance well below eps must still reach the running average accurately (it
    did not in float32: 5e-3 relative error at std 1e-5, 0.2 at 1e-6)."""
    bn = nn.BatchNorm1d(5, momentum=1.0, dtype=dtype)
    x = (rng.standard_normal((64, 5)) * [1, 1e-3, 1e-4, 1e-5, 1e-6] + 0.5).astype(dtype)
    bn(x)
    want = np.var(x.astype(np.float64), axis=0, ddof=1)
    np.testing.assert_allclose(bn.running_var, want, rtol=1e-6)


def test_layernorm_forward(backend, dtype, rng):
    ln = nn.LayerNorm(6, dtype=dtype)
    ln.weight.value[...] = rng.standard_normal(6)
    ln.bias.value[...] = rng.standard_normal(6)
    x = (3 * rng.standard_normal((7, 6)) + 2).astype(dtype)
    y = ln(x)
    xd = x.astype(np.float64)
    mu, var = xd.mean(1, keepdims=True), xd.var(1, keepdims=True)
    ref = (xd - mu) / np.sqrt(var + 1e-5) * ln.weight.value + ln.bias.value
    assert_close(y, ref, dtype, np.abs(ref) + 1, factor=4)
    assert ln(np.empty((0, 6), dtype)).shape == (0, 6)


def test_dropout_semantics(backend, rng):
    x = np.ones((200, 50))
    d = nn.Dropout(0.3, seed=0)
    y = d(x)
    kept = y != 0
    assert kept.mean() == pytest.approx(0.7, abs=0.02)
    assert np.allclose(y[kept], 1 / 0.7, rtol=1e-14)
    g = rng.standard_normal(x.shape)
    assert np.array_equal(d.backward(g), g * y)  # same mask, same scale
    d.eval()
    assert np.array_equal(d(x), x)
    assert np.array_equal(d.backward(g), g)
    # seeded: the same seed gives the same mask, a different one does not
    assert np.array_equal(nn.Dropout(0.5, seed=7)(x), nn.Dropout(0.5, seed=7)(x))
    assert not np.array_equal(nn.Dropout(0.5, seed=7)(x), nn.Dropout(0.5, seed=8)(x))
    assert not nn.Dropout(1.0)(x).any()
    assert np.array_equal(nn.Dropout(0.0)(x), x)


def test_residual_and_sequential(backend, rng):
    d1, d2 = nn.Dense(4, 4, "tanh", rng=0), nn.Dense(4, 2, rng=1)
    model = nn.Sequential(nn.Residual(d1), d2)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = model(x)
    h = x + d1(x)
    assert np.allclose(y, d2(h), rtol=1e-6)
    assert len(model) == 2 and model[1] is d2 and list(model) == model.layers
    assert isinstance(model[:1], nn.Sequential) and model[:1][0] is model[0]
    assert model.parameters() == [d1.weight, d1.bias, d2.weight, d2.bias]
    tied = nn.Dense(4, 4, rng=2)
    tied.weight = d1.weight
    assert len(nn.Sequential(d1, tied).parameters()) == 3  # a shared Parameter, once
    assert "Residual" in repr(model) and "Dense" in repr(model)
    assert nn.Sequential([d1, d2]).layers == [d1, d2]


def test_a_module_instance_used_twice_is_rejected():
    """A module keeps its last forward's inputs for backward: a second use in the same
    model would give the first use's backward the wrong inputs (silently wrong
    gradients), so it is a ValueError wherever a model is put together."""
    d, act = nn.Dense(4, 4), nn.Tanh()
    with pytest.raises(ValueError, match="same Dense instance is used twice"):
        nn.Sequential(d, d)
    with pytest.raises(ValueError, match="same Tanh instance"):
        nn.Sequential(nn.Dense(4, 4), act, nn.Dense(4, 4), act)
    with pytest.raises(ValueError, match="Sequential"):
        nn.Sequential(d, nn.Residual(d))
    block = nn.Sequential(d)
    block.layers.append(d)
    with pytest.raises(ValueError, match="Residual"):
        nn.Residual(block)
    model = nn.Sequential(d, act)
    with pytest.raises(ValueError, match="append"):
        model.append(d)
    assert model.layers == [d, act]  # the failed append left the model as it was
    model.layers.append(act)         # edited behind its back: compile refuses it
    with pytest.raises(ValueError, match="compile"):
        model.compile("mse", "sgd")
    model = nn.Sequential(d, nn.Dense(4, 2))
    step = model.compile("mse", "sgd")
    model.layers.insert(0, d)        # after compile: the next step and forward refuse it
    with pytest.raises(ValueError, match="used twice"):
        step(np.ones((3, 4)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="used twice"):
        model(np.ones((3, 4)))


def test_dropout_backward_checks_like_the_other_layers(backend):
    d = nn.Dropout(0.5, seed=0)
    with pytest.raises(RuntimeError, match="before forward"):
        d.backward(np.ones((2, 2)))
    d.eval()
    d(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"shape \(4, 3\), got \(7,\)"):
        d.backward(np.ones(7))
    np.testing.assert_array_equal(d.backward(np.full((4, 3), 2.0)), np.full((4, 3), 2.0))
    res = nn.Residual(nn.Dropout(0.5)).eval()
    res(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"Residual.backward: grad_out must have the output"):
        res.backward(np.ones(5))


def test_train_eval_propagate(backend):
    model = nn.Sequential(nn.Dense(2, 2), nn.Residual(nn.Dropout(0.5)), nn.BatchNorm1d(2))
    model.eval()
    assert not any(m.training for m in model.modules())
    assert model.train() is model
    assert all(m.training for m in model.modules())


def test_sequential_backward_skips_first_input_grad(backend, rng):
    model = nn.Sequential(nn.Dense(3, 2, rng=0))
    model(rng.standard_normal((4, 3)))
    assert model.backward(np.ones((4, 2)), input_grad=False) is None
    assert model[0].weight.grad.any()


def test_parameter_basics():
    p = fp.Parameter(np.arange(6).reshape(2, 3))
    assert p.dtype == np.float64 and p.shape == (2, 3) and p.size == 6
    assert p.ndim == p.dim() == 2 and p.numel() == 6  # (PyTorch's spellings)
    assert np.array_equal(p.grad, np.zeros((2, 3)))
    src = np.ones(3, np.float32)
    q = fp.Parameter(src)
    src[0] = 5
    assert q.value[0] == 1  # copied
    assert q.dtype == np.float32


def test_gradcheck_batchnorm_eval_mode(backend, rng):
    """Frozen BatchNorm (eval mode) is an affine map with the running statistics: its
    backward gives input and parameter gradients (fine-tuning with frozen BN)."""
    bn = fp.nn.BatchNorm1d(4, momentum=0.5)
    bn.forward(rng.standard_normal((6, 4)) * 2 + 1)   # move the running statistics
    bn.weight.value[...] = rng.uniform(0.5, 2.0, 4)
    bn.eval()
    assert fp.gradcheck(bn, rng.standard_normal((5, 4)))


def test_parameter_value_assignment_keeps_shape_and_dtype(backend):
    """`p.value = array` converts to the parameter's dtype and C order (a transposed
    PyTorch weight, a float64 array in a float32 layer work on every backend) and
    refuses another shape, naming the parameter."""
    rng = np.random.default_rng(0)
    w_torch = rng.standard_normal((3, 6)).astype(np.float32)  # (out, in), torch layout
    x = rng.standard_normal((5, 6)).astype(np.float32)
    d = nn.Dense(6, 3, bias=False)
    d.weight.value = w_torch.T  # an F-ordered view
    assert d.weight.value.flags.c_contiguous and d.weight.dtype == np.float32
    np.testing.assert_allclose(d(x), x @ w_torch.T, rtol=1e-5, atol=1e-6)
    d.weight.value = w_torch.T.astype(np.float64)
    assert d.weight.dtype == np.float32
    np.testing.assert_allclose(d(x), x @ w_torch.T, rtol=1e-5, atol=1e-6)
    # the parameter gets its own copy even of an array already in its layout: training
    # never writes into the caller's array, and two layers set from one array stay apart
    own = np.ascontiguousarray(w_torch.T)
    kept = own.copy()
    d2 = nn.Dense(6, 3, bias=False)
    d.weight.value = own
    d2.weight.value = own
    assert d.weight.value is not own and not np.shares_memory(d.weight.value, d2.weight.value)
    opt = fp.optim.SGD(d.parameters() + d2.parameters(), lr=0.1)
    for layer in (d, d2):
        layer.backward(np.ones((5, 3), np.float32) - layer(x))
    opt.step()
    np.testing.assert_array_equal(own, kept)
    np.testing.assert_allclose(d.weight.value, kept - 0.1 * d.weight.grad, rtol=1e-6)
    np.testing.assert_allclose(d2.weight.value, kept - 0.1 * d2.weight.grad, rtol=1e-6)
    before = d.weight.value
    with pytest.raises(ValueError, match=r"Parameter 'weight': value must have the "
                                         r"parameter's shape \(6, 3\), got \(3, 6\)"):
        d.weight.value = w_torch
    assert d.weight.value is before


@pytest.mark.parametrize("targets", ["labels", "probs"])
def test_label_smoothing_as_pytorch(backend, rng, targets, peer):
    """SoftmaxCrossEntropy(label_smoothing=e): the target becomes (1 - e) target + e / K,
    as PyTorch's CrossEntropyLoss (against its formula, and against PyTorch itself
    when installed); 0 changes nothing; a value outside [0, 1] is refused."""
    n, k, eps = 9, 5, 0.15
    logits = 3 * rng.standard_normal((n, k))
    y = rng.integers(0, k, n) if targets == "labels" else rng.dirichlet(np.ones(k), n)
    loss = fp.losses.SoftmaxCrossEntropy(label_smoothing=eps)
    value, grad = loss(logits, y), loss.backward()
    onehot = np.eye(k)[y] if targets == "labels" else y
    q = (1 - eps) * onehot + eps / k
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert value == pytest.approx(-(q * logp).sum() / n, rel=1e-13)
    np.testing.assert_allclose(grad, (np.exp(logp) - q) / n, rtol=1e-12, atol=1e-15)
    assert fp.losses.SoftmaxCrossEntropy(label_smoothing=0.0)(logits, y) == pytest.approx(
        fp.losses.SoftmaxCrossEntropy()(logits, y), rel=1e-15)
    assert "label_smoothing=0.15" in repr(loss)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="label_smoothing"):
            fp.losses.SoftmaxCrossEntropy(label_smoothing=bad)
    if peer is None:
        return
    torch = peer
    tl = torch.tensor(logits, requires_grad=True)
    ty = torch.tensor(y)
    ref = torch.nn.functional.cross_entropy(tl, ty, label_smoothing=eps)
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-13)
    np.testing.assert_allclose(grad, tl.grad.numpy(), rtol=1e-12, atol=1e-15)


def _central_diff(f, p, h=1e-6):
    num = np.zeros_like(p)
    for i in np.ndindex(p.shape):
        e = np.zeros_like(p)
        e[i] = h
        num[i] = (f(p + e) - f(p - e)) / (2 * h)
    return num


@pytest.mark.parametrize("targets", ["labels", "labels-ignored", "probs"])
@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_cross_entropy_class_weights_as_pytorch(backend, rng, targets, eps, peer):
    """SoftmaxCrossEntropy(weight=, ignore_index=): the term of class c counts
    weight[c] times; with class ids the mean is over the rows' class weights and an
    ignored row counts for nothing; with probability targets the mean is over the
    rows (PyTorch's CrossEntropyLoss).  Against the formula, central differences and
    PyTorch; float32 logits give the float64 result to float32 precision."""
    n, k = 11, 5
    logits = 3 * rng.standard_normal((n, k))
    w = rng.random(k) + 0.2
    if targets == "probs":
        y = rng.dirichlet(np.ones(k), n)
        kw = {}
    else:
        y = rng.integers(0, k, n)
        kw = {"ignore_index": -100} if targets == "labels-ignored" else {}
        if kw:
            y[[2, 7]] = -100
    loss = fp.losses.SoftmaxCrossEntropy(eps, weight=w, **kw)
    value, grad = loss(logits, y), loss.backward()
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    if targets == "probs":
        a, den = ((1 - eps) * y + eps / k) * w, n
    else:
        keep = y != -100
        a = ((1 - eps) * np.eye(k)[np.where(keep, y, 0)] + eps / k) * w * keep[:, None]
        den = w[y[keep]].sum()
    assert value == pytest.approx(-(a * logp).sum() / den, rel=1e-13)
    np.testing.assert_allclose(grad, (a.sum(1, keepdims=True) * np.exp(logp) - a) / den,
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, _central_diff(lambda z: loss.value(z, y), logits),
                               rtol=1e-6, atol=1e-9)
    v32 = loss(logits.astype(np.float32), y)
    assert loss.backward().dtype == np.float32
    assert v32 == pytest.approx(value, rel=1e-5)
    assert "weight=[" in repr(loss)
    if peer is None:
        return
    torch = peer
    tl = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(tl, torch.tensor(y), weight=torch.tensor(w),
                                            label_smoothing=eps, **kw)
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-13)
    np.testing.assert_allclose(grad, tl.grad.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [{"weight": [1.0, 2.0, 3.0]}, {"ignore_index": -100},
                                {"weight": [1.0, 0.0, 3.0], "ignore_index": -100}])
def test_cross_entropy_with_options_takes_masked_logits(backend, kw, dtype, peer):
    """A -inf logit (a masked class) that is not the row's label, an ignored row of
    -inf logits, and float64 logits spread wider than the float range give the
    finite loss of the plain SoftmaxCrossEntropy and of PyTorch with weight= and
    ignore_index= (0 * log 0 counted as 0; was NaN), and an ignored row a zero
    gradient."""
    ninf = -np.inf
    logits = np.array([[0.1, 0.2, 0.3], [0.0, ninf, 1.0], [1.0, 2.0, 3.0],
                       [ninf, ninf, ninf]], dtype)
    y = np.array([0, 0, 2, -100 if "ignore_index" in kw else 2])
    if "ignore_index" not in kw:
        logits[3] = [ninf, 0.5, 1.0]
    if dtype is np.float64:
        logits[2] = [-1.7e308, 1e-3, 1.7e308]
    loss = fp.losses.SoftmaxCrossEntropy(**kw)
    value, grad = loss(logits, y), loss.backward()
    keep = y != -100
    w = np.asarray(kw.get("weight", np.ones(3)))
    plain = fp.losses.SoftmaxCrossEntropy()  # (the native kernel, where available)
    ref = sum(w[y[i]] * plain(logits[i:i + 1], y[i:i + 1]) for i in np.flatnonzero(keep))
    assert math.isfinite(value) and np.isfinite(grad).all()
    assert value == pytest.approx(ref / w[y[keep]].sum(), rel=1e-6)
    if peer is not None:
        t = peer.tensor(logits, requires_grad=True)
        tv = peer.nn.functional.cross_entropy(
            t, peer.tensor(y), weight=peer.tensor(w, dtype=t.dtype),
            ignore_index=kw.get("ignore_index", -100))
        tv.backward()
        assert value == pytest.approx(tv.item(), rel=1e-6)
        np.testing.assert_allclose(grad[keep], t.grad.numpy()[keep], rtol=1e-5, atol=1e-7)
    assert np.all(grad[~keep] == 0)  # (PyTorch's is NaN for the ignored -inf row)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_probability_targets_take_masked_logits(backend, dtype):
    """Probability targets with a -inf logit where the target is 0: the class adds
    nothing (0 log 0 = 0), with or without weight= (the weighted path gave a finite
    loss, the kernels NaN, as PyTorch does: 0 * -inf); the gradient is finite.  A
    masked class with a target above 0 is an infinite loss."""
    logits = np.array([[0.0, -np.inf, 1.0], [1.0, 2.0, 3.0]], dtype)
    t = np.array([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
    plain, unit = fp.losses.SoftmaxCrossEntropy(), fp.losses.SoftmaxCrossEntropy(weight=np.ones(3))
    v, g = plain(logits, t), plain.backward()
    ref = -(0.5 * (0.0 - np.log1p(np.e)) + 0.5 * (1.0 - np.log1p(np.e))
            + (3.0 - np.log(np.exp([1.0, 2.0, 3.0]).sum()))) / 2
    assert v == pytest.approx(ref, rel=1e-6) and np.isfinite(g).all()
    assert unit(logits, t) == pytest.approx(v, rel=1e-6)
    np.testing.assert_allclose(unit.backward(), g, rtol=1e-6, atol=1e-7)
    assert g[0, 1] == 0
    assert plain(logits, np.array([[0.5, 0.1, 0.4], [0.0, 0.0, 1.0]])) == np.inf
    # a row of -inf logits has no softmax: NaN, whatever its targets (PyTorch's too;
    # counting its zero targets as 0 log 0 gave a finite loss and a NaN gradient)
    masked = np.array([[-np.inf] * 3, [1.0, 2.0, 3.0]], dtype)
    with np.errstate(invalid="ignore"):
        for loss in (plain, unit):
            assert math.isnan(loss(masked, np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])))


def test_cross_entropy_ignore_index_and_bad_options(backend, rng):
    """ignore_index alone (unit weights) is the mean over the rows kept; every row
    ignored gives NaN and a zero gradient (as PyTorch); an id that is neither a class
    nor ignore_index, and bad weights, are refused naming the argument."""
    logits = rng.standard_normal((6, 4))
    y = np.array([0, 3, -1, 2, -1, 1])
    loss = fp.losses.SoftmaxCrossEntropy(ignore_index=-1)
    keep = y != -1
    assert loss(logits, y) == pytest.approx(
        fp.losses.SoftmaxCrossEntropy()(logits[keep], y[keep]), rel=1e-13)
    g = loss.backward()
    assert np.all(g[~keep] == 0)
    np.testing.assert_allclose(g[keep].sum(1), 0, atol=1e-15)
    assert math.isnan(loss(logits, np.full(6, -1)))
    assert np.all(loss.backward() == 0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\).*ignore_index=-1"):
        loss(logits, np.array([0, 3, -2, 2, 1, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        fp.losses.SoftmaxCrossEntropy(weight=np.ones(4))(logits, np.array([0, 3, 4, 2, 1, 1]))
    with pytest.raises(ValueError, match="weight has 3 entries, the logits 4 classes"):
        fp.losses.SoftmaxCrossEntropy(weight=[1, 2, 3])(logits, y[keep].repeat(2)[:6])
    for bad, exc, match in (([[1.0, 2.0]], ValueError, "weight must be 1-D"),
                            ([1.0, -2.0], ValueError, "weight must be finite and >= 0"),
                            ([1.0, np.nan], ValueError, "weight must be finite"),
                            (["a", "b"], TypeError, "weight must hold real numbers")):
        with pytest.raises(exc, match=match):
            fp.losses.SoftmaxCrossEntropy(weight=bad)
    for bad in (1.5, "x", True):
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            fp.losses.SoftmaxCrossEntropy(ignore_index=bad)
    w = np.array([1.0, 2.0, 3.0, 4.0])
    held = fp.losses.SoftmaxCrossEntropy(weight=w)
    w[0] = 100.0  # (a copy is kept)
    assert held.weight[0] == 1.0 and not held.weight.flags.writeable


def test_bce_pos_weight_as_pytorch(backend, rng, peer):
    """BinaryCrossEntropy(from_logits=True, pos_weight=w): each positive target's term
    counts w times (w broadcast over the rows, PyTorch's BCEWithLogitsLoss), exact at
    large |logits|; against the formula, central differences and PyTorch."""
    n, k = 8, 3
    x = 4 * rng.standard_normal((n, k))
    x[0, 0], x[1, 1] = 60.0, -80.0
    t = (rng.random((n, k)) > 0.5).astype(float)
    t[0, 0], t[1, 1] = 0.0, 1.0  # (the large logits on the wrong side: large terms)
    pw = np.array([0.5, 2.0, 7.0])
    loss = fp.losses.BinaryCrossEntropy(from_logits=True, pos_weight=pw)
    value, grad = loss(x, t), loss.backward()
    sp = np.logaddexp(0, x)  # -log(1 - s(x))
    ref = (pw * t * (sp - x) + (1 - t) * sp).mean()
    assert value == pytest.approx(ref, rel=1e-13)
    s = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(grad, (pw * t * (s - 1) + (1 - t) * s) / x.size,
                               rtol=1e-12, atol=1e-17)
    small = x.copy()
    small[0, 0], small[1, 1] = 1.0, -1.0  # (central differences away from the flat tails)
    loss(small, t)
    np.testing.assert_allclose(loss.backward(), _central_diff(lambda z: loss.value(z, t), small),
                               rtol=1e-6, atol=1e-9)
    plain = fp.losses.BinaryCrossEntropy(from_logits=True)
    assert fp.losses.BinaryCrossEntropy(from_logits=True, pos_weight=1.0)(x, t) == \
        pytest.approx(plain(x, t), rel=1e-12)
    with pytest.raises(ValueError, match="pos_weight needs from_logits=True"):
        fp.losses.BinaryCrossEntropy(pos_weight=pw)
    with pytest.raises(ValueError, match=r"pos_weight of shape \(2,\) does not broadcast"):
        fp.losses.BinaryCrossEntropy(from_logits=True, pos_weight=[1.0, 2.0])(x, t)
    if peer is None:
        return
    torch = peer
    tx = torch.tensor(x, requires_grad=True)
    r = torch.nn.functional.binary_cross_entropy_with_logits(tx, torch.tensor(t),
                                                             pos_weight=torch.tensor(pw))
    r.backward()
    assert value == pytest.approx(r.item(), rel=1e-13)
    np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-12, atol=1e-17)


@pytest.mark.parametrize("make", [
    lambda: fp.losses.SoftmaxCrossEntropy(0.1, weight=[1.0, 3.0, 0.5], ignore_index=-1),
    lambda: fp.losses.BinaryCrossEntropy(from_logits=True, pos_weight=[4.0, 1.0, 0.2])])
def test_weighted_losses_in_a_compiled_step(backend, make, rng):
    """A compiled step with a weighted loss takes the layer path (the fused kernels
    have no weights) and computes exactly forward, the weighted loss, backward and the
    update; fit with it trains."""
    X = rng.standard_normal((40, 6))
    scores = X @ rng.standard_normal((6, 3))  # (learnable targets)
    if isinstance(make(), fp.losses.SoftmaxCrossEntropy):
        y = scores.argmax(axis=1)
        y[::7] = -1
    else:
        y = (scores > 0).astype(float)
    models = [fp.nn.Sequential(fp.nn.Dense(6, 8, "relu", rng=1), fp.nn.Dense(8, 3, rng=2))
              for _ in range(2)]
    step = models[0].compile(make(), fp.optim.Adam(models[0].parameters(), lr=0.01))
    loss, opt = make(), fp.optim.Adam(models[1].parameters(), lr=0.01)
    for i in range(5):
        xb, yb = X[8 * i:8 * i + 8], y[8 * i:8 * i + 8]
        got = step(xb, yb)
        opt.zero_grad()
        want = loss(models[1](xb), yb)
        models[1].backward(loss.backward())
        opt.step()
        assert got == want
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        np.testing.assert_array_equal(p.value, q.value)
    hist = models[0].fit(X, y, epochs=30, batch_size=8, verbose=0, seed=0)
    assert hist.history["loss"][-1] < 0.5 * hist.history["loss"][0]


class _UserBlock(fp.nn.Module):
    """A PyTorch-style module of the user's: submodules and a Parameter as attributes."""

    def __init__(self, dtype=np.float64):
        super().__init__()
        self.fc1 = fp.nn.Dense(4, 8, "tanh", rng=0, dtype=dtype)
        self.drop = fp.nn.Dropout(0.5, seed=0)
        self.fc2 = fp.nn.Dense(8, 4, rng=1, dtype=dtype)
        self.scale = fp.Parameter(np.linspace(0.5, 2.0, 4).astype(dtype))

    def forward(self, x):
        self._h = self.fc2(self.drop(self.fc1(x)))
        return self._h * self.scale.value

    def backward(self, grad_out, input_grad=True):
        self.scale.grad += (grad_out * self._h).sum(axis=0)
        g = self.fc2.backward(grad_out * self.scale.value)
        return self.fc1.backward(self.drop.backward(g), input_grad)


def test_a_users_module_registers_its_attributes(backend, rng, tmp_path):
    """As PyTorch's Module.__setattr__: submodules and Parameters set as attributes of
    a user's module are in parameters(), state_dict() and modules(), follow
    train()/eval(), train in fit, pass gradcheck and survive save/load; assigning a
    wrong type or a Parameter of another dtype to a layer is a TypeError."""
    block = _UserBlock()
    model = fp.nn.Sequential(block, fp.nn.Dense(4, 3, rng=2, dtype=np.float64))
    params = model.parameters()
    assert len(params) == 7 and any(p is block.scale for p in params)
    assert any(p is block.fc1.weight for p in params)
    assert sorted(model.state_dict()) == ["1.scale", "2.bias", "2.weight", "4.bias",
                                          "4.weight", "5.bias", "5.weight"]
    assert block.children() == [block.fc1, block.drop, block.fc2]
    model.eval()
    assert not block.drop.training
    assert fp.gradcheck(model, rng.standard_normal((5, 4)))
    model.train()
    X = rng.standard_normal((128, 4))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    model.fit(X, y, loss="cross_entropy", optimizer=fp.optim.Adam(model.parameters(), 0.01),
              epochs=2, batch_size=16, seed=0, verbose=0)
    after = model.state_dict()
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    fp.save(model, tmp_path / "m.fp")
    loaded = fp.load(tmp_path / "m.fp")
    model.eval()
    np.testing.assert_array_equal(loaded.eval().predict(X), model.predict(X))
    block.drop = None  # (None unregisters nothing, and is skipped)
    assert block.children() == [block.fc1, block.fc2]
    with pytest.raises(TypeError, match="cannot assign int as child module 'fc1'"):
        block.fc1 = 3
    with pytest.raises(TypeError, match="cannot assign ndarray as parameter 'scale'"):
        block.scale = np.ones(4)
    with pytest.raises(TypeError, match="float32 Parameter as 'weight' of a float64 Dense"):
        block.fc1.weight = fp.Parameter(np.ones((4, 8), np.float32))
    assert block.fc1.weight.dtype == np.float64


@pytest.mark.parametrize("labels", ["ids", "column"])
def test_fit_and_evaluate_weigh_batches_by_the_loss_normaliser(backend, rng, labels):
    """With class weights and ignore_index, fit's epoch loss and evaluate are the loss
    of the whole data (each batch weighs the sum of its counted rows' weights, not its
    row count), the accuracies count the rows not ignored only, a batch of ignored
    rows alone trains nothing (its mean is NaN: fit skipped it rather than stopping
    with NonFiniteError), and a column of class ids is read as ids."""
    X = rng.standard_normal((40, 5))
    y = rng.integers(0, 3, 40)
    y[:10] = -100  # (the first batch of 10, unshuffled, is ignored rows only)
    y[25:29] = -100
    loss = fp.losses.SoftmaxCrossEntropy(weight=[1.0, 3.0, 0.25], ignore_index=-100)
    model = fp.nn.Sequential(fp.nn.Dense(5, 3, rng=0))
    model.astype(np.float64)
    yy = y[:, None] if labels == "column" else y
    keep = y != -100

    def scores(model):
        out = model.predict(X)
        return loss.value(out, y), np.mean(out.argmax(axis=1)[keep] == y[keep])

    want = scores(model)
    assert model.evaluate(X, yy, loss=loss, batch_size=7) == pytest.approx(want[0], rel=1e-12)
    assert model.evaluate(X, yy, loss=loss, batch_size=10) == pytest.approx(want[0], rel=1e-12)
    # (a fit with lr=0: the epoch's loss and accuracy are those of the model as it is)
    frozen = fp.optim.SGD(model.parameters(), lr=0.0)
    hist = model.fit(X, yy, loss=loss, optimizer=frozen, epochs=1, batch_size=10,
                     shuffle=False, verbose=0, validation_data=(X, yy))
    assert hist.skipped_steps == 0
    assert hist["loss"][0] == pytest.approx(want[0], rel=1e-12)
    assert hist["val_loss"][0] == pytest.approx(want[0], rel=1e-12)
    assert hist["accuracy"][0] == pytest.approx(want[1], rel=1e-12)
    assert hist["val_accuracy"][0] == pytest.approx(want[1], rel=1e-12)
    # the ignored batch moves nothing, even with momentum (PyTorch's loop would step)
    before = [p.value.copy() for p in model.parameters()]
    opt = fp.optim.Adam(model.parameters(), lr=0.1)
    model.fit(X[:10], yy[:10], loss=loss, optimizer=opt, epochs=3, batch_size=10, verbose=0)
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.value, b)
    assert np.isnan(model.evaluate(X[:10], yy[:10], loss=loss))


@pytest.mark.parametrize("kind", ["l1", "huber", "smooth_l1"])
def test_robust_losses_gradcheck_and_torch(backend, rng, kind, peer):
    """L1, Huber and SmoothL1: gradients against central differences in float64 (away
    from the kinks), values and gradients against PyTorch's L1Loss / HuberLoss /
    SmoothL1Loss, names, a model trained with them (the layer path of the compiled
    step), and bad options refused."""
    p = 2 * rng.standard_normal((7, 3))
    t = rng.standard_normal((7, 3))
    for _ in range(5):  # keep |d| and |d| - 0.7 away from 0 (the kinks)
        d = p - t
        near = (np.abs(d) < 1e-3) | (np.abs(np.abs(d) - 0.7) < 1e-3)
        p[near] += 0.01
    loss = LOSSES[kind]()
    loss(p, t)
    grad = loss.backward()
    h = 1e-6
    num = np.zeros_like(p)
    for i in np.ndindex(p.shape):
        e = np.zeros_like(p)
        e[i] = h
        num[i] = (loss.value(p + e, t) - loss.value(p - e, t)) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-9)
    assert type(fp.losses.get({"l1": "mae", "huber": "huber", "smooth_l1": "smooth_l1"}[kind])) \
        is type(loss)
    X = rng.standard_normal((40, 3))
    Y = X @ rng.standard_normal((3, 2))
    Y[::10] += 20.0  # outliers
    model = fp.nn.Sequential(fp.nn.Dense(3, 2, dtype=np.float64, rng=0))
    model.fit(X, Y, loss=loss, optimizer=fp.optim.Adam(model.parameters(), lr=0.05),
              epochs=60, batch_size=8, verbose=0)
    inliers = np.arange(40) % 10 != 0
    # (the outliers barely pull: MSE's fit is ~2 off on the inliers, these ~0.02-0.14)
    assert np.median(np.abs(model.predict(X) - Y)[inliers]) < 0.5
    if kind == "huber":
        with pytest.raises(ValueError, match="delta"):
            fp.losses.Huber(delta=0.0)
    if kind == "smooth_l1":
        with pytest.raises(ValueError, match="beta"):
            fp.losses.SmoothL1(beta=-1.0)
        zero = fp.losses.SmoothL1(beta=0.0)
        assert zero(p, t) == pytest.approx(fp.losses.L1()(p, t), rel=1e-15)
        np.testing.assert_array_equal(zero.backward(), np.sign(p - t) / p.size)
    if peer is None:
        return
    torch = peer
    ref = {"l1": torch.nn.L1Loss(), "huber": torch.nn.HuberLoss(delta=0.7),
           "smooth_l1": torch.nn.SmoothL1Loss(beta=0.7)}[kind]
    tp = torch.tensor(p, requires_grad=True)
    value = ref(tp, torch.tensor(t))
    value.backward()
    assert loss(p, t) == pytest.approx(value.item(), rel=1e-13)
    np.testing.assert_allclose(loss.backward(), tp.grad.numpy(), rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("name", ["xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                                  "kaiming_normal_"])
def test_in_place_initializers_as_torch(name, rng, peer):
    """torch.nn.init's in-place forms on a Parameter (its value replaced, dtype kept)
    or an array (written in place): the bound / std of torch's formulas, with fan_in
    the weight's inputs (shape[0] here, torch's size(1)); model.apply reaches every
    layer; bad arguments are refused with nothing drawn or written."""
    fn = getattr(fp.init, name)
    shape = (400, 300)  # fan_in 400, fan_out 300
    kw = {"nonlinearity": "relu"} if name.startswith("kaiming") else {"gain": 2.0}
    expect = {"xavier_uniform_": 2.0 * math.sqrt(6 / 700), "xavier_normal_": 2.0 * math.sqrt(2 / 700),
              "kaiming_uniform_": math.sqrt(2) * math.sqrt(3 / 400),
              "kaiming_normal_": math.sqrt(2) / math.sqrt(400)}[name]
    p = fp.Parameter(np.zeros(shape, np.float32))
    assert fn(p, rng=1, **kw) is p and p.value.dtype == np.float32
    v = p.value.astype(np.float64)
    if "uniform" in name:
        assert np.abs(v).max() <= expect and np.abs(v).max() > 0.99 * expect
    else:
        assert v.std() == pytest.approx(expect, rel=0.02)
    arr = np.zeros(shape)
    fn(arr, rng=1, **kw)
    np.testing.assert_allclose(arr, p.value, rtol=1e-6)  # (same draws, float64 kept)
    if name.startswith("kaiming"):
        out = np.zeros(shape)
        fn(out, mode="fan_out", nonlinearity="relu", rng=1)
        np.testing.assert_allclose(out, arr * math.sqrt(400 / 300), rtol=1e-9, atol=1e-15)
        with pytest.raises(ValueError, match="mode"):
            fn(out, mode="fan", rng=1)
    gen = np.random.default_rng(5)
    before = gen.bit_generator.state
    with pytest.raises(ValueError, match="2-D"):
        fn(fp.Parameter(np.zeros(3)), rng=gen)
    with pytest.raises(TypeError, match="Parameter or a float32/float64 ndarray"):
        fn([[0.0]], rng=gen)
    assert gen.bit_generator.state == before

    model = fp.nn.Sequential(fp.nn.Dense(4, 8, "relu"), fp.nn.Dense(8, 2))
    seen = []
    assert model.apply(lambda m: seen.append(type(m).__name__)) is model
    assert seen == ["Dense", "Dense", "Sequential"]  # (children first, as PyTorch)
    model.apply(lambda m: fp.init.zeros_(m.bias) if isinstance(m, fp.nn.Dense) else None)
    assert not model[0].bias.value.any()
    assert [n for n, _ in model.named_modules()] == ["", "1", "2"]
    assert {name.split(".")[0] for name in model.state_dict()} == {"1", "2"}
    if peer is None:
        return
    torch = peer
    t = torch.empty(300, 400)  # torch's (out, in) layout of the same weight
    getattr(torch.nn.init, name)(t, **kw)
    ref = t.numpy().T.astype(np.float64)
    if "uniform" in name:
        assert np.abs(ref).max() <= expect * (1 + 1e-6)
    else:
        assert ref.std() == pytest.approx(expect, rel=0.02)


def test_simple_in_place_initializers(rng):
    p = fp.Parameter(np.ones((50, 40)))
    fp.init.uniform_(p, -0.5, 0.25, rng=0)
    assert p.value.min() >= -0.5 and p.value.max() <= 0.25
    fp.init.normal_(p, mean=3.0, std=0.1, rng=0)
    assert p.value.mean() == pytest.approx(3.0, abs=0.01)
    fp.init.constant_(p, 0.7)
    assert (p.value == 0.7).all()
    fp.init.ones_(p)
    assert (p.value == 1).all()
    for call, match in ((lambda: fp.init.uniform_(p, 1.0, 0.0), "a <= b"),
                        (lambda: fp.init.normal_(p, std=-1.0), "std >= 0"),
                        (lambda: fp.init.constant_(p, float("nan")), "finite")):
        with pytest.raises(ValueError, match=match):
            call()
        assert (p.value == 1).all()


def test_hyperparameters_set_after_construction_are_checked():
    """layer.p = 1.5, bn.momentum = 5, bn.eps = -1, dense.alpha = -1 are the
    constructor's errors (a forward with them gave silently wrong results), and a
    string for a yes/no option is a TypeError."""
    drop, bn, ln = fp.nn.Dropout(0.5), fp.nn.BatchNorm1d(3), fp.nn.LayerNorm(3)
    dense, leaky = fp.nn.Dense(3, 2, "leaky_relu"), fp.nn.LeakyReLU()
    for obj, name, bad, err in [(drop, "p", 1.5, ValueError), (drop, "p", -0.5, ValueError),
                                (drop, "p", float("nan"), ValueError),
                                (drop, "p", "0.5", TypeError),
                                (bn, "momentum", 5, ValueError), (bn, "eps", -1e3, ValueError),
                                (ln, "eps", 0.0, ValueError), (dense, "alpha", -1, ValueError),
                                (leaky, "alpha", "x", TypeError)]:
        before = getattr(obj, name)
        with pytest.raises(err, match=name):
            setattr(obj, name, bad)
        assert getattr(obj, name) == before
    drop.p, bn.momentum, dense.alpha = 0.25, 0.5, 0.2
    assert (drop.p, bn.momentum, dense.alpha) == (0.25, 0.5, 0.2)
    with pytest.raises(TypeError, match="bias"):
        fp.nn.Dense(3, 2, bias="False")
    with pytest.raises(TypeError, match="strict"):
        dense.load_state_dict(dense.state_dict(), strict="False")


def test_batchnorm_of_an_empty_batch_in_training_mode(backend):
    """As PyTorch's: an empty batch gives an empty output and leaves the running
    statistics alone; its backward gives an empty input gradient and no parameter
    gradient."""
    bn = fp.nn.BatchNorm1d(4)
    y = bn(np.zeros((0, 4), np.float32))
    assert y.shape == (0, 4)
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    g = bn.backward(np.zeros((0, 4), np.float32))
    assert g.shape == (0, 4)
    assert not bn.weight.grad.any() and not bn.bias.grad.any()


def test_residual_and_empty_sequential_check_the_gradient(backend, rng):
    """Residual checks grad_out against its output's shape (an identity block checked
    nothing: a (1,) gradient for a (2, 2) output came back broadcast), before its
    forward is a RuntimeError, and an empty Sequential's backward converts grad_out."""
    res = fp.nn.Residual(fp.nn.Sequential())
    with pytest.raises(RuntimeError, match="Residual.backward called before forward"):
        res.backward(np.ones((2, 2)))
    res(np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"output's shape \(2, 2\), got \(1,\)"):
        res.backward(np.ones(1))
    np.testing.assert_array_equal(res.backward(np.full((2, 2), 3.0)), 6.0)
    with pytest.raises(TypeError, match="grad_out must hold real numbers"):
        fp.nn.Sequential().backward("abc")
    assert fp.gradcheck(fp.nn.Residual(fp.nn.Dense(3, 3, "tanh", rng=0, dtype=np.float64)),
                        rng.standard_normal((4, 3)))


@pytest.mark.parametrize("fill", [lambda t: fp.init.constant_(t, 1e300),
                                  lambda t: fp.init.uniform_(t, -1e300, 1e300),
                                  lambda t: fp.init.normal_(t, 0.0, 1e300)],
                         ids=["constant", "uniform", "normal"])
def test_in_place_initializers_refuse_values_that_overflow(fill):
    """As xavier_uniform_ with a huge gain: values that overflow the array's dtype
    (float32 here) are a ValueError, and the array or Parameter keeps its values
    (constant_(w32, 1e300) wrote inf)."""
    arr = np.ones(4, np.float32)
    p = fp.Parameter(np.ones(4, np.float32))
    for target in (arr, p):
        with pytest.raises(ValueError, match="overflow float32"):
            fill(target)
    np.testing.assert_array_equal(arr, 1.0)
    np.testing.assert_array_equal(p.value, 1.0)
    d64 = np.ones(4)
    fill(d64)  # (float64 holds them)
    assert np.isfinite(d64).all()


def test_container_and_module_api_as_pytorch(backend, rng):
    """Sequential's insert / extend / pop / item assignment and deletion (each undone
    when it would hold a non-module or a module twice), named_children, buffers and
    named_buffers, and load_state_dict's (missing_keys, unexpected_keys) pair from
    any mapping."""
    a, b, c = fp.nn.Dense(3, 3, rng=0), fp.nn.ReLU(), fp.nn.Dense(3, 2, rng=1)
    model = fp.nn.Sequential(a, c)
    x = rng.standard_normal((4, 3))
    before = model(x)
    assert model.insert(1, b) is model and list(model) == [a, b, c]
    np.testing.assert_array_equal(model(x), fp.nn.Sequential(a, fp.nn.ReLU(), c)(x))
    assert model.pop(1) is b and list(model) == [a, c]
    np.testing.assert_array_equal(model(x), before)
    norm = fp.nn.BatchNorm1d(2)
    model.extend([norm])
    model[2] = fp.nn.Tanh()
    del model[2]
    assert list(model) == [a, c]
    for bad, err in [(lambda: model.insert(0, a), ValueError),
                     (lambda: model.extend([fp.nn.ReLU(), "x"]), TypeError),
                     (lambda: model.__setitem__(0, c), ValueError),
                     (lambda: model.__setitem__(slice(0, 1), [3]), TypeError)]:
        with pytest.raises(err):
            bad()
        assert list(model) == [a, c]
    model.append(norm)
    assert [n for n, _ in model.named_children()] == ["0", "1", "2"]
    assert [n for n, _ in _UserBlock().named_children()] == ["fc1", "drop", "fc2"]
    assert [n for n, _ in model.named_buffers()] == ["3.running_mean", "3.running_var",
                                                     "3.num_batches_tracked"]
    assert model.buffers()[1] is norm.running_var
    state = model.state_dict()
    del state["1.weight"]
    state["extra"] = np.zeros(1)
    from types import MappingProxyType
    result = model.load_state_dict(MappingProxyType(state), strict=False)
    assert result.missing_keys == ["1.weight"] and result.unexpected_keys == ["extra"]
    missing, unexpected = result
    assert (missing, unexpected) == (["1.weight"], ["extra"])


def test_pytorch_spellings(backend, rng, tmp_path):
    """What a port from PyTorch writes: ReLU/LeakyReLU/Dropout(inplace=...),
    LeakyReLU(negative_slope=), Softmax(dim=) (the last axis; another is refused at
    forward, and a chain with it is not fused as a row softmax), GELU(approximate=
    "tanh") (its exact form refused, not silently replaced), module.double() / .float()
    / .cpu(), Parameter.data."""
    x = rng.standard_normal((4, 3))
    np.testing.assert_array_equal(fp.nn.ReLU(inplace=True)(x), np.maximum(x, 0))
    leaky = fp.nn.LeakyReLU(negative_slope=0.2, inplace=True)
    assert leaky.alpha == 0.2 and fp.nn.LeakyReLU(0.3).alpha == 0.3
    assert fp.nn.LeakyReLU().alpha == 0.01
    with pytest.raises(TypeError, match="not both"):
        fp.nn.LeakyReLU(0.1, negative_slope=0.2)
    np.testing.assert_allclose(leaky(x), np.where(x > 0, x, 0.2 * x))
    assert fp.nn.Dropout(0.1, inplace=False).p == 0.1
    with pytest.raises(TypeError, match="inplace=True"):  # (torch's Dropout(p, inplace))
        fp.nn.Dropout(0.5, True)
    with pytest.raises(TypeError, match="inplace"):
        fp.nn.ReLU(inplace="yes")
    expect = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    for dim in (-1, 1, None):
        np.testing.assert_allclose(fp.nn.Softmax(dim=dim)(x), expect, rtol=1e-12)
    with pytest.raises(ValueError, match=r"Softmax\(dim=0\) on a 2-D input"):
        fp.nn.Softmax(dim=0)(x)
    with pytest.raises(TypeError, match="dim"):
        fp.nn.Softmax(dim=0.5)
    model = fp.nn.Sequential(fp.nn.Dense(3, 2, dtype=np.float64, rng=0), fp.nn.Softmax(dim=0))
    assert fp.train.dense_stages(model) is None
    assert fp.train.dense_stages(fp.nn.Sequential(model[0], fp.nn.Softmax(dim=1)))[0].act \
        == fp.backends.ACTIVATIONS["softmax"]
    fp.save(fp.nn.Sequential(model[0], fp.nn.Softmax(dim=1)), tmp_path / "s.fp")
    assert fp.load(tmp_path / "s.fp")[1].dim == 1
    np.testing.assert_array_equal(fp.nn.GELU(approximate="tanh")(x), fp.nn.GELU()(x))
    with pytest.raises(ValueError, match="approximate must be 'tanh' or 'none'"):
        fp.nn.GELU(approximate="erf")
    net = fp.nn.Sequential(fp.nn.Dense(3, 2, rng=0))
    assert net.double() is net and net[0].weight.dtype == np.float64
    assert net.float() is net and net[0].weight.dtype == np.float32
    assert net.cpu() is net
    w = net[0].weight
    assert w.data is w.value
    w.data = np.ones((3, 2))
    assert w.value.dtype == np.float32 and (w.value == 1).all()


def test_exact_gelu_as_pytorch(backend, rng, tmp_path):
    """GELU(approximate="none") and Dense(activation="gelu_erf") are PyTorch's default
    nn.GELU (x Phi(x)), forward and backward, as a layer and fused into Dense; a model
    with them trains as torch's does, on the compiled (fused) step and layer by layer;
    the option is saved (a file without it is the tanh form)."""
    torch = pytest.importorskip("torch")
    x = 3 * rng.standard_normal((6, 5))
    gelu = fp.nn.GELU(approximate="none")
    assert gelu.approximate == "none" and gelu.act == fp.backends.ACTIVATIONS["gelu_erf"]
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.gelu(tx)
    g = rng.standard_normal(x.shape)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(gelu(x), ty.detach().numpy(), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(gelu.backward(g), tx.grad.numpy(), rtol=1e-13, atol=1e-15)
    tanh_form = fp.nn.GELU()(x)
    assert 1e-5 < np.abs(tanh_form - gelu(x)).max() < 5e-4
    gelu.approximate = "tanh"
    np.testing.assert_array_equal(gelu(x), tanh_form)
    X, Y = rng.standard_normal((16, 5)), rng.integers(0, 3, 16)
    losses = []
    for build in (lambda: fp.nn.Sequential(fp.nn.Dense(5, 7, dtype=np.float64, rng=0),
                                           fp.nn.GELU(approximate="none"),
                                           fp.nn.Dense(7, 3, dtype=np.float64, rng=1)),
                  lambda: fp.nn.Sequential(fp.nn.Dense(5, 7, "gelu_erf", dtype=np.float64,
                                                       rng=0),
                                           fp.nn.Dense(7, 3, dtype=np.float64, rng=1))):
        model = build()
        tw = [torch.tensor(p.value.T.copy() if p.value.ndim == 2 else p.value.copy(),
                           requires_grad=True) for p in model.parameters()]
        topt = torch.optim.Adam(tw, lr=0.05)
        step = model.compile("cross_entropy", fp.optim.Adam(model.parameters(), lr=0.05))
        if backend == "native":
            assert step.fused() is not None  # (the fused kernel runs gelu_erf)
        for _ in range(5):
            losses.append(step(X, Y))
            topt.zero_grad()
            out = torch.nn.functional.gelu(torch.tensor(X) @ tw[0].T + tw[1]) @ tw[2].T + tw[3]
            tl = torch.nn.functional.cross_entropy(out, torch.tensor(Y))
            tl.backward()
            topt.step()
            assert losses[-1] == pytest.approx(tl.item(), rel=1e-12)
        for p, t in zip(model.parameters(), tw):
            ref = t.detach().numpy()
            np.testing.assert_allclose(p.value, ref.T if p.value.ndim == 2 else ref,
                                       rtol=1e-10, atol=1e-12)
        fp.save(model, tmp_path / "g.fp")
        back = fp.load(tmp_path / "g.fp")
        np.testing.assert_array_equal(back.predict(X), model.predict(X))
        if isinstance(model[1], fp.nn.GELU):
            assert back[1].approximate == "none" and model[1].get_config() == {
                "approximate": "none"}
    assert fp.nn.GELU().get_config() == {}  # (the files written before: the tanh form)


_NORM_OPTIONS = [
    ("bn", {"affine": False}), ("bn", {"track_running_stats": False}),
    ("bn", {"momentum": None}), ("bn", {"affine": False, "momentum": None}),
    ("ln", {"elementwise_affine": False}), ("ln", {"bias": False})]


@pytest.mark.parametrize("kind, options", _NORM_OPTIONS,
                         ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in o.items())}"
                              for k, o in _NORM_OPTIONS])
def test_norm_options_as_pytorch(backend, rng, kind, options, peer, tmp_path):
    """BatchNorm1d(affine=, track_running_stats=, momentum=None) and
    LayerNorm(elementwise_affine=, bias=): the parameters and buffers PyTorch has,
    gradients against central differences, outputs, input gradients and running
    statistics over 3 training steps and an eval forward against PyTorch's, and a
    save/load round trip."""
    make = fp.nn.BatchNorm1d if kind == "bn" else fp.nn.LayerNorm
    layer = make(5, dtype=np.float64, **options)
    names = [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]
    affine = options.get("affine", True) and options.get("elementwise_affine", True)
    want = (["0.weight"] if affine else []) + (
        ["0.bias"] if affine and options.get("bias", True) else [])
    if kind == "bn" and options.get("track_running_stats", True):
        want += ["0.running_mean", "0.running_var", "0.num_batches_tracked"]
    assert names == want
    if layer.weight is not None:
        layer.weight.value = rng.uniform(0.5, 2, 5)
    if layer.bias is not None:
        layer.bias.value = rng.standard_normal(5)
    xs = [rng.standard_normal((8, 5)) * 3 + 1 for _ in range(4)]
    assert fp.gradcheck(copy.deepcopy(layer), xs[0])
    outs = []
    for x in xs[:3]:
        y = layer(x)
        g = np.cos(y)
        outs.append((y, layer.backward(g)))
    layer.eval()
    eval_out = layer(xs[3])
    fp.save(layer, tmp_path / "n.fp")
    np.testing.assert_array_equal(fp.load(tmp_path / "n.fp").eval()(xs[3]), eval_out)
    model = fp.nn.Sequential(fp.nn.Dense(5, 5, "relu", rng=0, dtype=np.float64),
                             make(5, dtype=np.float64, **options),
                             fp.nn.Dense(5, 2, rng=1, dtype=np.float64))
    X = np.concatenate(xs)
    y = (X[:, 0] > 1).astype(int)
    hist = model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=8, batch_size=8,
                     verbose=0, seed=0, validation_split=0.25)
    assert hist["loss"][-1] < hist["loss"][0] and np.isfinite(hist["val_loss"]).all()
    if peer is None:
        return
    torch = peer
    if kind == "bn":
        ref = torch.nn.BatchNorm1d(5, dtype=torch.float64, **options)
    else:
        ref = torch.nn.LayerNorm(5, dtype=torch.float64, **options)
    fresh = make(5, dtype=np.float64, **options)  # (the scale and shift set above)
    for p, q in zip(fresh.parameters(), layer.parameters()):
        p.value = q.value
    for p, q in zip(fresh.parameters(), ref.parameters()):
        with torch.no_grad():
            q.copy_(torch.from_numpy(p.value))
    for x, (y, gx) in zip(xs[:3], outs):
        t = torch.from_numpy(x).requires_grad_(True)
        ty = ref(t)
        ty.backward(torch.cos(ty.detach()))
        fy = fresh(x)
        np.testing.assert_allclose(fy, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fresh.backward(np.cos(fy)), t.grad.numpy(), rtol=1e-9,
                                   atol=1e-12)
    for name, arr in fresh.named_buffers():
        np.testing.assert_allclose(arr, getattr(ref, name.split(".")[1]).numpy(), rtol=1e-12)
    ref.eval()
    fresh.eval()
    np.testing.assert_allclose(fresh(xs[3]), ref(torch.from_numpy(xs[3])).detach().numpy(),
                               rtol=1e-10, atol=1e-12)


def test_batchnorm_counts_every_batch_as_pytorch(rng, peer, tmp_path):
    """num_batches_tracked counts every training batch whatever the momentum (as
    PyTorch's), so a momentum set to None after some batches weighs the next one
    1/(k+1), not 1 (it replaced the statistics); the count is a checked buffer; state
    dicts and files without it (saved before) load, keeping it."""
    xs = [rng.standard_normal((8, 3)) * 2 + 1 for _ in range(6)]
    bn = fp.nn.BatchNorm1d(3, dtype=np.float64)
    assert "0.num_batches_tracked" in bn.state_dict()
    for i, x in enumerate(xs):
        if i == 4:
            bn.momentum = None
        bn(x)
    assert int(bn.num_batches_tracked) == 6
    mean = np.zeros(3)
    for i, x in enumerate(xs):  # (0.1 for four batches, then 1/5 and 1/6)
        m = 0.1 if i < 4 else 1 / (i + 1)
        mean = (1 - m) * mean + m * x.mean(axis=0)
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-12)
    if peer is not None:
        ref = peer.nn.BatchNorm1d(3, dtype=peer.float64)
        for i, x in enumerate(xs):
            if i == 4:
                ref.momentum = None
            ref(peer.from_numpy(x))
        np.testing.assert_allclose(bn.running_mean, ref.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(bn.running_var, ref.running_var.numpy(), rtol=1e-12)
        assert int(ref.num_batches_tracked) == int(bn.num_batches_tracked)
    bn.num_batches_tracked = 2  # (an int is taken, as a 0-d int64 array)
    assert bn.num_batches_tracked.dtype == np.int64 and int(bn.num_batches_tracked) == 2
    for bad, exc in [(-1, ValueError), (1.5, TypeError), ("2", TypeError)]:
        with pytest.raises(exc, match="num_batches_tracked"):
            bn.num_batches_tracked = bad
    assert int(bn.num_batches_tracked) == 2
    state = bn.state_dict()
    del state["0.num_batches_tracked"]
    fresh = fp.nn.BatchNorm1d(3, dtype=np.float64)
    assert fresh.load_state_dict(state) == ([], [])
    np.testing.assert_array_equal(fresh.running_mean, bn.running_mean)
    assert int(fresh.num_batches_tracked) == 0
    old = fp.nn.Sequential(fp.nn.Dense(3, 3, rng=0), fp.nn.BatchNorm1d(3))
    old[1](xs[0].astype(np.float32))
    old[1]._buffers = ("running_mean", "running_var")  # (as files were written before)
    fp.save(old, tmp_path / "old.fp")
    loaded = fp.load(tmp_path / "old.fp")
    np.testing.assert_array_equal(loaded[1].running_mean, old[1].running_mean)
    assert int(loaded[1].num_batches_tracked) == 0


class _MaskedDense(fp.nn.Dense):
    """A user's layer with a buffer holding -inf (an additive mask)."""

    _buffers = ("mask",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask = np.zeros(self.out_features, self._dtype)
        self.mask[-1] = -np.inf

    def forward(self, x):
        self._masked = super().forward(x)
        return np.maximum(self._masked + self.mask, -30.0)

    def backward(self, grad_out, input_grad=True):
        return super().backward(np.where(self._masked + self.mask > -30.0, grad_out, 0.0),
                                input_grad)


class _BNWithCount(fp.nn.BatchNorm1d):
    _buffers = fp.nn.BatchNorm1d._buffers + ("seen",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = np.zeros(1)


def test_buffers_and_registration_edge_cases(backend, rng):
    """A user's buffer that holds inf does not make every step non-finite (only a
    buffer that becomes non-finite does); BatchNorm1d keeps a subclass' buffers with
    momentum=None or without running statistics, and momentum set to None after
    construction counts batches (the counter's update changes no structure); a list
    _params, named_children after a child is set to None, modules() of a model with a
    back-reference (each module once), and Sequential.insert out of range."""
    X = rng.standard_normal((64, 3))
    y = rng.integers(0, 2, 64)
    model = fp.nn.Sequential(_MaskedDense(3, 3, rng=0, dtype=np.float64))
    hist = model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=2, verbose=0)
    assert hist.skipped_steps == 0 and np.isfinite(hist["loss"]).all()
    for kw, want in [({"momentum": None}, ["running_mean", "running_var",
                                           "num_batches_tracked", "seen"]),
                     ({"track_running_stats": False}, ["seen"])]:
        assert [n.split(".")[1] for n, _ in _BNWithCount(3, **kw).named_buffers()] == want
    bn = fp.nn.BatchNorm1d(3)
    bn.momentum = None
    structure = fp.nn._structure[0]
    for _ in range(3):
        bn(rng.standard_normal((8, 3)))
    assert int(bn.num_batches_tracked) == 3 and fp.nn._structure[0] == structure
    assert "0.num_batches_tracked" in bn.state_dict()

    class Listed(fp.nn.Module):
        _params = ["w"]

        def __init__(self):
            super().__init__()
            self.w = fp.Parameter(np.ones(2))
            self.extra = fp.Parameter(np.ones(3))
            self.a = fp.nn.ReLU()
            self.b = fp.nn.Tanh()
            self.a = None
            self.b.owner = self  # (a back-reference)

    listed = Listed()
    assert [p.size for p in listed.parameters()] == [2, 3]
    assert [n for n, _ in listed.named_children()] == ["b"]
    assert [type(m).__name__ for m in listed.modules()] == ["Listed", "Tanh"]
    seq = fp.nn.Sequential(fp.nn.ReLU())
    for bad in (2, -2):
        with pytest.raises(IndexError, match="out of range"):
            seq.insert(bad, fp.nn.Tanh())
    assert len(seq.insert(-1, fp.nn.Tanh())) == 2


def test_batchnorm_without_running_statistics_in_batched_eval(backend, rng):
    """predict, evaluate and fit's validation split X into batches: a last batch of one
    row joins the one before (a BatchNorm1d without running statistics cannot take a
    single row: predict of 1025 rows, or 257 validation rows, failed, the latter after
    an epoch had changed the weights); a single validation row is refused before
    training."""
    model = fp.nn.Sequential(fp.nn.Dense(3, 4, rng=0),
                             fp.nn.BatchNorm1d(4, track_running_stats=False),
                             fp.nn.Dense(4, 2, rng=1))
    X = rng.standard_normal((1025, 3))
    y = rng.integers(0, 2, 1025)
    assert model.predict(X).shape == (1025, 2)
    assert np.isfinite(model.evaluate(X, y, loss="cross_entropy"))
    hist = model.fit(X[:320], y[:320], loss="cross_entropy", optimizer="sgd",
                     epochs=1, batch_size=32, verbose=0, validation_data=(X[:257], y[:257]))
    assert np.isfinite(hist["val_loss"][0])
    before = model.state_dict()
    with pytest.raises(ValueError, match="needs more than 1 validation sample"):
        model.fit(X[:64], y[:64], loss="cross_entropy", optimizer="sgd", epochs=1,
                  verbose=0, validation_data=(X[:1], y[:1]))
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    model.train()
    model[1].eval()  # (without running statistics it still normalizes by the batch's)
    with pytest.raises(ValueError, match="leaves a batch of 1 sample"):
        model.fit(X[:33], y[:33], loss="cross_entropy", optimizer="sgd", epochs=1,
                  batch_size=32, verbose=0)
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    plain = fp.nn.Sequential(fp.nn.Dense(3, 2, rng=0))
    np.testing.assert_array_equal(plain.predict(X, batch_size=4), plain.predict(X))


def test_a_subclass_of_sequential_registers_its_own_attributes(backend, rng):
    """A subclass of Sequential (or Residual) that sets a module of its own as an
    attribute has it among its children, parameters and state (the container's own
    list alone was used); plain containers are unchanged."""
    class WithHead(fp.nn.Sequential):
        def __init__(self):
            super().__init__(fp.nn.Dense(3, 4, "relu", rng=0))
            self.head = fp.nn.Dense(4, 2, rng=1)

        def forward(self, x):
            return self.head(super().forward(x))

        def backward(self, grad_out, input_grad=True):
            return super().backward(self.head.backward(grad_out), input_grad)

    model = WithHead()
    assert model.children() == [model.layers[0], model.head]
    assert len(model.parameters()) == 4 and "2.weight" in model.state_dict()
    X, y = rng.standard_normal((32, 3)), rng.integers(0, 2, 32)
    before = model.head.weight.value.copy()
    model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=2, verbose=0)
    assert not np.array_equal(before, model.head.weight.value)
    plain = fp.nn.Sequential(fp.nn.ReLU())
    plain.extra = fp.nn.Tanh()
    assert plain.children() == [plain.layers[0]]


# ---- user subclasses and net surgery (the backward chain check leaves them alone)
class _Flattening:
    """A user's subclass that flattens its input first (and reshapes its gradient)."""

    def forward(self, x):
        self._in = np.shape(x)
        return super().forward(np.reshape(x, (len(x), -1)))

    def backward(self, g, input_grad=True):
        return super().backward(g, input_grad).reshape(self._in)


class _FlatDense(_Flattening, nn.Dense):
    pass


class _Swish(nn.Activation):
    """An activation of the user's, keeping its own caches."""

    def forward(self, x):
        x = np.asarray(x, np.float64)
        self._x, self._s = x, 1 / (1 + np.exp(-x))
        return x * self._s

    def backward(self, g, input_grad=True):
        s = self._s
        return g * (s + self._x * s * (1 - s))


class _FlatSeq(_Flattening, nn.Sequential):
    pass


@pytest.mark.parametrize("case", ["flat-dense", "swish", "flat-sequential"])
def test_backward_through_user_subclasses_of_fastprop_layers(case):
    """Sequential.backward checks that its layers' last forwards chain only for
    fastprop's own classes: a user's subclass may reshape, or keep other caches (all
    three were refused when it asked them too)."""
    rng = np.random.default_rng(0)
    if case == "flat-dense":
        m = nn.Sequential(nn.Tanh(), _FlatDense(6, 2, dtype=np.float64, rng=0))
        x = rng.standard_normal((4, 2, 3))
    elif case == "swish":
        m = nn.Sequential(nn.Dense(3, 4, dtype=np.float64, rng=0), _Swish(),
                          nn.Dense(4, 1, dtype=np.float64, rng=1))
        x = rng.standard_normal((5, 3))
    else:
        m = nn.Sequential(nn.ReLU(), _FlatSeq(nn.Dense(6, 2, dtype=np.float64, rng=0)))
        x = rng.standard_normal((4, 2, 3)) + 0.5
    assert fp.gradcheck(m, x)


def test_net_surgery_pruning_units_in_place():
    """Pruning hidden units: new, smaller Parameters and statistics assigned, the
    layers' sizes set (in either order, as in PyTorch); a layer whose arrays do not
    match its sizes is refused at forward with a message naming them."""
    keep = np.array([0, 2, 3, 5])
    m = nn.Sequential(nn.Dense(3, 8, "relu", rng=0), nn.BatchNorm1d(8), nn.Dense(8, 2, rng=1))
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    a, bn, b = m[0], m[1], m[2]
    a.weight = fp.Parameter(a.weight.value[:, keep])
    a.bias = fp.Parameter(a.bias.value[keep])
    with pytest.raises(ValueError, match=r"Dense\(3, 8\): weight must have shape \(3, 8\) "
                                         r"and bias \(8,\), got \(3, 4\) and \(4,\)"):
        m(x)
    a.out_features = 4
    bn.num_features = 4
    bn.weight = fp.Parameter(bn.weight.value[keep])
    bn.bias = fp.Parameter(bn.bias.value[keep])
    full = bn.running_mean
    bn.running_mean = full[:5]
    with pytest.raises(ValueError, match=r"BatchNorm1d\(4\): running_mean must have shape "
                                         r"\(4,\), got \(5,\)"):
        m(x)
    bn.running_mean = full[keep]
    bn.running_var = bn.running_var[keep]
    b.in_features = 4
    b.weight = fp.Parameter(b.weight.value[keep, :])
    out = m(x)
    m.backward(np.ones_like(out))
    assert out.shape == (5, 2) and m[0].weight.grad.shape == (3, 4)


def test_deeply_nested_containers_check_their_chain_once():
    """Each container's backward used to check its whole subtree again: nested
    depth d cost d^2 shape checks.  The outermost backward checks once."""
    depth = 30
    block = nn.Sequential(nn.Dense(4, 4, rng=0))
    for i in range(depth):
        block = nn.Sequential(nn.Residual(block))
    x = np.ones((2, 4), np.float32)
    out = block(x)
    calls = [0]
    real = nn.Dense._backward_shapes

    def counted(self):
        calls[0] += 1
        return real(self)

    nn.Dense._backward_shapes = counted
    try:
        block.backward(np.ones_like(out))
    finally:
        nn.Dense._backward_shapes = real
    assert calls[0] <= 2, calls[0]


def test_a_bias_of_one_element_is_refused_on_every_backend(backend):
    """A (1,) bias broadcast silently over the outputs on the numpy backend (the native
    kernel refused it): both refuse, and the layer names its arrays."""
    d = nn.Dense(4, 3, rng=0)
    d.bias = fp.Parameter(np.zeros(1, np.float32))
    with pytest.raises(ValueError, match=r"Dense\(4, 3\): weight must have shape \(4, 3\) "
                                         r"and bias \(3,\), got \(4, 3\) and \(1,\)"):
        d(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"b must have shape \(3,\), got \(1,\)"):
        fp.ops.linear(np.ones((2, 4), np.float32), d.weight.value, d.bias.value)


class _Wrap(nn.Module):
    """A user's module holding a Sequential."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Dense(3, 4, rng=0), nn.Dense(4, 2, rng=1))

    def forward(self, x):
        return self.inner(x)

    def backward(self, g, input_grad=True):
        return self.inner.backward(g, input_grad)


def test_a_sequential_inside_a_users_module_checks_its_chain_inside_a_sequential():
    """The outer check does not look inside a user's module; the Sequential there
    checked nothing (the outer one had set "checked"), and its second layer added to
    its gradient before the first refused."""
    rng = np.random.default_rng(0)
    wrap = _Wrap()
    outer = nn.Sequential(nn.Identity(), wrap)
    outer(rng.standard_normal((5, 3)).astype(np.float32))
    wrap.inner[1](rng.standard_normal((7, 4)).astype(np.float32))
    with pytest.raises(ValueError, match=r"layer 0 \(Dense\)'s last forward gave shape \(5, 4\)"):
        outer.backward(np.ones((7, 2), np.float32))
    assert not any(p.has_grad for p in wrap.parameters())


def test_per_feature_arrays_of_another_size_are_refused_on_every_backend(backend):
    """A (1,) scale, shift or statistic broadcast silently on the numpy backend (the
    native kernels refused it): every backend refuses, and the layer names it."""
    x = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    for make, name in ((lambda: nn.BatchNorm1d(4), "weight"), (lambda: nn.LayerNorm(4), "bias"),
                       (lambda: nn.BatchNorm1d(4).eval(), "running_var")):
        layer = make()
        one = np.ones(1, np.float32)
        setattr(layer, name, fp.Parameter(one) if name in ("weight", "bias") else one)
        with pytest.raises(ValueError, match=rf"\(4\): {name} must have shape \(4,\), "
                                             rf"got \(1,\)"):
            layer(x)


def test_a_compiled_step_refuses_a_dense_whose_arrays_do_not_fit_it(backend):
    """The whole-step kernel trained a Dense(3, 2) holding a (3, 5) weight, which the
    layer's own forward refuses; it is refused when the kernel binds."""
    model = nn.Sequential(nn.Dense(3, 2, rng=0))
    model[0].weight = fp.Parameter(np.ones((3, 5), np.float32))
    model[0].bias = fp.Parameter(np.ones(5, np.float32))
    step = model.compile("mse", "sgd")
    with pytest.raises(ValueError, match=r"Dense\(3, 2\): weight must have shape \(3, 2\)"):
        step(np.ones((4, 3), np.float32), np.ones((4, 2), np.float32))


def test_dense_init_takes_in_place_initializers_and_names_a_bad_callable():
    """init=fp.init.kaiming_normal_ (PyTorch's in-place form) draws a fresh weight with
    the layer's rng; a callable without the (shape, rng=, dtype=) form is a TypeError
    that says what init= takes."""
    a = fp.nn.Dense(400, 300, init=fp.init.kaiming_normal_, rng=0)
    b = fp.nn.Dense(400, 300, init=fp.init.kaiming_normal_, rng=0)
    np.testing.assert_array_equal(a.weight.value, b.weight.value)
    assert a.weight.value.dtype == np.float32
    assert a.weight.value.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02)
    w = fp.nn.Dense(400, 300, init=fp.init.xavier_uniform_, rng=1,
                    dtype=np.float64).weight.value
    assert w.dtype == np.float64 and np.abs(w).max() <= np.sqrt(6 / 700)
    assert np.abs(w).max() > 0.99 * np.sqrt(6 / 700)
    assert (fp.nn.Dense(3, 2, init=fp.init.ones_).weight.value == 1).all()
    with pytest.raises(TypeError, match=r"f\(shape, rng=, dtype=\)"):
        fp.nn.Dense(3, 2, init=lambda shape: np.ones(shape))


def test_residual_refuses_a_width_changing_block_before_it_runs(rng):
    """A Residual whose block (of fastprop's layers) changes the width is refused when
    made, and, if the block was changed since, at forward before the block runs: a
    BatchNorm inside keeps its statistics.  A user's block is checked on its output."""
    with pytest.raises(ValueError, match="maps 4 features to 5"):
        nn.Residual(nn.Sequential(nn.BatchNorm1d(4), nn.Dense(4, 5)))
    nn.Residual(nn.Sequential(nn.Dense(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Dense(8, 4)))
    res = nn.Residual(nn.Sequential(nn.BatchNorm1d(4), nn.Dense(4, 4, rng=0)))
    res.block.append(nn.Dense(4, 5, rng=1))
    before = copy.deepcopy(res.state_dict())
    with pytest.raises(ValueError, match="maps 4 features to 5"):
        res(rng.standard_normal((8, 4)).astype(np.float32))
    for name, arr in res.state_dict().items():
        np.testing.assert_array_equal(arr, before[name])
    res.block.pop()
    res(rng.standard_normal((8, 4)).astype(np.float32))
    assert int(res.block[0].num_batches_tracked) == 1

    class Halve(nn.Module):
        def forward(self, x):
            return x[:, ::2]

        def backward(self, grad_out, input_grad=True):
            raise AssertionError("not reached")
    with pytest.raises(ValueError, match=r"maps shape \(2, 4\) to \(2, 2\)"):
        nn.Residual(Halve())(np.ones((2, 4)))


@pytest.mark.parametrize("view", [False, True])
def test_dense_backward_reads_a_copy_of_an_input_it_writes(backend, rng, view):
    """backward(grad) where grad (or the forward's input) is the weight's own gradient
    array, or a view of it: the kernels write that array while reading the input, so
    the layer reads a copy; the result equals that of an independent copy."""
    def run(alias):  # (identity: the gradient itself is the GEMMs' operand)
        d = nn.Dense(n, n, None, rng=0, dtype=np.float64)
        d.weight.grad = rng_vals.copy()
        x = (d.weight.grad[:, :] if view else d.weight.grad) if alias == "x" else xs.copy()
        d(x)
        g = (d.weight.grad[:, :] if view else d.weight.grad) if alias == "g" else gs.copy()
        if alias == "x":  # (x itself is the array the forward kept)
            g = rng_vals.copy()
        gx = d.backward(g)
        return gx, d.weight.grad.copy(), d.bias.grad.copy()

    n = 96  # (beyond the GEMM's register tiles: C is written while B is still read)
    rng_vals = rng.standard_normal((n, n))
    xs, gs = rng_vals.copy(), rng_vals.copy()
    want = run(None)
    for alias in ("x", "g"):
        for got, ref in zip(run(alias), want):
            np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-15)


def test_residual_around_a_users_block_keeps_the_skip_gradient(rng):
    """Residual around a user's block (a Dense subclass takes the unchecked backward
    branch) against central differences: the identity path's gradient is added."""
    class MyDense(nn.Dense):
        pass

    x = rng.standard_normal((4, 3))
    for block in (MyDense(3, 3, "tanh", rng=0, dtype=np.float64),
                  nn.Dense(3, 3, "tanh", rng=0, dtype=np.float64)):
        assert fp.gradcheck(nn.Residual(block), x)


def test_strict_load_state_dict_refuses_an_unexpected_key_and_changes_nothing():
    model = nn.Sequential(nn.Dense(3, 2, rng=0), nn.BatchNorm1d(2))
    before = model.state_dict()
    bad = {k: v + 1 for k, v in before.items()}
    bad["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        model.load_state_dict(bad)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    missing, unexpected = model.load_state_dict(bad, strict=False)
    assert missing == [] and unexpected == ["extra"]
    np.testing.assert_array_equal(model[0].weight.value, before["1.weight"] + 1)


def test_walking_the_module_tree_leaves_no_reference_cycle():
    """modules() and the each-module-once check left a reference cycle per call (a
    recursive closure), for the cyclic garbage collector; pre-order is kept, and a
    back-reference (a cycle) is not followed."""
    import gc
    inner = nn.Sequential(nn.Dense(4, 4))
    model = nn.Sequential(nn.Dense(3, 4), nn.Residual(inner), nn.Dense(4, 2))
    assert [type(m).__name__ for m in model.modules()] == [
        "Sequential", "Dense", "Residual", "Sequential", "Dense", "Dense"]
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(20):
            list(model.modules())
            model.parameters()
            nn._check_each_module_once(model, "test")
        assert gc.collect() == 0
    finally:
        if was:
            gc.enable()


    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Dense(2, 2)

    wrap = Wrap()
    wrap.inner.parent = wrap  # (a back-reference, registered: a cycle, not followed)
    assert [type(m).__name__ for m in wrap.modules()] == ["Wrap", "Dense"]
    assert wrap.inner.children() == [wrap]


def test_porting_traps_from_pytorch_are_said():
    """PyTorch's ModuleList idiom as a plain list (its modules unregistered: trained and
    saved by nothing) warns; a module of one's own without backward says fastprop has
    no autograd (the error was empty); fp.save of a checkpoint dict says how."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            with pytest.warns(UserWarning, match=r"Net.hidden is a list holding fastprop "
                                                 r"modules: they are not registered"):
                self.hidden = [nn.Dense(3, 3), nn.Dense(3, 3)]
            self.out = nn.Dense(3, 2)

        def forward(self, x):
            for layer in self.hidden:
                x = layer(x)
            return self.out(x)

    net = Net()
    assert len(net.parameters()) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq = nn.Sequential(nn.Dense(2, 2))
        seq.layers = list(seq.layers)  # (a Sequential's own list)
        net.sizes = [3, 3, 2]
        net.names = {"a": "b"}
    with pytest.raises(NotImplementedError, match="Net defines no backward.*no autograd"):
        net.backward(np.ones((1, 2)))
    with pytest.raises(TypeError, match="pickle a dict of the model, the optimizer"):
        fp.save({"model": seq}, io.BytesIO())
    with pytest.raises(ValueError, match="parameter group 1 has no parameters"):
        fp.optim.AdamW([{"params": seq.parameters()}, {"params": [], "weight_decay": 0}])


def test_batchnorm_statistics_assigned_are_checked(backend, rng):
    """Running statistics assigned by hand (ported, pruned) are refused unless a NumPy
    array of the layer's dtype (both backends refused or accepted different things: a
    list raised AttributeError, float64 was kept on numpy); a strided or read-only one
    is copied, so that training updates it in place on both backends alike."""
    bn = nn.BatchNorm1d(3)
    with pytest.raises(TypeError, match="cannot assign list as 'running_var'"):
        bn.running_var = [1.0, 2.0, 3.0]
    with pytest.raises(TypeError, match="float64 array as 'running_mean' of a float32"):
        bn.running_mean = np.zeros(3)
    with pytest.raises(TypeError, match="running_mean"):
        bn.running_mean = np.zeros(3, ">f4")
    ported = np.array([0.5, 1.0, 2.0, 9.0, 4.0, 9.0], np.float32)[::2]
    frozen = np.array([0.1, 0.2, 0.3], np.float32)
    frozen.setflags(write=False)
    bn.running_var, bn.running_mean = ported, frozen
    assert bn.running_var.flags.c_contiguous and bn.running_mean.flags.writeable
    ref = nn.BatchNorm1d(3)
    ref.running_var, ref.running_mean = ported.copy(), frozen.copy()
    x = rng.standard_normal((8, 3)).astype(np.float32)
    bn(x), ref(x)
    np.testing.assert_array_equal(bn.running_var, ref.running_var)
    np.testing.assert_array_equal(bn.running_mean, ref.running_mean)
    np.testing.assert_array_equal(frozen, np.float32([0.1, 0.2, 0.3]))  # (untouched)
    bn.running_mean = bn.running_var = None  # (None, as PyTorch's buffers)


def test_init_seed_also_seeds_dropout_masks_without_moving_the_weights():
    """fp.init.seed(s) makes a hand loop with Dropout reproducible (the README's
    determinism recipe; Dropout drew OS entropy), without drawing from the weights'
    generator: the same weights whether Dropout layers sit between the layers or not."""
    X = np.random.default_rng(0).standard_normal((16, 5)).astype(np.float32)

    def run(with_dropout):
        fp.init.seed(7)
        layers = [nn.Dense(5, 8, "relu"), nn.Dropout(0.5), nn.Dense(8, 3), nn.Dropout(0.3)]
        model = nn.Sequential(*(l for l in layers
                                if with_dropout or not isinstance(l, nn.Dropout)))
        weights = [p.value.copy() for p in model.parameters()]
        outs = [model(X) for _ in range(3)] if with_dropout else []
        return weights, outs, model

    (w1, o1, m1), (w2, o2, _), (w3, _, _) = run(True), run(True), run(False)
    for a, b, c in zip(w1, w2, w3):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    for a, b in zip(o1, o2):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(o1[0], o1[1])  # (each forward draws a new mask)
    for s in (7, None):  # (each Dropout its own stream; unseeded: fresh entropy)
        fp.init.seed(s)
        a, b = nn.Dropout(0.5), nn.Dropout(0.5)
        assert a.rng.random() != b.rng.random()


def test_batchnorm_statistics_made_unusable_in_place_are_named(backend, rng):
    """A running statistic made read-only in place, one of the pair set to None, a
    negative batch count: named ValueErrors (a raw buffer message on native; an
    AttributeError; a ZeroDivisionError or a momentum never set), state unchanged."""
    x = rng.standard_normal((8, 3)).astype(np.float32)
    bn = nn.BatchNorm1d(3)
    bn.running_mean.setflags(write=False)
    with pytest.raises(ValueError, match="running_mean must be a writable C-contiguous"):
        bn(x)
    assert bn.num_batches_tracked == 0 and np.array_equal(bn.running_var, np.ones(3))
    bn = nn.BatchNorm1d(3)
    bn.running_var = None
    with pytest.raises(ValueError, match="both be None or neither"):
        bn(x)
    bn = nn.BatchNorm1d(3, momentum=None)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bn.num_batches_tracked = np.array(-1)


class _ReadmeScale(nn.Module):
    """The README's example of a layer of one's own (kept as written there)."""
    _caches = ("_x",)

    def __init__(self, n):
        super().__init__()
        self.n, self.scale = n, fp.Parameter(np.ones(n))

    def get_config(self):
        return {"n": self.n}

    def forward(self, x):
        if not fp.nn.is_inference_mode_enabled():
            self._x = x
        return x * self.scale.value

    def backward(self, g, input_grad=True):
        self.scale.grad += (g * self._x).sum(0)
        return g * self.scale.value if input_grad else None


def test_a_layer_of_ones_own_can_keep_inference_mode_and_declare_its_caches():
    """fp.nn.is_inference_mode_enabled() (PyTorch's torch.is_inference_mode_enabled):
    a layer of one's own, written as the README says, keeps its training forward's
    input through an evaluation in inference_mode or a predict from another thread
    (there was no public way to tell: its gradient came out silently wrong), and its
    _caches are dropped after a compiled step (the batch stayed alive)."""
    import threading
    import weakref
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Dense(3, 4, dtype=np.float64, rng=0), _ReadmeScale(4))
    x, other = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))

    def grad_of_scale(middle):
        model.zero_grad()
        out = model(x)
        middle()
        model.backward(np.ones_like(out), input_grad=False)
        return model[1].scale.grad.copy()

    def in_inference():
        with fp.nn.inference_mode():
            assert fp.nn.is_inference_mode_enabled()
            model(other)
        assert not fp.nn.is_inference_mode_enabled()

    def predict_in_a_thread():
        t = threading.Thread(target=model.predict, args=(other,))
        t.start()
        t.join()

    want = grad_of_scale(lambda: None)
    np.testing.assert_allclose(want, (model[0](x)).sum(0), rtol=1e-12)
    for middle in (in_inference, predict_in_a_thread):
        np.testing.assert_array_equal(grad_of_scale(middle), want)
    assert not fp.nn.is_inference_mode_enabled()

    step = model.compile("mse", fp.optim.SGD(model.parameters(), lr=0.1))
    batch = rng.normal(size=(6, 3))
    ref = weakref.ref(batch)
    step(batch, rng.normal(size=(6, 4)))
    del batch
    assert ref() is None  # (the step dropped the layer's _x)
