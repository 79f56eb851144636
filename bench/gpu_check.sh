#!/usr/bin/env bash
# GPU check of the native CP core, sized for the device tool: a session has 15 minutes of device
# time, machine start (minutes) included, and may get one chance. The two device calls below
# take at most 290 s + 130 s = 7 minutes of command time on one H100/H200 from a cold
# machine, so a rerun of the check still fits after a failure. The machine has no internet:
# everything it needs (the source, bench/.wheels) is carried; nothing is fetched there.
#
#   bash bench/gpu_check.sh prepare          # HERE, with internet: wheels of pytest (+ deps), pybind11 and
#                                            #   scikit-build-core -> bench/.wheels/ (git-ignored)
#   bash bench/gpu_check.sh collect          # HERE: the CUDA tests are collected with pytest + torch only
#   bash bench/gpu_check.sh check  [OUTDIR]  # device call 1 (budget 290 s): preflight, build + install for the
#                                            #   card's sm, build_info, the CUDA tests (fails unless >=
#                                            #   MIN_CUDA_TESTS pass and none is skipped), compute-sanitizer
#                                            #   memcheck/racecheck/synccheck on bench/cuda_driver.py (N/A where
#                                            #   the tool is missing or does not support the device)
#   bash bench/gpu_check.sh bench  [OUTDIR]  # device call 2 (budget 130 s): only after a passing check on the
#                                            #   same machine (FORCE_BENCH=1 overrides): bench/cp_kernel.py
#                                            #   (separate + arena layouts) and bench/train_step.py on CUDA
#
# The exact calls of the next GPU session (OUTDIR defaults to $OUT, whose files come back; commit
# them under bench/results/gpu_<card>/ with the card's name):
#   bash bench/gpu_check.sh prepare && bash bench/gpu_check.sh collect               # here, first
#   status()                                  # budget_left_s must cover ~7 min + the start (2-4 min)
#   run(command="bash bench/gpu_check.sh check", carry=["bench/.wheels"], timeout_s=330)
#   run(command="bash bench/gpu_check.sh bench", carry=["bench/.wheels"], timeout_s=170)
#   give_back()
#
# Each call has a budget (BUDGET_S; default 290 s for check, 130 s for bench): every step's
# time limit is cut to what is left, so the call ends in time and still writes its summary.
# Files in OUTDIR: gpu_check_<mode>.log (everything), build.log, summary_<mode>.txt,
# pytest_cuda.xml, sanitizer_<tool>.log, cp_kernel_cuda_{separate,arena}.json, train_step_cuda.json.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:-}"
MIN_CUDA_TESTS=19     # tests of tests/test_cp_native_cuda.py on one GPU (parametrized cases counted;
                      # the multi_gpu test is deselected on one GPU, it makes 20 on two)
CUDA_TESTS=(tests/test_cp_native_cuda.py)
WHEELS="$ROOT/bench/.wheels"
PASSED_MARK="$ROOT/build/gpu_check_passed"   # git-ignored; kept on a warm machine between calls
# test and build deps the image lacks are installed from the carried wheels HERE, never into
# site-packages (git-ignored, kept between warm calls; on PYTHONPATH for the build and pytest)
DEPS_DIR="$ROOT/build/pydeps"
# the CUDA tests need pytest + torch only (run with --noconftest: tests/conftest.py imports
# numpy); tomli and exceptiongroup are pytest's extra deps on Python 3.10; pybind11 and
# scikit-build-core build cpsl._C when the image lacks them. Pure-Python wheels.
TEST_DEPS=(pytest tomli exceptiongroup)
BUILD_DEPS=(pybind11 scikit-build-core)
PY="${PYTHON:-python3}"
case "$MODE" in bench) BUDGET_S="${BUDGET_S:-130}" ;; *) BUDGET_S="${BUDGET_S:-290}" ;; esac
T0=$(date +%s)
# no third-party pytest plugin (hypothesis, ...) may break or slow the CUDA run
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1

case "$MODE" in
  prepare)
    # pure-Python wheels only (py3-none-any), resolved for Python 3.10 (the oldest supported:
    # it needs tomli + exceptiongroup), so they install on whatever Python the GPU machine has
    mkdir -p "$WHEELS"
    exec "$PY" -m pip download -q --only-binary=:all: --implementation py --abi none --platform any \
      --python-version 3.10 -d "$WHEELS" "${TEST_DEPS[@]}" "${BUILD_DEPS[@]}"
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
    echo "error: usage: bash bench/gpu_check.sh prepare|collect|check|bench [OUTDIR]" >&2
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
left_s() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }

