"""``cpsl predict``: sentiment of raw text (+ audio/vision features where the model reads them) with a
checkpoint or an exported artefact, printed as JSON (cpsl.inference)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..config import Config
from ..errors import CPSLError
from .options import device_check, threads_option


@click.command()
@click.option("--ckpt", type=click.Path(dir_okay=False), help="A best.pt whose model has a text encoder (PyTorch).")
@click.option("--model", "artifact", type=click.Path(dir_okay=False),
              help="An end-to-end export (model.onnx or model.plan from cpsl export), run torch-free.")
@click.option("--text", "texts", multiple=True, required=True, help="A text to score (repeat for several).")
@click.option("--audio-features", type=click.Path(dir_okay=False),
              help="CSV with columns a0..aN, one row per step: the audio of every --text (models that read audio).")
@click.option("--vision-features", type=click.Path(dir_okay=False),
              help="CSV with columns v0..vN, one row per step (models that read vision).")
@click.option("--max-len", default=128, show_default=True, type=click.IntRange(2, 4096),
              help="--ckpt: tokens per text (with [CLS]/[SEP]); an export uses its manifest's length.")
@click.option("--device", default=Config().train.device, show_default=True, help="--ckpt: cpu or cuda.")
@threads_option
@click.option("--out", type=click.Path(file_okay=False), help="Also write OUT/predictions.json.")
@click.option("--overwrite", is_flag=True, help="Replace OUT/predictions.json (default: refuse).")
def predict(ckpt, artifact, texts, audio_features, vision_features, max_len, device, threads, out, overwrite):
    """Score raw text with a checkpoint (--ckpt) or an exported artefact (--model); prints JSON.

    \b
    cpsl predict --model export/model.onnx --text "a wonderful, moving film"
    cpsl predict --ckpt run/seed1/best.pt --text "dull" --text "great" --audio-features a.csv"""
    from .. import inference
    if (ckpt is None) == (artifact is None):
        raise click.UsageError("give exactly one of --ckpt and --model")
    target = Path(out) / "predictions.json" if out else None
    if target is not None and target.exists() and not overwrite:
        raise CPSLError(f"{target} exists: pass --overwrite to replace it (or choose another --out)")
    paths = {m: p for m, p in (("audio", audio_features), ("vision", vision_features)) if p}
    if ckpt:
        import torch

        from ..checkpoint import load_model
        device_check(device)
        if threads:
            torch.set_num_threads(threads)
        model, cfg, _ = load_model(ckpt, device)
        feats = _features(paths, model.dims)
        preds = inference.predict_checkpoint(model, cfg, list(texts), feats, max_len=max_len)
        info = {"ckpt": str(ckpt), "backend": "pytorch", "device": device}
    else:
        from ..edge.frontend import InputError, load_manifest
        try:
            dims = load_manifest(Path(artifact))["dims"] if Path(artifact).is_file() else {}
        except InputError as e:
            raise CPSLError(str(e)) from None
        feats = _features(paths, dims)
        preds, info = inference.predict_artifact(artifact, list(texts), feats, threads=threads or 0)
        info = {"model": str(artifact), **info}
    result = {**info, "scale": "sentiment in [-3, 3], negative to positive",
              "predictions": [{"text": t, "sentiment": round(float(p), 6)} for t, p in zip(texts, preds)]}
    text = json.dumps(result, indent=2)
    click.echo(text)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")


def _features(paths: dict, dims: dict) -> dict:
    from ..inference import read_features
    for m in paths:
        if m not in dims:
            raise CPSLError(f"--{m}-features: the model does not read {m} (it reads {', '.join(dims)})")
    return {m: read_features(p, m, dims[m]) for m, p in paths.items()}


COMMANDS = [predict]
