"""Every config key with its value, its default and its help (``cpsl config show``).

The help of a key is its field's ``metadata["help"]`` in cpsl/config.py, else the comment on its
line there, so the text is declared once, beside the default."""
from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize

from .config import Config, sections


# keys whose field in cpsl/config.py carries neither metadata help nor a comment (docs/method.md names them)
FALLBACK = {
    "data.batch_size": "training batch size", "data.eval_batch_size": "evaluation batch size",
    "model.heads": "attention heads", "model.dropout": "dropout rate",
    "model.audio_layers": "AME temporal encoder depth, audio", "model.vision_layers": "AME temporal encoder depth, vision",
    "model.audio_kernel": "AME projection conv kernel, audio", "model.vision_kernel": "AME projection conv kernel, vision",
    "loss.aux": "λ_aux: weight of the unimodal auxiliary heads' loss", "loss.rec": "λ_rec: weight of the reconstruction loss",
    "loss.sl": "λ_SL: weight of the Statistical Loss (0: SL off)", "loss.div": "λ_div: weight of the feature-diversity loss",
    "loss.eps": "ε inside log(σ + ε) of SL",
    "cp.tau": "τ: a group is in conflict when r = ĝ / mean ĝ exceeds it",
    "cp.alpha": "α of the tanh penalty k = clamp(1 - tanh(α (r - 1)), k_min, 1)",
    "cp.k_min": "smallest penalty factor", "cp.beta": "k of the fixed penalty",
    "cp.normalize": "ĝ = g / sqrt(n) (per-parameter RMS) instead of the raw norm",
    "cp.start_epoch": "first epoch CP acts", "cp.ramp_epochs": "epochs of the linear ramp of the penalty",
    "cp.end_epoch": "CP stops after this epoch",
    "train.patience": "early stopping: epochs without a better valid loss", "train.lr": "learning rate (AdamW)",
    "train.weight_decay": "AdamW weight decay", "train.seeds": "seeds, one run each (mean ± std reported)",
    "train.progress": "progress bars",
}


def _comments(cls) -> dict[str, str]:
    """``{field: trailing comment}`` from the class source (empty when the source is not available)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out, name = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
            name = tok.string
        elif tok.type == tokenize.COMMENT and name is not None:
            out.setdefault(name, tok.string.lstrip("# ").strip())
        elif tok.type == tokenize.NEWLINE:
            name = None
    return out


def keys(cfg: Config) -> list[dict]:
    """``[{key, value, default, help}]`` for every ``section.key`` of ``cfg``, in declaration order."""
    base, rows = Config(), []
    for name, obj in sections(cfg):
        dflt = getattr(base, name)
        comments = _comments(type(obj))
        for f in dataclasses.fields(obj):
            rows.append({"key": f"{name}.{f.name}", "value": getattr(obj, f.name),
                         "default": getattr(dflt, f.name),
                         "help": f.metadata.get("help") or comments.get(f.name)
                         or FALLBACK.get(f"{name}.{f.name}", "")})
    return rows


def text(cfg: Config) -> str:
    """One line per key: ``section.key = value`` (``[default: ...]`` where it differs) ``# help``."""
    rows = keys(cfg)
    width = max(len(f"{r['key']} = {r['value']!r}") for r in rows)
    lines = []
    for r in rows:
        head = f"{r['key']} = {r['value']!r}"
        tail = " ".join(x for x in (r["help"], f"[default {r['default']!r}]" if r["value"] != r["default"] else "") if x)
        lines.append(f"{head:<{width}}  # {tail}" if tail else head)
    return "\n".join(lines)
