"""A tiny end-to-end setup for the export/runner tests: a 3-layer, 32-wide BERT in a local Hugging
Face folder (MiniLM's tokenizer files), an MMSA pickle with real tokenized sentences (text_bert)
and an audio modality, and a CPSL checkpoint that fine-tunes that encoder."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

WORDS = ("the movie was great really bad not good i loved it hated boring fun acting plot "
         "and but so very quite terrible amazing okay fine the end").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 14)))) for _ in range(n)]


def tiny_encoder(root: Path, layers: int = 3) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from cpsl.text_encoder import resolve_encoder_path
    enc = root / "tiny_bert"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(enc)
    src = resolve_encoder_path("minilm")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, enc / f)
    return enc


def tiny_data(enc: Path, max_len: int = 16, sizes=(("train", 24), ("valid", 12), ("test", 4)), seed: int = 0):
    from cpsl.data.mmsa import MMSAData, Split
    from cpsl.text_encoder import load_tokenizer, tokenize
    tok = load_tokenizer(str(enc))
    rng = np.random.default_rng(seed)
    splits = {}
    for k, (name, n) in enumerate(sizes):
        texts = sentences(n, seed + k)
        tb = tokenize(tok, texts, max_len)                                  # (N, 3, L)
        tlen = tb[:, 1].sum(1).astype(np.int64)
        text = rng.standard_normal((n, max_len, 32)).astype(np.float32) * (tb[:, 1, :, None] > 0)
        audio = rng.standard_normal((n, 1, 5)).astype(np.float32)
        splits[name] = Split(name, {"text": text, "audio": audio}, {"text": tlen, "audio": np.ones(n, np.int64)},
                             rng.uniform(-3, 3, n).astype(np.float32), np.array([f"v{i}$_${i}" for i in range(n)]),
                             np.array(texts), text_bert=tb)
    return MMSAData(splits, ("text", "audio"))


def tiny_checkpoint(root: Path, layers: int = 3) -> tuple[Path, Path, MMSAData]:  # noqa: F821
    """``(best.pt, data.pkl, data)``: an untrained CPSL model over the tiny encoder (fine-tuned setting)."""
    import torch

    from cpsl.config import preset
    from cpsl.data.mmsa import save_mmsa
    from cpsl.model import CPSLModel
    from cpsl.checkpoint import save_checkpoint
    enc = tiny_encoder(root, layers)
    data = tiny_data(enc)
    pkl = root / "d.pkl"
    save_mmsa(data, pkl)
    cfg = preset("student")
    cfg.model.text_encoder, cfg.model.finetune_text = str(enc), True
    cfg.data.path = str(pkl)
    torch.manual_seed(0)
    m = CPSLModel({"text": 32, "audio": 5}, cfg.model).eval()
    ck = root / "best.pt"
    save_checkpoint(ck, m, None, cfg, 0, {"data_path": str(pkl)})
    return ck, pkl, data
