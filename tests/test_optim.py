"""Optimizers against their textbook updates (PyTorch's documented algorithms),
written out below in plain float64 NumPy, over 5 steps with changing gradients."""

import importlib.util
import math
import re

import numpy as np
import pytest

import fastprop as fp
from fastprop import nn, optim
from _support import assert_close, snapshot

SHAPES = [(3, 4), (5,), (1,)]
STEPS = 5


# --------------------------------------------------------------------------- textbook
class TextbookSGD:
    def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.lr, self.mu, self.nesterov, self.wd = lr, momentum, nesterov, weight_decay
        self.buf = None

    def step(self, t, p, g, state):
        g = g + self.wd * p
        if self.mu != 0:
            b = g.copy() if t == 1 else self.mu * state["momentum_buffer"] + g
            state["momentum_buffer"] = b
            g = g + self.mu * b if self.nesterov else b
        return p - self.lr * g


class TextbookAdam:
    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False,
                 amsgrad=False):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.decoupled, self.amsgrad = decoupled, amsgrad

    def step(self, t, p, g, state):
        if self.decoupled:
            p = p * (1 - self.lr * self.wd)
        else:
            g = g + self.wd * p
        m = self.b1 * state.get("exp_avg", 0.0) + (1 - self.b1) * g
        v = self.b2 * state.get("exp_avg_sq", 0.0) + (1 - self.b2) * g * g
        state["exp_avg"], state["exp_avg_sq"] = m, v
        if self.amsgrad:  # (Reddi et al.: the running maximum of v, as torch's)
            v = state["max_exp_avg_sq"] = np.maximum(state.get("max_exp_avg_sq", 0.0), v)
        m_hat = m / (1 - self.b1 ** t)
        v_hat = v / (1 - self.b2 ** t)
        return p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


class TextbookRMSprop:
    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0):
        self.lr, self.alpha, self.eps, self.mu, self.wd = lr, alpha, eps, momentum, weight_decay

    def step(self, t, p, g, state):
        g = g + self.wd * p
        s = self.alpha * state.get("square_avg", 0.0) + (1 - self.alpha) * g * g
        state["square_avg"] = s
        avg = np.sqrt(s) + self.eps
        if self.mu > 0:
            b = self.mu * state.get("momentum_buffer", 0.0) + g / avg
            state["momentum_buffer"] = b
            return p - self.lr * b
        return p - self.lr * g / avg


class TextbookAdagrad:
    def __init__(self, lr=1e-2, eps=1e-10, weight_decay=0.0):
        self.lr, self.eps, self.wd = lr, eps, weight_decay

    def step(self, t, p, g, state):
        g = g + self.wd * p
        s = state.get("sum", 0.0) + g * g
        state["sum"] = s
        return p - self.lr * g / (np.sqrt(s) + self.eps)


# (id, fastprop constructor, textbook, gradient scale).  Small gradients (0.01) make
# eps comparable to sqrt(v), so an eps placed inside the square root (or applied to
# the uncorrected v) shows.
CASES = [
    ("sgd", lambda ps: optim.SGD(ps, lr=0.1), TextbookSGD(0.1), 1.0),
    ("sgd-momentum", lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
     TextbookSGD(0.1, momentum=0.9), 1.0),
    ("sgd-nesterov", lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
     TextbookSGD(0.1, momentum=0.9, nesterov=True), 1.0),
    ("sgd-wd", lambda ps: optim.SGD(ps, lr=0.1, weight_decay=0.1),
     TextbookSGD(0.1, weight_decay=0.1), 1.0),
    ("sgd-momentum-wd", lambda ps: optim.SGD(ps, lr=0.05, momentum=0.5, weight_decay=0.2),
     TextbookSGD(0.05, momentum=0.5, weight_decay=0.2), 1.0),
    ("sgd-nesterov-wd", lambda ps: optim.SGD(ps, lr=0.05, momentum=0.5, nesterov=True,
                                             weight_decay=0.2),
     TextbookSGD(0.05, momentum=0.5, nesterov=True, weight_decay=0.2), 1.0),
    ("adam", lambda ps: optim.Adam(ps, lr=0.01), TextbookAdam(0.01), 1.0),
    ("adam-eps-betas-wd", lambda ps: optim.Adam(ps, lr=0.1, betas=(0.8, 0.9), eps=1e-2,
                                                weight_decay=0.1),
     TextbookAdam(0.1, (0.8, 0.9), 1e-2, 0.1), 0.01),
    ("adam-betas-zero", lambda ps: optim.Adam(ps, lr=0.1, betas=(0.0, 0.0)),
     TextbookAdam(0.1, (0.0, 0.0)), 1.0),
    ("adamw", lambda ps: optim.AdamW(ps, lr=0.01), TextbookAdam(0.01, weight_decay=1e-2,
                                                               decoupled=True), 1.0),
    ("adamw-strong", lambda ps: optim.AdamW(ps, lr=0.1, betas=(0.5, 0.6), eps=1e-2,
                                            weight_decay=0.5),
     TextbookAdam(0.1, (0.5, 0.6), 1e-2, 0.5, decoupled=True), 0.01),
    ("adam-amsgrad", lambda ps: optim.Adam(ps, lr=0.1, betas=(0.5, 0.6), eps=1e-2,
                                           weight_decay=0.1, amsgrad=True),
     TextbookAdam(0.1, (0.5, 0.6), 1e-2, 0.1, amsgrad=True), 0.01),
    ("adamw-amsgrad", lambda ps: optim.AdamW(ps, lr=0.1, betas=(0.5, 0.6), amsgrad=True),
     TextbookAdam(0.1, (0.5, 0.6), weight_decay=1e-2, decoupled=True, amsgrad=True), 1.0),
    ("rmsprop", lambda ps: optim.RMSprop(ps, lr=0.01), TextbookRMSprop(0.01), 1.0),
    ("rmsprop-eps-wd", lambda ps: optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-2,
                                                weight_decay=0.1),
     TextbookRMSprop(0.01, 0.9, 1e-2, 0.0, 0.1), 0.01),
    ("rmsprop-momentum", lambda ps: optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-2,
                                                  momentum=0.9, weight_decay=0.1),
     TextbookRMSprop(0.01, 0.9, 1e-2, 0.9, 0.1), 0.01),
    ("adagrad", lambda ps: optim.Adagrad(ps, lr=0.1), TextbookAdagrad(0.1), 1.0),
    ("adagrad-eps-wd", lambda ps: optim.Adagrad(ps, lr=0.1, eps=1e-2, weight_decay=0.1),
     TextbookAdagrad(0.1, 1e-2, 0.1), 0.01),
]
CASE_IDS = [c[0] for c in CASES]


def _params(rng, dtype, shapes=SHAPES):
    return [fp.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]


def _grads(rng, shapes, scale):
    return [[scale * rng.standard_normal(s) for s in shapes] for _ in range(STEPS)]


@pytest.mark.parametrize("name,make,book,gscale", CASES, ids=CASE_IDS)
def test_optimizer_matches_textbook(backend, dtype, rng, name, make, book, gscale):
    params = _params(rng, dtype)
    ref = [p.value.astype(np.float64) for p in params]
    ref_state = [dict() for _ in params]
    opt = make(params)
    for t, grads in enumerate(_grads(rng, SHAPES, gscale), start=1):
        for p, g in zip(params, grads):
            p.grad[...] = g
        grads_given = [p.grad.astype(np.float64) for p in params]
        opt.step()
        ref = [book.step(t, r, g, s) for r, g, s in zip(ref, grads_given, ref_state)]
        assert opt.step_count == t
        for i, (p, r) in enumerate(zip(params, ref)):
            assert p.value.dtype == dtype
            # per-step rounding of the parameter, at most one unit per step and term
            assert_close(p.value, r, dtype, np.abs(r) + 1.0, what=f"{name} step {t} param {i}")
            assert np.array_equal(p.grad, grads_given[i]), "step() modified grad"
        for st, rs in zip(opt.state, ref_state):
            assert set(st) == set(rs)
            for key in rs:
                assert_close(st[key], rs[key], dtype, np.abs(rs[key]) + 1e-3 * gscale,
                             what=f"{name} state {key} step {t}")


def test_optimizer_with_mixed_dtypes(backend, rng):
    params = [fp.Parameter(rng.standard_normal(4).astype(np.float32)),
              fp.Parameter(rng.standard_normal((2, 3)))]
    opt = optim.Adam(params, lr=0.05)
    book = TextbookAdam(0.05)
    ref = [p.value.astype(np.float64) for p in params]
    st = [{}, {}]
    for t, grads in enumerate(_grads(rng, [(4,), (2, 3)], 1.0), start=1):
        for p, g in zip(params, grads):
            p.grad[...] = g
        gg = [p.grad.astype(np.float64) for p in params]
        opt.step()
        ref = [book.step(t, r, g, s) for r, g, s in zip(ref, gg, st)]
    assert params[0].dtype == np.float32 and params[1].dtype == np.float64
    assert_close(params[0].value, ref[0], np.float32, np.abs(ref[0]) + 1)
    assert_close(params[1].value, ref[1], np.float64, np.abs(ref[1]) + 1)


def test_optimizer_accepts_a_module_and_zero_grad(backend, rng):
    model = fp.nn.Sequential(fp.nn.Dense(3, 2))
    opt = optim.SGD(model, lr=0.1)
    assert opt.params == model.parameters()
    for p in model.parameters():
        p.grad[...] = 1.0
    opt.zero_grad()
    assert not any(p.grad.any() for p in model.parameters())
    assert opt.lr == 0.1
    assert "SGD" in repr(opt)


def test_zero_lr_changes_nothing_but_state(backend, rng):
    params = _params(rng, np.float64)
    before = [p.value.copy() for p in params]
    opt = optim.Adam(params, lr=0.0)
    for p in params:
        p.grad[...] = 1.0
    opt.step()
    assert all(np.array_equal(p.value, b) for p, b in zip(params, before))
    assert opt.state[0]["exp_avg"].any()


def test_optimizer_by_name():
    ps = [fp.Parameter(np.zeros(2))]
    assert isinstance(optim.get("adam", ps), optim.Adam)
    assert isinstance(optim.get("SGD", ps), optim.SGD)
    assert optim.get("sgd", ps).lr == 0.01
    o = optim.RMSprop(ps)
    assert optim.get(o, ps) is o


# --------------------------------------------------------------------------- clipping
def test_clip_grad_norm_scales_as_pytorch(backend, dtype, rng):
    params = _params(rng, dtype)
    for p in params:
        p.grad[...] = 3 * rng.standard_normal(p.shape)
    g0 = [p.grad.astype(np.float64) for p in params]
    total = math.sqrt(sum(float((g ** 2).sum()) for g in g0))
    assert total > 1.0
    norm = fp.clip_grad_norm(params, 1.0)
    assert isinstance(norm, float)
    assert norm == pytest.approx(total, rel=1e-12)   # the norm before clipping
    coef = 1.0 / (total + 1e-6)                       # torch: max_norm / (norm + 1e-6)
    for p, g in zip(params, g0):
        assert_close(p.grad, g * coef, dtype, np.abs(g * coef))
    after = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in params))
    assert after == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_below_threshold_is_a_no_op(backend, dtype, rng):
    params = _params(rng, dtype)
    for p in params:
        p.grad[...] = 0.01 * rng.standard_normal(p.shape)
    before = [p.grad.copy() for p in params]
    norm = fp.clip_grad_norm(params, 10.0)
    expected = math.sqrt(sum(float((b.astype(np.float64) ** 2).sum()) for b in before))
    assert norm == pytest.approx(expected, rel=1e-12)
    assert all(np.array_equal(p.grad, b) for p, b in zip(params, before))


