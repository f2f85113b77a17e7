"""The native backend's kernels against the NumPy reference backend and NumPy.

Every kernel of the contract (fastprop.backends) is called directly on
fastprop.backends.native and compared with fastprop.backends.numpy (the oracle),
run on float64 copies of the same inputs where the reference itself rounds
differently, for float32 and float64, with shapes of 1, primes and sizes that are
not multiples of any tile, strided (leading-dimension) GEMM operands, aliasing,
threaded sizes (> 64k elements), numerically extreme inputs and malformed
arguments.  The whole module also runs once more in a subprocess under
FASTPROP_ISA=<isa> for every other available ISA, so that every kernel set is
checked (test_subprocess_isa_suite).
"""

import importlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from _support import run_module_on_isa

_native = importlib.import_module("fastprop._native")
nat = importlib.import_module("fastprop.backends.native")
ref = importlib.import_module("fastprop.backends.numpy")
ACTIVATIONS = importlib.import_module("fastprop.backends").ACTIVATIONS

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
DTYPES = [F32, F64]
DTYPE_IDS = ["f32", "f64"]
#: (rtol, atol) per dtype.
TOL = {F32: (1e-5, 1e-6), F64: (1e-12, 1e-12)}
ALPHA = 0.01
ACT_NAMES = list(ACTIVATIONS)
TRANS = [(False, False), (False, True), (True, False), (True, True)]
TRANS_IDS = ["NN", "NT", "TN", "TT"]
# (m, k, n): units, one-row / one-column products (the GEMV path), primes, sizes
# just past tile multiples, and one that uses threads.
GEMM_SHAPES = [(1, 1, 1), (1, 7, 1), (7, 1, 31), (1, 65, 33), (33, 65, 1), (1, 300, 257),
               (257, 300, 1), (7, 31, 33), (33, 65, 17), (65, 127, 31), (127, 257, 7),
               (257, 33, 65), (6, 256, 16), (13, 300, 97), (301, 211, 149),
               # a few rows times a wide B (the multi-row axpy form: 2 rows from B rows
               # of 2 KiB, 3-4 from 4 KiB, 5-8 for a B of 8 MiB; k >= 32), groups of 4
               # and a rest, k past one sum block; and the shapes just outside it
               (2, 1000, 600), (3, 40, 1100), (4, 600, 1030), (7, 1030, 2100),
               (5, 2048, 1024),  # (4 rows and 1: the single-row rest of a group)
               (3, 517, 513),  # (inside in float64 only: rows of 2052 / 4104 bytes)
               (4, 3, 520), (5, 1100, 700), (8, 64, 1030), (6, 9, 260)]


def close(actual, expected, dtype, scale=None, factor=1.0, what=""):
    """|actual - expected| <= factor (atol + rtol scale), scale defaulting to |expected|."""
    rtol, atol = TOL[np.dtype(dtype)]
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.abs(expected) if scale is None else scale
    err = np.abs(actual - expected)
    bad = ~(err <= factor * (atol + rtol * scale))
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err, -1)), err.shape) if err.ndim else ()
        raise AssertionError(f"{what}: {int(bad.sum())}/{err.size} out of tolerance; worst at "
                             f"{i}: actual {actual[i]!r}, expected {expected[i]!r}")


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


def randn(rng, shape, dtype, scale=1.0):
    return np.asarray(rng.standard_normal(shape) * scale, dtype=dtype)


