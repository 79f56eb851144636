"""The export precision registry: one :class:`Precision` entry per precision.

An entry says how the exported fp32 graph becomes the artefact (its converter), whether
calibration batches are needed, how far the artefact may deviate from PyTorch fp32 in its golden
files (the tolerance rule), and the TensorRT flags of its engine (``trtexec`` flags and the
``trt.BuilderFlag`` names set/cleared by :func:`cpsl.deploy.tensorrt.build_engine`).
``cpsl export --precision``, the TensorRT script and ``bench/`` read this registry, so a new
precision is one :func:`register` call (plus its tests).
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import CPSLError

FP32_PARITY_TOL = 1e-4           # fp32 ONNX Runtime vs PyTorch, max abs on the valid split


@dataclass
class ConvertContext:
    """What a converter gets: the fp32 graph (file and proto) and where the artefact goes."""

    fp32_path: Path
    fp32_proto: object             # onnx.ModelProto
    out_path: Path
    calib: list | None             # calibration feeds (precisions with needs_calibration)
    calib_method: str = "percentile"
    quantize_attention: bool = False
    per_channel: bool = True           # int8 weight scales per output channel (else per tensor)
    min_weight_elems: int = 0          # int8: ops with smaller weights stay float
    dedicated_pairs: bool = True       # int8: one Q/DQ pair per quantized input (compress.quantize.dedicate_qdq)
    gather_min_elems: int = 0          # int8: float tables of this size or more read by Gather stored in int8


@dataclass(frozen=True)
class Precision:
    name: str
    description: str
    # ctx -> (proto of the artefact, quantization info or None); None: the artefact is the fp32 graph
    convert: Callable[[ConvertContext], tuple] | None
    needs_calibration: bool
    tolerance: Callable[[float], float]        # artefact-vs-fp32 max abs deviation -> golden atol
    trtexec_flags: tuple[str, ...]
    trt_set_flags: tuple[str, ...] = ()        # trt.BuilderFlag names to set
    trt_clear_flags: tuple[str, ...] = ()      # trt.BuilderFlag names to clear
    opset: int | None = None                   # forces the ONNX opset (None: the caller's --opset)


_REGISTRY: dict[str, Precision] = {}


def register(p: Precision, replace: bool = False) -> Precision:
    if p.name in _REGISTRY and not replace:
        raise CPSLError(f"precision {p.name!r} is already registered")
    _REGISTRY[p.name] = p
    return p


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Precision:
    if name not in _REGISTRY:
        raise CPSLError(f"unknown precision {name!r} (choose from: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


# ---------------------------------------------------------------------------- rules and converters
def fp32_tolerance(dev_max: float) -> float:
    """The artefact is the fp32 graph: the fixed fp32 parity bound."""
    return FP32_PARITY_TOL


def reduced_tolerance(dev_max: float) -> float:
    """Another backend running a reduced-precision graph: within this graph's own deviation from fp32."""
    return float(f"{max(1e-3, 2 * dev_max):.2g}")


@contextlib.contextmanager
def silence():
    """onnxruntime.quantization prints and logs on the root logger; keep the CLI output short."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def to_fp16_artefact(ctx: ConvertContext):
    from ..compress.quantize import to_fp16
    return to_fp16(ctx.fp32_proto), None


def to_int8_artefact(ctx: ConvertContext):
    import onnx

    from ..compress.quantize import check_qdq, quantize_int8
    with silence():
        info = quantize_int8(ctx.fp32_path, ctx.out_path, ctx.calib, method=ctx.calib_method,
                             quantize_attention=ctx.quantize_attention, per_channel=ctx.per_channel,
                             min_weight_elems=ctx.min_weight_elems, dedicated_pairs=ctx.dedicated_pairs,
                             gather_min_elems=ctx.gather_min_elems)
    proto = onnx.load(str(ctx.out_path))
    check_qdq(proto)
    return proto, info


register(Precision("fp32", "float32 graph (TF32 off in TensorRT so the engine matches the golden outputs)",
                   None, False, fp32_tolerance, ("--noTF32",), trt_clear_flags=("TF32",)))
register(Precision("fp16", "float16 graph, float32 I/O; LayerNorm/Softmax/reductions in float32",
                   to_fp16_artefact, False, reduced_tolerance, ("--fp16",), trt_set_flags=("FP16",)))
register(Precision("int8", "explicit int8 Q/DQ (calibrated on training batches); float layers may run in fp16",
                   to_int8_artefact, True, reduced_tolerance, ("--int8", "--fp16"),
                   trt_set_flags=("INT8", "FP16")))
