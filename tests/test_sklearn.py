"""fastprop.sklearn: drop-in MLPClassifier / MLPRegressor.

* scikit-learn's own estimator checks for both estimators (every solver);
* parity with sklearn.neural_network on digits, breast cancer, iris, diabetes and
  make_regression for adam, sgd and lbfgs (test scores within 0.01 / 0.02), and the
  same trajectory (same weights after a few epochs) for every code path: solvers,
  learning-rate schedules, momentum, activations, sample weights, sparse input,
  float32, multilabel, multi-output, Poisson, partial_fit, warm_start, early stopping;
* Pipeline, GridSearchCV, clone, pickle and joblib round-trips;
* ``import fastprop`` does not import scikit-learn.
"""

import io
import pickle
import subprocess
import sys
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn", minversion="1.6")  # validate_data, __sklearn_tags__
pytest.importorskip("scipy")

import joblib  # noqa: E402  (a scikit-learn dependency)
import scipy.sparse as sp  # noqa: E402
import sklearn.neural_network as skn  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import (load_breast_cancer, load_diabetes, load_digits,  # noqa: E402
                              load_iris, make_multilabel_classification, make_regression)
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import MinMaxScaler, StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import fastprop  # noqa: E402
from fastprop.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

import re  # noqa: E402
import sklearn  # noqa: E402

#: scikit-learn's MLPs take sample_weight and MLPRegressor(loss=) from 1.7 (fastprop's
#: estimators have them on any version; on 1.6 there is nothing to compare them with)
SKLEARN_1_7 = tuple(map(int, re.match(r"(\d+)\.(\d+)", sklearn.__version__).groups())) >= (1, 7)
needs_sklearn_1_7 = pytest.mark.skipif(
    not SKLEARN_1_7, reason="scikit-learn's MLPs take sample_weight and loss= from 1.7")

# scikit-learn warns (ConvergenceWarning) whenever max_iter stops an MLP before tol
# does; the short runs below are chosen to be fast, so sklearn's own estimators warn
# on them exactly as ours do.  pytest runs with filterwarnings=error.
no_convergence_warning = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning")



def _available_backends():
    names = ["numpy"]
    try:
        fastprop.backends.load("native")
        names.append("native")
    except Exception:  # not built, or (editable install) a rebuild that failed
        pass
    return names


BACKENDS = _available_backends()
# the directory holding the fastprop package, for subprocesses
PACKAGE_ROOT = str(Path(fastprop.__file__).resolve().parents[1])


def _subprocess_env():
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, env.get("PYTHONPATH", "")])
    return env


def _split_scaled(X, y, scaler=StandardScaler):
    X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0)
    scale = scaler().fit(X_train)
    return scale.transform(X_train), scale.transform(X_test), y_train, y_test


def _datasets():
    X, y = load_digits(return_X_y=True)
    digits = _split_scaled(X, y, MinMaxScaler)
    cancer = _split_scaled(*load_breast_cancer(return_X_y=True))
    iris = _split_scaled(*load_iris(return_X_y=True))
    X, y = load_diabetes(return_X_y=True)
    diabetes = _split_scaled(X, (y - y.mean()) / y.std())
    X, y = make_regression(n_samples=400, n_features=20, n_informative=10, noise=5.0,
                           random_state=0)
    synthetic = _split_scaled(X, y / y.std())
    return {"digits": digits, "breast_cancer": cancer, "iris": iris,
            "diabetes": diabetes, "make_regression": synthetic}


DATA = _datasets()


def _pair(name, **params):
    """(sklearn's estimator, ours) with the same parameters."""
    sk_cls, fp_cls = {"MLPClassifier": (skn.MLPClassifier, MLPClassifier),
                      "MLPRegressor": (skn.MLPRegressor, MLPRegressor)}[name]
    return sk_cls(**params), fp_cls(**params)


def _assert_same_model(sk, ours, rtol=1e-6, atol=1e-8):
    """Same weights (up to rounding), same fitted bookkeeping."""
    assert len(sk.coefs_) == len(ours.coefs_)
    for a, b in zip(sk.coefs_ + sk.intercepts_, ours.coefs_ + ours.intercepts_):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)
    for attr in ("n_iter_", "t_", "n_layers_", "n_outputs_", "out_activation_",
                 "n_features_in_"):
        if hasattr(sk, attr):
            assert getattr(ours, attr) == getattr(sk, attr), attr
    if hasattr(sk, "loss_curve_"):
        np.testing.assert_allclose(ours.loss_curve_, sk.loss_curve_, rtol=1e-6)
    np.testing.assert_allclose(ours.loss_, sk.loss_, rtol=1e-6)


# --------------------------------------------------------------------------- checks
# Every solver of both estimators, with max_iter=100 as scikit-learn's own test suite
# sets for its MLPs (sklearn/utils/_test_common/instance_generator.py).  No check is
# skipped or expected to fail; the ones reported as skipped skip themselves (pandas
# not installed, SCIPY_ARRAY_API not set, no decision_function).
def _listed(mark):
    """``parametrize_with_checks``'s marker with its cases in a list: scikit-learn 1.6-1.7
    give pytest a generator, which pytest >= 9.1 deprecates (an error under this
    suite's filterwarnings, which stopped the whole collection on Python 3.10)."""
    names, values = mark.args[0], list(mark.args[1])
    return pytest.mark.parametrize(names, values, **mark.kwargs)


@no_convergence_warning  # max_iter=100 stops before tol, as for sklearn's own MLPs
@_listed(parametrize_with_checks([cls(solver=solver, max_iter=100)
                                  for cls in (MLPClassifier, MLPRegressor)
                                  for solver in ("adam", "sgd", "lbfgs")]).mark)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@needs_sklearn_1_7
@no_convergence_warning
def test_sample_weight_equivalence_with_sklearns_parameters():
    """scikit-learn runs this check on MLPRegressor with these parameters
    (PER_ESTIMATOR_CHECK_PARAMS); the generic instances above cover the rest."""
    from sklearn.utils.estimator_checks import (check_sample_weight_equivalence_on_dense_data,
                                                check_sample_weight_equivalence_on_sparse_data)
    est = MLPRegressor(solver="sgd", tol=1e-2, random_state=42, max_iter=100)
    check_sample_weight_equivalence_on_dense_data("MLPRegressor", est)
    check_sample_weight_equivalence_on_sparse_data("MLPRegressor", est)


