#!/usr/bin/env python
"""The int8 end-to-end graph, one change at a time: size on disk, batch-1 latency (1 thread) and
MOSI valid accuracy of each int8 variant beside the fp32 graph of the same checkpoint.

    python bench/int8_ablation.py --ckpt best.pt [--ckpt other.pt ...] --data mosi.pkl --out DIR
                                  [--iters 400] [--calib-batches 8] [--variants old,dedicated,embedding,per_channel]

Per checkpoint: ``cpsl.deploy.export_artifact`` writes the fp32 end-to-end graph (and its
tokenizer); every variant is ``cpsl.compress.quantize.quantize_int8`` of that graph on the same
calibration batches (``--calib-batches`` training batches of 32, seed 0; default 8). The ``modelopt*``
variants are NVIDIA Model Optimizer's ONNX PTQ of the same fp32 graph on the same batches (needs
``pip install nvidia-modelopt`` and its ONNX helpers beside the CPU torch; calibrated with ONNX Runtime's
CPU provider). Accuracy: raw valid transcripts through ``export/frontend.py`` and ONNX Runtime (as ``bench/run.py --e2e`` scores). Latency: graph time
at batch 1 on consecutive real valid transcripts, 1 ONNX Runtime thread, all graphs of a checkpoint
interleaved in rounds (rotating order) so that a change of machine load hits them alike; the ratio
column is the median over rounds of (variant / fp32) on the same input. Profiles: ONNX Runtime per-op
time at one transcript. Writes ``DIR/int8_ablation.json`` and ``DIR/int8_ablation.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchkit.e2e import fe, ort_op_profile, predict_valid, session  # bench/ is sys.path[0]
from benchkit.errors import BenchError, bench_main
from benchkit.machine import machine_info

GATHER_MIN = 262_144          # the word-embedding table (30522 x 384); position/type tables stay float
# name -> (description, quantize_int8 keyword arguments); each adds one change to the one before
VARIANTS = {
    "old": ("the previous default: per-tensor weights, Q/DQ shared by readers, float embedding",
            dict(per_channel=False, dedicated_pairs=False, gather_min_elems=0)),
    "dedicated": ("+ one Q/DQ pair (own scale) per quantized input, float residual readers",
                  dict(per_channel=False, dedicated_pairs=True, gather_min_elems=0)),
    "embedding": ("+ int8 word embedding (Gather → DequantizeLinear, max-abs scale)",
                  dict(per_channel=False, dedicated_pairs=True, gather_min_elems=GATHER_MIN)),
    "per_channel": ("+ per-output-channel weight scales",
                    dict(per_channel=True, dedicated_pairs=True, gather_min_elems=GATHER_MIN)),
    "emb_p9999": ("per_channel, embedding scale at the 99.99th percentile of |w|",
                  dict(per_channel=True, dedicated_pairs=True, gather_min_elems=GATHER_MIN,
                       gather_percentile=99.99)),
    "ffn_out_float": ("per_channel, the encoder's FFN output MatMuls (GELU output in) left float",
                      dict(per_channel=True, dedicated_pairs=True, gather_min_elems=GATHER_MIN)),
    "dq_gather": ("per_channel, int8 embedding in the other order: DequantizeLinear(table) → Gather",
                  dict(per_channel=True, dedicated_pairs=True, gather_min_elems=GATHER_MIN)),
}
# NVIDIA Model Optimizer's ONNX PTQ (``pip install nvidia-modelopt``, not a cpsl dependency) on the same
# fp32 graph and calibration feeds: name -> (description, modelopt.onnx.quantization.quantize keywords);
# dq_only: weights stored int8 behind a DequantizeLinear (else float weights behind Q/DQ: fp32 size)
MODELOPT = {
    "modelopt": ("NVIDIA Model Optimizer ONNX PTQ, its defaults for TensorRT (entropy calibration, "
                 "float remainder in fp16)", dict(calibration_method="entropy", high_precision_dtype="fp16", dq_only=True)),
    "modelopt_fp32": ("Model Optimizer, entropy calibration, float remainder kept fp32",
                      dict(calibration_method="entropy", high_precision_dtype="fp32", dq_only=True)),
    "modelopt_max": ("Model Optimizer, max calibration, float remainder kept fp32",
                     dict(calibration_method="max", high_precision_dtype="fp32", dq_only=True)),
    "modelopt_nomha": ("Model Optimizer, entropy, fp32 remainder, attention MatMuls left float (disable_mha_qdq)",
                       dict(calibration_method="entropy", high_precision_dtype="fp32", dq_only=True,
                            disable_mha_qdq=True)),
    "modelopt_matmul": ("Model Optimizer, entropy, fp32 remainder, no attention Q/DQ, only MatMul/Gemm quantized "
                        "(our placement's op set)", dict(calibration_method="entropy", high_precision_dtype="fp32",
                                                         dq_only=True, disable_mha_qdq=True,
                                                         op_types_to_quantize=["MatMul", "Gemm"])),
}


def modelopt_quantize():
    """Model Optimizer's ONNX ``quantize``, or one error line saying how to install it."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise BenchError(f"the modelopt variants need NVIDIA Model Optimizer (pip install --no-deps nvidia-modelopt "
                         f"and its ONNX helpers, see docs/int8.md; keep the CPU torch and onnxruntime): {e}") from None
    return quantize


