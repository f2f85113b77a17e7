"""What a Keras user porting a script reaches for: Keras' callback hooks and
LearningRateScheduler, ReduceLROnPlateau's mode for an accuracy, evaluate's
return_dict, the "linear" activation, an optimizer class, and clear errors or
warnings where Keras' spelling would otherwise do something else silently (a
schedule function passed as a callback, BatchNorm's momentum, a head replaced
after compile, a generator, compile's argument order)."""

import io
import warnings

import numpy as np
import pytest

import fastprop as fp
from fastprop import nn, optim
from fastprop.optim import lr_scheduler


def blobs(rng, n=120, d=4, classes=3):
    centers = rng.standard_normal((classes, d)) * 3
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


def mlp(seed=0):
    return nn.Sequential(nn.Dense(4, 16, "relu", rng=seed), nn.Dense(16, 3, rng=seed + 1))


class Recorder:
    """Every Keras hook, recorded in order."""

    def __init__(self):
        self.calls = []

    def set_model(self, model):
        self.calls.append(("set_model",))

    def set_params(self, params):
        self.calls.append(("set_params", params))

    def on_train_begin(self, keys=None):
        self.calls.append(("train_begin",))

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(("epoch_begin", epoch))

    def on_train_batch_begin(self, batch, logs=None):
        self.calls.append(("batch_begin", batch))

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("batch_end", batch))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", epoch))

    def on_train_end(self):
        self.calls.append(("train_end",))


def test_every_keras_training_hook_is_called_in_keras_order(backend, rng):
    X, y = blobs(rng, n=50)
    rec = Recorder()
    nn_model = mlp()
    nn_model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=2, batch_size=20,
                 verbose=0, callbacks=[rec])
    epoch = [("epoch_begin", 0), ("batch_begin", 0), ("batch_end", 0), ("batch_begin", 1),
             ("batch_end", 1), ("batch_begin", 2), ("batch_end", 2), ("epoch_end", 0)]
    expected = ([("set_model",), ("set_params", {"epochs": 2, "steps": 3, "verbose": 0}),
                 ("train_begin",)] + epoch
                + [(c[0], 1 if c[0].startswith("epoch") else c[1]) for c in epoch]
                + [("train_end",)])
    assert rec.calls == expected


def test_older_batch_hook_names_and_hooks_fit_does_not_call(rng):
    """Keras' on_batch_begin/on_batch_end are its train-batch hooks; a callback built on
    a base class with every Keras hook (evaluate's and predict's too) is quiet."""
    X, y = blobs(rng, n=40)
    seen = []

    class Old:
        def on_batch_begin(self, batch, logs=None):
            seen.append(("begin", batch))

        def on_batch_end(self, batch, logs=None):
            seen.append(("end", batch, sorted(logs)))

    mlp().fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=1, batch_size=20,
              verbose=0, callbacks=[Old()])
    assert seen == [("begin", 0), ("end", 0, ["loss"]), ("begin", 1), ("end", 1, ["loss"])]

    class KerasBase:  # (every hook a no-op, as keras.callbacks.Callback)
        def on_epoch_end(self, epoch, logs=None):
            pass

        def on_test_begin(self, logs=None):
            pass

        def on_predict_end(self, logs=None):
            pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no warning for hooks fit does not call)
        mlp().fit(X, y, loss="cross_entropy", optimizer="sgd", verbose=0,
                  callbacks=[KerasBase()])


def test_a_callback_returning_a_value_is_warned_about(rng):
    """A Keras schedule(epoch, lr) passed as a callback returned its rate, which fit
    ignored: the rate never changed, silently.  True still stops; None and False
    are quiet."""
    X, y = blobs(rng, n=40)
    with pytest.warns(UserWarning, match=r"callbacks\[1\] returned 0.01, which fit ignores.*"
                                         r"LearningRateScheduler"):
        mlp().fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=3, verbose=0,
                  callbacks=[lambda e, logs: None, lambda e, lr: 0.01])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = mlp().fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=3, verbose=0,
                      callbacks=[lambda e, logs: False, lambda e, logs: e == 1])
    assert h.stopped_epoch == 1


@pytest.mark.parametrize("two_args", [True, False])
def test_learning_rate_scheduler_sets_each_epochs_rate(backend, rng, two_args):
    X, y = blobs(rng, n=40)
    model = mlp()
    opt = optim.SGD(model.parameters(), lr=0.1)
    calls, used = [], []
    if two_args:
        def schedule(epoch, lr):
            calls.append((epoch, lr))
            return lr if epoch < 2 else lr * 0.5
    else:
        def schedule(epoch):
            calls.append((epoch,))
            return 0.1 * 0.5 ** epoch
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=4, verbose=0,
              callbacks=[fp.LearningRateScheduler(schedule),
                         lambda e, logs: used.append(opt.lr)])
    if two_args:
        assert calls == [(0, 0.1), (1, 0.1), (2, 0.1), (3, 0.05)]
        assert used == [0.1, 0.1, 0.05, 0.025]
    else:
        assert calls == [(0,), (1,), (2,), (3,)]
        assert used == [0.1, 0.05, 0.025, 0.0125]
    assert all(g["lr"] == used[-1] for g in opt.param_groups)