# =========================================================== configuration
def test_config_reports_isa_features_threads():
    cfg = nat.config()
    assert nat.name == "native"
    assert cfg["isa"] in ("generic", "avx2", "avx512") and cfg["isa"] == _native.isa()
    assert set(cfg["cpu_features"]) == {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512"}
    assert all(isinstance(v, bool) for v in cfg["cpu_features"].values())
    assert isinstance(cfg["openmp"], bool)
    assert cfg["num_threads"] == nat.get_num_threads() >= 1
    assert "generic" in cfg["available_isas"]
    if cfg["isa"] in ("avx2", "avx512"):
        assert cfg["cpu_features"]["avx2"] and cfg["cpu_features"]["fma"]
    if cfg["isa"] == "avx512":
        assert cfg["cpu_features"]["avx512"] and cfg["cpu_features"]["avx512f"]


def test_isa_matches_environment():
    want = os.environ.get("FASTPROP_ISA", "").strip().lower()
    avail = _native.available_isas()
    best = avail[-1]  # generic < avx2 < avx512
    if want == "generic":
        assert _native.isa() == "generic"
    elif want in ("", "auto"):
        assert _native.isa() == best and _native.isa_note() == ""
    elif want in ("avx2", "avx512"):
        assert _native.isa() == (want if want in avail else best)
        assert (_native.isa_note() == "") == (want in avail)


def test_set_num_threads_round_trip_and_validation():
    before = nat.get_num_threads()
    try:
        nat.set_num_threads(1)
        assert nat.get_num_threads() == 1
        if _native.openmp():
            nat.set_num_threads(3)
            assert nat.get_num_threads() == 3
    finally:
        nat.set_num_threads(before)
    assert nat.get_num_threads() == before
    with pytest.raises(ValueError):
        nat.set_num_threads(0)
    with pytest.raises(ValueError):
        nat.set_num_threads(-2)
    with pytest.raises(TypeError):
        nat.set_num_threads(1.5)
    with pytest.raises(TypeError):
        nat.set_num_threads(True)


def test_threadpoolctl_controls_openmp_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not _native.openmp():
        pytest.skip("built without OpenMP")
    before = nat.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. several OpenMP runtimes in one process
        with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
            assert nat.get_num_threads() == 1
    assert nat.get_num_threads() == before


def _child_gemm(conn):
    a = np.ones((256, 256), np.float32)
    c = np.empty_like(a)
    nat.gemm(a, a, c, False, False, False)
    conn.send((float(c[0, 0]), nat.get_num_threads()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_after_threaded_kernels_does_not_deadlock():
    import multiprocessing as mp
    a = np.ones((256, 256), np.float32)
    c = np.empty_like(a)
    nat.gemm(a, a, c, False, False, False)  # starts the OpenMP pool when threaded
    nat.sum_squares([np.ones(200_000)])
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads
        proc = ctx.Process(target=_child_gemm, args=(child,))
        proc.start()
    try:
        assert parent.poll(60), "the forked child hung in a native kernel"
        value, threads = parent.recv()
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert value == 256.0 and threads >= 1
    assert proc.exitcode == 0


_FORK_PROBE = """
import os, sys, threading, time
import fastprop._native as nat
if sys.argv[1] == "thread":
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
threads = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[17])
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, str(nat.get_num_threads()).encode())
    os._exit(0)
os.waitpid(pid, 0)
print(threads, nat.get_num_threads(), os.read(r, 16).decode())
"""


@pytest.mark.skipif(not hasattr(os, "fork") or not sys.platform.startswith("linux"),
                    reason="needs fork() and /proc")
def test_fork_from_a_process_with_threads_gives_a_serial_child():
    """A child forked from a process with more than one thread runs serially, even
    when fastprop never started its own pool: another library's OpenMP pool (PyTorch's,
    sharing this libgomp) hung the child's first parallel kernel.  A child of a
    single-threaded process that never ran a parallel kernel keeps its threads."""
    if not _native.openmp() or (os.cpu_count() or 1) < 2:
        pytest.skip("needs OpenMP and 2 cores")
    # (NumPy's BLAS threads count too: one BLAS thread keeps the plain probe single-threaded)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OMP_NUM_THREADS="2")
    results = {}
    for mode in ("thread", "plain"):
        out = subprocess.run([sys.executable, "-c", _FORK_PROBE, mode], capture_output=True,
                             text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        results[mode] = [int(v) for v in out.stdout.strip().splitlines()[-1].split()]
    threads, parent, child = results["thread"]
    assert threads >= 2 and parent == 2 and child == 1
    threads, parent, child = results["plain"]
    if threads == 1:
        assert child == parent == 2
    else:  # (some library started a thread at import: a serial child, as above)
        assert child == 1


_FORK_SUMS = """
import os, sys
import numpy as np
import fastprop._native as nat
x = np.random.default_rng(int(sys.argv[1])).standard_normal(600_000)
nat.set_num_threads(1)
one = nat.sum_squares([x])
nat.set_num_threads(2)
two = nat.sum_squares([x])  # (starts the pool: a fork child runs serially)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, repr((nat.sum_squares([x]), nat.get_num_threads())).encode())
    os._exit(0)
os.waitpid(pid, 0)
child, child_threads = eval(os.read(r, 256).decode())
print(repr(one), repr(two), repr(child), child_threads)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_fork_child_sums_in_the_parents_chunks():
    """A fork child (threads unusable) runs the thread count's chunks of a split sum in
    turn, as the busy-core back-off does: a fork-start worker pool gets the parent's
    bits (it summed in one chunk: the 1-thread bits)."""
    if not _native.openmp():
        pytest.skip("needs OpenMP")
    env = dict(os.environ, FASTPROP_BACKOFF="0", OPENBLAS_NUM_THREADS="1")
    for seed in range(20):  # (an x whose 1- and 2-chunk sums differ, so this can fail)
        out = subprocess.run([sys.executable, "-c", _FORK_SUMS, str(seed)],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        one, two, child, threads = out.stdout.strip().splitlines()[-1].split()
        if one != two:
            break
    else:
        pytest.skip("no sum that differs between 1 and 2 chunks")
    assert child == two and threads == "1"


def test_fork_after_another_librarys_openmp_pool():
    """The case itself: torch imported first (its libgomp serves fastprop), a parallel
    torch op, fork, a parallel fastprop kernel in the child: it finishes."""
    pytest.importorskip("torch")
    if not hasattr(os, "fork"):
        pytest.skip("needs fork()")
    code = """
import os, sys, time
import torch
torch.set_num_threads(2)
import numpy as np
import fastprop._native as nat
torch.exp(torch.randn(1 << 22)).sum()
a = np.ones((400, 400), np.float32)
pid = os.fork()
if pid == 0:
    c = np.zeros_like(a)
    nat.gemm(a, a, c, False, False, False)
    os._exit(0 if c[0, 0] == 400 else 3)
deadline = time.time() + 60
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.05)
os.kill(pid, 9)
sys.exit(9)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, ("the child hung" if out.returncode == 9 else out.stderr)


def _isa_probe(env_value):
    env = dict(os.environ, FASTPROP_ISA=env_value)
    code = ("import fastprop._native as n, json; "
            "print(json.dumps([n.isa(), n.isa_requested(), n.isa_note()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_subprocess_isa_env_values():
    avail = _native.available_isas()
    assert _isa_probe("generic") == ["generic", "generic", ""]
    isa, req, note = _isa_probe(" AVX2 ")
    assert req == "avx2"
    if "avx2" in avail:
        assert (isa, note) == ("avx2", "")
    else:
        assert isa == "generic" and "avx2" in note
    isa, req, note = _isa_probe("avx512")
    assert req == "avx512"
    if "avx512" in avail:
        assert (isa, note) == ("avx512", "")
    else:
        assert isa == avail[-1] and "avx512" in note
    isa, req, note = _isa_probe("sse9")
    assert req == "sse9" and "unknown FASTPROP_ISA" in note
    assert isa == avail[-1]
    # (a typo is said at import, as FASTPROP_BACKEND's: the ISA changes the rounding)
    for value, warned in (("sse9", True), ("avx2", False)):
        out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c",
                              "import fastprop"], env=dict(os.environ, FASTPROP_ISA=value),
                             capture_output=True, text=True, timeout=300)
        assert (out.returncode != 0) == warned, out.stderr
        assert ("RuntimeWarning: unknown FASTPROP_ISA=sse9" in out.stderr) == warned


_ISA_CHECK = pathlib.Path(__file__).resolve().parent.parent / "tools" / "check_isa_units.py"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="an x86-64 check")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
@pytest.mark.skipif(not _ISA_CHECK.exists(), reason="tools/ is not beside tests/")
def test_subprocess_objdump_only_isa_units_hold_instructions_beyond_x86_64_v2():
    """The wheel runs on any x86-64-v2 CPU: outside the avx2/avx512 namespaces the
    module holds no AVX, AVX-512 or BMI instruction (tools/check_isa_units.py, which
    .ci/run also runs on an unstripped build: an installed module is stripped)."""
    out = subprocess.run([sys.executable, str(_ISA_CHECK), _native.__file__],
                         capture_output=True, text=True, timeout=600)
    if out.returncode == 2 and "stripped" in out.stdout:
        pytest.skip("the installed module is stripped (.ci/run checks an unstripped build)")
    assert out.returncode == 0, out.stdout + out.stderr
    if "avx2" in _native.available_isas():
        assert int(out.stdout.split(": ")[1].split()[0]) > 50, out.stdout


_ISA_PROBE = r"""
#include <immintrin.h>
namespace fastprop { namespace avx2 {
__attribute__((target("avx2,fma"))) float unit_sum(const float* x) {
    __m256 v = _mm256_loadu_ps(x);
    v = _mm256_fmadd_ps(v, v, v);
    float out[8]; _mm256_storeu_ps(out, v); return out[0] + out[7];
}
}
__attribute__((target("avx2"))) float leaked(const float* x) {  // outside the units
    __m256 v = _mm256_loadu_ps(x);
    float out[8]; _mm256_storeu_ps(out, _mm256_add_ps(v, v)); return out[3];
}
__attribute__((target("bmi2"))) unsigned shifted(unsigned a, unsigned b) { return a << b; }
float plain(const float* x) { return x[0] * 2.0f; }
}
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="an x86-64 check")
@pytest.mark.skipif(any(shutil.which(t) is None for t in ("objdump", "strip", "g++")),
                    reason="needs binutils' objdump and strip, and g++")
@pytest.mark.skipif(not _ISA_CHECK.exists(), reason="tools/ is not beside tests/")
def test_subprocess_objdump_isa_check_finds_what_it_looks_for(tmp_path):
    """The check itself: in a small module it names the AVX2 and BMI2 functions outside
    fastprop::avx2 (exit 1), passes the one inside, and says when a module is stripped."""
    src = tmp_path / "probe.cpp"
    src.write_text(_ISA_PROBE)
    so = tmp_path / "probe.so"
    # (-march=x86-64: a compiler whose default is x86-64-v3 would put AVX in plain())
    subprocess.run(["g++", "-O2", "-march=x86-64", "-shared", "-fPIC", "-fvisibility=hidden",
                    str(src), "-o", str(so)], check=True, timeout=120)
    out = subprocess.run([sys.executable, str(_ISA_CHECK), str(so)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    flagged = out.stdout.splitlines()[1:]
    assert any("leaked" in line for line in flagged), out.stdout
    assert any("shifted" in line for line in flagged), out.stdout
    assert not any("unit_sum" in line or "plain" in line for line in flagged), out.stdout
    subprocess.run(["strip", str(so)], check=True, timeout=60)
    out = subprocess.run([sys.executable, str(_ISA_CHECK), str(so)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "stripped" in out.stdout, out.stdout


_OMP_UNIT = r"""
namespace fastprop { namespace avx2 {
void unit_scale(float* x, long n) {
    #pragma omp parallel for
    for (long i = 0; i < n; ++i) x[i] = x[i] * 2.0f + 1.0f;
}
double unit_sum(const double* x, long n) {  // (clang's .omp.reduction helpers too)
    double s = 0;
    #pragma omp parallel for reduction(+:s)
    for (long i = 0; i < n; ++i) s += x[i] * x[i];
    return s;
}
} }
"""
_OMP_BASE = r"""
void base_scale(float* x, long n) {
    #pragma omp parallel for
    for (long i = 0; i < n; ++i) x[i] = x[i] * 3.0f + 1.0f;
}
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="an x86-64 check")
@pytest.mark.skipif(any(shutil.which(t) is None for t in ("objdump", "clang++")),
                    reason="needs binutils' objdump and clang++")