def test_clip_grad_norm_just_below_max_norm_scales_as_pytorch(backend, dtype):
    """PyTorch multiplies by min(1, max_norm / (norm + 1e-6)): a norm within 1e-6
    below max_norm is scaled too (grad [3, 4], max_norm 5: by 5 / (5 + 1e-6))."""
    p = fp.Parameter(np.zeros(2, dtype))
    p.grad[...] = [3.0, 4.0]
    assert fp.clip_grad_norm([p], 5.0) == pytest.approx(5.0)
    np.testing.assert_allclose(p.grad, np.array([3.0, 4.0]) * (5 / (5 + 1e-6)), rtol=1e-7)
    assert p.grad[0] < 3.0 and p.grad[1] < 4.0


def test_clip_grad_norm_mixed_dtypes_and_nonfinite(backend, rng):
    a = fp.Parameter(np.zeros(3, np.float32))
    b = fp.Parameter(np.zeros(2, np.float64))
    a.grad[...] = [3.0, 0.0, 0.0]
    b.grad[...] = [0.0, 4.0]
    assert fp.clip_grad_norm([a, b], 2.5) == pytest.approx(5.0, rel=1e-12)
    assert a.grad[0] == pytest.approx(1.5, rel=1e-6) and b.grad[1] == pytest.approx(2.0, rel=1e-6)
    b.grad[0] = np.inf
    before = a.grad.copy(), b.grad.copy()
    assert fp.clip_grad_norm([a, b], 1.0) == math.inf
    assert np.array_equal(a.grad, before[0]) and np.array_equal(b.grad, before[1])


@pytest.mark.parametrize("norm_type", [2.0, 3.0])
@pytest.mark.parametrize("mixed", [False, True])
def test_clip_grad_norm_of_finite_gradients_whose_squares_overflow(backend, norm_type, mixed):
    """float64 gradients of ~1e200 are finite, and so is their norm: it is clipped
    (the sum of squares overflowed to inf, so nothing was scaled and a clipped fit
    applied the whole update; PyTorch returns inf and scales by 0), also with
    error_if_nonfinite; an infinite gradient still gives an infinite norm."""
    a, b = fp.Parameter(np.zeros(3)), fp.Parameter(np.zeros(2))
    a.grad[...] = [3e200, 0.0, -1e200]
    b.grad[...] = [0.0, 4e200]
    params = [a, b]
    if mixed:  # (the reduction that is not the one-dtype fused call)
        c = fp.Parameter(np.zeros(1, np.float32))
        c.grad[...] = 1.0
        params.append(c)
    grads = [p.grad.copy() for p in params]
    true = sum(float(np.sum((np.abs(g, dtype=np.float64) / 1e200) ** norm_type)) for g in grads
               ) ** (1 / norm_type) * 1e200
    for error_if_nonfinite in (False, True):
        for p, g in zip(params, grads):
            p.grad[...] = g
        total = fp.clip_grad_norm(params, 1.0, norm_type, error_if_nonfinite)
        assert total == pytest.approx(true, rel=1e-12)
        for p, g in zip(params, grads):
            np.testing.assert_allclose(p.grad, g.astype(np.float64) / (true + 1e-6), rtol=1e-6,
                                       atol=1e-40)  # (float32: 0)
    b.grad[0] = np.inf
    before = [p.grad.copy() for p in params]
    assert fp.clip_grad_norm(params, 1.0, norm_type) == math.inf
    assert all(np.array_equal(p.grad, g) for p, g in zip(params, before))


def test_clip_grad_value(backend, dtype, rng):
    params = _params(rng, dtype)
    for p in params:
        p.grad[...] = 2 * rng.standard_normal(p.shape)
    before = [p.grad.copy() for p in params]
    assert fp.clip_grad_value(params, 0.5) is None
    for p, b in zip(params, before):
        assert np.array_equal(p.grad, np.clip(b, -0.5, 0.5))
        assert p.grad.dtype == dtype


# --------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("name,make,book,gscale", CASES, ids=CASE_IDS)
def test_state_dict_round_trip(backend, rng, name, make, book, gscale):
    params_a = _params(rng, np.float64)
    params_b = [fp.Parameter(p.value) for p in params_a]
    opt_a = make(params_a)
    grads = _grads(rng, SHAPES, gscale)
    for grads_t in grads[:2]:
        for p, g in zip(params_a, grads_t):
            p.grad[...] = g
        opt_a.step()
    sd = opt_a.state_dict()
    for pa, pb in zip(params_a, params_b):
        pb.value[...] = pa.value
    opt_b = make(params_b)
    opt_b.load_state_dict(sd)
    assert opt_b.step_count == 2
    # the state dict is a copy: scribbling on it changes neither optimizer
    for s in sd["state"]:
        for arr in s.values():
            arr[...] = 123.0
    for grads_t in grads[2:]:
        for pa, pb, g in zip(params_a, params_b, grads_t):
            pa.grad[...] = g
            pb.grad[...] = g
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(params_a, params_b):
        assert np.array_equal(pa.value, pb.value)
    assert snapshot(optimizer=opt_a) == snapshot(optimizer=opt_b)


def test_load_state_dict_rejects_other_optimizer_and_keeps_state(backend, rng):
    params = _params(rng, np.float32)
    adam = optim.Adam(params)
    for p in params:
        p.grad[...] = 1.0
    adam.step()
    before = snapshot(optimizer=adam)
    sgd_sd = optim.SGD(params, lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match="SGD"):
        adam.load_state_dict(sgd_sd)
    bad = adam.state_dict()
    bad["state"][1]["exp_avg"] = np.zeros((7, 7))
    with pytest.raises(ValueError, match="shape"):
        adam.load_state_dict(bad)
    bad = adam.state_dict()
    bad["state"] = bad["state"][:1]
    with pytest.raises(ValueError, match="parameters"):
        adam.load_state_dict(bad)
    assert snapshot(optimizer=adam) == before


def test_setting_a_hyperparameter_takes_effect_and_is_validated(backend):
    """A learning-rate schedule written as ``opt.lr = ...`` changes the next step."""
    p = fp.Parameter(np.ones(3))
    opt = optim.SGD([p], lr=0.1)
    p.grad[...] = 1.0
    opt.lr = 0.5
    opt.step()
    np.testing.assert_array_equal(p.value, np.full(3, 0.5))
    assert opt.lr == 0.5 and opt.hyper["lr"] == 0.5
    with pytest.raises(ValueError, match=r"Invalid lr: -1"):
        opt.lr = -1
    assert opt.lr == 0.5
    adam = optim.Adam([p])
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1"):
        adam.betas = (0.9, 1.0)
    sgd = optim.SGD([p], lr=0.1)
    sgd.momentum = 0.9          # switching momentum on creates its buffer
    sgd.step()
    assert "momentum_buffer" in sgd.state[0]


@pytest.mark.parametrize("make", [lambda p: optim.SGD(p, lr=0.1, momentum=0.9),
                                  lambda p: optim.RMSprop(p, lr=0.1, momentum=0.5)],
                         ids=["sgd", "rmsprop"])
def test_state_dict_round_trip_after_momentum_is_switched_off(backend, make):
    """Momentum set to 0 mid-training keeps its buffer (as in PyTorch); the optimizer's
    own state_dict must still load, and training then continues identically."""
    p, q = fp.Parameter(np.ones(3)), fp.Parameter(np.ones(3))
    a, b = make([p]), make([q])
    for opt, par in ((a, p), (b, q)):
        par.grad[...] = 1.0
        opt.step()
        opt.momentum = 0.0
        opt.step()
    b.load_state_dict(a.state_dict())
    assert "momentum_buffer" in b.state[0]
    for opt in (a, b):
        opt.momentum = 0.9
        opt.step()
    np.testing.assert_array_equal(p.value, q.value)
    np.testing.assert_array_equal(a.state[0]["momentum_buffer"], b.state[0]["momentum_buffer"])


def test_load_state_dict_rejects_invalid_hyperparameters():
    p = fp.Parameter(np.ones(3))
    opt = optim.Adam([p], lr=0.01)
    sd = opt.state_dict()
    sd["hyper"]["lr"] = -0.5
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.load_state_dict(sd)
    assert opt.lr == 0.01


@pytest.mark.parametrize("name,make,book,gscale", CASES, ids=CASE_IDS)
def test_fused_native_update_matches_reference_for_20_steps(name, make, book, gscale, dtype):
    """The native multi-tensor kernel (every parameter in one call) and the NumPy
    reference backend agree over 20 steps, on tensors big enough to be split across
    threads mid-tensor (300k elements in all)."""
    from conftest import NATIVE_BUILT
    if not NATIVE_BUILT:
        pytest.skip("fastprop._native is not built")
    rng = np.random.default_rng(7)
    shapes = [(300, 700), (700,), (3, 5), (89_000,), (1,)]
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[gscale * rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(20)]
    finals = []
    for backend in ("native", "numpy"):
        params = [fp.Parameter(a) for a in init]
        opt = make(params)
        with fp.use_backend(backend):
            for g in grads:
                for p, gi in zip(params, g):
                    p.grad[...] = gi
                opt.step()
        finals.append((params, opt))
    # float32: the kernels may contract a*b + c into an FMA, so rounding differs from
    # NumPy's; over 20 momentum-accumulated steps that is ~1e-6 of the parameters'
    # total movement (~1), hence the absolute term.
    rtol, atol = (2e-5, 1e-5) if dtype == np.float32 else (1e-11, 1e-13)
    for p, q in zip(finals[0][0], finals[1][0]):
        np.testing.assert_allclose(p.value, q.value, rtol=rtol, atol=atol)
    for s, r in zip(finals[0][1].state, finals[1][1].state):
        for k in s:
            np.testing.assert_allclose(s[k], r[k], rtol=rtol, atol=atol)


@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_fused_clip_grad_norm_matches_reference(max_norm, dtype):
    from conftest import NATIVE_BUILT
    if not NATIVE_BUILT:
        pytest.skip("fastprop._native is not built")
    rng = np.random.default_rng(3)
    shapes = [(400, 500), (7,), (90_000,)]
    grads = [rng.standard_normal(s).astype(dtype) * 0.01 for s in shapes]
    results = []
    for backend in ("native", "numpy"):
        params = [fp.Parameter(np.zeros(s, dtype)) for s in shapes]
        for p, g in zip(params, grads):
            p.grad[...] = g
        with fp.use_backend(backend):
            norm = fp.clip_grad_norm(params, max_norm)
        results.append((norm, [p.grad.copy() for p in params]))
    exact = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    assert results[0][0] == pytest.approx(exact, rel=1e-12)
    assert results[1][0] == pytest.approx(exact, rel=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-6 if dtype == np.float32 else 1e-14)
    if max_norm < exact:
        clipped = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in results[0][1]))
        assert clipped == pytest.approx(max_norm, rel=1e-5)


@pytest.mark.parametrize("make", [lambda ps: optim.Adam(ps, lr=1e-3),
                                  lambda ps: optim.SGD(ps, lr=1e-3, momentum=0.5),
                                  lambda ps: optim.RMSprop(ps, lr=1e-3, momentum=0.5)],
                         ids=["adam", "sgd-momentum", "rmsprop-momentum"])
def test_native_state_never_goes_subnormal(make):
    """A gradient that stays 0 (a dead ReLU unit) decays the optimizer state
    geometrically; the native kernels store values below the smallest normal as 0
    (subnormal arithmetic made the Adam update 2.4x slower), and the parameters still
    match the reference backend."""
    from conftest import NATIVE_BUILT
    if not NATIVE_BUILT:
        pytest.skip("fastprop._native is not built")
    finals = []
    for backend in ("native", "numpy"):
        p = fp.Parameter(np.linspace(-1, 1, 64, dtype=np.float32))
        opt = make([p])
        with fp.use_backend(backend):
            p.grad[...] = 1.0
            opt.step()
            p.grad[...] = 0.0
            for _ in range(1500):     # 0.5^1500 and 0.9^1500 are far below 1e-38
                opt.step()
        finals.append((p.value.copy(), opt.state[0]))
    tiny = np.finfo(np.float32).tiny
    for arr in finals[0][1].values():
        assert not np.any((arr != 0) & (np.abs(arr) < tiny))
    np.testing.assert_allclose(finals[0][0], finals[1][0], rtol=1e-5, atol=1e-6)


