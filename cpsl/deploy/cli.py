"""``cpsl distill`` and ``cpsl export`` (attached to the ``cpsl`` group by cpsl/commands.py)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
from pathlib import Path

import click

from ..errors import CPSLError

FP32_PARITY_TOL = 1e-4


# ---------------------------------------------------------------------------- distill
@click.command()
@click.option("--teacher", required=True, type=click.Path(), help="The teacher's best.pt (from cpsl train).")
@click.option("--data", "data_path", default="synth", show_default=True,
              help="MMSA .pkl file, or 'synth' (the teacher's synthetic seed unless --set data.synth_seed=...).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (cpsl train's layout).")
@click.option("--preset", default="student", show_default=True, type=click.Choice(["teacher", "student"]))
@click.option("--config", type=click.Path(), help="YAML/JSON config file for the student.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a student config value.")
@click.option("--seeds", help="Comma-separated seeds, e.g. 1,2,3.")
@click.option("--epochs", type=int, help="Maximum epochs (early stopping on valid loss still applies).")
@click.option("--lambda-kd", default=1.0, show_default=True, type=float, help="λ_kd: weight of MSE(ŷ_s, ŷ_t).")
@click.option("--lambda-hint", default=0.1, show_default=True, type=float, help="λ_hint: weight of MSE(P z_s, z_t).")
@click.option("--max-ratio", default=0.15, show_default=True, type=float,
              help="Largest allowed student/teacher parameter ratio (frozen text backbone excluded).")
@click.option("--device", help="cpu (default) or cuda.")
@click.option("--no-cache", is_flag=True, help="Run the teacher on every batch instead of caching its outputs.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out (default: refuse).")
@click.option("--trust-pickle", is_flag=True,
              help="UNSAFE: read the .pkl with plain pickle, which runs any code it carries (only for files you made).")
def distill(teacher, data_path, out, preset, config, sets, seeds, epochs, lambda_kd, lambda_hint, max_ratio,
            device, no_cache, quiet, overwrite, trust_pickle):
    """Distil a teacher checkpoint into a small student; writes OUT/results.json (+ teacher, retention)."""
    from ..compress.distill import distill as run_distill
    from ..data import load_data
    from ..metrics import format_table
    from ..train import read_checkpoint
    from ..train_cli import _common_config, _device_check

    cfg = _common_config(preset, config, sets, seeds, epochs, device=device)
    if quiet:
        cfg.train.progress = False
    _device_check(cfg.train.device)
    tck = read_checkpoint(teacher)
    if not any(s.strip().startswith("data.synth_seed") for s in sets):
        cfg.data.synth_seed = int(tck.get("config", {}).get("data", {}).get("synth_seed", cfg.data.synth_seed))
    if not any(s.strip().startswith("data.synth=") for s in sets):
        cfg.data.synth = dict(tck.get("config", {}).get("data", {}).get("synth", {}) or {})
    del tck
    from ..runs import check_out
    check_out(out, overwrite=overwrite)
    data = load_data(data_path, cfg.data.synth_seed, cfg.data.synth, trust_pickle=trust_pickle)
    cfg.data.path = data_path
    click.echo(f"data: {data_path} ({', '.join(data.modalities)}; "
               f"{'/'.join(str(len(s)) for s in data.splits.values())} train/valid/test)")
    res = run_distill(teacher, data, cfg, out, lambda_kd=lambda_kd, lambda_hint=lambda_hint,
                      max_ratio=max_ratio, cache=not no_cache, log=click.echo, overwrite=overwrite)
    rows = {}
    for s in ("valid", "test"):
        if s in res["teacher"]:
            rows[f"teacher {s}"] = res["teacher"][s]
        if s in res:
            rows[f"student {s}"] = res[s]
    keys = ("MAE", "Corr", "Non0_acc_2", "Has0_acc_2", "Mult_acc_7")
    click.echo(format_table(rows, keys=keys))
    pr = res["distill"]["params"]
    click.echo(f"student/teacher parameters: {pr['student']:,}/{pr['teacher']:,} = {pr['ratio']:.1%}")
    for s, r in res["retention"].items():
        click.echo(f"retention ({s}): Non0_acc_2 {r['Non0_acc_2']:.1%}, Corr {r['Corr']:.1%}, "
                   f"MAE {r['MAE_increase']:+.4f} ({r['MAE_increase_rel']:+.1%})")
    click.echo(f"wrote {Path(out) / 'results.json'}")


# ---------------------------------------------------------------------------- export helpers
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_checked(path, synth_seed, model, ckpt, what, synth=None, trust_pickle=False):
    from ..data import load_data
    from ..train import check_compatible
    try:
        d = load_data(path, synth_seed, synth, trust_pickle=trust_pickle)
    except CPSLError as e:
        raise CPSLError(f"{what}: {e}") from None
    except (OSError, EOFError, ValueError, TypeError) as e:
        raise CPSLError(f"{what} {path} is not a readable MMSA pickle ({type(e).__name__})") from None
    check_compatible(model, d, ckpt)
    return d


def _calib_feeds(split, modalities, n_batches: int, batch_size: int, seed: int = 0) -> list[dict]:
    import torch

    from ..data.batch import iterate
    from .onnx import batch_feeds
    gen = torch.Generator().manual_seed(seed)
    feeds = []
    for b in iterate(split, batch_size, shuffle=True, generator=gen, modalities=modalities):
        feeds.append(batch_feeds(b, modalities))
        if len(feeds) >= n_batches:
            break
    return feeds


def _strip(proto):
    """Drop intermediate value_info (neither ONNX Runtime nor TensorRT needs it; it doubles the file)."""
    del proto.graph.value_info[:]
    return proto


@contextlib.contextmanager
def _silence():
    """onnxruntime.quantization prints and logs on the root logger; keep the CLI output short."""
    buf = io.StringIO()
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        logging.disable(logging.NOTSET)


# ---------------------------------------------------------------------------- export
@click.command()
@click.option("--ckpt", required=True, type=click.Path(), help="A best.pt from cpsl train / cpsl distill.")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), help="Output .onnx path.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]))
@click.option("--data", "data_path", help="Data for parity, golden batches and VALID metrics "
              "(default: the data the checkpoint was trained on).")
@click.option("--calib-data", help="int8: data whose training split calibrates activations (default: --data).")
@click.option("--calib-batches", default=16, show_default=True, type=int, help="int8: calibration batches.")
@click.option("--calib-batch-size", default=32, show_default=True, type=int)
@click.option("--calib-method", default="percentile", show_default=True,
              type=click.Choice(["minmax", "percentile", "entropy"]), help="int8: activation range calibration.")
@click.option("--quantize-attention/--no-quantize-attention", default=False, show_default=True,
              help="int8: also quantize the activation×activation MatMuls (QKᵀ, AV); off by default: "
                   "at MSA sequence lengths their Q/DQ pairs cost more than they save (bench/results).")
@click.option("--trt", is_flag=True, help="Build a TensorRT engine (.plan) here when `import tensorrt` works.")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (13-20).")
@click.option("--max-batch", default=64, show_default=True, type=int, help="Engine profile: largest batch.")
@click.option("--opt-batch", default=1, show_default=True, type=int, help="Engine profile: batch to tune for.")
@click.option("--opt-len", default="p95", show_default=True, help="Engine profile: length to tune for (p95, max or N).")
@click.option("--max-len", type=int, help="Engine profile: longest sequence (default: the data's longest).")
@click.option("--workspace", default=1024, show_default=True, type=int, help="TensorRT workspace (MiB).")
@click.option("--quiet", is_flag=True, help="Only the summary.")
@click.option("--trust-pickle", is_flag=True,
              help="UNSAFE: read the .pkl with plain pickle, which runs any code it carries (only for files you made).")
def export(ckpt, onnx_path, precision, data_path, calib_data, calib_batches, calib_batch_size, calib_method,
           quantize_attention, trt, opset, max_batch, opt_batch, opt_len, max_len, workspace, quiet, trust_pickle):
    """Export a checkpoint to ONNX (fp32, fp16 or int8 Q/DQ) with manifest, golden batches and engine script.

    \b
    Writes beside OUT.onnx:
      OUT.manifest.json     inputs/outputs, preprocessing, parity, VALID metrics (ONNX Runtime), sizes, sha256
      OUT.golden.npz        real batches (batch 1, 7 and the longest items) with expected outputs
      OUT.build_engine.sh   the trtexec command for the target (JetPack 6.x / TensorRT 10.3)
      OUT.plan              with --trt where TensorRT is installed
    Check: python export/runner.py OUT.onnx --check OUT.golden.npz
    """
    import numpy as np

    say = (lambda *a: None) if quiet else click.echo
    onnx_path = Path(onnx_path)
    if onnx_path.suffix != ".onnx":
        raise CPSLError(f"--onnx must end in .onnx, got {onnx_path.name}")
    if calib_batches < 1 or calib_batch_size < 1:
        raise CPSLError("--calib-batches and --calib-batch-size must be >= 1")
    if max_batch < 1:
        raise CPSLError("--max-batch must be >= 1")
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise CPSLError(f"export needs onnx and onnxruntime ({e.name} missing): pip install 'cpsl[export]'") from None
    import torch

    from ..compress.quantize import check_qdq, quantize_int8, to_fp16
    from ..metrics import METRIC_KEYS, mmsa_metrics
    from ..train import load_model
    from . import onnx as ox
    from .tensorrt import build_engine, shape_profile, tensorrt_available, write_build_script

    model, cfg, ck = load_model(ckpt, "cpu")
    model.eval()
    ox.check_exportable(model)
    mods = model.modalities
    if not data_path:
        data_path = ck.get("data_path") or cfg.data.path or "synth"
        if data_path != "synth" and not str(data_path).startswith("synth:") and not Path(data_path).is_file():
            raise CPSLError(f"the checkpoint's data {data_path} is not here; pass --data")
    data = _load_checked(data_path, cfg.data.synth_seed, model, ckpt, "--data", cfg.data.synth, trust_pickle)
    valid = data["valid"]
    if len(valid) == 0:
        raise CPSLError(f"the valid split of {data_path} is empty")
    calib = None
    if precision == "int8":
        cpath = calib_data or data_path
        cd = data if cpath == data_path else _load_checked(cpath, cfg.data.synth_seed, model, ckpt, "--calib-data", cfg.data.synth,
                                                          trust_pickle)
        if len(cd["train"]) == 0:
            raise CPSLError(f"the train split of {cpath} is empty: nothing to calibrate on")
        calib = _calib_feeds(cd["train"], mods, calib_batches, calib_batch_size)
    profile = shape_profile(data, mods, model.dims, max_batch=max_batch, opt_batch=opt_batch, opt_len=opt_len,
                            max_len=max_len, model_max_len=cfg.model.max_len)

    out_dir = onnx_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = onnx_path.stem
    manifest_path = out_dir / f"{stem}.manifest.json"
    golden_path = out_dir / f"{stem}.golden.npz"
    script_path = out_dir / f"{stem}.build_engine.sh"
    plan_path = out_dir / f"{stem}.plan"

    from ..data.batch import make_batch
    src = data["train"] if len(data["train"]) >= 2 else valid
    example = make_batch(src, np.arange(min(2, len(src))), mods)   # fixes the trace only: axes are dynamic
    torch_valid = ox.torch_predict(model, valid, batch_size=64)
    golden = ox.golden_batches(valid, mods, sizes=(1, 7, 3))
    with torch.no_grad():
        torch_golden = [model.predict(b.x, b.mask).float().numpy() for b in golden]
    golden_feeds = [ox.batch_feeds(b, mods) for b in golden]

    with tempfile.TemporaryDirectory() as td:
        # 1. fp32 graph + parity against PyTorch
        say(f"exporting {ckpt} ({', '.join(mods)}; {model.num_parameters():,} parameters) to ONNX opset {opset}")
        fp32_path = onnx_path if precision == "fp32" else Path(td) / "fp32.onnx"
        proto32 = ox.export_onnx(model, fp32_path, example, opset=opset)
        s32 = ox.ort_session(fp32_path)
        ort32_valid = ox.ort_predict(s32, valid, mods, batch_size=64)
        ort32_golden = [s32.run([ox.OUTPUT_NAME], f)[0] for f in golden_feeds]
        diffs = [np.abs(ort32_valid - torch_valid)] + [np.abs(a - b) for a, b in zip(ort32_golden, torch_golden)]
        fp32_max = float(max(d.max() for d in diffs))
        fp32_mean = float(np.concatenate(diffs).mean())
        if not fp32_max <= FP32_PARITY_TOL:
            raise CPSLError(f"fp32 ONNX Runtime output differs from PyTorch by {fp32_max:.3g} (> {FP32_PARITY_TOL}) "
                            f"on {data_path} valid batches")
        say(f"fp32 parity (ONNX Runtime vs PyTorch, {len(valid)} valid samples + {len(golden)} golden batches): "
            f"max abs {fp32_max:.2e}, mean abs {fp32_mean:.2e}")
        # 2. the artefact
        quant_info = None
        if precision == "fp16":
            say("converting to float16 (float32 inputs/outputs; LayerNorm/Softmax/reductions in float32)")
            proto = _strip(to_fp16(proto32))
            onnx.save(proto, str(onnx_path))
        elif precision == "int8":
            say(f"quantizing to int8 Q/DQ ({calib_method} calibration on {len(calib)} training batches)")
            with _silence():
                quant_info = quantize_int8(fp32_path, onnx_path, calib, method=calib_method,
                                           quantize_attention=quantize_attention)
            proto = _strip(onnx.load(str(onnx_path)))
            onnx.save(proto, str(onnx_path))
            check_qdq(proto)
        else:
            proto = _strip(proto32)
            onnx.save(proto, str(onnx_path))
    onnx.checker.check_model(str(onnx_path), full_check=True)
    if ox.opset_of(proto) > ox.MAX_OPSET:
        raise CPSLError(f"the {precision} graph has opset {ox.opset_of(proto)} > {ox.MAX_OPSET}")
    sess = ox.ort_session(onnx_path)
    art_valid = ox.ort_predict(sess, valid, mods, batch_size=64) if precision != "fp32" else ort32_valid
    art_golden = [sess.run([ox.OUTPUT_NAME], f)[0] for f in golden_feeds]
    dev = [np.abs(art_valid - torch_valid)] + [np.abs(a - b) for a, b in zip(art_golden, torch_golden)]
    dev_max = float(max(d.max() for d in dev))
    y = valid.labels.astype(np.float32)
    m_art, m_torch, m_ort32 = mmsa_metrics(art_valid, y), mmsa_metrics(torch_valid, y), mmsa_metrics(ort32_valid, y)
    if precision == "fp32":
        tol = {"atol": FP32_PARITY_TOL, "rtol": 0.0}
    else:  # another backend running this graph at this precision: within this graph's own deviation from fp32
        tol = {"atol": float(f"{max(1e-3, 2 * dev_max):.2g}"), "rtol": 0.0}
    ox.save_golden(golden_path, golden_feeds, art_golden, torch_golden,
                   {"model": onnx_path.name, "precision": precision, "inputs": ox.input_names(mods),
                    "output": ox.OUTPUT_NAME, "tolerance": tol,
                    "expected": "this artefact's output under ONNX Runtime (CPU)",
                    "reference": "the PyTorch fp32 checkpoint"})

    # 3. TensorRT engine / script
    cmd = write_build_script(script_path, onnx_path.name, plan_path.name, profile, precision, workspace)
    engine = {"script": script_path.name, "trtexec": cmd, "built": False}
    if trt:
        mod, why = tensorrt_available()
        if mod is None:
            click.echo(f"TensorRT is absent here ({why.splitlines()[0]}); wrote {script_path} to build the engine "
                       "on the target")
            engine["why_not_built"] = f"tensorrt not importable: {why.splitlines()[0]}"
        else:
            say(f"building TensorRT engine {plan_path} ...")
            engine.update(build_engine(onnx_path, plan_path, profile, precision, workspace), built=True)

    # 4. manifest
    def row(m):
        return {k: m[k] for k in METRIC_KEYS}

    ckpt_summary = {"path": str(ckpt), "epoch": ck.get("epoch"), "params": model.num_parameters(),
                    "valid_pytorch": row(m_torch)}
    res_json = Path(ckpt).resolve().parent.parent / "results.json"
    if res_json.is_file():
        try:
            r = json.loads(res_json.read_text())
            for k in ("teacher", "retention", "distill"):
                if k in r:
                    ckpt_summary[k] = r[k]
            for s in ("valid", "test"):
                if s in r:
                    ckpt_summary[f"run_{s}_mean"] = {k: v["mean"] for k, v in r[s].items()}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    io_desc = ox.graph_io(proto)
    manifest = {
        "format": "cpsl-onnx-manifest-1",
        "model": onnx_path.name,
        "precision": precision,
        "opset": ox.opset_of(proto),
        "modalities": list(mods),
        "dims": dict(model.dims),
        "inputs": io_desc["inputs"],
        "output": io_desc["outputs"][0],
        "mask": "float32, 1.0 on valid steps and 0.0 on padding (the graph tests mask > 0.5)",
        "preprocessing": ox.PREPROCESSING,
        "parity": {
            "fp32_onnxruntime_vs_pytorch": {"max_abs": fp32_max, "mean_abs": fp32_mean, "tolerance": FP32_PARITY_TOL,
                                            "samples": int(len(valid)), "data": str(data_path), "split": "valid"},
            "artefact_vs_pytorch_fp32": {"max_abs": dev_max, "mean_abs": float(np.concatenate(dev).mean())},
        },
        "metrics": {
            "valid_onnxruntime": row(m_art),
            "valid_fp32_onnxruntime": row(m_ort32),
            "valid_pytorch_fp32": row(m_torch),
            "vs_fp32": {"Non0_acc_2": m_art["Non0_acc_2"] / m_torch["Non0_acc_2"] if m_torch["Non0_acc_2"] else None,
                        "MAE_increase_rel": (m_art["MAE"] - m_torch["MAE"]) / m_torch["MAE"] if m_torch["MAE"] else None},
            "data": str(data_path), "samples": int(len(valid)),
        },
        "checkpoint": ckpt_summary,
        "quantization": quant_info,
        "engine_profile": profile,
        "engine": engine,
        "golden": {"file": golden_path.name, "batches": [int(len(b)) for b in golden],
                   "lengths": [{m: int(b.x[m].shape[1]) for m in mods} for b in golden], "tolerance": tol,
                   "check_command": f"python export/runner.py {onnx_path.name} --check {golden_path.name}"},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    files = {}
    for p in (onnx_path, golden_path, script_path, plan_path):
        if p.is_file():
            files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    manifest["files"] = files
    manifest_path.write_text(json.dumps(manifest, indent=2))

    # 5. summary
    click.echo(f"wrote {onnx_path} ({precision}, opset {manifest['opset']}, {files[onnx_path.name]['bytes'] / 1024:.1f} KiB)")
    click.echo(f"  parity: fp32 ONNX Runtime vs PyTorch max abs {fp32_max:.2e}; this artefact vs PyTorch fp32 "
               f"max abs {dev_max:.2e}")
    click.echo(f"  valid ({len(valid)}): MAE {m_art['MAE']:.4f} (fp32 {m_torch['MAE']:.4f}), Non0_acc_2 "
               f"{m_art['Non0_acc_2']:.4f} (fp32 {m_torch['Non0_acc_2']:.4f}), Corr {m_art['Corr']:.4f}")
    if quant_info:
        click.echo(f"  int8: {quant_info['int8_weights']} int8 weights, {quant_info['int8_activations']} int8 activations, "
                   f"quantized ops {quant_info['quantized_ops']}")
    click.echo(f"  {manifest_path.name}, {golden_path.name}, {script_path.name}"
               + (f", {plan_path.name}" if engine.get("built") else ""))
    click.echo(f"  check: python export/runner.py {onnx_path} --check {golden_path}")


COMMANDS = [distill, export]
