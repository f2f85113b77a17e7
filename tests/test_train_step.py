"""The compiled training step (model.compile): the backend's whole-step kernel agrees
with the Python path, checks finiteness before updating, rebinds replaced arrays and
allocates nothing per step."""

import copy
import tracemalloc

import numpy as np
import pytest

import fastprop as fp
from fastprop import losses, nn, optim
from fastprop.backends import NonFiniteError
from conftest import NATIVE_BUILT

native_only = pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")

#: compiled vs Python path after 20 steps: both run the same kernels in the same order
#: today (bit-identical); the tolerance leaves room for fused kernels that round
#: differently (FMA contraction, other summation orders).
TOL = {np.dtype(np.float32): dict(rtol=2e-4, atol=2e-6),
       np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12)}

OPTIMIZERS = {
    "sgd": lambda p: optim.SGD(p, lr=0.05),
    "sgd-momentum-wd": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov": lambda p: optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
    "adam": lambda p: optim.Adam(p, lr=1e-2),
    "adam-l2": lambda p: optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: optim.RMSprop(p, lr=1e-3),
    "rmsprop-momentum-wd": lambda p: optim.RMSprop(p, lr=1e-3, momentum=0.5, weight_decay=1e-3),
    "adagrad": lambda p: optim.Adagrad(p, lr=0.05, weight_decay=1e-3),
}

# (loss, last activation, target kind)
LOSSES = {
    "xent-labels": (losses.SoftmaxCrossEntropy, None, "labels"),
    "xent-onehot": (losses.SoftmaxCrossEntropy, None, "onehot"),
    "xent-soft": (losses.SoftmaxCrossEntropy, None, "soft"),
    "xent-labels-smoothed": (lambda: losses.SoftmaxCrossEntropy(label_smoothing=0.2), None,
                             "labels"),
    "xent-soft-smoothed": (lambda: losses.SoftmaxCrossEntropy(label_smoothing=0.1), None, "soft"),
    "mse": (lambda: losses.MSE(), None, "real"),
    "mse-half-tanh": (lambda: losses.MSE(half=True), "tanh", "real"),
    "bce-logits": (lambda: losses.BinaryCrossEntropy(from_logits=True), None, "binary"),
    "bce-sigmoid": (lambda: losses.BinaryCrossEntropy(), "sigmoid", "binary"),
}


def _model(dtype, hidden=("relu", "gelu"), last=None, sizes=(13, 17, 9, 4), seed=0, bias=True):
    rng = np.random.default_rng(seed)
    acts = list(hidden) + [last]
    return nn.Sequential(*[nn.Dense(a, b, act, rng=rng, dtype=dtype, bias=bias)
                           for a, b, act in zip(sizes[:-1], sizes[1:], acts)])


def _data(kind, n=48, inputs=13, outputs=4, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, inputs))
    if kind == "labels":
        y = rng.integers(0, outputs, n)
    elif kind == "onehot":
        y = np.eye(outputs)[rng.integers(0, outputs, n)]
    elif kind == "soft":
        y = rng.dirichlet(np.ones(outputs), n)
    elif kind == "binary":
        y = (rng.random((n, outputs)) > 0.5).astype(float)
    else:
        y = rng.standard_normal((n, outputs))
    return X, y


def _train(model, loss, opt, X, y, steps=20, batch=12, fused=True):
    step = model.compile(loss, opt)
    if not fused:
        step.fused = lambda: None  # force the layer-by-layer Python path
    values = []
    for i in range(steps):
        s = (i * batch) % X.shape[0]
        values.append(step(X[s:s + batch], y[s:s + batch]))
    return step, np.array(values)


def _assert_agree(m1, m2, l1, l2, dtype):
    np.testing.assert_allclose(l1, l2, **TOL[dtype])
    for p, q in zip(m1.parameters(), m2.parameters()):
        np.testing.assert_allclose(p.value, q.value, **TOL[dtype])
        np.testing.assert_allclose(p.grad, q.grad, **TOL[dtype])


@native_only
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_fused_step_matches_python_path(opt_name, loss_name, dtype):
    make_loss, last, kind = LOSSES[loss_name]
    X, y = _data(kind)
    runs = []
    with fp.use_backend("native"):
        for fused in (True, False):
            model = _model(dtype, last=last)
            opt = OPTIMIZERS[opt_name](model.parameters())
            step, values = _train(model, make_loss(), opt, X, y, fused=fused)
            runs.append((model, values, step, opt))
    (m1, l1, s1, o1), (m2, l2, s2, o2) = runs
    assert type(s1._fast).__name__ == "NativeTrainStep"
    assert s2._fast is None
    assert o1.step_count == o2.step_count == 20
    _assert_agree(m1, m2, l1, l2, dtype)
    for a, b in zip(o1.state, o2.state):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], **TOL[dtype])
    np.testing.assert_allclose(s1.output, s2.output, **TOL[dtype])


@native_only
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("clip", [{"clip_grad_norm": 0.05}, {"clip_grad_value": 0.01},
                                  {"clip_grad_norm": 0.05, "clip_grad_value": 0.01},
                                  {"clip_grad_norm": 1e6}], ids=["norm", "value", "both", "idle"])
