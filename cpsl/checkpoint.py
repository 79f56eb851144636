"""Checkpoints that load without executing code.

A checkpoint is a ``torch.save`` of plain data: tensors, str/int/float/bool/None, and
dicts/lists/tuples of them (the config as a dict, the RNG states as tensors and ints). It is
read with ``torch.load(weights_only=True)``, whose unpickler refuses every other global, so a
file with a payload (an object that ``__reduce__``s to ``os.system``) is refused with one line
before anything runs. Before torch reads it, the pickle inside is scanned like an MMSA file
(nesting depth, item count; :mod:`.data.safe_pickle`), and NumPy names resolve only to that
module's validating stand-ins. A ``cpsl-ckpt-2`` checkpoint holds no NumPy object at all (one that
does is refused); ``cpsl-ckpt-1`` files of earlier versions hold the NumPy RNG state (a checked
uint32 array) and possibly NumPy scalars, all checked by the stand-ins and converted to plain data
on reading. Models whose weights are not all finite are
refused by :func:`load_model` (evaluating or exporting them gives meaningless numbers).
"""
from __future__ import annotations

import io
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .data.mmsa import MMSAData
from .data.safe_pickle import check_tree, scan, torch_safe_globals
from .errors import CPSLError
from .model import CPSLModel
from .model import build as build_model

CKPT_FORMAT = "cpsl-ckpt-2"
READABLE_FORMATS = ("cpsl-ckpt-1", CKPT_FORMAT)
MAX_PICKLE_BYTES = 256 << 20     # a checkpoint's pickle (config, names, RNG state); the weights are beside it