@pytest.mark.skipif(not _ISA_CHECK.exists(), reason="tools/ is not beside tests/")
def test_subprocess_isa_check_places_clangs_parallel_regions(tmp_path):
    """clang names an OpenMP region ".omp_outlined..N" without its namespace: the check
    counts one as part of the function laid out before it (its own object's), so an
    AVX2 unit's region passes (it flagged every one: a clang + libomp build failed
    the check) and a baseline object compiled with AVX2 is still caught."""
    objs = []
    for name, code, flags in [("unit", _OMP_UNIT, ["-mavx2", "-mfma"]),
                              ("base", _OMP_BASE, [])]:
        (tmp_path / f"{name}.cpp").write_text(code)
        objs.append(tmp_path / f"{name}.o")
        subprocess.run(["clang++", "-O2", "-march=x86-64", "-fPIC", "-fopenmp", *flags, "-c",
                        str(tmp_path / f"{name}.cpp"), "-o", str(objs[-1])],
                       check=True, timeout=120)
    for tag, base_flags in [("ok", []), ("leak", ["-mavx2"])]:
        if base_flags:  # (the baseline object built with AVX2: its region must be flagged)
            subprocess.run(["clang++", "-O2", "-march=x86-64", "-fPIC", "-fopenmp",
                            *base_flags, "-c", str(tmp_path / "base.cpp"), "-o",
                            str(objs[1])], check=True, timeout=120)
        so = tmp_path / f"{tag}.so"
        subprocess.run(["clang++", "-shared", *map(str, objs), "-o", str(so)], check=True,
                       timeout=120)
        out = subprocess.run([sys.executable, str(_ISA_CHECK), str(so)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == (1 if base_flags else 0), out.stdout + out.stderr


@pytest.mark.skipif(os.environ.get("FASTPROP_NATIVE_ISA_CHILD") == "1",
                    reason="already a per-ISA child run")
@pytest.mark.parametrize("isa", _native.available_isas())
def test_subprocess_isa_suite(isa):
    """The whole module again for every other available ISA (generic, avx2, ...)."""
    if isa == _native.isa():
        pytest.skip(f"{isa} is the ISA of this run")
    run_module_on_isa(__file__, isa, "FASTPROP_NATIVE_ISA_CHILD")


# =========================================================== GEMM
def _gemm_expect(a, b, ta, tb, c0=None):
    oa = a.T if ta else a
    ob = b.T if tb else b
    exp = oa.astype(np.float64) @ ob.astype(np.float64)
    scale = np.abs(oa.astype(np.float64)) @ np.abs(ob.astype(np.float64))
    if c0 is not None:
        exp = exp + c0
        scale = scale + np.abs(c0)
    return exp, scale


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_a_few_rows_times_a_wide_b_equal_their_single_row_products(rng, dtype):
    """A few rows of A times a wide B take the multi-row axpy form (B read once per
    group of 4 rows, in long runs; 5-8 rows for a B of 8 MiB and more): each row is
    summed in the single-row (GEMV) order, so a row's result does not depend on the
    rows beside it (the blocked GEMM read such a B 16 columns at a time, 4-7x slower
    than one row at 2x1024x1024)."""
    for m, k, n in [(2, 1000, 700), (4, 1030, 1100), (3, 40, 1030), (6, 1100, 2048)]:
        a, b = randn(rng, (m, k), dtype), randn(rng, (k, n), dtype)
        full = np.empty((m, n), dtype)
        nat.gemm(a, b, full, False, False, False)
        for i in range(m):
            row = np.empty((1, n), dtype)
            nat.gemm(a[i:i + 1], b, row, False, False, False)
            np.testing.assert_array_equal(full[i], row[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ta,tb", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "acc"])
def test_gemm_matches_numpy(rng, dtype, ta, tb, m, k, n, accumulate):
    a = randn(rng, (k, m) if ta else (m, k), dtype)
    b = randn(rng, (n, k) if tb else (k, n), dtype)
    c = randn(rng, (m, n), dtype)
    c0 = c.astype(np.float64) if accumulate else None
    nat.gemm(a, b, c, ta, tb, accumulate)
    exp, scale = _gemm_expect(a, b, ta, tb, c0)
    close(c, exp, dtype, scale=scale, what="gemm")
    c_ref = np.array(c0 if accumulate else np.zeros((m, n)), dtype=dtype)
    ref.gemm(a, b, c_ref, ta, tb, accumulate)
    close(c, c_ref, dtype, scale=scale, factor=2, what="gemm vs numpy backend")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ta,tb", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "acc"])
@pytest.mark.parametrize("m,k,n", [(37, 65, 29), (1, 65, 29), (37, 65, 1)])
def test_gemm_strided_leading_dimensions(rng, dtype, ta, tb, accumulate, m, k, n):
    big_a = randn(rng, (300, 300), dtype)
    big_b = randn(rng, (300, 300), dtype)
    big_c = randn(rng, (100, 200), dtype)
    a = big_a[5:5 + (k if ta else m), 3:3 + (m if ta else k)]
    b = big_b[7:7 + (n if tb else k), 11:11 + (k if tb else n)]
    c = big_c[2:2 + m, 3:3 + n]
    before = big_c.copy()
    c0 = c.astype(np.float64) if accumulate else None
    nat.gemm(a, b, c, ta, tb, accumulate)
    exp, scale = _gemm_expect(a, b, ta, tb, c0)
    close(c, exp, dtype, scale=scale, what="strided gemm")
    mask = np.ones(big_c.shape, bool)
    mask[2:2 + m, 3:3 + n] = False
    assert np.array_equal(big_c[mask], before[mask]), "gemm wrote outside c"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gemm_k_zero_and_broadcast_rows(rng, dtype):
    c = randn(rng, (5, 4), dtype)
    keep = c.copy()
    nat.gemm(np.zeros((5, 0), dtype), np.zeros((0, 4), dtype), c, False, False, True)
    assert np.array_equal(c, keep)
    nat.gemm(np.zeros((5, 0), dtype), np.zeros((0, 4), dtype), c, False, False, False)
    assert not c.any()
    # A read-only operand whose rows all alias one row (first-axis stride 0).
    row = randn(rng, (9,), dtype)
    a = np.broadcast_to(row, (6, 9))
    b = randn(rng, (9, 4), dtype)
    out = np.empty((6, 4), dtype)
    nat.gemm(a, b, out, False, False, False)
    exp, scale = _gemm_expect(np.ascontiguousarray(a), b, False, False)
    close(out, exp, dtype, scale=scale, what="broadcast gemm")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gemm_threads_do_not_change_results(rng, dtype):
    if not _native.openmp():
        pytest.skip("built without OpenMP")
    a = randn(rng, (301, 257), dtype)
    b = randn(rng, (257, 263), dtype)
    before = nat.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            nat.set_num_threads(t)
            c = np.empty((301, 263), dtype)
            nat.gemm(a, b, c, False, False, False)
            outs.append(c)
    finally:
        nat.set_num_threads(before)
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_kernels_from_concurrent_python_threads(rng):
    """The GIL is released: kernels run concurrently, each Python thread with its
    own scratch buffers (and OpenMP team), and every result is right."""
    from concurrent.futures import ThreadPoolExecutor
    a = randn(rng, (150, 257), F32)
    b = randn(rng, (257, 97), F32)
    x = randn(rng, (300, 257), F32)
    expected = a.astype(F64) @ b.astype(F64)
    scale = np.abs(a.astype(F64)) @ np.abs(b.astype(F64))
    y_ref = np.empty(x.shape, F32)
    nat.activation_forward(ACTIVATIONS["gelu"], 0.0, x, y_ref)

    def work(i):
        c = np.empty((150, 97), F32)
        y = np.empty_like(x)
        for _ in range(20):
            nat.gemm(a, b, c, False, False, False)
            nat.activation_forward(ACTIVATIONS["gelu"], 0.0, x, y)
        return c, y

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(8)))
    for c, y in results:
        close(c, expected, F32, scale=scale, what="concurrent gemm")
        assert np.array_equal(y, y_ref)


def _runs_without_the_gil(call):
    """None if another Python thread runs while ``call()`` does, else what was seen.  A thread waits on an
    event (without the GIL), which is set just before the call; woken, it needs the
    GIL to note the time: within the call if the native code released it, only after
    the call returns if not.  Three tries (a thread woken late is no proof)."""
    import threading
    import time
    call()  # (warm: first-touch page faults)
    t0 = time.perf_counter()
    call()
    solo = time.perf_counter() - t0
    # (held, the thread wakes after the call whatever its length; released, within
    # it unless the machine wakes it late: a few ms are enough on a quiet machine,
    # and a busy one makes the call longer too)
    assert solo > 0.002, f"the call takes {solo * 1e3:.1f} ms: too short to tell"
    tries = []
    for _ in range(3):
        go, woke = threading.Event(), []
        t = threading.Thread(target=lambda: (go.wait(), woke.append(time.perf_counter())))
        t.start()
        time.sleep(0.005)
        go.set()
        start = time.perf_counter()
        call()
        t.join()
        tries.append(round((woke[0] - start) * 1e3, 2))
        if woke[0] - start < 0.8 * solo:  # (held: >= solo; a busy machine wakes late)
            return None
    return f"woke after {tries} ms, the call takes {solo * 1e3:.1f} ms"


def test_long_kernels_release_the_gil(rng):
    """Every long native call lets other Python threads run (the README's "every
    native kernel releases the GIL"; the concurrency tests pass with it held, as a
    serialised run gives the same results)."""
    import fastprop as fp
    from fastprop import losses, nn, optim
    before = fp.get_num_threads()
    fp.set_num_threads(1)  # (a core for the other thread)
    try:
        a = randn(rng, (800, 800), F32)
        c = np.empty_like(a)
        x = randn(rng, (1 << 24,), F32)
        y = np.empty_like(x)
        g = randn(rng, (512, 1024), F32)
        w, b = randn(rng, (1024, 1024), F32), randn(rng, (1024,), F32)
        out, z = np.empty((512, 1024), F32), np.empty((512, 1024), F32)
        p, m, v = x.copy(), np.zeros_like(x), np.zeros_like(x)
        model = nn.Sequential(nn.Dense(1024, 1024, "relu", rng=0), nn.Dense(1024, 10, rng=1))
        step = model.compile(losses.SoftmaxCrossEntropy(), optim.Adam(model.parameters()))
        labels = rng.integers(0, 10, 512)
        with fp.use_backend("native"):
            step(g, labels)
            assert step.fused() is not None
            calls = {
                "gemm": lambda: nat.gemm(a, a, c, False, False, False),
                "activation": lambda: nat.activation_forward(ACTIVATIONS["gelu"], 0.0, x, y),
                "linear": lambda: nat.linear_forward(g, w, b, ACTIVATIONS["relu"], 0.0, out, z),
                "adam": lambda: nat.adam_update([p], [x], [m], [v], 1, 1e-3, 0.9, 0.999,
                                                1e-8, 0.0, False),
                "compiled step": lambda: step(g, labels),  # (one call: no switch between)
            }
            held = {name: why for name, call in calls.items()
                    if (why := _runs_without_the_gil(call)) is not None}
    finally:
        fp.set_num_threads(before)
    assert not held, f"the GIL was held through {held}"


def test_gemm_rejects_bad_shapes_and_layouts(rng):
    a = randn(rng, (4, 5), F64)
    b = randn(rng, (5, 3), F64)
    with pytest.raises(ValueError, match="shapes do not agree"):
        nat.gemm(a, b, np.empty((4, 4)), False, False, False)
    with pytest.raises(ValueError, match="shapes do not agree"):
        nat.gemm(a, b, np.empty((4, 3)), True, False, False)
    with pytest.raises(ValueError, match="unit-stride"):
        nat.gemm(np.asfortranarray(randn(rng, (4, 5), F64))[:, ::2], randn(rng, (3, 3), F64),
                 np.empty((4, 3)), False, False, False)
    with pytest.raises(TypeError, match="b must have dtype float64"):
        nat.gemm(a, b.astype(np.float32), np.empty((4, 3)), False, False, False)
    with pytest.raises(TypeError, match="float32 or float64"):
        nat.gemm(a, b, np.empty((4, 3), np.int64), False, False, False)
    ro = np.empty((4, 3))
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        nat.gemm(a, b, ro, False, False, False)
    with pytest.raises(TypeError):
        nat.gemm(None, b, np.empty((4, 3)), False, False, False)


# =========================================================== dense layer
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACT_NAMES)
@pytest.mark.parametrize("n,n_in,n_out", [(1, 1, 1), (7, 33, 31), (65, 17, 257), (300, 129, 65)])
@pytest.mark.parametrize("bias", [True, False], ids=["b", "nob"])
def test_linear_forward_matches_reference(rng, dtype, act, n, n_in, n_out, bias):
    code = ACTIVATIONS[act]
    x = randn(rng, (n, n_in), dtype)
    w = randn(rng, (n_in, n_out), dtype, 0.3)
    b = randn(rng, (n_out,), dtype) if bias else None
    y, z = np.empty((n, n_out), dtype), np.empty((n, n_out), dtype)
    nat.linear_forward(x, w, b, code, ALPHA, y, z)
    x64, w64 = x.astype(F64), w.astype(F64)
    b64 = None if b is None else b.astype(F64)
    y_ref, z_ref = np.empty((n, n_out)), np.empty((n, n_out))
    ref.linear_forward(x64, w64, b64, code, ALPHA, y_ref, z_ref)
    zscale = np.abs(x64) @ np.abs(w64) + (0 if b is None else np.abs(b64))
    close(z, z_ref, dtype, scale=zscale, what="z")
    # y from the kernel's own z (isolates the activation from the GEMM rounding)
    y_from_z = np.empty((n, n_out))
    ref.activation_forward(code, ALPHA, z.astype(F64), y_from_z)
    close(y, y_from_z, dtype, factor=4, what="y")
    # without z: the pre-activation goes through y
    y2 = np.empty((n, n_out), dtype)
    nat.linear_forward(x, w, b, code, ALPHA, y2, None)
    close(y2, y, dtype, factor=4, what="y without z")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACT_NAMES)