def test_fused_step_clips_as_the_python_path(opt_name, clip, dtype):
    """compile(clip_grad_norm=, clip_grad_value=): the native kernel clips the stored
    gradients itself (value, then norm, as fp.clip_grad_value / clip_grad_norm) instead
    of sending the step down the layer path (13.7 -> 72 us on a tiny model); the same
    parameters, gradients and state as the layer path's."""
    X, y = _data("labels", n=96)
    runs = []
    with fp.use_backend("native"):
        for fused in (True, False):
            model = _model(dtype)
            opt = OPTIMIZERS[opt_name](model.parameters())
            step = model.compile(losses.SoftmaxCrossEntropy(), opt, **clip)
            if not fused:
                step.fused = lambda: None
            values = [step(X[s:s + 12], y[s:s + 12]) for s in range(0, 96, 12)]
            runs.append((model, np.array(values), step, opt))
    (m1, l1, s1, o1), (m2, l2, s2, o2) = runs
    assert type(s1._fast).__name__ == "NativeTrainStep" and s2._fast is None
    assert s1.output is s1._fast.output  # (the kernel ran the step, not the layer path)
    _assert_agree(m1, m2, l1, l2, dtype)
    for a, b in zip(o1.state, o2.state):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], **TOL[dtype])
    if "clip_grad_value" in clip:  # (the stored gradients are the clipped ones)
        assert max(np.abs(p.grad).max() for p in m1.parameters()) <= clip["clip_grad_value"]
    if clip.get("clip_grad_norm") == 0.05:
        norm = np.sqrt(sum(np.sum(p.grad.astype(np.float64) ** 2) for p in m1.parameters()))
        assert norm <= 0.05 * (1 + 1e-5)


@native_only
@pytest.mark.parametrize("acts", [("identity", "leaky_relu"), ("sigmoid", "tanh"),
                                  ("gelu", "relu")])
@pytest.mark.parametrize("last", [None, "softmax", "sigmoid"])
@pytest.mark.filterwarnings("ignore:the model ends in a softmax")  # (on purpose: the kernel's
def test_fused_step_every_activation(acts, last):                  # softmax-output rows)
    X, y = _data("onehot")
    runs = []
    with fp.use_backend("native"):
        for fused in (True, False):
            model = _model(np.float64, hidden=acts, last=last, bias=last != "sigmoid")
            step, values = _train(model, losses.SoftmaxCrossEntropy(),
                                  optim.Adam(model.parameters(), lr=1e-2), X, y, fused=fused)
            runs.append((model, values))
    _assert_agree(runs[0][0], runs[1][0], runs[0][1], runs[1][1], np.dtype(np.float64))


@native_only
def test_activation_layers_fold_into_the_dense_stage():
    model = nn.Sequential(nn.Dense(5, 6), nn.ReLU(), nn.Dense(6, 3), nn.Tanh())
    stages = fp.train.dense_stages(model)
    assert [s.act for s in stages] == [1, 4]
    with fp.use_backend("native"):
        step = model.compile("mse", "sgd")
        step(np.ones((4, 5)), np.zeros((4, 3)))
        assert step._fast is not None


@native_only
def test_unsupported_layers_use_the_python_path():
    model = nn.Sequential(nn.Dense(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dense(6, 3))
    with fp.use_backend("native"):
        step = model.compile("cross_entropy", "adam")
        loss = step(np.random.default_rng(0).standard_normal((8, 5)), np.arange(8) % 3)
    assert step._fast is None and np.isfinite(loss)


@native_only
def test_bce_on_probabilities_needs_a_bounded_output():
    """BCE on probabilities from an unbounded output keeps the Python path, which
    rejects predictions outside [0, 1] with a clear error."""
    model = _model(np.float32, last=None)
    with fp.use_backend("native"):
        step = model.compile(losses.BinaryCrossEntropy(), "sgd")
        assert step.fused() is None


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("where", ["loss", "gradient", "overflows float32"])
def test_non_finite_stops_before_the_update(backend, where, fused):
    """A non-finite loss (finite x whose forward overflows: NaN in x itself is bad
    input, a ValueError), a finite loss whose float32 weight gradients overflow, or a
    loss finite in double but above float32's range (PyTorch's float32 loss is inf
    there; its gradients, squared, overflow Adam's second moments to inf, which
    would stop those weights for good) stops the step before anything is updated,
    on the fused step and the layer path alike."""
    if backend == "cuda" and fused:
        pytest.skip("the cuda backend's fused step is tested in test_cuda.py")
    model = _model(np.float32, hidden=("relu", "relu"))
    opt = optim.Adam(model.parameters(), lr=1e-2)
    X, _ = _data("real")
    y = np.zeros((X.shape[0], 4))
    with fp.use_backend(backend):
        step = model.compile(losses.MSE(), opt)
        if not fused:
            step.fused = lambda: None  # force the layer-by-layer Python path
        step(X[:8], y[:8])
        assert (step.fused() is not None) == (fused and backend == "native")
        step.check_finite = True
        before = [p.value.copy() for p in model.parameters()]
        grads = [p.grad.copy() for p in model.parameters()]
        state = [{k: v.copy() for k, v in s.items()} for s in opt.state]
        bad, target = X[:8].copy(), y[:8]
        if where == "loss":
            bad[:] = 3e38  # finite; the first layer's outputs overflow to inf
        elif where == "gradient":
            # x[:, 0] = 1e36 with the weights it meets zeroed: the loss (~1e10) is
            # finite, dW1[0] = x[:, 0]^T g1 (~1e39) overflows float32
            model[0].weight.value[0] = 0.0
            before[0][0] = 0.0
            bad[:, 0] = 1e36
            target = np.full_like(y[:8], -1e5)
        else:
            bad = np.abs(bad) * 1e20 + 1e20  # loss ~1e40: finite in double only
        # (NumPy's matmul warns of the overflow the step then refuses)
        with pytest.raises(NonFiniteError, match=where), np.errstate(over="ignore",
                                                                     invalid="ignore"):
            step(bad, target)
    assert opt.step_count == 1
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.value, b)
    for s, b in zip(opt.state, state):
        for k in s:
            np.testing.assert_array_equal(s[k], b[k])
    assert grads  # gradients of the rejected step are left for inspection


