"""Faults in training, threads, determinism, checkpoints and memory.

* divergence: a batch whose loss overflows stops ``fit`` (or is skipped) with the
  model left at the parameters, optimizer state and buffers of the last finite step,
  on the fused whole-step path and on the Python path;
* checkpoints: a run interrupted (an exception mid-epoch, or epochs split over two
  fit calls) and resumed from its checkpoint ends bit-identical to one run;
* threads: forward passes / predict of one model from 4 Python threads at once are
  correct; eval mode of predict is per thread;
* determinism: a seeded fit is bit-reproducible, and the native kernels give
  bit-identical parameters for 1, 2 and 3 OpenMP threads;
* memory: 10,000 training steps keep the resident set flat.
"""

import gc
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastprop as fp
from fastprop import nn, optim, train
from conftest import NATIVE_BUILT
from _support import in_fork_child, snapshot

MODELS = ["dense", "mixed"]  # a dense chain (fused step where the backend has one), other layers


def make_model(kind, seed=0, d=6, classes=3, dropout=0.2):
    if kind == "dense":
        return nn.Sequential(nn.Dense(d, 16, "relu", rng=seed), nn.Dense(16, classes, rng=seed + 1))
    return nn.Sequential(nn.Dense(d, 16, rng=seed), nn.BatchNorm1d(16), nn.Tanh(),
                         nn.Dropout(dropout), nn.LayerNorm(16), nn.Dense(16, classes, rng=seed + 1))


def fused_if_available(model, backend, kind):
    """The dense chain must have run on the backend's whole-step kernel (native)."""
    # (fit's step is gone, held weakly: the same model, loss and optimizer make it)
    step = model._compiled_step() or train.TrainStep(model, *model._compile_args)
    if backend == "native" and kind == "dense":
        assert step.fused() is not None, "the fused step was not used"
    if kind == "mixed":
        assert step.fused() is None


def make_data(n=96, d=6, classes=3, seed=3):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    X = rng.standard_normal((n, d)) + 2.0 * np.eye(classes, d)[y]
    return X, y


def params_bytes(model):
    return [p.value.tobytes() for p in model.parameters()]


def state_bytes(model):
    return [(name, a.tobytes()) for name, a in model.state_arrays()]


# ================================================================ divergence
@pytest.mark.parametrize("kind", MODELS)
def test_divergence_stops_at_last_finite_parameters(backend, kind):
    """The 4th batch holds a finite input that overflows float32 in the first layer:
    fit raises NonFiniteError with the model exactly as after 3 steps."""
    X, y = make_data()
    bad = X.copy()
    bad[3 * 8 + 5] = 3e38  # in batch 3 (0-based) of 8 samples, shuffle=False
    model = make_model(kind)
    model[0].weight.value[...] = np.abs(model[0].weight.value) + 0.1  # sums overflow to inf
    ref = make_model(kind)
    ref[0].weight.value[...] = model[0].weight.value
    opt, ref_opt = optim.Adam(model.parameters(), 1e-2), optim.Adam(ref.parameters(), 1e-2)
    kw = dict(loss="cross_entropy", batch_size=8, shuffle=False, seed=0, verbose=0)
    ref.fit(X[:24], y[:24], optimizer=ref_opt, **kw)  # the three good batches
    with np.errstate(all="ignore"), pytest.raises(fp.NonFiniteError, match="non-finite"):
        model.fit(bad, y, optimizer=opt, **kw)
    fused_if_available(model, backend, kind)
    assert state_bytes(model) == state_bytes(ref)  # parameters and BatchNorm statistics
    assert snapshot(optimizer=opt)[1:] == snapshot(optimizer=ref_opt)[1:]  # hyper, state
    assert opt.step_count == ref_opt.step_count == 3
    assert all(np.isfinite(p.value).all() for p in model.parameters())


@pytest.mark.parametrize("kind", MODELS)
def test_divergence_skip_drops_only_the_bad_batch(backend, kind):
    """on_nonfinite="skip": the run equals one on the data without the bad batch
    (no Dropout here: it would draw a mask for the skipped batch too)."""
    X, y = make_data()
    bad = X.copy()
    bad[3 * 8 + 5] = 3e38
    model = make_model(kind, dropout=0.0)
    model[0].weight.value[...] = np.abs(model[0].weight.value) + 0.1
    ref = make_model(kind, dropout=0.0)
    ref[0].weight.value[...] = model[0].weight.value
    keep = np.r_[0:24, 32:96]
    kw = dict(loss="cross_entropy", batch_size=8, shuffle=False, verbose=0)
    ref_hist = ref.fit(X[keep], y[keep], optimizer=optim.SGD(ref.parameters(), 0.05, 0.9), **kw)
    with np.errstate(all="ignore"):
        hist = model.fit(bad, y, optimizer=optim.SGD(model.parameters(), 0.05, 0.9),
                         on_nonfinite="skip", **kw)
    fused_if_available(model, backend, kind)
    assert hist.skipped_steps == 1
    assert state_bytes(model) == state_bytes(ref)  # parameters and BatchNorm statistics
    assert hist["loss"] == ref_hist["loss"]


