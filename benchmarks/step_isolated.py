"""The MLP training step, one implementation per process (no other library's idle
threads around), median of 9 timings of N steps at each batch size.

    python benchmarks/step_isolated.py native|numpy|torch [threads]
"""

import sys
import time

import numpy as np

import fastprop as fp
from fastprop import _bench


def main(impl, threads=2):
    fp.set_num_threads(threads)
    if impl == "torch":
        import torch
        torch.set_num_threads(threads)
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


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
