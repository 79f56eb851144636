#!/usr/bin/env bash
# Run the torch-free edge runner on an emulated aarch64 Debian (the Jetson's CPU architecture)
# against an artefact folder from `cpsl export`, and compare with the x86 golden outputs.
#
#   bash scripts/aarch64_edge_check.sh EDGE_DIR [--text "a great movie"] [--audio-features A.csv]
#                                      [--model model.onnx] [--cache DIR] [--rebuild]
#
# EDGE_DIR holds MODEL.onnx with MODEL.manifest.json and MODEL.golden.npz beside it (and
# MODEL.tokenizer.json for end-to-end graphs). Steps:
#   1. once, cached in --cache (env CPSL_AARCH64_CACHE, default ~/.cache/cpsl/aarch64): a Debian
#      bookworm arm64 userland (debootstrap --arch=arm64 --foreign, second stage and every later
#      command run through Debian's qemu-aarch64-static under proot, which re-enters qemu on each
#      exec: binfmt_misc is not needed) with python3 and a venv holding the runner's only
#      dependencies, onnxruntime + numpy + tokenizers, as aarch64 wheels from PyPI (pinned to the
#      host's versions where the host has them; CPSL_AARCH64_PINS overrides);
#   2. copies export/{runner,predict,frontend}.py and the artefact in, prints `uname -m` from inside,
#      runs `runner.py MODEL --check MODEL.golden.npz` (the golden file's tolerance) and, for an
#      end-to-end graph, one raw-text `runner.py predict` (audio features: --audio-features, else
#      the golden file's first audio row), and the same prediction on this x86 host;
#   3. prints PASS when the check passes and the aarch64 prediction and token ids match the x86
#      ones within the golden tolerance (atol + rtol*|x86|), else FAIL.
# Exit: 0 PASS, 1 FAIL, 2 bad input (one `error:` line), 77 cannot run here (no root to install
# debootstrap/qemu-user-static/proot). The emulated CPU defaults to neoverse-n1 (ARMv8.2-A with
# dot-product and fp16, the Orin's Cortex-A78AE feature level; CPSL_AARCH64_CPU overrides).
# What this proves and what not: bench/results/aarch64/README.md.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${CPSL_AARCH64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cpsl/aarch64}"
MIRROR="${CPSL_AARCH64_MIRROR:-http://deb.debian.org/debian}"
CPU="${CPSL_AARCH64_CPU:-neoverse-n1}"
PY="${PYTHON:-python3}"
TEXT="a wonderful, moving film with a great cast"
EDGE="" MODEL="" AUDIO="" REBUILD=0

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --text) [ $# -ge 2 ] || die "--text needs a value"; TEXT="$2"; shift 2 ;;
    --audio-features) [ $# -ge 2 ] || die "--audio-features needs a file"; AUDIO="$2"; shift 2 ;;
    --model) [ $# -ge 2 ] || die "--model needs a file name"; MODEL="$2"; shift 2 ;;
    --cache) [ $# -ge 2 ] || die "--cache needs a folder"; CACHE="$2"; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$EDGE" ] || die "one artefact folder only (got '$EDGE' and '$1')"; EDGE="$1"; shift ;;
  esac
done

# ------------------------------------------------------------------ argument checks (exit 2)
[ -n "$EDGE" ] || die "no artefact folder given (usage: bash scripts/aarch64_edge_check.sh EDGE_DIR)"
[ -d "$EDGE" ] || die "artefact folder not found: $EDGE"
EDGE="$(cd "$EDGE" && pwd)"
if [ -z "$MODEL" ]; then
  mapfile -t cands < <(cd "$EDGE" && for f in *.onnx; do [ -f "${f%.onnx}.golden.npz" ] && echo "$f"; done)
  [ ${#cands[@]} -ge 1 ] || die "$EDGE has no MODEL.onnx with a MODEL.golden.npz beside it (write one with cpsl export)"
  [ ${#cands[@]} -eq 1 ] || die "$EDGE has several graphs with golden files (${cands[*]}): pick one with --model"
  MODEL="${cands[0]}"
fi
[ "$(basename "$MODEL")" = "$MODEL" ] || die "--model is a file name inside $EDGE, got a path: $MODEL"
STEM="${MODEL%.onnx}"
[ "$STEM.onnx" = "$MODEL" ] || die "--model must name an .onnx graph, got $MODEL"
for f in "$MODEL" "$STEM.golden.npz" "$STEM.manifest.json"; do
  [ -f "$EDGE/$f" ] || die "$EDGE/$f not found (cpsl export writes the graph, its manifest and its golden file)"
done
[ -z "$AUDIO" ] || [ -f "$AUDIO" ] || die "--audio-features file not found: $AUDIO"
for f in runner.py predict.py frontend.py; do [ -f "$REPO/export/$f" ] || die "$REPO/export/$f is missing"; done
command -v "$PY" >/dev/null 2>&1 || die "host python '$PY' not found (set PYTHON=...)"
"$PY" -c "import numpy, onnxruntime" 2>/dev/null || die "host python '$PY' needs numpy and onnxruntime (the x86 reference run)"
GRAPH="$("$PY" - "$EDGE/$STEM.manifest.json" <<'EOF'
import json, sys
try:
    m = json.load(open(sys.argv[1]))
    print(m.get("graph", "features"), ",".join(x for x in m.get("modalities", []) if x not in ("text",)) or "-")
except Exception as e:  # noqa: BLE001
    print("bad", type(e).__name__)
EOF
)"
case "$GRAPH" in bad*) die "$EDGE/$STEM.manifest.json is not a cpsl manifest ($GRAPH)" ;; esac
if [ "${GRAPH%% *}" = tokens ]; then
  [ -f "$EDGE/$STEM.tokenizer.json" ] || die "$EDGE/$STEM.tokenizer.json not found (an end-to-end graph needs its tokenizer)"
  "$PY" -c "import tokenizers" 2>/dev/null || die "host python '$PY' needs tokenizers (the x86 reference prediction)"
fi

# ------------------------------------------------------------------ tools (exit 77 when absent)
need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v proot >/dev/null 2>&1 || need+=(proot)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need[*]} (apt-get)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "skip: needs ${need[*]} (as root: apt-get install -y ${need[*]})"; exit 77
  fi
fi
QEMU="$(command -v qemu-aarch64-static)"
ROOTFS="$CACHE/bookworm-arm64"

# proot translates paths, not mounts: run as real root, a guest `umount /proc` (debootstrap's second
# stage does that) would reach the host's /proc through a bind. So as root every guest command runs in
# a private mount namespace (unshare), where such calls touch only the namespace's copy.
NS=()
if [ "$(id -u)" = 0 ]; then
  unshare --mount --propagation private true 2>/dev/null \
    || { echo "skip: running as root needs a private mount namespace (unshare --mount) to keep the guest's mount calls off this machine"; exit 77; }
  NS=(unshare --mount --propagation private)
fi
guest_bare() {   # a command inside the aarch64 userland (every exec goes through qemu via proot)
  env -i PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 OMP_NUM_THREADS=1 \
    QEMU_CPU="$CPU" DEBOOTSTRAP_DIR=/debootstrap \
    "${NS[@]}" proot -0 -q "$QEMU" -r "$ROOTFS" -w "${GUEST_CWD:-/}" "$@"
}
# Runs see the host's /dev, /proc and /sys, except /proc/cpuinfo: the host's x86 text crashes the
# cpuinfo library inside onnxruntime's aarch64 build at import (SIGSEGV). The guest reads instead what
# a Jetson Orin's Cortex-A78AE cores report (implementer 0x41, part 0xd42; features of ARMv8.2-A +
# dot product, matching the emulated neoverse-n1's HWCAP), one entry per host CPU.
guest() { guest_bare -b /dev -b /proc -b /sys -b "$CACHE/cpuinfo:/proc/cpuinfo" "$@"; }
write_cpuinfo() {
  local i n; n="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
  for ((i = 0; i < n; i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd42\nCPU revision\t: 1\n\n' "$i"
  done > "$CACHE/cpuinfo"
}

# ------------------------------------------------------------------ 1. the userland (cached)
T0=$(date +%s)
BUILT=cached
mkdir -p "$CACHE"
write_cpuinfo
if [ "$REBUILD" = 1 ] || [ ! -f "$ROOTFS/.cpsl-base-ok" ]; then
  echo "== building the Debian bookworm arm64 userland in $ROOTFS (once; minutes)"
  rm -rf "$ROOTFS"
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" > "$CACHE/debootstrap-first.log" 2>&1 \
    || { tail -5 "$CACHE/debootstrap-first.log"; echo "error: debootstrap (first stage) failed, log: $CACHE/debootstrap-first.log" >&2; exit 1; }
  [ -L "$ROOTFS/proc" ] && rm "$ROOTFS/proc" && mkdir "$ROOTFS/proc"   # debootstrap's container link loops under proot
  cp "$QEMU" "$ROOTFS/usr/bin/"       # for chroot users with binfmt_misc; proot runs the host's copy
  guest_bare /debootstrap/debootstrap --second-stage > "$CACHE/debootstrap-second.log" 2>&1 \
    || { tail -5 "$CACHE/debootstrap-second.log"; echo "error: debootstrap (second stage) failed, log: $CACHE/debootstrap-second.log" >&2; exit 1; }
  touch "$ROOTFS/.cpsl-base-ok"
  BUILT=built
fi
PYV="$(guest /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
PINS="${CPSL_AARCH64_PINS:-$("$PY" - <<'EOF'
import importlib
out = []
for d in ("onnxruntime", "numpy", "tokenizers"):
    try:
        out.append(f"{d}=={importlib.import_module(d).__version__}")
    except ImportError:
        out.append(d)
print(" ".join(out))
EOF
)}"
if [ "$REBUILD" = 1 ] || [ "$(cat "$ROOTFS/opt/venv/.cpsl-pins" 2>/dev/null)" != "$PINS" ]; then
  echo "== installing $PINS (aarch64 wheels from PyPI, Python $PYV) into the userland's /opt/venv"
  plats=(--platform manylinux2014_aarch64); for g in $(seq 17 36); do plats+=(--platform "manylinux_2_${g}_aarch64"); done
  rm -rf "$ROOTFS/opt/wheels" "$ROOTFS/opt/venv"
  # shellcheck disable=SC2086  # PINS is a word list
  "$PY" -m pip download -q --dest "$ROOTFS/opt/wheels" --only-binary=:all: --implementation cp \
    --python-version "$PYV" "${plats[@]}" $PINS > "$CACHE/pip-download.log" 2>&1 \
    || { tail -5 "$CACHE/pip-download.log"; echo "error: pip download of aarch64 wheels failed (PyPI reachable?)" >&2; exit 1; }
  guest /usr/bin/python3 -m venv /opt/venv
  # shellcheck disable=SC2086
  guest /opt/venv/bin/pip install -q --no-index --find-links /opt/wheels $PINS > "$CACHE/pip-install.log" 2>&1 \
    || { tail -5 "$CACHE/pip-install.log"; echo "error: pip install inside the aarch64 userland failed" >&2; exit 1; }
  echo "$PINS" > "$ROOTFS/opt/venv/.cpsl-pins"
  [ "$BUILT" = built ] || BUILT="cached, wheels installed"
fi
T1=$(date +%s)
echo "userland ready in $((T1 - T0)) s ($BUILT; cache: $ROOTFS)"

# ------------------------------------------------------------------ 2. copy in and run
WORK="$ROOTFS/opt/cpsl/work"
rm -rf "$WORK" && mkdir -p "$WORK"
cp "$REPO"/export/runner.py "$REPO"/export/predict.py "$REPO"/export/frontend.py "$WORK/"
cp "$EDGE/$MODEL" "$EDGE/$STEM.manifest.json" "$EDGE/$STEM.golden.npz" "$WORK/"
[ -f "$EDGE/$STEM.tokenizer.json" ] && cp "$EDGE/$STEM.tokenizer.json" "$WORK/"
HOSTDIR="$(mktemp -d)"
trap 'rm -rf "$HOSTDIR"' EXIT
export GUEST_CWD=/opt/cpsl/work
set +e                                   # from here a failing step is reported as FAIL below
FAILED=()
echo "== inside the userland"
echo "uname -m: $(guest /bin/uname -m)"
guest /opt/venv/bin/python - <<'EOF'
import ctypes, platform, onnxruntime, numpy, tokenizers
hw = ctypes.CDLL(None).getauxval
hw.restype, hw.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
caps = hw(16)                                   # AT_HWCAP: asimd (bit 1), fphp (9), asimddp (20), sve (22)
names = [n for b, n in ((1, "asimd"), (9, "fphp"), (20, "asimddp"), (22, "sve")) if caps >> b & 1]
print(f"python {platform.python_version()} on {platform.machine()} ({platform.libc_ver()[0]} "
      f"{platform.libc_ver()[1]}); onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}, "
      f"tokenizers {tokenizers.__version__}; HWCAP {' '.join(names)}")
EOF
[ $? -eq 0 ] || FAILED+=("importing onnxruntime/numpy/tokenizers inside failed")
echo "== runner.py $MODEL --check $STEM.golden.npz (aarch64)"
guest /opt/venv/bin/python runner.py "$MODEL" --check "$STEM.golden.npz" --threads 1 --json check.json --assert-no-torch
CHECK_RC=$?
PRED=0
if [ "${GRAPH%% *}" = tokens ]; then
  PRED=1
  MODS="${GRAPH#* }"
  AFLAG=()
  if [ "$MODS" != "-" ]; then
    [ "$MODS" = audio ] || die "the model also reads $MODS: this script feeds audio only"
    if [ -n "$AUDIO" ]; then cp "$AUDIO" "$WORK/audio.csv"; else
      "$PY" - "$EDGE/$STEM.golden.npz" "$WORK/audio.csv" <<'EOF'
import sys, numpy as np
x = np.load(sys.argv[1], allow_pickle=False)["batch0_audio"][0]            # (L, d): a real validation row
with open(sys.argv[2], "w") as f:
    f.write(",".join(f"a{i}" for i in range(x.shape[1])) + "\n")
    for r in x:
        f.write(",".join(repr(float(v)) for v in r) + "\n")
EOF
    fi
    cp "$WORK/audio.csv" "$HOSTDIR/audio.csv"
    AFLAG=(--audio-features audio.csv)
  fi
  cp "$WORK"/* "$HOSTDIR/"
  echo "== runner.py predict --text \"$TEXT\" (aarch64, then x86)"
  guest /opt/venv/bin/python runner.py predict --model "$MODEL" --text "$TEXT" "${AFLAG[@]}" --threads 1 --json pred.json \
    || FAILED+=("runner.py predict on aarch64 exited $?")
  (cd "$HOSTDIR" && OMP_NUM_THREADS=1 "$PY" runner.py predict --model "$MODEL" --text "$TEXT" "${AFLAG[@]}" --threads 1 \
    --json pred.json) || FAILED+=("runner.py predict on x86 exited $?")
  IDS='import json, sys, pathlib, frontend as fe
m = pathlib.Path(sys.argv[1]); man = fe.load_manifest(m)
print(json.dumps(fe.encode(fe.load_tokenizer(m, man), [sys.argv[2]])["input_ids"].tolist()))'
  guest /opt/venv/bin/python -c "$IDS" "$MODEL" "$TEXT" > "$WORK/ids.json" || FAILED+=("tokenizing on aarch64 failed")
  (cd "$HOSTDIR" && "$PY" -c "$IDS" "$MODEL" "$TEXT" > ids.json) || FAILED+=("tokenizing on x86 failed")
fi
T2=$(date +%s)

# ------------------------------------------------------------------ 3. compare, PASS/FAIL
"$PY" - "$WORK" "$HOSTDIR" "$STEM.golden.npz" "$CHECK_RC" "$PRED" "$((T1 - T0))" "$((T2 - T1))" "$BUILT" \
  "$(IFS=';'; echo "${FAILED[*]}")" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
work, host, golden, check_rc, pred, t_build, t_check = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], \
    int(sys.argv[4]), sys.argv[5] == "1", int(sys.argv[6]), int(sys.argv[7])
meta = json.loads(str(np.load(work / golden, allow_pickle=False)["meta"]))
tol = meta.get("tolerance", {})
atol, rtol = float(tol.get("atol", 1e-4)), float(tol.get("rtol", 0.0))
notes = [n for n in sys.argv[9].split(";") if n]
ok = not notes
try:
    chk = json.loads((work / "check.json").read_text())
except (OSError, ValueError):
    chk = None
if chk is None or check_rc != 0:
    ok = False
    notes.append(f"runner --check exit {check_rc}")
    worst = float("nan")
else:
    worst = max(b["max_abs_err"] for b in chk["check"]["batches"])
    ok &= bool(chk["check"]["ok"]) and chk.get("machine") == "aarch64"
    print(f"golden check on {chk.get('machine')}: {len(chk['check']['batches'])} batches, max abs diff vs x86 golden "
          f"{worst:.3g} (vs the PyTorch fp32 reference "
          f"{max(b['max_abs_err_vs_fp32_reference'] for b in chk['check']['batches']):.3g}), "
          f"precision {meta.get('precision')}, tolerance atol {atol:g} rtol {rtol:g}")
line = f"max abs diff vs x86 golden {worst:.3g} (tolerance atol {atol:g}, rtol {rtol:g})"
if pred and not notes:
    a = json.loads((work / "pred.json").read_text())["predictions"][0]["sentiment"]
    b = json.loads((host / "pred.json").read_text())["predictions"][0]["sentiment"]
    ids_same = (work / "ids.json").read_text() == (host / "ids.json").read_text()
    d = abs(a - b)
    good = d <= atol + rtol * abs(b) and ids_same
    ok &= good
    print(f"raw text prediction: aarch64 {a:+.6f}, x86 {b:+.6f}, |diff| {d:.3g}; token ids "
          f"{'identical' if ids_same else 'DIFFER'} ({len(json.loads((work / 'ids.json').read_text())[0])} tokens)")
    line += f"; raw-text prediction diff {d:.3g}"
print(f"timing: userland {t_build} s ({sys.argv[8]}), emulated check + prediction {t_check} s")
verdict = "PASS: the aarch64 (qemu) runner matches" if ok else "FAIL: the aarch64 (qemu) runner does not match"
print(f"{verdict} the x86 golden outputs: {line}" + ("" if ok else f" [{'; '.join(notes) or 'outside tolerance'}]"))
sys.exit(0 if ok else 1)
EOF
