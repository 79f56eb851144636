"""Transcripts as frozen-encoder token states: the text encoding shared by the builders that encode
transcripts (MOSI, MOSEI), and the report entries that describe it."""
from __future__ import annotations

import numpy as np

from ...errors import CPSLError


def encode_texts(texts, text_encoder: str = "minilm", max_len: int = 50, batch_size: int = 64,
                 progress: bool = True) -> dict:
    """Lower-cased ``texts`` through the frozen encoder: ``text_bert`` (N, 3, L), ``states`` (N, L, d),
    ``lengths`` (N,) ([CLS] .. [SEP]), ``ntok`` (N,) untruncated token counts, and the encoder's
    ``path`` / ``hidden`` size. Shared by every builder that encodes transcripts."""
    from ...text_encoder import (encode_tokens, load_encoder, load_tokenizer, resolve_encoder_path, token_counts,
                                 tokenize)

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


def encoder_report(text_encoder, enc: dict, max_len: int) -> dict:
    return {"spec": str(text_encoder), "path": str(enc["path"]), "hidden_size": enc["hidden"],
            "max_len": int(max_len), "lowercased": True, "frozen": True, "layer": "last"}


def text_shapes(splits: dict) -> dict:
    return {n: {m: list(s.features[m].shape) for m in s.features} | {"text_bert": list(s.text_bert.shape)}
            for n, s in splits.items()}
