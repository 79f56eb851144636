"""The model card written beside every exported artefact: what it is, the data it was trained and
checked on, its metrics with the split named, intended use and limits (from the manifest)."""
from __future__ import annotations

from pathlib import Path

SHOWN = ("MAE", "Corr", "Non0_acc_2", "Has0_acc_2", "Mult_acc_7")

LIMITS = [
    "Validation figures come from the split named in each row; they are not comparable with published "
    "test-split numbers, and a model selected on valid is optimistic there.",
    "The model only knows the data it was trained on: its labels, its language, its feature extractors. "
    "Inputs must be preprocessed exactly as the manifest's `preprocessing` says.",
    "Sentiment scores are a regression in [-3, 3] (MMSA's scale); they are not calibrated probabilities.",
    "Not for decisions about people (hiring, credit, health, policing) or for monitoring individuals.",
]


def _row(name: str, m: dict | None) -> str:
    if not m:
        return ""
    return f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k in m else "-" for k in SHOWN) + " |\n"


def card_text(manifest: dict) -> str:
    """Markdown of the card for a manifest dict (``Manifest.to_dict()``)."""
    m, ck, met = manifest, manifest.get("checkpoint", {}), manifest.get("metrics", {})
    inputs = ", ".join(f"`{i['name']}`" for i in m.get("inputs", []))
    run_data = met.get("data", "?")
    lines = [
        f"# Model card: {m['model']}\n",
        f"A cpsl sentiment model exported to ONNX ({m['precision']}, opset {m['opset']}, graph `{m['graph']}`). "
        f"Modalities: {', '.join(m['modalities'])}; inputs {inputs}; output `sentiment` (one score per item, "
        f"[-3, 3], negative to positive). Checkpoint: `{ck.get('path', '?')}` (epoch {ck.get('epoch', '?')}, "
        f"{ck.get('params', 0):,} parameters). Full details: `{Path(m['model']).stem}.manifest.json`.\n",
        "## Data\n",
        f"Checked on `{run_data}` (its **valid** split, {met.get('samples', '?')} items). The training data is "
        "the checkpoint's `config.json` `data.path` in its run folder.\n",
        "## Metrics\n",
        "| what | " + " | ".join(SHOWN) + " |\n|---|" + "---|" * len(SHOWN) + "\n"
        + _row("this artefact, **valid** (ONNX Runtime)", met.get("valid_onnxruntime"))
        + _row("PyTorch fp32 checkpoint, **valid**", met.get("valid_pytorch_fp32"))
        + _row("training run, **valid** (mean over seeds)", ck.get("run_valid_mean"))
        + _row("training run, **test** (mean over seeds)", ck.get("run_test_mean")),
        "## Use\n",
        "Intended: scoring the sentiment of utterances like those of the training data, on a CPU with ONNX "
        "Runtime or on an NVIDIA Jetson with TensorRT. Run it with `cpsl predict --model "
        f"{m['model']} --text \"...\"` (token-id graphs) or the torch-free device runner "
        f"(`cpsl-runner {m['model']} --check {m.get('golden', {}).get('file', 'GOLDEN.npz')}`).\n",
        "## Limits\n",
        "".join(f"- {x}\n" for x in LIMITS),
    ]
    return "\n".join(lines)


def card_path(onnx_path: Path) -> Path:
    """``README.md`` beside ``model.onnx`` (the ``--out DIR`` layout), else ``<stem>.README.md``."""
    return onnx_path.with_name("README.md" if onnx_path.stem == "model" else f"{onnx_path.stem}.README.md")


def write_card(manifest: dict, onnx_path: Path) -> Path:
    p = card_path(Path(onnx_path))
    p.write_text(card_text(manifest))
    return p