@native_only
def test_replaced_arrays_are_rebound():
    """Replacing a Parameter value or the optimizer state (load_state_dict) between
    steps must not leave the kernel writing to the old arrays."""
    X, y = _data("labels")
    runs = []
    for fused in (True, False):
        model = _model(np.float32)
        opt = optim.Adam(model.parameters(), lr=1e-2)
        with fp.use_backend("native"):
            step, _ = _train(model, losses.SoftmaxCrossEntropy(), opt, X, y, steps=3,
                             fused=fused)
            p = model[0].weight
            p.value = p.value.copy()
            opt.load_state_dict(opt.state_dict())
            opt.lr = 5e-3
            step(X[:12], y[:12])
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        np.testing.assert_allclose(p.value, q.value, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("change", ["grad read-only", "value read-only", "state read-only",
                                    "weight reshaped"])
def test_arrays_changed_in_place_after_a_step_are_checked_again(backend, change):
    """The compiled step keeps its pointers while the same array objects are bound; an
    array made read-only or reshaped in place since is refused as on a fresh compile
    (the native step wrote a read-only array and trained on the old shape), and left
    unchanged."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 4)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    model = nn.Sequential(nn.Dense(4, 6, activation="relu", rng=0), nn.Dense(6, 3, rng=1))
    opt = optim.Adam(model.parameters())
    step = model.compile("cross_entropy", opt)
    step(X, y)
    bias, weight = model[1].bias, model[1].weight
    if change == "weight reshaped":
        weight.value.shape = weight.grad.shape = (3, 6)  # (same objects, same memory)
        arr = weight.value
    else:
        arr = {"grad read-only": bias.grad, "value read-only": bias.value,
               "state read-only": opt.state[3]["exp_avg"]}[change]
        arr.setflags(write=False)
    def arrays():  # (values and gradients: the numpy path had zeroed other gradients)
        return [a for p in model.parameters() for a in (p.value, p._grad)] + [arr]
    before = [a.copy() for a in arrays()]
    with pytest.raises(ValueError, match="writable|shape"):
        step(X[::-1].copy(), y[::-1].copy())
    for a, b in zip(arrays(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("how", ["compiled", "fit"])
def test_x_that_is_a_gradient_trains_as_a_copy_would(backend, how):
    """x given as (a view of) the first layer's weight gradient: the step zeroes and
    rewrites the gradients while the backward still reads x; it must train as on a
    copy of x (the hand loop's Dense.backward already copies such an x)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((16, 16)).astype(np.float32)
    Y = rng.standard_normal((16, 16)).astype(np.float32)
    results = []
    for alias in (True, False):
        model = nn.Sequential(nn.Dense(16, 16, activation="tanh", rng=0),
                              nn.Dense(16, 16, rng=1))
        opt = optim.Adam(model.parameters(), lr=0.01)
        step = model.compile("mse", opt)
        step(X, Y)  # (the gradient now holds values)
        g = model[0].weight.grad
        x = g if alias else g.copy()
        if how == "compiled":
            step(x, Y)
            step(g[:8] if alias else g[:8].copy(), Y[:8])  # (a view of it)
        else:
            model.fit(x, Y, loss="mse", optimizer=opt, batch_size=16, shuffle=False,
                      epochs=1, verbose=0)
        results.append([p.value.copy() for p in model.parameters()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@native_only
@pytest.mark.parametrize("loss_name, option", [("mse", "half"), ("bce-logits", "from_logits")])
@pytest.mark.filterwarnings("ignore:the model ends in a sigmoid")  # (a sigmoid output and BCE
def test_loss_options_changed_after_compile_are_used(loss_name, option):  # from logits first)
    """A loss option set between steps (MSE.half, BinaryCrossEntropy.from_logits)
    applies to the next compiled step as it does to the Python path."""
    make, last, kind = LOSSES[loss_name]
    X, y = _data(kind)
    runs = []
    for fused in (True, False):
        model = _model(np.float64, last="sigmoid" if option == "from_logits" else last)
        loss = make()
        with fp.use_backend("native"):
            step, values = _train(model, loss, optim.SGD(model.parameters(), lr=0.05), X, y,
                                  steps=3, fused=fused)
            setattr(loss, option, not getattr(loss, option))
            values = list(values) + [step(X[:12], y[:12]) for _ in range(3)]
        runs.append((model, np.array(values)))
    (m1, l1), (m2, l2) = runs
    _assert_agree(m1, m2, l1, l2, np.dtype(np.float64))


@native_only
@pytest.mark.parametrize("swap", ["optimizer", "loss"])
def test_a_loss_or_optimizer_assigned_to_the_step_is_used(swap):
    """``step.optimizer = ...`` / ``step.loss = ...`` between steps: the next compiled
    step uses the new one, as the Python path does (the fused kernel, keyed on the
    backend and the parameter arrays only, went on with the old ones, silently)."""
    X, y = _data("regression")
    runs = []
    for fused in (True, False):
        model = _model(np.float64)
        o1 = optim.SGD(model.parameters(), lr=0.05)
        with fp.use_backend("native"):
            step, values = _train(model, losses.MSE(), o1, X, y, steps=2, fused=fused)
            o2 = optim.Adam(model.parameters(), lr=0.01)
            if swap == "optimizer":
                step.optimizer = o2
            else:
                step.loss = losses.MSE(half=True)
            values = list(values) + [step(X[:12], y[:12]) for _ in range(3)]
        if swap == "optimizer":
            assert (o1.step_count, o2.step_count) == (2, 3)
        runs.append((model, np.array(values)))
    (m1, l1), (m2, l2) = runs
    _assert_agree(m1, m2, l1, l2, np.dtype(np.float64))


@native_only
def test_a_subclassed_loss_takes_the_python_path():
    """A user's subclass of a built-in loss computes what its own methods say: the
    compiled step does not run the parent's kernel in its place (it did: MSE's)."""

    class DoubledMSE(losses.MSE):
        def _kernel(self, pred, target, grad):
            value = super()._kernel(pred, target, grad)
            if grad is not None:
                grad *= 2
            return 2 * value

    X, y = _data("real")
    runs = []
    for fused in (True, False):
        model = _model(np.float64)
        with fp.use_backend("native"):
            _, values = _train(model, DoubledMSE(), optim.SGD(model.parameters(), lr=0.05),
                               X, y, steps=3, fused=fused)
        runs.append((model, values))
    (m1, l1), (m2, l2) = runs
    _assert_agree(m1, m2, l1, l2, np.dtype(np.float64))


@pytest.mark.parametrize("batch", [4, 1])
def test_tied_weights_take_the_python_path(batch):
    """Two layers sharing one weight Parameter: the gradient is the sum of both
    layers' contributions and one update, on every backend (the fused kernel, which
    would write one layer's gradient over the other's, is not used)."""
    rng = np.random.default_rng(0)
    X, Y = 0.5 * rng.standard_normal((batch, 6)), rng.standard_normal((batch, 6))
    results = []
    for backend in (["native"] if NATIVE_BUILT else []) + ["numpy"]:
        a = nn.Dense(6, 6, "tanh", rng=1, dtype=np.float64)
        b = nn.Dense(6, 6, rng=2, dtype=np.float64)
        b.weight = a.weight
        model = nn.Sequential(a, b)
        with fp.use_backend(backend):
            step = model.compile(losses.MSE(), optim.Adam(model.parameters(), lr=0.01))
            for _ in range(3):
                step(X, Y)
            assert step.fused() is None
        results.append(a.weight.value)
    # the Python path, written out: W gets both layers' gradients
    a = nn.Dense(6, 6, "tanh", rng=1, dtype=np.float64)
    W, b1, b2 = a.weight.value.copy(), a.bias.value.copy(), nn.Dense(6, 6, rng=2).bias.value
    b2 = b2.astype(np.float64)
    m = {k: np.zeros_like(v) for k, v in (("W", W), ("b1", b1), ("b2", b2))}
    v = {k: np.zeros_like(x) for k, x in m.items()}
    params = {"W": W, "b1": b1, "b2": b2}
    for t in range(1, 4):
        h = np.tanh(X @ W + b1)
        gout = 2 * (h @ W + b2 - Y) / Y.size
        gh = (gout @ W.T) * (1 - h * h)
        grads = {"W": h.T @ gout + X.T @ gh, "b1": gh.sum(0), "b2": gout.sum(0)}
        for k, g in grads.items():
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            params[k] -= 0.01 / (1 - 0.9 ** t) * m[k] / (np.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-8)
    for got in results:
        np.testing.assert_allclose(got, W, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("edit", ["append-sigmoid", "dropout-p", "leaky-alpha", "eval-train",
                                  "dense-activation"])
def test_model_edited_after_compile_trains_the_edited_model(edit):
    """A compiled step follows edits to the model made after compile (a layer
    appended, a Dropout rate, an activation's alpha, eval/train) as the Python path
    does; the native kernel kept running the chain it was built for."""
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((16, 4)), rng.random((16, 3))
    results = []
    for backend in (["native"] if NATIVE_BUILT else []) + ["numpy"]:
        model = nn.Sequential(nn.Dense(4, 8, rng=1, dtype=np.float64), nn.LeakyReLU(0.1),
                              nn.Dropout(0.0, seed=3), nn.Dense(8, 3, rng=2, dtype=np.float64))
        with fp.use_backend(backend):
            step = model.compile(losses.MSE(), optim.SGD(model.parameters(), lr=0.1))
            step(X, Y)
            if edit == "append-sigmoid":
                model.append(nn.Sigmoid())
            elif edit == "dropout-p":
                model[2].p = 0.5
            elif edit == "leaky-alpha":
                model[1].alpha = 0.3
            elif edit == "dense-activation":
                model[3].activation = "tanh"
                assert model[3].act == fp.backends.ACTIVATIONS["tanh"]
            else:
                model.eval()
                step(X, Y)
                model.train()
            values = [step(X, Y) for _ in range(3)]
        results.append((values, [p.value.copy() for p in model.parameters()]))
    for values, params in results[1:]:
        np.testing.assert_allclose(values, results[0][0], rtol=1e-12)
        for a, b in zip(params, results[0][1]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    if edit == "append-sigmoid":
        assert 0 < step.output.min() and step.output.max() < 1  # (the sigmoid's output)


@native_only
def test_bad_labels_are_rejected_by_the_kernel():
    model = _model(np.float32)
    with fp.use_backend("native"):
        step = model.compile(losses.SoftmaxCrossEntropy(), "adam")
        fast = step.fused()
        x = np.ones((2, 13), np.float32)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
            fast(x, (np.array([0, 4]), None))
        with pytest.raises(ValueError, match="x must be"):
            fast(np.ones((2, 12), np.float32), (np.array([0, 1]), None))


@native_only
def test_step_allocates_nothing_after_the_first():
    """After warm-up, 100 compiled steps allocate no new arrays: traced memory (NumPy
    buffers included) neither grows nor peaks by more than a few small Python objects
    (every per-batch array of this model is >= 8 KiB: batch 64 x width >= 32)."""
    model = nn.Sequential(nn.Dense(64, 128, "relu"), nn.Dense(128, 64, "relu"),
                          nn.Dense(64, 32))
    X, y = _data("labels", n=64, inputs=64, outputs=32)
    X = X.astype(np.float32)
    with fp.use_backend("native"):
        step = model.compile(losses.SoftmaxCrossEntropy(), optim.Adam(model.parameters()))
        # warm up, and fill CPython's float/tuple free lists, whose recycled objects
        # tracemalloc counts as still allocated (~2000 steps to fill when this test
        # runs alone: it failed then with 300)
        for _ in range(2500):
            step(X, y)
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            before = tracemalloc.take_snapshot()
            tracemalloc.reset_peak()
            for _ in range(100):
                step(X, y)
            current, peak = tracemalloc.get_traced_memory()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    assert current - base < 1024
    assert peak - base < 4096
    arrays = [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)]  # (NumPy's data)
    grown = after.filter_traces(arrays).compare_to(before.filter_traces(arrays), "lineno")
    assert sum(d.size_diff for d in grown) <= 0, grown[:3]


@native_only
def test_step_keeps_workspaces_for_two_batch_sizes_only():
    """Batches of ever new sizes do not pile up workspaces (each (n, 1000) size holds
    ~1.6 MB here): the step keeps the buffers of the last two sizes, which covers fit's
    full batches and its last one, and allocates nothing while those repeat."""
    model = nn.Sequential(nn.Dense(8, 1000, "relu", dtype=np.float64),
                          nn.Dense(1000, 10, dtype=np.float64))
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((130, 8)), np.arange(130) % 10
    with fp.use_backend("native"):
        step = model.compile(losses.SoftmaxCrossEntropy(), optim.SGD(model.parameters(), lr=0.01))
        step(X[:100], y[:100])
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            for n in range(101, 131):
                step(X[:n], y[:n])
            grown, _ = tracemalloc.get_traced_memory()
            for _ in range(5):          # two sizes alternating: no new buffers
                for n in (128, 130):
                    step(X[:n], y[:n])
            tracemalloc.reset_peak()
            for n in (128, 130):
                step(X[:n], y[:n])
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    ws = 2 * 130 * 1000 * 8   # one size's (y, g) for the wide layer
    assert grown - base < 3 * ws, f"{(grown - base) / ws:.1f} workspaces kept"
    assert peak - current < 4096


def test_python_path_would_fail_the_allocation_check():
    """The yardstick above can fail: the layer-by-layer path allocates per step."""
    model = nn.Sequential(nn.Dense(64, 128, "relu"), nn.Dense(128, 64, "relu"),
                          nn.Dense(64, 32))
    X, y = _data("labels", n=64, inputs=64, outputs=32)
    with fp.use_backend("numpy"):
        step = model.compile(losses.SoftmaxCrossEntropy(), optim.Adam(model.parameters()))
        step(X, y)
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            step(X, y)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak - base > 8192


def test_numpy_backend_runs_the_python_path():
    model = _model(np.float32)
    with fp.use_backend("numpy"):
        step = model.compile(losses.SoftmaxCrossEntropy(), "adam")
        X, y = _data("labels")
        step(X[:8], y[:8])
    assert step._fast is None


@native_only
def test_fit_uses_the_fused_step_and_matches_numpy():
    X, y = _data("labels", n=96)
    results = []
    for backend in ("native", "numpy"):
        model = _model(np.float64)
        with fp.use_backend(backend):
            step = model.compile("cross_entropy", optim.Adam(model.parameters()))
            hist = model.fit(X, y, epochs=3, batch_size=16, seed=3, verbose=0)
            assert model._compiled_step() is step  # (fit trained with the live step)
            if backend == "native":
                assert step._fast is not None
        results.append((model, hist))
    np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-9)
    for p, q in zip(results[0][0].parameters(), results[1][0].parameters()):
        np.testing.assert_allclose(p.value, q.value, rtol=1e-8, atol=1e-10)


@native_only
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_weight_update_matches_python_path(opt_name, batch, dtype):
    """Small batches of wide layers take the path that applies the optimizer inside
    the weight-gradient GEMM (4 n (in + out) <= in out for every layer here); it must
    agree with the layer-by-layer path, gradients included."""
    sizes = (40, 48, 36, 24)
    assert all(4 * batch * (a + b) <= a * b for a, b in zip(sizes[:-1], sizes[1:]))
    rng = np.random.default_rng(5)
    X = rng.standard_normal((12, sizes[0]))
    y = rng.integers(0, sizes[-1], 12)
    runs = []
    with fp.use_backend("native"):
        for fused in (True, False):
            model = _model(dtype, hidden=("tanh", "gelu"), sizes=sizes)
            opt = OPTIMIZERS[opt_name](model.parameters())
            _, values = _train(model, losses.SoftmaxCrossEntropy(), opt, X, y, batch=batch,
                               fused=fused)
            runs.append((model, values, opt))
    (m1, l1, o1), (m2, l2, o2) = runs
    _assert_agree(m1, m2, l1, l2, dtype)
    for a, b in zip(o1.state, o2.state):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], **TOL[dtype])


@native_only
def test_fused_weight_update_stops_on_non_finite_gradients():
    sizes = (40, 48, 36, 24)
    model = _model(np.float32, hidden=("relu", "relu"), sizes=sizes)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 40))
    with fp.use_backend("native"):
        step = model.compile(losses.MSE(), opt)
        step(x, np.zeros((2, 24)))
        step.check_finite = True
        before = [p.value.copy() for p in model.parameters()]
        for bad in (np.abs(x) * 1e20 + 1e20, np.full_like(x, 3e38)):  # (overflows)
            with pytest.raises(NonFiniteError, match="gradient|loss"):
                step(bad, np.zeros((2, 24)))
        with pytest.raises(ValueError, match="x contains 2 NaN or infinite"):  # bad input
            step(np.where(np.arange(40) == 3, np.inf, x), np.zeros((2, 24)))
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.value, b)
    assert opt.step_count == 1


