#!/usr/bin/env bash
# Build fastprop with AddressSanitizer + UndefinedBehaviorSanitizer
# (-DFASTPROP_SANITIZE=ON) into its own directories and run the kernel tests under
# them, with the detected ISA, with FASTPROP_ISA=generic, and with FASTPROP_ISA=avx2
# where the detected one is avx512.  Any ASan or UBSan
# report fails the run (UBSan does not recover; ASan aborts on its first error).
#
#   tools/sanitize.sh [extra pytest args]      e.g. tools/sanitize.sh -x -k gemm
#
# Needs GCC or Clang with the sanitizer runtimes and the build/test requirements
# installed in the current Python (pip install ".[test]" cython cython-cmake
# scikit-build-core ninja cmake).  Nothing outside build/sanitize/ is touched.
#
# How: a Python extension is loaded by an uninstrumented interpreter, so the ASan
# runtime must come first in the process: it is put in LD_PRELOAD.  Leak detection is
# off (detect_leaks=0): CPython and NumPy keep allocations alive until exit by design,
# and fastprop's own buffers are covered by the 10,000-step RSS test -- which is
# skipped here (as is the large-scratch RSS test, through ASAN_OPTIONS), as ASan's
# quarantine of freed memory grows the resident set by design
# (so are the tests that start subprocesses).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
ROOT=$PWD/build/sanitize
SITE=$ROOT/site
TESTS=""
for t in ${SANITIZE_TESTS:-native_backend gemm ops layers optim bad_input properties train train_step
  reliability serialization}; do
  [ -e "tests/test_$t.py" ] && TESTS="$TESTS tests/test_$t.py"
done

CXX_BIN=${CXX:-c++}
LIBASAN=$("$CXX_BIN" -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
  echo "sanitize.sh: no libasan.so for $CXX_BIN" >&2
  exit 2
fi

echo "== building with FASTPROP_SANITIZE=ON into $ROOT"
rm -rf "$SITE"
"$PYTHON" -m pip install --no-build-isolation --no-deps --quiet --target "$SITE" \
  -Ccmake.define.FASTPROP_SANITIZE=ON -Cbuild-dir="$ROOT/cmake" .

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
where=$(LD_PRELOAD="$LIBASAN" ASAN_OPTIONS=detect_leaks=0 "$PYTHON" -c 'import fastprop._native as n, os; print(os.path.realpath(n.__file__))' \
        2>/dev/null || true)
case "$where" in
  "$SITE"/*) ;;
  *) echo "sanitize.sh: fastprop resolves to '$where', not the sanitized build in $SITE" \
          "(an editable install shadows PYTHONPATH: run this from a Python without one)" >&2
     exit 2 ;;
esac

# Reports go to files (pytest captures the test's stderr and would lose them when the
# sanitizer aborts the process); any file there fails the run.
REPORTS=$ROOT/reports
rm -rf "$REPORTS" "$REPORTS"-*
mkdir -p "$REPORTS"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:log_path=$REPORTS/asan
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan
export FASTPROP_TESTS_NO_TORCH=1  # (PyTorch, where installed, is not loaded under ASan)
status=0
# the detected ISA, the reference kernels, and the avx2 unit where the detected one is
# another (avx512): what a Zen3 or Haswell user runs, with its AVX2 vmath intrinsics
isas="auto generic"
if LD_PRELOAD="$LIBASAN" ASAN_OPTIONS=detect_leaks=0 "$PYTHON" -c \
    'import sys, fastprop._native as n; sys.exit(not ("avx2" in n.available_isas() and n.isa() != "avx2"))' \
    2>/dev/null; then
  isas="$isas avx2"
fi
for isa in $isas; do
  echo "== pytest under ASan+UBSan, FASTPROP_ISA=$isa"
  log=$ROOT/pytest-$isa.log
  set +e
  # shellcheck disable=SC2086
  LD_PRELOAD="$LIBASAN" FASTPROP_ISA=$isa "$PYTHON" -m pytest -q -p no:cacheprovider \
    -k "not subprocess and not memory_flat" $TESTS "$@" >"$log" 2>&1
  rc=$?
  set -e
  tail -n 2 "$log"
  [ $rc = 0 ] || { echo "sanitize.sh: pytest exited with $rc (log: $log)" >&2; status=1; }
  if [ -n "$(ls -A "$REPORTS")" ] || grep -E -q "runtime error:|Sanitizer" "$log"; then
    echo "sanitize.sh: sanitizer reports (FASTPROP_ISA=$isa) in $REPORTS:" >&2
    for f in "$REPORTS"/*; do [ -e "$f" ] && head -n 40 "$f" >&2; done
    grep -E -B2 -A25 "runtime error:|Sanitizer" "$log" | head -60 >&2 || true
    status=1
    mkdir -p "$REPORTS-$isa" && mv "$REPORTS"/* "$REPORTS-$isa"/ 2>/dev/null || true
  fi
done
if [ $status = 0 ]; then echo "== sanitize.sh: no ASan/UBSan reports"; fi
exit $status
