"""The cuda backend on a real GPU: GEMM GFLOP/s and whole MLP training steps.

Measures, in one run that fits in 5 minutes:

* GEMM float32, n x n x n at n = 1024, 4096, 8192: fastprop's tiled Numba kernel on
  device arrays, vs cuBLAS through CuPy and/or PyTorch when importable (TF32 off, so
  both sides do IEEE float32 FMAs);
* one MLP training step (softmax cross-entropy, Adam, float32, batch 4096) for
  784-256-128-10 and 4096-4096-4096-10: fastprop with ``model.to("cuda")`` (the
  device-resident step: batch in, loss and output out) vs the native CPU backend (the
  numpy backend when native is not built) and vs PyTorch CUDA when importable, with
  ``torch.optim.Adam(fused=True)`` where this torch supports it on the device (one
  launch for the update, as fastprop's device step; the table names the variant).

Every result is checked before it is timed: each GEMM (fastprop's and each cuBLAS
front end's) on 8 rows against float64 NumPy, its error relative to |A| |B| within
``GEMM_TOL`` (IEEE float32 gives ~1e-7; TF32 left on would give ~1e-4); each MLP
step (fastprop cuda, the CPU backend, torch), all started from the same weights, on its
first step's loss and parameters against a float64 NumPy reference
(``fastprop._bench.reference_mlp_step``).

The table's last column is "<row>/fastprop cuda speed" = t_fastprop / t_row, as in
``benchmarks/report.py``: a ratio > 1 means the row's implementation (the first-named)
is faster than fastprop cuda.

Run: ``python benchmarks/bench_cuda.py`` (``--quick`` for fewer repeats, ``--json
out.json`` to keep the numbers).  Without numba-cuda or without a GPU it prints why
and exits with status 0.  ``python -m pytest benchmarks/bench_cuda.py`` runs the same
checks at small sizes (skipped without a GPU).

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
GEMM_TOL = 1e-5  # max |C - A B| / (|A| |B|) over the checked rows


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
def _gemm_err(a, b, got_rows):
    """max |C - A B| / (|A| |B|) over the first rows of C (A B in float64; the whole
    product would take seconds on the CPU)."""
    k = len(got_rows)
    want = a[:k].astype(np.float64) @ b
    scale = np.abs(a[:k]).astype(np.float64) @ np.abs(b) + 1e-30
    return float(np.max(np.abs(np.asarray(got_rows, np.float64) - want) / scale))


def _check_gemm(impl, n, err):
    if not err <= GEMM_TOL:
        raise AssertionError(f"GEMM {impl} n={n}: relative error {err:.2e} > {GEMM_TOL:g}")


def bench_gemm(repeats, rows, sizes=GEMM_SIZES):
    from numba import cuda

    from fastprop.backends import cuda_kernels as K
    rng = np.random.default_rng(0)
    for n in sizes:
        flop = 2.0 * n ** 3
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        da, db = cuda.to_device(a), cuda.to_device(b)
        dc = cuda.device_array((n, n), np.float32)
        reps = max(1, repeats if n < 8192 else repeats // 2)
        K.gemm(da, db, dc)
        cuda.synchronize()
        err = _gemm_err(a, b, dc[:8].copy_to_host())
        _check_gemm("fastprop cuda", n, err)
        t = _best(lambda: K.gemm(da, db, dc), reps, cuda.synchronize)
        tiles = K.choose_tiles(np.dtype(np.float32), n, n)
        rows.append({"bench": "gemm_f32", "n": n, "impl": "fastprop cuda", "seconds": t,
                     "gflops": flop / t / 1e9, "rel_err": err, "tiles": tuple(tiles)})
        del da, db, dc
        for impl, call, sync, first_rows in _cublas_gemms(a, b):
            call()
            sync()
            err = _gemm_err(a, b, first_rows())
            _check_gemm(impl, n, err)
            t = _best(call, reps, sync)
            rows.append({"bench": "gemm_f32", "n": n, "impl": impl, "seconds": t,
                         "gflops": flop / t / 1e9, "rel_err": err})
        _report_last(rows)


def _cublas_gemms(a, b):
    """(name, call, sync, first 8 rows of C as NumPy) for every importable cuBLAS front
    end."""
    out = []
    try:
        import cupy as cp
        ca, cb = cp.asarray(a), cp.asarray(b)
        cc = cp.empty_like(ca)
        out.append(("cupy (cuBLAS)", lambda: cp.matmul(ca, cb, out=cc),
                    cp.cuda.Device().synchronize, lambda: cp.asnumpy(cc[:8])))
    except Exception:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False
            ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
            tc = torch.empty_like(ta)
            out.append(("torch (cuBLAS)", lambda: torch.mm(ta, tb, out=tc),
                        torch.cuda.synchronize, lambda: tc[:8].cpu().numpy()))
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


def _initial_params(sizes):
    """[w0, b0, w1, b1, ...] of ``_model(sizes)``: where every implementation starts."""
    return [p.value.copy() for p in _model(sizes).parameters()]


def bench_mlp(repeats, rows, cpu_backend, mlps=MLPS, batch=BATCH):
    import fastprop as fp
    from fastprop import _bench
    rng = np.random.default_rng(1)
    for name, sizes in mlps.items():
        X = rng.standard_normal((batch, sizes[0]), dtype=np.float32)
        y = rng.integers(0, sizes[-1], batch)
        flop = 6.0 * batch * sum(i * o for i, o in zip(sizes, sizes[1:]))  # fwd + 2x bwd
        p0 = _initial_params(sizes)
        ref = _bench.reference_mlp_step(p0, X, y, lr=1e-3)  # float64, on the CPU

        model = _model(sizes).to("cuda")
        step = model.compile("cross_entropy", fp.optim.Adam(model.parameters(), lr=1e-3))
        loss = step(X, y)                                 # compiles the kernels
        step.sync()
        _bench.check_mlp_step("fastprop cuda", loss, [p.value for p in model.parameters()],
                              ref)
        assert step._fast is not None and np.isfinite(step(X, y))
        t = _best(lambda: step(X, y), repeats, lambda: None)  # a step ends with a copy out
        step.sync()
        rows.append({"bench": "mlp_step", "mlp": name, "impl": "fastprop cuda", "seconds": t,
                     "gflops": flop / t / 1e9, "samples_per_s": batch / t})

        cpu = _model(sizes)
        with fp.use_backend(cpu_backend):
            cstep = cpu.compile("cross_entropy", fp.optim.Adam(cpu.parameters(), lr=1e-3))
            _bench.check_mlp_step(f"fastprop {cpu_backend}", cstep(X, y),
                                  [p.value for p in cpu.parameters()], ref)
            reps = 1 if sizes[1] >= 4096 else max(2, repeats // 2)
            t = _best(lambda: cstep(X, y), reps, lambda: None)
        rows.append({"bench": "mlp_step", "mlp": name, "impl": f"fastprop {cpu_backend} (CPU)",
                     "seconds": t, "gflops": flop / t / 1e9, "samples_per_s": batch / t})

        torch_step = _torch_step(sizes, p0, X, y)
        if torch_step is not None:
            call, sync, params, variant = torch_step
            _bench.check_mlp_step("torch cuda", call(), params(), ref)
            t = _best(call, repeats, sync)
            rows.append({"bench": "mlp_step", "mlp": name,
                         "impl": f"torch cuda (eager, {variant} Adam)",
                         "seconds": t, "gflops": flop / t / 1e9, "samples_per_s": batch / t})
        _report_last(rows)


def _torch_adam(torch, params, lr):
    """Adam(fused=True) where this torch supports it for these parameters (one kernel
    launch for the update), else the default (foreach) implementation."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr), "foreach"


