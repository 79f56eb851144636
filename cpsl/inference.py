"""Predictions from raw input: text (plus the other modalities' features where the model reads them)
for a checkpoint (PyTorch) or an exported artefact (ONNX Runtime / TensorRT through the torch-free
runner in :mod:`cpsl.edge`). ``cpsl predict`` and :meth:`cpsl.Model.predict` are thin wrappers.

Raw text needs a model that tokenizes: a checkpoint trained with ``model.text_encoder`` (the
encoder runs inside the model) or an end-to-end export of one (graph ``tokens``). A checkpoint
that reads precomputed text features cannot score raw text: the features' extractor is not part
of it. Other modalities (audio, vision) are features, one ``(L, d)`` array per item (the CSV
layout of :mod:`cpsl.edge.frontend`: columns ``a0..aN`` / ``v0..vN``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import CPSLError

DEFAULT_MAX_LEN = 128


def _check_features(modalities, dims: dict, features: dict | None, n: int) -> dict[str, list[np.ndarray]]:
    """``{m: [ (L, d) ] * n}`` for every non-text modality; one array is shared by every text."""
    features = dict(features or {})
    out = {}
    for m in modalities:
        if m == "text":
            continue
        if m not in features:
            raise CPSLError(f"the model also reads {m} ({dims[m]} features per step): pass them "
                            f"(cpsl predict --{m}-features FILE.csv)")
        x = features.pop(m)
        items = list(x) if isinstance(x, (list, tuple)) else [x] * n
        if len(items) != n:
            raise CPSLError(f"{m}: {len(items)} feature arrays for {n} texts")
        arrs = []
        for a in items:
            a = np.asarray(a, dtype=np.float32)
            a = a[None] if a.ndim == 1 else a
            if a.ndim != 2 or a.shape[1] != int(dims[m]) or not np.all(np.isfinite(a)):
                raise CPSLError(f"{m} features must be finite (L, {dims[m]}) arrays, got shape {a.shape}")
            arrs.append(a)
        out[m] = arrs
    if features:
        raise CPSLError(f"the model does not read {', '.join(sorted(features))} (it reads {', '.join(modalities)})")
    return out


def _pad(arrs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    L = max(len(a) for a in arrs)
    x = np.zeros((len(arrs), L, arrs[0].shape[1]), np.float32)
    mask = np.zeros((len(arrs), L), bool)
    for i, a in enumerate(arrs):
        x[i, :len(a)], mask[i, :len(a)] = a, True
    return x, mask                                                     # (B, L, d), (B, L)


def predict_checkpoint(model, cfg, texts: list[str], features: dict | None = None,
                       max_len: int = DEFAULT_MAX_LEN, batch_size: int = 32) -> np.ndarray:
    """Fused sentiment ``(N,)`` of ``texts`` with a loaded checkpoint (``cpsl.checkpoint.load_model``)."""
    import torch

    from .text_encoder import load_tokenizer, tokenize
    if model.text_backbone is None:
        raise CPSLError("this checkpoint reads precomputed text features, so it cannot score raw text: train with "
                        "--set model.text_encoder=minilm (the encoder then runs inside the model), or use "
                        "cpsl eval on features")
    texts = [str(t) for t in texts]
    if not texts:
        raise CPSLError("no text to score")
    feats = _check_features(model.modalities, model.dims, features, len(texts))
    tok = load_tokenizer(cfg.model.text_encoder)
    device = next(model.parameters()).device
    model.eval()
    preds = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            chunk = [t.lower() for t in texts[s:s + batch_size]]      # as the data builders encode
            tb = tokenize(tok, chunk, max_len)                          # (B, 3, max_len)
            width = max(2, int(tb[:, 1].sum(1).max()))
            tb = torch.from_numpy(np.ascontiguousarray(tb[:, :, :width])).to(device)
            x, mask = {}, {}
            for m, arrs in feats.items():
                xm, mm = _pad(arrs[s:s + batch_size])
                x[m], mask[m] = torch.from_numpy(xm).to(device), torch.from_numpy(mm).to(device)
            preds.append(model.predict(x, mask, tb).float().cpu().numpy().reshape(-1))
    return np.concatenate(preds)


def predict_artifact(path: str | Path, texts: list[str], features: dict | None = None, threads: int = 0,
                     provider: str = "cpu", batch_size: int = 32) -> tuple[np.ndarray, dict]:
    """``(sentiment (N,), backend info)`` of ``texts`` with an end-to-end export (``model.onnx`` /
    ``model.plan`` with its manifest and tokenizer beside it), torch-free."""
    from .edge import frontend as fe
    from .edge.runner import UsageError, open_backend, run_checked
    path = Path(path)
    texts = [str(t) for t in texts]
    if not texts:
        raise CPSLError("no text to score")
    try:
        if not path.is_file():
            raise UsageError(f"model file not found: {path}")
        man = fe.load_manifest(path)
        tok = fe.load_tokenizer(path, man)
        feats = _check_features(man["modalities"], man["dims"], features, len(texts))
        backend = open_backend(str(path), threads, provider)
        preds = []
        for s in range(0, len(texts), batch_size):
            padded = {m: _pad(arrs[s:s + batch_size])[0] for m, arrs in feats.items()}
            feeds = fe.feeds_for(tok, texts[s:s + batch_size], padded)
            for m, arrs in feats.items():                                # real masks (feeds_for sets all-ones)
                feeds[f"{m}_mask"] = _pad(arrs[s:s + batch_size])[1].astype(np.float32)
            preds.append(np.asarray(run_checked(backend, feeds, f"texts {s}..{s + len(feeds['input_ids']) - 1}"),
                                    np.float32).reshape(-1))
    except (UsageError, fe.InputError) as e:
        raise CPSLError(str(e)) from None
    return np.concatenate(preds), {"backend": backend.name, "device": backend.device}


def read_features(path, modality: str, dims: int) -> np.ndarray:
    """One item's ``(L, d)`` features from a CSV with columns ``a0..`` (audio) / ``v0..`` (vision)."""
    from .edge import frontend as fe
    try:
        return fe.sequence_features(path, modality, int(dims))
    except fe.InputError as e:
        raise CPSLError(str(e)) from None