@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "acc"])
@pytest.mark.parametrize("n,n_in,n_out", [(1, 1, 1), (7, 33, 31), (129, 65, 257)])
def test_linear_backward_matches_reference(rng, dtype, act, accumulate, n, n_in, n_out):
    code = ACTIVATIONS[act]
    x = randn(rng, (n, n_in), dtype)
    w = randn(rng, (n_in, n_out), dtype, 0.3)
    z = randn(rng, (n, n_out), dtype)
    y = np.empty_like(z)
    nat.activation_forward(code, ALPHA, z, y)
    gy = randn(rng, (n, n_out), dtype)
    gy_keep = gy.copy()
    gw0, gb0 = randn(rng, (n_in, n_out), dtype), randn(rng, (n_out,), dtype)
    gx, gw, gb = np.empty((n, n_in), dtype), gw0.copy(), gb0.copy()
    work = np.empty((n, n_out), dtype)
    nat.linear_backward(gy, x, w, y, z, code, ALPHA, gx, gw, gb, work, accumulate)
    assert np.array_equal(gy, gy_keep), "grad_y was modified"
    f = lambda a: a.astype(F64)  # noqa: E731
    gx_r, gw_r, gb_r = np.empty((n, n_in)), f(gw0), f(gb0)
    work_r = np.empty((n, n_out))
    ref.linear_backward(f(gy), f(x), f(w), f(y), f(z), code, ALPHA, gx_r, gw_r, gb_r, work_r,
                        accumulate)
    gz = work_r if code != 0 else f(gy)
    gz_scale = np.abs(gz) + np.abs(f(gy))
    if code == ACTIVATIONS["softmax"]:
        gz_scale = gz_scale + f(y) * (np.abs(f(gy)) * f(y)).sum(-1, keepdims=True)
    acc = 1.0 if accumulate else 0.0
    close(gw, gw_r, dtype, scale=np.abs(f(x)).T @ gz_scale + acc * np.abs(f(gw0)),
          factor=4, what="grad_w")
    close(gb, gb_r, dtype, scale=gz_scale.sum(0) + acc * np.abs(f(gb0)), factor=4,
          what="grad_b")
    close(gx, gx_r, dtype, scale=gz_scale @ np.abs(f(w)).T, factor=4, what="grad_x")
    # Optional outputs, and y recomputed from z when only z is given.
    gw2 = gw0.copy()
    nat.linear_backward(gy, x, w, None if code != ACTIVATIONS["gelu"] else y, z, code,
                        ALPHA, None, gw2, None, work, accumulate)
    close(gw2, gw, dtype, scale=np.abs(f(x)).T @ gz_scale + acc * np.abs(f(gw0)), factor=4,
          what="grad_w (y from z)")


def test_linear_rejects_bad_arguments(rng):
    x, w = randn(rng, (4, 3), F64), randn(rng, (3, 2), F64)
    y = np.empty((4, 2))
    with pytest.raises(ValueError, match=r"y must have shape \(4, 2\), got shape \(4, 5\)"):
        nat.linear_forward(x, w, None, 0, 0.0, np.empty((4, 5)), None)
    with pytest.raises(ValueError, match=r"w must have shape \(3, 2\), got shape \(4, 2\)"):
        nat.linear_forward(x, randn(rng, (4, 2), F64)[:, :], None, 0, 0.0, y, None)
    with pytest.raises(ValueError, match="b must have shape"):
        nat.linear_forward(x, w, np.zeros(3), 0, 0.0, y, None)
    with pytest.raises(ValueError, match="z must have shape"):
        nat.linear_forward(x, w, None, 0, 0.0, y, np.empty((4, 3)))
    with pytest.raises(ValueError, match="unknown activation code"):
        nat.linear_forward(x, w, None, 9, 0.0, y, None)
    with pytest.raises(TypeError, match="x must have dtype float64"):
        nat.linear_forward(x.astype(np.float32), w, None, 0, 0.0, y, None)
    with pytest.raises(ValueError):  # not C-contiguous
        nat.linear_forward(np.asfortranarray(x), w, None, 0, 0.0, y, None)
    gy, gw = randn(rng, (4, 2), F64), np.zeros((3, 2))
    with pytest.raises(ValueError, match="work"):
        nat.linear_backward(gy, x, w, y, None, 1, 0.0, None, gw, None, None, False)
    with pytest.raises(ValueError, match="gelu"):
        nat.linear_backward(gy, x, w, y, None, 5, 0.0, None, gw, None, np.empty((4, 2)), False)
    with pytest.raises(ValueError, match="forward output"):
        nat.linear_backward(gy, x, w, None, None, 3, 0.0, None, gw, None, np.empty((4, 2)),
                            False)
    with pytest.raises(ValueError, match="grad_x must have shape"):
        nat.linear_backward(gy, x, w, None, None, 0, 0.0, np.empty((4, 2)), gw, None, None,
                            False)


