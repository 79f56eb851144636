"""The stages of :func:`cpsl.deploy.artifact.export_artifact`: inputs, PyTorch reference outputs,
the fp32 graph and its parity, the conversion to the artefact's precision, its check under ONNX
Runtime, the TensorRT engine stage and the manifest's fields."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CPSLError
from . import onnx as ox
from .precisions import FP32_PARITY_TOL, ConvertContext, Precision


@dataclass
class ExportInputs:
    data_path: str
    data: object          # MMSAData
    calib: list | None
    profile: dict
    graph: object         # e2e.FeatureGraph | e2e.TokenGraph: the graph's interface


def _load_checked(path, synth_seed, model, ckpt, what, synth=None, trust_pickle=False):
    from ..data import load_data
    from ..checkpoint import check_compatible
    try:
        d = load_data(path, synth_seed, synth, trust_pickle=trust_pickle)
    except CPSLError as e:
        raise CPSLError(f"{what}: {e}") from None
    except (OSError, EOFError, ValueError, TypeError) as e:
        raise CPSLError(f"{what} {path} is not a readable MMSA pickle ({type(e).__name__})") from None
    check_compatible(model, d, ckpt, subset_ok=True)
    return d


def calib_feeds(split, graph, n_batches: int, batch_size: int, seed: int = 0) -> list[dict]:
    import torch

    from ..data.batch import iterate
    gen = torch.Generator().manual_seed(seed)
    feeds = []
    for b in iterate(split, batch_size, shuffle=True, generator=gen, modalities=graph.modalities):
        feeds.append(graph.feeds(b))
        if len(feeds) >= n_batches:
            break
    return feeds


def load_inputs(model, cfg, ck, ckpt, s, prec: Precision) -> ExportInputs:
    """The data (default: the checkpoint's), calibration feeds when the precision needs them, the
    engine profile."""
    from .e2e import graph_for
    from .tensorrt import shape_profile
    graph = graph_for(model, s.e2e)
    mods = model.modalities
    data_path = s.data
    if not data_path:
        data_path = ck.get("data_path") or cfg.data.path or "synth"
        if data_path != "synth" and not str(data_path).startswith("synth:") and not Path(data_path).is_file():
            raise CPSLError(f"the checkpoint's data {data_path} is not here; pass --data")
    data = _load_checked(data_path, cfg.data.synth_seed, model, ckpt, "--data", cfg.data.synth,
                         s.trust_pickle)
    if len(data["valid"]) == 0:
        raise CPSLError(f"the valid split of {data_path} is empty")
    calib = None
    if prec.needs_calibration:
        cpath = s.calib_data or data_path
        cd = data if cpath == data_path else _load_checked(cpath, cfg.data.synth_seed, model, ckpt,
                                                           "--calib-data", cfg.data.synth, s.trust_pickle)
        if len(cd["train"]) == 0:
            raise CPSLError(f"the train split of {cpath} is empty: nothing to calibrate on")
        calib = calib_feeds(cd["train"], graph, s.calib_batches, s.calib_batch_size)
    profile = graph.profile(shape_profile(data, mods, model.dims, max_batch=s.max_batch, opt_batch=s.opt_batch,
                                          opt_len=s.opt_len, max_len=s.max_len, model_max_len=cfg.model.max_len),
                            data, s.max_len)
    return ExportInputs(str(data_path), data, calib, profile, graph)


def reference_outputs(model, data, graph) -> dict:
    """PyTorch fp32 outputs on the valid split and on the golden batches (+ a trace example)."""
    import torch

    from ..data.batch import make_batch
    mods, valid = model.modalities, data["valid"]
    src = data["train"] if len(data["train"]) >= 2 else valid
    golden = ox.golden_batches(valid, mods, sizes=(1, 7, 3))
    with torch.no_grad():
        torch_golden = [model.predict(b.x, b.mask, b.text_bert).float().numpy() for b in golden]
    return {"example": make_batch(src, np.arange(min(2, len(src))), mods),  # fixes the trace only: axes are dynamic
            "valid": ox.torch_predict(model, valid, batch_size=64), "golden": golden,
            "torch_golden": torch_golden, "golden_feeds": [graph.feeds(b) for b in golden]}


def _deviation(valid_pred, golden_pred, ref) -> list[np.ndarray]:
    return [np.abs(valid_pred - ref["valid"])] + [np.abs(a - b) for a, b in zip(golden_pred, ref["torch_golden"])]


def export_graphs(model, ref, prec: Precision, s, onnx_path: Path, tmp: Path, inp: ExportInputs, say) -> dict:
    """1. the fp32 graph + its parity against PyTorch; 2. the artefact (the registry's converter)."""
    import onnx
    valid, mods = inp.data["valid"], model.modalities
    fp32_path = onnx_path if prec.convert is None else tmp / "fp32.onnx"
    proto32 = inp.graph.export(model, fp32_path, ref["example"], prec.opset or s.opset)
    s32 = ox.ort_session(fp32_path)
    ort32_valid = ox.ort_predict(s32, valid, mods, batch_size=64, feeds=inp.graph.feeds)
    diffs = _deviation(ort32_valid, [s32.run([ox.OUTPUT_NAME], f)[0] for f in ref["golden_feeds"]], ref)
    fp32_max, fp32_mean = float(max(d.max() for d in diffs)), float(np.concatenate(diffs).mean())
    if not fp32_max <= FP32_PARITY_TOL:
        raise CPSLError(f"fp32 ONNX Runtime output differs from PyTorch by {fp32_max:.3g} (> {FP32_PARITY_TOL}) "
                        f"on {inp.data_path} valid batches")
    say(f"fp32 parity (ONNX Runtime vs PyTorch, {len(valid)} valid samples + {len(ref['golden'])} golden batches): "
        f"max abs {fp32_max:.2e}, mean abs {fp32_mean:.2e}")
    quant_info = None
    if prec.convert is None:
        proto = proto32
    else:
        say(f"converting to {prec.name}: {prec.description}")
        g = inp.graph
        ctx = ConvertContext(fp32_path, proto32, onnx_path, inp.calib, s.calib_method, s.quantize_attention,
                             g.int8_per_channel if s.int8_per_channel is None else s.int8_per_channel,
                             g.int8_min_weight if s.int8_min_weight is None else s.int8_min_weight,
                             dedicated_pairs=True, gather_min_elems=g.int8_gather_min)
        proto, quant_info = prec.convert(ctx)
    del proto.graph.value_info[:]   # neither ONNX Runtime nor TensorRT needs it; it doubles the file
    onnx.save(proto, str(onnx_path))
    onnx.checker.check_model(str(onnx_path), full_check=True)
    if ox.opset_of(proto) > ox.MAX_OPSET:
        raise CPSLError(f"the {prec.name} graph has opset {ox.opset_of(proto)} > {ox.MAX_OPSET}")
    return {"proto": proto, "quant_info": quant_info, "ort32_valid": ort32_valid, "fp32_max": fp32_max,
            "fp32_mean": fp32_mean, "same_as_fp32": prec.convert is None}


def check_artefact(onnx_path: Path, graphs: dict, ref: dict, graph, valid) -> dict:
    """The artefact under ONNX Runtime: valid predictions, golden outputs, deviation from PyTorch fp32."""
    sess = ox.ort_session(onnx_path)
    art_valid = graphs["ort32_valid"] if graphs["same_as_fp32"] else ox.ort_predict(
        sess, valid, graph.modalities, batch_size=64, feeds=graph.feeds)
    art_golden = [sess.run([ox.OUTPUT_NAME], f)[0] for f in ref["golden_feeds"]]
    dev = _deviation(art_valid, art_golden, ref)
    return {"valid": art_valid, "golden": art_golden, "dev_max": float(max(d.max() for d in dev)),
            "dev_mean": float(np.concatenate(dev).mean())}


def engine_stage(paths, profile: dict, precision: str, s, say, warn) -> dict:
    """3. the TensorRT build script, and the engine itself with ``s.trt`` where TensorRT imports."""
    from .tensorrt import build_engine, tensorrt_available, write_build_script
    src = tensorrt_form(paths.onnx)
    cmd = write_build_script(paths.script, src.name, paths.plan.name, profile, precision, s.workspace)
    engine = {"script": paths.script.name, "trtexec": cmd, "built": False, "onnx": src.name}
    if src != paths.onnx:
        engine["onnx_note"] = ("the int8 word-embedding gather in TensorRT's documented order "
                               "(DequantizeLinear(int8 table) -> Gather); same values as the ONNX Runtime graph")
    if s.trt:
        mod, why = tensorrt_available()
        if mod is None:
            warn(f"TensorRT is absent here ({why.splitlines()[0]}); wrote {paths.script} to build the engine "
                 "on the target")
            engine["why_not_built"] = f"tensorrt not importable: {why.splitlines()[0]}"
        else:
            say(f"building TensorRT engine {paths.plan} ...")
            engine.update(build_engine(src, paths.plan, profile, precision, s.workspace), built=True)
    return engine


def tensorrt_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(f"{onnx_path.stem}.trt.onnx")


def tensorrt_form(onnx_path: Path) -> Path:
    """The graph TensorRT builds from: ``onnx_path`` itself, or, where it has int8 word-embedding gathers
    (``Gather(int8) -> DequantizeLinear``, the fast form for ONNX Runtime, a type TensorRT's parser does not
    list for Gather), ``<stem>.trt.onnx`` with them in the documented order (compress.qdq_graph)."""
    import onnx

    from ..compress.qdq_graph import dequantize_before_gather
    out = tensorrt_path(onnx_path)
    m = onnx.load(str(onnx_path))
    if not dequantize_before_gather(m):
        out.unlink(missing_ok=True)                  # no stale TensorRT form of an earlier export
        return onnx_path
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(out))
    return out


def _checkpoint_summary(ckpt, ck, model, valid_metrics: dict) -> dict:
    summary = {"path": str(ckpt), "epoch": ck.get("epoch"), "params": model.num_parameters(),
               "valid_pytorch": valid_metrics}
    res_json = Path(ckpt).resolve().parent.parent / "results.json"
    if res_json.is_file():
        try:
            r = json.loads(res_json.read_text())
            for k in ("teacher", "retention", "distill"):
                if k in r:
                    summary[k] = r[k]
            for sp in ("valid", "test"):
                if sp in r:
                    summary[f"run_{sp}_mean"] = {k: v["mean"] for k, v in r[sp].items()}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return summary


def manifest_fields(model, ck, ckpt, prec, inp, ref, graphs, art, tol, engine, paths) -> dict:
    """4. everything the manifest records (without files/paths)."""
    import onnx
    import onnxruntime
    import torch

    from ..metrics import METRIC_KEYS, mmsa_metrics, retention
    valid, mods, proto = inp.data["valid"], model.modalities, graphs["proto"]
    y = valid.labels.astype(np.float32)
    m_art, m_torch = mmsa_metrics(art["valid"], y), mmsa_metrics(ref["valid"], y)
    row = lambda m: {k: m[k] for k in METRIC_KEYS}  # noqa: E731
    io_desc = ox.graph_io(proto)
    return {
        "model": paths.onnx.name, "precision": prec.name, "opset": ox.opset_of(proto), "modalities": list(mods),
        "dims": dict(model.dims), "inputs": io_desc["inputs"], "output": io_desc["outputs"][0],
        "mask": inp.graph.mask,
        "preprocessing": inp.graph.preprocessing, "graph": inp.graph.kind,
        "parity": {
            "fp32_onnxruntime_vs_pytorch": {"max_abs": graphs["fp32_max"], "mean_abs": graphs["fp32_mean"],
                                            "tolerance": FP32_PARITY_TOL, "samples": int(len(valid)),
                                            "data": inp.data_path, "split": "valid"},
            "artefact_vs_pytorch_fp32": {"max_abs": art["dev_max"], "mean_abs": art["dev_mean"]},
        },
        "metrics": {
            "valid_onnxruntime": row(m_art),
            "valid_fp32_onnxruntime": row(mmsa_metrics(graphs["ort32_valid"], y)),
            "valid_pytorch_fp32": row(m_torch),
            "vs_fp32": {k: retention(m_art, m_torch)[k] for k in ("Non0_acc_2", "MAE_increase_rel")},
            "data": inp.data_path, "samples": int(len(valid)),
        },
        "checkpoint": _checkpoint_summary(ckpt, ck, model, row(m_torch)),
        "quantization": graphs["quant_info"], "engine_profile": inp.profile, "engine": engine,
        "golden": {"file": paths.golden.name, "batches": [int(len(b)) for b in ref["golden"]],
                   "lengths": [inp.graph.golden_lengths(b) for b in ref["golden"]], "tolerance": tol,
                   "check_command": f"cpsl-runner {paths.onnx.name} --check {paths.golden.name}"},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