@native_only
@pytest.mark.parametrize("opt_name", ["adam", "sgd-momentum-wd", "rmsprop"])
def test_fused_update_is_the_same_on_any_thread_count(opt_name):
    """Layers large enough for the threaded update region (fused dW blocks, then the
    other tensors, shared out between threads that take each other's chunks when
    done): 1, 2 and 3 threads give bit-identical parameters, gradients and state, and
    agree with the layer-by-layer path."""
    from fastprop.backends import native as nat
    sizes = (300, 256, 64, 10)
    batch = 8
    fusable = [4 * batch * (a + b) <= a * b for a, b in zip(sizes[:-1], sizes[1:])]
    assert fusable == [True, True, False]  # fused layers and a tensor updated apart
    rng = np.random.default_rng(11)
    X = rng.standard_normal((40, sizes[0]))
    y = rng.integers(0, sizes[-1], 40)
    runs = []
    before = nat.get_num_threads()
    try:
        with fp.use_backend("native"):
            for threads, fused in ((1, True), (2, True), (3, True), (2, False)):
                nat.set_num_threads(threads)
                model = _model(np.float32, hidden=("relu", "tanh"), sizes=sizes, seed=4)
                opt = OPTIMIZERS[opt_name](model.parameters())
                _, values = _train(model, losses.SoftmaxCrossEntropy(), opt, X, y, steps=6,
                                   batch=batch, fused=fused)
                runs.append((model, values, opt))
    finally:
        nat.set_num_threads(before)
    (m1, l1, o1) = runs[0]
    for m, values, o in runs[1:3]:
        np.testing.assert_array_equal(values, l1)
        for p, q in zip(m.parameters(), m1.parameters()):
            np.testing.assert_array_equal(p.value, q.value)
            np.testing.assert_array_equal(p.grad, q.grad)
        for a, b in zip(o.state, o1.state):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    _assert_agree(runs[3][0], m1, runs[3][1], l1, np.dtype(np.float32))