@pytest.mark.parametrize("name", ["MLPClassifier", "MLPRegressor"])
def test_same_constructor_as_sklearn(name):
    """Same parameter names, order, kinds (positional / keyword-only) and defaults."""
    import inspect
    sk, ours = _pair(name)
    mine, params = inspect.signature(type(ours)), ours.get_params()
    if not SKLEARN_1_7 and name == "MLPRegressor":  # (loss= came with 1.7)
        mine = mine.replace(parameters=[q for q in mine.parameters.values()
                                        if q.name != "loss"])
        params.pop("loss")
    assert mine == inspect.signature(type(sk))
    assert params == sk.get_params()


def test_import_fastprop_does_not_import_sklearn():
    code = "import sys, fastprop; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=_subprocess_env())


# --------------------------------------------------------------------------- parity
SOLVERS = {
    "adam": dict(solver="adam", learning_rate_init=0.01, max_iter=40),
    "sgd": dict(solver="sgd", learning_rate_init=0.1, max_iter=40),
    "lbfgs": dict(solver="lbfgs", max_iter=100),
}


@no_convergence_warning
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("dataset", ["digits", "breast_cancer", "iris"])
def test_classification_parity(dataset, solver):
    X_train, X_test, y_train, y_test = DATA[dataset]
    params = dict(hidden_layer_sizes=(32,), random_state=0, **SOLVERS[solver])
    sk, ours = _pair("MLPClassifier", **params)
    sk.fit(X_train, y_train)
    ours.fit(X_train, y_train)
    sk_score, our_score = sk.score(X_test, y_test), ours.score(X_test, y_test)
    assert sk_score > 0.85
    assert abs(our_score - sk_score) <= 0.01, (our_score, sk_score)


@no_convergence_warning
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("dataset", ["diabetes", "make_regression"])
def test_regression_parity(dataset, solver):
    X_train, X_test, y_train, y_test = DATA[dataset]
    # diabetes is small and noisy: a strong L2 penalty keeps every solver from
    # overfitting (a linear model reaches R^2 ~ 0.45 on this split)
    params = dict(hidden_layer_sizes=(16,), alpha=3.0, random_state=0, **SOLVERS[solver])
    if solver == "sgd":
        params["learning_rate_init"] = 0.01
    elif solver == "lbfgs":
        params["max_iter"] = 50
    sk, ours = _pair("MLPRegressor", **params)
    sk.fit(X_train, y_train)
    ours.fit(X_train, y_train)
    sk_score, our_score = sk.score(X_test, y_test), ours.score(X_test, y_test)
    assert sk_score > (0.25 if dataset == "diabetes" else 0.85)
    assert abs(our_score - sk_score) <= 0.02, (our_score, sk_score)


# --------------------------------------------------------------------------- same trajectory
TRAJECTORIES = {
    "adam": dict(solver="adam"),
    "adam_small_batches": dict(solver="adam", batch_size=64, beta_1=0.5, epsilon=1e-4),
    "sgd_nesterov": dict(solver="sgd", learning_rate_init=0.05),
    "sgd_momentum": dict(solver="sgd", nesterovs_momentum=False, momentum=0.5),
    "sgd_plain_invscaling": dict(solver="sgd", momentum=0.0, learning_rate="invscaling",
                                 learning_rate_init=0.5, power_t=0.25),
    "sgd_invscaling_momentum": dict(solver="sgd", learning_rate="invscaling",
                                    learning_rate_init=0.5),
    "sgd_adaptive": dict(solver="sgd", learning_rate="adaptive", tol=0.5, n_iter_no_change=1),
    "no_shuffle": dict(solver="adam", shuffle=False),
    "lbfgs": dict(solver="lbfgs", max_iter=15),
    "tanh_alpha": dict(activation="tanh", alpha=0.1),
    "logistic_two_layers": dict(activation="logistic", hidden_layer_sizes=(16, 8)),
    "identity_no_hidden": dict(activation="identity", hidden_layer_sizes=()),
}


