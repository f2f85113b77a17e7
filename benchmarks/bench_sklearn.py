"""fit time of fastprop.sklearn.MLPClassifier vs sklearn.neural_network.MLPClassifier.

Cases (the same hyperparameters and random_state on both sides, so both train the
same network on the same batches; each fit's held-out accuracy is reported next to
its time, to show the speed is not bought with accuracy):

* digits: 1,347 x 64 training rows (features / 16), hidden_layer_sizes=(256, 128),
  adam, max_iter=50;
* synthetic: make_classification, 50,000 x 100 training rows, 10 classes,
  hidden_layer_sizes=(256, 128), adam, max_iter=10.

Each case runs with the data in float64 (what load_digits / make_classification
return; both estimators then compute in float64) and in float32 (both compute in
float32).  Implementations: scikit-learn, fastprop on the native backend, fastprop on
the numpy backend; rounds alternate between them, each fit after a rest of PAUSE
seconds (--pause; the previous fit's threads stop spinning), the table reports medians.  Every
thread pool gets 2 threads (OpenBLAS through threadpoolctl, fastprop's OpenMP);
--threads changes that.  NumPy's elementwise ufuncs are single-threaded, so
scikit-learn's and the numpy backend's non-GEMM work runs on 1 thread.  The table
gives medians and best (minimum) times: on a shared machine the best time is the one
least disturbed by other processes.

Run as a script with fastprop installed (prints a Markdown table for
benchmarks/RESULTS.md)::

    python benchmarks/bench_sklearn.py            # 3 rounds
    python benchmarks/bench_sklearn.py --rounds 1 --cases digits

or with pytest-benchmark (one round per implementation and case; ratios with
``python benchmarks/report.py out.json --baseline sklearn``)::

    python -m pytest benchmarks/bench_sklearn.py --benchmark-only --benchmark-json=out.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import numpy as np

THREADS = 2
# Seconds of rest before each timed fit.  A library's worker threads keep spinning
# after its last call: OpenBLAS's for ~0.1 s after a product (scikit-learn's fit and
# score), GNU OpenMP's for a few ms.  Run back to back, a fit shares the 2 cores with
# the previous fit's spinning threads: measured on the digits case (2 vCPUs, 5
# interleaved rounds), fastprop's float32 fit took 220 ms right after scikit-learn's
# and 170 ms after a 0.5 s rest (scikit-learn 488 / 507 ms).  Every implementation
# gets the same rest.
PAUSE = 0.5
IMPLS = ("sklearn", "fastprop-native", "fastprop-numpy")


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, random_state=0)


def _synthetic():
    from sklearn.datasets import make_classification
    X, y = make_classification(n_samples=60_000, n_features=100, n_informative=50,
                               n_classes=10, random_state=0)
    return X[:50_000], X[50_000:], y[:50_000], y[50_000:]


CASES = {
    "digits": (_digits, dict(hidden_layer_sizes=(256, 128), solver="adam", max_iter=50)),
    "synthetic": (_synthetic, dict(hidden_layer_sizes=(256, 128), solver="adam", max_iter=10)),
}


def _estimator(impl, params):
    if impl == "sklearn":
        from sklearn.neural_network import MLPClassifier
    else:
        from fastprop.sklearn import MLPClassifier
    return MLPClassifier(random_state=0, **params)


def fit_once(impl, case, dtype, data=None, pause=PAUSE):
    """Fit one estimator, after `pause` seconds of rest; returns (seconds, held-out
    accuracy, n_iter_)."""
    import fastprop as fp
    from sklearn.exceptions import ConvergenceWarning
    make_data, params = CASES[case]
    X_train, X_test, y_train, y_test = data if data is not None else make_data()
    X_train, X_test = X_train.astype(dtype), X_test.astype(dtype)
    est = _estimator(impl, params)
    backend = impl.split("-")[1] if impl.startswith("fastprop") else fp.get_backend()
    with fp.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)   # max_iter ends both runs
        time.sleep(pause)
        start = time.perf_counter()
        est.fit(X_train, y_train)
        seconds = time.perf_counter() - start
    return seconds, est.score(X_test, y_test), est.n_iter_


def _limit_threads(threads=THREADS):
    import fastprop as fp
    from threadpoolctl import threadpool_limits
    try:
        fp.backends.load("native").set_num_threads(threads)
    except fp.BackendUnavailableError:
        pass
    return threadpool_limits(threads, user_api="blas")


def _available(impl, say=False):
    import fastprop as fp
    if impl == "fastprop-native":
        try:
            fp.backends.load("native")
        except Exception as exc:  # not built, or (editable install) a rebuild that failed
            if say:
                print(f"fastprop-native left out: {exc}", file=sys.stderr)
            return False
    return True


def run(cases, dtypes, impls, rounds, pause=PAUSE):
    """{(case, dtype, impl): [(seconds, accuracy, n_iter), ...]} with rounds
    interleaved across implementations."""
    results = {}
    for case in cases:
        data = CASES[case][0]()
        for dtype in dtypes:
            for _ in range(rounds):
                for impl in impls:
                    r = fit_once(impl, case, dtype, data, pause)
                    results.setdefault((case, np.dtype(dtype).name, impl), []).append(r)
                    print(f"  {case:9s} {np.dtype(dtype).name:7s} {impl:15s} "
                          f"{r[0]:8.3f} s  accuracy {r[1]:.4f}  n_iter {r[2]}", flush=True)
    return results


def table(results):
    """Markdown table: median and best (min) fit time per implementation, speedups
    against scikit-learn's median / best in the same run, median test accuracy."""
    lines = ["| case | dtype | implementation | fit median | fit best | speedup (median) "
             "| speedup (best) | test accuracy |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for (case, dtype, impl), runs in results.items():
        times = [r[0] for r in runs]
        base = results.get((case, dtype, "sklearn"))
        base_times = [r[0] for r in base] if base else [float("nan")]
        med, best = statistics.median(times), min(times)
        acc = statistics.median(r[1] for r in runs)
        lines.append(f"| {case} | {dtype} | {impl} | {med:.3f} s | {best:.3f} s "
                     f"| {statistics.median(base_times) / med:.2f}x "
                     f"| {min(base_times) / best:.2f}x | {acc:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--pause", type=float, default=PAUSE)
    args = parser.parse_args(argv)
    impls = [i for i in args.impls if _available(i, say=True)]
    limiter = _limit_threads(args.threads)
    try:
        results = run(args.cases, args.dtypes, impls, args.rounds, args.pause)
    finally:
        limiter.restore_original_limits()
    print()
    print(table(results))


# ------------------------------------------------------------------ pytest-benchmark
try:
    import pytest
except ImportError:  # pragma: no cover - script use without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("dtype", ["float64", "float32"])
    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("case", list(CASES))
    def test_fit(benchmark, case, impl, dtype):
        pytest.importorskip("sklearn")
        if not _available(impl):
            pytest.skip(f"{impl} is not available")
        benchmark.group = f"MLPClassifier.fit {case} {dtype}"
        data = CASES[case][0]()
        accuracy = []

        def fit():
            accuracy.append(fit_once(impl, case, dtype, data, pause=0.0)[1])

        benchmark.pedantic(fit, setup=lambda: time.sleep(PAUSE), rounds=1, iterations=1)
        benchmark.extra_info["accuracy"] = accuracy[-1]


if __name__ == "__main__":
    main()
