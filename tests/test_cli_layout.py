"""The command line is derived from the library: option defaults/choices from the config and
settings dataclasses, export precisions from the registry (a toy precision added in a test reaches
the CLI and the bench), and TensorBoard output of every logged scalar."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cpsl.cli import main
from cpsl.compress.settings import DistillSettings
from cpsl.config import Config, _CHOICES, preset
from cpsl.data import SynthSpec, generate
from cpsl.data.mmsa import save_mmsa
from cpsl.deploy import ExportSettings, Manifest, precisions
from cpsl.deploy.precisions import Precision

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.d=16", "--set", "model.heads=2", "--set", "model.audio_layers=1",
        "--set", "model.vision_layers=1", "--set", "data.batch_size=16", "--quiet", "--set", "train.num_threads=1"]


def help_of(*cmd) -> str:
    r = CliRunner().invoke(main, [*cmd, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())


def test_help_defaults_and_choices_come_from_the_dataclasses():
    cfg = Config()
    h = help_of("train")
    assert f"train.epochs={cfg.train.epochs}" in h and f"train.modulation={cfg.train.modulation}" in h
    from cpsl import strategies
    assert f"[{'|'.join(strategies.names())}]" in h      # --modulation: the registry's names
    assert f"[{'|'.join(_CHOICES[('cp', 'backend')])}]" in h
    assert "--tensorboard" in h
    h = help_of("export")
    for f in dataclasses.fields(ExportSettings):
        flag = f"--{f.name.replace('_', '-')}"
        assert flag in h, flag
        if f.default is not None and not isinstance(f.default, bool):
            assert f"[default: {f.default}]" in h or f"[default: {f.default}" in h, f.name
    assert f"[{'|'.join(precisions.names())}]" in h
    h = help_of("distill")
    for f in dataclasses.fields(DistillSettings):
        assert f"[default: {f.default}]" in h, f.name
    for cmd in (("ablate",), ("eval",), ("data", "synth"), ("info",)):
        assert "--help" in help_of(*cmd)


@pytest.mark.parametrize("args", [["--set", "train.bogus=1"], ["--set", "cp.backend=gpu"], ["--set", "train.epochs=x"],
                                  ["--modulation", "sideways"], ["--no-such-option"], ["--epochs", "many"]])
def test_bad_config_values_one_line_exit_2(tmp_path, args):
    r = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2, r.output
    assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from cpsl.model import CPSLModel
    from cpsl.checkpoint import save_checkpoint
    root = tmp_path_factory.mktemp("ck")
    data = generate(SynthSpec(n_train=24, n_valid=16, n_test=8, d_text=12, d_audio=5, d_vision=7,
                              text_len=(3, 9), audio_len=(4, 12), vision_len=(4, 12)))
    save_mmsa(data, root / "d.pkl")
    cfg = preset("student")
    model = CPSLModel(data.dims, cfg.model).eval()
    save_checkpoint(root / "best.pt", model, None, cfg, 0, {"data_path": str(root / "d.pkl")})
    return root


@pytest.fixture
def toy_precision():
    """fp32 at opset 13: one registry entry, no other file touched."""
    p = Precision("fp32_op13", "float32 graph at ONNX opset 13", None, False, precisions.fp32_tolerance,
                  ("--noTF32",), trt_clear_flags=("TF32",), opset=13)
    precisions.register(p)
    yield p
    precisions.unregister(p.name)


def test_toy_precision_through_cli_and_bench(tiny_ckpt, tmp_path, toy_precision):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    assert "fp32_op13" in help_of("export")
    r = CliRunner().invoke(main, ["export", "--ckpt", str(tiny_ckpt / "best.pt"), "--onnx", str(out),
                                  "--precision", "fp32_op13", "--quiet"])
    assert r.exit_code == 0, r.output
    m = Manifest.load(out.with_name("m.manifest.json"))
    assert m.precision == "fp32_op13" and m.opset == 13
    assert m.golden["tolerance"]["atol"] == precisions.FP32_PARITY_TOL
    assert "--noTF32" in out.with_name("m.build_engine.sh").read_text()
    # the bench's export stage reads the same registry
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from benchkit.stages import artefact_plan, export_all
    finally:
        sys.path.remove(str(REPO / "bench"))
    plan = artefact_plan(tiny_ckpt / "best.pt", tiny_ckpt / "best.pt")
    assert ("student_fp32_op13", "student", tiny_ckpt / "best.pt", "fp32_op13") in plan
    arts = tmp_path / "arts"
    arts.mkdir()
    with open(tmp_path / "log.txt", "w") as log_file:
        manifests, errors = export_all([p for p in plan if p[3] == "fp32_op13"], arts, str(tiny_ckpt / "d.pkl"),
                                       log_file, log_file.write)
    assert not errors and manifests["student_fp32_op13"]["opset"] == 13
    assert json.loads((arts / "student_fp32_op13.manifest.json").read_text())["precision"] == "fp32_op13"


def test_unknown_precision_is_an_error():
    from cpsl.errors import CPSLError
    with pytest.raises(CPSLError, match="unknown precision"):
        precisions.get("int4")


def test_tensorboard_writes_every_logged_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    p = tmp_path / "d.pkl"
    save_mmsa(generate(SynthSpec(n_train=48, n_valid=16, n_test=16, d_text=12, d_audio=5, d_vision=7,
                                 text_len=(3, 9), audio_len=(4, 12), vision_len=(4, 12))), p)
    r = CliRunner().invoke(main, ["train", "--data", str(p), "--out", str(tmp_path / "run"), "--epochs", "2",
                                  "--modulation", "none", "--tensorboard", *TINY])
    assert r.exit_code == 0, r.output
    seed_dir = tmp_path / "run" / "seed1"
    acc = EventAccumulator(str(seed_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    from cpsl.tblog import flatten
    recs = [json.loads(line) for line in (seed_dir / "log.jsonl").read_text().splitlines()]
    want = set(flatten({k: v for k, v in recs[-1].items() if k != "epoch"}))
    assert want and want <= tags
    assert {"valid/MAE", "train/task"} <= tags and any(t.startswith("balance/") for t in tags)
    ev = acc.Scalars("valid/MAE")
    assert [e.step for e in ev] == [r["epoch"] for r in recs]
    assert np.allclose([e.value for e in ev], [r["valid"]["MAE"] for r in recs], rtol=1e-6)


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    r = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "o"), "--epochs", "1", "--tensorboard",
                                  "--set", "data.synth={\"n_train\": 16, \"n_valid\": 8, \"n_test\": 8}", *TINY])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: --tensorboard needs the tensorboard package: pip install 'cpsl[tensorboard]'"]
    assert r.output.strip().splitlines()[-1] == errors[0] and "Traceback" not in r.output


def test_export_artifact_returns_the_manifest_it_writes(tiny_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    from cpsl.deploy import export_artifact
    lines = []
    m = export_artifact(tiny_ckpt / "best.pt", tmp_path / "a.onnx", ExportSettings(precision="fp16"), log=lines.append)
    assert isinstance(m, Manifest) and m.precision == "fp16" and m.onnx_path == tmp_path / "a.onnx"
    on_disk = json.loads(m.manifest_path.read_text())
    assert on_disk == json.loads(json.dumps(m.to_dict()))
    assert Manifest.load(m.manifest_path).to_dict() == on_disk
    assert set(m.files) == {"a.onnx", "a.golden.npz", "a.build_engine.sh"}
    assert m.golden["tolerance"]["atol"] == precisions.get("fp16").tolerance(m.parity["artefact_vs_pytorch_fp32"]["max_abs"])
    assert any("converting to fp16" in line for line in lines)
    with pytest.raises(Exception, match="must end in .onnx"):
        export_artifact(tiny_ckpt / "best.pt", tmp_path / "a.txt")
