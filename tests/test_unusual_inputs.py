"""Unusual but legal inputs give the result of their plain equivalents; illegal ones a
clear TypeError/ValueError, with nothing changed (found by a review of every entry
point with such inputs)."""

import re

import numpy as np
import pytest

import fastprop as fp


def _snapshot(model, opt=None):
    arrays = [a.copy() for p in model.parameters() for a in (p.value, p.grad)]
    if opt is not None:
        arrays += [v.copy() for st in opt.state for v in st.values()
                   if isinstance(v, np.ndarray)]
    return arrays


def _same(before, after):
    return len(before) == len(after) and all(np.array_equal(a, b, equal_nan=True)
                                             for a, b in zip(before, after))


@pytest.mark.parametrize("layout", ["fortran", "transposed-view"])
def test_gradcheck_any_memory_order(backend, rng, layout):
    """gradcheck perturbs the input itself: a Fortran-ordered input (or a transposed
    view) passes as its C-ordered copy does (it used to perturb a flat copy and report
    a zero numeric gradient)."""
    base = rng.standard_normal((4, 5))
    x = np.asfortranarray(base) if layout == "fortran" else base.T.copy().T
    assert not x.flags.c_contiguous
    layer = fp.nn.Dense(5, 3, "tanh", rng=0, dtype=np.float64)
    assert fp.gradcheck(layer, x)
    assert fp.gradcheck(fp.losses.MSE(), (x, rng.standard_normal((4, 5))))
    assert fp.gradcheck(lambda a: (float(np.sum(a ** 3)), [3 * a ** 2]), (x,))
    # a nested list is the module's input array, a tuple holds the inputs
    assert fp.gradcheck(layer, base.tolist()) and fp.gradcheck(layer, (base,))
    broken = fp.nn.Dense(5, 3, rng=0, dtype=np.float64)
    broken.backward = lambda g, input_grad=True: np.zeros((4, 5))
    assert not fp.gradcheck(broken, x, raise_exception=False)


@pytest.mark.parametrize("path", ["fused", "layers"])
def test_step_refuses_x_beyond_float32_range(backend, rng, path):
    """A float64 x whose values are finite but beyond float32's range becomes inf in a
    float32 model: every step refuses it (ValueError) before anything changes (the
    layer path checked x before the cast, and trained on inf); fit says why."""
    x = rng.standard_normal((8, 4))
    x[2, 1] = 1e39
    y = rng.integers(0, 3, 8)
    layers = [fp.nn.Dense(4, 5, "relu", rng=1), fp.nn.Dense(5, 3, rng=2)]
    if path == "layers":
        layers.insert(1, fp.nn.LayerNorm(5))
    model = fp.nn.Sequential(*layers)
    opt = fp.optim.Adam(model.parameters(), lr=0.1)
    step = model.compile("cross_entropy", opt)
    step(x[:2], y[:2])  # (state to protect)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="x"):
        step(x, y)
    assert _same(before, _snapshot(model, opt))
    with pytest.raises(ValueError, match=r"X has values beyond the range of float32 \(the "
                                         r"model's dtype\): largest magnitude 1e\+39"):
        model.fit(x, y, verbose=0)
    assert _same(before, _snapshot(model, opt))


def test_parameter_keeps_a_byte_swapped_float64():
    """A big-endian float64 value stays float64 (native byte order), without rounding;
    wider floats become float64, narrower ones float32."""
    v = np.array([1 + 2 ** -40, -3.0], dtype=">f8")
    p = fp.Parameter(v)
    assert p.dtype == np.float64 and p.value.dtype.isnative
    assert p.value[0] == 1 + 2 ** -40
    assert fp.Parameter(np.ones(2, ">f4")).dtype == np.float32
    assert fp.Parameter(np.ones(2, np.float16)).dtype == np.float32
    assert fp.Parameter(np.ones(2, np.longdouble)).dtype == np.float64


@pytest.mark.parametrize("case", ["x-is-weight-grad", "grad-out-is-weight-grad"])
def test_dense_backward_reads_aliased_inputs_safely(backend, rng, case):
    """An input (x or grad_out) that is one of the gradient arrays backward adds to
    gives the gradients computed from its value before the call."""
    n = 33
    layer = fp.nn.Dense(n, n, dtype=np.float64, rng=0)
    layer.weight.grad[...] = rng.standard_normal((n, n))
    layer.bias.grad[...] = rng.standard_normal(n)
    gw0, gb0 = layer.weight.grad.copy(), layer.bias.grad.copy()
    x, g = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    if case == "x-is-weight-grad":
        x = layer.weight.grad
    x_val = x.copy()
    layer.forward(x)
    if case == "grad-out-is-weight-grad":
        g = layer.weight.grad
    g_val = g.copy()
    gx = layer.backward(g)
    np.testing.assert_allclose(layer.weight.grad, gw0 + x_val.T @ g_val, rtol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, gb0 + g_val.sum(0), rtol=1e-12)
    np.testing.assert_allclose(gx, g_val @ layer.weight.value.T, rtol=1e-12)


