"""fit / predict / evaluate / compile and History."""

import copy
import gc
import re

import numpy as np
import pytest

import fastprop as fp
from fastprop import nn, optim
from _support import snapshot


def blobs(rng, n=200, d=2, classes=2, spread=0.5):
    centers = 4 * rng.standard_normal((classes, d))
    y = np.arange(n) % classes
    X = centers[y] + spread * rng.standard_normal((n, d))
    return X, y


def mlp(d=2, h=8, out=2, seed=0, dtype=np.float32):
    return nn.Sequential(nn.Dense(d, h, "relu", rng=seed, dtype=dtype),
                         nn.Dense(h, out, rng=seed + 1, dtype=dtype))


def test_fit_history_and_high_accuracy(backend, rng):
    X, y = blobs(rng, n=240, classes=3)
    model = mlp(out=3)
    hist = model.fit(X, y, loss="cross_entropy", optimizer=optim.Adam(model.parameters(), 0.05),
                     epochs=15, batch_size=16, seed=0, verbose=0)
    assert isinstance(hist, fp.History)
    assert hist.epoch == list(range(15))
    assert set(hist.history) == {"loss", "accuracy"}
    assert len(hist["loss"]) == len(hist["accuracy"]) == 15
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["accuracy"][-1] >= 0.95
    pred = model.predict(X).argmax(1)
    assert np.mean(pred == y) >= 0.95
    # evaluate agrees with the loss of predict's output
    ev = model.evaluate(X, y, loss="cross_entropy")
    assert ev == pytest.approx(fp.losses.SoftmaxCrossEntropy()(model.predict(X), y), rel=1e-5)
    assert ev < 0.2


def test_fit_binary_logistic_regression(backend, rng):
    X, y = blobs(rng, n=200, classes=2)
    model = nn.Sequential(nn.Dense(2, 1, rng=0))
    hist = model.fit(X, y.astype(float), loss=fp.losses.BinaryCrossEntropy(from_logits=True),
                     optimizer=optim.SGD(model.parameters(), lr=0.5), epochs=30, verbose=0,
                     seed=1)
    assert hist["accuracy"][-1] >= 0.95
    assert hist["loss"][-1] < 0.2


def test_fit_regression_mse(backend, rng):
    X = rng.standard_normal((128, 3))
    w = np.array([[1.0], [-2.0], [0.5]])
    y = X @ w + 0.3
    model = nn.Dense(3, 1, dtype=np.float64, rng=0)
    hist = model.fit(X, y, loss="mse", optimizer=optim.SGD(model.parameters(), lr=0.1),
                     epochs=40, batch_size=16, verbose=0, seed=0)
    assert set(hist.history) == {"loss"}
    assert hist["loss"][-1] < 1e-6
    assert np.allclose(model.weight.value, w, atol=1e-3)
    assert model.bias.value[0] == pytest.approx(0.3, abs=1e-3)


def test_validation_split_holds_out_the_last_samples(backend, rng):
    X, y = blobs(rng, n=100, classes=2)
    model = mlp()
    hist = model.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(model.parameters(), lr=0.1),
                     epochs=3, validation_split=0.2, shuffle=False, seed=0, verbose=0)
    assert set(hist.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(hist["val_loss"]) == 3
    Xv, yv = X[-20:], y[-20:]
    assert hist["val_loss"][-1] == pytest.approx(model.evaluate(Xv, yv, loss="cross_entropy"),
                                                 rel=1e-6)
    acc = np.mean(model.predict(Xv).argmax(1) == yv)
    assert hist["val_accuracy"][-1] == pytest.approx(acc)


def test_validation_split_trains_only_on_the_first_samples(backend, rng):
    """One full-batch epoch equals one manual step on the first 80% of the data."""
    X, y = blobs(rng, n=50, classes=2)
    model = mlp(dtype=np.float64)
    twin = copy.deepcopy(model)
    model.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(model.parameters(), lr=0.1),
              epochs=1, batch_size=1000, validation_split=0.2, shuffle=False, verbose=0)
    opt = optim.SGD(twin.parameters(), lr=0.1)
    loss = fp.losses.SoftmaxCrossEntropy()
    twin.zero_grad()
    loss(twin(X[:40]), y[:40])
    twin.backward(loss.backward())
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert np.allclose(p.value, q.value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n, split, held", [(100, 0.29, 29), (100, 0.57, 57), (5, 0.1, 1),
                                             (9, 0.2, 2)])
def test_validation_split_holds_out_as_keras(rng, n, split, held):
    """validation_split holds out n - int(n (1 - split)) samples, as Keras: 0.29 of 100
    is 29 (floor(100 x 0.29) was 28), and 0.1 of 5 is 1 (it was refused)."""
    X, y = blobs(rng, n=n, classes=2)
    runs = []
    for kw in ({"validation_split": split},
               {"validation_data": (X[n - held:], y[n - held:])}):
        model = mlp(dtype=np.float64)
        data = (X, y) if "validation_split" in kw else (X[:n - held], y[:n - held])
        runs.append(model.fit(*data, loss="cross_entropy", optimizer="sgd", epochs=2,
                              batch_size=4, shuffle=False, verbose=0, **kw).history)
    assert runs[0] == runs[1]


def test_fit_leaves_the_step_and_reads_the_remembered_loss(backend, rng):
    """fit gives a compiled step its own check_finite setting back; evaluate without
    loss= uses the loss of the last compile or fit even when its step is no longer
    held; a callback returning a NumPy True stops the training, as True does."""
    X, y = blobs(rng, n=64, classes=2)
    model = mlp()
    step = model.compile("cross_entropy", "adam")
    assert step.check_finite is False
    model.fit(X, y, epochs=1, verbose=0)
    assert step.check_finite is False
    del step
    gc.collect()
    want = fp.losses.SoftmaxCrossEntropy().value(model.predict(X), y)
    assert model.evaluate(X, y) == pytest.approx(want, rel=1e-6)
    other = mlp()
    other.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=1, verbose=0)
    gc.collect()
    assert other.evaluate(X, y) > 0
    hist = other.fit(X, y, epochs=5, verbose=0,
                     callbacks=[lambda epoch, logs: np.float64(epoch) >= 1])
    assert hist.stopped_epoch == 1 and len(hist["loss"]) == 2
    with pytest.raises(ValueError, match="evaluate needs loss="):
        mlp().evaluate(X, y)


def test_validation_data(backend, rng):
    X, y = blobs(rng, n=80, classes=2)
    Xv, yv = blobs(np.random.default_rng(99), n=30, classes=2)
    model = mlp()
    hist = model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=2,
                     validation_data=(Xv, yv), verbose=0, seed=0)
    assert len(hist["val_loss"]) == 2 and len(hist["val_accuracy"]) == 2
    assert hist["val_loss"][-1] == pytest.approx(model.evaluate(Xv, yv, loss="cross_entropy"),
                                                 rel=1e-6)


def _train_with_dropout(seed, X, y):
    model = nn.Sequential(nn.Dense(2, 16, "relu", rng=0), nn.Dropout(0.3),
                          nn.Dense(16, 2, rng=1))
    hist = model.fit(X, y, loss="cross_entropy", optimizer=optim.Adam(model.parameters(), 0.01),
                     epochs=3, batch_size=8, seed=seed, verbose=0)
    return model, hist


def test_seeded_fit_is_reproducible(backend, rng):
    X, y = blobs(rng, n=64)
    m1, h1 = _train_with_dropout(5, X, y)
    m2, h2 = _train_with_dropout(5, X, y)
    m3, _ = _train_with_dropout(6, X, y)
    assert h1.history == h2.history
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert np.array_equal(p.value, q.value)
    assert any(not np.array_equal(p.value, q.value)
               for p, q in zip(m1.parameters(), m3.parameters()))


def test_shuffle_changes_the_batches(backend, rng):
    X, y = blobs(rng, n=64)
    results = []
    for shuffle in (False, True):
        model = mlp()
        model.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(model.parameters(), lr=0.1),
                  epochs=1, batch_size=8, shuffle=shuffle, seed=0, verbose=0)
        results.append(model[0].weight.value.copy())
    assert not np.array_equal(*results)


def test_verbose_0_prints_nothing(backend, rng, capfd):
    X, y = blobs(rng, n=40)
    model = mlp()
    model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=2, verbose=0,
              validation_split=0.25)
    model.predict(X)
    model.evaluate(X, y, loss="cross_entropy")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_verbose_1_and_2_report_progress(backend, rng, capfd):
    X, y = blobs(rng, n=40)
    model = mlp()
    model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=2, verbose=2)
    out, err = capfd.readouterr()
    assert "Epoch 1/2" in out and "Epoch 2/2" in out and "loss" in out
    model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=1, verbose=1)
    out, err = capfd.readouterr()
    text = out + err
    assert "Epoch 1/1" in text and "samples/s" in text  # (tqdm's rate, once)
    assert re.search(r"loss=\d\.\d{4}", text) and re.search(r"accuracy=\d\.\d{4}", text)
    assert text.count("samples/s") == text.count("Epoch 1/1"), text


def test_compile_step_equals_manual_step(backend, rng):
    X, y = blobs(rng, n=16, classes=3)
    model = nn.Sequential(nn.Dense(2, 5, "tanh", rng=0), nn.Dense(5, 3, rng=1))
    twin = copy.deepcopy(model)
    step = model.compile(loss="cross_entropy", optimizer=optim.Adam(model.parameters(), 0.01))
    twin_opt = optim.Adam(twin.parameters(), 0.01)
    twin_loss = fp.losses.SoftmaxCrossEntropy()
    for _ in range(3):
        value = step(X, y)
        twin.zero_grad()
        out = twin(X)
        ref = twin_loss(out, y)
        twin.backward(twin_loss.backward())
        twin_opt.step()
        assert value == pytest.approx(ref, rel=1e-6)
        assert np.allclose(step.output, out, rtol=1e-5, atol=1e-6)
    step.sync()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert np.allclose(p.value, q.value, rtol=1e-5, atol=1e-6)
        assert np.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    # fit and evaluate pick up the compiled loss and optimizer
    hist = model.fit(X, y, epochs=1, verbose=0)
    assert "accuracy" in hist.history
    assert model.evaluate(X, y) == pytest.approx(
        fp.losses.SoftmaxCrossEntropy()(model.predict(X), y), rel=1e-6)


