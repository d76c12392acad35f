#!/usr/bin/env bash
# One prepared device check for the CUDA backend (issue 6), sized for 8 minutes on one H100:
#   1. build server._core and server._cuda with FLEXLORA_CUDA=ON (cmake by hand, in place),
#   2. run tests/cuda (GPU vs CPU path vs optimum; dispatch logic),
#   3. run benchmarks/bench_gpu.py on paper_round (fp32 + TF32) and gpu_round.
# Logs and JSON go to $OUT when set (the device tool), else to a temporary folder.
#
#   bash benchmarks/gpu_check.sh          # from the repository root, on the GPU machine
#
# The device image has nvcc 13, torch (cu130), pybind11, cmake, ninja and the nvidia-cublas /
# nvidia-cusolver wheels; scipy-openblas32 (the CPU core's BLAS) may be missing: carry its
# wheel in .whl/ (see the report / benchmarks/README) and it is installed to /tmp/site.
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
$PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

if ! $PY -c "import scipy_openblas32" 2>/dev/null; then
  step "installing carried scipy-openblas32 wheel"
  ls .whl/scipy_openblas32-*.whl >/dev/null 2>&1 || { echo "scipy-openblas32 is missing and no wheel was carried in .whl/"; exit 3; }
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/scipy_openblas32-*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "configure + build (FLEXLORA_CUDA=ON)"
SRC=$ROOT
if ! grep -q "FlexLoRACuda.cmake" CMakeLists.txt; then
  # CMakeLists.txt does not include the CUDA cmake yet: build a mirror of it that does.
  SRC=/tmp/flexlora_cuda_src
  rm -rf "$SRC" && mkdir -p "$SRC"
  for d in csrc bindings cmake; do ln -s "$ROOT/$d" "$SRC/$d"; done
  $PY - "$ROOT/CMakeLists.txt" "$SRC/CMakeLists.txt" <<'PYEOF'
import re, sys
src = open(sys.argv[1]).read()
block = re.search(r"if\(FLEXLORA_CUDA\)\n.*?\nendif\(\)\n", src, re.S)
src = src[:block.start()] + "if(FLEXLORA_CUDA)\n  include(cmake/FlexLoRACuda.cmake)\nendif()\n" + src[block.end():]
link = re.search(r"if\(FLEXLORA_CUDA\)\n  target_link_libraries\(_core.*?endif\(\)\n", src, re.S)
open(sys.argv[2], "w").write(src[:link.start()] + src[link.end():] if link else src)
PYEOF
fi
BUILD=/tmp/flexlora_gpu_build
cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLEXLORA_CUDA=ON \
  -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
  > "$OUTDIR/build.log" 2>&1 && cmake --build "$BUILD" -j "$(nproc)" >> "$OUTDIR/build.log" 2>&1
rc=$?
tail -n 25 "$OUTDIR/build.log"
[ $rc -eq 0 ] || { echo "BUILD FAILED (rc $rc)"; exit 4; }
# In place for this run only (the device machine's tree is a throwaway copy); removed on exit.
cp "$BUILD"/_core*.so "$BUILD"/_cuda*.so server/
trap 'rm -f "$ROOT"/server/_core.*.so "$ROOT"/server/_cuda.*.so' EXIT
export LD_LIBRARY_PATH=$($PY -c "import scipy_openblas32 as s; print(s.get_lib_dir())")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
$PY -c "from server import cuda; print('cuda.available():', cuda.available())"

step "tests/cuda"
timeout 180 $PY -m pytest -q -rs -p no:cacheprovider tests/cuda --junitxml="$OUTDIR/cuda_tests.xml" 2>&1 \
  | tee "$OUTDIR/cuda_tests.log" | tail -n 40
test_rc=${PIPESTATUS[0]}

step "bench paper_round (fp32 and tf32)"
timeout 170 $PY benchmarks/bench_gpu.py --scale paper_round --tf32 --repeats 3 --opt-modules 7 \
  --json "$OUTDIR/bench_paper_round.json" 2>&1 | tee "$OUTDIR/bench_paper_round.log"
step "bench gpu_round"
timeout 200 $PY benchmarks/bench_gpu.py --scale gpu_round --repeats 2 --opt-modules 2 \
  --json "$OUTDIR/bench_gpu_round.json" 2>&1 | tee "$OUTDIR/bench_gpu_round.log"

step "done: tests rc $test_rc; files in $OUTDIR"
ls -la "$OUTDIR"
exit "$test_rc"