@pytest.mark.parametrize("opt_name", ["adam", "rmsprop", "adagrad"])
def test_a_loss_above_float32s_range_is_refused(backend, opt_name):
    """A float32 model's loss that is finite only in double (one target of 1e25: the
    MSE is ~1e48) is refused as PyTorch's float32 loss (inf) would be caught: its
    finite gradients (~1e24) square to inf in Adam's, RMSprop's and Adagrad's
    second moments, and the weights with an infinite moment never move again, with
    no error (a silent freeze).  A float64 model trains on the same data."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 4)).astype(np.float32)
    y = X @ rng.standard_normal((4, 1)).astype(np.float32)
    y[5, 0] = 1e25
    for dtype in (np.float32, np.float64):
        model = nn.Sequential(nn.Dense(4, 8, "relu", rng=0, dtype=dtype),
                              nn.Dense(8, 1, rng=1, dtype=dtype))
        opt = {"adam": optim.Adam, "rmsprop": optim.RMSprop,
               "adagrad": optim.Adagrad}[opt_name](model.parameters(), lr=1e-2)
        kw = dict(loss="mse", optimizer=opt, batch_size=64, verbose=0, seed=0)
        if dtype is np.float64:
            model.fit(X.astype(dtype), y.astype(dtype), **kw)
            assert opt.step_count == 1
            continue
        before = state_bytes(model)
        with pytest.raises(fp.NonFiniteError, match=r"loss 1\.\d+e\+48 overflows float32"):
            model.fit(X, y, **kw)
        assert state_bytes(model) == before and opt.step_count == 0
        hist = model.fit(X, y, on_nonfinite="skip", **kw)
        assert hist.skipped_steps == 1 and state_bytes(model) == before
        assert all(np.isfinite(v).all() for s in opt.state for v in s.values())


def test_an_epoch_with_every_batch_skipped_reports_nan(backend):
    """No batch trained: the epoch's loss and accuracy are NaN, not 0 (a perfect
    cross-entropy, which would read as a converged model)."""
    X, y = make_data()
    model = make_model("dense", dropout=0.0)
    model[0].weight.value[...] = np.abs(model[0].weight.value) + 0.1
    bad = np.full_like(X, 3e38)  # finite input whose forward overflows
    with np.errstate(all="ignore"):
        hist = model.fit(bad, y, loss="cross_entropy", optimizer="sgd", batch_size=32,
                         epochs=2, shuffle=False, verbose=0, on_nonfinite="skip")
    assert hist.skipped_steps == 2 * -(-len(X) // 32)
    assert np.isnan(hist["loss"]).all() and np.isnan(hist["accuracy"]).all()


def test_skip_keeps_batchnorm_statistics_finite(backend):
    X, y = make_data()
    bad = X.copy()
    bad[5] = 3e38
    model = make_model("mixed")
    model[0].weight.value[...] = np.abs(model[0].weight.value) + 0.1
    with np.errstate(all="ignore"):
        hist = model.fit(bad, y, loss="cross_entropy", optimizer="adam", batch_size=8,
                         shuffle=False, verbose=0, on_nonfinite="skip")
    assert hist.skipped_steps == 1
    assert all(np.isfinite(a).all() for _, a in model.state_arrays())
    assert np.isfinite(model.predict(X)).all()


# ================================================================ checkpoints
class Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, calls):
    """Make the ``calls``-th training step of fit raise (a crash mid-epoch)."""
    original = train.TrainStep._fit_batch
    count = [0]

    def step(self, x, y):
        count[0] += 1
        if count[0] == calls:
            raise Interrupt(f"step {calls}")
        return original(self, x, y)

    monkeypatch.setattr(train.TrainStep, "_fit_batch", step)
    return lambda: monkeypatch.setattr(train.TrainStep, "_fit_batch", original)


def _fresh(kind, opt_name):
    model = make_model(kind)
    opt = (optim.Adam(model.parameters(), 1e-2) if opt_name == "adam"
           else optim.SGD(model.parameters(), 0.05, momentum=0.9, nesterov=True))
    return model, opt


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_resume_after_a_crash_is_bit_identical(backend, kind, opt_name, tmp_path, monkeypatch):
    X, y = make_data()
    kw = dict(loss="cross_entropy", epochs=5, batch_size=16, seed=7, verbose=0,
              validation_split=0.25)
    model, opt = _fresh(kind, opt_name)
    ref_hist = model.fit(X, y, optimizer=opt, **kw)
    expected, expected_opt = state_bytes(model), snapshot(optimizer=opt)

    path = tmp_path / "run.ckpt"
    model, opt = _fresh(kind, opt_name)
    undo = _interrupt_after(monkeypatch, 2 * 5 + 3)  # 5 steps per epoch: in epoch 3
    with pytest.raises(Interrupt):
        model.fit(X, y, optimizer=opt, checkpoint=path, checkpoint_every=2, **kw)
    undo()
    assert fp.load(path) is not None  # a checkpoint is a model file too
    model, opt = _fresh(kind, opt_name)  # a new process would start from scratch
    hist = model.fit(X, y, optimizer=opt, checkpoint=path, resume=True, **kw)
    assert state_bytes(model) == expected
    assert snapshot(optimizer=opt) == expected_opt
    assert hist.history == ref_hist.history and hist.epoch == ref_hist.epoch == list(range(5))


@pytest.mark.parametrize("kind", MODELS)
def test_epochs_split_over_two_fits_equal_one_fit(backend, kind, tmp_path):
    X, y = make_data()
    kw = dict(loss="cross_entropy", batch_size=10, seed=1, verbose=0)
    model, opt = _fresh(kind, "adam")
    model.fit(X, y, optimizer=opt, epochs=4, **kw)
    expected = state_bytes(model)
    path = os.fspath(tmp_path / "run.ckpt")
    model, opt = _fresh(kind, "adam")
    model.fit(X, y, optimizer=opt, epochs=2, checkpoint=path, **kw)
    model, opt = _fresh(kind, "adam")
    hist = model.fit(X, y, optimizer=opt, epochs=4, checkpoint=path, resume=True, **kw)
    assert state_bytes(model) == expected
    assert hist.epoch == [0, 1, 2, 3]
    # finished: resuming again trains nothing and returns the whole history
    again = model.fit(X, y, optimizer=opt, epochs=4, checkpoint=path, resume=True, **kw)
    assert state_bytes(model) == expected and again.history == hist.history


def test_resume_without_a_checkpoint_file_starts_fresh(tmp_path):
    X, y = make_data()
    kw = dict(loss="cross_entropy", epochs=2, batch_size=16, seed=2, verbose=0)
    a, opt_a = _fresh("dense", "adam")
    a.fit(X, y, optimizer=opt_a, **kw)
    b, opt_b = _fresh("dense", "adam")
    b.fit(X, y, optimizer=opt_b, checkpoint=tmp_path / "new.ckpt", resume=True, **kw)
    assert state_bytes(a) == state_bytes(b)
    assert (tmp_path / "new.ckpt").exists()


def test_checkpoint_every_n_epochs(tmp_path, monkeypatch):
    saved = []
    real = train._checkpoint.save
    monkeypatch.setattr(train._checkpoint, "save",
                        lambda path, model, opt, done, *a: (saved.append(done),
                                                            real(path, model, opt, done, *a)))
    X, y = make_data()
    model, opt = _fresh("dense", "sgd")
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=7, verbose=0,
              checkpoint=tmp_path / "c.fp", checkpoint_every=3)
    assert saved == [3, 6, 7]
    assert [p.name for p in tmp_path.iterdir()] == ["c.fp"]  # no temporary files left


@pytest.mark.parametrize("change, match", [
    (dict(batch_size=8), "settings"),
    (dict(shuffle=False), "settings"),
    (dict(X=slice(0, 90)), "settings"),
    (dict(model=lambda: nn.Sequential(nn.Dense(6, 17, "relu"), nn.Dense(17, 3))),
     "model\\[0\\] \\(Dense\\): out_features=16 in the file, 17 here"),
    # (arrays of the very shapes; it trained on silently)
    (dict(model=lambda: nn.Sequential(nn.Dense(6, 16, "tanh"), nn.Dense(16, 3))),
     "another architecture.*activation='relu' in the file, 'tanh' here"),
    (dict(model=lambda: nn.Sequential(nn.Dense(6, 16, "relu"), nn.Dropout(0.5),
                                      nn.Dense(16, 3))), "2 submodules in the file, 3 here"),
    (dict(model=lambda: nn.Sequential(nn.Dense(6, 16), nn.Dense(16, 3), nn.Sigmoid())),
     "another architecture"),
    (dict(model=lambda: nn.Sequential(nn.Dense(6, 16, "relu", dtype=np.float64),
                                      nn.Dense(16, 3, dtype=np.float64))), "float64"),
    (dict(optimizer="sgd"), "state_dict is for 'Adam', not 'SGD'"),
    (dict(loss=fp.losses.SoftmaxCrossEntropy(label_smoothing=0.1)), "settings"),
])
def test_resume_rejects_a_mismatched_checkpoint_untouched(tmp_path, change, match):
    X, y = make_data()
    path = tmp_path / "run.ckpt"
    model, opt = _fresh("dense", "adam")
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=16, verbose=0,
              checkpoint=path)
    model = change.get("model", lambda: make_model("dense", seed=5))()
    opt = (optim.SGD(model.parameters(), 0.1) if change.get("optimizer") == "sgd"
           else optim.Adam(model.parameters()))
    before = snapshot(model, opt)
    sl = change.get("X", slice(None))
    with pytest.raises(ValueError, match=match):
        model.fit(X[sl], y[sl], loss=change.get("loss", "cross_entropy"), optimizer=opt,
                  epochs=2, verbose=0,
                  checkpoint=path, resume=True, batch_size=change.get("batch_size", 16),
                  shuffle=change.get("shuffle", True))
    assert snapshot(model, opt) == before


def test_resume_rejects_other_layer_classes_and_settings_untouched(tmp_path):
    """A mixed model's checkpoint against the same arrays in other layers: a Sigmoid
    for its Tanh, another Dropout rate, BatchNorm momentum (each resumed silently)."""
    X, y = make_data()
    path = tmp_path / "run.ckpt"
    model = make_model("mixed")
    model.fit(X, y, loss="cross_entropy", optimizer=optim.Adam(model.parameters()), epochs=1,
              batch_size=16, verbose=0, checkpoint=path)
    for edit, match in [(lambda m: m.layers.__setitem__(2, nn.Sigmoid()),
                         r"model\[2\]: Tanh in the file, Sigmoid here"),
                        (lambda m: setattr(m[3], "p", 0.9), r"model\[3\] \(Dropout\): p=0.2"),
                        (lambda m: setattr(m[1], "momentum", 0.5), "momentum=0.1")]:
        other = make_model("mixed")
        edit(other)
        opt = optim.Adam(other.parameters())
        before = snapshot(other, opt)
        with pytest.raises(ValueError, match=match):
            other.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=16,
                      verbose=0, checkpoint=path, resume=True)
        assert snapshot(other, opt) == before
    same = make_model("mixed")
    same.fit(X, y, loss="cross_entropy", optimizer=optim.Adam(same.parameters()), epochs=2,
             batch_size=16, verbose=0, checkpoint=path, resume=True)  # (accepted)


def test_resume_compares_settings_left_at_their_defaults_and_names_of_one_thing():
    """A setting a config leaves out at its default is compared (GELU's tanh form
    against the exact one resumed silently); names of one computation are not told
    apart (Dense activation None / "identity" / "linear", Softmax dim 1 / -1 on 2-D
    input), nor a Dropout seed (a resume restores the generators)."""
    from fastprop.serialization import architecture_mismatch, model_to_tree

    def tree(*layers):
        return model_to_tree(nn.Sequential(*layers))

    assert "approximate='none' in the file, 'tanh' here" in architecture_mismatch(
        tree(nn.Dense(2, 2), nn.GELU(approximate="none")), nn.Sequential(nn.Dense(2, 2),
                                                                        nn.GELU()))
    assert "approximate='tanh' in the file, 'none' here" in architecture_mismatch(
        tree(nn.Dense(2, 2), nn.GELU()), nn.Sequential(nn.Dense(2, 2),
                                                      nn.GELU(approximate="none")))
    for a, b in [(nn.Dense(2, 2), nn.Dense(2, 2, "identity")),
                 (nn.Dense(2, 2, "linear"), nn.Dense(2, 2)),
                 (nn.Softmax(dim=1), nn.Softmax()), (nn.Dropout(0.1, seed=1),
                                                     nn.Dropout(0.1, seed=2))]:
        assert architecture_mismatch(tree(a), nn.Sequential(b)) is None, (a, b)
    assert architecture_mismatch(tree(nn.Dense(2, 2)), nn.Sequential(nn.Dense(2, 2, "relu")))


def test_resume_rejects_corrupt_and_foreign_files(tmp_path):
    X, y = make_data()
    path = tmp_path / "run.ckpt"
    model, opt = _fresh("dense", "adam")
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, verbose=0, checkpoint=path)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    before = snapshot(model, opt)
    kw = dict(loss="cross_entropy", optimizer=opt, epochs=2, verbose=0, resume=True)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        model.fit(X, y, checkpoint=path, **kw)
    fp.save(model, tmp_path / "plain.fp")
    with pytest.raises(ValueError, match="not a fit checkpoint"):
        model.fit(X, y, checkpoint=tmp_path / "plain.fp", **kw)
    assert snapshot(model, opt) == before


# ================================================================ threads
def _threaded(fn, n_threads=4, rounds=8):
    """fn(i) ``rounds`` times in each of ``n_threads`` threads started together, on
    the calling thread's backend (use_backend is per thread)."""
    barrier = threading.Barrier(n_threads)
    backend = fp.get_backend()

    def work(i):
        with fp.use_backend(backend):
            barrier.wait()
            return [fn(i) for _ in range(rounds)]

    with ThreadPoolExecutor(n_threads) as pool:
        return [r for rs in pool.map(work, range(n_threads)) for r in rs]