def test_compile_step_python_path_with_non_dense_layers(backend, rng):
    X, y = blobs(rng, n=16)
    model = nn.Sequential(nn.Dense(2, 4, rng=0), nn.LayerNorm(4), nn.ReLU(), nn.Dense(4, 2, rng=1))
    twin = copy.deepcopy(model)
    step = model.compile("cross_entropy", optim.SGD(model.parameters(), lr=0.1))
    value = step(X, y)
    loss = fp.losses.SoftmaxCrossEntropy()
    ref = loss(twin(X), y)
    twin.backward(loss.backward())
    optim.SGD(twin.parameters(), lr=0.1).step()
    assert value == pytest.approx(ref, rel=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert np.allclose(p.value, q.value, rtol=1e-5, atol=1e-6)


def test_predict_batches_and_modes(backend, rng):
    model = nn.Sequential(nn.Dense(3, 4, "relu", rng=0), nn.BatchNorm1d(4), nn.Dropout(0.5),
                          nn.Dense(4, 2, rng=1))
    X = rng.standard_normal((23, 3))
    model.train()
    full = model.predict(X)
    assert all(m.training for m in model.modules())  # mode restored
    assert full.shape == (23, 2) and full.dtype == np.float32
    assert np.array_equal(model.predict(X, batch_size=5), full)
    model.eval()
    assert np.array_equal(model(X.astype(np.float32)), full)   # eval: no dropout
    assert model.predict(np.empty((0, 3))).shape == (0, 2)
    out = model.predict(X[:4])
    out[...] = 0  # predict returns a fresh array
    assert np.array_equal(model.predict(X[:4]), full[:4])


def test_fit_zero_epochs_changes_nothing(backend, rng):
    X, y = blobs(rng, n=20)
    model = mlp()
    opt = optim.Adam(model.parameters())
    before = snapshot(model, opt)
    hist = model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=0, verbose=0)
    assert hist.epoch == [] and hist.history == {}
    assert snapshot(model, opt) == before


def test_fit_last_partial_batch_and_float64_model(backend, rng):
    X, y = blobs(rng, n=21)
    model = mlp(dtype=np.float64)
    step_counts = []
    opt = optim.SGD(model.parameters(), lr=0.1)
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=8, verbose=0)
    step_counts.append(opt.step_count)
    assert step_counts == [6]  # ceil(21 / 8) = 3 steps per epoch
    assert model[0].weight.dtype == np.float64


def test_nonfinite_raises_and_keeps_parameters(backend, rng):
    X, y = blobs(rng, n=16)
    model = mlp()
    opt = optim.SGD(model.parameters(), lr=0.1)
    model[1].bias.value[0] = np.nan
    before = [p.value.tobytes() for p in model.parameters()]
    state = snapshot(optimizer=opt)
    with np.errstate(all="ignore"):
        with pytest.raises(fp.NonFiniteError):
            model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, verbose=0)
    assert [p.value.tobytes() for p in model.parameters()] == before
    assert snapshot(optimizer=opt) == state
    assert opt.step_count == 0
    with np.errstate(all="ignore"):
        hist = model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=4,
                         verbose=0, on_nonfinite="skip")
    assert hist.skipped_steps == 4
    assert opt.step_count == 0


def test_rejected_fit_leaves_dropout_generators_untouched(backend, rng):
    """fit(seed=...) reseeds Dropout only once every check has passed."""
    X = rng.standard_normal((5, 4))
    make = lambda: nn.Sequential(nn.Dense(4, 6, rng=1), nn.BatchNorm1d(6),  # noqa: E731
                                 nn.Dropout(0.5, seed=123), nn.Dense(6, 2, rng=2))
    model, ref = make(), make()
    with pytest.raises(ValueError, match="batch of 1 sample"):
        model.fit(X, np.zeros((5, 2)), loss="mse", optimizer="sgd", batch_size=2, seed=0,
                  verbose=0)
    assert model[2].rng.bit_generator.state == ref[2].rng.bit_generator.state


def test_large_finite_gradients_are_not_reported_non_finite(backend):
    """float64 gradients above ~1e154 overflow a sum of squares; fit's finiteness
    check must not call them non-finite (it did on the Python step path)."""
    X = np.array([[1e160, 0.0], [0.0, 1.0]])
    model = nn.Sequential(nn.Dense(2, 2, rng=0, dtype=np.float64))
    model[0].weight.value[...] = [[1e-170, 0.0], [0.0, 1.0]]
    hist = model.fit(X, np.array([0, 1]), loss="cross_entropy",
                     optimizer=optim.SGD(model.parameters(), lr=0.0), batch_size=2,
                     shuffle=False, verbose=0)
    assert np.isfinite(hist["loss"][0])
    assert np.abs(model[0].weight.grad).max() > 1e159


