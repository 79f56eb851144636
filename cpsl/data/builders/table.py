"""The CSV table layer of the builders: reading a CSV file with one-line errors, the (video_id, clip_id)
keys, labels in [-3, 3], the ``mode`` split column, float feature columns (non-finite cells set to 0
and counted), and the MMSA :class:`~cpsl.data.mmsa.Split` assembled from kept rows. Rows stay in
file order. Every error is a :class:`~cpsl.errors.CPSLError` with one line."""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import CPSLError
from ..mmsa import SPLITS, Split

FIRST = 5                     # how many unjoined ids a report names
KEY = ("video_id", "clip_id")


# ----------------------------------------------------------------------------- CSV reading
@dataclass
class Table:
    path: str
    header: list[str]
    rows: list[list[str]]
    lines: list[int]                          # 1-based file line of each row (header is line 1)

    def col(self, name: str) -> list[str]:
        j = self.header.index(name)
        return [r[j] for r in self.rows]


def read_csv(path, what: str) -> Table:
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
    return Table(str(path), header, rows, lines)


def require_columns(t: Table, cols, what: str) -> None:
    missing = [c for c in cols if c not in t.header]
    if missing:
        raise CPSLError(f"{what} file {t.path} is missing column(s) {', '.join(missing)} "
                        f"(has: {short_list(t.header)})")


def short_list(names, n=8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def feature_cols(t: Table, prefix: str, what: str) -> list[str]:
    """The columns ``{prefix}0 .. {prefix}{k-1}`` in index order; all of them must be there."""
    pat = re.compile(rf"{re.escape(prefix)}(\d+)")
    idx = sorted(int(m.group(1)) for h in t.header if (m := pat.fullmatch(h)))
    if not idx:
        raise CPSLError(f"{what} file {t.path} is missing column(s) {prefix}0, {prefix}1, ... "
                        f"(has: {short_list(t.header)})")
    missing = [f"{prefix}{i}" for i in range(idx[-1] + 1) if i not in set(idx)]
    if missing:
        raise CPSLError(f"{what} file {t.path} is missing column(s) {short_list(missing)} "
                        f"(has {prefix}0..{prefix}{idx[-1]} otherwise)")
    return [f"{prefix}{i}" for i in range(idx[-1] + 1)]


def read_floats(t: Table, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
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


def norm_clip(c: str) -> str:
    """``'3'``, ``' 3 '`` and ``'3.0'`` are the same clip; other ids (e.g. times) stay as written."""
    c = c.strip()
    if re.fullmatch(r"[+-]?\d+(\.0*)?", c):
        return str(int(float(c)))
    return c


def read_keys(t: Table, what: str) -> list[tuple[str, str]]:
    keys = [(v.strip(), norm_clip(c)) for v, c in zip(t.col("video_id"), t.col("clip_id"))]
    seen: dict[tuple[str, str], int] = {}
    for i, k in enumerate(keys):
        if not k[0] or not k[1]:
            raise CPSLError(f"{t.path}: line {t.lines[i]} has an empty video_id or clip_id")
        if k in seen:
            raise CPSLError(f"{what} file {t.path}: duplicate (video_id, clip_id) {mmsa_id(k)} "
                            f"at lines {t.lines[seen[k]]} and {t.lines[i]}")
        seen[k] = i
    return keys


def mmsa_id(k: tuple[str, str]) -> str:
    return f"{k[0]}$_${k[1]}"


def read_labels(t: Table, keys, what: str) -> np.ndarray:
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
                        f"first at line {t.lines[i]} ({mmsa_id(keys[i])}: {t.col('label')[i].strip()})")
    return vals.astype(np.float32)


# ----------------------------------------------------------------------------- kept rows -> MMSA splits
def unjoined(ids: list[str]) -> dict:
    return {"count": len(ids), "first": ids[:FIRST]}


def make_split(name, feats: dict, labels, ids, raw_text, text_bert=None, cleaned=0, lengths=None) -> Split:
    n = len(labels)
    lens = {m: (lengths[m] if lengths and m in lengths else np.ones(n, dtype=np.int64)) for m in feats}
    return Split(name=name, features=feats, lengths=lens,
                 labels=np.asarray(labels, dtype=np.float32).reshape(n),
                 ids=np.asarray(list(ids), dtype=str).reshape(n),
                 raw_text=np.asarray(list(raw_text), dtype=str).reshape(n),
                 text_bert=text_bert, cleaned=int(cleaned))


def video_overlap(splits: dict[str, Split]) -> dict:
    vids = {name: {i.split("$_$")[0] for i in s.ids} for name, s in splits.items()}
    out = {}
    names = list(vids)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            both = sorted(vids[names[a]] & vids[names[b]])
            if both:
                out[f"{names[a]}&{names[b]}"] = unjoined(both)
    return out


# ----------------------------------------------------------------------------- the split column
def read_modes(t: Table, path) -> list[str]:
    modes = [m.strip().lower() for m in t.col("mode")]
    unknown = sorted(set(modes) - set(SPLITS))
    if unknown:
        raise CPSLError(f"labels file {path}: unknown mode value(s) {', '.join(map(repr, unknown))} "
                        f"(expected {', '.join(SPLITS)})")
    return modes
