"""Whole training steps, optimizer updates, activations and losses.

fastprop native vs fastprop's numpy backend (for activations: NumPy's ufuncs) vs
PyTorch CPU eager (when installed), in the same run.  The cases live in
``fastprop._bench`` (shared with ``fastprop bench``); each checks its result once
against an independent float64 NumPy reference before it is timed, and every side
writes into preallocated outputs where its API allows.

Threads: fastprop's OpenMP, OpenBLAS and torch get 2 (benchmarks/conftest.py).  NumPy's
elementwise ufuncs are single-threaded, so the NumPy side of the Adam, activation and
softmax cross-entropy groups runs on 1 thread (as do the non-GEMM parts of the numpy
backend's MLP step): their native/numpy ratios compare 2 threads with 1.

Run: ``python -m pytest benchmarks/bench_step.py --benchmark-only``
(``--bench-full`` adds batch 512; ``python benchmarks/report.py out.json`` makes the table).
"""

import pytest

from fastprop import _bench

IMPLS = ["native", "numpy", "torch"]


def _case(make, *args):
    try:
        return make(*args)
    except _bench.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("batch", [1, 32, 128, pytest.param(512, marks=pytest.mark.full), 2048])
@pytest.mark.parametrize("impl", IMPLS + ["jax"])
def test_mlp_step(benchmark, impl, batch):
    """MLP 784-256-128-10, ReLU, softmax cross-entropy, Adam, float32: one step, over
    16 distinct batches in turn (JAX: jit + optax, when installed; XLA may use more
    threads than asked)."""
    benchmark.group = f"mlp_step 784-256-128-10 batch={batch}"
    benchmark(_case(_bench.mlp_step_case, impl, batch))


@pytest.mark.parametrize("n", [235_146, 4_000_000])
@pytest.mark.parametrize("impl", IMPLS)
def test_adam_update(benchmark, impl, n):
    benchmark.group = f"adam_update n={n}"
    benchmark(_case(_bench.adam_case, impl, n))


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "gelu", "gelu_erf"])
@pytest.mark.parametrize("impl", IMPLS)
def test_activation_forward(benchmark, impl, name):
    benchmark.group = f"activation {name} n=4M"
    benchmark(_case(_bench.activation_case, impl, name, 4_000_000))


@pytest.mark.parametrize("shape", [(128, 10), (512, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", IMPLS)
def test_softmax_xent(benchmark, impl, shape):
    """Softmax cross-entropy forward + backward (loss and grad_logits)."""
    benchmark.group = f"softmax_xent {shape[0]}x{shape[1]}"
    benchmark(_case(_bench.softmax_xent_case, impl, *shape))


@pytest.mark.parametrize("impl", IMPLS)
def test_bce_logits(benchmark, impl):
    """Binary cross-entropy from logits, forward + backward, 512 x 1000 (multilabel)."""
    benchmark.group = "bce_logits 512x1000"
    benchmark(_case(_bench.bce_logits_case, impl, 512, 1000))