def test_a_trained_model_copies_pickles_and_gradchecks(backend, rng):
    """fit / compile cache the compiled step on the model; deepcopy, pickle and
    fp.gradcheck (which copies the module) must still work, without the cache."""
    import pickle
    X, y = blobs(rng, n=16)
    model = mlp(dtype=np.float64)
    model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=1, verbose=0)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert getattr(clone, "_compiled", None) is None
        np.testing.assert_array_equal(clone.predict(X), model.predict(X))
    assert fp.gradcheck(model, X[:4])
    assert model._compile_args is not None  # the original keeps its loss and optimizer


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copy_keeps_what_compile_set(backend, rng, how):
    """A pickled or copied model keeps its compiled loss, optimizer (with its state,
    bound to the copy's parameters) and clipping: the same fit call, with or without
    loss=/optimizer=, trains the copy exactly as the original (the clipping was
    dropped, so a resumed run trained unclipped, silently)."""
    import pickle
    X, y = blobs(rng, n=32)
    model = mlp(dtype=np.float64)
    # (SGD with momentum: Adam's step is nearly blind to a gradient's scale)
    loss, opt = fp.losses.SoftmaxCrossEntropy(), optim.SGD(model.parameters(), 0.5, 0.9)
    model.compile(loss=loss, optimizer=opt, clip_grad_norm=0.05)
    model.fit(X, y, loss=loss, optimizer=opt, epochs=1, batch_size=8, seed=0, verbose=0)
    twin, opt2, loss2 = (pickle.loads(pickle.dumps((model, opt, loss))) if how == "pickle"
                         else copy.deepcopy((model, opt, loss)))
    assert twin._compile_args == (loss2, opt2)
    assert [id(p) for p in opt2.params] == [id(p) for p in twin.parameters()]
    model.fit(X, y, loss=loss, optimizer=opt, epochs=1, batch_size=8, seed=1, verbose=0)
    twin.fit(X, y, loss=loss2, optimizer=opt2, epochs=1, batch_size=8, seed=1, verbose=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        np.testing.assert_array_equal(a.value, b.value)
    model.fit(X, y, epochs=1, batch_size=8, seed=2, verbose=0)  # (compile-then-fit)
    twin.fit(X, y, epochs=1, batch_size=8, seed=2, verbose=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        np.testing.assert_array_equal(a.value, b.value)
    unclipped = copy.deepcopy(twin)
    unclipped._compile_clips = (None, None)
    unclipped.fit(X, y, epochs=1, batch_size=8, seed=3, verbose=0)
    twin.fit(X, y, epochs=1, batch_size=8, seed=3, verbose=0)
    assert any(not np.array_equal(a.value, b.value)  # (the test can tell)
               for a, b in zip(unclipped.parameters(), twin.parameters()))


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_step_copied_with_its_model_stays_its_compiled_step(backend, rng, how):
    """Model, optimizer and compiled step copied together (a snapshot of the training
    state): the copied step is the copy's compiled step, so clipping set on it reaches
    the copy's fit as it does the original's (the copy was detached from its model,
    and its fit trained unclipped).  A step copied without its model changes
    nothing of another model."""
    import pickle
    X, y = blobs(rng, n=32)
    runs = []
    for copied in (False, True):
        model = mlp(dtype=np.float64)
        opt = optim.SGD(model.parameters(), 0.5, 0.9)
        step = model.compile(fp.losses.SoftmaxCrossEntropy(), opt)
        if copied:
            both = (model, opt, step)
            model, opt, step = (pickle.loads(pickle.dumps(both)) if how == "pickle"
                                else copy.deepcopy(both))
            assert model._compiled_step() is step
        step.clip_grad_norm = 0.05
        model.fit(X, y, epochs=1, batch_size=8, seed=0, verbose=0)
        runs.append(model)
    for a, b in zip(*(m.parameters() for m in runs)):
        np.testing.assert_array_equal(a.value, b.value)
    lone = copy.deepcopy(step)  # (its own copy of the model: not runs[1]'s step)
    assert runs[1]._compiled_step() is step and lone.model._compiled_step() is lone


def test_fit_with_the_compiled_loss_by_name_keeps_the_compiled_clipping(backend, rng):
    """``compile("mse", opt, clip_grad_norm=...)`` then ``fit(..., loss="mse",
    optimizer=opt)``: the name makes the compiled loss, so fit clips as with
    ``fit(X, y)`` (the name made a new loss object and fit trained unclipped).  A
    name for another loss (other options) is a new loss, unclipped, as before."""
    X, y = rng.standard_normal((8, 10)) * 10, rng.standard_normal((8, 3)) * 10
    moved = {}
    for case, kw in (("plain", {}), ("named", {"loss": "mse"}), ("other", {"loss": "l1"})):
        model = mlp(d=10, h=7, out=3, dtype=np.float64)
        opt = optim.SGD(model.parameters(), lr=0.1)
        model.compile("mse", opt, clip_grad_norm=0.01)
        w0 = model.parameters()[0].value.copy()
        model.fit(X, y, epochs=1, batch_size=8, shuffle=False, verbose=0, optimizer=opt, **kw)
        moved[case] = np.linalg.norm(model.parameters()[0].value - w0)
    assert moved["named"] == moved["plain"] <= 0.1 * 0.01 * (1 + 1e-9)
    assert moved["other"] > 10 * moved["plain"]


def test_fit_syncs_a_device_step_for_a_users_batch_callback_only(rng, monkeypatch):
    """fit brings a device step's values to the host before each batch callback of the
    user's (which may read or clip the weights in place), not for fastprop's own
    every_batch scheduler, which only sets the lr (a sync a batch costs a copy of
    every parameter and moment each way on a GPU)."""
    from fastprop import train as _train
    X, y = blobs(rng, n=32)
    calls = []
    monkeypatch.setattr(_train.TrainStep, "sync", lambda self: calls.append(1))
    for cb, want in ((lambda opt: fp.lr_scheduler.every_batch(
                         fp.lr_scheduler.StepLR(opt, 2)), False),
                     (lambda opt: type("Hook", (), {"on_train_batch_end":
                                                    lambda self, b, logs=None: None})(), True)):
        model = mlp()
        opt = optim.SGD(model.parameters(), lr=0.1)
        calls.clear()
        model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=4,
                  verbose=0, callbacks=[cb(opt)])
        assert (len(calls) >= 8) is want, len(calls)  # (8 batches)


def test_a_second_moment_that_overflowed_resumes_as_it_would_have_run(tmp_path, monkeypatch):
    """A finite float32 gradient above ~1e19 (loss in range: documented, as in PyTorch)
    overflows Adam's second moment to +inf; fit checkpoints it, and resume=True took
    its own checkpoint for a corrupt one.  Now the run resumes bit-identically;
    NaN, -inf, or inf in a first moment or a parameter, is still refused."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, 5)).astype(np.float32)
    X[3] *= 1e25
    y = rng.integers(0, 3, 8)

    def run(path, epochs, resume=False):
        fp.init.seed(0)
        model = nn.Sequential(nn.Dense(5, 8, activation="relu"), nn.Dense(8, 3))
        opt = optim.Adam(model.parameters(), lr=1e-3)
        model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=epochs, batch_size=4,
                  shuffle=False, verbose=0, checkpoint=path, resume=resume)
        return model, opt

    whole, opt = run(str(tmp_path / "a.ckpt"), 3)
    assert any(np.isposinf(a).any() for st in opt.state for a in st.values())
    run(str(tmp_path / "b.ckpt"), 2)
    resumed, _ = run(str(tmp_path / "b.ckpt"), 3, resume=True)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        np.testing.assert_array_equal(p.value, q.value)
    from fastprop import checkpoint as ck
    read = ck.serialization._read
    for name, bad in (("exp_avg", np.nan), ("exp_avg", np.inf), ("exp_avg_sq", np.nan),
                      ("exp_avg_sq", -np.inf)):
        def poisoned(path, name=name, bad=bad):
            header, arrays, rest = read(path)
            key = f"extra.opt.0.{name}"
            arrays = {**arrays, key: np.full_like(arrays[key], bad)}
            return header, arrays, rest

        monkeypatch.setattr(ck.serialization, "_read", poisoned)
        with pytest.raises(ValueError, match="holds NaN or infinite values"):
            run(str(tmp_path / "b.ckpt"), 3, resume=True)


class _PlainMSE(fp.losses.MSE):
    """A user's loss class that pickles."""


class _LockedMSE(fp.losses.MSE):
    """A user's loss that cannot be copied (it holds a lock)."""

    def __init__(self):
        super().__init__()
        import threading
        self.lock = threading.Lock()


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copy_of_a_compiled_model_warns_of_a_replaced_layer_and_copies_any_loss(rng, how):
    """A copy keeps the parameters the model had at compile time: a layer replaced in
    the copy is warned about by fit, as in the original (the copy lost them, and
    fit left the new layer untrained silently).  A model compiled with a user's loss
    class copies, pickles and gradchecks as an uncompiled one (without the compile
    settings: such a loss may not copy), and gradcheck copies no optimizer."""
    import pickle
    X, y = blobs(rng, n=16)
    model = mlp(dtype=np.float64)
    model.compile(loss="cross_entropy", optimizer=optim.Adam(model.parameters()))
    model.fit(X, y, epochs=1, verbose=0)
    twin = pickle.loads(pickle.dumps(model)) if how == "pickle" else copy.deepcopy(model)
    twin.layers[-1] = nn.Dense(twin.layers[-1].weight.shape[0], 2, rng=5, dtype=np.float64)
    with pytest.warns(UserWarning, match="the model has changed since its optimizer"):
        twin.fit(X, y, epochs=1, verbose=0)
    locked = mlp(dtype=np.float64)
    locked.compile(loss=_LockedMSE(), optimizer=optim.SGD(locked.parameters(), 0.1))
    clone = pickle.loads(pickle.dumps(locked)) if how == "pickle" else copy.deepcopy(locked)
    assert "_compile_args" not in clone.__dict__
    plain = mlp(dtype=np.float64)
    plain.compile(loss=_PlainMSE(), optimizer=optim.SGD(plain.parameters(), 0.1))
    clone = pickle.loads(pickle.dumps(plain)) if how == "pickle" else copy.deepcopy(plain)
    assert isinstance(clone._compile_args[0], _PlainMSE)  # (a user's class that pickles)
    assert fp.gradcheck(locked, X[:3])
    assert "_compile_args" in locked.__dict__


def test_fit_trains_in_training_mode(backend, rng):
    """fit switches an eval-mode model to training mode: BatchNorm updates its running
    statistics, as it only does in training."""
    X, y = blobs(rng, n=32)
    model = nn.Sequential(nn.Dense(2, 4, rng=0), nn.BatchNorm1d(4), nn.Dense(4, 2, rng=1))
    model.eval()
    before = model[1].running_mean.copy()
    model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(model[1].running_mean, before)
    assert all(m.training for m in model.modules())


def test_fit_keeps_a_frozen_submodule_in_eval_mode(backend, rng):
    """model.train(); bn.eval(): fit trains the rest and leaves that BatchNorm frozen
    (running statistics unchanged, normalising with them), as the same steps by hand
    do; a batch of 1 is allowed since no BatchNorm uses batch statistics."""
    X, y = blobs(rng, n=33)

    def make():
        model = nn.Sequential(nn.Dense(2, 4, rng=0, dtype=np.float64), nn.BatchNorm1d(4, dtype=np.float64),
                              nn.Dense(4, 2, rng=1, dtype=np.float64))
        model[1].running_mean[:] = [0.5, -0.25, 1.0, 0.0]
        model[1].running_var[:] = [2.0, 0.5, 1.0, 3.0]
        model.train()
        model[1].eval()
        return model

    model = make()
    stats = model[1].running_mean.copy(), model[1].running_var.copy()
    w0 = model[0].weight.value.copy()
    model.fit(X, y, loss="cross_entropy", optimizer=fp.optim.SGD(model.parameters(), lr=0.1),
              epochs=2, batch_size=8, shuffle=False, verbose=0)
    np.testing.assert_array_equal(model[1].running_mean, stats[0])
    np.testing.assert_array_equal(model[1].running_var, stats[1])
    assert model.training and model[0].training and not model[1].training
    assert not np.array_equal(model[0].weight.value, w0)

    ref = make()  # the same steps by hand
    opt = fp.optim.SGD(ref.parameters(), lr=0.1)
    loss = fp.losses.SoftmaxCrossEntropy()
    for _ in range(2):
        for s in range(0, 33, 8):
            ref.zero_grad()
            loss.forward(ref(X[s:s + 8]), y[s:s + 8])
            ref.backward(loss.backward())
            opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        np.testing.assert_allclose(a.value, b.value, rtol=1e-12, atol=1e-14)

    # the last batch holds 1 sample: fine with the BatchNorm frozen, refused otherwise
    model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=1, batch_size=16, verbose=0)
    model[1].train()
    with pytest.raises(ValueError, match="BatchNorm1d needs more than 1 sample"):
        model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=1, batch_size=16, verbose=0)


def test_fit_wrong_width_names_x_and_rejected_fit_keeps_caches(backend, rng):
    """A fit rejected for X's width names X and its real shape; any rejected fit
    leaves the layers' caches of the user's own last forward, so its backward works."""
    model = nn.Sequential(nn.Dense(4, 8, rng=0), nn.BatchNorm1d(8), nn.Dense(8, 3, rng=1))
    with pytest.raises(ValueError, match=r"X has 3 features \(shape \(40, 3\)\) but the "
                                         r"model's first layer Dense\(in_features=4.* expects 4"):
        model.fit(np.zeros((40, 3)), np.zeros(40, int), loss="cross_entropy",
                  optimizer="sgd", verbose=0)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    out = model(x)
    g = rng.standard_normal(out.shape).astype(np.float32)
    model.zero_grad()
    expected = model.backward(g).copy()
    model(x)
    model.zero_grad()
    before = snapshot(model)
    with pytest.raises(ValueError, match="labels must lie in"):  # rejected after the probe
        model.fit(x, np.array([0, 1, 2, 3, 0]), loss="cross_entropy", optimizer="sgd", verbose=0)
    assert snapshot(model) == before
    np.testing.assert_array_equal(model.backward(g), expected)


def test_fit_a_model_whose_custom_first_module_changes_the_width(backend, rng):
    """The width message is given only when the model refuses X: a user module that
    widens the input before the first Dense (x -> [x, x^2]) trains as before."""
    class Square(nn.Module):
        def forward(self, x):
            self._x = np.asarray(x, np.float32)
            return np.hstack([self._x, self._x ** 2])

        def backward(self, g, input_grad=True):
            d = self._x.shape[1]
            return g[:, :d] + 2 * self._x * g[:, d:]

    X = rng.standard_normal((32, 3)).astype(np.float32)
    model = nn.Sequential(Square(), nn.Dense(6, 1, rng=0))
    h = model.fit(X, (X ** 2).sum(1, keepdims=True), loss="mse", optimizer="adam", epochs=2,
                  verbose=0)
    assert len(h["loss"]) == 2
    with pytest.raises(ValueError, match=r"X of shape \(32, 2\) does not fit the model: "
                                         r"Dense\(6, 1\): expected input of shape"):
        model.fit(X[:, :2], X[:, :1], loss="mse", optimizer="adam", verbose=0)


def test_evaluate_is_batch_size_independent(backend, rng):
    X, y = blobs(rng, n=37, classes=3)
    model = mlp(out=3, dtype=np.float64)
    full = model.evaluate(X, y, loss="cross_entropy")
    assert model.evaluate(X, y, loss="cross_entropy", batch_size=5) == pytest.approx(full,
                                                                                   rel=1e-12)
    assert full == pytest.approx(fp.losses.SoftmaxCrossEntropy()(model.predict(X), y), rel=1e-12)


def test_binary_accuracy_with_several_outputs_is_a_fraction(backend, rng):
    """Accuracy of a multi-label BCE model is the fraction of correct elements."""
    X = rng.standard_normal((40, 3))
    Y = (X > 0).astype(float)
    model = nn.Dense(3, 3, rng=0)
    hist = model.fit(X, Y, loss=fp.losses.BinaryCrossEntropy(from_logits=True),
                     optimizer=optim.SGD(model.parameters(), lr=0.0), epochs=1, verbose=0,
                     validation_split=0.25)
    out = model.predict(X)
    train_acc = np.mean((out[:30] > 0) == (Y[:30] > 0.5))
    val_acc = np.mean((out[30:] > 0) == (Y[30:] > 0.5))
    assert hist["accuracy"][0] == pytest.approx(train_acc)
    assert hist["val_accuracy"][0] == pytest.approx(val_acc)
    assert all(type(v) is float for v in hist["accuracy"] + hist["val_accuracy"])


