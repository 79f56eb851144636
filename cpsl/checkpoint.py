"""Checkpoints that load without executing code.

A checkpoint is a ``torch.save`` of plain data: tensors, str/int/float/bool/None, and
dicts/lists/tuples of them (the config as a dict, the RNG states as tensors and ints). It is
read with ``torch.load(weights_only=True)``, whose unpickler refuses every other global, so a
file with a payload (an object that ``__reduce__``s to ``os.system``) is refused with one line
before anything runs. Checkpoints of cpsl before this format (``cpsl-ckpt-1``: NumPy RNG state
as a NumPy array) load through the same safe path with only NumPy's array reconstructors
admitted (the same list as the MMSA reader). Models whose weights are not all finite are
refused by :func:`load_model` (evaluating or exporting them gives meaningless numbers).
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .errors import CPSLError
from .model import CPSLModel
from .model import build as build_model

CKPT_FORMAT = "cpsl-ckpt-2"
READABLE_FORMATS = ("cpsl-ckpt-1", CKPT_FORMAT)


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
    torch.set_rng_state(st["torch"])
    npst = st["numpy"]
    if isinstance(npst, dict):
        keys = npst["keys"].numpy() if torch.is_tensor(npst["keys"]) else np.asarray(npst["keys"])
        np.random.set_state((npst["kind"], keys.astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"]))
    else:                                       # cpsl-ckpt-1: the tuple of np.random.get_state()
        np.random.set_state(npst)
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


def _numpy_globals() -> list:
    """NumPy's array reconstructors (plain data, no code): what cpsl-ckpt-1 files hold besides tensors."""
    import importlib
    import warnings

    from .data.safe_pickle import ALLOWED_GLOBALS
    out = []
    for mod, name in sorted(ALLOWED_GLOBALS):
        real = mod.replace("numpy.core", "numpy._core") if mod.startswith("numpy.core") else mod
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                obj = getattr(importlib.import_module(real), name)
        except (ImportError, AttributeError):
            continue
        out.append((obj, f"{mod}.{name}"))          # matched by the name the file uses
    out += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return out


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, read without executing code; :class:`CPSLError` (one line) otherwise."""
    p = Path(path)
    if not p.is_file():
        raise CPSLError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            ck = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "global" in ln), "")
        raise CPSLError(f"{path} holds objects other than tensors and plain data ({what[:120] or 'refused'}); "
                        "refusing to load it (it could run code)") from None
    except Exception as e:  # noqa: BLE001 - corrupt or foreign file
        raise CPSLError(f"{path} is not a readable cpsl checkpoint ({type(e).__name__})") from None
    fmt = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
    if not isinstance(fmt, str) or fmt not in READABLE_FORMATS:
        raise CPSLError(f"{path} is not a cpsl checkpoint (format {str(fmt)[:40]})")
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