def modelopt_int8(fp32: Path, out: Path, calib: list[dict], **kw) -> None:
    """``modelopt.onnx.quantization.quantize`` of ``fp32`` into ``out``, calibrated on ``calib`` with ONNX
    Runtime's CPU provider (the CUDA and TensorRT calibration providers need a GPU)."""
    from onnxruntime.quantization import CalibrationDataReader
    quantize = modelopt_quantize()

    class Feeds(CalibrationDataReader):         # the reader modelopt expects: ORT's, plus get_first and rewind
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self.it, None)

        def get_first(self):
            return calib[0]

        def rewind(self):
            self.it = iter(calib)

    quantize(str(fp32), quantize_mode="int8", calibration_data_reader=Feeds(), calibration_eps=["cpu"],
             output_path=str(out), log_level="WARNING", **kw)


def dq_before_gather(path: Path) -> None:
    """The int8 table in the other order, DQ(int8 table) → Gather (the TensorRT form; in place)."""
    import onnx

    from cpsl.compress.quantize import dequantize_before_gather
    m = onnx.load(str(path))
    dequantize_before_gather(m)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


def ffn_out_matmuls(path: Path) -> list[str]:
    """The text encoder's FFN output MatMuls (their input is the GELU output: the widest activation range)."""
    import onnx
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "MatMul" and "text_backbone" in n.name
            and "/output/dense/" in n.name and "/attention/" not in n.name]


def calibration(ckpt: Path, pkl: str, batches: int = 8, batch_size: int = 32) -> list[dict]:
    """The feeds ``export_artifact`` calibrates on (same split, seed and sizes)."""
    from cpsl.checkpoint import load_model
    from cpsl.data import load_data
    from cpsl.deploy.e2e import TokenGraph
    from cpsl.deploy.stages import calib_feeds
    model, _, _ = load_model(ckpt)
    return calib_feeds(load_data(pkl)["train"], TokenGraph(model), batches, batch_size)


def build(ckpt: Path, pkl: str, work: Path, names: list[str], say, calib_batches: int = 8) -> dict[str, Path]:
    from cpsl.compress.quantize import quantize_int8
    from cpsl.deploy import ExportSettings, export_artifact
    from cpsl.deploy.precisions import silence
    fp32 = work / "fp32.onnx"
    export_artifact(ckpt, fp32, ExportSettings(precision="fp32", data=pkl, e2e=True))
    calib = calibration(ckpt, pkl, calib_batches)
    paths = {"fp32": fp32}
    for name in names:
        p = work / f"{name}.onnx"
        t0 = time.perf_counter()
        extra = ffn_out_matmuls(fp32) if name == "ffn_out_float" else []
        if name in MODELOPT:
            modelopt_int8(fp32, p, calib, **MODELOPT[name][1])
        else:
            with silence():
                quantize_int8(fp32, p, calib, min_weight_elems=65536, nodes_to_exclude=extra, **VARIANTS[name][1])
        if name == "dq_gather":
            dq_before_gather(p)
        paths[name] = p
        say(f"  {name}: {p.stat().st_size / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)")
    return paths