def test_module_methods_document_and_take_the_train_functions_arguments():
    """model.fit/predict/evaluate/compile take exactly fastprop.train's arguments (a
    typo such as epoch=3 is a TypeError) and carry their documentation."""
    import inspect

    from fastprop import train
    pairs = [(nn.Module.fit, train.fit), (nn.Module.predict, train.predict),
             (nn.Module.evaluate, train.evaluate), (nn.Module.compile, train.compile_step)]
    for method, function in pairs:
        m = list(inspect.signature(method).parameters.values())[1:]
        f = list(inspect.signature(function).parameters.values())[1:]
        assert [(p.name, p.kind, p.default) for p in m] == [(p.name, p.kind, p.default) for p in f]
        assert method.__doc__ == function.__doc__ and len(function.__doc__) > 40
    with pytest.raises(TypeError, match="epoch"):
        mlp().fit(np.zeros((4, 2)), np.zeros(4, int), loss="cross_entropy", optimizer="sgd",
                  epoch=3)


def test_softmax_output_with_softmax_cross_entropy_warns():
    """A model ending in a softmax trained with a loss that applies softmax itself
    (a Keras port: Dense(..., "softmax") + "categorical_crossentropy") warns; so does a
    sigmoid output with BCE from logits.  The right pairs do not."""
    X, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    for last in (nn.Softmax(), None):
        layers = [nn.Dense(2, 2, "softmax" if last is None else None), nn.Dropout(0.0)]
        model = nn.Sequential(*layers, *([last] if last is not None else []))
        for loss in ("categorical_crossentropy", "cross_entropy", fp.losses.SoftmaxCrossEntropy()):
            with pytest.warns(UserWarning, match="ends in a softmax.*takes logits"):
                model.compile(loss, "sgd")
            with pytest.warns(UserWarning, match="ends in a softmax"):
                model.fit(X, y, loss=loss, optimizer="sgd", verbose=0)
    sig = nn.Sequential(nn.Dense(2, 1), nn.Sigmoid())
    with pytest.warns(UserWarning, match="ends in a sigmoid") as record:
        sig.compile(fp.losses.BinaryCrossEntropy(from_logits=True), "sgd")
    assert record[0].filename == __file__  # (the user's line, not fastprop's)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sig.compile("binary_crossentropy", "sgd")            # probabilities: right
        nn.Sequential(nn.Dense(2, 2), nn.Identity()).compile("cross_entropy", "sgd")
        nn.Sequential(nn.Dense(2, 2, "softmax"), nn.Dense(2, 2)).compile("cross_entropy", "sgd")
        nn.Sequential(nn.Dense(2, 1)).compile(fp.losses.BinaryCrossEntropy(from_logits=True), "sgd")


def test_astype_converts_a_model_and_mixed_dtypes_warn(backend, rng):
    """A float64 model with a default (float32) BatchNorm warns at compile/fit; after
    model.astype(np.float64) every parameter, gradient and buffer is float64, the model
    trains without the warning and passes a float64 gradient check; an optimizer made
    before the cast refuses to step."""
    import warnings
    X, y = blobs(rng, n=16)
    model = nn.Sequential(nn.Dense(2, 4, rng=0, dtype=np.float64), nn.BatchNorm1d(4),
                          nn.Dense(4, 2, rng=1, dtype=np.float64))
    with pytest.warns(UserWarning, match=r"mixes float32 and float64 layers .*BatchNorm1d"):
        model.compile("cross_entropy", "sgd")
    with pytest.warns(UserWarning, match="mixes"):  # (trains; the native fit's gradient
        model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=1, batch_size=8,
                  verbose=0)                       # check raised TypeError on two dtypes)
    old = optim.Adam(model.parameters())
    old.step()
    before = model.predict(X)
    assert model.astype(np.float64) is model
    for p in model.parameters():
        assert p.value.dtype == p.grad.dtype == np.float64 and not p.grad.any()
    assert all(a.dtype == (np.int64 if n.endswith("num_batches_tracked") else np.float64)
               for n, a in model.state_arrays())
    np.testing.assert_allclose(model.predict(X), before, rtol=1e-5, atol=1e-6)  # (BN: float32)
    with pytest.raises(ValueError, match="optimizer state"):
        old.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=2, batch_size=8, verbose=0)
    assert fp.gradcheck(model, X[:4])
    model.astype("float32")
    assert {p.dtype for p in model.parameters()} == {np.dtype(np.float32)}
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        model.astype(np.int32)


def test_fit_callbacks_schedule_the_lr_and_stop(backend, rng, tmp_path):
    """Callbacks run after each epoch with its logs: an lr schedule set there is used
    from the next epoch on (the same parameters as fits of one epoch each with that
    lr, on the fused and the Python path); one returning True stops the fit, recorded
    in History.stopped_epoch; a stopped run's checkpoint resumes as finished."""
    X, y = blobs(rng, n=40)

    def run(fused):
        model = mlp(dtype=np.float64)
        opt = optim.SGD(model.parameters(), lr=0.1)
        seen = []

        def schedule(epoch, logs):
            seen.append((epoch, sorted(logs)))
            opt.lr = 0.1 * 0.5 ** (epoch + 1)

        step = model.compile("cross_entropy", opt)
        if not fused:
            step.fused = lambda: None
        h = model.fit(X, y, epochs=3, batch_size=8, shuffle=False, verbose=0,
                      callbacks=[schedule])
        return model, seen, h

    model, seen, h = run(True)
    assert seen == [(e, ["accuracy", "loss"]) for e in range(3)] and h.stopped_epoch is None
    ref = mlp(dtype=np.float64)
    for e in range(3):
        ref.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(ref.parameters(), lr=0.1 * 0.5 ** e),
                epochs=1, batch_size=8, shuffle=False, verbose=0)
    python_path, _, _ = run(False)
    for a, b, c in zip(model.parameters(), ref.parameters(), python_path.parameters()):
        np.testing.assert_array_equal(a.value, b.value)
        np.testing.assert_allclose(a.value, c.value, rtol=1e-12, atol=1e-14)

    # stopping, and a checkpoint of a stopped run
    calls = []
    model = mlp()
    h = model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=10, verbose=0,
                  checkpoint=tmp_path / "run.ckpt", checkpoint_every=100,
                  callbacks=[lambda e, logs: calls.append(e), lambda e, logs: e == 2])
    assert calls == [0, 1, 2] and h.epoch == [0, 1, 2] and h.stopped_epoch == 2
    weights = [p.value.copy() for p in model.parameters()]
    again = model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=10, verbose=0,
                      checkpoint=tmp_path / "run.ckpt", resume=True,
                      callbacks=[lambda e, logs: calls.append(e)])
    assert again.epoch == [0, 1, 2] and again.stopped_epoch == 2 and calls == [0, 1, 2]
    for p, w in zip(model.parameters(), weights):
        np.testing.assert_array_equal(p.value, w)

    for bad in (print, [1], "cb"):
        with pytest.raises(TypeError, match="callbacks"):
            model.fit(X, y, loss="cross_entropy", optimizer="sgd", verbose=0, callbacks=bad)


def test_early_stopping(rng):
    es = fp.EarlyStopping(monitor="val_loss", patience=2, min_delta=0.01)
    stops = [es(e, {"val_loss": v}) for e, v in enumerate([1.0, 0.8, 0.795, 0.792])]
    assert stops == [False, False, False, True] and (es.best, es.best_epoch) == (0.8, 1)
    acc = fp.EarlyStopping(monitor="val_accuracy", patience=0)
    assert [acc(e, {"val_accuracy": v}) for e, v in enumerate([0.5, 0.6, 0.6])] == [False, False, True]
    assert fp.EarlyStopping(monitor="loss", patience=1)(0, {"loss": 1.0}) is False
    nan = fp.EarlyStopping(monitor="loss", patience=1)
    assert [nan(e, {"loss": v}) for e, v in enumerate([np.nan, 2.0, np.nan])] == [False, False, True]
    assert nan.best == 2.0 and fp.EarlyStopping().patience == 0  # (Keras' default)
    X, y = blobs(rng, n=60)
    model = mlp()
    w = [p.value.copy() for p in model.parameters()]
    with pytest.raises(ValueError, match="monitors 'val_loss'.*needs validation data"):
        model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=3, verbose=0,
                  callbacks=[fp.EarlyStopping()])          # refused before training
    assert all(np.array_equal(p.value, a) for p, a in zip(model.parameters(), w))
    es = fp.EarlyStopping(patience=3)
    for _ in range(2):  # the same object in a second fit starts afresh
        h = model.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(model.parameters(), lr=0.0),
                      epochs=20, verbose=0, validation_split=0.2, callbacks=[es])
        assert h.stopped_epoch == 3 and len(h["val_loss"]) == 4  # lr 0: epochs 1-3 no better
    with pytest.raises(ValueError, match="mode"):
        fp.EarlyStopping(mode="up")


def test_early_stopping_baseline_warm_up_and_best_weights(backend, rng):
    """Keras' options: ``baseline`` (an improvement that does not beat it does not
    restart the patience), ``start_from_epoch`` (earlier epochs unwatched) and
    ``restore_best_weights`` (the model ends with the parameters and buffers of its
    best epoch, stopped or not, on both the fused and the layer path)."""
    values = [1.0, 0.9, 0.95, 0.97]
    plain = fp.EarlyStopping(monitor="loss", patience=2)
    assert [plain(e, {"loss": v}) for e, v in enumerate(values)] == [False] * 3 + [True]
    base = fp.EarlyStopping(monitor="loss", patience=2, baseline=0.5)
    assert [base(e, {"loss": v}) for e, v in enumerate(values)] == [False, False, True, True]
    assert (base.best, base.best_epoch) == (0.9, 1)
    warm = fp.EarlyStopping(monitor="loss", patience=1, start_from_epoch=2)
    assert [warm(e, {"loss": v}) for e, v in enumerate([0.1, 0.2, 5.0, 6.0])] == [
        False, False, False, True]
    assert (warm.best, warm.best_epoch) == (5.0, 2)
    for bad, err in [({"baseline": "x"}, TypeError), ({"start_from_epoch": -1}, ValueError),
                     ({"restore_best_weights": "yes"}, TypeError)]:
        with pytest.raises(err):
            fp.EarlyStopping(**bad)
    # validation labels opposite to the training ones: val_loss worsens as it learns
    X = np.random.default_rng(0).standard_normal((80, 2))
    y = (X[:, 0] > 0).astype(int)
    for norm in (False, True):  # (BatchNorm: buffers restored too; the layer path)
        layers = [nn.Dense(2, 8, "relu", rng=0)] + ([nn.BatchNorm1d(8)] if norm else [])
        model = nn.Sequential(*layers, nn.Dense(8, 2, rng=1))
        seen = {}
        es = fp.EarlyStopping(patience=2, restore_best_weights=True)
        hist = model.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(model.parameters(),
                         lr=0.5), epochs=30, batch_size=16, verbose=0, seed=0,
                         validation_data=(X, 1 - y),
                         callbacks=[lambda e, logs: seen.setdefault(e, model.state_dict()),
                                    es])
        assert hist.stopped_epoch == es.best_epoch + 2
        assert es.best == min(hist["val_loss"])
        final = model.state_dict()
        assert all(np.array_equal(final[k], seen[es.best_epoch][k]) for k in final)
        assert not all(np.array_equal(final[k], seen[hist.stopped_epoch][k]) for k in final)