# =========================================================== activations
# (300, 257) and (520, 509) pass the thread thresholds of the exp-like and the
# memory-bound kernels (32k and 256k elements).
ACT_SHAPES = [(), (1,), (7,), (3, 5, 7), (33, 65), (300, 257), (520, 509)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACT_NAMES)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
def test_activation_forward_backward(rng, dtype, act, shape):
    code = ACTIVATIONS[act]
    if act == "softmax" and shape == ():
        with pytest.raises(ValueError):
            nat.activation_forward(code, ALPHA, np.zeros((), dtype), np.zeros((), dtype))
        return
    x = randn(rng, shape, dtype, 3.0)
    y = np.empty(shape, dtype)
    nat.activation_forward(code, ALPHA, x, y)
    y_ref = np.empty(shape)
    ref.activation_forward(code, ALPHA, x.astype(F64), y_ref)
    close(y, y_ref, dtype, factor=4, what=f"{act} forward")
    # in place
    x2 = x.copy()
    nat.activation_forward(code, ALPHA, x2, x2)
    assert np.array_equal(x2, y), "in-place forward differs"
    # backward from the kernel's own y (and x for gelu)
    gy = randn(rng, shape, dtype)
    gx = np.empty(shape, dtype)
    nat.activation_backward(code, ALPHA, gy, x, y, gx)
    gx_ref = np.empty(shape)
    ref.activation_backward(code, ALPHA, gy.astype(F64), x.astype(F64), y.astype(F64), gx_ref)
    scale = np.abs(gx_ref)
    if act == "softmax":
        scale = scale + np.abs(y.astype(F64)) * (np.abs(gy.astype(F64)) +
                                                  np.abs(gy * y).astype(F64).sum(-1, keepdims=True))
    close(gx, gx_ref, dtype, scale=scale, factor=4, what=f"{act} backward")
    g2 = gy.copy()
    nat.activation_backward(code, ALPHA, g2, x, y, g2)
    assert np.array_equal(g2, gx), "in-place backward differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ["sigmoid", "tanh", "gelu", "softmax", "leaky_relu"])
def test_activations_stable_at_extremes(dtype, act):
    code = ACTIVATIONS[act]
    x = np.array([[-1e4, -1e3, -88.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 1e3, 1e4]], dtype)
    y = np.empty_like(x)
    nat.activation_forward(code, ALPHA, x, y)  # pytest turns any warning into an error
    assert np.isfinite(y).all()
    if act == "sigmoid":
        assert y[0, 0] == 0.0 and y[0, -1] == 1.0 and ((y >= 0) & (y <= 1)).all()
    if act == "gelu":
        assert y[0, -1] == x[0, -1] and abs(y[0, 0]) == 0.0
    if act == "softmax":
        assert y[0, -1] == 1.0 and abs(y.sum() - 1) < 1e-6
    gx = np.empty_like(x)
    nat.activation_backward(code, ALPHA, np.ones_like(x), x, y, gx)
    assert np.isfinite(gx).all()
    rows = np.full((3, 4), 1e4, dtype)
    rows[1] = -1e4
    rows[2] = [1e4, -1e4, 0, 1e4]
    out = np.empty_like(rows)
    nat.activation_forward(ACTIVATIONS["softmax"], 0.0, rows, out)
    assert np.isfinite(out).all()
    close(out, [[.25] * 4, [.25] * 4, [.5, 0, 0, .5]], dtype)


def _max_ulp(got, exact, dtype):
    exact_t = exact.astype(dtype)
    ulp = np.spacing(np.abs(exact_t)).astype(np.float64)
    return float(np.max(np.abs(got.astype(np.float64) - exact) / ulp))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_vectorised_exp_and_tanh_accuracy_sweep(dtype):
    """sigmoid/tanh (vmath.hpp polynomials) within a few ulp over a dense sweep,
    including tiny arguments, the 0.625 switch of tanh and subnormal results."""
    x64 = np.concatenate([np.linspace(-120, 120, 480_001), np.linspace(-760, -600, 20_001),
                          np.linspace(300, 800, 1001), np.geomspace(1e-30, 2.0, 50_001),
                          -np.geomspace(1e-30, 2.0, 50_001), [0.625, -0.625, 0.0]])
    x = x64.astype(dtype)
    x64 = x.astype(np.float64)
    y = np.empty_like(x)
    nat.activation_forward(ACTIVATIONS["tanh"], 0.0, x, y)
    assert _max_ulp(y, np.tanh(x64), dtype) <= 4
    nat.activation_forward(ACTIVATIONS["sigmoid"], 0.0, x, y)
    e = np.exp(-np.abs(x64))
    exact = np.where(x64 >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    normal = exact >= np.finfo(dtype).tiny
    assert _max_ulp(y[normal], exact[normal], dtype) <= 6
    # subnormal results: absolute error of a few subnormal steps
    tiny = np.finfo(dtype).smallest_subnormal
    assert np.all(np.abs(y[~normal] - exact[~normal]) <= 4 * tiny)
    assert y.min() >= 0 and y.max() <= 1


def test_activation_rejects_bad_arguments(rng):
    x = randn(rng, (4, 3), F32)
    with pytest.raises(ValueError, match="must have the shape of x"):
        nat.activation_forward(1, 0.0, x, np.empty((3, 4), F32))
    with pytest.raises(TypeError, match="y must have dtype float32"):
        nat.activation_forward(1, 0.0, x, np.empty((4, 3), F64))
    with pytest.raises(ValueError, match="y"):
        nat.activation_forward(1, 0.0, x, np.empty((4, 6), F32)[:, ::2])
    with pytest.raises(ValueError, match="unknown activation"):
        nat.activation_forward(-1, 0.0, x, np.empty_like(x))
    with pytest.raises(ValueError, match="needs y"):
        nat.activation_backward(3, 0.0, x, x, None, np.empty_like(x))
    with pytest.raises(ValueError, match="gelu needs x"):
        nat.activation_backward(5, 0.0, x, None, x, np.empty_like(x))


# =========================================================== losses
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,c", [(1, 1), (1, 7), (7, 3), (33, 10), (130, 32), (257, 31), (3000, 33),
                                 (33, 65), (16, 1000)])
@pytest.mark.parametrize("kind", ["labels", "targets", "onehot", "sparse"])
def test_softmax_xent_matches_reference(rng, dtype, n, c, kind):
    """Class ids, and target rows dense, one-hot and with zeros (a select on the zero
    targets inside the vectorised row sum gave wrong sums on avx2 and avx512)."""
    logits = randn(rng, (n, c), dtype, 4.0)
    labels = targets = None
    if kind == "labels":
        labels = rng.integers(0, c, size=n).astype(np.int64)
    elif kind == "onehot":
        targets = np.eye(c, dtype=dtype)[rng.integers(0, c, size=n)]
    else:
        targets = rng.random((n, c)).astype(dtype)
        if kind == "sparse":
            targets[rng.random((n, c)) < 0.7] = 0
            targets[:, 0] += 1  # (no row of zeros)
        targets /= targets.sum(1, keepdims=True)
    grad = np.empty((n, c), dtype)
    loss = nat.softmax_xent(logits, labels, targets, grad)
    grad_ref = np.empty((n, c))
    t64 = None if targets is None else targets.astype(F64)
    loss_ref = ref.softmax_xent(logits.astype(F64), labels, t64, grad_ref)
    assert isinstance(loss, float)
    # the exponentials are evaluated in the logits' dtype (float exp for float32),
    # the sums and the log in double
    close(loss, loss_ref, dtype if dtype == F32 else F64, factor=1e3 if dtype == F64 else 1,
          what="loss")
    close(grad, grad_ref, dtype, scale=np.abs(grad_ref) + 1.0 / n, factor=2, what="grad")
    assert nat.softmax_xent(logits, labels, targets, None) == pytest.approx(loss, rel=1e-12)