def test_matmul_out_with_odd_row_stride(backend):
    """An out whose rows are not a whole number of items apart (a field of a packed
    structured array) is written through a temporary, as any other unusual out."""
    rec = np.zeros(6, dtype=[("a", "f4", (3,)), ("b", "i1")])
    out = rec["a"]
    assert out.strides == (13, 4)
    a = np.arange(18, dtype=np.float32).reshape(6, 3)
    b = np.arange(9, dtype=np.float32).reshape(3, 3)
    fp.ops.matmul(a, b, out=out)
    np.testing.assert_array_equal(rec["a"], a @ b)
    fp.ops.matmul(a, b, out=out, accumulate=True)
    np.testing.assert_array_equal(rec["a"], 2 * (a @ b))


@pytest.mark.parametrize("X", [np.float32(1.0), np.zeros(4), np.zeros(0), [],
                               np.zeros((2, 4, 2)), np.zeros((0, 4, 2))],
                         ids=["0-d", "1-d", "1-d-empty", "list-empty", "3-d", "3-d-empty"])
def test_predict_needs_2d(backend, X):
    """predict takes (samples, features), empty or not; anything else is refused
    naming X and its shape (0-d gave an IndexError, an empty 1-d array a silent (0,))."""
    model = fp.nn.Sequential(fp.nn.Dense(4, 3, rng=0))
    with pytest.raises(ValueError, match=r"X must be 2-D \(samples, features\), got shape"):
        model.predict(X)
    assert model.predict(np.zeros((0, 4))).shape == (0, 3)


@pytest.mark.parametrize("y", [np.array([0, 1, 1e20, 2, 0.0]),
                               np.array([0, 1, 2 ** 64 - 1, 2, 0], np.uint64),
                               np.array([0, 1, -1e30, 2, 0.0])])
def test_label_range_error_shows_the_given_values(backend, y):
    """Class ids beyond int64 are refused with the values given (they were converted
    first, with a cast warning, and reported as -9223372036854775808)."""
    model = fp.nn.Sequential(fp.nn.Dense(4, 3, rng=0))
    step = model.compile("cross_entropy", fp.optim.SGD(model.parameters(), lr=0.1))
    before = _snapshot(model)
    shown = re.escape(f"{y.min()}, {y.max()}")
    for call in (lambda: step(np.ones((5, 4)), y),
                 lambda: fp.ops.softmax_cross_entropy(np.ones((5, 3)), y)):
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, 3\) for 3 classes, "
                                             rf"got values in \[{shown}\]"):
            call()
    assert _same(before, _snapshot(model))


def test_yes_no_options_refuse_strings(backend):
    """Flags take bools (or 0/1); a string such as "False", which bool() reads as True,
    is refused naming the option."""
    a = np.ones((2, 3), np.float32)
    cases = [
        ("trans_a", lambda: fp.ops.matmul(a, a, trans_a="False")),
        ("trans_b", lambda: fp.ops.matmul(a, a.T, out=np.empty((2, 2), np.float32),
                                          trans_b="no")),
        ("accumulate", lambda: fp.ops.matmul(a, a.T, out=np.empty((2, 2), np.float32),
                                             accumulate="False")),
        ("return_preact", lambda: fp.ops.linear(a, a.T, return_preact="yes")),
        ("half", lambda: fp.losses.MSE(half="no")),
        ("from_logits", lambda: fp.losses.BinaryCrossEntropy(from_logits="False")),
        ("nesterov", lambda: fp.optim.SGD([fp.Parameter(a)], lr=0.1, momentum=0.9,
                                          nesterov="True")),
        ("amsgrad", lambda: fp.optim.Adam([fp.Parameter(a)], amsgrad="False")),
        ("mode", lambda: fp.nn.Dense(3, 2).train("False")),
    ]
    for name, call in cases:
        with pytest.raises(TypeError, match=rf"{name} must be a bool, got str"):
            call()
    assert fp.losses.MSE(half=np.True_).half is True
    assert fp.losses.MSE(half=1).half is True and fp.losses.MSE(half=0).half is False
    np.testing.assert_array_equal(fp.ops.matmul(a, a, trans_a=True), a.T @ a)