def test_frozen_parameters(backend, rng):
    """requires_grad_(False) freezes a layer as in PyTorch: backward leaves its grads
    at zero (a frozen first layer computes nothing), optimizers and clipping skip it,
    and training equals training with it left out of the optimizer; a compiled step
    notices a freeze or unfreeze between steps; Keras' `trainable` is refused."""
    X, y = blobs(rng, n=32, classes=3)

    def make():
        return nn.Sequential(nn.Dense(2, 8, "tanh", rng=0, dtype=np.float64),
                             nn.LayerNorm(8, dtype=np.float64),
                             nn.BatchNorm1d(8, dtype=np.float64),
                             nn.Dense(8, 3, rng=1, dtype=np.float64))

    model = make()
    assert model[0].requires_grad_(False) is model[0]
    model[2].requires_grad_(False)
    frozen = model[0].parameters() + model[2].parameters()
    assert not any(p.requires_grad for p in frozen) and model[3].weight.requires_grad
    before = [p.value.copy() for p in frozen]
    opt = optim.Adam(model.parameters(), lr=0.05)
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=3, batch_size=8, verbose=0,
              shuffle=False)
    for p, b in zip(frozen, before):
        np.testing.assert_array_equal(p.value, b)
        assert not p.grad.any()
    ref = make()
    live = ref[1].parameters() + ref[3].parameters()
    ref.fit(X, y, loss="cross_entropy", optimizer=optim.Adam(live, lr=0.05), epochs=3,
            batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(model.parameters(), ref.parameters()):
        np.testing.assert_allclose(a.value, b.value, rtol=1e-13, atol=1e-15)
    # the running statistics of a frozen BatchNorm still move in training mode
    assert not np.array_equal(model[2].running_mean, np.zeros(8))

    # clipping and a manual backward skip frozen parameters
    model.zero_grad()
    model[0].weight.grad[...] = 100.0
    out = model(X[:4])
    assert model.backward(np.ones_like(out), input_grad=False) is None
    np.testing.assert_array_equal(model[0].weight.grad, 100.0)  # untouched by backward
    live_norm = np.sqrt(sum((p.grad.astype(np.float64) ** 2).sum()
                            for p in model.parameters() if p.requires_grad))
    assert fp.clip_grad_norm(model.parameters(), 1e9) == pytest.approx(live_norm, rel=1e-12)
    fp.clip_grad_value(model.parameters(), 1.0)
    np.testing.assert_array_equal(model[0].weight.grad, 100.0)

    # a compiled (fused on native) step: freezing between steps is honoured
    m = mlp(out=3, dtype=np.float64)
    step = m.compile("cross_entropy", optim.SGD(m.parameters(), lr=0.1))
    step(X, y)
    w = m[0].weight.value.copy()
    m[0].weight.requires_grad = False
    step(X, y)
    np.testing.assert_array_equal(m[0].weight.value, w)
    m[0].weight.requires_grad = True
    step(X, y)
    assert not np.array_equal(m[0].weight.value, w)
    with pytest.raises(TypeError, match="requires_grad must be a bool"):
        m[0].weight.requires_grad = 0
    with pytest.raises(AttributeError, match="requires_grad_"):
        m[0].trainable = False
    p = fp.Parameter(np.ones(2))
    object.__delattr__(p, "_frozen")  # (a Parameter pickled before the flag existed)
    assert p.requires_grad


def test_a_device_step_is_synced_when_the_layer_setup_changes(monkeypatch):
    """A whole-step kernel that keeps the parameters on a device (the CUDA backend's:
    host arrays written only by sync) is synced before the compiled step drops it for
    a changed layer setup (a freeze between steps), so no step is lost.  A stand-in
    backend with that contract (no GPU needed)."""
    import types
    from fastprop import backends
    npb = backends.load("numpy")

    class DeviceStep:
        def __init__(self, stages, loss, optimizer):
            self.opt, self.dirty, self.output = optimizer, False, None
            self.dev = [p.value.copy() for p in optimizer.params]

        def __call__(self, x, y, check_finite=False):
            for d in self.dev:
                d -= 1.0
            self.opt.step_count += 1
            self.dirty = True
            return 0.0

        def sync(self):
            if self.dirty:
                for p, d in zip(self.opt.params, self.dev):
                    np.copyto(p.value, d)
                self.dirty = False

    fake = types.SimpleNamespace(**{k: getattr(npb, k) for k in dir(npb) if not k.startswith("__")})
    fake.make_train_step = DeviceStep
    with fp.use_backend("numpy"):
        monkeypatch.setattr(backends._state, "backend", fake)
        m = nn.Sequential(nn.Dense(2, 2, rng=0), nn.Dense(2, 1, rng=1))
        w0 = m[1].weight.value.copy()
        step = m.compile("mse", optim.SGD(m.parameters(), lr=0.0))
        X, Y = np.ones((4, 2), np.float32), np.ones((4, 1), np.float32)
        for _ in range(3):
            step(X, Y)
        m[0].requires_grad_(False)
        step(X, Y)  # the layer path now (lr 0: changes nothing)
        step.sync()
    np.testing.assert_array_equal(m[1].weight.value, w0 - 3)


def test_gradcheck_skips_frozen_parameters_and_user_modules_may_use_trainable(rng):
    model = nn.Sequential(nn.Dense(3, 4, "tanh", rng=0), nn.Dense(4, 2, rng=1))
    model[0].requires_grad_(False)
    assert fp.gradcheck(model, rng.standard_normal((5, 3)))

    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.trainable = False  # (only fastprop's own layers refuse Keras' flag)

    assert Mine().trainable is False


def test_callbacks_edge_cases_and_early_stopping_across_a_resume(rng, tmp_path):
    """Only True stops (a returned rate is warned about, not a stop); a class instead of an
    instance and a monitor that is not a str are TypeErrors; min_delta counts by its
    magnitude (Keras); an interrupted run resumed with EarlyStopping stops where the
    uninterrupted one did, with the same weights (on_resume rebuilds its count)."""
    X = rng.standard_normal((128, 4)).astype(np.float32)
    y = X @ np.array([[1.0], [2.0], [0.0], [-1.0]], np.float32)
    model = nn.Dense(4, 1, rng=0)
    with pytest.warns(UserWarning, match="returned 1.0, which fit ignores"):  # (once)
        h = model.fit(X, y, loss="mse", optimizer="sgd", epochs=3, verbose=0,
                      callbacks=[lambda e, logs: 0.5 ** e])    # returns a float: no stop
    assert h.epoch == [0, 1, 2] and h.stopped_epoch is None
    with pytest.raises(TypeError, match="class EarlyStopping; pass an instance"):
        model.fit(X, y, loss="mse", optimizer="sgd", verbose=0, callbacks=[fp.EarlyStopping])
    with pytest.raises(TypeError, match="monitor must be"):
        fp.EarlyStopping(monitor=None)
    assert fp.EarlyStopping(min_delta=-0.5).min_delta == 0.5

    def run(epochs, path, resume):
        m = nn.Dense(4, 1, rng=0)
        es = fp.EarlyStopping("loss", patience=2, min_delta=0.05)
        hist = m.fit(X, y, loss="mse", optimizer=optim.SGD(m.parameters(), lr=0.02),
                     epochs=epochs, seed=0, verbose=0, callbacks=[es], checkpoint=path,
                     resume=resume)
        return hist, m

    full, m1 = run(40, tmp_path / "a.ckpt", False)
    assert full.stopped_epoch is not None and full.stopped_epoch < 39
    run(full.stopped_epoch, tmp_path / "b.ckpt", False)      # interrupted just before
    resumed, m2 = run(40, tmp_path / "b.ckpt", True)
    assert resumed.stopped_epoch == full.stopped_epoch and resumed.epoch == full.epoch
    np.testing.assert_array_equal(m1.weight.value, m2.weight.value)


def test_early_stopping_restores_the_best_resumed_epoch_when_the_best_was_before():
    """restore_best_weights across a resume whose best epoch came before the checkpoint
    (its weights are not in it): the docstring's promise, the best of the epochs the
    resumed fit ran (it restored the first of them, whatever came after)."""
    import types
    model = nn.Dense(1, 1, rng=0)
    es = fp.EarlyStopping("val_loss", patience=10, restore_best_weights=True)
    es.set_model(model)
    es.on_resume(types.SimpleNamespace(epoch=[0, 1],
                                       history={"val_loss": [1.0, 1.5]}))
    assert es.best == 1.0 and es.best_epoch == 0 and es.wait == 1
    for epoch, value in [(2, 1.4), (3, 1.2), (4, float("nan")), (5, 1.3)]:
        model.weight.value[...] = epoch  # (a marker of the epoch's weights)
        assert es(epoch, {"val_loss": value}) is False
    es.on_train_end()
    assert model.weight.value.item() == 3 and es.best_epoch == 0
    es.on_resume(types.SimpleNamespace(epoch=[0], history={"val_loss": [1.0]}))
    for epoch, value in [(1, 1.4), (2, 0.5), (3, 0.9)]:  # (a new best: kept as usual)
        model.weight.value[...] = epoch
        es(epoch, {"val_loss": value})
    es.on_train_end()
    assert model.weight.value.item() == 2 and es.best_epoch == 2


def test_module_state_dict_round_trip(backend, rng):
    """state_dict() copies every parameter and buffer by name; load_state_dict puts a
    kept one back in place (the compiled step trains on from it), checking names,
    shapes and dtypes before anything changes; named_parameters matches the names."""
    X, y = blobs(rng, n=32)
    model = nn.Sequential(nn.Dense(2, 8, "relu", rng=0), nn.BatchNorm1d(8), nn.Dense(8, 2, rng=1))
    opt = optim.Adam(model.parameters(), lr=0.05)
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, verbose=0)
    best = model.state_dict()
    assert [n for n, _ in model.named_parameters()] == [
        "1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias"]
    assert set(best) == {n for n, _ in model.state_arrays()} >= {"2.running_mean"}
    params = [p.value for p in model.parameters()]
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, verbose=0)
    assert not np.array_equal(best["1.weight"], model[0].weight.value)  # a copy, kept
    snap = snapshot(model)
    bad = dict(best, **{"1.weight": np.zeros((8, 2))})
    with pytest.raises(ValueError, match=r"state_dict\['1.weight'\] has shape \(8, 2\)"):
        model.load_state_dict(bad)
    with pytest.raises(ValueError, match="missing \\['3.bias'\\]"):
        model.load_state_dict({k: v for k, v in best.items() if k != "3.bias"})
    with pytest.raises(TypeError, match="dict"):
        model.load_state_dict([1])
    assert snapshot(model) == snap  # refused: nothing changed
    assert model.load_state_dict(dict(best, extra=np.zeros(1)), strict=False) == ([], ["extra"])
    for name, arr in model.state_arrays():
        np.testing.assert_array_equal(arr, best[name])
    assert all(p.value is v for p, v in zip(model.parameters(), params))  # in place
    h = model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, verbose=0)
    assert np.isfinite(h["loss"][0])
    opt.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=False)