def test_softmax_xent_stable_and_checked():
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], np.float32)
    grad = np.empty_like(logits)
    loss = nat.softmax_xent(logits, np.array([1, 2]), None, grad)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert loss == pytest.approx((2e4 + np.log(3)) / 2)
    with pytest.raises(ValueError, match=r"labels\[1\] = 3 is outside"):
        nat.softmax_xent(logits, np.array([0, 3]), None, grad)
    with pytest.raises(ValueError, match=r"labels\[0\] = -1"):
        nat.softmax_xent(logits, np.array([-1, 0]), None, grad)
    with pytest.raises(ValueError, match="exactly one"):
        nat.softmax_xent(logits, None, None, grad)
    with pytest.raises(ValueError, match="labels must have shape"):
        nat.softmax_xent(logits, np.array([0, 1, 2]), None, grad)
    with pytest.raises(TypeError, match="int64"):
        nat.softmax_xent(logits, np.array([0, 1], np.int32), None, grad)
    with pytest.raises(ValueError, match="grad must have shape"):
        nat.softmax_xent(logits, np.array([0, 1]), None, np.empty((3, 2), np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (33, 1), (5, 7, 31), (300, 257), (520, 509)],
                         ids=str)  # (the last: above 2 * kElementGrain, split in 2 threads)
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
def test_bce_matches_reference(rng, dtype, shape, from_logits):
    if from_logits:
        pred = randn(rng, shape, dtype, 5.0)
    else:
        pred = rng.random(shape).astype(dtype)
        pred.flat[0] = 0.0
        if pred.size > 1:
            pred.flat[1] = 1.0
    target = (rng.random(shape) > 0.5).astype(dtype)
    if target.size > 2:
        target.flat[2] = 0.3
    grad = np.empty(shape, dtype)
    loss = nat.bce(pred, target, from_logits, grad)
    grad_ref = np.empty(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference may divide by zero at p = 0 or 1
        loss_ref = ref.bce(pred.astype(F64), target.astype(F64), from_logits, grad_ref)
    # each element's loss is evaluated in the input's dtype (a few ulp), the sum in
    # double; every element's loss is >= 0, so the mean bounds their rounding
    close(loss, loss_ref, dtype, factor=4, what="loss")
    close(grad, grad_ref, dtype, factor=2, what="grad")
    assert nat.bce(pred, target, from_logits, None) == pytest.approx(loss, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bce_elementwise_accuracy_over_the_range(dtype):
    """Each element's loss within 4 ulp of dtype: the vectorised log, log1p and exp of
    vmath.hpp (probabilities from the smallest subnormal to 1 - eps; logits across
    +-88), against long double."""
    info = np.finfo(dtype)
    probs = np.concatenate([np.geomspace(float(info.smallest_subnormal), 1, 700),
                            1 - np.geomspace(float(info.eps), 0.5, 300)]).astype(dtype)
    logits = np.concatenate([-np.geomspace(1e-30, 88, 500), np.geomspace(1e-30, 88, 500)]
                            ).astype(dtype)
    cases = [(False, probs, 1.0), (False, probs, 0.0), (True, logits, 0.0),
             (True, logits, 1.0)]
    for from_logits, xs, t in cases:
        got = np.array([nat.bce(np.array([v]), np.array([t], dtype), from_logits, None)
                        for v in xs])
        x = xs.astype(np.longdouble)
        if from_logits:
            want = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
        else:
            with np.errstate(divide="ignore"):
                want = -np.maximum(np.log(x) if t == 1 else np.log1p(-x), -100)
        want = want.astype(np.float64)
        ulps = np.abs(got - want) / np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
        worst = int(np.argmax(ulps))
        assert ulps.max() <= 4, (from_logits, t, xs[worst], got[worst], want[worst])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("t", [1.0, 0.0, 0.999, 0.3])
def test_bce_logits_gradient_keeps_its_digits(dtype, t):
    """(sigmoid(x) - t) / n for confident predictions: computed as (1 - t) - e/(1+e)
    (x >= 0) or e/(1+e) - t, not by rounding sigmoid(x) first, which cancelled (x = 16,
    t = 1: 75% off in float32; 0 from x = 18), so the error is a few ulp of the two
    terms; the loss as x (1 - t) or -x t."""
    x = np.concatenate([np.linspace(-40, 40, 801), [-88, 88]]).astype(dtype)
    tt = np.full_like(x, t)
    g = np.empty_like(x)
    loss = nat.bce(x, tt, True, g)
    xl, tl = x.astype(np.longdouble), tt.astype(np.longdouble)
    el = np.exp(-np.abs(xl))
    er = el / (1 + el)  # (the reference must not cancel either, even in long double)
    want_g = (np.where(xl >= 0, (1 - tl) - er, er - tl) / x.size).astype(np.float64)
    # relative to the two terms (they cancel where sigmoid(x) is near t: inherent),
    # plus subnormal slack
    terms = (np.where(xl >= 0, np.abs(1 - tl), tl) + er).astype(np.float64) / x.size
    bound = 8 * np.finfo(dtype).eps * terms + 4 * float(np.finfo(dtype).smallest_subnormal)
    assert np.all(np.abs(g - want_g) <= bound)
    want = np.mean(np.where(xl >= 0, xl * (1 - tl), -xl * tl) + np.log1p(np.exp(-np.abs(xl))))
    assert abs(loss - float(want)) <= 8 * np.finfo(dtype).eps * float(want)


def test_bce_extremes_are_finite():
    x = np.array([-1e4, -50.0, 0.0, 50.0, 1e4])
    t = np.array([1.0, 1.0, 0.5, 0.0, 0.0])
    g = np.empty_like(x)
    loss = nat.bce(x, t, True, g)
    assert np.isfinite(loss) and np.isfinite(g).all()
    assert loss == pytest.approx((1e4 + 50 + np.log(2) + 50 + 1e4) / 5, rel=1e-12)
    p = np.array([0.0, 1.0, 0.0, 1.0])
    t = np.array([1.0, 0.0, 0.0, 1.0])
    loss = nat.bce(p, t, False, g[:4].copy())
    assert loss == pytest.approx(50.0)  # two terms clamped at -100, two exact


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (3, 5, 7), (300, 257), (520, 509)],
                         ids=str)  # (the last: above 2 * kElementGrain, split in 2 threads)
@pytest.mark.parametrize("half", [False, True])
def test_mse_matches_reference(rng, dtype, shape, half):
    pred, target = randn(rng, shape, dtype), randn(rng, shape, dtype)
    grad = np.empty(shape, dtype)
    loss = nat.mse(pred, target, half, grad)
    grad_ref = np.empty(shape)
    loss_ref = ref.mse(pred.astype(F64), target.astype(F64), half, grad_ref)
    close(loss, loss_ref, F64, factor=1e3, what="loss")
    close(grad, grad_ref, dtype, what="grad")
    d = pred.astype(F64) - target.astype(F64)
    assert loss == pytest.approx((0.5 if half else 1.0) * np.mean(d * d), rel=1e-12)


def test_pointwise_losses_reject_bad_arguments(rng):
    p = randn(rng, (4, 3), F64)
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        nat.mse(p, randn(rng, (3, 4), F64), False, None)
    with pytest.raises(ValueError, match="grad must have the shape of pred"):
        nat.bce(p, p, True, np.empty(12))
    with pytest.raises(TypeError, match="target must have dtype float64"):
        nat.mse(p, p.astype(np.float32), False, None)
    with pytest.raises(ValueError, match="empty"):
        nat.mse(np.empty(0), np.empty(0), False, None)


# =========================================================== optimizers
SHAPES_LIST = [(1,), (7, 3), (33,), (65, 31), (300, 257), (520, 509)]  # last two threaded


def _tensors(rng, dtype, n_state):
    params = [randn(rng, s, dtype) for s in SHAPES_LIST]
    grads = [[randn(rng, s, dtype) for s in SHAPES_LIST] for _ in range(3)]
    states = [[np.zeros(s, dtype) for s in SHAPES_LIST] for _ in range(n_state)]
    return params, grads, states


def _copy(arrays):
    return [a.copy() for a in arrays]


def _compare_lists(actual, expected, dtype, what, factor=8):
    for i, (a, e) in enumerate(zip(actual, expected)):
        close(a, e, dtype, factor=factor, what=f"{what}[{i}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.0, False, 0.01),
                                                  (0.9, False, 0.0), (0.9, True, 0.05)])
def test_sgd_update_matches_reference(rng, dtype, momentum, nesterov, wd):
    params, grads, (bufs,) = _tensors(rng, dtype, 1)
    p_ref, b_ref = _copy(params), _copy(bufs)
    use = bufs if momentum else None
    for step in range(3):
        nat.sgd_update(params, grads[step], use, 0.1, momentum, nesterov, wd, step == 0)
        ref.sgd_update(p_ref, grads[step], b_ref if momentum else None, 0.1, momentum,
                       nesterov, wd, step == 0)
    _compare_lists(params, p_ref, dtype, "params")
    if momentum:
        _compare_lists(bufs, b_ref, dtype, "bufs")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.01, False), (0.01, True)])
def test_adam_update_matches_reference(rng, dtype, wd, decoupled):
    params, grads, (m, v) = _tensors(rng, dtype, 2)
    p_ref, m_ref, v_ref = _copy(params), _copy(m), _copy(v)
    for step in range(1, 4):
        nat.adam_update(params, grads[step - 1], m, v, step, 1e-2, 0.9, 0.999, 1e-8, wd,
                        decoupled)
        ref.adam_update(p_ref, grads[step - 1], m_ref, v_ref, step, 1e-2, 0.9, 0.999, 1e-8,
                        wd, decoupled)
    _compare_lists(params, p_ref, dtype, "params")
    _compare_lists(m, m_ref, dtype, "exp_avgs")
    _compare_lists(v, v_ref, dtype, "exp_avg_sqs")
    with pytest.raises(ValueError, match="step"):
        nat.adam_update(params, grads[0], m, v, 0, 1e-2, 0.9, 0.999, 1e-8, wd, decoupled)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.01)])
def test_rmsprop_update_matches_reference(rng, dtype, momentum, wd):
    params, grads, (s, bufs) = _tensors(rng, dtype, 2)
    p_ref, s_ref, b_ref = _copy(params), _copy(s), _copy(bufs)
    for step in range(3):
        nat.rmsprop_update(params, grads[step], s, bufs if momentum else None, 1e-2, 0.99,
                           1e-8, momentum, wd)
        ref.rmsprop_update(p_ref, grads[step], s_ref, b_ref if momentum else None, 1e-2,
                           0.99, 1e-8, momentum, wd)
    _compare_lists(params, p_ref, dtype, "params")
    _compare_lists(s, s_ref, dtype, "square_avgs")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adagrad_update_matches_reference(rng, dtype, wd):
    params, grads, (sums,) = _tensors(rng, dtype, 1)
    p_ref, s_ref = _copy(params), _copy(sums)
    for step in range(3):
        nat.adagrad_update(params, grads[step], sums, 1e-2, 1e-10, wd)
        ref.adagrad_update(p_ref, grads[step], s_ref, 1e-2, 1e-10, wd)
    _compare_lists(params, p_ref, dtype, "params")
    _compare_lists(sums, s_ref, dtype, "sums")