def test_learning_rate_scheduler_keeps_the_groups_ratios(rng):
    """Each group gets schedule(epoch, its rate): a decay keeps a 10x smaller rate on
    the second group (opt.lr for all collapsed them)."""
    X, y = blobs(rng, n=40)
    model = mlp()
    opt = optim.SGD([{"params": model[0].parameters()},
                     {"params": model[1].parameters(), "lr": 0.01}], lr=0.1)
    calls = []

    def halve(epoch, lr):
        calls.append((epoch, lr))
        return lr * 0.5

    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, verbose=0,
              callbacks=[fp.LearningRateScheduler(halve)])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025, 0.0025])
    assert calls == [(0, 0.1), (1, 0.05)]  # (once per epoch, as Keras)


def test_learning_rate_scheduler_refuses_a_bad_rate_and_use_outside_fit(rng):
    X, y = blobs(rng, n=40)
    model = mlp()
    opt = optim.SGD(model.parameters(), lr=0.1)
    before = [p.value.copy() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"schedule\(0, \.\.\.\) returned"):
        model.fit(X, y, loss="cross_entropy", optimizer=opt, verbose=0,
                  callbacks=[fp.LearningRateScheduler(lambda e, lr: -1.0)])
    assert opt.lr == 0.1
    assert all(np.array_equal(a, p.value) for a, p in zip(before, model.parameters()))
    with pytest.raises(TypeError, match="schedule must be callable"):
        fp.LearningRateScheduler(0.1)
    with pytest.raises(RuntimeError, match="fit callback"):
        fp.LearningRateScheduler(lambda e: 0.1).on_epoch_begin(0)


@pytest.mark.parametrize("monitor,mode", [("val_accuracy", "max"), ("accuracy", "max"),
                                          ("val_loss", "min"), ("loss", "min")])
def test_reduce_lr_on_plateau_mode_follows_the_monitor(monitor, mode):
    """Keras' mode "auto" (the default): an accuracy is better when larger; with it,
    ReduceLROnPlateau(monitor="val_accuracy") cut the rate while accuracy rose."""
    opt = optim.SGD([fp.Parameter(np.ones(2))], lr=0.1)
    s = lr_scheduler.ReduceLROnPlateau(opt, patience=0, monitor=monitor)
    assert s.mode == mode
    for v in (0.5, 0.6, 0.7):  # (improving for an accuracy)
        s.step(v)
    assert opt.lr == (0.1 if mode == "max" else pytest.approx(0.001))
    assert lr_scheduler.ReduceLROnPlateau(opt, "min", monitor=monitor).mode == "min"
    assert lr_scheduler.ReduceLROnPlateau(opt, mode="auto", monitor=monitor).mode == mode
    with pytest.raises(ValueError, match="mode must be 'min', 'max' or 'auto'"):
        lr_scheduler.ReduceLROnPlateau(opt, mode="maximum")


def test_fit_warns_when_the_model_changed_since_its_optimizer_was_made(rng):
    """compile, fit, replace the head, fit again: the optimizer of the compile does not
    hold the new head, which stayed untrained without a word (Keras refuses)."""
    X, y = blobs(rng, n=60)
    model = mlp()
    model.compile("cross_entropy", optim.Adam(model.parameters(), lr=0.01))
    model.fit(X, y, epochs=1, verbose=0)
    model.pop()
    model.append(nn.Dense(16, 3, rng=5))
    with pytest.warns(UserWarning, match=r"2 trainable parameter\(s\) \(2.weight, 2.bias\) "
                                         r"are not in it"):
        model.fit(X, y, epochs=1, verbose=0)
    # an optimizer over part of an unchanged model (PyTorch's fine-tuning idiom): quiet
    body_head = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        body_head.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(body_head[1].parameters(), lr=0.1),
                      verbose=0)
        body_head.fit(X, y, verbose=0)
        fresh = mlp()  # (a new optimizer over the changed model: quiet)
        fresh.compile("cross_entropy", "sgd")
        fresh.append(nn.ReLU())
        fresh.fit(X, y, verbose=0)