def test_forward_of_one_model_from_4_threads(backend):
    """Kernels release the GIL; one model's forward (a fresh output per call) runs in
    4 threads at once and every result equals the serial one."""
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Dense(64, 256, "gelu", rng=0), nn.LayerNorm(256),
                          nn.Dense(256, 128, "relu", rng=1), nn.Dense(128, 10, "softmax", rng=2))
    xs = [rng.standard_normal((300, 64)).astype(np.float32) for _ in range(4)]
    expected = [model(x).copy() for x in xs]
    results = _threaded(lambda i: (i, model(xs[i])))
    assert all(np.array_equal(out, expected[i]) for i, out in results)


def test_predict_from_4_threads_with_batchnorm_and_dropout(backend):
    """predict's eval mode is per thread: concurrent predict calls neither see another
    thread's training mode nor update BatchNorm statistics nor change any flag."""
    X, y = make_data(n=256)
    model = make_model("mixed")
    model.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=1, verbose=0, seed=0)
    expected = model.predict(X)
    before = state_bytes(model)
    results = _threaded(lambda i: model.predict(X, batch_size=64), rounds=6)
    assert all(np.array_equal(r, expected) for r in results)
    assert state_bytes(model) == before
    assert all(m.training for m in model.modules())


def test_inference_mode_is_per_thread():
    layer = nn.Dropout(0.5)
    seen = {}
    inside = threading.Event()
    done = threading.Event()

    def other():
        inside.wait()
        seen["other"] = layer.training
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with nn.inference_mode():
        seen["inside"] = layer.training
        inside.set()
        done.wait()
    t.join()
    assert seen == {"inside": False, "other": True} and layer.training