def test_optimizers_reject_bad_lists(rng):
    p = [randn(rng, (3, 2), F64)]
    g = [randn(rng, (3, 2), F64)]
    with pytest.raises(ValueError, match="grads must have 1 arrays"):
        nat.adagrad_update(p, g + g, [np.zeros((3, 2))], 0.1, 1e-10, 0.0)
    with pytest.raises(ValueError, match=r"grads\[0\] must have the shape of params\[0\]"):
        nat.adagrad_update(p, [np.zeros(6)], [np.zeros((3, 2))], 0.1, 1e-10, 0.0)
    with pytest.raises(ValueError, match="bufs is required"):
        nat.sgd_update(p, g, None, 0.1, 0.9, False, 0.0, True)
    with pytest.raises(TypeError, match=r"grads\[0\] must have dtype float64"):
        nat.sgd_update(p, [g[0].astype(np.float32)], None, 0.1, 0.0, False, 0.0, True)
    ro = p[0].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\]"):
        nat.sgd_update([ro], g, None, 0.1, 0.0, False, 0.0, True)
    assert np.array_equal(ro, p[0])


# =========================================================== reductions
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sum_squares_scale_clip(rng, dtype):
    arrays = [randn(rng, s, dtype, 3.0) for s in SHAPES_LIST + [(), (5, 0)]]
    total = nat.sum_squares(arrays)
    assert isinstance(total, float)
    exp = sum(float(np.sum(a.astype(F64) ** 2)) for a in arrays)
    assert total == pytest.approx(exp, rel=1e-13)
    assert total == pytest.approx(ref.sum_squares(arrays), rel=1e-13)
    assert nat.sum_squares([]) == 0.0
    a_ref = _copy(arrays)
    nat.scale_(arrays, 0.37)
    ref.scale_(a_ref, 0.37)
    for a, e in zip(arrays, a_ref):
        assert np.array_equal(a, e)
    arrays[1].flat[0] = np.nan
    a_ref[1].flat[0] = np.nan
    nat.clip_(arrays, -0.5, 0.25)
    ref.clip_(a_ref, -0.5, 0.25)
    for a, e in zip(arrays, a_ref):
        assert np.array_equal(a, e, equal_nan=True)
    assert np.isnan(arrays[1].flat[0])


# =========================================================== normalisation
# (the last two: above 2 * kElementGrain elements, so rows (layer norm) and column
# strips (batch norm) are split between 2 threads)
NORM_SHAPES = [(1, 1), (2, 7), (7, 33), (33, 257), (4, 513), (300, 65), (129, 300),
               (600, 513), (257, 1031)]