UPDATES = {  # the backend kernels, with a state list per state array
    "adam": (2, lambda be, p, g, st, step: be.adam_update(p, g, st[0], st[1], step, 1e-3, 0.9,
                                                           0.999, 1e-8, 0.0, False)),
    "adam-l2": (2, lambda be, p, g, st, step: be.adam_update(p, g, st[0], st[1], step, 1e-3,
                                                              0.9, 0.999, 1e-8, 1e-2, False)),
    "adamw": (2, lambda be, p, g, st, step: be.adam_update(p, g, st[0], st[1], step, 1e-3, 0.9,
                                                            0.999, 1e-8, 1e-2, True)),
    "sgd-nesterov-wd": (1, lambda be, p, g, st, step: be.sgd_update(p, g, st[0], 0.1, 0.9, True,
                                                                    1e-2, step == 1)),
    "rmsprop-momentum": (2, lambda be, p, g, st, step: be.rmsprop_update(
        p, g, st[0], st[1], 1e-2, 0.99, 1e-8, 0.5, 1e-2)),
    "adagrad": (1, lambda be, p, g, st, step: be.adagrad_update(p, g, st[0], 0.1, 1e-10, 1e-2)),
}


@pytest.mark.parametrize("name", list(UPDATES))
def test_update_bits_do_not_depend_on_memory_layout(backend, dtype, name):
    """The same values give the same bits wherever the arrays lie: the compiler's
    vector and scalar copies of a loop (chosen by alias checks and alignment) must
    round alike (AdamW differed by 1 ulp when p, grad and state lay back to back)."""
    import fastprop.backends as backends_mod
    be = backends_mod.current()
    nstate, update = UPDATES[name]
    for size in range(1, 25):
        r = np.random.default_rng(size)
        vals = [r.standard_normal(size) * 0.05, r.standard_normal(size) * 0.1] + [
            r.random(size) * 0.01 for _ in range(nstate)]
        results = []
        for layout in ("apart", "adjacent", "shifted"):
            k = 2 + nstate
            if layout == "apart":
                arrays = [np.zeros(size + 1024, dtype)[:size] for _ in range(k)]
            else:
                off = 1 if layout == "shifted" else 0
                buf = np.zeros(k * size + off, dtype)
                arrays = [buf[off + i * size:off + (i + 1) * size] for i in range(k)]
            for a, v in zip(arrays, vals):
                a[...] = v
            p, g, *st = arrays
            for step in (1, 2, 3):
                update(be, [p], [g], [[x] for x in st], step)
            results.append(np.concatenate([p] + st).tobytes())
        assert results[0] == results[1] == results[2], (name, size)


# ------------------------------------------------------------------ parameter groups
def _groups_model(seed=0):
    return fp.nn.Sequential(fp.nn.Dense(5, 7, "tanh", rng=seed, dtype=np.float64),
                            fp.nn.Dense(7, 3, rng=seed + 1, dtype=np.float64))


def _grads_step(model, X, Y):
    model.zero_grad()
    out = model(X)
    model.backward(2 * (out - Y) / out.size)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_param_groups_equal_one_optimizer_per_group(backend, name, rng):
    """PyTorch-style groups (weights decayed, biases not, another lr for the last
    layer) give the same parameters, bit for bit, as one optimizer per group."""
    cls = getattr(optim, name)
    kw = {"lr": 0.05, "momentum": 0.9} if name in ("SGD", "RMSprop") else {"lr": 0.05}
    X, Y = rng.standard_normal((8, 5)), rng.standard_normal((8, 3))
    a, b = _groups_model(), _groups_model()
    wa = [a[0].weight, a[1].weight]
    opt = cls([{"params": wa, "weight_decay": 0.1},
               {"params": [a[0].bias]},
               {"params": [a[1].bias], "lr": 0.2}], **kw)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0 if name != "AdamW" else 0.01, opt.hyper["weight_decay"]]
    assert opt.param_groups[2]["lr"] == 0.2 and opt.param_groups[0]["params"] == wa
    separate = [cls([b[0].weight, b[1].weight], **{**kw, "weight_decay": 0.1}),
                cls([b[0].bias], **kw), cls([b[1].bias], **{**kw, "lr": 0.2})]
    for _ in range(4):
        _grads_step(a, X, Y)
        opt.step()
        _grads_step(b, X, Y)
        for o in separate:
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p.value, q.value)


def _torch_step(topt, tw, tx, ty):
    """One step of _groups_model's twin in torch (weights (out, in)) on the MSE."""
    topt.zero_grad()
    out = (tx @ tw[0].T + tw[1]).tanh() @ tw[2].T + tw[3]
    ((out - ty) ** 2).mean().backward()
    topt.step()


def _torch_twin(torch, model):
    """The model's parameters as torch leaves (weights transposed to (out, in))."""
    return [torch.tensor(p.value.T.copy() if p.value.ndim == 2 else p.value.copy(),
                         requires_grad=True) for p in model.parameters()]


def _train_both(torch, model, opt, topt, tw, X, Y, steps):
    """``steps`` MSE steps of the model (backward, opt.step) and of its torch twin."""
    tx, ty = torch.tensor(X), torch.tensor(Y)
    for _ in range(steps):
        _grads_step(model, X, Y)
        opt.step()
        _torch_step(topt, tw, tx, ty)


def _assert_matches_torch(model, tw, rtol, atol):
    for p, t in zip(model.parameters(), tw):
        ref = t.detach().numpy()
        np.testing.assert_allclose(p.value, ref.T if p.value.ndim == 2 else ref,
                                   rtol=rtol, atol=atol)


def test_param_groups_match_torch_adamw(rng):
    torch = pytest.importorskip("torch")
    X, Y = rng.standard_normal((8, 5)), rng.standard_normal((8, 3))
    model = _groups_model()
    opt = optim.AdamW([{"params": [model[0].weight, model[1].weight]},
                       {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0}],
                      lr=0.01, weight_decay=0.1)
    tw = _torch_twin(torch, model)
    topt = torch.optim.AdamW([{"params": [tw[0], tw[2]]},
                              {"params": [tw[1], tw[3]], "weight_decay": 0.0}],
                             lr=0.01, weight_decay=0.1)
    _train_both(torch, model, opt, topt, tw, X, Y, 5)
    _assert_matches_torch(model, tw, rtol=1e-12, atol=1e-14)


def test_param_group_changes_are_checked_and_used(backend, rng):
    """A group's value changed in param_groups is used from the next step; a bad one
    is refused by that step with nothing changed; opt.lr sets every group; the
    compiled step runs fused while the groups agree (a torch-style schedule writing
    every group's lr) and takes the layer path, with the same results, when not."""
    X, Y = rng.standard_normal((12, 5)), rng.standard_normal((12, 3))
    runs = []
    for fused in (True, False):
        model = _groups_model()
        opt = optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters()}],
                        lr=0.1)
        step = model.compile("mse", opt)
        if not fused:
            step.fused = lambda: None
        for i in range(6):
            for g in opt.param_groups:
                g["lr"] = 0.1 * 0.5 ** i           # a schedule, as in PyTorch
            if i == 4:
                opt.param_groups[1]["lr"] = 0.3    # the groups now differ
            step(X, Y)
        runs.append(model)
    for p, q in zip(*[m.parameters() for m in runs]):
        np.testing.assert_allclose(p.value, q.value, rtol=1e-13, atol=1e-15)
    model = runs[0]
    opt = optim.Adam([{"params": model[0].parameters()}, {"params": model[1].parameters()}])
    opt.lr = 0.5
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
    _grads_step(model, X, Y)
    opt.step()
    before = snapshot(model, opt)
    opt.param_groups[1]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="beta"):
        opt.step()
    assert snapshot(model, opt) == before
    opt.param_groups[1]["betas"] = [0.8, 0.99]
    opt.step()
    assert opt.param_groups[1]["betas"] == (0.8, 0.99)


def test_param_groups_state_dict_and_bad_groups(rng):
    model = _groups_model()
    groups = [{"params": model[0].parameters(), "lr": 0.5}, {"params": model[1].parameters()}]
    opt = optim.Adam(groups, lr=0.01)
    X, Y = rng.standard_normal((8, 5)), rng.standard_normal((8, 3))
    _grads_step(model, X, Y)
    opt.step()
    sd = opt.state_dict()
    assert [g["lr"] for g in sd["param_groups"]] == [0.5, 0.01]
    other = optim.Adam([{"params": model[0].parameters()}, {"params": model[1].parameters()}])
    other.load_state_dict(sd)
    assert [g["lr"] for g in other.param_groups] == [0.5, 0.01] and other.step_count == 1
    one = optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="2 parameter groups, the optimizer 1"):
        one.load_state_dict(sd)
    with pytest.raises(ValueError, match="unknown hyperparameters \\['momentum'\\]"):
        optim.Adam([{"params": model.parameters(), "momentum": 0.9}])
    with pytest.raises(ValueError, match="no 'params'"):
        optim.Adam([{"lr": 0.1}])
    with pytest.raises(ValueError, match="more than once"):
        optim.Adam([{"params": model.parameters()}, {"params": model[0].parameters()}])
    with pytest.raises(ValueError, match="lr"):
        optim.SGD([{"params": model.parameters(), "lr": -1.0}], lr=0.1)


def _full_and_resumed(run, tmp_path):
    """run(epochs, path, resume) -> (model, optimizer): 4 epochs straight, and 2 then
    resumed to 4; asserts the two end bit-identical; returns the resumed optimizer."""
    full, _ = run(4, tmp_path / "a.ckpt", False)
    run(2, tmp_path / "b.ckpt", False)
    resumed, opt = run(4, tmp_path / "b.ckpt", True)
    for p, q in zip(full.parameters(), resumed.parameters()):
        np.testing.assert_array_equal(p.value, q.value)
    return opt


def test_fit_resumes_with_param_groups_bit_identical(rng, tmp_path):
    X = rng.standard_normal((40, 5))
    y = np.arange(40) % 3

    def run(epochs, path, resume):
        model = _groups_model()
        opt = optim.AdamW([{"params": [model[0].weight, model[1].weight]},
                           {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0,
                            "lr": 0.02}], lr=0.01)
        model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=epochs, batch_size=8,
                  seed=1, verbose=0, checkpoint=path, resume=resume)
        return model, opt

    opt = _full_and_resumed(run, tmp_path)
    assert opt.param_groups[1]["lr"] == 0.02


@pytest.mark.parametrize("name", ["SGD", "RMSprop"])
def test_param_groups_hyper_writes_reach_the_fused_step_and_opt_lr_follows(name, rng):
    """opt.hyper["momentum"] = 0.9 written directly reaches the fused step (it bound no
    momentum buffer); a group's lr set after opt.lr = x is kept; a schedule writing
    every group's lr is seen in opt.lr on the layer path too (opt.lr *= 0.5 decays)."""
    X, Y = rng.standard_normal((12, 5)), rng.standard_normal((12, 3))
    runs = []
    for fused in (True, False):
        model = _groups_model()
        opt = getattr(optim, name)([{"params": model[0].parameters()},
                                    {"params": model[1].parameters()}], lr=0.01)
        step = model.compile("mse", opt)
        if not fused:
            step.fused = lambda: None
        step(X, Y)
        opt.hyper["momentum"] = 0.9
        for _ in range(3):
            step(X, Y)
        for g in opt.param_groups:
            g["lr"] = 0.02
        step(X, Y)
        assert opt.lr == 0.02
        opt.lr *= 0.5
        assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
        opt.param_groups[1]["lr"] = 0.05
        step(X, Y)
        assert [g["lr"] for g in opt.param_groups] == [0.01, 0.05]
        runs.append(model)
    for p, q in zip(*[m.parameters() for m in runs]):
        np.testing.assert_allclose(p.value, q.value, rtol=1e-13, atol=1e-15)