@no_convergence_warning
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TRAJECTORIES))
def test_same_trajectory_as_sklearn(case, backend):
    X_train, _, y_train, _ = DATA["digits"]
    params = dict(hidden_layer_sizes=(20,), max_iter=4, random_state=1)
    params.update(TRAJECTORIES[case])
    sk, ours = _pair("MLPClassifier", **params)
    sk.fit(X_train, y_train)
    with fastprop.use_backend(backend):
        ours.fit(X_train, y_train)
    _assert_same_model(sk, ours)
    if hasattr(sk, "_optimizer"):
        assert ours._optimizer.learning_rate == pytest.approx(sk._optimizer.learning_rate)
    np.testing.assert_allclose(ours.predict_proba(X_train), sk.predict_proba(X_train),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n", [1, 2, 7, 200, 1347])
def test_shuffle_is_sklearns(n):
    """The fit's epoch shuffle draws the permutation scikit-learn's shuffle draws."""
    from sklearn.utils import check_random_state, shuffle

    import fastprop.sklearn as fsk
    a = np.arange(n) * 3 + 1
    for seed in (0, 1, 12345):
        ours, theirs = check_random_state(seed), check_random_state(seed)
        for _ in range(3):                      # and leaves the generator alike
            np.testing.assert_array_equal(fsk._shuffled(a, ours), shuffle(a, random_state=theirs))


# --------------------------------------------------------------------------- fused step
FUSED_CASES = {
    # name: (estimator, params, data, the fused step applies)
    "adam_softmax": ("MLPClassifier", dict(solver="adam", alpha=0.1), "digits", True),
    "sgd_nesterov": ("MLPClassifier", dict(solver="sgd", learning_rate_init=0.05,
                                           alpha=0.1), "digits", True),
    "sgd_momentum_invscaling": ("MLPClassifier", dict(
        solver="sgd", nesterovs_momentum=False, momentum=0.5, learning_rate="invscaling",
        learning_rate_init=0.5), "digits", True),
    "sgd_plain_adaptive": ("MLPClassifier", dict(
        solver="sgd", momentum=0.0, learning_rate="adaptive", tol=0.5, n_iter_no_change=1),
        "digits", True),
    "binary_logistic_tanh": ("MLPClassifier", dict(solver="adam", activation="tanh",
                                                   hidden_layer_sizes=(12, 7)),
                             "breast_cancer", True),
    "regression_one_output": ("MLPRegressor", dict(solver="adam", activation="logistic",
                                                   alpha=0.3), "diabetes", True),
    "no_hidden_layer": ("MLPClassifier", dict(solver="adam", activation="identity",
                                              hidden_layer_sizes=()), "iris", True),
    # k > 1 logistic / identity outputs: scikit-learn's delta is k times the gradient
    # of the mean loss (the kernel's grad_scale), its logistic loss sums over outputs
    "multi_output_regression": ("MLPRegressor", dict(solver="adam", alpha=0.2),
                                "multi_output", True),
    "multilabel": ("MLPClassifier", dict(solver="sgd", learning_rate_init=0.2),
                   "multilabel", True),
    # sample weights / sparse input / Poisson have no fused form
    "sample_weight": ("MLPClassifier", dict(solver="adam"), "weighted", False),
    "sparse": ("MLPClassifier", dict(solver="adam"), "sparse", False),
    "poisson": ("MLPRegressor", dict(solver="adam", loss="poisson"), "poisson", False),
}


def _fused_case_data(name):
    kw = {}
    if name == "multi_output":
        X, y = make_regression(n_samples=120, n_features=6, n_targets=3, random_state=0)
        y = y / 100.0
    elif name == "multilabel":
        X, y = make_multilabel_classification(n_samples=120, n_features=8, random_state=0)
    elif name == "poisson":
        X, _, _, _ = DATA["diabetes"]
        y = np.random.default_rng(0).poisson(3.0, X.shape[0]).astype(float)
    else:
        base = {"weighted": "digits", "sparse": "digits"}.get(name, name)
        X, _, y, _ = DATA[base]
        if name == "weighted":
            kw["sample_weight"] = np.random.default_rng(0).uniform(0.5, 2.0, X.shape[0])
        if name == "sparse":
            X = sp.csr_matrix(np.where(X > 0.5, X, 0.0))
    return X, y, kw


@no_convergence_warning
@pytest.mark.skipif("native" not in BACKENDS, reason="the fused step is the native backend's")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_step_gives_the_layer_paths_model(case, dtype, monkeypatch):
    """The whole-step kernel and the layer-by-layer kernels give the same model (same
    kernels in the same order: to an ulp per step), and the fused step is used exactly
    where it computes what scikit-learn does."""
    import fastprop.sklearn as fsk
    name, params, data, applies = FUSED_CASES[case]
    X, y, kw = _fused_case_data(data)
    X = X.astype(dtype)
    params = {"hidden_layer_sizes": (20,), "max_iter": 5, "random_state": 3,
              "batch_size": 50, **params}
    calls = []
    real_call = fsk._FusedStep.__call__

    def counting(self, *args):
        calls.append(1)
        return real_call(self, *args)

    monkeypatch.setattr(fsk._FusedStep, "__call__", counting)
    est_cls = MLPClassifier if name == "MLPClassifier" else MLPRegressor
    with fastprop.use_backend("native"):
        fused = est_cls(**params).fit(X, y, **kw)
        assert bool(calls) == applies
        fused.partial_fit(X, y, **kw)          # continues from the same state
        monkeypatch.setattr(fsk._FusedStep, "make", classmethod(lambda cls, *a: None))
        layered = est_cls(**params).fit(X, y, **kw)
        layered.partial_fit(X, y, **kw)
    rtol, atol = (1e-9, 1e-12) if dtype == np.float64 else (2e-4, 1e-6)
    assert fused.n_iter_ == layered.n_iter_
    for a, b in zip(layered.coefs_ + layered.intercepts_, fused.coefs_ + fused.intercepts_):
        assert b.dtype == dtype
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)
    np.testing.assert_allclose(fused.loss_curve_, layered.loss_curve_, rtol=rtol * 10)
    if data in ("digits", "iris", "breast_cancer") and dtype == np.float64:
        sk = (skn.MLPClassifier if name == "MLPClassifier" else skn.MLPRegressor)(**params)
        _assert_same_model(sk.fit(X, y), est_cls(**params).fit(X, y))  # and sklearn's


@pytest.mark.skipif("native" not in BACKENDS, reason="the fused step is the native backend's")
def test_fused_step_checks_its_decay_mask():
    """The native step's per-parameter weight-decay mask: the L2 term reaches the
    weights only, and a malformed mask is refused before anything changes."""
    import fastprop.sklearn as fsk
    X, _, y, _ = DATA["iris"]
    with fastprop.use_backend("native"):
        est = MLPClassifier(hidden_layer_sizes=(5,), max_iter=1, alpha=50.0,
                            random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, y)
        net = est._network(X.shape[1], [5], np.float64, False)
        step = fsk._FusedStep.make(fastprop.backends.current(), net, est._optimizer, False)
        assert step is not None
        before = net.params.copy()
        step.opt._decay_mask = np.ones(3, np.uint8)          # 4 parameters
        with pytest.raises(ValueError, match="decay_mask"):
            step(fastprop.backends.current(), np.ascontiguousarray(X[:8]),
                 np.zeros(8, np.int64), 50.0)
        np.testing.assert_array_equal(net.params, before)
        # decay on every parameter (intercepts too) gives other intercepts than the
        # weights-only mask, with the same weights' gradient step otherwise
        xb, tb = np.ascontiguousarray(X[:8]), np.ascontiguousarray(y[:8], dtype=np.int64)
        results = []
        for mask in (np.array([1, 1, 0, 0], np.uint8), np.ones(4, np.uint8)):
            net.params[...] = before
            opt = fsk._AdamOptimizer(net, 0.01, 0.9, 0.999, 1e-8)
            s = fsk._FusedStep.make(fastprop.backends.current(), net, opt, False)
            s.opt._decay_mask = mask
            s(fastprop.backends.current(), xb, tb, 50.0)
            results.append(net.params.copy())
        n_coef = net.n_coef
        np.testing.assert_array_equal(results[0][:n_coef], results[1][:n_coef])
        assert not np.allclose(results[0][n_coef:], results[1][n_coef:])


@no_convergence_warning
def test_adaptive_learning_rate_decreases_like_sklearn():
    X_train, _, y_train, _ = DATA["iris"]
    params = dict(solver="sgd", learning_rate="adaptive", tol=10.0, n_iter_no_change=1,
                  hidden_layer_sizes=(8,), max_iter=30, random_state=0)
    sk, ours = _pair("MLPClassifier", **params)
    sk.fit(X_train, y_train)
    ours.fit(X_train, y_train)
    assert sk._optimizer.learning_rate < 1e-6      # the schedule ran to its end
    assert ours.n_iter_ == sk.n_iter_
    assert ours._optimizer.learning_rate == pytest.approx(sk._optimizer.learning_rate)
    _assert_same_model(sk, ours)


@no_convergence_warning
@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
def test_regression_trajectory(solver):
    X_train, _, y_train, _ = DATA["diabetes"]
    params = dict(hidden_layer_sizes=(16,), max_iter=5, random_state=0, solver=solver)
    sk, ours = _pair("MLPRegressor", **params)
    _assert_same_model(sk.fit(X_train, y_train), ours.fit(X_train, y_train))
    np.testing.assert_allclose(ours.predict(X_train), sk.predict(X_train), rtol=1e-6, atol=1e-9)


