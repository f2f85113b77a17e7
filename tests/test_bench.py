"""The benchmark harness itself: ``fastprop bench`` cases (fastprop._bench), the
benchmark suites' helpers and benchmarks/report.py.  Tiny sizes only: these check
that every case checks its result against an independent reference (and so rejects a
broken implementation), writes into preallocated outputs, limits NumPy's BLAS threads,
and that report.py pairs times of the same run."""

import importlib.util
import pathlib
import sys
import warnings

import numpy as np
import pytest

import fastprop as fp
from fastprop import _bench

NATIVE_BUILT = importlib.util.find_spec("fastprop._native") is not None
BENCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
FP_IMPLS = ["native", "numpy"] if NATIVE_BUILT else ["numpy"]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_benchmarks_{name}", BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():  # benchmarks/conftest.py registers the "full" mark
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report():
    return _load("report")


# ------------------------------------------------------------------ the cases run and check
@pytest.mark.parametrize("impl", FP_IMPLS + ["torch"])
def test_every_case_runs_and_passes_its_check(impl):
    if impl == "torch":
        pytest.importorskip("torch")
    for batch in (1, 5):
        assert np.isfinite(_bench.mlp_step_case(impl, batch)())
    _bench.adam_case(impl, 1000)()
    for name in ("sigmoid", "tanh", "gelu", "gelu_erf"):
        _bench.activation_case(impl, name, 1001)()
    _bench.softmax_xent_case(impl, 16, 40)()


@pytest.mark.parametrize("impl", FP_IMPLS)
def test_adam_case_rejects_an_adam_that_does_nothing(impl, monkeypatch):
    monkeypatch.setattr(fp.optim.Adam, "step", lambda self: None)
    with pytest.raises(AssertionError):
        _bench.adam_case(impl, 1000)


@pytest.mark.parametrize("impl", FP_IMPLS)
def test_adam_case_rejects_wrong_hyperparameters(impl, monkeypatch):
    init = fp.optim.Adam.__init__

    def wrong_betas(self, params, lr=1e-3, betas=(0.9, 0.999), **kw):
        init(self, params, lr=lr, betas=(0.5, 0.999), **kw)

    monkeypatch.setattr(fp.optim.Adam, "__init__", wrong_betas)
    with pytest.raises(AssertionError):
        _bench.adam_case(impl, 1000)


def test_adam_case_checks_torch_too(monkeypatch):
    torch = pytest.importorskip("torch")
    init = torch.optim.Adam.__init__

    def half_lr(self, params, lr=1e-3, **kw):
        init(self, params, lr=lr / 2, **kw)

    monkeypatch.setattr(torch.optim.Adam, "__init__", half_lr)
    with pytest.raises(AssertionError):
        _bench.adam_case("torch", 1000)


@pytest.mark.parametrize("impl", FP_IMPLS)
def test_mlp_step_case_compares_parameters_not_just_a_finite_loss(impl, monkeypatch):
    init = fp.optim.Adam.__init__

    def half_lr(self, params, lr=1e-3, **kw):
        init(self, params, lr=lr / 2, **kw)

    monkeypatch.setattr(fp.optim.Adam, "__init__", half_lr)
    with pytest.raises(AssertionError, match="parameter"):
        _bench.mlp_step_case(impl, 4)


def test_mlp_step_check_rejects_a_wrong_loss_or_a_skipped_update():
    x, y = _bench._mlp_data(3)
    p0 = _bench._mlp_init()
    ref = _bench.reference_mlp_step(p0, x, y)
    assert np.isfinite(ref[0])
    # a wrong loss and a skipped update are both rejected by the check itself
    with pytest.raises(AssertionError, match="loss"):
        _bench.check_mlp_step("x", ref[0] * 1.01, ref[1], ref)
    with pytest.raises(AssertionError, match="parameter"):
        _bench.check_mlp_step("x", ref[0], p0, ref)
    _bench.check_mlp_step("x", ref[0], [p.astype(np.float32) for p in ref[1]], ref)


@pytest.mark.parametrize("impl", FP_IMPLS)
def test_softmax_xent_case_is_checked_against_a_formula_not_the_numpy_backend(impl,
                                                                               monkeypatch):
    real = fp.ops.softmax_cross_entropy

    def off(logits, labels):
        loss, grad = real(logits, labels)
        return loss, grad * 1.01

    monkeypatch.setattr(fp.ops, "softmax_cross_entropy", off)
    with pytest.raises(AssertionError):
        _bench.softmax_xent_case(impl, 16, 5)


@pytest.mark.parametrize("impl", FP_IMPLS)
def test_activation_case_is_checked_against_float64(impl, monkeypatch):
    if impl == "numpy":  # the NumPy baseline: ufuncs, not a fastprop backend
        real = _bench.numpy_activation_out("gelu")
        monkeypatch.setattr(_bench, "numpy_activation_out", lambda name: lambda x, out: real(
            x * np.float32(1.001), out))
    else:
        real = fp.ops.activation
        monkeypatch.setattr(fp.ops, "activation",
                            lambda name, x, out=None: real(name, x * np.float32(1.001), out=out))
    with pytest.raises(AssertionError):
        _bench.activation_case(impl, "gelu", 1000)