def test_inference_mode_and_use_backend_are_per_asyncio_task():
    """A coroutine suspended inside inference_mode / use_backend leaves another task on
    the same thread in its own mode and backend (a fit meanwhile trained with BatchNorm
    frozen)."""
    import asyncio
    bn = nn.BatchNorm1d(3)
    seen = {}

    async def serving(inside, done):
        with nn.inference_mode(), fp.use_backend("numpy"):
            seen["serving"] = (bn.training, fp.get_backend())
            inside.set()
            await done.wait()

    async def training(inside, done):
        await inside.wait()
        seen["training"] = (bn.training, fp.get_backend())
        before = bn.running_mean.copy()
        bn(np.arange(12.0).reshape(4, 3))  # (a training forward: statistics move)
        seen["moved"] = not np.array_equal(before, bn.running_mean)
        done.set()

    async def main():
        inside, done = asyncio.Event(), asyncio.Event()
        await asyncio.gather(serving(inside, done), training(inside, done))

    default = fp.get_backend()
    asyncio.run(main())
    assert seen == {"serving": (False, "numpy"), "training": (True, default), "moved": True}


def _layer_path_model(seed=0):
    """A model whose compiled step runs layer by layer (LayerNorm, Dropout)."""
    return nn.Sequential(nn.Dense(12, 16, "relu", rng=seed), nn.LayerNorm(16),
                         nn.Dropout(0.2, seed=seed), nn.Dense(16, 4, rng=seed + 1))


def test_predict_between_forward_and_backward_leaves_training_alone(backend):
    """Forward passes inside inference_mode (predict, evaluate) keep nothing for
    backward: a predict on other rows between a training forward and its backward
    (here, in the same thread) changes no gradient; they overwrote the layers'
    caches, giving wrong gradients or a shape error."""
    rng = np.random.default_rng(0)
    x, xv = rng.standard_normal((8, 12)), rng.standard_normal((8, 12))
    y = rng.integers(0, 4, 8)
    grads = []
    for interleave in (None, xv, xv[:5]):
        model = _layer_path_model()
        loss = fp.losses.SoftmaxCrossEntropy()
        loss(model(x), y)
        if interleave is not None:
            model.predict(interleave)
            model.evaluate(interleave, y[:len(interleave)], loss="cross_entropy")
        model.backward(loss.backward())
        grads.append([p.grad.copy() for p in model.parameters()])
    for other in grads[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(grads[0], other))


def test_training_beside_predict_of_the_same_model(backend):
    """Training a model on the layer path while other threads predict with it gives
    the parameters of training alone (the predictions may see any mix of them)."""
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((96, 12)), rng.integers(0, 4, 96)

    def train(model, stop=None):
        with fp.use_backend(backend):  # (per thread)
            model.fit(X, y, loss="cross_entropy", epochs=4, batch_size=16, seed=3, verbose=0,
                      optimizer=optim.Adam(model.parameters(), 1e-2))
        if stop is not None:
            stop.set()
        return [p.value.copy() for p in model.parameters()]

    alone = train(_layer_path_model())
    model = _layer_path_model()
    stop = threading.Event()

    def predictor(rows):
        count = 0
        with fp.use_backend(backend):
            while not stop.is_set():
                model.predict(X[:rows])
                count += 1
        return count

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(predictor, rows) for rows in (16, 7)]
        trained = pool.submit(train, model, stop).result()
        assert all(f.result() > 0 for f in futures)
    assert all(np.array_equal(a, b) for a, b in zip(alone, trained))


def test_one_loss_object_shared_by_steps_in_two_threads(backend):
    """A training step keeps its loss gradient to itself: two models trained in two
    threads with one shared loss object end as when trained one after the other."""
    rng = np.random.default_rng(2)
    data = [(rng.standard_normal((64, 12)), rng.integers(0, 4, 64)) for _ in range(2)]
    shared = fp.losses.SoftmaxCrossEntropy(label_smoothing=0.1)

    def run(i, loss):
        model = _layer_path_model(seed=i)
        step = model.compile(loss, optim.SGD(model.parameters(), lr=0.05))
        X, y = data[i]
        for _ in range(40):
            for s in range(0, 64, 8):
                step(X[s:s + 8], y[s:s + 8])
        return [p.value.copy() for p in model.parameters()]

    serial = [run(i, shared) for i in range(2)]
    backend_name = fp.get_backend()

    def threaded(i):
        with fp.use_backend(backend_name):
            return run(i, shared)

    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(threaded, range(2)))
    for a, b in zip(serial, together):
        assert all(np.array_equal(p, q) for p, q in zip(a, b))


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
def test_one_compiled_step_from_two_threads_is_refused():
    """The native step's plan is one per step: a call from a second thread while one
    runs raises RuntimeError (it rebound the workspaces under the running kernel and
    crashed the process)."""
    rng = np.random.default_rng(3)
    model = nn.Sequential(nn.Dense(64, 256, "relu", rng=0), nn.Dense(256, 10, rng=1))
    with fp.use_backend("native"):
        step = model.compile("cross_entropy", optim.Adam(model.parameters(), 1e-3))
        batches = [(rng.standard_normal((n, 64)), rng.integers(0, 10, n)) for n in (256, 32)]
        step(*batches[0])
        assert type(step._fast).__name__ == "NativeTrainStep"
    errors, done = [], []

    def hammer(i):
        with fp.use_backend("native"):
            for _ in range(200):
                try:
                    step(*batches[i])
                    done.append(i)
                except RuntimeError as exc:
                    errors.append(str(exc))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) + len(errors) == 400 and done
    assert all("already running in another thread" in e for e in errors)
    assert all(np.isfinite(p.value).all() for p in model.parameters())


def test_a_layer_path_step_from_two_threads_is_refused(backend):
    """The same guard on the layer path (BatchNorm: no fused kernel): two threads in
    one step shared the layers' caches and gradients ("backward called before
    forward", or silently mixed gradients); a second thread's call is refused."""
    rng = np.random.default_rng(3)
    model = nn.Sequential(nn.Dense(16, 64, "relu", rng=0), nn.BatchNorm1d(64),
                          nn.Dense(64, 10, rng=1))
    step = model.compile("cross_entropy", optim.SGD(model.parameters(), 1e-3))
    x, y = rng.standard_normal((64, 16)), rng.integers(0, 10, 64)
    errors, done = [], []

    def hammer():
        with fp.use_backend(backend):
            for _ in range(60):
                try:
                    step(x, y)
                    done.append(1)
                except Exception as exc:  # (any other error is the failure)
                    errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) + len(errors) == 120 and done
    assert all(e.startswith("RuntimeError: this training step is already running")
               for e in errors), errors[:3]


# ================================================================ determinism
def _fit_bytes(kind, X, y, seed):
    model = make_model(kind, d=X.shape[1], classes=10)
    model.fit(X, y, loss="cross_entropy", optimizer=optim.Adam(model.parameters(), 1e-3),
              epochs=2, batch_size=256, seed=seed, verbose=0)
    return state_bytes(model)