@no_convergence_warning
@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_multi_output_regression(solver):
    X, y = make_regression(n_samples=150, n_features=8, n_targets=3, random_state=0)
    X, y = StandardScaler().fit_transform(X), y / y.std()
    sk, ours = _pair("MLPRegressor", hidden_layer_sizes=(10,), max_iter=10, random_state=0,
                     solver=solver)
    _assert_same_model(sk.fit(X, y), ours.fit(X, y))
    assert ours.predict(X).shape == (150, 3)
    assert ours.n_outputs_ == 3


@needs_sklearn_1_7
@no_convergence_warning
@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
def test_poisson_loss(solver):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 5))
    y = rng.poisson(np.exp(0.3 * X[:, 0] + 0.2 * X[:, 1]))
    sk, ours = _pair("MLPRegressor", loss="poisson", hidden_layer_sizes=(8,), max_iter=10,
                     random_state=0, solver=solver, learning_rate_init=0.01)
    _assert_same_model(sk.fit(X, y), ours.fit(X, y))
    assert ours.out_activation_ == "exp"
    assert (ours.predict(X) > 0).all()


@no_convergence_warning
@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_multilabel(solver):
    X, Y = make_multilabel_classification(n_samples=120, n_features=10, n_classes=4,
                                          random_state=0)
    sk, ours = _pair("MLPClassifier", hidden_layer_sizes=(12,), max_iter=10, random_state=0,
                     solver=solver)
    _assert_same_model(sk.fit(X, Y), ours.fit(X, Y))
    assert ours.out_activation_ == "logistic"
    np.testing.assert_array_equal(ours.predict(X), sk.predict(X))
    assert ours.predict_proba(X).shape == (120, 4)


# Confident wrong predictions: scikit-learn's log losses clip the probabilities to
# [eps, 1 - eps], which caps a sample's loss at -log(eps) (36.04 in float64, 15.94 in
# float32).  Inputs scaled by 30 saturate the outputs, so loss_curve_, the tol
# stopping epoch and L-BFGS's line search all depend on the cap.
CLIP_CASES = {
    "softmax-adam": ("multiclass", dict(max_iter=5), None),       # the fused native step
    "softmax-sgd-tol": ("multiclass", dict(max_iter=50, solver="sgd", tol=0.7,
                                             n_iter_no_change=1), None),
    "softmax-lbfgs": ("multiclass", dict(max_iter=10, solver="lbfgs", alpha=0.3), None),
    "softmax-sparse": ("multiclass", dict(max_iter=5), "csr"),    # the layer path
    "binary-adam": ("binary", dict(max_iter=5), None),
    "multilabel-adam": ("multilabel", dict(max_iter=5), None),
    "softmax-adam-float32": ("multiclass", dict(max_iter=5), "float32"),
}


@no_convergence_warning
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_log_losses_are_clipped_like_sklearn(case, backend):
    target, params, form = CLIP_CASES[case]
    rng = np.random.RandomState(0)
    X = rng.randn(60, 4)
    y = {"multiclass": rng.randint(0, 3, 60), "binary": rng.randint(0, 2, 60),
         "multilabel": rng.randint(0, 2, (60, 3))}[target]
    if params.get("solver") != "lbfgs":
        X = X * 30
    if form == "csr":
        X = sp.csr_matrix(X)
    elif form == "float32":
        X = X.astype(np.float32)
    sk, ours = _pair("MLPClassifier", hidden_layer_sizes=(5,), random_state=0,
                     learning_rate_init=0.01, **params)
    sk.fit(X, y)
    with fastprop.use_backend(backend):
        ours.fit(X, y)
    # the unclipped loss is far larger here: the first epoch's is > 1.1x sklearn's
    if form == "float32":
        np.testing.assert_allclose(ours.loss_curve_, sk.loss_curve_, rtol=1e-4)
        assert ours.n_iter_ == sk.n_iter_
    else:
        _assert_same_model(sk, ours)