def test_backward_skips_a_frozen_body(backend, rng, monkeypatch):
    """A frozen leading part of a model (a pretrained body under a new head) is not
    run backward at all, as PyTorch builds no graph for it: the same parameters as
    before after training, no backward call below the first trainable layer, and a
    user's module in that part ends the skipping (its backward runs, with no input
    gradient asked of it)."""
    X, y = blobs(rng, n=32, classes=3)

    def make(extra=None):
        layers = [nn.Dense(2, 8, "tanh", rng=0, dtype=np.float64),
                  nn.BatchNorm1d(8, dtype=np.float64), nn.ReLU(),
                  nn.Dense(8, 8, rng=1, dtype=np.float64),
                  nn.Dense(8, 3, rng=2, dtype=np.float64)]
        if extra is not None:
            layers.insert(2, extra)
        model = nn.Sequential(*layers)
        for layer in layers[:4 if extra is None else 5]:
            layer.requires_grad_(False)
        return model

    calls = []
    for cls in (nn.Dense, nn.BatchNorm1d, nn.Activation):
        orig = cls.backward

        def counted(self, g, input_grad=True, _orig=orig):
            calls.append((type(self).__name__, input_grad))
            return _orig(self, g, input_grad)
        monkeypatch.setattr(cls, "backward", counted)
    model = make()
    ref = make()
    opt = optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ref_opt = optim.Adam(ref[4].parameters(), lr=0.05)
    for _ in range(3):
        calls.clear()
        out = model(X)
        loss = fp.losses.SoftmaxCrossEntropy()
        loss(out, y)
        model.zero_grad()
        assert model.backward(loss.backward(), input_grad=False) is None
        assert calls == [("Dense", False)]  # the head only
        opt.step()
        r = ref(X)
        loss(r, y)
        ref.zero_grad()
        ref[4].backward(loss.backward(), input_grad=False)
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        np.testing.assert_array_equal(p.value, q.value)
    assert model.backward(loss.backward()) is not None  # (an input gradient: all layers)

    class Mine(nn.Module):
        def forward(self, x):
            return x

        def backward(self, g, input_grad=True):
            calls.append(("Mine", input_grad))
            return g

    model = make(Mine())
    loss(model(X), y)
    calls.clear()
    model.backward(loss.backward(), input_grad=False)
    assert calls == [("Dense", True), ("Dense", True), ("ReLU", True), ("Mine", False)]
    model[0].requires_grad_(True)  # (a change of the flags is seen)
    calls.clear()
    model.backward(loss.backward(), input_grad=False)
    assert calls[-1] == ("Dense", False) and len(calls) == 6


def test_frozen_prefix_follows_a_plain_layer_list_and_pickling(rng):
    """The frozen-prefix cache follows in-place edits of a plain list assigned to
    .layers (a trainable layer inserted first is trained), and is not pickled (the
    structure counter of another process may match it)."""
    import pickle
    X = rng.standard_normal((8, 3))
    model = nn.Sequential(nn.Dense(3, 3, rng=0, dtype=np.float64),
                          nn.Dense(3, 2, rng=1, dtype=np.float64))
    model[0].requires_grad_(False)
    model.backward(np.ones_like(model(X)), input_grad=False)
    assert model._frozen_prefix() == 1
    model.layers = list(model.layers)
    new = nn.Dense(3, 3, rng=2, dtype=np.float64)
    model.layers.insert(0, new)
    out = model(X)
    model.zero_grad()
    model.backward(np.ones_like(out), input_grad=False)
    assert np.abs(new.weight.grad).sum() > 0
    state = model.__getstate__()
    assert "_prefix_at" not in state and "_checked_at" not in state
    assert pickle.loads(pickle.dumps(model))._frozen_prefix() == 0


# ------------------------------------------------ checkpoints: from a review of crafted files
@pytest.mark.parametrize("bits", [None, np.random.MT19937, np.random.Philox,
                                  np.random.SFC64, np.random.PCG64DXSM],
                         ids=["seeded", "mt19937", "philox", "sfc64", "pcg64dxsm"])
def test_resume_with_any_bit_generator_and_a_layer_unfrozen_midway(tmp_path, bits):
    """A Dropout drawing from any NumPy bit generator checkpoints and resumes (MT19937,
    Philox, SFC64 failed to save, PCG64DXSM to resume); the flags of a layer unfrozen by
    a callback are restored on resume (it came back frozen): a run stopped after
    epoch 2 and resumed equals an uninterrupted one bit for bit."""
    def run(epochs, resume, path):
        path.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        X, y = rng.standard_normal((48, 6)), rng.integers(0, 3, 48)
        gen = np.random.Generator(bits(7)) if bits else 7
        model = nn.Sequential(nn.Dense(6, 8, "relu", rng=1), nn.Dropout(0.3, seed=gen),
                              nn.Dense(8, 3, rng=2))
        model.layers[0].weight.requires_grad = False

        def unfreeze(epoch, logs):
            if epoch == 0:
                model.layers[0].weight.requires_grad = True

        model.fit(X, y, loss="cross_entropy", optimizer=optim.Adam(model.parameters(), 1e-2),
                  epochs=epochs, batch_size=8, verbose=0, checkpoint=path / "c.ckpt",
                  resume=resume, callbacks=[unfreeze],
                  # (a seed would reseed the Dropout with a PCG64: no seed, no shuffle)
                  **({"shuffle": False} if bits else {"seed": 3}))
        return model

    whole = run(4, False, tmp_path / "a")
    run(2, False, tmp_path / "b")
    resumed = run(4, True, tmp_path / "b")
    assert resumed.layers[0].weight.requires_grad
    for p, q in zip(whole.parameters(), resumed.parameters()):
        np.testing.assert_array_equal(p.value, q.value)


