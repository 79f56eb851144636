"""MOSI: ``labels.csv`` (video_id, clip_id, text, label, mode) joined with ``audio_opensmile.csv``
(video_id, clip_id, a0..a72) on (video_id, clip_id); text = frozen encoder token states, audio = one
openSMILE vector per segment; splits follow ``mode``."""
from __future__ import annotations

import warnings

import numpy as np

from ...errors import CPSLError
from ...fileutil import sha256_file
from ..mmsa import SPLITS, MMSAData, require_splits
from .table import (FIRST, KEY, feature_cols, make_split, mmsa_id, read_csv, read_floats, read_keys, read_labels,
                    read_modes, require_columns, unjoined, video_overlap)
from .text import encode_texts, encoder_report, text_shapes

LABEL_COLS = ("video_id", "clip_id", "text", "label", "mode")


def join_mosi(labels_csv, audio_csv, strict: bool = False) -> tuple[dict, dict]:
    """Read, check and join the two MOSI tables; no encoder needed.

    Returns ``(rows, report)``: ``rows`` holds the joined rows in labels-file order (``keys``,
    ``ids``, ``text``, ``labels``, ``mode``, ``audio`` (N, d_a) float32); ``report`` the join
    counts. Unjoined rows are dropped and reported (a warning), or an error with ``strict``.
    """
    lab = read_csv(labels_csv, "labels")
    require_columns(lab, LABEL_COLS, "labels")
    aud = read_csv(audio_csv, "audio")
    require_columns(aud, KEY, "audio")
    acols = feature_cols(aud, "a", "audio")
    if not lab.rows:
        raise CPSLError(f"labels file {labels_csv} has no data rows")
    if not aud.rows:
        raise CPSLError(f"audio file {audio_csv} has no data rows")

    lkeys = read_keys(lab, "labels")
    akeys = read_keys(aud, "audio")
    labels = read_labels(lab, lkeys, "labels")
    modes = read_modes(lab, labels_csv)
    audio, audio_bad = read_floats(aud, acols)                        # (N_a, d_a), (N_a,)

    apos = {k: i for i, k in enumerate(akeys)}
    lset = set(lkeys)
    keep = [i for i, k in enumerate(lkeys) if k in apos]
    no_audio = [mmsa_id(k) for k in lkeys if k not in apos]
    no_label = [mmsa_id(k) for k in akeys if k not in lset]
    join = {"label_rows": len(lkeys), "audio_rows": len(akeys), "joined": len(keep),
            "labels_without_audio": unjoined(no_audio), "audio_without_labels": unjoined(no_label)}
    if not keep:
        raise CPSLError(f"no row of {labels_csv} matches a row of {audio_csv} on (video_id, clip_id) "
                        f"(first label id {mmsa_id(lkeys[0])}, first audio id {mmsa_id(akeys[0])})")
    if no_audio or no_label:
        msg = (f"{len(no_audio)} label row(s) without audio (first: {', '.join(no_audio[:FIRST]) or '-'}); "
               f"{len(no_label)} audio row(s) without labels (first: {', '.join(no_label[:FIRST]) or '-'})")
        if strict:
            raise CPSLError(f"--strict: {msg}")
        warnings.warn(f"dropped unjoined rows: {msg}", stacklevel=2)
    texts = lab.col("text")
    rows = {
        "keys": [lkeys[i] for i in keep],
        "ids": [mmsa_id(lkeys[i]) for i in keep],
        "text": [texts[i] for i in keep],
        "labels": labels[keep],
        "mode": [modes[i] for i in keep],
        "audio": audio[[apos[lkeys[i]] for i in keep]],                      # (N, d_a)
        "audio_bad": audio_bad[[apos[lkeys[i]] for i in keep]],              # (N,)
    }
    report = {"join": join, "audio_nonfinite_replaced": int(rows["audio_bad"].sum()),
              "audio_nonfinite_in_dropped_rows": int(audio_bad.sum() - rows["audio_bad"].sum()),
              "audio_dim": len(acols)}
    return rows, report



def build_mosi(labels_csv, audio_csv, text_encoder: str = "minilm", max_len: int = 50,
               progress: bool = True, strict: bool = False, batch_size: int = 64) -> tuple[MMSAData, dict]:
    """MMSA data (text + audio) from MOSI ``labels.csv`` and ``audio_opensmile.csv``."""
    if int(max_len) < 2:
        raise CPSLError(f"--max-len must be at least 2, got {max_len}")
    rows, jrep = join_mosi(labels_csv, audio_csv, strict=strict)   # all table checks before the encoder
    modes = np.asarray(rows["mode"])
    require_splits({n: int((modes == n).sum()) for n in SPLITS}, f"{labels_csv} (after the join)")
    enc = encode_texts(rows["text"], text_encoder, max_len, batch_size, progress)
    states, text_bert, tlen = enc["states"], enc["text_bert"], enc["lengths"]
    audio = rows["audio"][:, None, :]                              # (N, 1, d_a)
    labels = rows["labels"]

    splits = {}
    for name in SPLITS:
        idx = np.flatnonzero(modes == name)
        splits[name] = make_split(
            name, {"text": np.ascontiguousarray(states[idx]), "audio": np.ascontiguousarray(audio[idx])},
            labels[idx], [rows["ids"][i] for i in idx], [rows["text"][i] for i in idx],
            text_bert=np.ascontiguousarray(text_bert[idx]),
            lengths={"text": tlen[idx], "audio": np.ones(len(idx), dtype=np.int64)},
            cleaned=int(rows["audio_bad"][idx].sum()))
    report = {
        "builder": "mosi",
        "inputs": {"labels": str(labels_csv), "labels_sha256": sha256_file(labels_csv),
                   "audio": str(audio_csv), "audio_sha256": sha256_file(audio_csv)},
        "text_encoder": encoder_report(text_encoder, enc, max_len),
        "splits": {n: len(s) for n, s in splits.items()},
        "videos": {n: len({i.split("$_$")[0] for i in s.ids}) for n, s in splits.items()},
        "dims": {"text": enc["hidden"], "audio": int(audio.shape[2])},
        "shapes": text_shapes(splits),
        **jrep,
        "texts_truncated": int((enc["ntok"] > int(max_len)).sum()),
        "texts_empty": int(sum(1 for t in rows["text"] if not t.strip())),
        "videos_in_several_splits": video_overlap(splits),
    }
    data = MMSAData(splits, ("text", "audio"), path="", meta=report)
    return data, report

