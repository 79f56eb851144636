"""Builders: MMSA pickles from the real data pack's CSV files (see ../shared/data/README.md).

``build_mosi``    MOSI ``labels.csv`` (video_id, clip_id, text, label, mode) joined with
                  ``audio_opensmile.csv`` (video_id, clip_id, a0..a72) on (video_id, clip_id).
                  text  = frozen pretrained encoder token states (N, max_len, d) + ``text_bert``
                  audio = one openSMILE vector per segment (N, 1, 73); no vision.
                  Splits follow the ``mode`` column (train / valid / test).
``build_mosei``   MOSEI ``labels.csv`` (video_id, clip_id, text, label, mode): text only
                  (frozen encoder token states + ``text_bert``); splits follow ``mode``.
``build_bclstm``  bc-LSTM's utterance-level features (video_id, clip_id, label, t*, a*, v*):
                  text/audio/vision (N, 1, d); validation carved from train by video id.

Each returns ``(MMSAData, report)``; ``report`` is a JSON-ready dict (sizes, dims, join
counts and the first unjoined ids, non-finite values replaced by 0, ...). Rows are kept in
file order, so the same inputs give byte-identical arrays. Bad input raises ``CPSLError``
with one line.
"""
from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CPSLError
from ..fileutil import sha256_file
from .mmsa import SPLITS, MMSAData, Split, require_splits

FIRST = 5                     # how many unjoined ids a report names
KEY = ("video_id", "clip_id")


# ----------------------------------------------------------------------------- CSV reading
@dataclass
class _Table:
    path: str
    header: list[str]
    rows: list[list[str]]
    lines: list[int]                          # 1-based file line of each row (header is line 1)

    def col(self, name: str) -> list[str]:
        j = self.header.index(name)
        return [r[j] for r in self.rows]


def _read_csv(path, what: str) -> _Table:
    p = Path(str(path))
    if not p.exists():
        raise CPSLError(f"{what} file not found: {path}")
    if p.is_dir():
        raise CPSLError(f"{what} path is a folder, expected a CSV file: {path}")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise CPSLError(f"{what} file {path} is empty (no header line)")
            header = [h.strip() for h in header]
            rows, lines = [], []
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue                                  # blank line
                if len(row) != len(header):
                    raise CPSLError(f"{path}: line {reader.line_num} has {len(row)} fields, "
                                    f"the header has {len(header)}")
                rows.append(row)
                lines.append(reader.line_num)
    except UnicodeDecodeError:
        raise CPSLError(f"{what} file {path} is not UTF-8 text (is it a CSV file?)") from None
    except csv.Error as e:
        raise CPSLError(f"{path}: not a readable CSV file ({e})") from None
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise CPSLError(f"{path}: duplicate column(s) {', '.join(dup)}")
    return _Table(str(path), header, rows, lines)


def _require(t: _Table, cols, what: str) -> None:
    missing = [c for c in cols if c not in t.header]
    if missing:
        raise CPSLError(f"{what} file {t.path} is missing column(s) {', '.join(missing)} "
                        f"(has: {_short(t.header)})")


