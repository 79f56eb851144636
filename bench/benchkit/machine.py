"""Machine description shared by every bench script (run.py, cp_kernel.py, train_step.py)."""
from __future__ import annotations

import os
import platform

import numpy as np
import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def base_info(device: str = "cpu", threads: int | None = None) -> dict:
    """CPU, cores, threads, load, versions and the GPU (when ``device`` is cuda): every bench script's header."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "usable_cores": usable,
            "threads": threads if threads is not None else torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "gpu": None, "loadavg_start": loadavg()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def machine_info(device: str, threads: int) -> dict:
    """:func:`base_info` + the ONNX/ONNX Runtime/TensorRT versions (bench/run.py)."""
    import onnx
    import onnxruntime as ort
    info = dict(base_info(device, threads), onnxruntime=ort.__version__, onnx=onnx.__version__)
    try:
        import tensorrt as trt  # noqa: F401
        info["tensorrt"] = getattr(trt, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - ImportError or a broken install
        info["tensorrt"] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return info


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe_machine(info: dict) -> str:
    s = (f"{info['cpu']}, {info['usable_cores']} cores, {info['threads']} threads; torch {info['torch']}, "
         f"onnxruntime {info['onnxruntime']}")
    if info.get("gpu"):
        s += f"; GPU {info['gpu']}"
    return s