def test_param_groups_refusals(rng):
    """opt.momentum = 0 is refused while a group uses Nesterov (nothing changes); a
    state_dict from before groups (one group) is refused by a two-group optimizer;
    groups may come from a generator."""
    model = _groups_model()
    opt = optim.SGD([{"params": model[0].parameters(), "nesterov": True},
                     {"params": model[1].parameters()}], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="Nesterov"):
        opt.momentum = 0.0
    assert opt.momentum == 0.9 and [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]
    old = optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()
    old.pop("param_groups")
    with pytest.raises(ValueError, match="no parameter groups"):
        opt.load_state_dict(old)
    gen = optim.Adam({"params": m.parameters()} for m in model)
    assert len(gen.param_groups) == 2 and "2 parameter groups" in repr(gen)


# ------------------------------------------- per-parameter step counts, add_param_group
def _mse_step(model, step, X, Y, opts):
    """One step: the compiled step when given, else backward and every optimizer."""
    if step is not None:
        return step(X, Y)
    _grads_step(model, X, Y)
    for o in opts:
        o.step()


def _twin_steps(n, a, step, opt, b, refs, X, Y):
    """n steps of model a (its compiled step, or its optimizer) and of its twin b
    (backward, then each of the reference optimizers)."""
    for _ in range(n):
        _mse_step(a, step, X, Y, [opt])
        _grads_step(b, X, Y)
        for r in refs:
            r.step()


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "layers"])
def test_unfrozen_layer_counts_its_own_steps(backend, name, compiled, rng):
    """As in PyTorch, a parameter counts its own steps: a layer frozen for 3 steps and
    then unfrozen takes its first update with Adam's bias corrections of step 1, as
    an optimizer made for it at that point would (PyTorch's per-parameter 'step').
    The compiled step (fused on native, with the frozen steps taken on the layer
    path) agrees.  With the optimizer's count instead (step 4) the first update of
    the unfrozen layer is ~2.9x too large and this fails."""
    cls = getattr(optim, name)
    kw = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 0.05}
    X, Y = rng.standard_normal((12, 5)), rng.standard_normal((12, 3))
    a, b = _groups_model(), _groups_model()
    opt = cls(a.parameters(), **kw)
    step = a.compile("mse", opt) if compiled else None
    a[0].requires_grad_(False)
    head = cls(b[1].parameters(), **kw)
    _twin_steps(3, a, step, opt, b, [head], X, Y)
    a[0].requires_grad_(True)
    body = cls(b[0].parameters(), **kw)  # (PyTorch: its step counts start now)
    _twin_steps(4, a, step, opt, b, [head, body], X, Y)
    if compiled and backend == "native":
        assert step._fast is not None  # (the fused kernel ran the last steps)
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(p.value, q.value, rtol=1e-12, atol=1e-14)
    assert opt.step_count == 7
    assert opt.state_dict()["steps"] == [4, 4, 7, 7]


def test_own_step_counts_survive_state_dict_and_checkpoint(rng, tmp_path):
    """state_dict carries each parameter's count ("steps"); a state_dict without it
    (older) means every parameter took every step; bad counts are refused with
    nothing changed; a resumed fit with a layer frozen for a while then trained ends
    bit-identical to an uninterrupted one."""
    X, Y = rng.standard_normal((8, 5)), rng.standard_normal((8, 3))
    model = _groups_model()
    opt = optim.Adam(model.parameters(), lr=0.05)
    model[1].requires_grad_(False)
    for _ in range(2):
        _grads_step(model, X, Y)
        opt.step()
    model[1].requires_grad_(True)
    _grads_step(model, X, Y)
    opt.step()
    sd = opt.state_dict()
    assert sd["step"] == 3 and sd["steps"] == [3, 3, 1, 1]
    twin = _groups_model()
    for p, q in zip(twin.parameters(), model.parameters()):
        p.value = q.value
    other = optim.Adam(twin.parameters(), lr=0.05)
    other.load_state_dict(sd)
    for m, o in ((model, opt), (twin, other)):
        _grads_step(m, X, Y)
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        np.testing.assert_array_equal(p.value, q.value)
    old = dict(sd)
    old.pop("steps")
    other.load_state_dict(old)
    assert other.state_dict()["steps"] == [3, 3, 3, 3]
    before = snapshot(twin, other)
    for bad in ([3, 3, 4, 1], [3, 3, 1], [3, 3, -1, 1], "x"):
        with pytest.raises(ValueError, match="step count"):
            other.load_state_dict({**sd, "steps": bad})
        assert snapshot(twin, other) == before

    Xc = rng.standard_normal((40, 5))
    yc = np.arange(40) % 3

    def run(epochs, path, resume):
        m = _groups_model()
        o = optim.Adam(m.parameters(), lr=0.02)
        if not resume:  # a head trained alone first: its body's count lags 5 steps
            m[0].requires_grad_(False)
            m.fit(Xc, yc, loss="cross_entropy", optimizer=o, epochs=1, batch_size=8,
                  verbose=0, shuffle=False)
            m[0].requires_grad_(True)
        else:
            m.fit(Xc, yc, loss="cross_entropy", optimizer=o, epochs=1, batch_size=8,
                  verbose=0, shuffle=False)
        m.fit(Xc, yc, loss="cross_entropy", optimizer=o, epochs=epochs, batch_size=8,
              seed=1, verbose=0, checkpoint=path, resume=resume)
        return m, o

    o = _full_and_resumed(run, tmp_path)
    assert o.state_dict()["steps"] == [20, 20, 25, 25]  # (the lag came from the checkpoint)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "layers"])
def test_add_param_group_as_pytorch(backend, compiled, rng):
    """add_param_group adds layers to train later, each new parameter starting with no
    state and its own count at 0, hyperparameters not given taken from the
    constructor's (defaults, not a later opt.lr = x): the same parameters as a
    separate optimizer made for them at that point.  The compiled step picks the new
    group up (fused on native when the groups agree)."""
    X, Y = rng.standard_normal((12, 5)), rng.standard_normal((12, 3))
    for given in (None, 0.03):  # lr from defaults (0.05: layer path), the head's (fused)
        a, b = _groups_model(), _groups_model()
        opt = optim.Adam(a[1].parameters(), lr=0.05, betas=(0.8, 0.99))
        opt.lr = 0.03  # (a schedule's write: not a default for a new group)
        step = a.compile("mse", opt) if compiled else None
        head = optim.Adam(b[1].parameters(), lr=0.03, betas=(0.8, 0.99))
        w0 = a[0].weight.value.copy()
        _twin_steps(3, a, step, opt, b, [head], X, Y)
        np.testing.assert_array_equal(a[0].weight.value, w0)  # not in the optimizer
        group = {"params": a[0].parameters()}
        if given is not None:
            group["lr"] = given
        opt.add_param_group(group)
        lr = 0.05 if given is None else given
        assert opt.param_groups[1]["betas"] == (0.8, 0.99) and opt.param_groups[1]["lr"] == lr
        body = optim.Adam(b[0].parameters(), lr=lr, betas=(0.8, 0.99))
        _twin_steps(3, a, step, opt, b, [head, body], X, Y)
        if compiled and backend == "native":
            assert (step._group_gate(step.fused()) is not None) == (given is not None)
        for p, q in zip(a.parameters(), b.parameters()):
            np.testing.assert_allclose(p.value, q.value, rtol=1e-12, atol=1e-14)
        assert opt.state_dict()["steps"] == [6, 6, 3, 3]


def test_add_param_group_refusals_change_nothing(rng):
    model = _groups_model()
    opt = optim.SGD(model[1].parameters(), lr=0.1, momentum=0.9)
    extra = fp.Parameter(np.ones(3))
    before = (list(opt.params), len(opt.param_groups), opt.state_dict()["steps"])
    for group, exc, match in (
            ({"params": model[1].parameters()}, ValueError, "more than one parameter group"),
            ({"params": [extra, model[1].bias]}, ValueError, "more than one parameter group"),
            ({"params": model[0].parameters(), "momentum": -1.0}, ValueError, "momentum"),
            ({"params": model[0].parameters(), "betas": (0.9, 0.9)}, ValueError, "unknown"),
            ({"lr": 0.1}, ValueError, "no 'params'"),
            ([{"params": model[0].parameters()}], TypeError, "dict"),
            ({"params": [model[0].weight, model[0].weight]}, ValueError, "more than once"),
            ({"params": [1.0]}, TypeError, "Parameter")):
        with pytest.raises(exc, match=match):
            opt.add_param_group(group)
        assert (opt.params, len(opt.param_groups), opt.state_dict()["steps"]) == before
    opt.add_param_group({"params": extra, "nesterov": True})  # (a single Parameter)
    assert opt.param_groups[1]["params"] == [extra] and opt.param_groups[1]["nesterov"]
    assert opt.params[-1] is extra and opt.defaults["nesterov"] is False


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "layers"])
def test_unfreeze_and_add_param_group_match_torch(compiled, rng):
    """Freeze, unfreeze and add_param_group against PyTorch's Adam itself."""
    torch = pytest.importorskip("torch")
    X, Y = rng.standard_normal((8, 5)), rng.standard_normal((8, 3))
    model = _groups_model()
    extra = _groups_model(seed=7)[1]  # a layer added to the optimizer later (unused)
    opt = optim.Adam(model.parameters(), lr=0.01)
    step = model.compile("mse", opt) if compiled else None
    tw = _torch_twin(torch, model)
    te = [torch.tensor(p.value.copy(), requires_grad=True) for p in extra.parameters()]
    topt = torch.optim.Adam(tw, lr=0.01)
    tx, ty = torch.tensor(X), torch.tensor(Y)
    for i in range(8):
        frozen = 1 <= i < 4
        model[0].requires_grad_(not frozen)
        for t in tw[:2]:
            t.requires_grad_(not frozen)
        if i == 5:
            opt.add_param_group({"params": extra.parameters(), "lr": 0.02})
            topt.add_param_group({"params": te, "lr": 0.02})
        if step is not None:
            step(X, Y)
        else:
            _grads_step(model, X, Y)
            opt.step()
        _torch_step(topt, tw, tx, ty)
    _assert_matches_torch(model, tw, rtol=1e-11, atol=1e-13)
    assert [int(topt.state[t]["step"]) for t in tw] == opt.state_dict()["steps"][:4]


def test_an_optimizer_written_before_own_step_counts_still_works(rng):
    """A user's optimizer whose _update has the older signature (no step: it reads
    self.step_count) still runs; a step whose update raises leaves the counts as they
    were; an optimizer pickled before `defaults` existed answers with its current
    values."""
    import pickle

    class Old(optim.Optimizer):
        def __init__(self, params, lr=0.1):
            super().__init__(params, lr=lr)

        def _update(self, be, params, grads, states, h):
            for p, g in zip(params, grads):
                p -= h["lr"] * self.step_count * g

    p = fp.Parameter(np.ones(3))
    frozen = fp.Parameter(np.ones(2))
    frozen.requires_grad = False
    opt = Old([p, frozen])
    p.grad[...] = 1.0
    opt.step()
    opt.step()
    np.testing.assert_allclose(p.value, 1 - 0.1 * (1 + 2))
    assert opt.state_dict()["steps"] == [2, 0]

    class Broken(Old):
        def _update(self, be, params, grads, states, h, step):
            raise RuntimeError("kernel refused")

    bad = Broken([p, frozen])
    with pytest.raises(RuntimeError):
        bad.step()
    assert bad.step_count == 0 and bad.state_dict()["steps"] == [0, 0]

    adam = optim.Adam([p], lr=0.01)
    state = adam.__dict__.copy()
    del state["defaults"]
    old = object.__new__(optim.Adam)
    old.__dict__.update(state)
    old.lr = 0.5
    assert old.defaults["lr"] == 0.5  # (the constructor's values are gone)
    assert pickle.loads(pickle.dumps(adam)).defaults == adam.defaults