@no_convergence_warning
def test_binary_outputs():
    X_train, X_test, y_train, _ = DATA["breast_cancer"]
    sk, ours = _pair("MLPClassifier", hidden_layer_sizes=(8,), max_iter=5, random_state=0)
    _assert_same_model(sk.fit(X_train, y_train), ours.fit(X_train, y_train))
    proba = ours.predict_proba(X_test)
    assert ours.out_activation_ == "logistic" and ours.n_outputs_ == 1
    assert proba.shape == (X_test.shape[0], 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(ours.predict_log_proba(X_test), np.log(proba))
    np.testing.assert_array_equal(ours.predict(X_test), sk.predict(X_test))


@needs_sklearn_1_7
@no_convergence_warning
@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_sample_weight(kind, solver):
    key = "iris" if kind == "classifier" else "diabetes"
    X_train, _, y_train, _ = DATA[key]
    weights = np.random.RandomState(0).uniform(0.1, 3.0, size=len(y_train))
    name = "MLPClassifier" if kind == "classifier" else "MLPRegressor"
    sk, ours = _pair(name, hidden_layer_sizes=(8,), max_iter=5, random_state=0, solver=solver)
    sk.fit(X_train, y_train, sample_weight=weights)
    ours.fit(X_train, y_train, sample_weight=weights)
    _assert_same_model(sk, ours)


@no_convergence_warning
@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_sparse_input(fmt, solver):
    X_train, X_test, y_train, _ = DATA["digits"]
    Xs = sp.csr_matrix(X_train).asformat(fmt)
    params = dict(hidden_layer_sizes=(16,), max_iter=4, random_state=0, solver=solver)
    sk, ours = _pair("MLPClassifier", **params)
    _assert_same_model(sk.fit(Xs, y_train), ours.fit(Xs, y_train))
    dense = MLPClassifier(**params).fit(X_train, y_train)
    _assert_same_model(dense, ours)
    np.testing.assert_allclose(ours.predict_proba(sp.csr_matrix(X_test).asformat(fmt)),
                               dense.predict_proba(X_test), rtol=1e-6, atol=1e-9)


@no_convergence_warning
@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_float32(solver):
    X_train, X_test, y_train, y_test = DATA["digits"]
    X32 = X_train.astype(np.float32)
    params = dict(hidden_layer_sizes=(32,), max_iter=20, random_state=0, solver=solver)
    sk, ours = _pair("MLPClassifier", **params)
    sk.fit(X32, y_train)
    ours.fit(X32, y_train)
    # Adam keeps a float32 network; L-BFGS returns scipy's float64 result (below)
    dtype = np.float32 if solver == "adam" else np.float64
    assert sk.coefs_[0].dtype == dtype
    assert all(c.dtype == dtype for c in ours.coefs_ + ours.intercepts_)
    assert ours.predict_proba(X_test.astype(np.float32)).dtype == dtype
    assert abs(ours.score(X_test, y_test) - sk.score(X_test, y_test)) <= 0.01


def _promote_lbfgs_start(monkeypatch):
    """Make scipy.optimize.minimize take its start in float64, as scipy < 1.11 does
    (every point it evaluates is then float64); for scikit-learn's MLPs and ours."""
    import scipy.optimize
    real = scipy.optimize.minimize

    def promoted(fun, x0, *args, **kwargs):
        return real(fun, np.asarray(x0, dtype=np.float64), *args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "minimize", promoted)


@no_convergence_warning
@pytest.mark.parametrize("points", ["float32", "float64"])
@pytest.mark.parametrize("form", ["dense", "csr", "warm_start"])
def test_lbfgs_on_float32_input(form, points, monkeypatch):
    """scikit-learn's L-BFGS on float32 X: the float32 initialisation is packed and
    handed to scipy, the loss is evaluated at the points scipy hands back (float32
    ones from scipy >= 1.11, so the fit computes in float32; float64 ones from older
    scipy, simulated here, so it computes in float64), and scipy's float64 result
    becomes coefs_ / intercepts_: a float64 model that predicts in float64.  A warm
    start then continues that float64 model in float64."""
    X_train, X_test, y_train, _ = DATA["digits"]
    X32 = X_train[:400].astype(np.float32)
    y = y_train[:400]
    if form == "csr":
        X32 = sp.csr_matrix(X32)
    if points == "float64":
        _promote_lbfgs_start(monkeypatch)
    params = dict(hidden_layer_sizes=(16,), max_iter=8, random_state=0, solver="lbfgs",
                  warm_start=form == "warm_start")
    sk, ours = _pair("MLPClassifier", **params)
    for _ in range(2 if form == "warm_start" else 1):
        sk.fit(X32, y)
        ours.fit(X32, y)
    for a, b in zip(sk.coefs_ + sk.intercepts_, ours.coefs_ + ours.intercepts_):
        assert a.dtype == b.dtype == np.float64
    if points == "float64":
        _assert_same_model(sk, ours)
        rtol = 1e-6
    else:   # float32 products round differently in scikit-learn's BLAS and ours
        rtol = 1e-3
        assert ours.n_iter_ == sk.n_iter_
        np.testing.assert_allclose(ours.loss_, sk.loss_, rtol=1e-5)
        for a, b in zip(sk.coefs_ + sk.intercepts_, ours.coefs_ + ours.intercepts_):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=1e-5)
    proba = ours.predict_proba(X_test.astype(np.float32))
    assert proba.dtype == np.float64
    np.testing.assert_allclose(proba, sk.predict_proba(X_test.astype(np.float32)),
                               rtol=rtol, atol=1e-6)


@no_convergence_warning
def test_float32_regression_keeps_dtype():
    X_train, _, y_train, _ = DATA["diabetes"]
    ours = MLPRegressor(hidden_layer_sizes=(8,), max_iter=3, random_state=0)
    ours.fit(X_train.astype(np.float32), y_train.astype(np.float32))
    assert ours.coefs_[0].dtype == np.float32
    assert ours.predict(X_train.astype(np.float32)).dtype == np.float32


@no_convergence_warning
@pytest.mark.parametrize("kind", ["multiclass", "binary", "regressor"])
def test_float32_model_predicts_like_sklearn_on_other_dtypes(kind):
    """A float32 network on float64, int or bool X: scikit-learn computes X @ W in
    NumPy's promoted type (float64 for float64 and int64 X, from the unrounded X;
    float32 for bool X), so predict / predict_proba / predict_log_proba / score do
    too.  Same weights in both estimators, so the outputs agree to float64 rounding."""
    X_raw, y = load_digits(return_X_y=True)          # int64 pixel values 0..16
    X_raw, y = X_raw[:300], y[:300]
    if kind == "binary":
        y = y % 2
    name = "MLPRegressor" if kind == "regressor" else "MLPClassifier"
    target = y / 9.0 if kind == "regressor" else y
    sk, ours = _pair(name, hidden_layer_sizes=(12,), max_iter=3, random_state=0)
    ours.fit((X_raw / 16).astype(np.float32), target)
    sk.fit((X_raw / 16).astype(np.float32), target)
    sk.coefs_ = [c.copy() for c in ours.coefs_]
    sk.intercepts_ = [b.copy() for b in ours.intercepts_]
    assert sk.coefs_[0].dtype == np.float32
    for X in (X_raw / 16.3, X_raw, X_raw > 8, (X_raw / 16.3).astype(np.float32)):
        methods = (["predict"] if kind == "regressor"
                   else ["predict_proba", "predict_log_proba", "predict"])
        rtol = 1e-5 if X.dtype in (np.float32, bool) else 1e-12
        for method in methods:
            expected, got = getattr(sk, method)(X), getattr(ours, method)(X)
            assert got.dtype == expected.dtype, (method, X.dtype)
            if got.dtype.kind == "f":
                np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * 1e-2)
            else:
                np.testing.assert_array_equal(got, expected)
        assert ours.score(X, target) == pytest.approx(sk.score(X, target), rel=rtol)


# --------------------------------------------------------------------------- incremental
@no_convergence_warning
def test_partial_fit_matches_sklearn():
    X_train, _, y_train, _ = DATA["digits"]
    classes = np.unique(y_train)
    sk, ours = _pair("MLPClassifier", hidden_layer_sizes=(16,), random_state=0, solver="sgd")
    for start in range(0, 600, 200):
        xb, yb = X_train[start:start + 200], y_train[start:start + 200]
        sk.partial_fit(xb, yb, classes=classes)
        ours.partial_fit(xb, yb, classes=classes)
    _assert_same_model(sk, ours)
    assert ours.n_iter_ == 1 and ours.t_ == 600


