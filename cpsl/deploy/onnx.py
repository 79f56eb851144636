"""ONNX export of the deployment path (fused prediction only) and ONNX Runtime checks.

Graph interface (one pair of inputs per modality the model was trained on, in the order
text, audio, vision):

=================  =========================  ==============================================
``{m}``            float32 ``(batch, {m}_len, d_m)``  features exactly as in the MMSA pickle
``{m}_mask``       float32 ``(batch, {m}_len)``       1.0 on valid steps, 0.0 on padding
``sentiment``      float32 ``(batch,)``               the fused prediction ŷ in [-3, 3]-ish
=================  =========================  ==============================================

Masks are float32 rather than bool: every TensorRT version and every ONNX Runtime provider
takes float32 inputs, and the graph turns them into a boolean with ``mask > 0.5``. The
masked BatchNorm's running statistics are inside the graph, so no host-side normalisation is
needed. ``batch`` and each ``{m}_len`` are dynamic axes.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..compress.quantize import non_standard_ops  # noqa: F401 - re-exported
from ..data.batch import Batch, iterate, make_batch
from ..data.mmsa import Split
from ..errors import CPSLError
from ..model import CPSLModel
from ..model.cpsl import ExportWrapper

OUTPUT_NAME = "sentiment"
MASK_DTYPE = np.float32
MIN_OPSET, MAX_OPSET = 13, 20
PREPROCESSING = ("features as in the MMSA pickle; masks 1 on valid steps; "
                 "BatchNorm statistics are inside the graph")


def input_names(modalities) -> list[str]:
    names = []
    for m in modalities:
        names += [m, f"{m}_mask"]
    return names


def dynamic_axes(modalities) -> dict[str, dict[int, str]]:
    ax: dict[str, dict[int, str]] = {}
    for m in modalities:
        ax[m] = {0: "batch", 1: f"{m}_len"}
        ax[f"{m}_mask"] = {0: "batch", 1: f"{m}_len"}
    ax[OUTPUT_NAME] = {0: "batch"}
    return ax


def batch_feeds(batch: Batch, modalities) -> dict[str, np.ndarray]:
    """A :class:`Batch` as the graph's named numpy inputs (float32 features and masks)."""
    feeds = {}
    for m in modalities:
        feeds[m] = np.ascontiguousarray(batch.x[m].detach().cpu().numpy(), dtype=np.float32)
        feeds[f"{m}_mask"] = np.ascontiguousarray(batch.mask[m].detach().cpu().numpy(), dtype=MASK_DTYPE)
    return feeds


def check_exportable(model: CPSLModel) -> None:
    if model.text_backbone is not None:
        raise CPSLError("this checkpoint runs a pretrained text encoder on token ids; export supports "
                        "models that read text features (train with model.text_encoder='')")


def export_onnx(model: CPSLModel, path: str | Path, example: Batch, opset: int = 17):
    """Export ``model.predict`` to ``path`` with the legacy TorchScript exporter; returns the
    checked ``onnx.ModelProto``. ``example`` only fixes the trace: all axes but d_m are dynamic."""
    check_exportable(model)
    mods = model.modalities
    args = []
    for m in mods:
        args += [example.x[m].float().cpu(), example.mask[m].to(torch.float32).cpu()]
    return trace_export(model, ExportWrapper(model).eval(), tuple(args), path, input_names(mods),
                        dynamic_axes(mods), opset)


def trace_export(model, wrapper, args: tuple, path: str | Path, names: list, axes: dict, opset: int):
    """``wrapper(*args)`` → ONNX at ``path`` (legacy TorchScript exporter, ``model`` in eval mode
    meanwhile, output ``sentiment``); returns the checked ``onnx.ModelProto``."""
    import onnx

    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise CPSLError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about python ints and the legacy exporter
            torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=[OUTPUT_NAME],
                              dynamic_axes=axes, opset_version=int(opset), do_constant_folding=True, dynamo=False)
    finally:
        model.train(was_training)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    return proto