# ------------------------------------------------------------------ like-for-like outputs
@pytest.mark.parametrize("name", ["sigmoid", "tanh", "gelu", "gelu_erf"])
def test_numpy_activation_writes_into_its_preallocated_output(name):
    if name == "gelu_erf":
        pytest.importorskip("scipy")
    run = _bench.activation_case("numpy", name, 1000)
    first = run()
    assert run() is first
    x = (np.random.default_rng(0).standard_normal(1000) * 3).astype(np.float32)
    np.testing.assert_allclose(first, _bench._reference_activation(name, x), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "gelu", "gelu_erf"])
def test_torch_activation_writes_into_its_preallocated_output(name):
    torch = pytest.importorskip("torch")
    run = _bench.activation_case("torch", name, 1000)
    if name.startswith("gelu") and not hasattr(getattr(torch._C, "_nn", None), "gelu"):
        pytest.skip("this torch has no out= gelu")
    assert run().data_ptr() == run().data_ptr()


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("impl", FP_IMPLS)
def test_dense_case_numpy_side_writes_into_preallocated_outputs(impl, backward):
    gemm = _load("bench_gemm")
    run = gemm._dense_case(impl, 3, backward)
    assert run() is run()


# ------------------------------------------------------------------ threads
@pytest.mark.parametrize("torch", [False, True])
def test_limit_threads_limits_numpys_blas(torch):
    """... and fastprop's (and PyTorch's); the limiter restores them (fastprop's was
    left at 1: every test module after this one ran on one thread; with PyTorch, whose
    libgomp is fastprop's, its count was read after fastprop's was set)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if torch:
        torch_module = pytest.importorskip("torch")
        torch_before = torch_module.get_num_threads()
    before = fp.get_num_threads()
    fp.set_num_threads(3)
    blas_before = [d["num_threads"] for d in threadpoolctl.threadpool_info()
                   if d["user_api"] == "blas"]
    limiter, note = _bench.limit_threads(1, torch=torch)
    try:
        assert note is None
        blas = [d for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
        assert blas and all(d["num_threads"] == 1 for d in blas)
        assert fp.get_num_threads() == 1 or not fp.backends.load("native")._native.openmp()
    finally:
        limiter.restore_original_limits()
        restored = fp.get_num_threads()
        if torch:
            torch_module.set_num_threads(torch_before)
        fp.set_num_threads(before)
    assert restored == 3 or restored == 1 and not fp.backends.load("native")._native.openmp()
    assert [d["num_threads"] for d in threadpoolctl.threadpool_info()
            if d["user_api"] == "blas"] == blas_before


def test_limit_threads_says_when_numpys_blas_is_not_controlled(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    threads = fp.get_num_threads()
    try:
        limiter, note = _bench.limit_threads(1, torch=False)
        limiter.restore_original_limits()
        assert fp.get_num_threads() == threads
    finally:
        fp.set_num_threads(threads)
    assert "not controlled" in note


def _run_bench_main():
    """``fastprop bench`` at 2 threads, fastprop's and PyTorch's counts restored."""
    threads = fp.get_num_threads()
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        assert _bench.main(threads=2) == 0
    finally:
        fp.set_num_threads(threads)
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)


def test_fastprop_bench_prints_the_thread_counts(monkeypatch, capsys):
    monkeypatch.setattr(_bench, "cases", lambda quick=True: iter(
        [("softmax xent 4x5", lambda impl: _bench.softmax_xent_case(impl, 4, 5))]))
    monkeypatch.setattr(_bench, "_median_time", lambda fn, min_time, repeats: 1e-3)
    monkeypatch.setattr(_bench.time, "sleep", lambda s: None)
    _run_bench_main()
    out = capsys.readouterr().out
    assert "NumPy's BLAS" in out and "single-threaded" in out


def test_fastprop_bench_times_a_case_only_after_its_check_let_blas_go_idle(monkeypatch):
    """Each case's check against a float64 NumPy reference wakes OpenBLAS's workers,
    which then busy-wait ~0.1 s: `fastprop bench` sleeps between building a case and
    timing it (it slept before building it: the first samples ran 25% slower)."""
    events = []

    def make(impl):
        events.append("make")
        return lambda: None

    monkeypatch.setattr(_bench, "cases", lambda quick=True: iter([("x", make), ("y", make)]))
    monkeypatch.setattr(_bench, "_median_time",
                        lambda fn, min_time, repeats: events.append("time") or 1e-3)
    monkeypatch.setattr(_bench.time, "sleep", lambda s: events.append(f"sleep {s}"))
    _run_bench_main()
    timed = [i for i, e in enumerate(events) if e == "time"]
    assert len(timed) >= 4  # (2 cases x native, numpy at least)
    for i in timed:
        assert events[i - 2:i] == ["make", "sleep 0.3"], events


def test_benchmarks_fixture_sleeps_after_the_case_is_built(monkeypatch):
    """benchmarks/conftest.py's ``benchmark`` is pytest-benchmark's, whose calls sleep
    first (the case, built before the call, has just woken NumPy's BLAS workers)."""
    pytest.importorskip("pytest_benchmark")
    import importlib.util
    import pathlib
    from pytest_benchmark.fixture import BenchmarkFixture
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_bench_conftest", path)
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    events = []
    monkeypatch.setattr(conftest.time, "sleep", lambda s: events.append(f"sleep {s}"))
    monkeypatch.setattr(BenchmarkFixture, "__call__",
                        lambda self, fn, *a, **k: events.append("timed") or fn())
    monkeypatch.setattr(BenchmarkFixture, "pedantic",
                        lambda self, fn, *a, **k: events.append("pedantic") or fn())
    for name in ("__call__", "pedantic"):
        fixture = BenchmarkFixture.__new__(BenchmarkFixture)
        fixture = getattr(conftest.benchmark, "__wrapped__", conftest.benchmark)(fixture)
        assert isinstance(fixture, BenchmarkFixture)
        assert (fixture(lambda: 5) if name == "__call__"
                else fixture.pedantic(lambda: 5, rounds=1, iterations=1)) == 5
    assert events == ["sleep 0.3", "timed", "sleep 0.3", "pedantic"]


# ------------------------------------------------------------------ report.py
def _b(group, impl, median):
    return {"group": group, "name": f"test_x[{impl}]", "params": {"impl": impl},
            "stats": {"median": median}}


def _ratio_cells(report, runs, baselines):
    line = report.table(runs, baselines, False).splitlines()[-1]
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_pairs_times_of_the_same_run_only(report):
    runs = [{"benchmarks": [_b("h", "native", 1.0), _b("h", "numpy", 1.0)]},
            {"benchmarks": [_b("h", "numpy", 10.0)]},
            {"benchmarks": [_b("h", "native", 2.0)]}]
    cells = _ratio_cells(report, runs, ["numpy"])
    assert cells[-1] == "1.00x"  # run 1 is the only run with both (it said 3.00x)


def test_report_keeps_ratios_when_an_implementation_misses_a_run(report):
    runs = [{"benchmarks": [_b("g", "native", 1.0), _b("g", "numpy", 3.0), _b("g", "torch", 2.0)]},
            {"benchmarks": [_b("g", "native", 2.0), _b("g", "numpy", 2.0), _b("g", "torch", 8.0)]},
            {"benchmarks": [_b("g", "native", 1.5), _b("g", "numpy", 6.0)]}]
    cells = _ratio_cells(report, runs, ["numpy", "torch"])
    head = [c.strip() for c in report.table(runs, ["numpy", "torch"], False)
            .splitlines()[0].strip("|").split("|")]
    got = dict(zip(head, cells))
    assert got["native/numpy speed"] == "3.00x [1.00-4.00]"
    assert got["native/torch speed"] == "3.00x [2.00-4.00]"  # runs 1 and 2 (was blank)
    assert got["native median"] == "1.50 s"


def test_report_ratio_is_baseline_time_over_impl_time(report):
    runs = [{"benchmarks": [_b("g", "native", 1.0), _b("g", "numpy", 4.0)]}]
    assert _ratio_cells(report, runs, ["numpy"])[-1] == "4.00x"


# ------------------------------------------------------------------ bench_cuda.py
def test_bench_cuda_imports_and_its_ratio_means_the_row_is_faster(capsys):
    cuda = _load("bench_cuda")
    rows = [{"bench": "gemm_f32", "n": 8, "impl": "fastprop cuda", "seconds": 2.0, "gflops": 1.0},
            {"bench": "gemm_f32", "n": 8, "impl": "torch (cuBLAS)", "seconds": 1.0,
             "gflops": 2.0}]
    cuda._summary(rows)
    out = capsys.readouterr().out
    assert "<row>/fastprop cuda speed" in out
    assert out.strip().splitlines()[-1].endswith("| 2.00x |")  # torch twice as fast


def test_bench_cuda_gemm_check_rejects_a_wrong_product():
    cuda = _load("bench_cuda")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 16), dtype=np.float32)
    b = rng.standard_normal((16, 16), dtype=np.float32)
    good = (a.astype(np.float64) @ b)[:8].astype(np.float32)
    cuda._check_gemm("x", 16, cuda._gemm_err(a, b, good))
    with pytest.raises(AssertionError, match="relative error"):
        cuda._check_gemm("x", 16, cuda._gemm_err(a, b, good * np.float32(1.001)))