@pytest.mark.parametrize("kind", MODELS)
def test_seeded_fit_is_bit_reproducible(backend, kind):
    X, y = make_data(n=300, d=20, classes=10)
    assert _fit_bytes(kind, X, y, 4) == _fit_bytes(kind, X, y, 4)
    assert _fit_bytes(kind, X, y, 4) != _fit_bytes(kind, X, y, 5)


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
@pytest.mark.parametrize("kind", MODELS)
def test_native_parameters_do_not_depend_on_the_thread_count(kind):
    """The README's determinism claim: GEMM partitions output tiles, elementwise and
    per-column work is split without changing any sum, so 1, 2 and 3 threads give
    bit-identical parameters (sizes large enough for every kernel to go parallel)."""
    if not fp.backends.load("native").config()["openmp"]:
        pytest.skip("built without OpenMP")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1024, 300)).astype(np.float32)
    y = rng.integers(0, 10, 1024)
    before = fp.get_num_threads()
    native = fp.backends.load("native")._native
    was = native.backoff()
    native.set_backoff(False)  # (the threads asked for, even on a busy machine)
    try:
        with fp.use_backend("native"):
            runs = []
            for t in (1, 2, 3):
                fp.set_num_threads(t)
                runs.append(_fit_bytes(kind, X, y, 0))
    finally:
        fp.set_num_threads(before)
        native.set_backoff(was)
    assert runs[0] == runs[1] == runs[2]


def _busy_processes(count):
    import subprocess
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(count)]


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="reads /proc/loadavg")
def test_kernels_back_off_while_other_processes_keep_the_cores_busy():
    """With every core kept busy by other processes, a kernel runs with fewer threads
    (a team meeting at barriers beside busy processes waits for time slices: 45x
    slower on 2 cores), with the same results: the fit's parameters and a large
    loss (a sum split per thread) are bit-identical to those with the back-off off."""
    native = fp.backends.load("native")._native
    if not native.openmp() or fp.get_num_threads() < 2:
        pytest.skip("needs OpenMP and 2 threads")
    if len(os.sched_getaffinity(0)) != os.cpu_count():
        pytest.skip("a process pinned to some CPUs counts only its own threads (the "
                    "machine-wide count says nothing about its cores)")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1024, 300)).astype(np.float32)
    y = rng.integers(0, 10, 1024)
    big = rng.standard_normal((1024, 1024)).astype(np.float32)

    def results():
        with fp.use_backend("native"):
            value = fp.losses.MSE().value(big, np.zeros_like(big))
            return _fit_bytes("mlp", X, y, 0), value

    was = native.backoff()  # (off for the suite, conftest.py: turned on here)
    native.set_backoff(False)
    try:
        assert native.threads_free(2) == 2
        quiet = results()
    finally:
        native.set_backoff(True)
    procs = _busy_processes(os.cpu_count() or 2)
    try:
        deadline = time.monotonic() + 5
        while native.threads_free(2) != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert native.threads_free(2) == 1
        busy = results()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        native.set_backoff(was)
    assert busy == quiet


_BUSY_THREAD = """
import hashlib, threading
stop = threading.Event()
def _busy():  # (hashlib releases the GIL: runnable all the time, as a BLAS worker)
    data = b"x" * (1 << 22)
    while not stop.is_set():
        hashlib.sha256(data).digest()
busy = threading.Thread(target=_busy)
def _poll(call, want, seconds=10):  # (the count is averaged over ~30 ms of readings)
    import time
    deadline = time.monotonic() + seconds
    while call() != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return call()
"""


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                    reason="pins a process to one of several CPUs (Linux)")
def test_a_pinned_process_counts_its_cpus_and_its_own_threads():
    """A process pinned to some CPUs (taskset, a cpuset container) cannot judge its
    cores by the machine-wide /proc/loadavg: the back-off counts the CPUs of its
    affinity and this process' own runnable threads (OpenBLAS's workers busy-wait
    ~0.1 s after a NumPy product; beside them a 2-thread team waited a time slice at
    every barrier, 14x slower).  It had been off there: 2 threads on one CPU."""
    import subprocess
    code = _BUSY_THREAD + """
import os
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
import fastprop as fp
n = fp.backends.load("native")._native
fp.set_num_threads(2)
n.set_backoff(True)
print(n.backoff_state(), fp._config.config()["native.backoff"], sep="|")
print(n.threads_free(2), n.threads_free(1))
quiet = _poll(n.own_runnable_threads, 1)
busy.start()
loaded = _poll(n.own_runnable_threads, 2)
stop.set(); busy.join()
print(quiet, loaded, _poll(n.own_runnable_threads, 1))
"""
    env = {k: v for k, v in os.environ.items() if k != "FASTPROP_BACKOFF"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()[-3:]
    assert lines[0] == "pinned|on, this process' own threads (it is pinned to some CPUs)"
    assert lines[1] == "1 1"  # (one CPU: one thread, whatever was asked)
    assert lines[2] == "1 2 1", lines  # (the caller; with the busy thread; after it)


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                    reason="a pinned process of 2 CPUs or more (Linux)")
@pytest.mark.parametrize("how", ["forced", "affinity"])
def test_a_process_pinned_to_two_cpus_backs_off_for_its_own_busy_thread(how):
    """Pinned to 2 CPUs: 2 threads while this process is quiet (its own OpenMP
    workers, spinning after a region, are not counted against it), 1 while another of
    its threads keeps a core busy, 2 again after; busy processes outside it are not
    seen.  "affinity" pins to 2 of 3 or more CPUs; "forced" treats the process as
    pinned to all of its CPUs (the only way on a 2-CPU machine)."""
    import subprocess
    if how == "affinity" and (os.cpu_count() or 1) < 3:
        pytest.skip("pins a process to 2 of 3 or more CPUs")
    pin = ("os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:2]))"
           if how == "affinity" else "")
    force = "n._force_pinned(True)" if how == "forced" else ""
    code = _BUSY_THREAD + f"""
import os
{pin}
import numpy as np, fastprop as fp
n = fp.backends.load("native")._native
{force}
fp.set_num_threads(2)
n.set_backoff(True)
x = np.ones(1 << 22, np.float32)
fp.ops.activation("sigmoid", x)  # (a 2-thread region: its worker spins after it)
quiet = _poll(lambda: n.threads_free(2), 2)
busy.start()
loaded = _poll(lambda: n.threads_free(2), 1)
stop.set(); busy.join()
print(n.backoff_state(), quiet, loaded, _poll(lambda: n.threads_free(2), 2))
"""
    env = {k: v for k, v in os.environ.items() if k != "FASTPROP_BACKOFF"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-4:] == ["pinned", "2", "1", "2"], run.stdout


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                    reason="Linux, 2 CPUs or more")
@pytest.mark.parametrize("var", ["OMP_PROC_BIND=true", "OMP_PLACES=cores"])
def test_openmp_thread_binding_is_not_mistaken_for_a_pinned_process(var):
    """GNU OpenMP binds the thread that loads it to one place when OMP_PROC_BIND or
    OMP_PLACES ask for binding: that thread's affinity is then one CPU, and the
    back-off took the process for one pinned to it (every kernel serial).  The
    process' CPUs are OpenMP's count."""
    import subprocess
    if len(os.sched_getaffinity(0)) != os.cpu_count():
        pytest.skip("this process is pinned already")
    code = ("import fastprop as fp; n = fp.backends.load('native')._native; "
            "print(n.backoff_state(), fp._config.config()['native.backoff'], sep='|')")
    key, value = var.split("=")
    env = {k: v for k, v in os.environ.items() if k != "FASTPROP_BACKOFF"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, key: value}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "on|on"


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
def test_backoff_switch():
    """FASTPROP_BACKOFF=0 turns the back-off off (threads_free(n) == n), and
    show_config says which; bad values of the switch are refused."""
    import subprocess
    code = ("import fastprop as fp; n = fp.backends.load('native')._native; "
            "print(n.backoff(), n.threads_free(7), fp._config.config()['native.backoff'])")
    env = dict(os.environ, FASTPROP_BACKOFF="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()[-1].split(maxsplit=2)
    assert out == ["False", "7", "off (FASTPROP_BACKOFF=0)"]
    native = fp.backends.load("native")._native
    was = native.backoff()  # (off for the suite, conftest.py: the default is on)
    native.set_backoff(True)
    try:
        pinned = len(os.sched_getaffinity(0)) != os.cpu_count()
        assert native.backoff() and fp._config.config()["native.backoff"] == (
            "on, this process' own threads (it is pinned to some CPUs)" if pinned else "on")
        assert 1 <= native.threads_free(3) <= 3
    finally:
        native.set_backoff(was)
    code = ("import fastprop as fp; n = fp.backends.load('native')._native; "
            "print(n.backoff())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={k: v for k, v in os.environ.items()
                                          if k != "FASTPROP_BACKOFF"}).stdout
    assert out.split()[-1] == "True"  # (on by default)
    with pytest.raises(TypeError, match="on must be a bool"):
        native.set_backoff("no")
    with pytest.raises(ValueError, match="nt must be an int >= 1"):
        native.threads_free(0)
    # the usual spellings (any case, blanks around); another value is warned about at
    # import and leaves the back-off on (only the exact "0" turned it off)
    code = ("import warnings; warnings.simplefilter('error'); import fastprop as fp; "
            "print(fp.backends.load('native')._native.backoff(), "
            "repr(fp._config.config()['native.backoff']))")
    for value, on, warns in ((" Off ", False, False), ("FALSE", False, False),
                             ("no", False, False), ("0\n", False, False),
                             ("yes", True, False), ("1", True, False),
                             ("disable", True, True), ("00", True, True),
                             ("0\xa0", True, True)):  # (not an ASCII blank: C keeps it)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, FASTPROP_BACKOFF=value))
        if warns:
            assert run.returncode != 0 and "is not one of 0/false/off/no" in run.stderr
            run = subprocess.run([sys.executable, "-W", "ignore", "-c", code.split("; ", 2)[2]],
                                 capture_output=True, text=True, check=True,
                                 env=dict(os.environ, FASTPROP_BACKOFF=value))
        assert run.returncode == 0, run.stderr
        shown, config = run.stdout.splitlines()[-1].split(" ", 1)
        assert shown == str(on), (value, run.stdout)
        pinned = len(os.sched_getaffinity(0)) != os.cpu_count()
        on_text = ('"on, this process\' own threads (it is pinned to some CPUs)"' if pinned
                   else "'on'")
        assert config == (on_text if on else f"'off (FASTPROP_BACKOFF={value.strip()})'")


