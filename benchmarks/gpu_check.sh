#!/usr/bin/env bash
# The one prepared device check for the CUDA backend (issues 6 and 22), sized for about 5
# minutes on one H100/H200 (each step has its own timeout; the whole script stays under 9):
#   1. build server._core and server._cuda with FLEXLORA_CUDA=ON (cmake, in /tmp),
#   2. run tests/cuda: the `cuda` tests (GPU vs CPU path vs Eckart-Young optimum, streaming
#      aggregator) must run, not skip; the `cuda_build` ones check the binding's API shape,
#   3. a short benchmark: benchmarks/bench_gpu.py on paper_round (fp32 and TF32), medians.
# Logs and JSON go to $OUT when set (the device tool brings them back), else to a temp folder.
#
#   bash benchmarks/gpu_check.sh          # from the repository root, on the GPU machine
#
# Needs nvcc 13, torch with CUDA, pybind11, cmake >= 3.24 and the nvidia-cublas /
# nvidia-cusolver wheels in the Python that runs it (the device machine reaches no network).
# scipy-openblas32 (the CPU core's BLAS) may be missing there: carry its wheel in .whl/ and
# it is installed into /tmp/site.
# Exit code: 0 all passed; 3 missing prerequisite; 4 build failed; 5 GPU tests skipped
# (the GPU was not usable); otherwise pytest's code. The benchmark's outcome is in its log.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start )) s] $*"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
nvcc --version 2>&1 | tail -1
lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)" || true
$PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" \
  || { echo "torch is not importable by $PY"; exit 3; }
$PY -c "import pybind11" 2>/dev/null || { echo "pybind11 is not importable by $PY"; exit 3; }

if ! $PY -c "import scipy_openblas32" 2>/dev/null; then
  step "installing carried scipy-openblas32 wheel"
  ls .whl/scipy_openblas32-*.whl >/dev/null 2>&1 || { echo "scipy-openblas32 is missing and no wheel was carried in .whl/"; exit 3; }
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/scipy_openblas32-*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "configure + build (FLEXLORA_CUDA=ON)"
BUILD=/tmp/flexlora_gpu_build
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
timeout 300 cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DFLEXLORA_CUDA=ON \
  -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
  > "$OUTDIR/build.log" 2>&1 && timeout 300 cmake --build "$BUILD" -j "$(nproc)" >> "$OUTDIR/build.log" 2>&1
rc=$?
tail -n 25 "$OUTDIR/build.log"
[ $rc -eq 0 ] || { echo "BUILD FAILED (rc $rc)"; exit 4; }
# In place for this run only; whatever server/ held before (an in-place build) is put back on exit.
SAVED=$(mktemp -d)
cp server/_core.*.so server/_cuda.*.so "$SAVED"/ 2>/dev/null
trap 'rm -f "$ROOT"/server/_core.*.so "$ROOT"/server/_cuda.*.so; cp "$SAVED"/*.so "$ROOT"/server/ 2>/dev/null; rm -rf "$SAVED"' EXIT
cp "$BUILD"/_core*.so "$BUILD"/_cuda*.so server/
export LD_LIBRARY_PATH=$($PY -c "import scipy_openblas32 as s; print(s.get_lib_dir())")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
where=$($PY -c "import os, server; print(os.path.dirname(os.path.abspath(server.__file__)))")
if [ "$where" != "$ROOT/server" ]; then
  echo "$PY imports server from $where, not $ROOT/server (an editable install of another checkout?):"
  echo "run with PYTHON set to an interpreter that imports this tree"
  exit 3
fi
$PY -c "from server.core import cuda; print('cuda.available():', cuda.available())"

step "tests/cuda"
FLEXLORA_REQUIRE_CUDA_BUILD=1 timeout 240 $PY -m pytest -q -rs -p no:cacheprovider tests/cuda \
  --junitxml="$OUTDIR/cuda_tests.xml" 2>&1 | tee "$OUTDIR/cuda_tests.log" | tail -n 40
test_rc=${PIPESTATUS[0]}
if grep -q "CUDA backend unavailable" "$OUTDIR/cuda_tests.log"; then
  echo "GPU TESTS SKIPPED: the backend did not see the GPU (see the reasons above)"
  [ "$test_rc" -eq 0 ] && test_rc=5
fi

step "bench paper_round (fp32 and tf32; medians of 3)"
timeout 150 $PY benchmarks/bench_gpu.py --scale paper_round --tf32 --repeats 3 --opt-modules 4 \
  --json "$OUTDIR/bench_paper_round.json" 2>&1 | tee "$OUTDIR/bench_paper_round.log"
echo "bench exit code ${PIPESTATUS[0]}"

step "done: tests rc $test_rc; files in $OUTDIR"
ls -la "$OUTDIR"
exit "$test_rc"