def _rewrite_fit_meta(path, change):
    """Rewrite a checkpoint's fit metadata with ``change(meta)`` (a crafted file)."""
    import json
    from fastprop import serialization
    header, arrays, _ = serialization._read(path)
    model = fp.load(path)
    meta = json.loads(bytes(arrays["extra.fit"]).decode())
    change(meta)
    extra = {k[len("extra."):]: v for k, v in arrays.items() if k.startswith("extra.")}
    extra["fit"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    serialization.save(model, path, extra=extra)


@pytest.mark.parametrize("change", [
    lambda m: m.update(epochs_done=-200),
    lambda m: m.update(epochs_done=-2 ** 70),
    lambda m: m.update(optimizer=[]),
    lambda m: m["optimizer"].update(hyper=None),
    lambda m: m["optimizer"].update(step=2.5),
    lambda m: m["rng"]["state"].update(state=-1),
    lambda m: m["rng"].update(has_uint32=2 ** 70),
    lambda m: m["rng"].update(bit_generator="os"),
], ids=["epochs-negative", "epochs-huge-negative", "optimizer-list", "hyper-null",
        "fractional-step", "rng-negative", "rng-overflow", "rng-not-a-generator"])
def test_crafted_checkpoint_metadata_is_a_valueerror(tmp_path, change):
    """Every crafted value is refused with ValueError before anything changes (a
    negative epochs_done trained on for ever; others leaked AttributeError,
    TypeError or OverflowError)."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 5)), rng.integers(0, 3, 40)
    path = tmp_path / "c.ckpt"
    model = nn.Sequential(nn.Dense(5, 3, rng=0))
    model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=1, verbose=0,
              checkpoint=path)
    _rewrite_fit_meta(path, change)
    _assert_resume_refused(path, X, y, "checkpoint")


def _assert_resume_refused(path, X, y, match):
    """Resuming a fresh model from ``path`` raises ValueError and changes nothing."""
    fresh = nn.Sequential(nn.Dense(5, 3, rng=0))
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        fresh.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=3, verbose=0,
                  checkpoint=path, resume=True)
    assert snapshot(fresh) == before


@pytest.mark.parametrize("where", ["weight", "exp_avg +inf", "exp_avg_sq nan"])
def test_checkpoint_holding_nan_is_refused(tmp_path, where):
    """A fit never writes NaN or inf into a checkpoint's parameters, nor NaN or an
    infinite first moment into its optimizer state (only a second moment can overflow
    to +inf from a finite gradient): one that holds them is corrupt and refused before
    the model changes (it was loaded, then failed, or trained on)."""
    from fastprop import checkpoint
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 5)), rng.integers(0, 3, 40)
    model = nn.Sequential(nn.Dense(5, 3, rng=0))
    opt = optim.Adam(model.parameters(), 1e-2)
    h = model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, verbose=0)
    if where == "weight":
        model.layers[0].weight.value[0, 0] = np.nan
    elif where == "exp_avg +inf":
        opt.state[0]["exp_avg"][0, 0] = np.inf
    else:
        opt.state[0]["exp_avg_sq"][0, 0] = np.nan
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, model, opt, 1, np.random.default_rng(0), h,
                    {"samples": 40, "batch_size": 32, "shuffle": True})
    _assert_resume_refused(path, X, y, "NaN or infinite")


@pytest.mark.parametrize("path", ["fused", "layers"])
def test_a_compiled_step_pickles_and_deep_copies(backend, path):
    """A compiled step (its model and optimizer with it) pickles and deep-copies; the
    copy rebuilds its kernel and trains on exactly as the original."""
    import pickle
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((16, 5)), rng.integers(0, 3, 16)
    layers = [nn.Dense(5, 4, "relu", rng=0), nn.Dense(4, 3, rng=1)]
    if path == "layers":
        layers.insert(1, nn.LayerNorm(4))
    model = nn.Sequential(*layers)
    step = model.compile("cross_entropy", optim.Adam(model.parameters(), 1e-2))
    step(X, y)
    copies = [pickle.loads(pickle.dumps(step)), copy.deepcopy(step)]
    for _ in range(3):
        want = step(X, y)
        for c in copies:
            assert c(X, y) == want
    for c in copies:
        for p, q in zip(model.parameters(), c.model.parameters()):
            np.testing.assert_array_equal(p.value, q.value)


@pytest.mark.parametrize("how", ["compile", "fit", "fit-layer-path"])
def test_a_trained_model_is_freed_by_del(backend, how):
    """A model and its compiled step form no reference cycle: ``del`` frees a trained
    model and its arrays at once (they waited for the cyclic collector, which a loop of
    large models rarely triggers), while fit without loss/optimizer still finds the
    compiled ones and a step kept by the user keeps training the model."""
    import gc
    import weakref
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((32, 6)), rng.integers(0, 3, 32)

    def build():
        layers = [nn.Dense(6, 8, "relu", rng=0), nn.Dense(8, 3, rng=1)]
        if how == "fit-layer-path":
            layers.insert(1, nn.LayerNorm(8))
        model = nn.Sequential(*layers)
        if how == "compile":
            step = model.compile("cross_entropy", optim.Adam(model.parameters(), 1e-2))
            step(X, y)
        else:
            model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=1, verbose=0)
        return model

    gc.disable()
    try:
        model = build()
        ref = weakref.ref(model)
        del model
        assert ref() is None
    finally:
        gc.enable()
    model = build()
    opt = model._compile_args[1]
    model.fit(X, y, epochs=1, verbose=0)  # (the compiled loss and optimizer)
    assert model._compile_args[1] is opt and opt.step_count == 2
    step = model.compile("cross_entropy", optim.SGD(model.parameters(), lr=0.1))
    before = [p.value.copy() for p in model.parameters()]
    del model
    step(X, y)  # (the step holds its model)
    assert any(not np.array_equal(a, p.value) for a, p in zip(before, step.model.parameters()))


def test_a_training_step_keeps_no_batch_alive(backend):
    """The layer path drops the layers' caches once backward has run: a step on a
    slice of a large X keeps neither the slice nor X alive (a view keeps its base),
    and a trained model's pickle and deep copy carry no activations."""
    import gc
    import pickle
    import weakref
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((4000, 6)).astype(np.float32), rng.integers(0, 3, 4000)
    model = nn.Sequential(nn.Dense(6, 8, "relu", rng=0), nn.LayerNorm(8), nn.Dropout(0.1),
                          nn.Dense(8, 3, rng=1))
    step = model.compile("cross_entropy", optim.SGD(model.parameters(), lr=0.1))
    base = X.copy()
    ref = weakref.ref(base)
    step(base[:32], y[:32])
    del base
    gc.collect()
    assert ref() is None
    model.fit(X, y, epochs=1, batch_size=500, shuffle=False, verbose=0)
    for m in model.modules():
        assert all(getattr(m, name) is None for name in m._caches)
    model.train()
    model(X)  # (a forward outside a step keeps its caches, for a backward)
    size = len(pickle.dumps(model))
    assert size < 4 * 4000 * 8 / 10  # (no activations: the parameters are ~0.2 kB)
    clone = copy.deepcopy(model)
    assert all(getattr(m, name) is None for m in clone.modules() for name in m._caches)


def test_a_checkpoint_loaded_as_a_model_leaves_the_fit_state(tmp_path):
    """fp.load of a checkpoint gives the model without the optimizer's moments and
    the fit metadata (it carried them for its lifetime); a model file's own extra
    arrays stay."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 5)), rng.integers(0, 3, 40)
    model = nn.Sequential(nn.Dense(5, 3, rng=0))
    model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=1, verbose=0,
              checkpoint=tmp_path / "c.ckpt")
    assert fp.load(tmp_path / "c.ckpt")._extra == {}
    fp.save(model, tmp_path / "m.fp", extra={"fit": np.arange(3), "opt.0.x": np.ones(2)})
    assert sorted(fp.load(tmp_path / "m.fp")._extra) == ["fit", "opt.0.x"]


@pytest.mark.parametrize("norm", [False, True])
def test_a_fit_refused_by_the_optimizer_changes_nothing(backend, rng, norm):
    """An optimizer whose state is in the old dtype after model.astype is refused by
    fit before anything changes: parameters, BatchNorm statistics, gradients, the
    step count and the model's eval mode stay as they were (the refusal came from
    optimizer.step, after forward and backward); so does a direct step call."""
    X, y = blobs(rng, n=40, classes=3)
    layers = [nn.Dense(2, 8, "relu", rng=1)] + ([nn.BatchNorm1d(8)] if norm else [])
    model = nn.Sequential(*layers, nn.Dense(8, 3, rng=2))
    opt = optim.Adam(model.parameters(), 1e-2)
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, verbose=0, seed=0)
    model.astype(np.float64)
    model.eval()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"optimizer state 'exp_avg' of params\[0\]"):
        model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, verbose=0, seed=0)
    assert snapshot(model, opt) == before
    assert not any(m.training for m in model.modules())
    model.train()
    before = snapshot(model, opt)
    step = model.compile("cross_entropy", opt)
    with pytest.raises(ValueError, match=r"optimizer state 'exp_avg' of params\[0\]"):
        step(X[:8], y[:8])
    assert snapshot(model, opt) == before


def test_a_step_that_makes_the_running_variance_infinite_is_refused(backend, rng):
    """Finite float32 inputs of ~1e20 give a finite loss and gradients but square to
    inf in BatchNorm's running variance: the step is refused as non-finite (fit's
    on_nonfinite), the statistics rolled back, so the model keeps finite buffers and
    its checkpoints stay loadable."""
    X = (rng.standard_normal((64, 4)) * 1e20).astype(np.float32)
    y = rng.integers(0, 2, 64)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Dense(4, 2, rng=1))
    bn = model[0]
    mean, var = bn.running_mean.copy(), bn.running_var.copy()
    with pytest.raises(fp.NonFiniteError, match="running statistics"):
        with np.errstate(over="ignore"):  # (the numpy backend's cast says so too)
            model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=1, batch_size=32,
                      verbose=0, seed=0)
    np.testing.assert_array_equal(bn.running_mean, mean)
    np.testing.assert_array_equal(bn.running_var, var)
    with np.errstate(over="ignore"):
        hist = model.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=1,
                         batch_size=32, verbose=0, seed=0, on_nonfinite="skip")
    assert hist.skipped_steps == 2 and np.isfinite(bn.running_var).all()


def test_keras_style_callback_objects(backend, rng):
    """A callback object with Keras' methods (set_model, then on_train_begin, which may
    use the model; on_epoch_end returning None,
    model.stop_training = True to stop) works as in Keras; a batch callback that runs
    the step itself on a batch of another size leaves the epoch's accuracy alone
    (it was counted from the step's output, overwritten by that call)."""
    X, y = blobs(rng, n=64, classes=2)

    class StopAtOne:
        def set_model(self, model):
            self.model = model

        def on_train_begin(self, keys):  # (Keras calls set_model first)
            self.start_mode = self.model.training

        def on_epoch_end(self, epoch, logs):
            self.seen = epoch
            if epoch == 1:
                self.model.stop_training = True

    model = mlp()
    step = model.compile("cross_entropy", optim.SGD(model.parameters(), lr=0.1))

    class Probe:
        def __call__(self, epoch, logs):
            return None

        def on_train_batch_end(self, batch, logs):
            step(X[:3], y[:3])  # (the step's output is now 3 rows)

    cb = StopAtOne()
    hist = model.fit(X, y, epochs=5, batch_size=16, verbose=0, callbacks=[cb, Probe()])
    assert hist.stopped_epoch == 1 and cb.seen == 1 and len(hist["accuracy"]) == 2
    assert cb.start_mode is True
    assert 0.0 <= hist["accuracy"][-1] <= 1.0
    hist = model.fit(X, y, epochs=2, batch_size=16, verbose=0, callbacks=[StopAtOne()])
    assert hist.stopped_epoch == 1  # (the flag is reset by each fit: it ran epoch 1)
    with pytest.raises(TypeError, match="on_epoch_end"):
        model.fit(X, y, epochs=1, verbose=0, callbacks=[object()])


@pytest.mark.parametrize("fused", [True, False])
def test_fit_clips_finite_gradients_whose_squares_overflow(backend, fused):
    """float64: a finite outlier row (1e100) gives finite gradients of ~1e200 whose sum
    of squares overflows; fit(clip_grad_norm=1) still clips each update to a norm of 1
    (the whole update was applied: weights of ~1e196, then skipped batches), in the
    fused kernel and on the layer path."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((32, 4)), rng.standard_normal((32, 1))
    X[8] = 1e100
    model = nn.Sequential(nn.Dense(4, 8, rng=0, dtype=np.float64),
                          nn.Dense(8, 1, rng=1, dtype=np.float64))
    start = np.concatenate([p.value.ravel() for p in model.parameters()])
    step = model.compile("mse", optim.SGD(model.parameters(), lr=0.01), clip_grad_norm=1.0)
    if not fused:
        step.fused = lambda: None
    hist = model.fit(X, y, epochs=3, batch_size=8, shuffle=False, verbose=0,
                     on_nonfinite="skip")
    assert (step.fused() is not None) == (fused and backend == "native")
    end = np.concatenate([p.value.ravel() for p in model.parameters()])
    assert hist.skipped_steps == 0
    assert np.linalg.norm(end - start) <= 12 * 0.01 * (1 + 1e-9)  # 12 clipped steps
    assert np.linalg.norm(end - start) > 0.05


@pytest.mark.parametrize("kind", ["norm", "value"])
def test_clipping_in_compile_and_fit_equals_a_hand_loop(backend, rng, kind):
    """compile(clip_grad_norm=/clip_grad_value=) and fit(...) clip the optimizer's
    gradients before each update exactly as fp.clip_grad_norm / clip_grad_value in a
    hand-written loop (the fused kernels would update before clipping: the step runs
    layer by layer); fit without its own clipping arguments keeps the compiled step's,
    and gives the step's settings back; without clipping the result differs."""
    X = rng.standard_normal((64, 5))
    y = rng.integers(0, 3, 64)
    limit = 0.1 if kind == "norm" else 0.02
    clip = {f"clip_grad_{kind}": limit}

    def model():
        return nn.Sequential(nn.Dense(5, 16, "relu", rng=0, dtype=np.float64),
                             nn.Dense(16, 3, rng=1, dtype=np.float64))

    def adam(m):
        return optim.Adam(m.parameters(), 0.05)

    ref = model()
    opt = adam(ref)
    for i in range(0, 64, 16):
        opt.zero_grad()
        _, g = fp.ops.softmax_cross_entropy(ref(X[i:i + 16]), y[i:i + 16])
        ref.backward(g)
        if kind == "norm":
            assert fp.clip_grad_norm(ref.parameters(), limit) > limit  # (it clips)
        else:
            fp.clip_grad_value(ref.parameters(), limit)
        opt.step()

    def same(m):
        for p, q in zip(ref.parameters(), m.parameters()):
            np.testing.assert_allclose(q.value, p.value, rtol=1e-12, atol=1e-14)

    stepped = model()
    step = stepped.compile("cross_entropy", adam(stepped), **clip)
    assert getattr(step, f"clip_grad_{kind}") == limit
    for i in range(0, 64, 16):
        step(X[i:i + 16], y[i:i + 16])
    same(stepped)
    fitted = model()
    plain = fitted.compile("cross_entropy", adam(fitted))
    fitted.fit(X, y, batch_size=16, shuffle=False, verbose=0, **clip)
    same(fitted)
    assert plain.clip_grad_norm is None and plain.clip_grad_value is None
    kept = model()
    kept.compile("cross_entropy", adam(kept), **clip)
    kept.fit(X, y, batch_size=16, shuffle=False, verbose=0)
    same(kept)
    unclipped = model()
    unclipped.fit(X, y, loss="cross_entropy", optimizer=adam(unclipped), batch_size=16,
                  shuffle=False, verbose=0)
    assert not np.allclose(unclipped[0].weight.value, ref[0].weight.value)


def test_clipping_arguments_are_checked_before_anything_changes(rng):
    X = rng.standard_normal((16, 3))
    y = rng.integers(0, 2, 16)
    model = nn.Sequential(nn.Dense(3, 2, rng=0))
    opt = optim.SGD(model.parameters(), 0.1, momentum=0.9)
    before = snapshot(model, opt)
    for kw, exc in [({"clip_grad_norm": 0}, ValueError), ({"clip_grad_value": -1.0}, ValueError),
                    ({"clip_grad_norm": "1"}, TypeError),
                    ({"clip_grad_value": float("nan")}, ValueError)]:
        name = next(iter(kw))
        with pytest.raises(exc, match=name):
            model.fit(X, y, loss="cross_entropy", optimizer=opt, verbose=0, **kw)
        with pytest.raises(exc, match=name):
            model.compile("cross_entropy", opt, **kw)
        assert snapshot(model, opt) == before
    step = model.compile("cross_entropy", opt)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        step.clip_grad_norm = -1
    assert step.clip_grad_norm is None
    for keras in ("clipnorm", "global_clipnorm", "clipvalue"):
        with pytest.raises(TypeError, match="clip_grad_"):
            model.fit(X, y, verbose=0, **{keras: 1.0})
    assert snapshot(model, opt) == before


def test_a_compiled_step_drops_a_hand_forwards_caches_on_every_path(backend, rng):
    """model(x) by hand, then a compiled step (fused on native, layer by layer on
    numpy), then model.backward(g): refused on every path (the fused step kept the
    caches, and the backward mixed the pre-update activations with the updated
    weights), and no layer keeps the hand forward's batch alive."""
    model = nn.Sequential(nn.Dense(2, 8, "tanh", rng=0), nn.Dense(8, 3, rng=1))
    step = model.compile(fp.losses.MSE(), optim.SGD(model.parameters(), 0.5))
    x3 = rng.standard_normal((3, 2))
    model(x3)
    step(rng.standard_normal((13, 2)), rng.standard_normal((13, 3)))
    assert all(m.__dict__.get(name) is None for m in model.modules()
               for name in m._kept_caches())
    with pytest.raises(RuntimeError, match="backward called before forward"):
        model.backward(np.ones((3, 3)))
    model(x3)  # (a fresh forward: backward works)
    model.backward(np.ones((3, 3)))


def test_a_step_refused_for_a_module_held_twice_stays_refused(rng):
    """A module appended a second time: the compiled step refuses every call (the
    second call was accepted on native and trained the old kernel's chain)."""
    model = nn.Sequential(nn.Dense(3, 3, "tanh", rng=0), nn.Dense(3, 3, rng=1))
    step = model.compile(fp.losses.MSE(), optim.SGD(model.parameters(), 0.1))
    x, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 3))
    step(x, y)
    model.layers.append(model[1])
    before = snapshot(model)
    for _ in range(2):
        with pytest.raises(ValueError, match="used twice"):
            step(x, y)
    assert snapshot(model) == before