@native_only
def test_a_public_optimizer_attribute_named_decay_mask_changes_nothing():
    """The native step's weight-decay mask is fastprop.sklearn's private attribute: an
    AdamW given a `decay_mask` attribute trains the same on the fused and the layer
    path (the fused one used to honour it alone)."""
    X, y = _data("labels")
    runs = []
    for fused in (True, False):
        model = _model(np.float64)
        opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
        opt.decay_mask = np.zeros(len(opt.params), np.uint8)
        with fp.use_backend("native"):
            step, values = _train(model, losses.SoftmaxCrossEntropy(), opt, X, y, fused=fused)
        runs.append((model, values))
    _assert_agree(runs[0][0], runs[1][0], runs[0][1], runs[1][1], np.dtype(np.float64))


@native_only
@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
def test_groups_that_differ_only_in_weight_decay_run_fused(name):
    """No weight decay on biases (the common parameter-group setup) keeps the fused
    native step, through its per-parameter decay mask: the same results as the layer
    path, also after a group's decay changes mid-training; groups that differ in
    anything else take the layer path."""
    X, y = _data("labels")
    runs = []
    for fused in (True, False):
        model = _model(np.float64)
        weights = [layer.weight for layer in model]
        biases = [layer.bias for layer in model]
        kw = {"momentum": 0.9} if name == "SGD" else {}
        opt = getattr(optim, name)([{"params": weights, "weight_decay": 0.1},
                                    {"params": biases, "weight_decay": 0.0}], lr=0.01, **kw)
        with fp.use_backend("native"):
            step, values = _train(model, losses.SoftmaxCrossEntropy(), opt, X, y, steps=6,
                                  fused=fused)
            if fused:
                assert step._fast is not None and step._mask_key is not None
            opt.param_groups[1]["weight_decay"] = 0.05   # two nonzero values: layer path
            more = [step(X[:12], y[:12]) for _ in range(2)]
            opt.param_groups[1]["weight_decay"] = 0.1    # agree again: fused, no mask
            more += [step(X[:12], y[:12]) for _ in range(2)]
            if fused:
                assert step._mask_key is None
        runs.append((model, np.concatenate([values, more])))
    _assert_agree(runs[0][0], runs[1][0], runs[0][1], runs[1][1], np.dtype(np.float64))


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
def test_a_users_subclass_of_a_fused_layer_runs_its_own_code():
    """A subclass of Dense (or Sequential, or an activation) that changes forward or
    backward is not fused as the plain layer (its code was ignored by the native
    step: a layer zeroing its output trained as a plain Dense); one that only adds
    attributes still is."""

    class Zeroed(fp.nn.Dense):
        def forward(self, x):
            return super().forward(x) * 0.0

        def backward(self, grad_out, input_grad=True):
            return super().backward(grad_out * 0.0, input_grad)

    class Named(fp.nn.Dense):
        label = "plain"

    class Doubled(fp.nn.ReLU):
        def forward(self, x):
            return 2.0 * super().forward(x)

        def backward(self, grad_out, input_grad=True):
            return super().backward(2.0 * grad_out, input_grad)

    x = np.random.default_rng(0).standard_normal((8, 3))
    y = np.zeros(8, int)
    with fp.use_backend("native"):
        step = fp.nn.Sequential(Zeroed(3, 2, rng=0)).compile("cross_entropy", "sgd")
        assert step(x, y) == pytest.approx(np.log(2), rel=1e-7)
        assert step._fast is None
        for model, fused in [(fp.nn.Sequential(Named(3, 2, rng=0)), True),
                             (fp.nn.Sequential(fp.nn.Dense(3, 4, rng=0), Doubled(),
                                               fp.nn.Dense(4, 2, rng=1)), False)]:
            ref = copy.deepcopy(model)
            compiled = model.compile("cross_entropy", "sgd")
            got = compiled(x, y)
            want = fp.losses.SoftmaxCrossEntropy()(ref(x), y)
            assert got == pytest.approx(want, rel=1e-6)
            assert (compiled._fast is not None) == fused