def test_batchnorm_momentum_in_keras_meaning_is_warned_about():
    with pytest.warns(UserWarning, match=r"its momentum=0.99 is momentum=0.01 here"):
        nn.BatchNorm1d(4, momentum=0.99)
    bn = nn.BatchNorm1d(4)
    with pytest.warns(UserWarning, match="momentum=0.9 weighs each new batch"):
        bn.momentum = 0.9
    saved = fp.nn.Sequential(fp.nn.Dense(4, 4))
    with pytest.warns(UserWarning):
        saved.append(nn.BatchNorm1d(4, momentum=0.9))
    buf = io.BytesIO()
    fp.save(saved, buf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        buf.seek(0)
        assert fp.load(buf)[1].momentum == 0.9  # (warned when made, not on each load)
        nn.BatchNorm1d(4, momentum=0.1)
        nn.BatchNorm1d(4, momentum=0.5)
        nn.BatchNorm1d(4, momentum=None)


def test_generators_compile_order_and_optimizer_classes(rng):
    X, y = blobs(rng, n=40)
    model = mlp()
    gen = ((X[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10))
    for call in (lambda: model.fit(gen, loss="cross_entropy", optimizer="sgd"),
                 lambda: model.predict(iter(X)),
                 lambda: model.evaluate(gen, y, loss="cross_entropy")):
        with pytest.raises(TypeError, match=r"X must be an array, got \w+, an iterator.*"
                                            r"step\(xb, yb\) for each batch"):
            call()
    with pytest.raises(TypeError, match="y must be an array, got None"):
        model.fit(X, loss="cross_entropy", optimizer="sgd")
    with pytest.raises(ValueError, match=r"loss 'adam' is an optimizer's name: compile "
                                         r"takes the loss first"):
        model.compile("adam", "sparse_categorical_crossentropy")
    for loss in ("cross_entropy", fp.losses.SoftmaxCrossEntropy()):  # (objects too)
        with pytest.raises(TypeError, match=r"loss is an optimizer \(Adam\): compile takes "
                                            r"the loss first"):
            model.compile(optim.Adam(model.parameters()), loss)
    with pytest.raises(TypeError, match="optimizer must be a fastprop.optim.Optimizer or a "
                                        "name, got int"):
        model.compile("cross_entropy", 3)
    h = model.fit(X, y, loss="cross_entropy", optimizer=optim.Adam, epochs=2, verbose=0)
    opt = model._compile_args[1]
    assert type(opt) is optim.Adam and opt.lr == 1e-3 and opt.step_count == 2 * 2
    assert len(h.history["loss"]) == 2


def test_linear_activation_and_evaluate_return_dict(backend, rng):
    X, y = blobs(rng, n=40)
    d = nn.Dense(4, 3, activation="linear", rng=0)
    assert d.activation == "identity" and d.act == 0
    ref = nn.Dense(4, 3, rng=0)
    np.testing.assert_array_equal(d(X), ref(X))
    np.testing.assert_array_equal(fp.ops.activation("linear", X), X)
    model = mlp()
    model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=3, verbose=0)
    res = model.evaluate(X, y, return_dict=True)
    assert set(res) == {"loss", "accuracy"}
    assert res["loss"] == model.evaluate(X, y)
    assert res["accuracy"] == np.mean(model.predict(X).argmax(1) == y)
    reg = model.evaluate(X, np.zeros((40, 3), np.float32), loss="mse", return_dict=True)
    assert set(reg) == {"loss"}
    with pytest.raises(TypeError, match="return_dict must be a bool"):
        model.evaluate(X, y, return_dict="yes")


def test_a_user_losss_own_errors_reach_the_user_unchanged(rng):
    """fit prefixes its targets' errors with the argument's name; a user loss's own
    exception type (here with a constructor of its own) is passed on as it is."""
    class LabelError(ValueError):
        def __init__(self, label, known):
            super().__init__(f"unknown label {label}; known: {known}")

    class Strict(fp.losses.SoftmaxCrossEntropy):
        def prepare_target(self, target, pred_shape, dtype):
            raise LabelError(7, [0, 1])

    X, y = blobs(rng, n=20)
    with pytest.raises(LabelError, match="unknown label 7"):
        mlp().fit(X, y, loss=Strict(), optimizer="sgd", verbose=0)


def test_keras_only_fit_arguments_say_what_does_their_job(rng):
    X, y = blobs(rng, n=20)
    model = mlp()
    before = [p.value.copy() for p in model.parameters()]
    for name, match in [("class_weight", r"'class_weight' \(Keras'\): weigh the classes in "
                                         r"the loss instead: SoftmaxCrossEntropy\(weight="),
                        ("sample_weight", r"'sample_weight' \(Keras'\)"),
                        ("initial_epoch", r"resume=True"),
                        ("workers", r"'workers' \(Keras'\): fit takes whole arrays"),
                        ("nonsense", r"unexpected keyword argument 'nonsense'")]:
        with pytest.raises(TypeError, match=match):
            model.fit(X, y, loss="cross_entropy", optimizer="sgd", verbose=0, **{name: 1})
        with pytest.raises(TypeError, match=match):
            fp.train.fit(model, X, y, loss="cross_entropy", optimizer="sgd", **{name: 1})
    assert all(np.array_equal(a, p.value) for a, p in zip(before, model.parameters()))