def test_steps_and_batchnorms_pickled_by_an_older_version_still_train(rng):
    """A TrainStep pickled before clipping existed (no _clip_norm) and a BatchNorm1d
    pickled before the batch count was kept for every momentum still train."""
    import pickle
    model = nn.Sequential(nn.Dense(3, 4, rng=0), nn.BatchNorm1d(4), nn.Dense(4, 2, rng=1))
    step = model.compile("cross_entropy", optim.SGD(model.parameters(), 0.1))
    x, y = rng.standard_normal((8, 3)), rng.integers(0, 2, 8)
    old_step = step.__getstate__()
    for key in ("_clip_norm", "_clip_value", "_cache_slots", "_cache_probes"):
        old_step.pop(key)
    old_bn = model[1].__getstate__()
    old_bn.pop("num_batches_tracked")
    revived = pickle.loads(pickle.dumps(step))
    revived.__setstate__(old_step)
    revived(x, y)
    bn = nn.BatchNorm1d.__new__(nn.BatchNorm1d)
    bn.__setstate__(old_bn)
    bn(rng.standard_normal((8, 4)))
    assert int(bn.num_batches_tracked) == 1 and "0.num_batches_tracked" in bn.state_dict()


def test_batch_counts_loaded_are_checked(rng, tmp_path):
    """A negative or fractional num_batches_tracked in a state dict or a file is
    refused before anything changes (a count of -1 divided by zero in the cumulative
    average, after the count had changed)."""
    bn = nn.BatchNorm1d(3, momentum=None)
    bn(rng.standard_normal((8, 3)))
    for bad in (-1, 2.5, np.uint64(2 ** 63 + 1)):
        state = bn.state_dict()
        state["0.num_batches_tracked"] = np.array(bad)
        before = snapshot(bn)
        with pytest.raises(ValueError, match="whole number >= 0"):
            bn.load_state_dict(state)
        assert snapshot(bn) == before
    bn.num_batches_tracked[...] = -3  # (written in place: the file says so on load)
    fp.save(bn, tmp_path / "bn.fp")
    with pytest.raises(ValueError, match="whole number >= 0"):
        fp.load(tmp_path / "bn.fp")


def test_resume_checks_clipping_and_takes_checkpoints_without_a_batch_count(rng, tmp_path):
    """A checkpoint written with clipping resumes only with the same clipping; one
    whose BatchNorm has no batch count (written before it was kept) resumes, the count
    kept at 0; clipping set on the compiled step after compile is what a later fit
    uses once the step is gone."""
    X, y = rng.standard_normal((64, 3)), rng.integers(0, 2, 64)

    def model():
        return nn.Sequential(nn.Dense(3, 4, rng=0), nn.BatchNorm1d(4), nn.Dense(4, 2, rng=1))

    path = tmp_path / "c.fp"
    a = model()
    opt = optim.SGD(a.parameters(), 0.1)
    a.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, checkpoint=path, verbose=0,
          clip_grad_norm=0.1)
    b = model()
    with pytest.raises(ValueError, match="settings"):
        b.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(b.parameters(), 0.1), epochs=2,
              checkpoint=path, resume=True, verbose=0)
    b.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(b.parameters(), 0.1), epochs=2,
          checkpoint=path, resume=True, verbose=0, clip_grad_norm=0.1)
    old = model()
    old[1]._buffers = ("running_mean", "running_var")  # (as files were written before)
    old.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(old.parameters(), 0.1), epochs=1,
            checkpoint=tmp_path / "old.fp", verbose=0)
    c = model()
    c.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(c.parameters(), 0.1), epochs=2,
          checkpoint=tmp_path / "old.fp", resume=True, verbose=0)
    assert int(c[1].num_batches_tracked) == 2  # (the resumed epoch's two batches)
    d = model()
    step = d.compile("cross_entropy", optim.SGD(d.parameters(), 0.1), clip_grad_norm=1e-3)
    step.clip_grad_norm = None
    del step
    import gc
    gc.collect()
    e = model()
    for m in (d, e):
        m.fit(X, y, loss="cross_entropy" if m is e else None,
              optimizer=optim.SGD(m.parameters(), 0.1) if m is e else None,
              shuffle=False, verbose=0)
    for p, q in zip(d.parameters(), e.parameters()):
        np.testing.assert_array_equal(p.value, q.value)


def test_val_loss_is_evaluates_figure_for_a_batch_dependent_model(rng):
    """A BatchNorm1d(track_running_stats=False) normalises by each batch's statistics in
    eval mode too, so the batching matters: the last epoch's val_loss is what
    model.evaluate reports on the same rows (validation batched as evaluate; it took
    max(batch_size, 256) rows a batch: 1.9532 against evaluate's 1.9647 in a review)."""
    X, Xv = rng.standard_normal((64, 4)), rng.standard_normal((300, 4))
    y, yv = rng.standard_normal((64, 2)), rng.standard_normal((300, 2))
    model = fp.nn.Sequential(fp.nn.Dense(4, 6, dtype=np.float64),
                             fp.nn.BatchNorm1d(6, track_running_stats=False, dtype=np.float64),
                             fp.nn.Dense(6, 2, dtype=np.float64))
    hist = model.fit(X, y, loss="mse", optimizer="sgd", epochs=2, batch_size=16,
                     validation_data=(Xv, yv), verbose=0)
    assert hist.history["val_loss"][-1] == model.evaluate(Xv, yv, loss="mse")
    assert model.evaluate(Xv, yv, loss="mse") != model.evaluate(Xv, yv, loss="mse", batch_size=256)