@pytest.mark.skipif(not NATIVE_BUILT or not sys.platform.startswith("linux"),
                    reason="counts the threads in /proc/self/task")
def test_an_elementwise_kernel_starts_at_most_256_threads():
    """set_num_threads accepts any count (as omp_set_num_threads); an elementwise
    kernel of 2^26 floats (512 grains) started one thread per grain with the back-off
    off: capped at 256, as GEMM's plan is."""
    import subprocess
    code = ("import os, numpy as np, fastprop as fp; fp.set_num_threads(10**9); "
            "x = np.zeros(2**26, np.float32); fp.ops.activation('sigmoid', x, out=x); "
            "print(fp.get_num_threads(), len(os.listdir('/proc/self/task')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ, FASTPROP_BACKOFF="0",
                                              OPENBLAS_NUM_THREADS="1")).stdout
    out = out.splitlines()[-1].split()
    assert int(out[0]) >= 256 and 256 <= int(out[1]) <= 256 + 8, out


# ================================================================ memory
def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("kind", MODELS)
def test_10000_training_steps_keep_memory_flat(backend, kind):
    """A leak of one small array per step (>= 200 bytes) would exceed the bound."""
    if backend == "numpy" and kind == "mixed":
        pytest.skip("the native kernels are the subject; one numpy run suffices")
    rng = np.random.default_rng(0)
    model = make_model(kind, d=32, classes=10)
    step = model.compile("cross_entropy", optim.Adam(model.parameters(), 1e-3))
    X = rng.standard_normal((64, 32)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    for _ in range(500):  # warm up: workspaces, optimizer state, allocator pools
        step(X, y)
    gc.collect()
    start = _rss()
    for _ in range(10_000):
        step(X, y)
    gc.collect()
    growth = _rss() - start
    assert growth < 2 * 2**20, f"resident memory grew by {growth / 2**20:.2f} MiB"


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
def test_set_num_threads_applies_to_the_calling_thread():
    """The README's statement: fp.set_num_threads follows omp_set_num_threads (per
    calling thread); a new Python thread starts from the process default."""
    if not fp.backends.load("native").config()["openmp"]:
        pytest.skip("built without OpenMP")
    before = fp.get_num_threads()
    seen = {}
    t = threading.Thread(target=lambda: seen.setdefault("default", fp.get_num_threads()))
    t.start()
    t.join()
    try:
        fp.set_num_threads(1 if seen["default"] > 1 else 2)
        mine = fp.get_num_threads()
        t = threading.Thread(target=lambda: seen.setdefault("other", fp.get_num_threads()))
        t.start()
        t.join()
    finally:
        fp.set_num_threads(before)
    assert mine != seen["default"] and seen["other"] == seen["default"]


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_gemm_asked_for_more_than_256_threads_uses_256():
    """A GEMM planned for more than 256 threads ran on one (its grid search allows
    256); it is capped at 256 instead.  In a subprocess: it starts 256 threads."""
    if not fp.backends.load("native").config()["openmp"]:
        pytest.skip("built without OpenMP")
    import subprocess
    code = """if True:
        import numpy as np, fastprop as fp
        native = fp.backends.load("native")._native
        native.set_backoff(False)
        fp.set_num_threads(300)
        def threads():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("Threads:"))
        a = np.ones((512, 512), np.float32)
        before = threads()
        with fp.use_backend("native"):
            c = fp.ops.matmul(a, a)
        print("RESULT", threads() - before, bool((c == 512).all()))
    """
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    started, right = out.split("RESULT")[-1].split()
    assert int(started) == 255 and right == "True"


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastprop._native is not built")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.skipif("ASAN_OPTIONS" in os.environ,  # (tools/sanitize.sh sets it)
                    reason="ASan's quarantine keeps freed memory resident")