# ---------------------------------------------------------------------------- ONNX Runtime
def ort_session(model, threads: int = 1):
    """An ONNX Runtime CPU session from a path or serialized bytes."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = str(model) if isinstance(model, (str, Path)) else model
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def ort_predict(sess, split: Split, modalities, batch_size: int = 64, feeds=None) -> np.ndarray:
    """ONNX Runtime predictions over a whole split, batched like the trainer (trimmed padding);
    ``feeds(batch)`` makes the graph's inputs (default: the features graph's)."""
    feeds = feeds or (lambda b: batch_feeds(b, modalities))
    out = [sess.run([OUTPUT_NAME], feeds(b))[0]
           for b in iterate(split, batch_size, modalities=modalities)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


@torch.no_grad()
def torch_predict(model: CPSLModel, split: Split, batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = [model.predict(b.x, b.mask, b.text_bert).float().numpy()
           for b in iterate(split, batch_size, modalities=model.modalities)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def golden_rows(split: Split, sizes=(1, 7, 3), seed: int = 0) -> list[np.ndarray]:
    """Row sets for golden batches: one per size, drawn so that their (trimmed) lengths differ.
    The last set, when there is room, holds the split's longest items (max length)."""
    n = len(split)
    if n == 0:
        raise CPSLError("cannot write golden batches from an empty split")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    rows, used = [], 0
    for i, s in enumerate(sizes):
        s = min(int(s), n)
        if i == len(sizes) - 1 and len(sizes) > 1:
            # the longest items of the first modality: exercises the max length
            m0 = next(iter(split.lengths))
            longest = np.argsort(-split.lengths[m0], kind="stable")[:s]
            rows.append(np.sort(longest))
            continue
        take = order[used:used + s] if used + s <= n else order[:s]
        used += s
        rows.append(np.sort(take))
    return rows


def golden_batches(split: Split, modalities, sizes=(1, 7, 3), seed: int = 0) -> list[Batch]:
    return [make_batch(split, r, modalities) for r in golden_rows(split, sizes, seed)]


def save_golden(path: str | Path, batches_feeds: list[dict], expected: list[np.ndarray],
                reference: list[np.ndarray], meta: dict) -> None:
    """``golden.npz``: ``batch{i}_{input}`` arrays, ``batch{i}_expected`` (this artefact's output
    under ONNX Runtime), ``batch{i}_reference`` (the PyTorch fp32 model) and ``meta`` (JSON)."""
    import json
    arrays = {}
    for i, (f, e, r) in enumerate(zip(batches_feeds, expected, reference)):
        for k, v in f.items():
            arrays[f"batch{i}_{k}"] = v
        arrays[f"batch{i}_expected"] = np.asarray(e, np.float32)
        arrays[f"batch{i}_reference"] = np.asarray(r, np.float32)
    meta = dict(meta, n_batches=len(batches_feeds))
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(str(path), **arrays)
    # np.savez appends .npz when missing; keep the caller's exact name
    p = Path(str(path))
    if p.suffix != ".npz" and Path(str(p) + ".npz").exists():
        Path(str(p) + ".npz").replace(p)


# ---------------------------------------------------------------------------- graph facts
def graph_io(proto) -> dict:
    """Inputs/outputs of an ONNX graph as ``{"inputs": [...], "outputs": [...]}`` with dtype names,
    shapes (dim names for dynamic axes) and the dynamic axes."""
    import onnx

    def desc(v):
        tt = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                "shape": dims, "dynamic_axes": {str(i): d for i, d in enumerate(dims) if isinstance(d, str)}}

    inits = {i.name for i in proto.graph.initializer}
    return {"inputs": [desc(v) for v in proto.graph.input if v.name not in inits],
            "outputs": [desc(v) for v in proto.graph.output]}


def opset_of(proto) -> int:
    return max(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))