def _torch_step(sizes, p0, X, y):
    """(step, sync, parameters as NumPy [w0 (in, out), b0, ...], Adam variant) of the
    same MLP in PyTorch CUDA from the weights ``p0``; None without torch or CUDA."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except Exception:
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    from fastprop._bench import torch_mlp
    model, linears = torch_mlp(torch, sizes, p0)
    model = model.cuda()
    opt, variant = _torch_adam(torch, model.parameters(), lr=1e-3)
    lossf = torch.nn.CrossEntropyLoss()

    def step():  # the same transfers as fastprop's step: batch in, loss out
        xb = torch.from_numpy(X).cuda()
        yb = torch.from_numpy(y).cuda()
        opt.zero_grad()
        loss = lossf(model(xb), yb)
        loss.backward()
        opt.step()
        return loss.item()

    def params():
        return [a for lin in linears
                for a in (lin.weight.detach().cpu().numpy().T, lin.bias.detach().cpu().numpy())]

    return step, torch.cuda.synchronize, params, variant


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
    """Markdown table; the last column is t_fastprop_cuda / t_row (as report.py's
    "<row>/<base> speed": > 1 means the row's implementation is faster)."""
    print("\n| benchmark | size | implementation | time (ms) | GFLOP/s "
          "| <row>/fastprop cuda speed |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        key = ("n", r["n"]) if r["bench"] == "gemm_f32" else ("mlp", r["mlp"])
        ours = next(q for q in rows if q["bench"] == r["bench"] and q.get(key[0]) == key[1]
                    and q["impl"] == "fastprop cuda")
        ratio = ours["seconds"] / r["seconds"]
        print(f"| {r['bench']} | {key[1]} | {r['impl']} | {r['seconds'] * 1e3:.2f} | "
              f"{r['gflops']:.1f} | {ratio:.2f}x |")


# ------------------------------------------------------------------ compile-only check
def compile_only(cc):
    """Compile every kernel to PTX for ``cc`` without a GPU; report what matters."""
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    try:
        from numba import cuda, types
    except ImportError as exc:
        print(f"--compile-only needs numba-cuda (pip install numba-cuda): {exc}")
        return 1
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


# ------------------------------------------------------------------ pytest
def _real_gpu_problem():
    """None on a real CUDA GPU, else why the checks cannot run (the simulator counts as
    no GPU: the benchmark's sizes are meant for hardware)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1 is set; the benchmark needs a real GPU"
    from fastprop.backends import cuda_support
    why = cuda_support.problem()
    if why is None and cuda_support.is_simulator():
        return "numba.cuda is the CUDA simulator; the benchmark needs a real GPU"
    return why


def _skip_without_gpu():
    import pytest
    why = _real_gpu_problem()
    if why is not None:
        pytest.skip(why)


def test_gemm_results_are_checked():
    """Every GEMM (fastprop and the importable cuBLAS front ends) passes its check at a
    small size (the full run checks the same way before timing)."""
    _skip_without_gpu()
    rows: list = []
    bench_gemm(1, rows, sizes=(256, 1000))
    assert rows and all(r["rel_err"] <= GEMM_TOL for r in rows)


def test_mlp_steps_are_checked():
    """fastprop cuda, the CPU backend and torch (when importable) agree with the float64
    reference on the first step of the small MLP, at a small batch."""
    _skip_without_gpu()
    import fastprop as fp
    try:
        fp.backends.load("native")
        cpu_backend = "native"
    except fp.BackendUnavailableError:
        cpu_backend = "numpy"
    rows: list = []
    bench_mlp(1, rows, cpu_backend, mlps={"784-256-128-10": MLPS["784-256-128-10"]}, batch=256)
    assert {r["impl"] for r in rows} >= {"fastprop cuda", f"fastprop {cpu_backend} (CPU)"}


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

    why = _real_gpu_problem()
    if why is not None:
        print(f"bench_cuda: skipped: {why}")
        return 0
    from fastprop.backends import cuda_support
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