# ---------------------------------------------------------------------------- RNG state as plain data
def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "gauss": float(gauss)},
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore :func:`rng_state`; :class:`CPSLError` when the state is not one it wrote."""
    try:
        _set_rng_state(st)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, IndexError, AttributeError) as e:
        raise CPSLError(f"the checkpoint's RNG state is invalid ({type(e).__name__}: {str(e)[:80]})") from None


def _set_rng_state(st: dict) -> None:
    if not torch.is_tensor(st["torch"]) or st["torch"].dtype != torch.uint8:
        raise TypeError("the torch RNG state is not a uint8 tensor")
    torch.set_rng_state(st["torch"])
    npst = st["numpy"]
    if isinstance(npst, dict):
        keys = npst["keys"].numpy() if torch.is_tensor(npst["keys"]) else np.asarray(npst["keys"])
        np.random.set_state((npst["kind"], keys.astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"]))
    else:
        raise TypeError("the NumPy RNG state is not a dict")
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------- save / read
def save_checkpoint(path: Path, model, optimizer, cfg: Config, epoch: int, extra: dict) -> None:
    """Write ``path`` atomically (``.tmp`` + rename) as plain data."""
    ck = {"format": CKPT_FORMAT, "config": cfg.to_dict(), "modalities": list(model.modalities),
          "dims": {k: int(v) for k, v in model.dims.items()}, "model": model.state_dict(),
          "optimizer": optimizer.state_dict() if optimizer is not None else None,
          "epoch": int(epoch), "rng": rng_state()}
    ck.update(extra)
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(ck, tmp)
    tmp.replace(path)


def _scan_zip(p: Path, path) -> None:
    """Check the checkpoint's pickle (``*/data.pkl`` in torch's zip) before torch reads it: depth, size, well-formed."""
    try:
        with zipfile.ZipFile(p) as z:
            names = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(names) != 1:
                raise CPSLError(f"{path} is not a cpsl checkpoint (no single data.pkl inside)")
            with z.open(names[0]) as f:
                blob = f.read(MAX_PICKLE_BYTES + 1)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
        raise CPSLError(f"{path} is not a readable cpsl checkpoint ({type(e).__name__})") from None
    if len(blob) > MAX_PICKLE_BYTES:
        raise CPSLError(f"{path}: its pickle is over {MAX_PICKLE_BYTES >> 20} MiB (a cpsl checkpoint keeps its "
                        "weights outside it); refusing to load it")
    scan(io.BytesIO(blob), str(path))


def _numpy_at(obj, where: str = "") -> str | None:
    """The key path of the first NumPy object in ``obj`` (None when there is none)."""
    todo = [(obj, where)]
    while todo:
        o, w = todo.pop()
        if isinstance(o, (np.ndarray, np.generic)):
            return w or "(top)"
        if isinstance(o, dict):
            todo += [(v, f"{w}/{k}") for k, v in o.items()]
        elif isinstance(o, (list, tuple)):
            todo += [(v, f"{w}[{i}]") for i, v in enumerate(o)]
    return None


def _to_plain(o):
    """NumPy scalars and arrays (already checked by the loader's stand-ins) as Python numbers and lists."""
    if isinstance(o, (np.ndarray, np.generic)):
        return o.tolist()
    if isinstance(o, dict):
        return type(o)((k, _to_plain(v)) for k, v in o.items())
    if isinstance(o, (list, tuple)):
        return type(o)(_to_plain(v) for v in o)
    return o


def _upgrade_rng(ck: dict, path) -> None:
    """cpsl-ckpt-1 kept ``np.random.get_state()`` (a NumPy array) in ``rng/numpy``: made plain data here. Its
    other NumPy values (scalars in the history) become Python numbers; a newer checkpoint holds none."""
    st = ck.get("rng")
    npst = st.get("numpy") if isinstance(st, dict) else None
    if isinstance(npst, tuple) and len(npst) == 5 and isinstance(npst[1], np.ndarray):
        keys = np.asarray(npst[1])
        if keys.shape != (624,) or keys.dtype.kind not in "iu":
            raise CPSLError(f"{path}: the checkpoint's NumPy RNG state is not 624 integers")
        st["numpy"] = {"kind": str(npst[0]), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": npst[2],
                       "has_gauss": npst[3], "gauss": npst[4]}
    if ck.get("format") == "cpsl-ckpt-1":          # numbers in its history etc. may be NumPy scalars: made plain
        for k in list(ck):
            ck[k] = _to_plain(ck[k])
    where = _numpy_at(ck)
    if where is not None:
        raise CPSLError(f"{path} holds a NumPy object at {where}; a cpsl checkpoint holds tensors and plain data "
                        "only; refusing to load it")


def load_plain(path: str | Path, what: str = "cpsl checkpoint"):
    """``torch.load`` of a file cpsl wrote, after :func:`_scan_zip`, admitting tensors and plain data only."""
    p = Path(path)
    if not p.is_file():
        raise CPSLError(f"{what} not found: {path}" if not p.exists() else f"{what} {path} is not a file")
    _scan_zip(p, path)
    try:
        with torch.serialization.safe_globals(torch_safe_globals()):
            ck = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).split("WeightsUnpickler error:", 1)[-1]
        what = next((ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln or "global" in ln), msg.strip())
        raise CPSLError(f"{path} holds objects other than tensors and plain data ({what.splitlines()[0][:160] if what else 'refused'}); "
                        "refusing to load it (it could run code)") from None
    except Exception as e:  # noqa: BLE001 - corrupt or foreign file
        raise CPSLError(f"{path} is not a readable {what} ({type(e).__name__})") from None
    check_tree(ck, str(path), (torch.Tensor, torch.Size, torch.device, torch.dtype))
    return ck


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, read without executing code; :class:`CPSLError` (one line) otherwise."""
    ck = load_plain(path)
    fmt = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
    if not isinstance(fmt, str) or fmt not in READABLE_FORMATS:
        raise CPSLError(f"{path} is not a cpsl checkpoint (format {str(fmt)[:40]})")
    _upgrade_rng(ck, path)
    for key, kind in (("config", dict), ("dims", dict), ("model", dict)):
        if not isinstance(ck.get(key), kind):
            raise CPSLError(f"{path}: checkpoint has no {key!r} entry (or it is not a {kind.__name__})")
    for key, kind in (("data_path", str), ("epoch", int), ("modalities", list)):
        if ck.get(key) is not None and not isinstance(ck[key], kind):
            raise CPSLError(f"{path}: checkpoint entry {key!r} is not a {kind.__name__}")
    try:
        Config.from_dict(ck["config"])
    except CPSLError as e:
        raise CPSLError(f"{path}: the checkpoint's config is invalid ({e})") from None
    return ck


def nonfinite_weights(state: dict) -> dict[str, int]:
    """``{name: count}`` of the floating tensors in a state dict holding NaN/inf."""
    out = {}
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point():
            n = int((~torch.isfinite(v)).sum())
            if n:
                out[k] = n
    return out


def load_model(path: str | Path, device="cpu") -> tuple[CPSLModel, Config, dict]:
    """(model, config, checkpoint dict); refuses weights that are not all finite."""
    ck = read_checkpoint(path)
    cfg = Config.from_dict(ck["config"])
    dims = dict(ck["dims"])
    if not all(isinstance(v, int) and v >= 1 for v in dims.values()) or not dims:
        raise CPSLError(f"{path}: the checkpoint's dims {dims} are not feature sizes of >= 1 modality")
    if cfg.model.text_encoder and "text" in dims:
        dims["text"] = 1  # replaced by the backbone's hidden size inside the model
    bad = nonfinite_weights(ck["model"])
    if bad:
        first = next(iter(bad))
        raise CPSLError(f"{path}: {sum(bad.values())} weights are NaN/inf (in {len(bad)} tensors, first {first}); "
                        "this model cannot be evaluated or exported")
    try:
        model = build_model(dims, cfg.model)
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CPSLError(f"{path}: checkpoint weights do not fit its config ({str(e).splitlines()[0]})") from None
    return model.to(device), cfg, ck


# ---------------------------------------------------------------------------- compatibility with data
def check_compatible(model: CPSLModel, data: MMSAData, ckpt_path: str = "checkpoint", subset_ok: bool = False) -> None:
    """The data holds what the model reads. ``subset_ok``: the data may hold more modalities than the model
    (a text-only student scored or exported on the fused model's data: its batches take the model's only)."""
    extra_ok = subset_ok and set(model.modalities) <= set(data.modalities)
    if tuple(model.modalities) != tuple(data.modalities) and not extra_ok:
        raise CPSLError(f"{ckpt_path} was trained on modalities {list(model.modalities)} "
                        f"but the data has {list(data.modalities)}")
    for m in model.modalities:
        if m == "text" and model.text_backbone is not None:
            if next(iter(data.splits.values())).text_bert is None:
                raise CPSLError(f"{ckpt_path} runs a text encoder on token ids but the data has no text_bert")
            continue
        if model.dims[m] != data.dims[m]:
            raise CPSLError(f"{ckpt_path} expects {m} features of size {model.dims[m]} but the data has {data.dims[m]}")
    check_lengths(model.cfg, data, model.modalities, ckpt_path)


def check_lengths(mcfg, data: MMSAData, modalities, what: str = "the model") -> None:
    """Sequences longer than the positional table (``model.max_len``) cannot be encoded."""
    if not mcfg.ame:
        return
    for m in modalities:
        if m == "text" and mcfg.text_encoder:
            continue
        L = max((s.features[m].shape[1] for s in data.splits.values()), default=0)
        if L > mcfg.max_len:
            raise CPSLError(f"{what}: {m} sequences of the data are {L} steps long but model.max_len is "
                            f"{mcfg.max_len}; raise model.max_len")