# step NAME LIMIT_S CMD...: run with min(LIMIT_S, budget left), tee into the log, record the
# outcome; returns 1 only when the command ran and failed (a step skipped for lack of budget
# is recorded as FAILED and returns 0, so that every later step is listed too)
step() {
  local name=$1 limit=$2
  shift 2
  local left
  left=$(left_s)
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    log "--- [$name] SKIPPED: budget of ${BUDGET_S}s spent"
    echo "FAILED  $name (no time left)" >>"$SUMMARY"
    FAILED+=("$name")
    return 0
  fi
  local t
  t=$(date +%s)
  log ""
  log "=== [$name] (limit ${limit}s) $*"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t ))
  if [ "$rc" -eq 0 ]; then
    log "--- [$name] ok (${dt}s)"
    echo "ok      $name (${dt}s)" >>"$SUMMARY"
    return 0
  fi
  [ "$rc" -eq 124 ] && log "--- [$name] TIMED OUT after ${limit}s"
  log "--- [$name] FAILED rc=$rc (${dt}s)"
  echo "FAILED  $name rc=$rc (${dt}s)" >>"$SUMMARY"
  FAILED+=("$name")
  return 1
}

finish() {
  log ""
  log "=== summary $MODE ($(( $(date +%s) - T0 ))s)"
  tee -a "$LOG" <"$SUMMARY"
  if [ ${#FAILED[@]} -gt 0 ]; then
    log "FAILED steps: ${FAILED[*]}"
    exit 1
  fi
  [ "$MODE" = check ] && { mkdir -p "$(dirname "$PASSED_MARK")"; date -u +%FT%TZ >"$PASSED_MARK"; }
  log "all steps ok"
  exit 0
}

# the architecture of GPU 0 only (one -real target: a fast build), unless CPSL_CUDA_ARCHS is set
archs() {
  [ -n "${CPSL_CUDA_ARCHS:-}" ] && { echo "$CPSL_CUDA_ARCHS"; return; }
  "$PY" -c "import torch; a, b = torch.cuda.get_device_capability(0); print(f'{a}{b}-real')" 2>/dev/null || echo ""
}

# what the build and the tests need, checked in seconds instead of failing minutes into a build;
# pybind11 / scikit-build-core are installed from the carried wheels when the image lacks them
preflight() {
  if ! "$PY" -c "import pybind11, scikit_build_core" 2>/dev/null && [ -d "$WHEELS" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --target "$DEPS_DIR" $BUILD_DEPS_STR || true
  fi
  "$PY" - <<'EOF'
import importlib, os, re, shutil, subprocess, sys, sysconfig
bad = []
inc = sysconfig.get_paths().get("include", "")
ok = os.path.exists(os.path.join(inc, "Python.h"))
print(f"Python.h: {'found' if ok else 'MISSING'} in {inc}")
if not ok:
    bad.append("Python.h (the python3-dev headers)")
for mod in ("pybind11", "scikit_build_core"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod}: {getattr(m, '__version__', '?')}")
    except ImportError as e:
        print(f"{mod}: MISSING ({e})")
        bad.append(mod)
for tool, fallback, need in (("cmake", None, (3, 18)), ("nvcc", "/usr/local/cuda/bin/nvcc", None)):
    exe = shutil.which(tool) or (fallback if fallback and os.path.exists(fallback) else None)
    ver = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout if exe else ""
    m = re.search(r"(?:version|release) (\d+)\.(\d+)", ver)
    v = (int(m.group(1)), int(m.group(2))) if m else None
    print(f"{tool}: {exe or 'MISSING'} {v}")
    if exe is None or (need and (v is None or v < need)):
        bad.append(f"{tool}{' >= %d.%d' % need if need else ''}")
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): cuda available {torch.cuda.is_available()}, "
      f"{torch.cuda.device_count()} device(s)")
if not torch.cuda.is_available():
    bad.append("torch.cuda.is_available()")
if bad:
    print("error: preflight: missing " + ", ".join(bad))
sys.exit(1 if bad else 0)
EOF
}

install_pkg() {
  local a
  a="$(archs)"
  echo "CPSL_CUDA_ARCHS=${a:-<default list>}"
  # pybind11's CMake config named explicitly: it may sit in $DEPS_DIR rather than site-packages
  CPSL_CUDA=ON CPSL_CUDA_ARCHS="$a" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-Dpybind11_DIR=$("$PY" -m pybind11 --cmakedir)" \
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
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --target "$DEPS_DIR" pytest && "$PY" -m pytest --version
}

ext_ok() {
  "$PY" -c "import cpsl._C as C, sys; from cpsl.cp import native; ok, why = native.available('cuda'); print('native.available(cuda):', ok, why); sys.exit(0 if ok else 1)"
}

export -f install_pkg archs test_deps ext_ok log preflight
export OUTDIR PY LOG WHEELS DEPS_DIR
export PYTHONPATH="$DEPS_DIR${PYTHONPATH:+:$PYTHONPATH}"
export BUILD_DEPS_STR="${BUILD_DEPS[*]}"

log "cpsl GPU check '$MODE' in $ROOT -> $OUTDIR ($(date -u +%FT%TZ)), budget ${BUDGET_S}s"
if [ "$MODE" = bench ] && [ ! -f "$PASSED_MARK" ] && [ "${FORCE_BENCH:-0}" != 1 ]; then
  echo "error: no passing 'check' on this machine ($PASSED_MARK missing): run it first, or FORCE_BENCH=1" >&2
  echo "FAILED  gate (no passing check on this machine)" >>"$SUMMARY"
  exit 2
fi
step nvidia-smi 15 nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,compute_mode --format=csv

if [ "$MODE" = check ]; then
  rm -f "$PASSED_MARK"
  step preflight 60 bash -c preflight || finish
  step install 120 bash -c install_pkg || finish
  step build_info 20 "$PY" -c "import json, cpsl._C as C; i = dict(C.build_info()); print(json.dumps(i, indent=1)); assert i['cuda'] and i['cuda_devices'] > 0, 'no CUDA in cpsl._C'"
  step available 20 bash -c ext_ok
  step test-deps 30 bash -c test_deps
  # one GPU: the multi_gpu test is deselected (it could only skip), so that 0 skipped is required
  MARK="cuda"
  [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)" -lt 2 ] && MARK="cuda and not multi_gpu"
  # CPSL_REQUIRE_CUDA=1: the CUDA tests fail instead of skipping; the count check below
  # fails the step unless at least MIN_CUDA_TESTS passed and none was skipped. A test that
  # hangs dumps every thread's stack after 60 s (faulthandler); the slowest ten are listed.
  step pytest-cuda 110 env CPSL_REQUIRE_CUDA=1 "$PY" -m pytest -m "$MARK" -q -rs -p no:cacheprovider --noconftest \
    -o faulthandler_timeout=60 --durations=10 --junitxml="$OUTDIR/pytest_cuda.xml" "${CUDA_TESTS[@]}"
  step pytest-count 10 "$PY" - "$OUTDIR/pytest_cuda.xml" "$MIN_CUDA_TESTS" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
s = root if root.tag == "testsuite" else root.find("testsuite")
n, f, e, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
passed = n - f - e - sk
print(f"CUDA tests: {passed} passed, {f} failed, {e} errors, {sk} skipped (need >= {sys.argv[2]} passed, 0 skipped)")
sys.exit(0 if passed >= int(sys.argv[2]) and f == e == sk == 0 else 1)
EOF
  # shellcheck source=bench/gpu_sanitizers.sh
  source "$ROOT/bench/gpu_sanitizers.sh"
  sanitizers
else
  if ! ext_ok >>"$LOG" 2>&1; then
    step install 120 bash -c install_pkg
  fi
  step available 15 bash -c ext_ok
  step bench-kernel-separate 60 "$PY" bench/cp_kernel.py --device cuda --quick --json "$OUTDIR/cp_kernel_cuda_separate.json"
  step bench-kernel-arena 45 "$PY" bench/cp_kernel.py --device cuda --quick --layout arena \
    --json "$OUTDIR/cp_kernel_cuda_arena.json"
  # bench/train_step.py imports cpsl.train, whose metrics need scikit-learn: a bare GPU box
  # without it gets a FAILED step that names the missing module
  step bench-train-step 40 "$PY" bench/train_step.py --device cuda --steps 20 --json "$OUTDIR/train_step_cuda.json"
fi
finish
