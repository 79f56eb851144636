"""MOSEI (text only): ``labels.csv`` (video_id, clip_id, text, label, mode); text = frozen encoder
token states + ``text_bert``; splits follow ``mode``."""
from __future__ import annotations

import numpy as np

from ...errors import CPSLError
from ...fileutil import sha256_file
from ..mmsa import SPLITS, MMSAData, require_splits
from .table import make_split, mmsa_id, read_csv, read_keys, read_labels, read_modes, require_columns, video_overlap
from .text import encode_texts, encoder_report, text_shapes

MOSEI_COLS = ("video_id", "clip_id", "text", "label", "mode")


def build_mosei(labels_csv, text_encoder: str = "minilm", max_len: int = 50, progress: bool = True,
                batch_size: int = 64, limit: int = 0) -> tuple[MMSAData, dict]:
    """MMSA data (text only) from MOSEI ``labels.csv`` (video_id, clip_id, text, label, mode).

    text = frozen encoder token states (N, max_len, d) + ``text_bert``; splits follow ``mode``
    (a file without ``test`` rows gives an empty test split). ``limit`` > 0 keeps the first
    ``limit`` rows of each split (quick checks)."""
    if int(max_len) < 2:
        raise CPSLError(f"--max-len must be at least 2, got {max_len}")
    if int(limit) < 0:
        raise CPSLError(f"--limit must be >= 0, got {limit}")
    lab = read_csv(labels_csv, "labels")
    require_columns(lab, MOSEI_COLS, "labels")
    if not lab.rows:
        raise CPSLError(f"labels file {labels_csv} has no data rows")
    keys = read_keys(lab, "labels")
    labels = read_labels(lab, keys, "labels")
    modes = np.asarray(read_modes(lab, labels_csv))
    texts = lab.col("text")
    keep = np.concatenate([np.flatnonzero(modes == n)[:int(limit) or None] for n in SPLITS])
    keep.sort()
    require_splits({n: int((modes[keep] == n).sum()) for n in SPLITS}, str(labels_csv))
    enc = encode_texts([texts[i] for i in keep], text_encoder, max_len, batch_size, progress)
    pos = {int(i): k for k, i in enumerate(keep)}
    splits = {}
    for name in SPLITS:
        idx = [i for i in keep if modes[i] == name]
        j = np.asarray([pos[int(i)] for i in idx], dtype=np.int64)
        splits[name] = make_split(name, {"text": np.ascontiguousarray(enc["states"][j])}, labels[idx],
                              [mmsa_id(keys[i]) for i in idx], [texts[i] for i in idx],
                              text_bert=np.ascontiguousarray(enc["text_bert"][j]),
                              lengths={"text": enc["lengths"][j]})
    report = {
        "builder": "mosei",
        "inputs": {"labels": str(labels_csv), "labels_sha256": sha256_file(labels_csv)},
        "text_encoder": encoder_report(text_encoder, enc, max_len),
        "rows": len(keys), "limit": int(limit),
        "splits": {n: len(s) for n, s in splits.items()},
        "videos": {n: len({i.split("$_$")[0] for i in s.ids}) for n, s in splits.items()},
        "dims": {"text": enc["hidden"]},
        "shapes": text_shapes(splits),
        "texts_truncated": int((enc["ntok"] > int(max_len)).sum()),
        "texts_empty": int(sum(1 for i in keep if not texts[i].strip())),
        "videos_in_several_splits": video_overlap(splits),
    }
    return MMSAData(splits, ("text",), path="", meta=report), report

