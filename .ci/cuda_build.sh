#!/usr/bin/env bash
# CI's CUDA step: compile the CUDA backend (FLEXLORA_CUDA=ON: csrc/cuda/, bindings/cuda_bindings.cpp
# -> server._cuda) on a machine WITHOUT a GPU, then run the tests that need no device
# (tests/cuda; the `cuda_build` ones must pass, the `cuda` ones skip with the reason).
#
# It leaves the README's install (`pip install -e ".[all]"`, CPU only) untouched:
#   * pybind11 and the cuBLAS / cuSOLVER wheels go into a scratch --target folder, never into
#     the environment;
#   * cmake builds only the _cuda target into its own build folder;
#   * the tests load that _cuda*.so by path (FLEXLORA_CUDA_EXT, tests/cuda/conftest.py), so
#     nothing is copied into server/ and the editable install keeps pointing where it did.
# Needs nvcc (CUDA 13; $CUDACXX, PATH or /usr/local/cuda/bin), a C++ compiler, cmake >= 3.24
# (installed into the scratch folder when missing) and network access to PyPI for the wheels
# (about 700 MB; kept in the scratch folder between runs).
#
#   bash .ci/cuda_build.sh          # from anywhere; FLEXLORA_CUDA_CI_DIR moves the scratch folder
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${FLEXLORA_CUDA_CI_DIR:-$ROOT/build/ci-cuda}
PY=${PYTHON:-python}
PY=$(command -v "$PY")
start=$(date +%s)
step() { echo "== CUDA step [$(( $(date +%s) - start )) s] $*"; }

NVCC=${CUDACXX:-$(command -v nvcc || true)}
[ -n "$NVCC" ] || NVCC=/usr/local/cuda/bin/nvcc
if [ ! -x "$NVCC" ]; then
  echo "CUDA step: nvcc not found (CUDACXX, PATH, /usr/local/cuda/bin): cannot compile csrc/cuda" >&2
  exit 2
fi
step "nvcc: $("$NVCC" --version | tail -1)"

SITE=$WORK/site
# Pinned so that CI compiles against the same headers every time; bump together.
WHEELS=(pybind11==3.1.0 nvidia-cublas==13.10.0.20 nvidia-cusolver==12.4.1.2)
if [ "$(cat "$SITE/.installed" 2>/dev/null)" != "${WHEELS[*]}" ]; then
  step "pip install --target $SITE ${WHEELS[*]}"
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-compile --only-binary :all: --target "$SITE" "${WHEELS[@]}"
  echo "${WHEELS[*]}" > "$SITE/.installed"
else
  step "wheels already in $SITE"
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
cmake_ok() {
  local v
  v=$(cmake --version 2>/dev/null | head -1 | awk '{print $3}') || return 1
  [ -n "$v" ] && [ "$(printf '%s\n3.24\n' "$v" | sort -V | head -1)" = "3.24" ]
}
if ! cmake_ok; then
  step "cmake >= 3.24 missing: installing cmake and ninja into $SITE"
  "$PY" -m pip install -q --no-compile --only-binary :all: --upgrade --target "$SITE" cmake ninja
  export PATH=$SITE/bin:$PATH
fi
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)

BUILD=$WORK/cmake
step "configure ($BUILD)"
cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DFLEXLORA_CUDA=ON \
  -DCMAKE_CUDA_COMPILER="$NVCC" -DPython_EXECUTABLE="$PY" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" > "$WORK/configure.log" 2>&1 \
  || { tail -n 40 "$WORK/configure.log"; echo "CUDA step: cmake configure failed" >&2; exit 1; }
grep "FlexLoRA CUDA" "$WORK/configure.log" || true
step "build server._cuda"
cmake --build "$BUILD" --target _cuda -j "$(nproc)" > "$WORK/build.log" 2>&1 \
  || { grep -E -B2 -A6 "error|Error" "$WORK/build.log" | tail -n 60; echo "CUDA step: build failed" >&2; exit 1; }
EXT=$(ls "$BUILD"/_cuda*.so)
step "built $EXT"

step "tests/cuda against it (no GPU needed: the cuda_build tests must pass)"
FLEXLORA_REQUIRE_CUDA_BUILD=1 FLEXLORA_CUDA_EXT=$EXT \
  "$PY" -m pytest -q -p no:cacheprovider -rs tests/cuda
step "done"
