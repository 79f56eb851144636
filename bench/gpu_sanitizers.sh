# compute-sanitizer part of bench/gpu_check.sh `check` (sourced: uses its log, left_s, OUTDIR,
# SUMMARY, FAILED, PY). memcheck, racecheck and synccheck each run bench/cuda_driver.py (torch
# included), instrumenting cpsl's kernels only (--kernel-name kns=cpsl: torch's own kernels
# run unpatched, which keeps a torch process under the tool within a minute or two), all three
# at once when the GPU's compute mode allows several processes (SAN_PARALLEL=0: one by one).
# A probe first runs a torch-free CUDA context under memcheck: where the tool is missing or
# reports the device as unsupported, the sanitizers are N/A (listed, not a failure).
SAN_LIMIT_S="${SAN_LIMIT_S:-150}"

san_record() {  # san_record STATUS NAME NOTE: one summary line (ok / N/A / FAILED)
  printf '%-7s %s (%s)\n' "$1" "$2" "$3" >>"$SUMMARY"
  log "--- [$2] $1: $3"
  [ "$1" = FAILED ] && FAILED+=("$2")
  return 0
}

san_unsupported() {  # the tool's own words for a GPU it cannot instrument
  grep -qiE "device (is )?not supported|unsupported (device|gpu)" <<<"$1"
}

san_find() {
  command -v compute-sanitizer 2>/dev/null && return
  [ -x /usr/local/cuda/bin/compute-sanitizer ] && echo /usr/local/cuda/bin/compute-sanitizer
  return 0
}

# san_probe SAN [FILTER...]: the tool on a bare CUDA context (cpsl._C.cuda_usable, no torch)
san_probe() {
  local san=$1
  shift
  timeout --kill-after=5 45 "$san" --tool memcheck "$@" --error-exitcode 3 "$PY" -c \
    "import cpsl._C as C; w = C.cuda_usable(0); print('cuda_usable:', w or 'yes'); raise SystemExit(1 if w else 0)" 2>&1
}

# san_run TOOL SAN LIMIT FILTER...: one tool on the driver, output in sanitizer_TOOL.log, rc in .rc
san_run() {
  local tool=$1 san=$2 limit=$3
  shift 3
  local env_extra=()
  # no caching allocator under memcheck: out-of-bounds accesses hit real allocation ends
  [ "$tool" = memcheck ] && env_extra=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  local t0
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" env ${env_extra[@]+"${env_extra[@]}"} "$san" --tool "$tool" "$@" \
    --error-exitcode 3 "$PY" bench/cuda_driver.py >"$OUTDIR/sanitizer_$tool.log" 2>&1
  echo "$? $(( $(date +%s) - t0 ))" >"$OUTDIR/sanitizer_$tool.rc"
}

san_verdict() {  # san_verdict TOOL LIMIT: the summary line of one finished tool
  local tool=$1 limit=$2 rc dt
  read -r rc dt <"$OUTDIR/sanitizer_$tool.rc"
  log "=== [$tool] (limit ${limit}s, ${dt}s)"
  tail -15 "$OUTDIR/sanitizer_$tool.log" | tee -a "$LOG"
  if [ "$rc" -eq 0 ] && grep -q "ERROR SUMMARY: 0 errors" "$OUTDIR/sanitizer_$tool.log"; then
    san_record ok "$tool" "${dt}s"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    san_record FAILED "$tool" "timed out after ${limit}s"
  elif [ "$rc" -eq 0 ]; then
    san_record FAILED "$tool" "exit 0 but no 'ERROR SUMMARY: 0 errors': did the tool check anything?"
  else
    san_record FAILED "$tool" "rc=$rc, ${dt}s"
  fi
}

sanitizers() {
  local tools=(memcheck racecheck synccheck) san out rc tool
  if [ "$(left_s)" -lt 60 ]; then
    for tool in "${tools[@]}"; do san_record FAILED "$tool" "no time left"; done
    return 0
  fi
  san="$(san_find)"
  if [ -z "$san" ]; then
    for tool in "${tools[@]}"; do san_record N/A "$tool" "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"; done
    return 0
  fi
  local filter=(--kernel-name kns=cpsl)
  log ""
  log "=== [sanitizer-probe] $san --tool memcheck ${filter[*]} (limit 45s)"
  out="$(san_probe "$san" "${filter[@]}")"
  rc=$?
  if [ "$rc" -ne 0 ] && ! san_unsupported "$out"; then
    # e.g. a tool that does not know the kernel filter: retry without it (every kernel instrumented)
    log "$out"
    log "(the probe failed with the kernel filter; retrying without it)"
    filter=()
    out="$(san_probe "$san")"
    rc=$?
  fi
  log "$out"
  if san_unsupported "$out"; then
    for tool in "${tools[@]}"; do san_record N/A "$tool" "compute-sanitizer does not support this device"; done
    return 0
  fi
  if [ "$rc" -ne 0 ]; then
    san_record FAILED sanitizer-probe "rc=$rc on a bare CUDA context"
    return 0
  fi
  local limit
  limit=$(( $(left_s) - 5 ))
  [ "$limit" -gt "$SAN_LIMIT_S" ] && limit=$SAN_LIMIT_S
  if [ "$limit" -lt 20 ]; then
    for tool in "${tools[@]}"; do san_record FAILED "$tool" "no time left"; done
    return 0
  fi
  local mode parallel="${SAN_PARALLEL:-}"
  mode="$(nvidia-smi --query-gpu=compute_mode --format=csv,noheader -i 0 2>/dev/null || echo unknown)"
  [ -z "$parallel" ] && { [ "$mode" = Default ] && parallel=1 || parallel=0; }
  log "=== [sanitizers] ${tools[*]} on bench/cuda_driver.py, limit ${limit}s each, compute mode '$mode', parallel=$parallel"
  if [ "$parallel" = 1 ]; then
    local pids=()
    for tool in "${tools[@]}"; do
      san_run "$tool" "$san" "$limit" ${filter[@]+"${filter[@]}"} &
      pids+=($!)
    done
    wait "${pids[@]}"
    for tool in "${tools[@]}"; do san_verdict "$tool" "$limit"; done
  else
    for tool in "${tools[@]}"; do
      limit=$(( $(left_s) - 5 ))
      [ "$limit" -gt "$SAN_LIMIT_S" ] && limit=$SAN_LIMIT_S
      if [ "$limit" -lt 20 ]; then san_record FAILED "$tool" "no time left"; continue; fi
      san_run "$tool" "$san" "$limit" ${filter[@]+"${filter[@]}"}
      san_verdict "$tool" "$limit"
    done
  fi
}