def _short(names, n=8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _feature_cols(t: _Table, prefix: str, what: str) -> list[str]:
    """The columns ``{prefix}0 .. {prefix}{k-1}`` in index order; all of them must be there."""
    pat = re.compile(rf"{re.escape(prefix)}(\d+)")
    idx = sorted(int(m.group(1)) for h in t.header if (m := pat.fullmatch(h)))
    if not idx:
        raise CPSLError(f"{what} file {t.path} is missing column(s) {prefix}0, {prefix}1, ... "
                        f"(has: {_short(t.header)})")
    missing = [f"{prefix}{i}" for i in range(idx[-1] + 1) if i not in set(idx)]
    if missing:
        raise CPSLError(f"{what} file {t.path} is missing column(s) {_short(missing)} "
                        f"(has {prefix}0..{prefix}{idx[-1]} otherwise)")
    return [f"{prefix}{i}" for i in range(idx[-1] + 1)]


def _floats(t: _Table, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(N, len(cols))`` float32 and ``(N,)`` per-row counts of empty/NaN/inf cells (set to 0)."""
    js = [t.header.index(c) for c in cols]
    out = np.empty((len(t.rows), len(cols)), dtype=np.float64)
    for i, row in enumerate(t.rows):
        for k, j in enumerate(js):
            cell = row[j].strip()
            if not cell:
                out[i, k] = np.nan
                continue
            try:
                out[i, k] = float(cell)
            except ValueError:
                raise CPSLError(f"{t.path}: line {t.lines[i]}, column {cols[k]}: "
                                f"{cell[:30]!r} is not a number") from None
    with np.errstate(over="ignore"):
        arr = out.astype(np.float32)                          # values beyond float32 become inf
    bad = ~np.isfinite(arr)
    arr[bad] = 0.0
    return np.ascontiguousarray(arr), bad.sum(1).astype(np.int64)


def _norm_clip(c: str) -> str:
    """``'3'``, ``' 3 '`` and ``'3.0'`` are the same clip; other ids (e.g. times) stay as written."""
    c = c.strip()
    if re.fullmatch(r"[+-]?\d+(\.0*)?", c):
        return str(int(float(c)))
    return c


def _keys(t: _Table, what: str) -> list[tuple[str, str]]:
    keys = [(v.strip(), _norm_clip(c)) for v, c in zip(t.col("video_id"), t.col("clip_id"))]
    seen: dict[tuple[str, str], int] = {}
    for i, k in enumerate(keys):
        if not k[0] or not k[1]:
            raise CPSLError(f"{t.path}: line {t.lines[i]} has an empty video_id or clip_id")
        if k in seen:
            raise CPSLError(f"{what} file {t.path}: duplicate (video_id, clip_id) {_mmsa_id(k)} "
                            f"at lines {t.lines[seen[k]]} and {t.lines[i]}")
        seen[k] = i
    return keys


def _mmsa_id(k: tuple[str, str]) -> str:
    return f"{k[0]}$_${k[1]}"


def _labels(t: _Table, keys, what: str) -> np.ndarray:
    vals = np.empty(len(t.rows), dtype=np.float64)
    for i, cell in enumerate(t.col("label")):
        try:
            vals[i] = float(cell)
        except ValueError:
            raise CPSLError(f"{t.path}: line {t.lines[i]}: label {cell.strip()[:30]!r} is not a number") from None
    bad = np.flatnonzero(~np.isfinite(vals) | (vals < -3.0) | (vals > 3.0))
    if bad.size:
        i = int(bad[0])
        raise CPSLError(f"{what} file {t.path}: {bad.size} label(s) outside [-3, 3] or not finite, "
                        f"first at line {t.lines[i]} ({_mmsa_id(keys[i])}: {t.col('label')[i].strip()})")
    return vals.astype(np.float32)


def _unjoined(ids: list[str]) -> dict:
    return {"count": len(ids), "first": ids[:FIRST]}


def _split(name, feats: dict, labels, ids, raw_text, text_bert=None, cleaned=0, lengths=None) -> Split:
    n = len(labels)
    lens = {m: (lengths[m] if lengths and m in lengths else np.ones(n, dtype=np.int64)) for m in feats}
    return Split(name=name, features=feats, lengths=lens,
                 labels=np.asarray(labels, dtype=np.float32).reshape(n),
                 ids=np.asarray(list(ids), dtype=str).reshape(n),
                 raw_text=np.asarray(list(raw_text), dtype=str).reshape(n),
                 text_bert=text_bert, cleaned=int(cleaned))


def _video_overlap(splits: dict[str, Split]) -> dict:
    vids = {name: {i.split("$_$")[0] for i in s.ids} for name, s in splits.items()}
    out = {}
    names = list(vids)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            both = sorted(vids[names[a]] & vids[names[b]])
            if both:
                out[f"{names[a]}&{names[b]}"] = _unjoined(both)
    return out


# ----------------------------------------------------------------------------- MOSI
LABEL_COLS = ("video_id", "clip_id", "text", "label", "mode")


def join_mosi(labels_csv, audio_csv, strict: bool = False) -> tuple[dict, dict]:
    """Read, check and join the two MOSI tables; no encoder needed.

    Returns ``(rows, report)``: ``rows`` holds the joined rows in labels-file order (``keys``,
    ``ids``, ``text``, ``labels``, ``mode``, ``audio`` (N, d_a) float32); ``report`` the join
    counts. Unjoined rows are dropped and reported (a warning), or an error with ``strict``.
    """
    lab = _read_csv(labels_csv, "labels")
    _require(lab, LABEL_COLS, "labels")
    aud = _read_csv(audio_csv, "audio")
    _require(aud, KEY, "audio")
    acols = _feature_cols(aud, "a", "audio")
    if not lab.rows:
        raise CPSLError(f"labels file {labels_csv} has no data rows")
    if not aud.rows:
        raise CPSLError(f"audio file {audio_csv} has no data rows")

    lkeys = _keys(lab, "labels")
    akeys = _keys(aud, "audio")
    labels = _labels(lab, lkeys, "labels")
    modes = _modes(lab, labels_csv)
    audio, audio_bad = _floats(aud, acols)                        # (N_a, d_a), (N_a,)

    apos = {k: i for i, k in enumerate(akeys)}
    lset = set(lkeys)
    keep = [i for i, k in enumerate(lkeys) if k in apos]
    no_audio = [_mmsa_id(k) for k in lkeys if k not in apos]
    no_label = [_mmsa_id(k) for k in akeys if k not in lset]
    join = {"label_rows": len(lkeys), "audio_rows": len(akeys), "joined": len(keep),
            "labels_without_audio": _unjoined(no_audio), "audio_without_labels": _unjoined(no_label)}
    if not keep:
        raise CPSLError(f"no row of {labels_csv} matches a row of {audio_csv} on (video_id, clip_id) "
                        f"(first label id {_mmsa_id(lkeys[0])}, first audio id {_mmsa_id(akeys[0])})")
    if no_audio or no_label:
        msg = (f"{len(no_audio)} label row(s) without audio (first: {', '.join(no_audio[:FIRST]) or '-'}); "
               f"{len(no_label)} audio row(s) without labels (first: {', '.join(no_label[:FIRST]) or '-'})")
        if strict:
            raise CPSLError(f"--strict: {msg}")
        warnings.warn(f"dropped unjoined rows: {msg}", stacklevel=2)
    texts = lab.col("text")
    rows = {
        "keys": [lkeys[i] for i in keep],
        "ids": [_mmsa_id(lkeys[i]) for i in keep],
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


def _modes(t: _Table, path) -> list[str]:
    modes = [m.strip().lower() for m in t.col("mode")]
    unknown = sorted(set(modes) - set(SPLITS))
    if unknown:
        raise CPSLError(f"labels file {path}: unknown mode value(s) {', '.join(map(repr, unknown))} "
                        f"(expected {', '.join(SPLITS)})")
    return modes


def encode_texts(texts, text_encoder: str = "minilm", max_len: int = 50, batch_size: int = 64,
                 progress: bool = True) -> dict:
    """Lower-cased ``texts`` through the frozen encoder: ``text_bert`` (N, 3, L), ``states`` (N, L, d),
    ``lengths`` (N,) ([CLS] .. [SEP]), ``ntok`` (N,) untruncated token counts, and the encoder's
    ``path`` / ``hidden`` size. Shared by every builder that encodes transcripts."""
    from ..text_encoder import encode_tokens, load_encoder, load_tokenizer, resolve_encoder_path, token_counts, tokenize

    max_len = int(max_len)
    if max_len < 2:
        raise CPSLError(f"--max-len must be at least 2, got {max_len}")
    enc_path = resolve_encoder_path(text_encoder)
    tok = load_tokenizer(text_encoder)
    model, hidden = load_encoder(text_encoder)
    texts = [t.lower() for t in texts]                              # MOSI transcripts are upper case
    text_bert = tokenize(tok, texts, max_len)                       # (N, 3, L)
    states = encode_tokens(model, text_bert, batch_size=batch_size, progress=progress)  # (N, L, d)
    return {"text_bert": text_bert, "states": states, "lengths": text_bert[:, 1].sum(1).astype(np.int64),
            "ntok": token_counts(tok, texts), "path": enc_path, "hidden": hidden}


def _encoder_report(text_encoder, enc: dict, max_len: int) -> dict:
    return {"spec": str(text_encoder), "path": str(enc["path"]), "hidden_size": enc["hidden"],
            "max_len": int(max_len), "lowercased": True, "frozen": True, "layer": "last"}


def _shapes(splits: dict) -> dict:
    return {n: {m: list(s.features[m].shape) for m in s.features} | {"text_bert": list(s.text_bert.shape)}
            for n, s in splits.items()}


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
        splits[name] = _split(
            name, {"text": np.ascontiguousarray(states[idx]), "audio": np.ascontiguousarray(audio[idx])},
            labels[idx], [rows["ids"][i] for i in idx], [rows["text"][i] for i in idx],
            text_bert=np.ascontiguousarray(text_bert[idx]),
            lengths={"text": tlen[idx], "audio": np.ones(len(idx), dtype=np.int64)},
            cleaned=int(rows["audio_bad"][idx].sum()))
    report = {
        "builder": "mosi",
        "inputs": {"labels": str(labels_csv), "labels_sha256": sha256_file(labels_csv),
                   "audio": str(audio_csv), "audio_sha256": sha256_file(audio_csv)},
        "text_encoder": _encoder_report(text_encoder, enc, max_len),
        "splits": {n: len(s) for n, s in splits.items()},
        "videos": {n: len({i.split("$_$")[0] for i in s.ids}) for n, s in splits.items()},
        "dims": {"text": enc["hidden"], "audio": int(audio.shape[2])},
        "shapes": _shapes(splits),
        **jrep,
        "texts_truncated": int((enc["ntok"] > int(max_len)).sum()),
        "texts_empty": int(sum(1 for t in rows["text"] if not t.strip())),
        "videos_in_several_splits": _video_overlap(splits),
    }
    data = MMSAData(splits, ("text", "audio"), path="", meta=report)
    return data, report


# ----------------------------------------------------------------------------- MOSEI (text only)
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
    lab = _read_csv(labels_csv, "labels")
    _require(lab, MOSEI_COLS, "labels")
    if not lab.rows:
        raise CPSLError(f"labels file {labels_csv} has no data rows")
    keys = _keys(lab, "labels")
    labels = _labels(lab, keys, "labels")
    modes = np.asarray(_modes(lab, labels_csv))
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
        splits[name] = _split(name, {"text": np.ascontiguousarray(enc["states"][j])}, labels[idx],
                              [_mmsa_id(keys[i]) for i in idx], [texts[i] for i in idx],
                              text_bert=np.ascontiguousarray(enc["text_bert"][j]),
                              lengths={"text": enc["lengths"][j]})
    report = {
        "builder": "mosei",
        "inputs": {"labels": str(labels_csv), "labels_sha256": sha256_file(labels_csv)},
        "text_encoder": _encoder_report(text_encoder, enc, max_len),
        "rows": len(keys), "limit": int(limit),
        "splits": {n: len(s) for n, s in splits.items()},
        "videos": {n: len({i.split("$_$")[0] for i in s.ids}) for n, s in splits.items()},
        "dims": {"text": enc["hidden"]},
        "shapes": _shapes(splits),
        "texts_truncated": int((enc["ntok"] > int(max_len)).sum()),
        "texts_empty": int(sum(1 for i in keep if not texts[i].strip())),
        "videos_in_several_splits": _video_overlap(splits),
    }
    return MMSAData(splits, ("text",), path="", meta=report), report


# ----------------------------------------------------------------------------- bc-LSTM
BCLSTM_GROUPS = (("text", "t"), ("audio", "a"), ("vision", "v"))


def _read_bclstm(path, what: str, dims: dict | None = None) -> dict:
    t = _read_csv(path, what)
    _require(t, ("video_id", "clip_id", "label"), what)
    cols = {m: _feature_cols(t, p, what) for m, p in BCLSTM_GROUPS}
    if dims is not None:
        for m, c in cols.items():
            if len(c) != dims[m]:
                raise CPSLError(f"{what} file {path}: {m} has {len(c)} feature columns, the train file has {dims[m]}")
    if not t.rows:
        raise CPSLError(f"{what} file {path} has no data rows")
    keys = _keys(t, what)
    labels = _labels(t, keys, what)
    feats, bad = {}, np.zeros(len(t.rows), dtype=np.int64)
    for m, c in cols.items():
        arr, b = _floats(t, c)
        feats[m] = arr[:, None, :]                                    # (N, 1, d)
        bad += b
    text = t.col("text") if "text" in t.header else [""] * len(t.rows)   # no transcripts in bc-LSTM's CSV
    return {"keys": keys, "ids": [_mmsa_id(k) for k in keys], "labels": labels, "feats": feats,
            "bad": bad, "text": text, "has_text": "text" in t.header, "dims": {m: len(c) for m, c in cols.items()}}


def _take(d: dict, idx: np.ndarray, name: str) -> Split:
    return _split(name, {m: np.ascontiguousarray(a[idx]) for m, a in d["feats"].items()},
                  d["labels"][idx], [d["ids"][i] for i in idx], [d["text"][i] for i in idx],
                  cleaned=int(d["bad"][idx].sum()))


def _empty(d: dict, name: str) -> Split:
    return _take(d, np.zeros(0, dtype=np.int64), name)


def valid_videos(videos, valid_frac: float, seed: int) -> list[str]:
    """The video ids held out for validation: ``round(valid_frac * #videos)`` of them (at least 1
    when ``valid_frac > 0``, never all), drawn with ``seed`` from the sorted unique ids."""
    vids = sorted(set(videos))
    if valid_frac <= 0:
        return []
    if len(vids) < 2:
        raise CPSLError(f"a validation split by video needs at least 2 videos, the train file has {len(vids)}")
    k = min(max(1, int(round(valid_frac * len(vids)))), len(vids) - 1)
    order = np.random.default_rng(int(seed)).permutation(len(vids))
    return sorted(vids[i] for i in order[:k])


def build_bclstm(train_csv, test_csv=None, valid_frac: float = 0.15, seed: int = 0) -> tuple[MMSAData, dict]:
    """MMSA data (text, audio, vision; utterance level) from bc-LSTM's feature CSV(s).

    Validation = a seeded ``valid_frac`` of the train file's *videos* (every segment of a video
    lands in one split). Test = ``test_csv`` when given, else an empty split.
    """
    valid_frac = float(valid_frac)
    if not (0.0 < valid_frac < 1.0):
        raise CPSLError(f"--valid-frac must be in (0, 1) (training needs a valid split), got {valid_frac}")
    tr = _read_bclstm(train_csv, "train")
    te = _read_bclstm(test_csv, "test", dims=tr["dims"]) if test_csv is not None else None

    videos = [k[0] for k in tr["keys"]]
    held = set(valid_videos(videos, valid_frac, seed))
    is_valid = np.asarray([v in held for v in videos], dtype=bool)
    splits = {
        "train": _take(tr, np.flatnonzero(~is_valid), "train"),
        "valid": _take(tr, np.flatnonzero(is_valid), "valid"),
        "test": _take(te, np.arange(len(te["labels"])), "test") if te is not None else _empty(tr, "test"),
    }
    require_splits({n: len(sp) for n, sp in splits.items()}, f"{train_csv} with --valid-frac {valid_frac}")
    overlap = _video_overlap(splits)
    if "train&test" in overlap or "valid&test" in overlap:
        n = sum(overlap[k]["count"] for k in overlap if k.endswith("&test"))
        warnings.warn(f"{n} test video(s) also appear in the train file", stacklevel=2)
    inputs = {"train": str(train_csv), "train_sha256": sha256_file(train_csv)}
    if test_csv is not None:
        inputs |= {"test": str(test_csv), "test_sha256": sha256_file(test_csv)}
    report = {
        "builder": "bclstm",
        "inputs": inputs,
        "valid_frac": valid_frac, "seed": int(seed),
        "valid_videos": sorted(held),
        "valid_segment_frac": float(is_valid.mean()),
        "splits": {n: len(s) for n, s in splits.items()},
        "videos": {n: len({i.split("$_$")[0] for i in s.ids}) for n, s in splits.items()},
        "dims": dict(tr["dims"]),
        "shapes": {n: {m: list(s.features[m].shape) for m in s.features} for n, s in splits.items()},
        "nonfinite_replaced": int(sum(s.cleaned for s in splits.values())),
        "raw_text": "from the 'text' column" if tr["has_text"] else "empty strings (no transcripts in the CSV)",
        "videos_in_several_splits": overlap,
        "note": "bc-LSTM text/vision features were trained with labels on bc-LSTM's own split: "
                "use them only with that split, never with the standard MOSI folds",
    }
    return MMSAData(splits, ("text", "audio", "vision"), path="", meta=report), report