def test_values_a_schedule_sets_are_checked_cheaply_and_still_refused():
    """lr, betas, eps, weight_decay and alpha set between steps (a per-batch schedule)
    are checked alone, as the constructor checks them (bad values refused with nothing
    changed, betas normalised to a tuple); a user's subclass with its own rule for lr
    still has every value checked by its constructor."""
    model = fp.nn.Dense(3, 1, rng=0)
    p = model.weight
    opt = optim.Adam([{"params": model.parameters()}], lr=0.1)
    p.grad[...] = 1.0
    opt.step()
    opt.lr = 0.05
    opt.param_groups[0]["betas"] = [0.8, 0.9]
    opt.step()
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.lr == 0.05
    before = snapshot(model, opt)
    for key, bad, exc in (("lr", -1.0, ValueError), ("betas", (0.9, 1.0), ValueError),
                          ("eps", "x", TypeError), ("weight_decay", float("nan"), ValueError)):
        old = opt.param_groups[0][key]
        opt.param_groups[0][key] = bad
        with pytest.raises(exc):
            opt.step()
        opt.param_groups[0][key] = old
        with pytest.raises(exc):
            setattr(opt, key, bad)
        assert snapshot(model, opt) == before

    class Capped(optim.SGD):
        def __init__(self, params, lr, **kw):
            if lr > 1:
                raise ValueError("Capped: lr must be <= 1")
            super().__init__(params, lr=lr, **kw)

    capped = Capped([p], lr=0.5)
    with pytest.raises(ValueError, match="Capped"):
        capped.lr = 2.0
    capped.param_groups[0]["lr"] = 3.0
    with pytest.raises(ValueError, match="Capped"):
        capped.step()


def test_group_values_of_other_types_are_checked_and_old_update_signatures():
    """A group value equal to the checked one but of another type (True for 1.0, a 0-d
    array) is checked again (a bool lr refused), an array of betas is a TypeError as
    in the constructor; an _update of the older signature is told by its positional
    parameters, whatever their names."""
    model = fp.nn.Dense(2, 1, rng=0)
    opt = optim.SGD(model.parameters(), lr=1.0)
    opt.step()
    opt.param_groups[0]["lr"] = True
    with pytest.raises(TypeError, match="lr"):
        opt.step()
    opt.param_groups[0]["lr"] = np.array(0.5)
    with pytest.raises(TypeError, match="lr"):
        opt.step()
    opt.param_groups[0]["lr"] = 0.5
    adam = optim.Adam(model.parameters())
    adam.step()
    adam.param_groups[0]["betas"] = np.array([0.9, 0.99])
    with pytest.raises(TypeError, match="betas"):
        adam.step()

    class OldNames(optim.Optimizer):
        def __init__(self, params, lr=0.1):
            super().__init__(params, lr=lr)

        def _update(self, be, ps, gs, st, hyper, t):  # (the new signature, other names)
            for p, g in zip(ps, gs):
                p -= hyper["lr"] * t * g

    p = fp.Parameter(np.ones(2))
    p.grad[...] = 1.0
    o = OldNames([p])
    o.step()
    o.step()
    np.testing.assert_allclose(p.value, 1 - 0.1 * (1 + 2))
    assert [n for n, _ in fp.nn.Sequential(fp.nn.Dense(2, 2)).named_modules()] == ["", "1"]



@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_amsgrad_as_torch_fused_fallback_and_old_state_dicts(name, rng, peer):
    """Adam/AdamW(amsgrad=True): the compiled step takes the layer path (no kernel
    keeps the maximum) with the same results; a state_dict from before the option
    loads as amsgrad=False; against torch's when installed."""
    X, Y = rng.standard_normal((12, 5)), rng.standard_normal((12, 3))
    cls = getattr(optim, name)
    runs = []
    for fused in (True, False):
        model = _groups_model()
        opt = cls(model.parameters(), lr=0.05, weight_decay=0.1, amsgrad=True)
        step = model.compile("mse", opt)
        if not fused:
            step.fused = lambda: None
        for _ in range(6):
            step(X, Y)
        assert step._group_gate(step.fused()) is None
        runs.append((model, opt))
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        np.testing.assert_array_equal(p.value, q.value)
    opt = runs[0][1]
    assert set(opt.state[0]) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    old = optim.Adam(_groups_model().parameters()).state_dict()
    old["hyper"].pop("amsgrad")
    for g in old["param_groups"]:
        g.pop("amsgrad")
    fresh = optim.Adam(_groups_model().parameters(), amsgrad=True)
    fresh.load_state_dict(old)
    assert fresh.amsgrad is False and fresh.param_groups[0]["amsgrad"] is False
    with pytest.raises(TypeError, match="amsgrad"):
        optim.Adam(_groups_model().parameters(), amsgrad=1)
    if peer is None:
        return
    torch = peer
    model = _groups_model()
    opt = cls(model.parameters(), lr=0.05, weight_decay=0.1, amsgrad=True)
    tw = _torch_twin(torch, model)
    topt = getattr(torch.optim, name)(tw, lr=0.05, weight_decay=0.1, amsgrad=True)
    _train_both(torch, model, opt, topt, tw, X, Y, 6)
    _assert_matches_torch(model, tw, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf, "inf"])
def test_clip_grad_norm_types_as_torch(backend, rng, norm_type, peer):
    """clip_grad_norm(_) with norm_type 1, 2, 3 and inf: the total norm of the
    per-element magnitudes over every (unfrozen) gradient, the scale min(1, max /
    (norm + 1e-6)); error_if_nonfinite raises NonFiniteError with nothing changed;
    against torch.nn.utils.clip_grad_norm_ when installed."""
    grads = [rng.standard_normal((4, 3)), rng.standard_normal(5)]
    params = [fp.Parameter(np.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad[...] = g
    flat = np.concatenate([g.ravel() for g in grads])
    order = math.inf if norm_type == "inf" else norm_type
    want = np.abs(flat).max() if math.isinf(order) else (np.abs(flat) ** order).sum() ** (1 / order)
    got = fp.clip_grad_norm_(params, 0.5, norm_type=norm_type)
    assert got == pytest.approx(want, rel=1e-12)
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.grad, g * min(1.0, 0.5 / (want + 1e-6)), rtol=1e-12)
    params[1].grad[0] = np.nan
    before = [p.grad.copy() for p in params]
    with pytest.raises(fp.NonFiniteError, match="non-finite"):
        fp.clip_grad_norm(params, 0.5, norm_type=norm_type, error_if_nonfinite=True)
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p.grad, b)
    with pytest.raises(ValueError, match="norm_type"):
        fp.clip_grad_norm(params, 0.5, norm_type=0)
    if peer is None:
        return
    torch = peer
    ts = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for t, g in zip(ts, grads):
        t.grad = torch.tensor(g)
    assert torch.nn.utils.clip_grad_norm_(ts, 0.5, norm_type=norm_type).item() == \
        pytest.approx(want, rel=1e-12)
    for p, g, t in zip(params[:1], grads, ts):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-12)


