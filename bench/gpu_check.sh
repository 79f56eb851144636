#!/usr/bin/env bash
# One-shot check of the CUDA path of cpsl._C on a fresh GPU machine (no internet; torch with
# CUDA, nvcc, cmake, pybind11 and scikit-build-core preinstalled):
#   build + install, build_info, the CUDA tests, compute-sanitizer (memcheck, racecheck,
#   synccheck) on a tiny driver of the kernels, and the CUDA benchmark.
#
#   bash bench/gpu_check.sh [OUTDIR]      # OUTDIR: default $OUT, else bench/results/gpu
#
# Every step runs even when an earlier one failed; the exit status is non-zero when any did.
# Files in OUTDIR: gpu_check.log (everything), build.log (verbose build), summary.txt,
# cp_kernel_cuda.json (benchmark rows). Meant to finish in well under 8 minutes.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUTDIR="${1:-${OUT:-$ROOT/bench/results/gpu}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/gpu_check.log"
SUMMARY="$OUTDIR/summary.txt"
: >"$LOG"
: >"$SUMMARY"
PY="${PYTHON:-python}"
FAILED=()
T0=$(date +%s)

log() { echo "$@" | tee -a "$LOG"; }

# step NAME TIMEOUT_S CMD...: run, tee into the log, record the outcome
step() {
  local name=$1 limit=$2
  shift 2
  local t=$(date +%s)
  log ""
  log "=== [$name] $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t ))
  if [ "$rc" -eq 0 ]; then
    log "--- [$name] ok (${dt}s)"
    echo "ok      $name (${dt}s)" >>"$SUMMARY"
  else
    [ "$rc" -eq 124 ] && log "--- [$name] TIMED OUT after ${limit}s"
    log "--- [$name] FAILED rc=$rc (${dt}s)"
    echo "FAILED  $name rc=$rc (${dt}s)" >>"$SUMMARY"
    FAILED+=("$name")
  fi
}

log "cpsl GPU check in $ROOT -> $OUTDIR ($(date -u +%FT%TZ))"
step nvidia-smi 30 nvidia-smi
step versions 60 "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

# build + install (verbose build output to its own file); CPSL_CUDA=ON: a missing nvcc fails here
install() {
  CPSL_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps -v . \
    >"$OUTDIR/build.log" 2>&1
  local rc=$?
  grep -E "CUDA path|warning|error|Successfully installed" "$OUTDIR/build.log" | tail -40
  [ $rc -eq 0 ] || { tail -60 "$OUTDIR/build.log"; return $rc; }
  # the source tree shadows site-packages when Python runs from the repo root: put the
  # freshly built module next to the sources too (it is git-ignored)
  cp -f "$(ls -t build/*/_C*.so | head -1)" cpsl/
}
export -f install log
export OUTDIR PY LOG
step install 420 bash -c install

step build_info 60 "$PY" - <<'EOF'
import json, cpsl._C as C
info = dict(C.build_info())
print(json.dumps(info, indent=1))
assert info["cuda"], "cpsl._C was built without CUDA"
assert info["cuda_devices"] > 0, "cpsl._C sees no CUDA device"
from cpsl.cp import native
print("native.available('cuda') =", native.available("cuda"))
assert native.available("cuda")[0]
EOF

export CPSL_REQUIRE_CUDA=1  # the CUDA tests fail instead of skipping when CUDA is unusable
step pytest-cuda 300 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/
step pytest-native-cpu 180 env -u CPSL_REQUIRE_CUDA "$PY" -m pytest -m "not cuda" -q -rs -p no:cacheprovider tests/test_cp_native.py

# a tiny driver of every kernel entry point (stats, scale, fused step, graph capture/replay,
# misaligned and 16-bit chunks) for compute-sanitizer
DRIVER="$(mktemp -d)/cp_driver.py"
cat >"$DRIVER" <<'EOF'
import torch
from cpsl.cp import native
from cpsl.cp.core import PenaltyParams
from cpsl.cp.reference import reference_stats

torch.manual_seed(0)
dev = "cuda"
base = torch.randn(70001, device=dev)
grads = [base[1:] * 4, torch.randn(3, 65, device=dev).half(), torch.randn(40000, device=dev).bfloat16(),
         torch.randn(0, device=dev), None, torch.randn(5, device=dev)]
gi = [0, 1, 1, 2, 2, 2]
p = PenaltyParams()
ref = reference_stats(grads, gi, 3, p, 1.0)
s = native.cp_stats(grads, gi, 3, p, 1.0)
native.cp_scale_(grads, gi, s, 3)
s2 = native.cp_step_(grads, gi, 3, p, 1.0)
g = torch.cuda.CUDAGraph()
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    native.cp_step_(grads, gi, 3, p, 1.0)
torch.cuda.current_stream().wait_stream(side)
with torch.cuda.graph(g):
    out = native.cp_step_(grads, gi, 3, p, 1.0)
for _ in range(3):
    g.replay()
torch.cuda.synchronize()
print("stats", s.tolist())
print("ref  ", ref.tolist())
assert torch.allclose(s.cpu()[:3], ref[:3], rtol=1e-6)
print("driver ok")
EOF

SAN="$(command -v compute-sanitizer || true)"
[ -z "$SAN" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SAN=/usr/local/cuda/bin/compute-sanitizer
if [ -n "$SAN" ]; then
  step memcheck 180 "$SAN" --tool memcheck --error-exitcode 3 --leak-check no "$PY" "$DRIVER"
  step racecheck 180 "$SAN" --tool racecheck --error-exitcode 3 "$PY" "$DRIVER"
  step synccheck 180 "$SAN" --tool synccheck --error-exitcode 3 "$PY" "$DRIVER"
else
  log "=== [compute-sanitizer] not found (PATH, /usr/local/cuda/bin)"
  echo "FAILED  compute-sanitizer (not found)" >>"$SUMMARY"
  FAILED+=("compute-sanitizer")
fi

step bench-cuda 300 "$PY" bench/cp_kernel.py --device cuda --json "$OUTDIR/cp_kernel_cuda.json"

log ""
log "=== summary ($(( $(date +%s) - T0 ))s)"
tee -a "$LOG" <"$SUMMARY"
if [ ${#FAILED[@]} -gt 0 ]; then
  log "FAILED steps: ${FAILED[*]}"
  exit 1
fi
log "all steps ok"
