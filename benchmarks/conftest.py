"""Shared set-up for the benchmark suites.

Every suite compares implementations of the same operation in the same run: fastprop
native, fastprop's numpy backend (or a plain NumPy expression) and PyTorch when it is
installed.  All sides use 2 threads (fastprop OpenMP, OpenBLAS, torch intra-op).
Benchmarks are grouped per operation and shape, so ``benchmarks/report.py`` can turn
the medians into ratios.

Profiles: the default is the quick one (few sizes); ``--bench-full`` runs every size.
"""

import os
import time

import pytest

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
    import fastprop as fp
    fp.set_num_threads(THREADS)
    try:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(THREADS, user_api="blas")
    except ImportError:  # pragma: no cover
        limiter = None
    try:
        import torch
        torch.set_num_threads(THREADS)
    except ImportError:
        pass
    yield
    if limiter is not None:
        limiter.restore_original_limits()


@pytest.fixture(autouse=True)
def _quiet_start():
    """Let the previous benchmark's idle threads go to sleep before this one starts:
    OpenBLAS workers busy-wait ~0.1 s after a call and OpenMP workers spin too, and on
    2 cores that steals half the machine from whatever is measured next."""
    time.sleep(0.3)
    yield


def torch_or_skip():
    return pytest.importorskip("torch")