def test_third_review_compatibility_cases(monkeypatch):
    """A user's Adam subclass whose constructor predates amsgrad still steps, takes
    opt.lr = x, groups, add_param_group and load_state_dict (amsgrad=True it cannot
    take is refused); an Adam pickled before amsgrad gains it (False, and setting it
    works); parts of a step not reached when a later part raises sit the step out;
    a momentum change that keeps it above 0 is checked without a throwaway optimizer;
    clip_grad_norm_/clip_grad_value_ take PyTorch's argument names and one Parameter
    (an empty list stays refused)."""
    import pickle

    class MyAdam(optim.Adam):
        def __init__(self, params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    model = _groups_model()
    opt = MyAdam([{"params": model[0].parameters(), "lr": 0.01},
                  {"params": [model[1].weight]}])
    X, Y = np.ones((4, 5)), np.zeros((4, 3))
    _grads_step(model, X, Y)
    opt.step()
    opt.lr = 0.02
    opt.add_param_group({"params": [model[1].bias], "eps": 1e-6})
    opt.step()
    opt.load_state_dict(opt.state_dict())
    opt.param_groups[1]["amsgrad"] = True
    with pytest.raises(ValueError, match="does not take 'amsgrad'"):
        opt.step()
    opt.param_groups[1]["amsgrad"] = False

    adam = optim.Adam(model.parameters(), lr=0.01)
    state = pickle.loads(pickle.dumps(adam)).__dict__
    state["hyper"].pop("amsgrad")
    state["_hyper_seen"].pop("amsgrad")
    for g in state["param_groups"]:
        g.pop("amsgrad")
    old = object.__new__(optim.Adam)
    old.__setstate__(state)
    assert old.amsgrad is False and old.param_groups[0]["amsgrad"] is False
    old.amsgrad = True
    _grads_step(model, X, Y)
    old.step()
    assert "max_exp_avg_sq" in old.state[0]

    a = fp.Parameter(np.ones(2, np.float32))
    b = fp.Parameter(np.ones(2, np.float64))
    a.grad[...] = b.grad[...] = 1.0
    mixed = optim.SGD([a, b], lr=0.1)
    calls = []
    real_update = optim.SGD._update

    def flaky(self, be, params, grads, states, h, step):
        calls.append(params[0].dtype)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_update(self, be, params, grads, states, h, step)
    monkeypatch.setattr(optim.SGD, "_update", flaky)
    with pytest.raises(KeyboardInterrupt):
        mixed.step()
    assert mixed.step_count == 1 and mixed.state_dict()["steps"] == [1, 0]
    monkeypatch.undo()

    sgd = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    built = []
    real_construct = optim.Optimizer._construct
    monkeypatch.setattr(optim.Optimizer, "_construct",
                        lambda self, ps, h: built.append(1) or real_construct(self, ps, h))
    sgd.step()
    built.clear()  # (the first step checks the group whole)
    sgd.param_groups[0]["momentum"] = 0.85
    sgd.step()
    assert not built and sgd.momentum == 0.85
    sgd.param_groups[0]["momentum"] = 0.0  # (no buffer needed: checked whole)
    sgd.step()
    assert built
    monkeypatch.undo()

    p = fp.Parameter(np.zeros(3))
    p.grad[...] = [3.0, 4.0, 0.0]
    assert fp.clip_grad_norm_(parameters=p, max_norm=1.0) == pytest.approx(5.0)
    fp.clip_grad_value_(parameters=[p], clip_value=0.1)
    assert np.abs(p.grad).max() <= 0.1
    with pytest.raises(ValueError, match="empty"):  # (torch: 0; here most often a bug)
        fp.clip_grad_norm_([], 1.0)


def test_load_state_dict_checks_group_sizes_step_counts_and_state_keys():
    """As PyTorch: a state_dict whose groups hold other numbers of parameters is
    refused (the rates landed on other parameters); a fractional step count and a
    parameter with part of its state (Adam's exp_avg without exp_avg_sq) too; nothing
    changes on a refusal."""
    ps = [fp.Parameter(np.ones(3)) for _ in range(3)]
    src = fp.optim.Adam([{"params": ps[:1], "lr": 0.1}, {"params": ps[1:]}], lr=1e-3)
    for p in ps:
        p.grad[...] = 1.0
    src.step()
    sd = src.state_dict()
    assert [g["size"] for g in sd["param_groups"]] == [1, 2]
    dst = fp.optim.Adam([{"params": ps[:2], "lr": 0.1}, {"params": ps[2:]}], lr=1e-3)
    before = dst.state_dict()
    with pytest.raises(ValueError, match="parameter group 0 has 1 parameters, the "
                                         "optimizer's 2"):
        dst.load_state_dict(sd)
    same = fp.optim.Adam([{"params": ps[:1], "lr": 0.1}, {"params": ps[1:]}], lr=1e-3)
    for bad, match in (({**sd, "step": 2.5}, "whole number"),
                       ({**sd, "steps": [1, 1.5, 1]}, "whole number"),
                       ({**sd, "step": "1"}, "must be an integer"),
                       ({**sd, "state": [{"exp_avg": s["exp_avg"]} for s in sd["state"]]},
                        "has all of")):
        with pytest.raises(ValueError, match=match):
            same.load_state_dict(bad)
        assert same.step_count == 0 and same.state == [{}, {}, {}]
    same.load_state_dict({**sd, "step": 1.0})  # (a whole float: 1)
    assert same.step_count == 1
    legacy = {**sd, "param_groups": [{k: v for k, v in g.items() if k != "size"}
                                     for g in sd["param_groups"]]}
    fp.optim.Adam([{"params": ps[:1], "lr": 0.1}, {"params": ps[1:]}],
                  lr=1e-3).load_state_dict(legacy)  # (saved before sizes: not checked)
    assert dst.state_dict()["step"] == before["step"]


@pytest.mark.parametrize("edit", ["replace", "append", "remove", "item", "group"])
def test_edited_group_parameter_lists_are_refused(backend, edit):
    """PyTorch code edits opt.param_groups[i]["params"] to stop or start training a
    parameter; here state and step counts are kept by position, and the edit was
    silently ignored (a removed parameter kept training).  It is refused, at step,
    in a compiled step and in fit, before anything changes."""
    model = nn.Sequential(nn.Dense(3, 4, "relu", rng=0), nn.Dense(4, 2, rng=1))
    opt = fp.optim.Adam(model.parameters(), lr=0.1)
    x, y = np.random.default_rng(0).standard_normal((6, 3)), np.arange(6) % 2
    step = model.compile("cross_entropy", opt)
    step(x, y)
    extra = fp.Parameter(np.ones(3))
    plist = opt.param_groups[0]["params"]
    if edit == "replace":
        opt.param_groups[0]["params"] = plist[:2]
    elif edit == "append":
        plist.append(extra)
    elif edit == "remove":
        plist.remove(plist[-1])
    elif edit == "item":
        plist[0] = extra
    else:
        opt.param_groups.append({"params": [extra], **opt.defaults})
    before = snapshot(model, opt)
    match = r"param_groups\[0\]\['params'\] no longer holds" if edit != "group" else \
        r"param_groups holds 2 groups, the optimizer was given 1"
    for call in (opt.step, lambda: step(x, y),
                 lambda: model.fit(x, y, loss="cross_entropy", optimizer=opt, verbose=0)):
        with pytest.raises(ValueError, match=match):
            call()
        assert snapshot(model, opt) == before
    opt2 = fp.optim.Adam(model[1].parameters(), lr=0.1)
    opt2.add_param_group({"params": [extra]})  # (the way to add: still steps)
    extra.grad = np.ones(3)
    opt2.step()
    assert extra.value[0] < 1


def test_load_state_dict_refuses_non_numeric_state_and_malformed_entries():
    """A moment held as an object, complex or string array (NaN, a dropped imaginary
    part) or a state entry that is no dict is a TypeError naming it, as
    Module.load_state_dict's; nothing changes."""
    ps = [fp.Parameter(np.ones(3)) for _ in range(2)]
    opt = fp.optim.Adam(ps, lr=1e-3)
    for p in ps:
        p.grad[...] = 1.0
    opt.step()
    sd = opt.state_dict()
    before = snapshot(None, opt)
    bad_arrays = [(np.array([1, None, 2], dtype=object), "dtype object"),
                  (np.array([1 + 5j, 2, 3]), "dtype complex128"),
                  (np.array(["a", "b", "c"]), "dtype <U1")]
    for arr, match in bad_arrays:
        state = [dict(s) for s in sd["state"]]
        state[1]["exp_avg"] = arr
        with pytest.raises(TypeError, match=r"state 'exp_avg' of params\[1\] must hold real "
                                            r"numbers.*" + re.escape(match)):
            opt.load_state_dict({**sd, "state": state})
    for bad, match in (({**sd, "state": [sd["state"][0], None]},
                        r"state_dict\['state'\]\[1\] must be a dict of arrays, got NoneType"),
                       ({**sd, "state": {0: sd["state"][0]}},
                        r"state_dict\['state'\] must be a list"),
                       ({**sd, "hyper": None}, r"state_dict\['hyper'\] must be a dict")):
        with pytest.raises(TypeError, match=match):
            opt.load_state_dict(bad)
    assert snapshot(None, opt) == before
    opt.load_state_dict(sd)  # (the good one still loads)


@pytest.mark.parametrize("kind", ["adam", "adam-compiled", "rmsprop"])
@pytest.mark.parametrize("dtype,g,eps", [(np.float32, 1e-20, 1e-30), (np.float32, 1e-20, 0.0),
                                         (np.float32, 3e-18, 1e-20),
                                         (np.float64, 1e-160, 0.0)])
def test_tiny_gradients_take_a_full_adam_step(backend, kind, dtype, g, eps):
    """Adam is scale invariant: a gradient of 1e-20 moves a parameter by about lr, on
    every backend.  Its square is subnormal, and the native kernels flushed the second
    moment to 0, making the step m / eps (1e7 too large) or inf with eps = 0."""
    lr = 1e-3 if kind != "rmsprop" else 1e-2
    if kind == "adam-compiled":
        # (a compiled step, MSE: one output, weight 0, x = 1, target -g n / 2: grad g)
        model = nn.Sequential(nn.Dense(1, 1, bias=False, dtype=dtype, init="zeros"))
        step = model.compile(fp.losses.MSE(half=True),
                             fp.optim.Adam(model.parameters(), lr=lr, eps=eps))
        step(np.ones((1, 1), dtype), np.full((1, 1), -g, dtype))
        moved = model.parameters()[0].value[0, 0]
    else:
        p = fp.Parameter(np.zeros(4, dtype))
        p.grad[...] = g
        opt = (fp.optim.Adam([p], lr=lr, eps=eps) if kind == "adam"
               else fp.optim.RMSprop([p], lr=lr, eps=eps))
        opt.step()
        moved = p.value[0]
    if kind == "rmsprop":
        want = -lr * g / (np.sqrt(0.01 * g * g) + eps)  # (alpha 0.99)
    else:
        want = -lr * g / (g + eps)  # (bias-corrected m / sqrt(v) = g / |g|)
    # (g^2 is subnormal: sqrt(v) keeps few bits, ~0.3% here, as in PyTorch)
    assert moved == pytest.approx(want, rel=1e-2)


def test_fused_step_refuses_a_bias_gradient_beyond_float32(backend):
    """A float32 bias gradient whose float64 column sum lies between FLT_MAX and
    DBL_MAX is inf once stored: fit raises NonFiniteError and keeps the parameters
    (the fused kernel checked the float64 sum and applied the inf update).  The loss
    is 1: the hidden layer's output is 0 and its gradient rows 0.5 * 2e38 = 1e38, 4e38
    summed over the batch."""
    X = np.zeros((4, 2), np.float32)
    y = np.full((4, 1), -1.0, np.float32)
    model = nn.Sequential(nn.Dense(2, 1, init="zeros"), nn.Dense(1, 1, init="zeros"))
    model[1].weight.value[...] = 2e38
    before = [p.value.copy() for p in model.parameters()]
    with pytest.raises(fp.NonFiniteError, match="non-finite gradient"):
        model.fit(X, y, loss=fp.losses.MSE(), optimizer=fp.optim.SGD(model.parameters(), lr=1e-3),
                  batch_size=4, shuffle=False, verbose=0)
    assert all(np.array_equal(p.value, b) for p, b in zip(model.parameters(), before))


def test_bias_gradient_of_many_rows_is_accurate(backend):
    """The bias gradient (a column sum) of 400,000 float32 rows is accurate to float32
    rounding on every backend (the numpy backend summed row by row: ~3e-5)."""
    rng = np.random.default_rng(0)
    g = (rng.random((400_000, 3)) + 0.5).astype(np.float32)
    x = np.ones((400_000, 2), np.float32)
    w = np.zeros((2, 3), np.float32)
    grad_w, grad_b = np.empty_like(w), np.empty(3, np.float32)
    fp.backends.current().linear_backward(g, x, w, np.empty_like(g), None, 0, 0.01, None,
                                          grad_w, grad_b, None, False)
    exact = g.astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(grad_b, exact, rtol=3e-7)


def test_robust_loss_mean_of_huge_terms_is_finite(backend):
    """L1's mean of terms near float64's largest value is finite (the sum overflowed
    before the division)."""
    p = np.full(1000, 1.7e308)
    assert fp.losses.L1()(p, -p * 0) == pytest.approx(1.7e308, rel=1e-12)


# ------------------------------------------------ parameters without a gradient (None)
_NO_GRAD_OPTS = {
    "sgd": (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05),
            lambda t, ps: t.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05)),
    "adam": (lambda ps: optim.Adam(ps, lr=0.05, weight_decay=0.05),
             lambda t, ps: t.optim.Adam(ps, lr=0.05, weight_decay=0.05)),
    "adamw": (lambda ps: optim.AdamW(ps, lr=0.05, weight_decay=0.1),
              lambda t, ps: t.optim.AdamW(ps, lr=0.05, weight_decay=0.1)),
    "rmsprop": (lambda ps: optim.RMSprop(ps, lr=0.01, momentum=0.5, weight_decay=0.05),
                lambda t, ps: t.optim.RMSprop(ps, lr=0.01, momentum=0.5, weight_decay=0.05)),
    "adagrad": (lambda ps: optim.Adagrad(ps, lr=0.1, weight_decay=0.05),
                lambda t, ps: t.optim.Adagrad(ps, lr=0.1, weight_decay=0.05)),
}
_HEADS = [0, 0, 1, 0, 1, 1, 0]  # which head each step trains


@pytest.mark.parametrize("name", sorted(_NO_GRAD_OPTS))
def test_a_branch_a_step_does_not_use_is_skipped_as_in_pytorch(backend, name, rng):
    """A shared trunk with two heads, one head per step (multi-task training): after
    ``zero_grad()`` the unused head has no gradient and the step leaves it, its state
    and its own step count alone, as PyTorch's step skips a None gradient.  Every
    parameter matches torch after each step (it moved by momentum and weight decay
    before).  With ``zero_grad(set_to_none=False)`` both, as torch, update it once it
    has had a gradient."""
    torch = pytest.importorskip("torch")
    X, Y = rng.standard_normal((6, 4)), rng.standard_normal((6, 2))
    for set_to_none in (True, False):
        trunk = nn.Dense(4, 5, "tanh", dtype=np.float64, rng=1)
        heads = [nn.Dense(5, 2, dtype=np.float64, rng=2 + i) for i in range(2)]
        params = trunk.parameters() + heads[0].parameters() + heads[1].parameters()
        opt = _NO_GRAD_OPTS[name][0](params)
        tw = [torch.tensor(p.value.T.copy() if p.value.ndim == 2 else p.value.copy(),
                           requires_grad=True) for p in params]
        topt = _NO_GRAD_OPTS[name][1](torch, tw)
        tx, ty, loss = torch.tensor(X), torch.tensor(Y), fp.losses.MSE()
        for k, h in enumerate(_HEADS):
            before = heads[1 - h].weight.value.copy()
            opt.zero_grad(set_to_none=set_to_none)
            out = heads[h](trunk(X))
            loss.forward(out, Y)
            trunk.backward(heads[h].backward(loss.backward()))
            topt.zero_grad(set_to_none=set_to_none)
            hid = (tx @ tw[0].T + tw[1]).tanh()
            tout = hid @ tw[2 + 2 * h].T + tw[3 + 2 * h]
            ((tout - ty) ** 2).mean().backward()
            assert [p.has_grad for p in params] == [t.grad is not None for t in tw]
            assert heads[1 - h].weight.has_grad == (not set_to_none and 1 - h in _HEADS[:k])
            opt.step()
            topt.step()
            for p, t in zip(params, tw):
                ref = t.detach().numpy()
                np.testing.assert_allclose(p.value, ref.T if p.value.ndim == 2 else ref,
                                           rtol=1e-11, atol=1e-13, err_msg=f"step {k} param {params.index(p)}")
            if set_to_none:
                np.testing.assert_array_equal(heads[1 - h].weight.value, before)
        if set_to_none:  # (its own step count: the steps it took)
            assert opt._lags()[-1] == _HEADS.count(0) and opt._lags()[0] == 0