def _affine(rng, f, dtype):
    return randn(rng, (f,), dtype) + 1.0, randn(rng, (f,), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,f", NORM_SHAPES)
@pytest.mark.parametrize("layer", [False, True], ids=["batch", "layer"])
def test_norm_forward_backward_match_reference(rng, dtype, n, f, layer):
    x = randn(rng, (n, f), dtype, 2.0) + dtype.type(3.0)
    gamma, beta = _affine(rng, f, dtype)
    stats = n if layer else f
    y, mean, inv = np.empty((n, f), dtype), np.empty(stats, dtype), np.empty(stats, dtype)
    fwd_n = nat.layernorm_forward if layer else nat.batchnorm_forward
    fwd_r = ref.layernorm_forward if layer else ref.batchnorm_forward
    fwd_n(x, gamma, beta, 1e-5, y, mean, inv)
    y_r, mean_r, inv_r = np.empty((n, f), dtype), np.empty(stats, dtype), np.empty(stats, dtype)
    fwd_r(x, gamma, beta, 1e-5, y_r, mean_r, inv_r)
    close(mean, mean_r, dtype, what="mean")
    close(inv, inv_r, dtype, factor=4, what="invstd")
    yscale = np.abs(y_r.astype(F64)) + np.abs(gamma.astype(F64)) + np.abs(beta.astype(F64))
    close(y, y_r, dtype, scale=yscale, factor=4, what="y")
    gy = randn(rng, (n, f), dtype)
    gg0, gb0 = randn(rng, (f,), dtype), randn(rng, (f,), dtype)
    gx, gg, gb = np.empty((n, f), dtype), gg0.copy(), gb0.copy()
    bwd_n = nat.layernorm_backward if layer else nat.batchnorm_backward
    bwd_r = ref.layernorm_backward if layer else ref.batchnorm_backward
    bwd_n(gy, x, gamma, mean, inv, gx, gg, gb)
    gx_r, gg_r, gb_r = np.empty((n, f), dtype), gg0.copy(), gb0.copy()
    bwd_r(gy, x, gamma, mean, inv, gx_r, gg_r, gb_r)
    gscale = np.abs(gy.astype(F64)).sum(0) * 4 + np.abs(gg0.astype(F64))
    close(gg, gg_r, dtype, scale=gscale * 4, factor=4, what="grad_gamma")
    close(gb, gb_r, dtype, scale=gscale, factor=4, what="grad_beta")
    xscale = (np.abs(gx_r.astype(F64)) + np.abs(gy.astype(F64)) * np.abs(gamma.astype(F64))
              * np.abs(inv.astype(F64)).reshape((-1, 1) if layer else (1, -1)) * 4)
    close(gx, gx_r, dtype, scale=xscale, factor=4, what="grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_batchnorm_forward_train_is_forward_then_running_update(rng, dtype, momentum):
    """The fused training forward (BatchNorm1d's path on this backend) gives exactly
    what batchnorm_forward followed by batchnorm_running_update gives, over shapes that
    split column strips between threads; a refused call (a statistic of another size
    or dtype, one row, momentum outside [0, 1]) writes nothing."""
    for n, f in [s for s in NORM_SHAPES if s[0] >= 2] + [(2, 1), (2048, 600)]:
        x = randn(rng, (n, f), dtype, 3.0) + np.asarray(0.5, dtype)
        gamma, beta = _affine(rng, f, dtype)
        rm0, rv0 = randn(rng, (f,), dtype), (rng.random(f) + 0.5).astype(dtype)
        outs = []
        for fused in (True, False):
            y, mean, inv = np.empty((n, f), dtype), np.empty(f, dtype), np.empty(f, dtype)
            rm, rv = rm0.copy(), rv0.copy()
            if fused:
                nat.batchnorm_forward_train(x, gamma, beta, 1e-5, y, mean, inv, momentum, rm, rv)
            else:
                nat.batchnorm_forward(x, gamma, beta, 1e-5, y, mean, inv)
                nat.batchnorm_running_update(x, momentum, rm, rv)
            outs.append((y, mean, inv, rm, rv))
        for a, b in zip(*outs):
            np.testing.assert_array_equal(a, b)
    x = randn(rng, (5, 4), dtype)
    g, b = _affine(rng, 4, dtype)
    f32 = np.float32 if dtype == np.float64 else np.float64
    for change in ({"rv": np.ones(3, dtype)}, {"rm": np.zeros(4, f32)}, {"x": x[:1]},
                   {"momentum": 1.5}, {"momentum": float("nan")}):
        args = {"x": x, "rm": np.zeros(4, dtype), "rv": np.ones(4, dtype), "momentum": 0.1}
        args.update(change)
        y, mean, inv = np.full((len(args["x"]), 4), 7, dtype), np.full(4, 7, dtype), np.full(4, 7, dtype)
        before = [a.copy() for a in (y, mean, inv, args["rm"], args["rv"])]
        with pytest.raises((ValueError, TypeError)):
            nat.batchnorm_forward_train(args["x"], g, b, 1e-5, y, mean, inv, args["momentum"],
                                        args["rm"], args["rv"])
        for a, want in zip((y, mean, inv, args["rm"], args["rv"]), before):
            np.testing.assert_array_equal(a, want)


def test_batchnorm_layer_takes_the_fused_training_forward(monkeypatch, rng):
    """BatchNorm1d's training forward on the native backend is one call
    (batchnorm_forward_train), not batchnorm_forward + batchnorm_running_update, and
    its statistics and output are those of the two calls; a running statistic of
    another size is still named by the layer, and nothing changes."""
    fp = importlib.import_module("fastprop")
    x = randn(rng, (64, 12), F32, 2.0)
    with fp.use_backend("native"):
        bn = fp.nn.BatchNorm1d(12, momentum=None)
        bn.weight.value[...] = rng.standard_normal(12)
        want_rm, want_rv = bn.running_mean.copy(), bn.running_var.copy()
        y0, m0, i0 = np.empty_like(x), np.empty(12, F32), np.empty(12, F32)
        nat.batchnorm_forward(x, bn.weight.value, bn.bias.value, bn.eps, y0, m0, i0)
        nat.batchnorm_running_update(x, 1.0, want_rm, want_rv)
        be = importlib.import_module("fastprop.backends.native")

        def refuse(*args):
            raise AssertionError("the separate running update was called")
        monkeypatch.setattr(be, "batchnorm_running_update", refuse)
        monkeypatch.setattr(be, "batchnorm_forward", refuse)
        y = bn(x)
        np.testing.assert_array_equal(y, y0)
        np.testing.assert_array_equal(bn.running_mean, want_rm)
        np.testing.assert_array_equal(bn.running_var, want_rv)
        assert int(bn.num_batches_tracked) == 1
        bn.running_var = np.ones(11, F32)
        rm = bn.running_mean.copy()
        with pytest.raises(ValueError, match="running_var must have shape"):
            bn(x)
        np.testing.assert_array_equal(bn.running_mean, rm)
        assert int(bn.num_batches_tracked) == 1


def _ulps(actual, want):
    """|actual - want| in units of float32 spacing at want (want a float32 array)."""
    return np.abs(actual.astype(F64) - want.astype(F64)) / np.spacing(np.abs(want)).astype(F64)


@pytest.mark.parametrize("n", [2, 3, 4097])
def test_batchnorm_float32_statistics_one_pass_hard_columns(rng, n):
    """float32 batch statistics come from one pass over x - k (k a column's first
    value): still within an ulp of the float64 two-pass values, rounded to float32,
    on the columns where a plain one-pass sum of squares cancels (mean 1e6 times the
    spread), where k is far from the mean (an outlier first row), with an odd row
    count (the two-rows-at-a-time loop's last row), for the forward's mean/invstd and
    the running statistics alike; non-finite columns as in the NumPy reference."""
    f = 6
    x = rng.standard_normal((n, f)) * [1, 1e-3, 1, 1e3, 2, 1e-2] + [1e6, 1e3, 0, 0, -5e5, 7]
    x[0, 2:4] += [3e4, 1e7]  # (an outlier first row: k far from the mean)
    x = x.astype(F32)
    y, mean, inv = np.empty_like(x), np.empty(f, F32), np.empty(f, F32)
    gamma, beta = np.ones(f, F32), np.zeros(f, F32)
    nat.batchnorm_forward(x, gamma, beta, 1e-5, y, mean, inv)
    xd = x.astype(F64)
    mu, ss = xd.mean(0), ((xd - xd.mean(0)) ** 2).sum(0)
    assert _ulps(mean, mu.astype(F32)).max() <= 1
    assert _ulps(inv, (1 / np.sqrt(ss / n + 1e-5)).astype(F32)).max() <= 1
    rm, rv = np.zeros(f, F32), np.ones(f, F32)
    nat.batchnorm_running_update(x, 1.0, rm, rv)
    assert _ulps(rm, mu.astype(F32)).max() <= 1
    assert _ulps(rv, (ss / (n - 1)).astype(F32)).max() <= 1
    # non-finite values: the same NaN/inf pattern and values as the reference
    x[:, 0] = 1.0
    x[0, 0], x[1, 1], x[n - 1, 2], x[0, 3], x[1, 3] = np.inf, np.nan, -np.inf, np.inf, -np.inf
    outs = []
    for be in (nat, ref):
        o = (np.empty_like(x), np.empty(f, F32), np.empty(f, F32))
        r = (np.zeros(f, F32), np.ones(f, F32))
        with np.errstate(invalid="ignore"):  # (NumPy's inf - inf)
            be.batchnorm_forward(x, gamma, beta, 1e-5, *o)
            be.batchnorm_running_update(x, 0.5, *r)
        outs.append(o[1:] + r)
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a[:4], b[:4])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,f", NORM_SHAPES)
def test_batchnorm_eval_matches_reference(rng, dtype, n, f):
    x = randn(rng, (n, f), dtype)
    gamma, beta = _affine(rng, f, dtype)
    rm, rv = randn(rng, (f,), dtype), (rng.random(f) + 0.5).astype(dtype)
    y, y_r = np.empty((n, f), dtype), np.empty((n, f), dtype)
    nat.batchnorm_forward_eval(x, gamma, beta, rm, rv, 1e-5, y)
    ref.batchnorm_forward_eval(x, gamma, beta, rm, rv, 1e-5, y_r)
    scale = (np.abs(x.astype(F64)) + np.abs(rm.astype(F64))) * np.abs(gamma.astype(F64)) \
        / np.sqrt(rv.astype(F64)) + np.abs(beta.astype(F64))
    close(y, y_r, dtype, scale=scale, factor=4, what="y")


def _running_oracle(x, momentum, rm, rv):
    x64 = x.astype(F64)
    keep = 1.0 - momentum
    return (keep * rm.astype(F64) + momentum * x64.mean(0),
            keep * rv.astype(F64) + momentum * x64.var(0, ddof=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,f", [s for s in NORM_SHAPES if s[0] >= 2] + [(2, 1), (2048, 600)])
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_batchnorm_running_update_matches_oracle(rng, dtype, n, f, momentum):
    """PyTorch's running statistics (unbiased variance), each rounded once from double:
    both backends within an ulp or two of the float64 oracle (threads split columns
    at (2048, 600))."""
    x = randn(rng, (n, f), dtype, scale=3.0) + np.asarray(0.5, dtype)
    rm0, rv0 = randn(rng, (f,), dtype), (rng.random(f) + 0.5).astype(dtype)
    want_m, want_v = _running_oracle(x, momentum, rm0, rv0)
    for be in (nat, ref):
        rm, rv = rm0.copy(), rv0.copy()
        be.batchnorm_running_update(x, momentum, rm, rv)
        assert rm.dtype == rv.dtype == dtype
        close(rm, want_m, dtype, factor=2, what=f"{be.name} running_mean")
        close(rv, want_v, dtype, factor=2, what=f"{be.name} running_var")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batchnorm_running_update_ill_conditioned(rng, dtype):
    """A mean 1e6 times the spread and a spread far below any eps: the variance is
    recomputed from x (not from a rounded invstd or mean), so it stays exact."""
    x = (1e4 + rng.standard_normal((64, 5)) * [1, 1e-2, 1e-3, 1e-5, 1e-6]).astype(dtype)
    x[:, 3:] = (0.5 + rng.standard_normal((64, 2)) * [1e-5, 1e-6]).astype(dtype)
    want = x.astype(F64).var(0, ddof=1)
    for be in (nat, ref):
        rm, rv = np.zeros(5, dtype), np.ones(5, dtype)
        be.batchnorm_running_update(x, 1.0, rm, rv)
        np.testing.assert_allclose(rv, want, rtol=2e-7 if dtype == F32 else 1e-13)
        np.testing.assert_allclose(rm, x.astype(F64).mean(0), rtol=1e-7)


def test_batchnorm_running_update_refusals_leave_the_statistics(rng):
    x = randn(rng, (4, 3), F32)
    rm, rv = randn(rng, (3,), F32), np.ones(3, F32)
    before = rm.copy(), rv.copy()
    for be in (nat, ref):
        with pytest.raises(ValueError, match="at least 2 rows"):
            be.batchnorm_running_update(x[:1], 0.1, rm, rv)
        for bad in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="momentum"):
                be.batchnorm_running_update(x, bad, rm, rv)
        with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
            be.batchnorm_running_update(x, 0.1, rm, np.ones(4, F32))
    with pytest.raises(TypeError, match="running_mean must have dtype float32"):
        nat.batchnorm_running_update(x, 0.1, rm.astype(F64), rv)
    with pytest.raises(ValueError, match="contiguous"):
        nat.batchnorm_running_update(x, 0.1, rm, np.ones(6, F32)[::2])
    assert np.array_equal(rm, before[0]) and np.array_equal(rv, before[1])
    nat.batchnorm_running_update(np.empty((5, 0), F32), 0.1, np.empty(0, F32),
                                 np.empty(0, F32))  # (no columns: nothing to do)


def test_norms_reject_bad_arguments(rng):
    x = randn(rng, (4, 3), F64)
    g, b = np.ones(3), np.zeros(3)
    y = np.empty((4, 3))
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
        nat.batchnorm_forward(x, g, b, 1e-5, y, np.empty(4), np.empty(3))
    with pytest.raises(ValueError, match=r"mean must have shape \(4,\)"):
        nat.layernorm_forward(x, g, b, 1e-5, y, np.empty(3), np.empty(4))
    with pytest.raises(ValueError, match="gamma must have shape"):
        nat.layernorm_forward(x, np.ones(4), b, 1e-5, y, np.empty(4), np.empty(4))
    with pytest.raises(TypeError, match="beta must have dtype float64"):
        nat.batchnorm_forward(x, g, b.astype(np.float32), 1e-5, y, np.empty(3), np.empty(3))
    with pytest.raises(TypeError):
        nat.batchnorm_backward(x, x, g, None, np.ones(3), y, np.zeros(3), np.zeros(3))
