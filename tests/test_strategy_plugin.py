"""The strategy plug-in is true: a toy strategy with a knob, registered here and in no other file,
reaches ``--modulation``, ``--set toy.knob=...`` (its rule declared in its field metadata),
``cpsl ablate`` and ``bench/balance.py``, and the loop says what the strategy wants said (the way
tests/test_cli_layout.py proves the precision registry with a toy precision)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cpsl import strategies
from cpsl.cli import main
from cpsl.config import Config, key
from cpsl.config_rules import number
from cpsl.strategies.base import BaseModulator, stats

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.d=16", "--set", "model.heads=2", "--set", "model.audio_layers=1",
        "--set", "model.vision_layers=1", "--set", "data.batch_size=16", "--quiet", "--threads", "1"]


@dataclass(slots=True)
class ToyConfig:
    knob: float = key(0.5, number(0.0, 1.0, lo_open=True), help="Toy: every group's gradient is multiplied by it.")


class Toy(BaseModulator):
    """Multiplies every modality group's gradient by ``toy.knob``."""
    name = "toy"
    effects = frozenset({"scale_grad"})
    config = ToyConfig

    @classmethod
    def describe(cls, cfg) -> str:
        return f"modulation: toy (knob {cfg.toy.knob:g})"

    def after_backward(self, step):
        k = torch.full((len(self.names),), self.scfg.knob, dtype=torch.float64)
        for n in self.names:
            for p in self.groups[n]:
                if p.grad is not None:
                    p.grad.mul_(self.scfg.knob)
        return stats(self.names, self.groups, k)

    def results(self) -> dict:
        return {"toy_knob": self.scfg.knob}


@pytest.fixture
def toy():
    strategies.register(Toy)
    yield Toy
    strategies.unregister(Toy.name)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], terminal_width=200)


def test_toy_strategy_through_train(tiny_pkl, tmp_path, toy):
    assert "toy" in " ".join(run("train", "--help").output.split())      # --modulation: the registry's names
    r = run("train", "--data", tiny_pkl, "--out", tmp_path / "run", "--modulation", "toy", "--set", "toy.knob=0.25",
            "--epochs", "2", *TINY)
    assert r.exit_code == 0, r.output
    assert "modulation: toy (knob 0.25)" in r.output                       # its describe(), said by the CLI
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["modulation"] == "toy" and res["config"]["toy"] == {"knob": 0.25}
    assert res["per_seed"][0]["toy_knob"] == 0.25                          # the knob reached the modulator
    log = [json.loads(x) for x in (tmp_path / "run" / "seed1" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["balance"]["k"] == {m: 0.25 for m in ("text", "audio", "vision")}
    assert "cp_plan_builds" not in res["per_seed"][0]                      # the loop adds nothing of CP's
    # the rule beside the knob: out of range is one error line naming the key, exit 2
    r = run("train", "--data", tiny_pkl, "--out", tmp_path / "bad", "--modulation", "toy", "--set", "toy.knob=2", *TINY)
    assert r.exit_code == 2 and r.output.strip() == "error: config key toy.knob must be a number in (0, 1], got 2.0"


def test_toy_section_is_gone_with_the_strategy(toy):
    assert Config().toy.knob == 0.5
    strategies.unregister("toy")
    with pytest.raises(AttributeError):
        Config().toy
    strategies.register(Toy)


def test_toy_strategy_through_ablate(tiny_pkl, tmp_path, toy):
    r = run("ablate", "--data", tiny_pkl, "--out", tmp_path / "abl", "--variants", "none,toy", "--seeds", "1",
            "--define", "toy_small", "train.modulation=toy toy.knob=0.125", "--epochs", "1", "--cost-steps", "2", *TINY)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert {"none", "toy", "toy_small"} <= set(summary["variants"])
    for name, knob in (("toy", 0.5), ("toy_small", 0.125)):
        res = json.loads((tmp_path / "abl" / name / "results.json").read_text())
        assert res["modulation"] == "toy" and res["per_seed"][0]["toy_knob"] == knob


def _load_balance():
    if str(REPO / "bench") not in sys.path:   # as `python bench/balance.py` has it: benchkit beside the script
        sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("balance_under_test", REPO / "bench" / "balance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_toy_strategy_through_bench_balance(tmp_path, toy, monkeypatch):
    """bench/balance.py runs each cell as ``python -m cpsl ablate``; here that child runs in this
    process (where the toy is registered), so the bench itself is what passes the toy through."""
    real = subprocess.run

    def in_process(cmd, *args, stdout=None, **kw):
        if list(cmd[:3]) != [sys.executable, "-m", "cpsl"]:
            return real(cmd, *args, stdout=stdout, **kw)
        r = CliRunner().invoke(main, list(cmd[3:]))
        if stdout is not None and hasattr(stdout, "write"):
            stdout.write(r.output)
        return subprocess.CompletedProcess(cmd, r.exit_code)

    monkeypatch.setattr(subprocess, "run", in_process)
    balance = _load_balance()
    out = tmp_path / "bal"
    code = balance.main(["--out", str(out), "--cells", "synth_sc0", "--quick", "--variants", "toy", "--seeds", "1",
                         "--define", "toy_small", "toy.knob=0.125 train.modulation=toy", "--jobs", "1",
                         "--set", "model.d=16", "--set", "model.heads=2", "--epochs", "1"])
    log = out / "synth_sc0.log"
    assert code == 0, log.read_text() if log.is_file() else code
    s = json.loads((out / "synth_sc0" / "ablation.json").read_text())
    assert {"none", "toy", "toy_small"} <= set(s["variants"])
    res = json.loads((out / "synth_sc0" / "toy_small" / "results.json").read_text())
    assert res["config"]["toy"] == {"knob": 0.125} and res["per_seed"][0]["toy_knob"] == 0.125
    assert "toy" in (out / "balance.md").read_text()


def test_builtin_strategies_say_what_the_loop_and_cli_used_to():
    cfg = Config()
    cfg.cp.backend, cfg.cp.mode = "foreach", "grad"
    assert strategies.get("cp").describe(cfg) == "modulation: cp (backend foreach, mode grad)"
    assert strategies.get("cp").start_warnings(cfg) == []               # an explicit backend never falls back
    assert strategies.get("ogm_ge").describe(cfg) == "modulation: ogm_ge"
    per_seed = [{"cp_stopped_epoch": 3}, {"cp_stopped_epoch": None}]
    assert strategies.get("cp").aggregate(per_seed) == {"cp_stopped_epoch": [3, None]}
    assert strategies.get("none").aggregate(per_seed) == {}
