#!/usr/bin/env bash
# Build the TensorRT engine for sentiment.trt.onnx (int8) on the target GPU.
# Written by `cpsl export` for JetPack 6.x / TensorRT 10.3 (trtexec ships in
# /usr/src/tensorrt/bin). Engines are specific to the GPU and TensorRT version: build on the device.
# Extra trtexec flags may be appended, e.g. ./build_engine.sh --verbose
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
"$TRTEXEC" \
  --onnx=sentiment.trt.onnx \
  --saveEngine=sentiment.plan \
  --minShapes=input_ids:1x2,attention_mask:1x2 \
  --optShapes=input_ids:1x31,attention_mask:1x31 \
  --maxShapes=input_ids:64x50,attention_mask:64x50 \
  --int8 \
  --fp16 \
  --memPoolSize=workspace:1024 \
  "$@"
echo 'wrote sentiment.plan; check it with: python3 runner.py sentiment.plan --check sentiment.golden.npz'