def test_partial_fit_errors():
    X_train, _, y_train, _ = DATA["iris"]
    assert not hasattr(MLPClassifier(solver="lbfgs"), "partial_fit")
    with pytest.raises(ValueError, match="classes"):
        MLPClassifier().partial_fit(X_train, y_train)
    with pytest.raises(ValueError, match="early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X_train, y_train, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="not in `self.classes_`"):
        MLPClassifier().partial_fit(X_train, y_train, classes=[0, 1, 2]).partial_fit(
            X_train, y_train + 5)


@no_convergence_warning
def test_partial_fit_regressor():
    X_train, _, y_train, _ = DATA["make_regression"]
    sk, ours = _pair("MLPRegressor", hidden_layer_sizes=(16,), random_state=0)
    for _ in range(3):
        sk.partial_fit(X_train, y_train)
        ours.partial_fit(X_train, y_train)
    _assert_same_model(sk, ours)


@no_convergence_warning
@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_warm_start(solver):
    X_train, _, y_train, _ = DATA["iris"]
    params = dict(hidden_layer_sizes=(8,), max_iter=5, random_state=0, warm_start=True,
                  solver=solver)
    sk, ours = _pair("MLPClassifier", **params)
    for _ in range(2):
        sk.fit(X_train, y_train)
        ours.fit(X_train, y_train)
    _assert_same_model(sk, ours)
    with pytest.raises(ValueError, match="warm_start"):
        ours.fit(X_train[y_train < 2], y_train[y_train < 2])


WARM_EARLY_STOPPING = {
    "adam": [{}, {}, {}],
    "sgd_adaptive": [dict(solver="sgd", learning_rate="adaptive", tol=0.5,
                          n_iter_no_change=1)] * 3,
    "lbfgs_between": [{}, dict(solver="lbfgs", max_iter=3), dict(solver="adam", max_iter=5)],
}


@no_convergence_warning
@pytest.mark.parametrize("case", list(WARM_EARLY_STOPPING))
def test_warm_start_with_early_stopping(case):
    """After an early-stopping fit, scikit-learn's coefs_ / intercepts_ are the very
    lists _best_coefs / _best_intercepts name, and its solvers update those arrays in
    place: a warm-started fit whose validation score never beats the
    best_validation_score_ it carries over keeps the weights it trained (the restore
    of the best weights restores the live ones); one that beats it restores that
    epoch's copy.  (Random labels: the validation score sits at chance.)"""
    rng = np.random.RandomState(1)
    X, y = rng.randn(80, 5), rng.randint(0, 3, 80)
    sk, ours = _pair("MLPClassifier", hidden_layer_sizes=(6,), random_state=0, max_iter=5,
                     warm_start=True, batch_size=16, early_stopping=True, n_iter_no_change=2)
    kept_training = False
    for params in WARM_EARLY_STOPPING[case]:
        sk.set_params(**params)
        ours.set_params(**params)
        fitted = hasattr(sk, "coefs_")
        before = sk.coefs_[0].copy() if fitted else None
        best = getattr(sk, "best_validation_score_", None)
        sk.fit(X, y)
        ours.fit(X, y)
        kept_training |= (fitted and sk.best_validation_score_ == best
                          and not np.array_equal(before, sk.coefs_[0]))
        _assert_same_model(sk, ours)
        np.testing.assert_allclose(ours.validation_scores_, sk.validation_scores_)
        assert ours.best_validation_score_ == sk.best_validation_score_
        if hasattr(sk, "_optimizer"):
            assert ours._optimizer.learning_rate == pytest.approx(sk._optimizer.learning_rate)
    assert kept_training      # the case this test is about happened


@no_convergence_warning
@pytest.mark.parametrize("new_sizes", [(4,), (9,)])
@pytest.mark.parametrize("solver", ["adam", "sgd"])
@pytest.mark.parametrize("name", ["MLPClassifier", "MLPRegressor"])
def test_warm_start_after_hidden_layer_sizes_change(name, solver, new_sizes):
    """warm_start, then set_params(hidden_layer_sizes=...) with as many hidden layers:
    scikit-learn's stochastic solvers take the shapes from coefs_ and keep training
    the fitted network, silently; so do ours (fit and partial_fit)."""
    X_train, _, y_train, _ = DATA["iris" if name == "MLPClassifier" else "diabetes"]
    sk, ours = _pair(name, hidden_layer_sizes=(6,), max_iter=5, random_state=0,
                     warm_start=True, solver=solver)
    sk.fit(X_train, y_train)
    ours.fit(X_train, y_train)
    for est in (sk, ours):
        est.set_params(hidden_layer_sizes=new_sizes)
        est.fit(X_train, y_train)
        est.partial_fit(X_train, y_train)
    assert ours.coefs_[0].shape == sk.coefs_[0].shape == (X_train.shape[1], 6)
    _assert_same_model(sk, ours)


@no_convergence_warning
@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
def test_warm_start_hidden_layer_sizes_change_errors(solver):
    """Where scikit-learn fails on a changed hidden_layer_sizes (another depth, any
    solver: an unrelated TypeError / IndexError / AttributeError; L-BFGS, which
    unpacks the fitted parameters by the new sizes: NaN or an error), ours raises a
    clear error and leaves the fitted network as it was."""
    X_train, _, y_train, _ = DATA["iris"]
    changes = [(6, 3), ()] + ([(4,), (9,)] if solver == "lbfgs" else [])
    for sizes in changes:
        ours = MLPClassifier(hidden_layer_sizes=(6,), max_iter=5, random_state=0,
                             warm_start=True, solver=solver).fit(X_train, y_train)
        fitted = [c.copy() for c in ours.coefs_]
        ours.set_params(hidden_layer_sizes=sizes)
        with pytest.raises(ValueError, match="does not match the fitted network"):
            ours.fit(X_train, y_train)
        for a, b in zip(fitted, ours.coefs_):
            np.testing.assert_array_equal(a, b)


@no_convergence_warning
@pytest.mark.parametrize("solver, kw", [("adam", {}), ("lbfgs", {}),
                                        ("adam", {"loss": "poisson"}), ("sgd", {"w": 1})])
def test_continued_fit_with_other_outputs_is_refused(solver, kw):
    """A continued regressor fit on y with fewer outputs than the fitted network: one
    clear ValueError on every path (the kernels' own messages on some, a silent
    broadcast on others, as scikit-learn's), the network left as it was; the loss
    figures are NumPy floats, as scikit-learn's."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 3))
    Y = np.abs(rng.standard_normal((60, 2)))
    weights = np.ones(60) if kw.pop("w", None) else None
    ours = MLPRegressor(hidden_layer_sizes=(5,), max_iter=3, random_state=0, solver=solver,
                        warm_start=True, **kw).fit(X, Y, sample_weight=weights)
    assert type(ours.loss_) is np.float64 and type(ours.loss_curve_[-1] if solver != "lbfgs"
                                                  else ours.loss_) is np.float64
    fitted = [c.copy() for c in ours.coefs_]
    for refit in (lambda: ours.fit(X, Y[:, 0], sample_weight=weights),
                  lambda: ours.partial_fit(X, Y[:, 1]) if solver != "lbfgs" else
                  ours.fit(X, Y[:, 1])):
        with pytest.raises(ValueError, match="y has 1 outputs, the fitted network 2"):
            refit()
    for a, b in zip(fitted, ours.coefs_):
        np.testing.assert_array_equal(a, b)
    assert ours.n_outputs_ == 2


@no_convergence_warning
@pytest.mark.parametrize("first, then, method, match", [
    ({}, {"early_stopping": True, "warm_start": True}, "fit", "fitted without it"),
    ({"early_stopping": True}, {"early_stopping": False, "warm_start": True}, "fit",
     "fitted with early_stopping=True"),
    ({"early_stopping": True}, {"early_stopping": False}, "partial_fit",
     "fitted with early_stopping=True"),
    ({"solver": "lbfgs"}, {"solver": "adam", "warm_start": True}, "fit", "solver 'lbfgs'"),
    ({"solver": "lbfgs"}, {"solver": "sgd"}, "partial_fit", "solver 'lbfgs'"),
])
def test_continued_fit_after_switching_early_stopping_or_solver_is_refused(first, then, method,
                                                                          match):
    """A continued stochastic fit after early_stopping or the solver was switched:
    scikit-learn trains an epoch, then fails on the first fit's bookkeeping (a None)
    with an unrelated AttributeError/TypeError; ours refuses first, with nothing
    changed."""
    X_train, _, y_train, _ = DATA["iris"]
    ours = MLPClassifier(hidden_layer_sizes=(5,), max_iter=5, random_state=0,
                         **first).fit(X_train, y_train)
    fitted = [c.copy() for c in ours.coefs_]
    n_iter = ours.n_iter_
    ours.set_params(**then)
    with pytest.raises(ValueError, match=match):
        getattr(ours, method)(X_train, y_train)
    for a, b in zip(fitted, ours.coefs_):
        np.testing.assert_array_equal(a, b)
    assert ours.n_iter_ == n_iter


def test_partial_fit_with_early_stopping_is_refused_before_anything_changes():
    """scikit-learn's message; it initialises the network first (and a continued
    partial_fit after a fit with early stopping failed on our own check first)."""
    X_train, _, y_train, _ = DATA["iris"]
    est = MLPClassifier(hidden_layer_sizes=(5,), early_stopping=True, random_state=0)
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping=True"):
        est.partial_fit(X_train, y_train, classes=np.unique(y_train))
    assert not hasattr(est, "coefs_") and not hasattr(est, "n_features_in_")
    assert not hasattr(est, "classes_") and not hasattr(est, "_label_binarizer")


@no_convergence_warning
def test_user_replaced_coefs_are_used():
    X_train, _, y_train, _ = DATA["iris"]
    ours = MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0,
                         warm_start=True).fit(X_train, y_train)
    sk = skn.MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0,
                           warm_start=True).fit(X_train, y_train)
    for est in (sk, ours):
        est.coefs_ = [np.full_like(c, 0.01) for c in est.coefs_]
        est.intercepts_ = [np.zeros_like(b) for b in est.intercepts_]
        est.fit(X_train, y_train)
    _assert_same_model(sk, ours)


@no_convergence_warning
@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_early_stopping(kind):
    key = "digits" if kind == "classifier" else "diabetes"
    X_train, _, y_train, _ = DATA[key]
    name = "MLPClassifier" if kind == "classifier" else "MLPRegressor"
    sk, ours = _pair(name, hidden_layer_sizes=(16,), max_iter=100, random_state=0,
                     learning_rate_init=0.01, early_stopping=True, n_iter_no_change=3,
                     tol=1e-3, validation_fraction=0.2)
    _assert_same_model(sk.fit(X_train, y_train), ours.fit(X_train, y_train))
    assert ours.n_iter_ < 100                 # it stopped early
    np.testing.assert_allclose(ours.validation_scores_, sk.validation_scores_, rtol=1e-6)
    assert ours.best_validation_score_ == pytest.approx(sk.best_validation_score_)
    assert ours.best_loss_ is None


@no_convergence_warning
def test_tol_stopping_and_fitted_attributes():
    X_train, _, y_train, _ = DATA["iris"]
    sk, ours = _pair("MLPClassifier", hidden_layer_sizes=(8,), max_iter=200, tol=0.05,
                     n_iter_no_change=2, random_state=0)
    _assert_same_model(sk.fit(X_train, y_train), ours.fit(X_train, y_train))
    assert ours.n_iter_ < 200
    assert ours.best_loss_ == pytest.approx(sk.best_loss_)
    assert ours.validation_scores_ is None and ours.best_validation_score_ is None
    np.testing.assert_array_equal(ours.classes_, [0, 1, 2])
    assert ours.n_layers_ == 3 and ours.out_activation_ == "softmax"


def test_verbose_prints_like_sklearn():
    X_train, _, y_train, _ = DATA["iris"]
    outputs = []
    for cls in (skn.MLPClassifier, MLPClassifier):
        buf = io.StringIO()
        with redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            cls(hidden_layer_sizes=(4,), max_iter=3, random_state=0, verbose=True).fit(
                X_train, y_train)
        outputs.append(buf.getvalue())
    assert outputs[1] == outputs[0]
    assert outputs[1].startswith("Iteration 1, loss = ")


def test_convergence_warning_and_errors():
    X_train, _, y_train, _ = DATA["iris"]
    with pytest.warns(ConvergenceWarning, match="Maximum iterations"):
        MLPClassifier(hidden_layer_sizes=(4,), max_iter=2).fit(X_train, y_train)
    with pytest.raises(ValueError, match="hidden_layer_sizes must be > 0"):
        MLPClassifier(hidden_layer_sizes=(4, 0)).fit(X_train, y_train)
    with pytest.raises(ValueError, match="solver"):
        MLPClassifier(solver="newton").fit(X_train, y_train)
    with pytest.raises(ValueError, match="non-finite parameter weights"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        MLPRegressor(solver="sgd", learning_rate_init=1e10, max_iter=3).fit(
            X_train * 1e100, y_train * 1e100)


def test_gradient_matches_finite_differences():
    """The L-BFGS objective's gradient (our loss + L2 term) by central differences."""
    X, y = DATA["iris"][0][:30], DATA["iris"][2][:30]
    for cls, target in ((MLPClassifier, y), (MLPRegressor, y.astype(float))):
        est = cls(hidden_layer_sizes=(5, 3), activation="tanh", alpha=0.3, solver="lbfgs",
                  max_iter=1, random_state=0)
        captured = {}
        real_minimize = fastprop.sklearn.scipy.optimize.minimize

        def capture(fun, x0, **kwargs):
            captured["fun"], captured["x0"] = fun, x0.copy()
            return real_minimize(fun, x0, **kwargs)

        fastprop.sklearn.scipy.optimize.minimize = capture
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                est.fit(X, target)
        finally:
            fastprop.sklearn.scipy.optimize.minimize = real_minimize
        fun, theta = captured["fun"], captured["x0"]
        _, grad = fun(theta)
        eps = 1e-6
        numeric = np.empty_like(theta)
        for i in range(theta.size):
            step = np.zeros_like(theta)
            step[i] = eps
            numeric[i] = (fun(theta + step)[0] - fun(theta - step)[0]) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- composition