def test_large_matrix_vector_scratch_is_not_kept():
    """A one-column GEMM with accumulate (C read into per-thread scratch) of 2^24 rows
    kept 64 MiB for the life of the thread, and a 16-row larger one mapped twice
    that; scratch above 16 MiB is now given back after the call.  Also: a layer
    with no outputs writes a zero input gradient on both backends."""
    native = fp.backends.load("native")._native
    a = np.ones((2**24, 2), np.float32)
    b = np.ones((2, 1), np.float32)
    gc.collect()
    start = _rss()
    for m in (2**24, 2**24 - 16):
        c = np.ones((m, 1), np.float32)
        native.gemm(a[:m], b, c, False, False, True)
        assert c[0, 0] == 3.0 and c[-1, 0] == 3.0
        del c
    gc.collect()
    assert _rss() - start < 8 * 2**20
    x = np.ones((3, 4), np.float32)
    for be in (native, fp.backends.load("numpy")):
        gx = np.full((3, 4), 7, np.float32)
        be.linear_backward(np.ones((3, 0), np.float32), x, np.ones((4, 0), np.float32), None,
                           None, 0, 0.0, gx, np.empty((4, 0), np.float32),
                           np.empty(0, np.float32), None, False)
        np.testing.assert_array_equal(gx, 0.0)


def _step_in_child(step, x, y, conn):
    try:
        conn.send(("ok", float(step(x, y))))
    except Exception as exc:  # (reported to the parent)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_step_guard_in_a_fork_child_and_from_inside_itself(backend):
    """A child forked while another thread ran a step (its lock held) can train: the
    thread does not exist there and the lock is free; a call from inside the step
    itself is refused with a message saying so (not "another thread")."""
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Dense(4, 8, "relu", rng=0), nn.Dense(8, 3, rng=1))
    step = model.compile("cross_entropy", optim.SGD(model.parameters(), 0.1))
    x, y = rng.standard_normal((16, 4)), rng.integers(0, 3, 16)
    step._busy.acquire()  # (as a thread inside the step at fork time)
    try:
        status, value = in_fork_child(_step_in_child, step, x, y)
    finally:
        step._busy.release()
    assert status == "ok" and np.isfinite(value), value

    class Reentrant(fp.losses.SoftmaxCrossEntropy):
        def forward(self, pred, target):
            return inner(x, y)

    outer = nn.Sequential(nn.Dense(4, 3, rng=2)).compile(Reentrant(), "sgd")
    inner = outer
    with pytest.raises(RuntimeError, match="called from inside itself"):
        outer(x, y)
    with pytest.raises(RuntimeError, match="called from inside itself"):
        outer(x, y)  # (again: the lock was released after the first error)


def _config_in_child(conn):
    fp.set_num_threads(2)  # (kept, not used: the child runs serially)
    conn.send((fp.get_num_threads(), fp._config.config()["native.num_threads"]))


@pytest.mark.skipif(not hasattr(os, "fork") or not NATIVE_BUILT, reason="needs fork()")
def test_show_config_says_a_fork_child_runs_serially():
    """In a child forked after the OpenMP pool started, every kernel runs serially
    and set_num_threads is not used: show_config says why (it said 1, no reason)."""
    native = fp.backends.load("native")._native
    if not native.openmp():
        pytest.skip("built without OpenMP")
    before, was = fp.get_num_threads(), native.backoff()
    fp.set_num_threads(2)
    try:
        native.set_backoff(False)
        a = np.ones((256, 256), np.float32)
        fp.ops.matmul(a, a)  # (starts the pool)
        assert native.threads_usable()
        assert fp._config.config()["native.num_threads"] == 2
        count, shown = in_fork_child(_config_in_child)
    finally:
        native.set_backoff(was)
        fp.set_num_threads(before)
    assert count == 1 and shown.startswith("1 (serial: a fork child"), shown


class _BusyKernel:
    """A whole-step kernel as a parent's thread leaves it at fork time: inside a call,
    its own busy flag set, so every call is refused until ``_after_fork`` clears it."""

    def __init__(self, real):
        self._real = real
        self.busy = True

    def __call__(self, *args, **kwargs):
        if self.busy:
            raise RuntimeError("this compiled step is already running in another thread")
        return self._real(*args, **kwargs)

    def _after_fork(self):
        self.busy = False
        self._real._after_fork()

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_fork_child_clears_the_kernels_busy_flag():
    """The native kernel object has a busy flag of its own, copied set into a child
    forked while a thread of the parent ran the step: the child could never train
    with that step (nor fit with the compiled loss and optimizer).  The child clears
    it (keeping the kernel: a device kernel holds the newest values) and trains on
    from the parent's state: its loss is the parent's next one."""
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Dense(4, 8, "relu", rng=0), nn.Dense(8, 3, rng=1))
    step = model.compile("cross_entropy", optim.SGD(model.parameters(), 0.1))
    x, y = rng.standard_normal((16, 4)), rng.integers(0, 3, 16)
    with fp.use_backend("native"):
        step(x, y)
    if step._fast is None:
        pytest.skip("the native backend has no whole-step kernel here")
    assert callable(getattr(step._fast, "_after_fork", None))
    real = step._fast
    step._fast = _BusyKernel(real)
    with fp.use_backend("native"):
        status, value = in_fork_child(_step_in_child, step, x, y)
        step._fast = real
        expected = step(x, y)
    assert status == "ok" and value == expected, (status, value, expected)


class _SetThenInterrupt:
    """A context variable whose set(value) is interrupted just after it took effect
    (a KeyboardInterrupt from a signal handler, which Python runs right after a C
    call returns)."""

    def __init__(self, var, value):
        self.var, self.value, self.armed = var, value, True

    def get(self):
        return self.var.get()

    def set(self, value):
        token = self.var.set(value)
        if self.armed and value is self.value:
            self.armed = False
            raise KeyboardInterrupt
        return token


