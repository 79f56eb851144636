"""Compression for the edge (docs/method.md §7): distillation into a small student and
post-training quantization (fp16, int8 explicit Q/DQ) of exported ONNX graphs."""
