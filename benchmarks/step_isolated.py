"""The MLP training step, one implementation per process (no other library's idle
threads around), median of 9 timings of N steps at each batch size.

    python benchmarks/step_isolated.py native|numpy|torch [threads]

``threads`` (default 2) is given to fastprop's OpenMP, to NumPy's BLAS (through
threadpoolctl, an optional dependency: without it the NumPy side's BLAS thread count
is not controlled, and this says so) and, for ``torch``, to PyTorch.  NumPy's
elementwise ufuncs (the numpy backend's non-GEMM work) are single-threaded whatever
the count.  Each batch size's step is checked against a float64 reference before it is
timed (``fastprop._bench.mlp_step_case``).
"""

import sys
import time

import numpy as np

from fastprop import _bench


def main(impl, threads=2):
    limiter, note = _bench.limit_threads(threads, torch=impl == "torch")
    if note:
        print(f"note: {note}", flush=True)
    try:
        for batch in (1, 32, 128, 512, 2048):
            run = _bench.mlp_step_case(impl, batch)
            reps = max(3, 4000 // batch)
            times = []
            for _ in range(9):
                t0 = time.perf_counter()
                for _ in range(reps):
                    run()
                times.append((time.perf_counter() - t0) / reps)
            print(f"{impl} threads={threads} batch={batch}: {np.median(times) * 1e6:.1f} us",
                  flush=True)
    finally:
        limiter.restore_original_limits()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
