"""The cuda backend on a real GPU: GEMM GFLOP/s and whole MLP training steps.

Measures, in one run that fits in 5 minutes:

* GEMM float32, n x n x n at n = 1024, 4096, 8192: fastprop's tiled Numba kernel on
  device arrays, vs cuBLAS through CuPy and/or PyTorch when importable (TF32 off, so
  both sides do IEEE float32 FMAs);
* one MLP training step (softmax cross-entropy, Adam, float32, batch 4096) for
  784-256-128-10 and 4096-4096-4096-10: fastprop with ``model.to("cuda")`` (the
  device-resident step: batch in, loss and output out) vs the native CPU backend (the
  numpy backend when native is not built) and vs PyTorch CUDA when importable.

Run: ``python benchmarks/bench_cuda.py`` (``--quick`` for fewer repeats, ``--json
out.json`` to keep the numbers).  Without numba-cuda or without a GPU it prints why
and exits with status 0.

``python benchmarks/bench_cuda.py --compile-only [--cc 9.0]`` needs no GPU (numba-cuda
and the NVVM/NVRTC wheels only): it compiles every kernel to PTX for that compute
capability and prints, per kernel, local-memory instructions and float64 instructions
in float32 kernels (and registers/spills when ``ptxas`` is on PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

GEMM_SIZES = (1024, 4096, 8192)
MLPS = {"784-256-128-10": (784, 256, 128, 10), "4096-4096-4096-10": (4096, 4096, 4096, 10)}
BATCH = 4096


def _best(fn, repeats, sync):
    """Best wall time of ``fn`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------ GEMM
def bench_gemm(repeats, rows):
    from numba import cuda

    from fastprop.backends import cuda_kernels as K
    rng = np.random.default_rng(0)
    for n in GEMM_SIZES:
        flop = 2.0 * n ** 3
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        da, db = cuda.to_device(a), cuda.to_device(b)
        dc = cuda.device_array((n, n), np.float32)
        reps = max(1, repeats if n < 8192 else repeats // 2)
        t = _best(lambda: K.gemm(da, db, dc), reps, cuda.synchronize)
        # check a few rows against NumPy (the whole product would take seconds on the CPU)
        want = a[:8].astype(np.float64) @ b
        got = dc[:8].copy_to_host()
        err = float(np.max(np.abs(got - want) / (np.abs(a[:8]) @ np.abs(b) + 1e-30)))
        tiles = K.choose_tiles(np.dtype(np.float32), n, n)
        rows.append({"bench": "gemm_f32", "n": n, "impl": "fastprop cuda", "seconds": t,
                     "gflops": flop / t / 1e9, "rel_err": err, "tiles": tuple(tiles)})
        del da, db, dc
        for impl, fn in _cublas_gemms(a, b):
            t = _best(fn[0], reps, fn[1])
            rows.append({"bench": "gemm_f32", "n": n, "impl": impl, "seconds": t,
                         "gflops": flop / t / 1e9})
        _report_last(rows)


def _cublas_gemms(a, b):
    """(name, (call, sync)) for every importable cuBLAS front end."""
    out = []
    try:
        import cupy as cp
        ca, cb = cp.asarray(a), cp.asarray(b)
        cc = cp.empty_like(ca)
        out.append(("cupy (cuBLAS)", (lambda: cp.matmul(ca, cb, out=cc),
                                      cp.cuda.Device().synchronize)))
    except Exception:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False
            ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
            tc = torch.empty_like(ta)
            out.append(("torch (cuBLAS)", (lambda: torch.mm(ta, tb, out=tc),
                                           torch.cuda.synchronize)))
    except Exception:
        pass
    return out


# ------------------------------------------------------------------ MLP steps
def _model(sizes, seed=0):
    import fastprop as fp
    layers = []
    for k, (i, o) in enumerate(zip(sizes, sizes[1:])):
        act = "relu" if k < len(sizes) - 2 else None
        layers.append(fp.nn.Dense(i, o, act, dtype=np.float32, rng=seed + k))
    return fp.nn.Sequential(*layers)


def bench_mlp(repeats, rows, cpu_backend):
    import fastprop as fp
    rng = np.random.default_rng(1)
    for name, sizes in MLPS.items():
        X = rng.standard_normal((BATCH, sizes[0]), dtype=np.float32)
        y = rng.integers(0, sizes[-1], BATCH)
        flop = 6.0 * BATCH * sum(i * o for i, o in zip(sizes, sizes[1:]))  # fwd + 2x bwd

        model = _model(sizes).to("cuda")
        step = model.compile("cross_entropy", fp.optim.Adam(model.parameters(), lr=1e-3))
        losses = [step(X, y) for _ in range(2)]           # compiles the kernels
        assert step._fast is not None and np.isfinite(losses).all()
        t = _best(lambda: step(X, y), repeats, lambda: None)  # a step ends with a copy out
        step.sync()
        rows.append({"bench": "mlp_step", "mlp": name, "impl": "fastprop cuda", "seconds": t,
                     "gflops": flop / t / 1e9, "samples_per_s": BATCH / t})

        cpu = _model(sizes)
        with fp.use_backend(cpu_backend):
            cstep = cpu.compile("cross_entropy", fp.optim.Adam(cpu.parameters(), lr=1e-3))
            reps = 1 if sizes[1] >= 4096 else max(2, repeats // 2)
            t = _best(lambda: cstep(X, y), reps, lambda: None)
        rows.append({"bench": "mlp_step", "mlp": name, "impl": f"fastprop {cpu_backend} (CPU)",
                     "seconds": t, "gflops": flop / t / 1e9, "samples_per_s": BATCH / t})

        torch_step = _torch_step(sizes, X, y)
        if torch_step is not None:
            t = _best(torch_step[0], repeats, torch_step[1])
            rows.append({"bench": "mlp_step", "mlp": name, "impl": "torch cuda (eager)",
                         "seconds": t, "gflops": flop / t / 1e9, "samples_per_s": BATCH / t})
        _report_last(rows)


def _torch_step(sizes, X, y):
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except Exception:
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    layers = []
    for k, (i, o) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(i, o))
        if k < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lossf = torch.nn.CrossEntropyLoss()

    def step():  # the same transfers as fastprop's step: batch in, loss out
        xb = torch.from_numpy(X).cuda()
        yb = torch.from_numpy(y).cuda()
        opt.zero_grad()
        loss = lossf(model(xb), yb)
        loss.backward()
        opt.step()
        return loss.item()

    return step, torch.cuda.synchronize


# ------------------------------------------------------------------ reporting
_printed = 0


def _report_last(rows):
    global _printed
    for r in rows[_printed:]:
        what = f"n={r['n']}" if r["bench"] == "gemm_f32" else r["mlp"]
        extra = f"  rel_err={r['rel_err']:.1e}" if "rel_err" in r else ""
        print(f"{r['bench']:9s} {what:18s} {r['impl']:24s} {r['seconds'] * 1e3:10.2f} ms "
              f"{r['gflops']:10.1f} GFLOP/s{extra}", flush=True)
    _printed = len(rows)


def _summary(rows):
    print("\n| benchmark | size | implementation | time (ms) | GFLOP/s | vs fastprop cuda |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        key = ("n", r["n"]) if r["bench"] == "gemm_f32" else ("mlp", r["mlp"])
        ours = next(q for q in rows if q["bench"] == r["bench"] and q.get(key[0]) == key[1]
                    and q["impl"] == "fastprop cuda")
        ratio = ours["gflops"] / r["gflops"]
        print(f"| {r['bench']} | {key[1]} | {r['impl']} | {r['seconds'] * 1e3:.2f} | "
              f"{r['gflops']:.1f} | {ratio:.2f}x |")


# ------------------------------------------------------------------ compile-only check
def compile_only(cc):
    """Compile every kernel to PTX for ``cc`` without a GPU; report what matters."""
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    from numba import cuda, types
    from numba.cuda import boolean, float32, float64, int64
    import numba.cuda.dispatcher as dispatcher

    class _Target:  # device functions compile for "the current device": make it cc
        compute_capability = cc

    dispatcher.get_current_device = lambda: _Target()
    from fastprop.backends import cuda_kernels as K

    ptxas = shutil.which("ptxas")
    arr = lambda t, nd: types.Array(t, nd, "C")  # noqa: E731
    none, ok = types.none, True
    tmp = tempfile.mkdtemp()

    def check(name, kernel, sig, f32):
        nonlocal ok
        try:
            bounds = getattr(kernel, "targetoptions", {}).get("launch_bounds")
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc, launch_bounds=bounds)
        except Exception as exc:
            ok = False
            print(f"{name:44s} FAILED: {str(exc).splitlines()[0][:200]}")
            return
        local = len(re.findall(r"\b(?:ld|st)\.local", ptx))
        f64 = len(re.findall(r"\.f64\b", ptx)) if f32 else 0
        regs = ""
        if ptxas:
            path = os.path.join(tmp, name + ".ptx")
            with open(path, "w") as fh:
                fh.write(ptx)
            res = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", path, "-o",
                                  os.devnull], capture_output=True, text=True)
            m = re.search(r"Used (\d+) registers", res.stderr)
            s = re.search(r"(\d+) bytes spill stores", res.stderr)
            regs = (f" registers={m.group(1)} spill_stores={s.group(1)}" if m and s
                    else f" ptxas: {res.stderr.strip()[:120]}")
        print(f"{name:44s} ok local_insts={local} f64_insts={f64}{regs}")

    for dt, nb in ((np.dtype(np.float32), float32), (np.dtype(np.float64), float64)):
        f32 = dt == np.float32
        a1, a2, f1 = arr(nb, 1), arr(nb, 2), arr(float64, 1)
        for t in sorted({K.GEOMETRY.large[dt], K.GEOMETRY.small[dt], K.GEOMETRY.narrow}):
            for ta in (False, True):
                for tb in (False, True):
                    check(f"gemm_{dt.name}_{t.bm}x{t.bn}x{t.bk}_{t.tm}x{t.tn}_"
                          f"{'NT'[ta]}{'NT'[tb]}", K.gemm_kernel(dt, t, ta, tb),
                          (a2, a2, a2, none, none, int64, nb, boolean), f32)
            check(f"gemm_{dt.name}_{t.bm}x{t.bn}_epilogue", K.gemm_kernel(dt, t, False, False),
                  (a2, a2, a2, a1, a2, int64, nb, boolean), f32)
        k, r = K.kernels(dt), K.reductions(dt)
        sigs = {
            "act_forward": (int64, nb, a1, a1), "act_backward": (int64, nb, a1, a1, a1, a1),
            "softmax_forward": (a2, a2), "softmax_backward": (a2, a2, a2),
            "act_grad_colsum": (a2, a2, a2, int64, nb, a2, a2),
            "colsum_finish": (a2, a1, boolean), "scale": (a1, nb), "clip": (a1, nb, nb),
            "sgd": (a1, a1, a1, nb, nb, nb, boolean, boolean),
            "adam": (a1,) * 4 + (nb,) * 9 + (boolean,), "rmsprop": (a1,) * 4 + (nb,) * 6,
            "adagrad": (a1, a1, a1, nb, nb, nb),
        }
        for name, sig in sigs.items():
            check(f"{name}_{dt.name}", getattr(k, name), sig, f32)
        check(f"xent_labels_{dt.name}", r.xent_rows, (a2, arr(int64, 1), none, a2, f1, float64),
              False)
        check(f"xent_targets_{dt.name}", r.xent_rows, (a2, none, a2, a2, f1, float64), False)
        check(f"mse_{dt.name}", r.mse, (a1, a1, a1, f1, float64), False)
        check(f"bce_{dt.name}", r.bce, (a1, a1, boolean, a1, f1, float64), False)
        check(f"sumsq_{dt.name}", r.sumsq, (a1, f1), False)
        nk = K.norms(dt)  # float64 arithmetic by design, as in the losses
        check(f"bn_forward_{dt.name}", nk.bn_forward, (a2, a1, a1, float64, a2, a1, a1), False)
        check(f"bn_forward_eval_{dt.name}", nk.bn_forward_eval,
              (a2, a1, a1, a1, a1, float64, a2), False)
        check(f"bn_backward_{dt.name}", nk.bn_backward, (a2, a2, a1, a1, a1, a2, a1, a1), False)
        check(f"ln_forward_{dt.name}", nk.ln_forward, (a2, a1, a1, float64, a2, a1, a1), False)
        check(f"ln_backward_{dt.name}", nk.ln_backward, (a2, a2, a1, a1, a1, a2), False)
        check(f"ln_param_grads_{dt.name}", nk.ln_param_grads, (a2, a2, a1, a1, a1, a1), False)
    check("finish_sum", K._finish_kernel(), (arr(float64, 1), int64, arr(float64, 1), int64,
                                             float64), False)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


# ------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--json", help="write the measurements to this file")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile every kernel to PTX (no GPU needed) and report")
    ap.add_argument("--cc", default="9.0", help="compute capability for --compile-only")
    args = ap.parse_args(argv)
    if args.compile_only:
        return compile_only(tuple(int(v) for v in args.cc.split(".")))

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        print("bench_cuda: NUMBA_ENABLE_CUDASIM=1 is set; the benchmark needs a real GPU.")
        return 0
    from fastprop.backends import cuda_support
    why = cuda_support.problem()
    if why is not None:
        print(f"bench_cuda: skipped: {why}")
        return 0
    import fastprop as fp
    print(f"fastprop {fp.__version__}; cuda: {cuda_support.availability()}", flush=True)
    try:
        fp.backends.load("native")
        cpu_backend = "native"
    except fp.BackendUnavailableError:
        cpu_backend = "numpy"
    print(f"CPU comparison backend: {cpu_backend} ({fp.get_num_threads()} threads)", flush=True)
    repeats = 3 if args.quick else 10
    rows: list = []
    t0 = time.perf_counter()
    bench_gemm(repeats, rows)
    bench_mlp(repeats, rows, cpu_backend)
    _summary(rows)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": cuda_support.availability(), "cpu_backend": cpu_backend,
                       "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
