"""TensorRT engine build (TensorRT 10.x Python API) and the equivalent ``trtexec`` script.

An engine is specific to the GPU and TensorRT version it was built with, so the engine that
runs on a Jetson has to be built on that Jetson: ``cpsl export`` always writes
``<stem>.build_engine.sh`` (a ``trtexec`` command for JetPack 6.x / TensorRT 10.3) and, with
``--trt`` where ``import tensorrt`` works, also builds ``<stem>.plan`` for the local GPU.

Precision flags come from the precision registry (:mod:`cpsl.deploy.precisions`): fp32 → TF32
off (so the engine matches the fp32 golden outputs); fp16 → ``BuilderFlag.FP16`` / ``--fp16``;
int8 (explicit Q/DQ in the graph, no calibrator) → ``BuilderFlag.INT8`` + ``BuilderFlag.FP16`` /
``--int8 --fp16`` so that the layers left in float may run in half precision.

UNVERIFIED HERE: this machine has no GPU and no TensorRT. :func:`build_engine` is written
against the documented TensorRT 10.x API and has not been executed; the ``trtexec`` flags are
those of TensorRT 8.6–10.x documentation. The profile/command construction is tested.
"""
from __future__ import annotations

import math
import shlex
from pathlib import Path

import numpy as np

from ..data.mmsa import MMSAData
from ..errors import CPSLError
from . import precisions


def tensorrt_available():
    """``(module, "")`` when ``import tensorrt`` works, else ``(None, reason)``."""
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install (missing libnvinfer)
        return None, f"{type(e).__name__}: {e}"
    return trt, ""


def _lengths(data: MMSAData, m: str, split: str | None) -> np.ndarray:
    splits = [data.splits[split]] if split and split in data.splits else list(data.splits.values())
    parts = [s.lengths[m] for s in splits if len(s)]
    return np.concatenate(parts) if parts else np.ones(1, np.int64)


def shape_profile(data: MMSAData, modalities, dims: dict, max_batch: int = 64, opt_batch: int = 1,
                  opt_len: str | int = "p95", max_len: int | None = None, model_max_len: int = 512) -> dict:
    """Optimization profile ``{input: {"min", "opt", "max"}}`` (shape lists).

    min: batch 1, length 1. opt: ``opt_batch`` and ``opt_len`` ("p95": the 95th percentile of
    the training split's valid lengths, "max", or an integer). max: ``max_batch`` and the data's
    longest valid length (or ``max_len``), never beyond the model's positional table."""
    if not 1 <= opt_batch <= max_batch:
        raise CPSLError(f"need 1 <= --opt-batch ({opt_batch}) <= --max-batch ({max_batch})")
    prof = {}
    for m in modalities:
        all_len = _lengths(data, m, None)
        mx = int(max_len) if max_len else int(all_len.max())
        if mx < 1:
            raise CPSLError(f"--max-len must be >= 1, got {mx}")
        if mx > model_max_len:
            raise CPSLError(f"max length {mx} of {m} exceeds the model's positional table ({model_max_len})")
        if opt_len == "p95":
            ol = int(math.ceil(np.percentile(_lengths(data, m, "train"), 95)))
        elif opt_len == "max":
            ol = mx
        else:
            try:
                ol = int(opt_len)
            except (TypeError, ValueError):
                raise CPSLError(f"--opt-len must be p95, max or an integer, got {opt_len!r}") from None
        ol = max(1, min(ol, mx))
        d = int(dims[m])
        prof[m] = {"min": [1, 1, d], "opt": [opt_batch, ol, d], "max": [max_batch, mx, d]}
        prof[f"{m}_mask"] = {k: v[:2] for k, v in prof[m].items()}
    return prof


def _shapes_arg(profile: dict, which: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(v) for v in s[which])}" for name, s in profile.items())


def precision_flags(precision: str) -> list[str]:
    return list(precisions.get(precision).trtexec_flags)


def trtexec_args(onnx_name: str, plan_name: str, profile: dict, precision: str, workspace_mib: int = 1024) -> list[str]:
    return ([f"--onnx={onnx_name}", f"--saveEngine={plan_name}",
             f"--minShapes={_shapes_arg(profile, 'min')}",
             f"--optShapes={_shapes_arg(profile, 'opt')}",
             f"--maxShapes={_shapes_arg(profile, 'max')}"]
            + precision_flags(precision) + [f"--memPoolSize=workspace:{int(workspace_mib)}"])


def _comment_safe(text: str) -> str:
    """One line (no newline can end the comment and start a command)."""
    return text.encode("unicode_escape").decode("ascii")


def write_build_script(path: str | Path, onnx_name: str, plan_name: str, profile: dict, precision: str,
                       workspace_mib: int = 1024) -> str:
    """Write an executable ``trtexec`` script (run it on the target from anywhere); returns the
    trtexec command line it holds."""
    args = trtexec_args(onnx_name, plan_name, profile, precision, workspace_mib)
    cmd = "trtexec " + " ".join(shlex.quote(a) for a in args)
    body = "\n".join([
        "#!/usr/bin/env bash",
        f"# Build the TensorRT engine for {_comment_safe(onnx_name)} ({precision}) on the target GPU.",
        "# Written by `cpsl export` for JetPack 6.x / TensorRT 10.3 (trtexec ships in",
        "# /usr/src/tensorrt/bin). Engines are specific to the GPU and TensorRT version: build on the device.",
        "# Extra trtexec flags may be appended, e.g. ./build_engine.sh --verbose",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        '"$TRTEXEC" \\',
        *[f"  {shlex.quote(a)} \\" for a in args],
        '  "$@"',
        "echo " + shlex.quote(f"wrote {plan_name}; check it with: python3 runner.py {plan_name} --check "
                              f"{Path(plan_name).stem}.golden.npz"),
        "",
    ])
    p = Path(path)
    p.write_text(body)
    p.chmod(0o755)
    return cmd


def build_engine(onnx_path: str | Path, plan_path: str | Path, profile: dict, precision: str,
                 workspace_mib: int = 1024) -> dict:
    """Build and save a serialized engine with the TensorRT 10.x Python API. UNVERIFIED here."""
    trt, why = tensorrt_available()
    if trt is None:
        raise CPSLError(f"TensorRT is not importable ({why})")
    prec = precisions.get(precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)           # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CPSLError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    for flag in prec.trt_set_flags:               # int8 is explicit Q/DQ: no calibrator
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in prec.trt_clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    prof = builder.create_optimization_profile()
    for name, s in profile.items():
        prof.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
    config.add_optimization_profile(prof)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CPSLError("TensorRT failed to build the engine (see the TensorRT log above)")
    with open(plan_path, "wb") as f:
        f.write(plan)
    return {"plan": str(plan_path), "tensorrt": getattr(trt, "__version__", "?"), "precision": precision}
