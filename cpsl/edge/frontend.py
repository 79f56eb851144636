"""Raw input → model inputs for ``runner.py predict`` (end-to-end graphs from ``cpsl export``).

Text goes through the ``tokenizers`` library with the exported ``OUT.tokenizer.json``, set up as
in training (cpsl/text_encoder.py ``tokenize``): [CLS] … [SEP], truncated on the right to the
manifest's ``tokenizer.max_length`` tokens; a batch is padded on the right with id 0 / mask 0 to
its longest text (padding is masked inside the graph, so it does not change the prediction).
Other modalities come from CSV files: numeric columns named ``a0..aN`` for audio (``v0..`` for
vision; the data pack's ``audio_opensmile.csv`` layout), one row per step for ``--audio-features``,
one row per text (one step) in ``--csv`` batch mode. Neither torch nor transformers is imported.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

PREFIX = {"audio": "a", "vision": "v"}


class InputError(Exception):
    """Bad input: the runner prints it as one ``error:`` line and exits 2."""


def load_manifest(model: Path) -> dict:
    p = model.with_name(f"{model.stem}.manifest.json")
    if not p.is_file():
        raise InputError(f"{p.name} not found beside {model.name}: predict needs the manifest cpsl export wrote")
    try:
        man = json.loads(p.read_text())
    except ValueError as e:
        raise InputError(f"{p} is not JSON ({e})") from None
    if not isinstance(man, dict) or man.get("graph") != "tokens" or not man.get("tokenizer"):
        raise InputError(f"{model.name} reads text features, not token ids: predict needs an end-to-end export "
                         "(cpsl export --e2e on a checkpoint with a text encoder)")
    mods, dims, tok = man.get("modalities"), man.get("dims"), man["tokenizer"]
    if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods) or not isinstance(dims, dict) or any(
            isinstance(dims.get(m), bool) or not isinstance(dims.get(m), int) or not 1 <= dims[m] <= 1 << 20
            for m in mods if m != "text"):
        raise InputError(f"{p}: 'modalities' must be a list of names and 'dims' their feature sizes (integers >= 1)")
    ml = tok.get("max_length") if isinstance(tok, dict) else None
    if not isinstance(tok, dict) or not isinstance(tok.get("file"), str) or isinstance(ml, bool) \
            or not isinstance(ml, int) or not 2 <= ml <= 1 << 16:
        raise InputError(f"{p}: 'tokenizer' must name its file and a max_length in [2, 65536]")
    return man


def load_tokenizer(model: Path, man: dict):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError("predict needs the tokenizers library: pip install tokenizers") from None
    t = man["tokenizer"]
    path = model.parent / t["file"]
    if Path(t["file"]).name != t["file"] or path.is_symlink():
        raise InputError(f"the manifest names the tokenizer {t['file']!r}: predict reads a tokenizer only from a "
                         "plain file beside the model")
    if not path.is_file():
        raise InputError(f"tokenizer file {path} not found (cpsl export writes it beside the model)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - a corrupt file is the user's input
        raise InputError(f"cannot read the tokenizer {path}: {str(e).splitlines()[0]}") from None
    tok.no_padding()
    tok.enable_truncation(max_length=int(t["max_length"]))
    return tok


def encode(tok, texts: list[str]) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64, (B, L)), right-padded to the longest text."""
    encs = tok.encode_batch([str(t) for t in texts])
    L = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), L), np.int64)
    mask = np.zeros((len(encs), L), np.int64)
    for i, e in enumerate(encs):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def other_modalities(man: dict) -> list[str]:
    return [m for m in man["modalities"] if m != "text"]


def _columns(header: list[str], m: str, d: int, path) -> list[int]:
    pre = PREFIX.get(m, m[0])
    want = [f"{pre}{i}" for i in range(d)]
    idx = {h.strip(): k for k, h in enumerate(header)}
    missing = [c for c in want if c not in idx]
    if missing:
        raise InputError(f"{path}: no {m} feature columns {missing[0]}..{want[-1]} ({m} has {d} features)")
    return [idx[c] for c in want]


def _rows(path) -> tuple[list[str], list[list[str]]]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"file not found: {path}")
    try:
        with open(p, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read {path} as CSV ({type(e).__name__})") from None
    if len(rows) < 2:
        raise InputError(f"{path}: needs a header row and at least one data row")
    return rows[0], rows[1:]


def _floats(rows, cols, path) -> np.ndarray:
    try:
        x = np.asarray([[float(r[c]) for c in cols] for r in rows], dtype=np.float32)
    except (ValueError, IndexError):
        raise InputError(f"{path}: feature values must be numbers in every row") from None
    if not np.all(np.isfinite(x)):
        raise InputError(f"{path}: feature values must be finite")
    return x


def sequence_features(path, m: str, d: int) -> np.ndarray:
    """One sample's ``(L, d)`` features: one CSV row per step."""
    header, rows = _rows(path)
    return _floats(rows, _columns(header, m, d, path), path)


def read_batch_csv(path, man: dict) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """``--csv``: ``(ids, texts, {m: (N, 1, d)})``; columns ``text``, optional ``id``, features."""
    header, rows = _rows(path)
    h = [c.strip() for c in header]
    if "text" not in h:
        raise InputError(f"{path}: no 'text' column (columns: {', '.join(h[:8])}{'…' if len(h) > 8 else ''})")
    ti = h.index("text")
    ids = [r[h.index("id")] if "id" in h else str(k) for k, r in enumerate(rows)]
    texts = [r[ti] if ti < len(r) else "" for r in rows]
    feats = {m: _floats(rows, _columns(h, m, int(man["dims"][m]), path), path)[:, None, :]
             for m in other_modalities(man)}
    return ids, texts, feats


def feeds_for(tok, texts: list[str], feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's inputs for ``texts`` and the other modalities' ``(B, L, d)`` features (full masks)."""
    f = encode(tok, texts)
    for m, x in feats.items():
        f[m] = np.ascontiguousarray(x, np.float32)
        f[f"{m}_mask"] = np.ones(x.shape[:2], np.float32)
    return f


def write_predictions(path, ids, texts, preds) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "sentiment"])
        for i, t, p in zip(ids, texts, preds):
            w.writerow([i, t, f"{float(p):.6f}"])
