"""Shared set-up for the benchmark suites.

Every suite compares implementations of the same operation in the same run: fastprop
native, fastprop's numpy backend (or NumPy's own functions) and PyTorch when it is
installed.  Every thread pool gets 2 threads (fastprop OpenMP, OpenBLAS through
threadpoolctl, torch intra-op; ``FASTPROP_BENCH_THREADS`` changes the count).  NumPy's
elementwise ufuncs are single-threaded whatever the count, so where a NumPy side is
elementwise (Adam, activations, softmax cross-entropy, the non-GEMM parts of the numpy
backend and of the NumPy dense composition) it runs on 1 thread.
Benchmarks are grouped per operation and shape, so ``benchmarks/report.py`` can turn
the medians into ratios.

Profiles: the default is the quick one (few sizes); ``--bench-full`` runs every size.
"""

import os
import time
import warnings

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

THREADS = int(os.environ.get("FASTPROP_BENCH_THREADS", "2"))


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", help="run the full benchmark profile")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: only in the full profile (--bench-full)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench-full"):
        return
    skip = pytest.mark.skip(reason="full profile only (--bench-full)")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    from fastprop import _bench
    limiter, note = _bench.limit_threads(THREADS)
    if note:  # threadpoolctl missing: say so rather than claim a thread count
        warnings.warn(note, stacklevel=1)
    yield
    limiter.restore_original_limits()


class _Settled(BenchmarkFixture):
    """pytest-benchmark's fixture, which first lets idle threads go to sleep (its
    plugin accepts only its own class: the fixture object is given this subclass)."""

    def __call__(self, function_to_benchmark, *args, **kwargs):
        time.sleep(0.3)
        return super().__call__(function_to_benchmark, *args, **kwargs)

    def pedantic(self, target, *args, **kwargs):
        time.sleep(0.3)
        return super().pedantic(target, *args, **kwargs)


@pytest.fixture
def benchmark(benchmark):
    """pytest-benchmark's ``benchmark``, timing only after idle threads went to sleep:
    OpenBLAS workers busy-wait ~0.1 s after a call and OpenMP workers spin too, and on
    2 cores that steals half the machine from whatever is measured next, and makes
    fastprop's kernels give up threads for as long (the back-off).  The sleep comes
    after the test built its case, whose check against a float64 NumPy reference
    wakes those workers (sleeping before the test, as this file did, let the first
    ~50 calls of the native dense case at batch 32 run 25% slower)."""
    if type(benchmark) is BenchmarkFixture:
        benchmark.__class__ = _Settled
    return benchmark


def _loadavg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """The load when the run started (and, in the terminal summary, when it ended): on
    a machine other processes keep busy, fastprop gives up threads (the back-off) while
    OpenBLAS and PyTorch keep theirs spinning, and 2-thread ratios mean little."""
    machine_info["loadavg_1min_at_start"] = _loadavg()
    machine_info["cpu_count"] = os.cpu_count()


def pytest_terminal_summary(terminalreporter):
    load = _loadavg()
    if load is not None:
        busy = float(load) > 0.5 * (os.cpu_count() or 1)
        terminalreporter.write_line(
            f"load average (1 min) at the end: {load} on {os.cpu_count()} CPUs"
            + (" -- a busy machine: multi-threaded ratios are unreliable" if busy else ""))


def torch_or_skip():
    return pytest.importorskip("torch")