def test_grad_none_and_grad_assignment():
    """``p.grad = None`` (PyTorch's idiom) zeros the gradient and leaves the parameter
    out of the next step; training then works (it raised TypeError/AttributeError in
    backward, zero_grad and the compiled step); ``p.grad = g`` copies g into the
    gradient (converted to its dtype), another shape is a ValueError; a fresh
    parameter has no gradient until something uses ``grad``."""
    model = nn.Sequential(nn.Dense(3, 4, "relu", rng=0), nn.Dense(4, 2, rng=1))
    w = model[0].weight
    assert not w.has_grad  # (fresh, as torch's None)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    start = [p.value.copy() for p in model.parameters()]
    opt.step()  # nothing has a gradient: nothing moves (torch: all None)
    for p, s in zip(model.parameters(), start):
        np.testing.assert_array_equal(p.value, s)
    x, y = np.ones((5, 3), np.float32), np.arange(5) % 2
    step = model.compile("cross_entropy", opt)
    step(x, y)
    array = w.grad
    w.grad = None
    assert not w.has_grad and not array.any()
    assert w.grad is array and w.has_grad  # (a use of .grad marks it)
    w.grad = None
    frozen_value = w.value.copy()
    model[1].weight.grad[...] = 1.0  # a user's gradient, written through .grad
    opt.step()
    np.testing.assert_array_equal(w.value, frozen_value)  # no gradient: left alone
    assert model[1].weight.has_grad
    model.zero_grad()
    step(x, y)  # the compiled step, and the layer path, run after grad = None
    out = model(x)
    model.backward(np.ones_like(out))
    assert w.has_grad and w.grad.any()
    g64 = np.full(w.shape, 0.5)
    w.grad = g64
    assert w.grad is array and w.grad.dtype == np.float32 and (w.grad == 0.5).all()
    g64[...] = 2.0  # (a copy: the caller's array is not the gradient)
    assert (w.grad == 0.5).all()
    w.grad = [[1.0] * 4] * 3
    assert (w.grad == 1.0).all()
    with pytest.raises(ValueError, match=r"shape \(3, 4\), got \(4, 3\)"):
        w.grad = np.zeros((4, 3))
    assert (w.grad == 1.0).all()


def test_clip_grad_norm_leaves_out_parameters_without_a_gradient():
    """Clipping reads and scales only parameters with a gradient (torch: not None),
    and does not give the others one."""
    a = fp.Parameter(np.zeros(2))
    b = fp.Parameter(np.zeros(2))
    a.grad[...] = [3.0, 4.0]
    assert fp.clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    assert not b.has_grad
    np.testing.assert_allclose(a.grad, [0.6, 0.6 * 4 / 3], rtol=1e-5)


def test_an_empty_batch_gives_zero_gradients_not_none():
    """A backward over 0 rows gives PyTorch zero gradients (not None): the step then
    updates those parameters (weight decay here), on Dense, LayerNorm and BatchNorm1d
    in eval mode; a frozen parameter stays without a gradient, as torch's None."""
    for layer in (nn.Dense(3, 2, rng=0), nn.LayerNorm(3), nn.BatchNorm1d(3).eval()):
        layer.zero_grad()
        ps = layer.parameters()
        for p in ps:
            p.value = p.value + 0.5
        before = [p.value.copy() for p in ps]
        x = np.zeros((0, 3), np.float32)
        layer.backward(np.zeros_like(layer(x)))
        assert all(p.has_grad for p in ps), type(layer).__name__
        optim.SGD(ps, lr=0.1, weight_decay=0.1).step()
        for p, b in zip(ps, before):
            np.testing.assert_allclose(p.value, b * (1 - 0.01), rtol=1e-6)
    dense = nn.Dense(3, 2, rng=0)
    dense.weight.requires_grad = False
    dense.zero_grad()
    dense.backward(np.ones_like(dense(np.ones((4, 3), np.float32))))
    assert not dense.weight.has_grad and dense.bias.has_grad


def test_pytorch_arguments_at_their_defaults_are_taken(rng):
    """Ported PyTorch code spells out defaults (SGD(dampening=0), Adam(foreach=None,
    fused=True), RMSprop(centered=False), Adagrad(lr_decay=0)): taken, and the update
    is the same; a value fastprop does not implement is a ValueError naming it, and a
    wrong type a TypeError."""
    def trained(make):
        p = fp.Parameter(np.linspace(-1, 1, 6))
        opt = make([p])
        for i in range(3):
            p.grad = np.cos(p.value + i)
            opt.step()
        return p.value

    same = [
        (lambda ps: optim.SGD(ps, 0.1, momentum=0.9),
         lambda ps: optim.SGD(ps, 0.1, momentum=0.9, dampening=0, maximize=False,
                              foreach=None, differentiable=False, fused=False)),
        (lambda ps: optim.Adam(ps, 0.1),
         lambda ps: optim.Adam(ps, 0.1, foreach=True, maximize=False, capturable=False,
                               differentiable=False, fused=True,
                               decoupled_weight_decay=False)),
        (lambda ps: optim.AdamW(ps, 0.1), lambda ps: optim.AdamW(ps, 0.1, foreach=False)),
        (lambda ps: optim.RMSprop(ps, 0.1), lambda ps: optim.RMSprop(ps, 0.1, centered=False,
                                                                   capturable=False)),
        (lambda ps: optim.Adagrad(ps, 0.1),
         lambda ps: optim.Adagrad(ps, 0.1, lr_decay=0, initial_accumulator_value=0.0))]
    for plain, spelled in same:
        np.testing.assert_array_equal(trained(plain), trained(spelled))
    p = [fp.Parameter(np.ones(2))]
    for call, exc, match in [
            (lambda: optim.SGD(p, 0.1, dampening=0.5), ValueError, "dampening=0.5"),
            (lambda: optim.Adam(p, maximize=True), ValueError, "maximize"),
            (lambda: optim.AdamW(p, differentiable=True), ValueError, "differentiable"),
            (lambda: optim.RMSprop(p, centered=True), ValueError, "centered"),
            (lambda: optim.Adagrad(p, lr_decay=0.1), ValueError, "scheduler"),
            (lambda: optim.Adagrad(p, initial_accumulator_value=0.1), ValueError,
             "initial_accumulator_value"),
            (lambda: optim.Adam(p, decoupled_weight_decay=True), ValueError, "AdamW"),
            (lambda: optim.Adam(p, foreach="yes"), TypeError, "foreach"),
            (lambda: optim.SGD(p, 0.1, dampening="0"), TypeError, "dampening")]:
        with pytest.raises(exc, match=match):
            call()


def test_hyperparameter_reads_are_current_after_group_edits_and_schedulers():
    """opt.lr, opt.momentum and state_dict()["hyper"] read what the next step uses: a
    group edited (as PyTorch code does) or set by a scheduler since, not the value
    before (they were synced only by the next step, even a refused one)."""
    model = nn.Sequential(nn.Dense(3, 2, rng=0))
    opt = optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["lr"] = 0.02
    assert opt.lr == 0.02 and opt.state_dict()["hyper"]["lr"] == 0.02
    sched = fp.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    assert opt.momentum == opt.param_groups[0]["momentum"] == 0.95
    assert opt.lr == opt.param_groups[0]["lr"]
    before = opt.state_dict()
    step = model.compile(fp.losses.MSE(), opt)
    with pytest.raises(ValueError):
        step(np.zeros((2, 3)), np.full((2, 2), np.nan))
    assert opt.state_dict()["hyper"] == before["hyper"]
    opt.lr = 0.3  # (the setter still sets every group)
    assert opt.lr == 0.3 and all(g["lr"] == 0.3 for g in opt.param_groups)
    opt.hyper["lr"] = 0.4  # (a write into hyper itself: the next step gives it out)
    assert opt.lr == 0.4
    sched.step()
    assert opt.lr == opt.param_groups[0]["lr"]