def interleaved_b1(paths: dict[str, Path], tok, split, iters: int, others: list[str]) -> dict:
    """Graph time at batch 1 (1 thread), all graphs on the same transcript in each round."""
    sess = {k: session(p, 1) for k, p in paths.items()}
    texts = [str(t) for t in split.raw_text]
    feeds = [fe.feeds_for(tok, [texts[i]], {m: split.features[m][i:i + 1] for m in others}) for i in range(len(texts))]
    names = list(sess)
    for f in feeds[:5]:
        for s in sess.values():
            s.run(["sentiment"], f)
    t = {k: [] for k in names}
    for r in range(iters):
        f = feeds[r % len(feeds)]
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            sess[k].run(["sentiment"], f)
            t[k].append(time.perf_counter() - t0)
    base = np.asarray(t["fp32"])
    return {k: {"p50_ms": float(np.median(v) * 1e3), "p90_ms": float(np.percentile(v, 90) * 1e3),
                "ratio_vs_fp32": float(np.median(np.asarray(v) / base)), "iters": len(v)} for k, v in t.items()}


def run_ckpt(label: str, ckpt: Path, pkl: str, work: Path, names: list[str], iters: int, say,
             calib_batches: int = 8) -> dict:
    from cpsl.compress.quantize import check_qdq
    from cpsl.data import load_data
    from cpsl.errors import CPSLError
    from cpsl.metrics import mmsa_metrics
    say(f"{label}: {ckpt}")
    paths = build(ckpt, pkl, work, names, say, calib_batches)
    man = json.loads((work / "fp32.manifest.json").read_text())
    tok = fe.load_tokenizer(paths["fp32"], man)
    valid = load_data(pkl)["valid"]
    y = valid.labels.astype(np.float32)
    others = fe.other_modalities(man)          # a text-only student reads no audio
    lat = interleaved_b1(paths, tok, valid, iters, others)
    feeds = fe.feeds_for(tok, [str(valid.raw_text[0])], {m: valid.features[m][:1] for m in others})
    rows, pred32 = {}, None
    for k, p in paths.items():
        pred = predict_valid(session(p, 1), tok, valid, others)
        pred32 = pred if k == "fp32" else pred32
        met = mmsa_metrics(pred, y)
        prof = ort_op_profile(p, feeds, 1, 30, work / f"prof_{k}", top=100)
        ops = {o["op"]: o for o in prof["top_ops"]}
        rows[k] = {"description": ({**VARIANTS, **MODELOPT}[k][0] if k != "fp32" else "float32 graph"),
                   "bytes": p.stat().st_size, "MAE": met["MAE"], "Non0_acc_2": met["Non0_acc_2"],
                   "Corr": met["Corr"], "max_abs_vs_fp32": float(np.abs(pred - pred32).max()),
                   "mean_abs_vs_fp32": float(np.abs(pred - pred32).mean()),
                   "latency_b1_1thread": lat[k], "profile": prof,
                   "dq_ms": ops.get("DequantizeLinear", {}).get("ms_per_run", 0.0),
                   "dq_calls": ops.get("DequantizeLinear", {}).get("calls", 0.0),
                   "mm_int_calls": ops.get("MatMulIntegerToFloat", {}).get("calls", 0.0)}
        if k != "fp32":
            try:
                rows[k]["qdq"] = check_qdq(p)
            except CPSLError as e:          # a graph not in the form TensorRT consumes: say why, keep measuring
                rows[k]["qdq"] = {"error": str(e)}
            rows[k]["MAE_increase_rel"] = met["MAE"] / rows["fp32"]["MAE"] - 1
        say(f"  {k}: {rows[k]['bytes'] / 1e6:.1f} MB, MAE {met['MAE']:.4f}, Non0_acc_2 {met['Non0_acc_2']:.4f}, "
            f"b1 p50 {lat[k]['p50_ms']:.2f} ms (x{lat[k]['ratio_vs_fp32']:.2f} fp32)")
    return {"label": label, "ckpt": str(ckpt), "valid_samples": int(len(valid)),
            "profile_input_tokens": int(feeds["input_ids"].shape[1]), "rows": rows}