def test_the_layer_path_sees_modules_added_after_its_walk_was_kept(rng):
    """The layer path keeps its walk of the module tree (buffers to restore, Dropout
    generators, parameters to zero, caches to drop) while nothing public changed; a
    BatchNorm appended later, or added to a user's container whose own ``children``
    lists a plain list (no change is signalled), has its statistics restored by a
    refused step and its caches dropped by a good one."""

    class Bag(nn.Module):  # (children from a plain list: edits are not signalled)
        def __init__(self, *mods):
            super().__init__()
            self._mods = list(mods)

        def children(self):
            return list(self._mods)

        def forward(self, x):
            for m in self._mods:
                x = m(x)
            return x

        def backward(self, g, input_grad=True):
            for m in reversed(self._mods):
                g = m.backward(g)
            return g

    X = rng.standard_normal((8, 4))
    y = rng.integers(0, 3, 8)
    for container in ("sequential", "bag"):
        first = nn.BatchNorm1d(5, affine=False, dtype=np.float64)
        dense = [nn.Dense(4, 5, dtype=np.float64), nn.Dense(5, 3, dtype=np.float64)]
        if container == "sequential":
            model = nn.Sequential(dense[0], first, dense[1])
        else:
            model = nn.Sequential(Bag(dense[0], first), dense[1])
        # (made first: making a module counts as a change)
        late = nn.BatchNorm1d(3 if container == "sequential" else 5, affine=False,
                              dtype=np.float64)
        step = model.compile("cross_entropy", optim.SGD(model.parameters(), lr=0.1))
        step(X, y)
        step(X, y)
        if container == "sequential":
            model.append(late)
        else:
            model.layers[0]._mods.append(late)
        step(X, y)
        before = late.running_mean.copy(), late.running_var.copy()
        assert late.num_batches_tracked == 1 and late._cache is None
        with pytest.raises(ValueError):
            step(X, np.full(8, 7))  # (a class id out of range: refused after forward)
        assert np.array_equal(late.running_mean, before[0]), container
        assert np.array_equal(late.running_var, before[1]) and late.num_batches_tracked == 1