@no_convergence_warning
def test_pipeline_and_grid_search():
    X_train, X_test, y_train, y_test = DATA["iris"]
    pipe = make_pipeline(StandardScaler(), MLPClassifier(learning_rate_init=0.01, max_iter=100,
                                                         random_state=0))
    search = GridSearchCV(pipe, {"mlpclassifier__hidden_layer_sizes": [(4,), (16,)],
                                 "mlpclassifier__alpha": [1e-4, 1e-2]}, cv=3)
    search.fit(X_train, y_train)
    assert search.best_estimator_.score(X_test, y_test) > 0.8
    assert isinstance(search.best_estimator_[-1], MLPClassifier)


@no_convergence_warning
def test_clone_pickle_joblib(tmp_path):
    X_train, X_test, y_train, _ = DATA["digits"]
    est = MLPClassifier(hidden_layer_sizes=(16,), max_iter=5, random_state=0).fit(
        X_train, y_train)
    fresh = clone(est)
    assert fresh.get_params() == est.get_params() and not hasattr(fresh, "coefs_")
    expected = est.predict_proba(X_test)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.predict_proba(X_test), expected)
    path = tmp_path / "mlp.joblib"
    joblib.dump(est, path)
    for mmap_mode in (None, "r"):   # "r": read-only memory-mapped coefficients
        loaded = joblib.load(path, mmap_mode=mmap_mode)
        np.testing.assert_array_equal(loaded.predict_proba(X_test), expected)
    # training continues after a round trip exactly as it would have without one
    again.partial_fit(X_train, y_train)
    est.partial_fit(X_train, y_train)
    _assert_same_model(est, again, rtol=0, atol=0)
    loaded = joblib.load(path, mmap_mode="r")
    loaded.partial_fit(X_train, y_train)


