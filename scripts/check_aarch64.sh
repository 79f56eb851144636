#!/usr/bin/env bash
# Cross-compile the CPU path of csrc/ for aarch64 (the Jetson's CPU), with and without
# OpenMP, and link it into a shared object: a Jetson build break shows up here, on x86.
#
#   bash scripts/check_aarch64.sh          # exit 0 ok, 77 skipped (no cross compiler), else failed
#
# Needs Debian's g++-aarch64-linux-gnu (apt-get install -y g++-aarch64-linux-gnu); CXX_AARCH64
# overrides the compiler. cp_cpu.cpp must compile warning-free (-Wall -Wextra -Werror);
# bindings.cpp is compiled against this machine's Python and pybind11 headers (the same
# LP64 data model as aarch64 Linux). The CUDA file is not cross-compiled: on the Jetson it
# is built by JetPack's nvcc (docs/native.md).
set -euo pipefail
cd "$(dirname "$0")/.."
CXX="${CXX_AARCH64:-aarch64-linux-gnu-g++}"
if ! command -v "$CXX" >/dev/null 2>&1; then
  echo "skip: $CXX not found (apt-get install -y g++-aarch64-linux-gnu)"
  exit 77
fi
PY="${PYTHON:-python}"
PYINC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
PBINC="$("$PY" -c 'import pybind11; print(pybind11.get_include())' 2>/dev/null || true)"
READELF="${CXX%g++}readelf"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
BASE=(-std=c++17 -O3 -fPIC -fno-math-errno -Icsrc)
for omp in off on; do
  EXTRA=()
  [ "$omp" = on ] && EXTRA=(-fopenmp -DCPSL_WITH_OPENMP=1)
  "$CXX" "${BASE[@]}" "${EXTRA[@]}" -Wall -Wextra -Werror -c csrc/cp_cpu.cpp -o "$OUT/cp_cpu_$omp.o"
  OBJS=("$OUT/cp_cpu_$omp.o")
  if [ -n "$PBINC" ]; then
    "$CXX" "${BASE[@]}" "${EXTRA[@]}" -Wall -isystem "$PYINC" -isystem "$PBINC" -c csrc/bindings.cpp \
      -o "$OUT/bindings_$omp.o"
    OBJS+=("$OUT/bindings_$omp.o")
  else
    echo "note: pybind11 is not importable by $PY: bindings.cpp not compiled (pip install pybind11)"
  fi
  "$CXX" -shared "${EXTRA[@]}" "${OBJS[@]}" -o "$OUT/_C_$omp.so"
  machine="$("$READELF" -h "$OUT/_C_$omp.so" | sed -n 's/^ *Machine: *//p')"
  echo "aarch64 OpenMP $omp: $machine"
  [ "$machine" = "AArch64" ] || { echo "error: expected an AArch64 object, got '$machine'"; exit 1; }
done
echo "aarch64 cross-compile ok ($("$CXX" --version | head -1))"