def write_markdown(path: Path, res: dict) -> None:
    m = res["machine"]
    L = ["# int8 end-to-end graph: one change at a time", "",
         f"Command: `{res['command']}`  ",
         f"Machine: {m['cpu']}, {m['usable_cores']} cores, no GPU; onnxruntime {m['onnxruntime']}; load average "
         f"{m['loadavg_start']} at the start, {m['loadavg_end']} at the end (a training job ran beside it: compare "
         "columns of one table, not absolute numbers across runs).", "",
         "Latency: graph only (tokenization is the same for all), batch 1, 1 ONNX Runtime thread, real MOSI valid "
         "transcripts, variants interleaved in rounds; ×fp32 = median over rounds of variant/fp32 on the same input. "
         "Accuracy: MOSI valid through the torch-free front end. DQ = ONNX Runtime DequantizeLinear time and calls "
         "per batch-1 run; MMI2F = MatMulIntegerToFloat calls. MAE differences of a few tenths of a percent are "
         "within what 229 samples resolve; the mean abs deviation from the fp32 graph's predictions is the finer "
         "measure of what int8 changes.", ""]
    for c in res["checkpoints"]:
        L += [f"## {c['label']} (`{c['ckpt']}`, {c['valid_samples']} valid samples, profile at "
              f"{c['profile_input_tokens']} tokens)", "",
              "| variant | MB | b1 p50 ms | ×fp32 | MAE | MAE vs fp32 | Non0_acc_2 | mean / max abs vs fp32 | "
              "DQ ms (calls) | MMI2F calls | change |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, r in c["rows"].items():
            lt = r["latency_b1_1thread"]
            rel = f"{r['MAE_increase_rel']:+.2%}" if "MAE_increase_rel" in r else "—"
            L.append(f"| {k} | {r['bytes'] / 1e6:.1f} | {lt['p50_ms']:.2f} | {lt['ratio_vs_fp32']:.2f} | "
                     f"{r['MAE']:.4f} | {rel} | {r['Non0_acc_2']:.4f} | {r.get('mean_abs_vs_fp32', 0):.4f} / "
                     f"{r['max_abs_vs_fp32']:.4f} | "
                     f"{r['dq_ms']:.2f} ({r['dq_calls']:.0f}) | {r['mm_int_calls']:.0f} | {r['description']} |")
        L.append("")
    path.write_text("\n".join(L) + "\n")


@bench_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", action="append", required=True, help="LABEL=best.pt or best.pt (repeatable)")
    ap.add_argument("--data", required=True, help="the MMSA pickle with token ids and raw text (MOSI)")
    ap.add_argument("--out", required=True, help="folder for int8_ablation.json/.md")
    ap.add_argument("--work", help="folder for the graphs (default: a temporary one)")
    ap.add_argument("--iters", type=int, default=400, help="interleaved rounds")
    ap.add_argument("--calib-batches", type=int, default=8,
                    help="calibration batches of 32 (8: the committed ablations; 16: what `cpsl recipe mosi --edge` ships)")
    ap.add_argument("--variants", default="old,dedicated,embedding,per_channel,emb_p9999,ffn_out_float,dq_gather")
    a = ap.parse_args(argv)
    import onnxruntime  # noqa: F401
    import torch
    torch.set_num_threads(1)
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS and v not in MODELOPT]
    if unknown:
        raise BenchError(f"unknown variants {unknown} (choose from {', '.join([*VARIANTS, *MODELOPT])})")
    if a.calib_batches < 1 or a.iters < 1:
        raise BenchError("--calib-batches and --iters must be >= 1")
    if any(n in MODELOPT for n in names):
        modelopt_quantize()                      # before any export: a missing package is said at once
    info = machine_info("cpu", 1)
    say = lambda s: print(s, flush=True)  # noqa: E731
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"command": "python bench/int8_ablation.py " + " ".join(argv or sys.argv[1:]), "machine": info,
           "variants": {**{k: {"description": d, "quantize_int8": kw} for k, (d, kw) in VARIANTS.items() if k in names},
                        **{k: {"description": d, "modelopt": kw} for k, (d, kw) in MODELOPT.items() if k in names}},
           "calib_batches": a.calib_batches, "checkpoints": []}
    if any(n in MODELOPT for n in names):
        from importlib.metadata import PackageNotFoundError, version
        try:
            res["machine"]["nvidia_modelopt"] = version("nvidia-modelopt")
        except PackageNotFoundError:
            pass
    with tempfile.TemporaryDirectory() as td:
        for k, spec in enumerate(a.ckpt):
            label, _, path = spec.rpartition("=")
            work = Path(a.work or td) / f"c{k}"
            work.mkdir(parents=True, exist_ok=True)
            res["checkpoints"].append(run_ckpt(label or Path(path).parent.name, Path(path), a.data, work, names,
                                               a.iters, say, a.calib_batches))
    res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "int8_ablation.json").write_text(json.dumps(res, indent=2))
    write_markdown(out / "int8_ablation.md", res)
    say(f"wrote {out / 'int8_ablation.json'} and {out / 'int8_ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
