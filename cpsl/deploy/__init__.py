"""Deployment: the export library API (:func:`export_artifact` → :class:`Manifest`), the precision
registry (precisions.py), ONNX export with ONNX Runtime parity checks (onnx.py) and TensorRT engine
build and trtexec scripts (tensorrt.py). The ``cpsl export`` command (cpsl/cli/export.py) wraps it."""
from .artifact import ExportSettings, Manifest, export_artifact
from .precisions import Precision, register

__all__ = ["ExportSettings", "Manifest", "Precision", "export_artifact", "register"]