def test_threads_may_share_a_loss_subclass_object():
    """Two threads train their own models with one shared object of a Loss subclass
    whose forward lets the GIL go (I/O, a sleep): each model ends as it does trained
    alone (backward read the shared object's gradient, which the other thread's
    forward could replace in between)."""
    import threading
    import time

    class Slow(losses.SoftmaxCrossEntropy):
        def forward(self, pred, target):
            value = super().forward(pred, target)
            time.sleep(0.0005)
            return value

    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((16, 5)), rng.integers(0, 3, 16)) for _ in range(2)]

    def train(i, loss, out):
        model = nn.Sequential(nn.Dense(5, 8, "tanh", rng=i), nn.Dense(8, 3, rng=i + 7))
        step = model.compile(loss, optim.SGD(model.parameters(), lr=0.1))
        for _ in range(15):
            step(*data[i])
        out[i] = [p.value.copy() for p in model.parameters()]

    alone = {}
    for i in range(2):
        train(i, Slow(), alone)
    shared, together = Slow(), {}
    threads = [threading.Thread(target=train, args=(i, shared, together)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for a, b in zip(together[i], alone[i]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("edit", ["batchnorm", "sigmoid"])
def test_a_plain_list_assigned_to_layers_and_edited_in_place_is_seen(edit, rng):
    """``model.layers = list(...)`` then an in-place edit of that list (which does not
    signal a change): the layer path's kept walk zeroes, restores and drops the new
    layer's state, and the fused kernel is rebuilt for the edited chain (it trained the
    old chain: its loss was not the model's)."""
    X = rng.standard_normal((8, 4))
    y = rng.integers(0, 3, 8)
    late = (nn.BatchNorm1d(5, affine=False, dtype=np.float64) if edit == "batchnorm"
            else nn.Sigmoid())  # (made first: making a module counts as a change)
    model = nn.Sequential(nn.Dense(4, 5, dtype=np.float64), nn.Dense(5, 3, dtype=np.float64))
    if edit == "batchnorm":
        model.append(nn.Dropout(0.0))  # (the layer path)
    model.layers = list(model.layers)
    step = model.compile("cross_entropy", optim.SGD(model.parameters(), lr=0.1))
    step(X, y)
    step(X, y)
    model.layers.insert(1, late)
    if edit == "sigmoid":  # (the step's loss is the edited model's)
        step.optimizer.lr = 0.0
        value = step.loss.value(model.predict(X), y)
        assert step(X, y) == pytest.approx(value, rel=1e-12)
    else:
        step(X, y)
        assert late.num_batches_tracked == 1 and late._cache is None
        before = late.running_mean.copy()
        with pytest.raises(ValueError):
            step(X, np.full(8, 7))
        assert np.array_equal(late.running_mean, before) and late.num_batches_tracked == 1


def _step_in_child(step, X, y, conn):
    try:
        conn.send(("ok", float(step(X, y))))
    except Exception as exc:  # (reported to the parent)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_a_fork_while_a_thread_runs_a_loss_subclass_does_not_hang_the_child():
    """The lock around a Loss subclass' forward/backward pair, held by another thread
    at the fork, is made anew in the child (the child's first step with that loss
    waited forever)."""
    import threading
    import time
    from _support import in_fork_child

    class Slow(losses.SoftmaxCrossEntropy):
        def forward(self, pred, target):
            time.sleep(0.4)
            return super().forward(pred, target)

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 4)), rng.integers(0, 3, 8)
    loss = Slow()
    steps = [nn.Sequential(nn.Dense(4, 3, rng=i)).compile(loss, "sgd") for i in range(2)]
    busy = threading.Thread(target=steps[0], args=(X, y))
    busy.start()
    time.sleep(0.1)  # (the thread is inside Slow.forward, holding the pair's lock)
    try:
        status, value = in_fork_child(_step_in_child, steps[1], X, y, timeout=30)
    finally:
        busy.join()
    assert status == "ok" and np.isfinite(value), (status, value)


def test_a_parameter_replaced_after_compile_is_warned_about_and_the_old_one_skipped(backend):
    """layer.weight = Parameter(...) after compile: the step's optimizer holds the old
    one. The step warns once (fit did; the step trained silently) and no longer
    applies the old parameter's last gradient to it (as opt.zero_grad() + step()
    in PyTorch skips a parameter whose gradient is None)."""
    import pickle
    import warnings
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 4)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    model = nn.Sequential(nn.Dense(4, 6, activation="relu", rng=0), nn.Dense(6, 3, rng=1))
    opt = optim.Adam(model.parameters(), lr=0.01)
    step = model.compile("cross_entropy", opt)
    step(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pickle.loads(pickle.dumps(step))(X, y)  # (no warning for an unchanged model)
    old = model[0].weight
    kept = old.value.copy()
    model[0].weight = fp.Parameter(np.full((4, 6), 0.3, np.float32))
    with pytest.warns(UserWarning, match=r"changed since its optimizer.*1\.weight.*compiled step"):
        step(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (once)
        step(X, y)
    np.testing.assert_array_equal(old.value, kept)
    np.testing.assert_array_equal(model[0].weight.value, np.float32(0.3))  # (not held)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model[0].weight = fp.Parameter(np.full((4, 6), 0.2, np.float32))
        model.fit(X, y, epochs=1, batch_size=8, verbose=0)
    assert len([w for w in seen if "changed since" in str(w.message)]) == 1


@pytest.mark.parametrize("given_as", ["x", "target"])
def test_step_output_given_back_trains_as_a_copy_would(backend, given_as):
    """step.output is the step's own buffer (native): given back as x (chaining) or as
    the target, the forward overwrote it before it was read (a loss of 0.0)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((16, 8)).astype(np.float32)
    Y = rng.standard_normal((16, 8)).astype(np.float32)
    results = []
    for alias in (True, False):
        model = nn.Sequential(nn.Dense(8, 8, activation="tanh", rng=0), nn.Dense(8, 8, rng=1))
        step = model.compile("mse", optim.Adam(model.parameters(), lr=0.01))
        step(X, Y)
        out = step.output if alias else step.output.copy()
        loss = step(out, Y) if given_as == "x" else step(X, out)
        results.append((loss, [p.value.copy() for p in model.parameters()]))
    (la, wa), (lb, wb) = results
    assert la == lb and la > 0
    for a, b in zip(wa, wb):
        np.testing.assert_array_equal(a, b)


def test_a_step_pickled_before_param_ids_were_kept_runs():
    """A TrainStep pickled by the version before _param_ids: its first call ran into an
    AttributeError."""
    import pickle
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 4)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    model = nn.Sequential(nn.Dense(4, 6, activation="relu", rng=0), nn.Dense(6, 3, rng=1))
    step = model.compile("cross_entropy", optim.Adam(model.parameters()))
    step(X, y)
    state = step.__getstate__()
    state.pop("_param_ids")
    old = type(step).__new__(type(step))
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    assert np.isfinite(old(X, y))