_NATIVE = importlib.util.find_spec("fastprop._native") is not None
_VARIANTS = [
    ("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1)), ("SGD", dict(lr=0.1, weight_decay=0.1)),
    ("Adam", dict(lr=0.1, betas=(0.8, 0.9), eps=1e-2)), ("Adam", dict(lr=0.1, weight_decay=0.1)),
    ("AdamW", dict(lr=0.1, weight_decay=0.5)),
    ("RMSprop", dict(lr=0.01, eps=1e-2)), ("RMSprop", dict(lr=0.01, momentum=0.9)),
    ("RMSprop", dict(lr=0.01, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, weight_decay=0.1)),
    ("Adagrad", dict(lr=0.1, eps=1e-2)), ("Adagrad", dict(lr=0.1, weight_decay=0.1))]


def _trained_on(backend, name, kw, vals, grads):
    """(parameter values, optimizer state) after one step per gradient list."""
    with fp.use_backend(backend):
        ps = [fp.Parameter(v.copy()) for v in vals]
        opt = getattr(optim, name)(ps, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g
            opt.step()
        return [p.value for p in ps], opt.state


@pytest.mark.skipif(not _NATIVE, reason="fastprop._native is not built")
@pytest.mark.parametrize("name, kw", _VARIANTS,
                         ids=[f"{n}-{'-'.join(k for k in kw if k != 'lr')}" for n, kw in _VARIANTS])
def test_every_optimizer_variant_native_equals_numpy_in_float64(name, kw, rng):
    """Every option combination (Nesterov without decay, RMSprop's momentum with or
    without decay, ...) of the native update against the numpy backend's, in float64,
    parameters and state, over 4 steps.  CI runs the suite once per ISA unit
    (FASTPROP_ISA=generic, avx2, ...): a fault in one unit's update is caught here."""
    vals = [rng.standard_normal(s) for s in [(3, 37), (5,)]]
    grads = [[0.01 * rng.standard_normal(v.shape) for v in vals] for _ in range(4)]
    out = {be: _trained_on(be, name, kw, vals, grads) for be in ("native", "numpy")}
    for a, b in zip(out["native"][0], out["numpy"][0]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    for sa, sb in zip(out["native"][1], out["numpy"][1]):
        assert sorted(sa) == sorted(sb)
        for k in sa:
            np.testing.assert_allclose(sa[k], sb[k], rtol=1e-12, atol=1e-14, err_msg=k)


@pytest.mark.skipif(not _NATIVE, reason="fastprop._native is not built")
@pytest.mark.parametrize("name, kw", [("SGD", dict(lr=0.1, momentum=0.9)),
                                      ("Adam", dict(lr=0.01)), ("RMSprop", dict(lr=0.01)),
                                      ("Adagrad", dict(lr=0.1))])
def test_threaded_optimizer_update_equals_numpy(name, kw, rng):
    """Tensors above the update's threading grain (650k elements, odd sizes), 2 threads
    (the suite turns the busy-machine back-off off, conftest.py): every thread's chunk,
    its edges included, against the numpy backend."""
    shapes = [(700, 500), (333,), (1000, 300)]
    vals = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    before = fp.get_num_threads()
    fp.set_num_threads(2)
    try:
        out = {be: _trained_on(be, name, kw, vals, grads)[0] for be in ("native", "numpy")}
    finally:
        fp.set_num_threads(before)
    for a, b in zip(out["native"], out["numpy"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_compiled_steps_memo_of_checked_groups_sees_every_change(rng):
    """The compiled step skips rechecking parameter groups that hold the very values
    and types they held at its last check: a value equal but of another type (lr
    True for 1.0, a 0-d array), a params list edited in place, a new value in a group
    or in opt.hyper, are all seen (refused or used) at the next step."""
    model = nn.Sequential(nn.Dense(3, 2, rng=0, dtype=np.float64))
    opt = optim.SGD(model.parameters(), lr=1.0)
    step = model.compile(fp.losses.MSE(), opt)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    step(x, y)
    for bad, exc in [(True, TypeError), (np.array(1.0), TypeError)]:
        opt.param_groups[0]["lr"] = bad
        before = snapshot(model, opt)
        with pytest.raises((TypeError, ValueError)):
            step(x, y)
        assert snapshot(model, opt) == before
        opt.param_groups[0]["lr"] = 1.0
    step(x, y)
    opt.param_groups[0]["params"].append(fp.Parameter(np.ones(2)))
    with pytest.raises(ValueError, match="no longer holds"):
        step(x, y)
    opt.param_groups[0]["params"].pop()
    for set_lr in (lambda v: opt.param_groups[0].__setitem__("lr", v),
                   lambda v: opt.hyper.__setitem__("lr", v)):
        w = model[0].weight.value.copy()
        set_lr(0.0)  # (a zero rate: the next step leaves the weights)
        step(x, y)
        np.testing.assert_array_equal(model[0].weight.value, w)
        set_lr(1.0)
        step(x, y)
        assert not np.array_equal(model[0].weight.value, w)


def test_a_pytorch_optimizer_state_dict_is_named_as_one():
    """opt.load_state_dict(torch_opt.state_dict()) said "state_dict is for None, not
    'SGD'"; it now says what it is, and nothing changes."""
    p = fp.Parameter(np.ones(2))
    opt = fp.optim.SGD([p], lr=0.1, momentum=0.9)
    torch_like = {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]}
    with pytest.raises(ValueError, match="looks like a PyTorch optimizer's state_dict"):
        opt.load_state_dict(torch_like)
    assert opt.lr == 0.1 and opt.step_count == 0


@pytest.mark.parametrize("make", [lambda ps: optim.Adam(ps, lr=0.1),
                                  lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: optim.RMSprop(ps, lr=0.1),
                                  lambda ps: optim.Adagrad(ps, lr=0.1)],
                         ids=["adam", "sgd", "rmsprop", "adagrad"])
@pytest.mark.parametrize("bad", ["read-only", "strided", "list"])
def test_state_arrays_replaced_by_hand_are_checked_before_the_update(backend, make, bad):
    """opt.state is public (load_state_dict's messages point to it): a state array
    replaced by one the update cannot write in place is refused, naming it, before any
    parameter or state changes (the numpy backend had updated the first parameter)."""
    rng = np.random.default_rng(0)
    ps = [fp.Parameter(rng.standard_normal((3, 4))), fp.Parameter(rng.standard_normal(4))]
    opt = make(ps)
    for p in ps:
        p.grad[...] = rng.standard_normal(p.value.shape)
    opt.step()
    key = next(iter(opt.state[1]))
    old = opt.state[1][key]
    if bad == "read-only":
        new = old.copy()
        new.setflags(write=False)
    elif bad == "strided":
        new = np.repeat(old, 2)[::2]
    else:
        new = old.tolist()
    opt.state[1][key] = new
    def arrays():
        return [p.value.copy() for p in ps] + [np.array(a) for st in opt.state
                                                for a in st.values()]
    before = arrays()
    with pytest.raises(TypeError if bad == "list" else ValueError,
                       match=rf"state '{key}' of params\[1\]"):
        opt.step()
    assert all(np.array_equal(a, b) for a, b in zip(before, arrays()))


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_step_with_a_closure_as_pytorch(backend, name, rng, peer):
    """``step(closure)`` as PyTorch's: the closure (zero the gradients, forward, loss,
    backward) is called once, before the update, and its loss returned; the update
    is the one ``step()`` makes from the gradients it left.  A closure that raises, or
    a closure that is not callable, changes nothing (counts and state included)."""
    target = rng.standard_normal(7)
    start = rng.standard_normal(7)
    kw = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.1}
    cls = getattr(optim, name)

    def run(use_closure):
        p = fp.Parameter(start.copy())
        opt = cls([p], **kw)
        calls, losses = [0], []

        def closure():
            calls[0] += 1
            opt.zero_grad()
            p.grad[...] = 2 * (p.value - target)
            return float(((p.value - target) ** 2).sum())

        for _ in range(5):
            if use_closure:
                losses.append(opt.step(closure))
            else:
                losses.append(closure())
                assert opt.step() is None
        return p, opt, calls[0], losses

    p, opt, calls, losses = run(True)
    q, _, _, plain = run(False)
    assert calls == 5 and losses == plain and losses[-1] < losses[0]
    np.testing.assert_array_equal(p.value, q.value)
    if peer is not None:
        t = peer.tensor(start.copy(), requires_grad=True)
        topt = getattr(peer.optim, name)([t], **kw)

        def tclosure():
            topt.zero_grad()
            loss = ((t - peer.from_numpy(target)) ** 2).sum()
            loss.backward()
            return loss

        tl = [topt.step(tclosure).item() for _ in range(5)]
        np.testing.assert_allclose(losses, tl, rtol=1e-12)
        np.testing.assert_allclose(p.value, t.detach().numpy(), rtol=1e-12, atol=1e-15)

    before = snapshot(optimizer=opt), p.value.copy(), opt.step_count

    def failing():
        p.grad[...] = 1.0
        raise RuntimeError("no batch")

    with pytest.raises(RuntimeError, match="no batch"):
        opt.step(failing)
    with pytest.raises(TypeError, match="closure must be callable, got float"):
        opt.step(1.0)
    called = []
    opt.param_groups[0]["lr"] = -1.0  # (refused before the closure's forward runs)
    with pytest.raises(ValueError, match="lr"):
        opt.step(lambda: called.append(1))
    assert not called
    opt.param_groups[0]["lr"] = 0.1
    assert snapshot(optimizer=opt) == before[0] and opt.step_count == before[2]
    np.testing.assert_array_equal(p.value, before[1])

    def slower():  # (a value the closure sets is the one used, as in PyTorch)
        opt.param_groups[0]["lr"] = 0.0
        p.grad[...] = 1.0
        return 0.0

    opt.step(slower)
    np.testing.assert_array_equal(p.value, before[1])


@pytest.mark.parametrize("case", ["rmsprop group momentum 0", "adam group amsgrad off",
                                  "adam amsgrad switched on", "rmsprop momentum switched on"])
def test_state_dict_with_buffers_of_some_groups_only_loads_back(backend, case, rng):
    """A parameter group may keep other buffers than the constructor's defaults
    (RMSprop momentum 0 in one group, Adam amsgrad off in one), and an option switched
    on since the last step has no buffer yet: the optimizer's own state_dict loads
    back (it was refused: every parameter's state was checked against the
    optimizer-wide options, so a fit checkpoint could not be resumed), and training
    goes on as without the round trip.  A state without the type's core buffers is
    still refused."""
    start = [rng.standard_normal((4, 3)), rng.standard_normal(3)]
    grads = [[rng.standard_normal(a.shape) for a in start] for _ in range(6)]

    def make():
        w, b = fp.Parameter(start[0].copy()), fp.Parameter(start[1].copy())
        if case == "rmsprop group momentum 0":
            opt = optim.RMSprop([{"params": [w]}, {"params": [b], "momentum": 0.0}],
                                lr=0.01, momentum=0.9)
        elif case == "adam group amsgrad off":
            opt = optim.Adam([{"params": [w]}, {"params": [b], "amsgrad": False}],
                             lr=0.01, amsgrad=True)
        elif case == "adam amsgrad switched on":
            opt = optim.Adam([w, b], lr=0.01)
        else:
            opt = optim.RMSprop([w, b], lr=0.01)
        return [w, b], opt

    def train(params, opt, steps):
        for g in steps:
            for p, gi in zip(params, g):
                p.grad[...] = gi
            opt.step()

    def switch(opt):
        if case == "adam amsgrad switched on":
            opt.amsgrad = True
        elif case == "rmsprop momentum switched on":
            opt.momentum = 0.5

    params, opt = make()
    train(params, opt, grads[:3])
    switch(opt)
    saved = opt.state_dict()
    opt.load_state_dict(saved)  # (its own)
    twin_params, twin = make()
    for p, q in zip(twin_params, params):
        p.value[...] = q.value
    switch(twin)
    twin.load_state_dict(saved)
    train(params, opt, grads[3:])
    train(twin_params, twin, grads[3:])
    for p, q in zip(params, twin_params):
        np.testing.assert_array_equal(p.value, q.value)
    if isinstance(opt, optim.Adam):
        broken = opt.state_dict()
        del broken["state"][0]["exp_avg_sq"]
        before = snapshot(optimizer=opt)
        with pytest.raises(ValueError, match="has all of"):
            opt.load_state_dict(broken)
        assert snapshot(optimizer=opt) == before


def test_an_array_written_into_a_group_is_refused_by_name_on_the_compiled_step(rng):
    """``param_groups[0]["betas"] = np.array(...)`` between compiled steps: the step
    refuses it with the optimizer's own message, nothing changed (the fused path's
    memo compared the groups first and raised NumPy's "truth value of an array is
    ambiguous")."""
    model = nn.Sequential(nn.Dense(4, 3, "tanh", rng=0, dtype=np.float64), nn.Dense(3, 2, rng=1,
                                                                                   dtype=np.float64))
    opt = optim.Adam(model.parameters(), lr=0.01)
    step = model.compile("mse", opt)
    x, y = rng.standard_normal((6, 4)), rng.standard_normal((6, 2))
    step(x, y)
    opt.param_groups[0]["betas"] = np.array([0.8, 0.99])
    before = snapshot(model, opt)
    with pytest.raises(TypeError, match=r"betas must be a pair \(beta1, beta2\)"):
        step(x, y)
    assert snapshot(model, opt) == before
    opt.param_groups[0]["betas"] = (0.8, 0.99)
    step(x, y)


def test_a_pytorch_only_option_written_into_a_group_is_refused(rng):
    """``param_groups[0]["dampening"] = 0.5`` (PyTorch code sets it so): refused as
    the constructor refuses ``SGD(dampening=0.5)``, by the layer path's step and the
    compiled step alike, nothing changed (it was silently ignored, while PyTorch
    applies it); the default value, and a key of the user's own, are kept as they
    are."""
    model = nn.Sequential(nn.Dense(4, 2, rng=0, dtype=np.float64))
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = model.compile("mse", opt)
    x, y = rng.standard_normal((6, 4)), rng.standard_normal((6, 2))
    step(x, y)
    opt.param_groups[0]["tag"] = "head"  # (the user's own key)
    step(x, y)
    opt.param_groups[0]["dampening"] = 0.5
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: SGD\(dampening=0.5\) is not "
                                         r"supported.*no dampening"):
        step(x, y)
    with pytest.raises(ValueError, match="dampening"):
        opt.step()
    assert snapshot(model, opt) == before
    opt.param_groups[0]["dampening"] = 0
    step(x, y)
    opt.step()
    assert opt.param_groups[0]["tag"] == "head"
    opt.param_groups[0]["dampening"] = 0.25  # (the key was there: no count changed)
    with pytest.raises(ValueError, match="dampening=0.25"):
        opt.step()