def test_class_ids_as_a_column(backend, rng):
    """(n, 1) class ids (Keras' sparse labels) are the (n,) ids for more than one class."""
    logits = rng.standard_normal((6, 4))
    y = rng.integers(0, 4, 6)
    loss = fp.losses.SoftmaxCrossEntropy()
    assert loss(logits, y[:, None]) == loss(logits, y)
    model = fp.nn.Sequential(fp.nn.Dense(5, 4, rng=0))
    X = rng.standard_normal((6, 5))
    h1 = model.fit(X, y[:, None], loss="cross_entropy", optimizer="sgd", epochs=2,
                   verbose=0, shuffle=False)
    model2 = fp.nn.Sequential(fp.nn.Dense(5, 4, rng=0))
    h2 = model2.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=2, verbose=0,
                    shuffle=False)
    assert h1.history["loss"] == h2.history["loss"]


# ---- data as users have it: pandas, scipy.sparse, torch, float16 labels, big values
def _clf_model():
    return fp.nn.Sequential(fp.nn.Dense(3, 8, "relu", rng=0), fp.nn.Dense(8, 3, rng=1))


def _clf_data(n=40):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3)).astype(np.float32), np.arange(n) % 3


def test_pandas_nullable_and_mixed_columns_train_as_their_numbers():
    """pandas' nullable Int64/Float64 columns, or bool mixed with float, make object
    arrays: they were refused as "dtype object"; they train as the numbers they hold
    (bit-identical), and a pd.NA is refused as a NaN is."""
    pd = pytest.importorskip("pandas")
    X, y = _clf_data()
    frame = pd.DataFrame({"a": pd.array(np.round(X[:, 0] * 4), dtype="Int64"),
                          "b": pd.array(X[:, 1], dtype="Float64"),
                          "c": X[:, 2] > 0})
    plain = np.column_stack([np.round(X[:, 0] * 4), X[:, 1], X[:, 2] > 0]).astype(np.float32)
    runs = []
    for data in (frame, plain):
        model = _clf_model()
        model.fit(data, pd.Series(pd.array(y, dtype="Int64")) if data is frame else y,
                  loss="cross_entropy", optimizer="adam", epochs=2, seed=0, verbose=0)
        runs.append((model.predict(data), model.evaluate(data, y)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    frame.loc[3, "a"] = pd.NA
    with pytest.raises(ValueError, match="X contains 1 NaN"):
        _clf_model().fit(frame, y, loss="cross_entropy", optimizer="adam", verbose=0)


def test_sparse_and_grad_tracking_inputs_are_named_type_errors():
    sparse = pytest.importorskip("scipy.sparse")
    X, y = _clf_data()
    model = _clf_model()
    for call in (lambda: model.predict(sparse.csr_matrix(X)),
                 lambda: model.fit(sparse.csc_array(X), y, loss="cross_entropy",
                                   optimizer="sgd", verbose=0),
                 lambda: model(sparse.coo_matrix(X))):
        with pytest.raises(TypeError, match=r"X is a scipy.sparse matrix; .* pass "
                                            r"X.toarray\(\)|x is a scipy.sparse matrix"):
            call()
    torch = pytest.importorskip("torch")
    t = torch.tensor(X).requires_grad_()
    with pytest.raises(TypeError, match="X must be array-like of numbers: .*requires grad"):
        model.predict(t)
    np.testing.assert_array_equal(model.predict(t.detach()), model.predict(X))


def test_fit_names_the_target_argument_and_values_beyond_float32():
    """fit's y and validation_data[1] errors name the argument (the loss says
    "labels" or "target" for both); a finite float64 target beyond float32's range
    is said to be so, not "NaN or infinite", with no overflow warning; so is a batch
    of such x in a compiled step that runs its kernel."""
    X, y = _clf_data()
    model = _clf_model()
    fit = dict(loss="cross_entropy", optimizer="sgd", verbose=0)
    with pytest.raises(ValueError, match=r"^y: labels must lie in \[0, 3\)"):
        model.fit(X, y + 3, **fit)
    with pytest.raises(ValueError, match=r"^validation_data\[1\]: labels must lie in \[0, 3\)"):
        model.fit(X, y, validation_data=(X, y + 3), **fit)
    with pytest.raises(ValueError, match=r"^y: target has values beyond the range of float32 "
                                         r"\(the prediction's dtype\): largest magnitude 1e\+39"):
        model.fit(X, np.full((40, 3), 1e39), loss="mse", optimizer="sgd", verbose=0)
    step = model.compile("cross_entropy", "sgd")
    with pytest.raises(ValueError, match=r"x has values beyond the range of float32"):
        step(np.full((4, 3), 1e39), y[:4])
    # float16 class ids: no RuntimeWarning from comparing with 2 ** 63 in float16
    model.fit(X, y.astype(np.float16), **fit)
    fp.ops.softmax_cross_entropy(model(X), y.astype(np.float16))


def test_sklearn_regressor_targets_strings_and_beyond_float32():
    pytest.importorskip("sklearn")
    from fastprop.sklearn import MLPRegressor
    X, _ = _clf_data()
    with pytest.raises(ValueError, match="y must hold numbers for regression, got dtype <U1"):
        MLPRegressor(max_iter=2).fit(X, np.array(list("abcd") * 10))
    with pytest.raises(ValueError, match=r"Input y contains a value too large for "
                                         r"dtype\('float32'\), the network's dtype"):
        MLPRegressor(max_iter=2).fit(X, np.full(40, 1e39))


def test_pandas_columns_that_are_not_numbers_are_refused():
    """Only numeric and bool pandas columns train as numbers: a datetime column mixed
    with floats trained on raw nanosecond counts, and numeric strings were parsed,
    where the same data as a NumPy array is refused."""
    pd = pytest.importorskip("pandas")
    X, y = _clf_data(4)
    for frame in (pd.DataFrame({"a": X[:, 0], "b": pd.date_range("2020", periods=4),
                                "c": X[:, 2]}),
                  pd.DataFrame({"a": X[:, 0], "b": ["1.5", "2", " 3 ", "4"], "c": X[:, 2]}),
                  pd.Series(["1.5", "2", "3", "4"], dtype="string")):
        with pytest.raises(TypeError, match="X must hold real numbers"):
            _clf_model().predict(frame)


def _unaligned(shape, dtype=np.float32, fill=1.0):
    """An array at an odd byte offset (NumPy marks it not aligned), filled."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    raw = np.zeros(size * dtype.itemsize + 1, np.uint8)
    arr = raw[1:].view(dtype).reshape(shape)
    arr[...] = fill
    assert not arr.flags.aligned
    return arr


def test_unaligned_arrays_reach_no_native_kernel(monkeypatch):
    """A view at an odd byte offset is copied before any native kernel loads whole
    floats from it (undefined behaviour in C++, which UBSan reports): through the
    layers, the losses' targets, an activation's out, the compiled step and fit, and
    the scikit-learn estimators' predict.  The results are those of aligned copies."""
    native = pytest.importorskip("fastprop.backends.native")
    from fastprop import train
    got = []

    def check(name, args):
        for a in args:
            if isinstance(a, np.ndarray) and not a.flags.aligned:
                got.append((name, a.shape))

    for name in dir(native):
        kernel = getattr(native, name)
        if name.startswith("_") or not callable(kernel) or name in (
                "make_train_step", "matmul_fast", "set_num_threads", "get_num_threads"):
            continue  # (matmul_fast takes an unaligned buffer as a refusal: None)

        def checked(*args, _k=kernel, _n=name, **kw):
            check(_n, args)
            return _k(*args, **kw)
        monkeypatch.setattr(native, name, checked)

    class Checked:  # the compiled step's native kernel
        def __init__(self, f):
            object.__setattr__(self, "_f", f)

        def __getattr__(self, k):
            return getattr(self._f, k)

        def __setattr__(self, k, v):
            setattr(self._f, k, v)

        def __call__(self, x, y, *rest):
            check("train step", (x,) + (y if isinstance(y, tuple) else (y,)))
            return self._f(x, y, *rest)

    fused = train.TrainStep.fused
    monkeypatch.setattr(train.TrainStep, "fused",
                        lambda self: None if fused(self) is None else Checked(fused(self)))
    with fp.use_backend("native"):
        x = _unaligned((8, 3), fill=0.5)
        for layer in (fp.nn.Dense(3, 5), fp.nn.LayerNorm(3), fp.nn.BatchNorm1d(3)):
            y = layer(x)
            np.testing.assert_array_equal(y, layer(x.copy()))
            layer.backward(np.ones_like(y))
        ones = np.ones((8, 5), np.float32)
        out = _unaligned((8, 5))
        assert fp.ops.activation("tanh", ones, out=out) is out
        np.testing.assert_array_equal(out, fp.ops.activation("tanh", ones))
        fp.losses.MSE()(ones, _unaligned((8, 5), fill=0.25))
        fp.ops.softmax_cross_entropy(ones, _unaligned((8,), np.int64, fill=np.arange(8) % 5))
        m = fp.nn.Sequential(fp.nn.Dense(3, 4), fp.nn.Dense(4, 2))
        step = m.compile(fp.losses.MSE(), fp.optim.SGD(m.parameters(), lr=0.01))
        step(_unaligned((8, 3)), _unaligned((8, 2)))
        m.fit(_unaligned((64, 3)), _unaligned((64, 2)), loss=fp.losses.MSE(),
              optimizer=fp.optim.SGD(m.parameters(), lr=0.01), shuffle=False, batch_size=16,
              verbose=0)
        pytest.importorskip("sklearn")
        from fastprop.sklearn import MLPRegressor
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = MLPRegressor(hidden_layer_sizes=(4,), max_iter=2).fit(np.ones((20, 3)),
                                                                     np.ones(20))
        xu = _unaligned((20, 3), np.float64)
        np.testing.assert_array_equal(r.predict(xu), r.predict(xu.copy()))
    assert got == []