def test_an_interrupt_entering_inference_mode_or_use_backend_restores_the_mode(monkeypatch):
    """A Ctrl-C landing just after inference_mode (predict, evaluate, fit's validation)
    set its flag left the thread in inference mode for good: every later training
    step failed with "backward called before forward".  use_backend likewise left
    the thread on the other backend."""
    from fastprop import backends
    monkeypatch.setattr(nn, "_inference", _SetThenInterrupt(nn._inference, True))
    with pytest.raises(KeyboardInterrupt):
        with nn.inference_mode():
            pass
    monkeypatch.undo()
    assert nn._inference.get() is False
    model = nn.Sequential(nn.Dense(4, 3, rng=0), nn.Dropout(0.2))  # (the layer path)
    model.fit(np.ones((8, 4)), np.arange(8) % 3, loss="cross_entropy", optimizer="sgd",
              verbose=0)
    before = fp.get_backend()
    other = "numpy" if before != "numpy" else "native"
    monkeypatch.setattr(backends, "_backend_var",
                        _SetThenInterrupt(backends._backend_var, backends.load(other)))
    with pytest.raises(KeyboardInterrupt):
        with fp.use_backend(other):
            pass
    monkeypatch.undo()
    assert fp.get_backend() == before


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
# (an interrupt between open() returning and the with statement taking the file: the
# file object is closed when it is dropped, with a ResourceWarning)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_interrupted_saves_leave_no_temporary_files(tmp_path):
    """A signal handler raising during fp.save (Ctrl-C, a timer) at any point: the
    target stays whole, and no temporary file is left behind (one between making the
    temporary file and entering the try that removes it left it).  (A descriptor
    may still leak when the handler runs just as os.open returns: Python raises
    there before the descriptor reaches a variable.)"""
    model = nn.Sequential(nn.Dense(10, 16, "relu", rng=0), nn.Dense(16, 3, rng=1))
    path = tmp_path / "model.fp"
    fp.save(model, path)

    def interrupt(*args):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    gen = np.random.default_rng(0)
    try:
        for _ in range(300):
            try:
                signal.setitimer(signal.ITIMER_REAL, gen.uniform(1e-5, 1e-3))
                for _ in range(100):  # (bounded: an interrupt that lands in a finalizer
                    fp.save(model, path)  # is printed and swallowed by Python)
            except KeyboardInterrupt:
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fp"]
    fp.load(path)


def test_aliases_keep_their_state_names_and_batch_counts_roll_back(backend, rng, tmp_path):
    """A module held twice by a user's module (an alias) is listed at both places, as
    state names and saved files always counted it (a file saved before keeps its
    arrays' places: b's weights stay b's); a BatchNorm1d whose momentum is set to None
    after construction has its batch count from then on, so a refused step rolls the
    count back with the running statistics."""
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Dense(3, 3, rng=0)
            self.alias = self.a
            self.b = nn.Dense(3, 2, rng=1)

        def forward(self, x):
            return self.b(self.a(x))

    m = Aliased()
    m.b.weight.value = np.full((3, 2), 2.0)
    assert list(m.state_dict()) == ["1.weight", "1.bias", "2.weight", "2.bias", "3.weight",
                                    "3.bias"]
    assert len(m.parameters()) == 4
    fp.save(m, tmp_path / "a.fp")
    loaded = fp.load(tmp_path / "a.fp")
    np.testing.assert_array_equal(loaded.b.weight.value, 2.0)
    assert loaded.a.weight is not loaded.b.weight and loaded.alias is loaded.a
    bn_model = nn.Sequential(nn.Dense(3, 4, rng=0), nn.BatchNorm1d(4), nn.Dense(4, 2, rng=1))
    bn = bn_model[1]
    bn.momentum = None
    assert int(bn.num_batches_tracked) == 0
    step = bn_model.compile("cross_entropy", optim.SGD(bn_model.parameters(), 0.1))
    x = rng.standard_normal((8, 3))
    with pytest.raises(ValueError):
        step(x, np.full(8, 5))  # (class 5 of 2: refused after the forward)
    assert int(bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    want = bn_model[0](x).mean(axis=0)  # (the first batch weighs 1: its mean)
    step(x, np.zeros(8, int))
    assert int(bn.num_batches_tracked) == 1
    np.testing.assert_allclose(bn.running_mean, want, rtol=1e-5, atol=1e-6)


def test_inference_mode_as_a_decorator_per_call_and_thread():
    """inference_mode works as a decorator (as the generator form did), each call with
    its own state: two threads in one decorated function restore their own modes."""
    import threading
    seen = []
    barrier = threading.Barrier(2)

    @nn.inference_mode()
    def inside():
        seen.append(nn._inference.get())
        barrier.wait(timeout=10)
        return nn._inference.get()

    results = []
    threads = [threading.Thread(target=lambda: results.append(inside())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [True, True] and results == [True, True]
    assert nn._inference.get() is False
    with nn.inference_mode():
        with nn.inference_mode():
            assert nn._inference.get() is True
        assert nn._inference.get() is True
    assert nn._inference.get() is False


def test_one_shared_inference_mode_object_keeps_per_task_state():
    """A module-level `no_grad = nn.inference_mode()` entered by two asyncio tasks whose
    blocks interleave: each restores its own state (the object kept one stack, so a
    task left its block still in inference mode and the other lost it)."""
    import asyncio
    shared = nn.inference_mode()
    seen = {}

    async def a(step):
        with shared:
            await step.wait()
        seen["a"] = nn._inference.get()

    async def b(step):
        with nn.inference_mode():
            with shared:
                step.set()
                await asyncio.sleep(0)
            await asyncio.sleep(0)
            seen["b"] = nn._inference.get()

    async def main():
        step = asyncio.Event()
        await asyncio.gather(a(step), b(step))

    asyncio.run(main())
    assert seen == {"a": False, "b": True}
    assert nn._inference.get() is False


@pytest.mark.parametrize("var", ["_inference", "_inference_saved"])
def test_an_interrupt_leaving_a_nested_inference_mode_restores_the_mode(monkeypatch, var):
    """A Ctrl-C landing between inference_mode.__exit__'s two writes of an inner block
    (predict inside the user's block) left the outer block restoring the inner one's
    saved True: the thread stayed in inference mode for good."""

    class Interrupting:
        def __init__(self, real):
            self.real, self.armed = real, False

        def get(self):
            return self.real.get()

        def set(self, value):
            token = self.real.set(value)
            if self.armed:
                self.armed = False
                raise KeyboardInterrupt
            return token

    wrapped = Interrupting(getattr(nn, var))
    monkeypatch.setattr(nn, var, wrapped)
    with pytest.raises(KeyboardInterrupt):
        with nn.inference_mode():
            with nn.inference_mode():
                wrapped.armed = True  # (lands in the inner block's exit)
    monkeypatch.undo()
    assert nn._inference.get() is False and nn._inference_saved.get() == ()


def test_inference_mode_refuses_to_decorate_generators_and_coroutines():
    """As a decorator it would wrap the making of a generator or coroutine, not its
    body (which ran outside the mode, silently): refused, naming the function."""
    def gen():
        yield nn._inference.get()

    async def coro():
        return nn._inference.get()

    for f in (gen, coro):
        with pytest.raises(TypeError, match="cannot decorate the generator or coroutine"):
            nn.inference_mode()(f)

    @nn.inference_mode()
    def plain():
        return nn._inference.get()

    assert plain() is True and nn._inference.get() is False
