#!/usr/bin/env bash
# The main job on the embedded synthetic data, on a fresh machine:
#   install → train the teacher (CP + SL, native kernel when built) → distil a student →
#   export it (int8 Q/DQ ONNX + TensorRT build script) → check it torch-free → quick bench.
# Outputs under runs/synth (override with OUT=...).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/synth}
export HF_HUB_OFFLINE=1
if ! python -c "import torch" 2>/dev/null; then
  pip install torch==2.13.0              # the CPU build on this machine's disk
fi
tv=$(python -c 'import torch; print(torch.__version__.split("+")[0])')
if ! (cd / && python -c "import cpsl._C, cpsl.deploy.artifact, cpsl.edge.runner") 2>/dev/null; then   # the installed package, not ./cpsl
  pip install -c <(echo "torch==$tv") ".[export,text]"    # never let a dependency pull another torch
fi
cpsl info
# --overwrite: this job owns $OUT and replaces its earlier runs (plain cpsl train refuses an existing run)
cpsl train --data synth --out "$OUT/teacher" --seeds 1 --overwrite
cpsl distill --teacher "$OUT/teacher/seed1/best.pt" --data synth --out "$OUT/student" --seeds 1 --overwrite
cpsl export --ckpt "$OUT/student/seed1/best.pt" --data synth --precision int8 \
  --out "$OUT/export" --trt --overwrite
cpsl-runner "$OUT/export/model.onnx" --check "$OUT/export/model.golden.npz"
python bench/run.py --quick --ckpt "$OUT/teacher/seed1/best.pt" --student-ckpt "$OUT/student/seed1/best.pt" \
  --out "$OUT/bench"
echo "done: $OUT (results.json, export/, bench/bench.md)"