@pytest.mark.slow
def test_sklearns_own_mlp_test_suite(tmp_path):
    """scikit-learn's own test_mlp.py, run against our classes (one import changed).

    Deselected: test_gradient, which calls sklearn's private _loss_grad_lbfgs with its
    private buffers (test_gradient_matches_finite_differences covers our gradient).
    Warnings are errors except ConvergenceWarning (scikit-learn's own runs make
    errors of DeprecationWarning, FutureWarning and VisibleDeprecationWarning only:
    sklearn.utils._testing.turn_warnings_into_errors): whether
    L-BFGS on unscaled iris (test_warm_start, no max_iter) ends with an ABNORMAL line
    search depends on rounding, and the reference kernels' (FASTPROP_ISA=generic, no
    FMA) take it there where OpenBLAS's and the avx2 kernels' do not.
    """
    import sklearn
    source = Path(sklearn.__file__).parent / "neural_network" / "tests" / "test_mlp.py"
    if not source.exists():
        pytest.skip("scikit-learn's test files are not installed")
    text = source.read_text()
    original = "from sklearn.neural_network import MLPClassifier, MLPRegressor"
    if original not in text:
        pytest.skip("unexpected layout of scikit-learn's test_mlp.py")
    (tmp_path / "test_mlp_fastprop.py").write_text(
        text.replace(original, "from fastprop.sklearn import MLPClassifier, MLPRegressor"))
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture(params=[0, 42])\n"
        "def global_random_seed(request):\n    return request.param\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
         "-W", "ignore::sklearn.exceptions.ConvergenceWarning",
         "--deselect", "test_mlp_fastprop.py::test_gradient", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, env=_subprocess_env())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@no_convergence_warning
def test_long_double_input_predicts_in_float64():
    X_train, X_test, y_train, _ = DATA["iris"]
    ours = MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, random_state=0)
    ours.fit(X_train.astype(np.float32), y_train)
    proba = ours.predict_proba(X_test.astype(np.longdouble))
    assert proba.dtype == np.float64
    np.testing.assert_allclose(proba, ours.predict_proba(X_test), rtol=1e-12)


def test_continued_fit_refuses_x_that_overflows_the_network_dtype():
    """partial_fit / warm_start on a float32 network compute in float32: a float64 X
    that check_array passed but that overflows float32 is a ValueError, and the
    network is left as it was (it had become NaN)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    before = [w.copy() for w in clf.coefs_]
    X2 = X.astype(np.float64)
    X2[0, 0] = 1e39
    with pytest.raises(ValueError, match=r"too large for dtype\('float32'\)"):
        clf.partial_fit(X2, y)
    for w, b in zip(clf.coefs_, before):
        np.testing.assert_array_equal(w, b)
    # sample_weight likewise (scikit-learn keeps it in X's float64): 1e39 became inf
    # (a NaN network), 1e-50 became 0 ("weights sum to zero", n_iter_ reset)
    n_iter = clf.n_iter_
    for bad in (1e39, 1e-50):
        with pytest.raises(ValueError, match=r"sample_weight contains a value too large "
                                             r"or too small .* dtype\('float32'\)"):
            clf.partial_fit(X.astype(np.float64), y, sample_weight=np.full(64, bad))
        assert clf.n_iter_ == n_iter
        for w, b in zip(clf.coefs_, before):
            np.testing.assert_array_equal(w, b)
    clf.partial_fit(X.astype(np.float64), y, sample_weight=np.full(64, 1e30))  # (fits)


def test_invscaling_rate_underflowing_to_zero_trains_on():
    """sgd + momentum with an invscaling rate that underflows to 0: scikit-learn trains
    on (its velocity holds the rate); the momentum buffers' rescale divided by 0."""
    X, y = DATA["iris"][0], DATA["iris"][2]
    for rate in (1e-323, 1e-300):
        clf = MLPClassifier(hidden_layer_sizes=(4,), solver="sgd", momentum=0.9,
                            learning_rate="invscaling", learning_rate_init=rate,
                            max_iter=5, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X, y)
        assert clf.n_iter_ == 5
        assert all(np.isfinite(w).all() for w in clf.coefs_)
