"""Deployment: ONNX export with ONNX Runtime parity checks (onnx.py), TensorRT engine build and
trtexec scripts (tensorrt.py), and the ``cpsl distill`` / ``cpsl export`` commands (cli.py)."""
