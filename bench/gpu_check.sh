#!/usr/bin/env bash
# GPU check of the native CP core, sized for the device tool: two calls (each well under the
# tool's 8-10 minute command limit, together ~10 minutes: a session has 15 minutes of device
# time, machine start included) on a fresh GPU machine without internet (torch with CUDA, nvcc, cmake, pybind11 and
# scikit-build-core preinstalled; pytest maybe not).
#
#   bash bench/gpu_check.sh prepare          # HERE, with internet: wheels of the test deps -> bench/.wheels/
#   bash bench/gpu_check.sh check  [OUTDIR]  # call 1: build + install, build_info, the CUDA tests
#                                            #   (fails unless >= MIN_CUDA_TESTS pass, none skipped),
#                                            #   compute-sanitizer memcheck/racecheck/synccheck on bench/cuda_driver.py
#   bash bench/gpu_check.sh bench  [OUTDIR]  # call 2: bench/cp_kernel.py (separate + arena layouts) and
#                                            #   bench/train_step.py on CUDA (rebuilds only if call 1's build is gone)
#   bash bench/gpu_check.sh collect          # anywhere: the CUDA tests are collected with pytest + torch only
#
# The exact commands of the next GPU session (the `run` tool; OUTDIR defaults to $OUT, whose
# files come back; then commit them under bench/results/gpu_<card>/):
#   bash bench/gpu_check.sh prepare                                   # here, before the first run
#   run(command="bash bench/gpu_check.sh check", carry=["bench/.wheels"], timeout_s=400)
#   run(command="bash bench/gpu_check.sh bench", carry=["bench/.wheels"], timeout_s=300)
#   give_back()
# (check the device tool's `status` first: budget_left_s must cover ~10 min plus the start)
#
# Each call has a budget (BUDGET_S; default 330 s for check, 240 s for bench): every step's
# time limit is cut to what is left, so the call ends in time and still writes its summary.
# Files in OUTDIR: gpu_check_<mode>.log (everything), build.log, summary_<mode>.txt,
# pytest_cuda.xml, cp_kernel_cuda_{separate,arena}.json, train_step_cuda.json.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:-}"
MIN_CUDA_TESTS=13     # tests in tests/test_cp_native_cuda.py (parametrized cases counted)
CUDA_TESTS=(tests/test_cp_native_cuda.py)
WHEELS="$ROOT/bench/.wheels"
# the CUDA tests need pytest + torch only (run with --noconftest: tests/conftest.py imports
# numpy); tomli and exceptiongroup are pytest's extra deps on Python 3.10. Pure-Python wheels.
TEST_DEPS=(pytest tomli exceptiongroup)
PY="${PYTHON:-python}"
case "$MODE" in bench) BUDGET_S="${BUDGET_S:-240}" ;; *) BUDGET_S="${BUDGET_S:-330}" ;; esac
T0=$(date +%s)
# no third-party pytest plugin (hypothesis, ...) may break or slow the CUDA run
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1

case "$MODE" in
  prepare)
    # pure-Python wheels only (py3-none-any), resolved for Python 3.10 (the oldest supported:
    # it needs tomli + exceptiongroup), so they install on whatever Python the GPU machine has
    mkdir -p "$WHEELS"
    exec "$PY" -m pip download -q --only-binary=:all: --implementation py --abi none --platform any \
      --python-version 3.10 -d "$WHEELS" "${TEST_DEPS[@]}"
    ;;
  collect)
    # what `check` runs, collection only: it must not depend on hypothesis, click, yaml, sklearn
    out="$("$PY" -m pytest --collect-only -q -p no:cacheprovider --noconftest -m cuda "${CUDA_TESTS[@]}" 2>&1)"
    rc=$?
    echo "$out" | tail -5
    n="$(echo "$out" | grep -c '::')"
    echo "collected $n CUDA tests (need >= $MIN_CUDA_TESTS)"
    [ "$rc" -eq 0 ] && [ "$n" -ge "$MIN_CUDA_TESTS" ]
    exit $?
    ;;
  check|bench) ;;
  *)
    echo "error: usage: bash bench/gpu_check.sh prepare|check|bench|collect [OUTDIR]" >&2
    exit 2
    ;;
esac

OUTDIR="${2:-${OUT:-$ROOT/bench/results/gpu}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/gpu_check_$MODE.log"
SUMMARY="$OUTDIR/summary_$MODE.txt"
: >"$LOG"
: >"$SUMMARY"
FAILED=()

log() { echo "$@" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run with min(LIMIT_S, budget left), tee into the log, record the outcome
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET_S - ($(date +%s) - T0) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    log "--- [$name] SKIPPED: budget of ${BUDGET_S}s spent"
    echo "FAILED  $name (no time left)" >>"$SUMMARY"
    FAILED+=("$name")
    return
  fi
  local t=$(date +%s)
  log ""
  log "=== [$name] (limit ${limit}s) $*"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
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

finish() {
  log ""
  log "=== summary $MODE ($(( $(date +%s) - T0 ))s)"
  tee -a "$LOG" <"$SUMMARY"
  if [ ${#FAILED[@]} -gt 0 ]; then
    log "FAILED steps: ${FAILED[*]}"
    exit 1
  fi
  log "all steps ok"
  exit 0
}

# the architecture of GPU 0 only (one -real target: a fast build), unless CPSL_CUDA_ARCHS is set
archs() {
  [ -n "${CPSL_CUDA_ARCHS:-}" ] && { echo "$CPSL_CUDA_ARCHS"; return; }
  "$PY" -c "import torch; a, b = torch.cuda.get_device_capability(0); print(f'{a}{b}-real')" 2>/dev/null || echo ""
}

install_pkg() {
  local a
  a="$(archs)"
  echo "CPSL_CUDA_ARCHS=${a:-<default list>}"
  CPSL_CUDA=ON CPSL_CUDA_ARCHS="$a" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . >"$OUTDIR/build.log" 2>&1
  local rc=$?
  grep -E "CUDA path|CUDA architectures|nvcc|warning|error|Successfully installed" "$OUTDIR/build.log" | tail -40
  [ $rc -eq 0 ] || { tail -60 "$OUTDIR/build.log"; return $rc; }
  # the source tree shadows site-packages when Python runs from the repo root: put the
  # freshly built module next to the sources too (git-ignored; kept between warm calls)
  cp -f "$(ls -t build/*/_C*.so | head -1)" cpsl/
}

test_deps() {
  "$PY" -m pytest --version 2>/dev/null && return 0
  [ -d "$WHEELS" ] || { echo "pytest missing and no $WHEELS (run 'bash bench/gpu_check.sh prepare' and carry it)"; return 1; }
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" pytest && "$PY" -m pytest --version
}

ext_ok() {
  "$PY" -c "import cpsl._C as C, sys; from cpsl.cp import native; ok, why = native.available('cuda'); print('native.available(cuda):', ok, why); sys.exit(0 if ok else 1)"
}

export -f install_pkg archs test_deps ext_ok log
export OUTDIR PY LOG WHEELS

log "cpsl GPU check '$MODE' in $ROOT -> $OUTDIR ($(date -u +%FT%TZ)), budget ${BUDGET_S}s"
step nvidia-smi 20 nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
step versions 60 "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

if [ "$MODE" = check ]; then
  step install 150 bash -c install_pkg
  step build_info 60 "$PY" -c "import json, cpsl._C as C; i = dict(C.build_info()); print(json.dumps(i, indent=1)); assert i['cuda'] and i['cuda_devices'] > 0, 'no CUDA in cpsl._C'"
  step available 30 bash -c ext_ok
  step test-deps 60 bash -c test_deps
  # CPSL_REQUIRE_CUDA=1: the CUDA tests fail instead of skipping; the count check below
  # fails the step unless at least MIN_CUDA_TESTS passed and none was skipped
  step pytest-cuda 100 env CPSL_REQUIRE_CUDA=1 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --noconftest \
    --junitxml="$OUTDIR/pytest_cuda.xml" "${CUDA_TESTS[@]}"
  step pytest-count 20 "$PY" - "$OUTDIR/pytest_cuda.xml" "$MIN_CUDA_TESTS" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
s = root if root.tag == "testsuite" else root.find("testsuite")
n, f, e, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
passed = n - f - e - sk
print(f"CUDA tests: {passed} passed, {f} failed, {e} errors, {sk} skipped (need >= {sys.argv[2]} passed, 0 skipped)")
sys.exit(0 if passed >= int(sys.argv[2]) and f == e == sk == 0 else 1)
EOF
  SAN="$(command -v compute-sanitizer || true)"
  [ -z "$SAN" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SAN=/usr/local/cuda/bin/compute-sanitizer
  if [ -n "$SAN" ]; then
    # no caching allocator under memcheck: out-of-bounds accesses hit real allocation ends
    step memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 3 \
      --leak-check no "$PY" bench/cuda_driver.py
    step racecheck 45 "$SAN" --tool racecheck --error-exitcode 3 "$PY" bench/cuda_driver.py
    step synccheck 30 "$SAN" --tool synccheck --error-exitcode 3 "$PY" bench/cuda_driver.py
  else
    log "=== [compute-sanitizer] not found (PATH, /usr/local/cuda/bin)"
    echo "FAILED  compute-sanitizer (not found)" >>"$SUMMARY"
    FAILED+=("compute-sanitizer")
  fi
else
  if ! ext_ok >>"$LOG" 2>&1; then
    step install 150 bash -c install_pkg
  fi
  step available 30 bash -c ext_ok
  step bench-kernel-separate 100 "$PY" bench/cp_kernel.py --device cuda --quick --json "$OUTDIR/cp_kernel_cuda_separate.json"
  step bench-kernel-arena 80 "$PY" bench/cp_kernel.py --device cuda --quick --layout arena \
    --json "$OUTDIR/cp_kernel_cuda_arena.json"
  # bench/train_step.py imports cpsl.train, whose metrics need scikit-learn: a bare GPU box
  # without it gets a FAILED step that names the missing module
  step bench-train-step 50 "$PY" bench/train_step.py --device cuda --steps 20 --json "$OUTDIR/train_step_cuda.json"
fi
finish
