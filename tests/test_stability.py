"""Training stability (cpsl/stability.py): the lr schedule, the weight EMA, resume, jitter."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

from cpsl.cli import main
from cpsl.config import Config
from cpsl.stability import LRSchedule, WeightEMA, lr_factor
from cpsl.train import jitter

TINY = ["--set", "model.d=16", "--set", "model.heads=2", "--set", "model.audio_layers=1",
        "--set", "model.vision_layers=1", "--set", "data.batch_size=16", "--quiet", "--cp-backend", "foreach"]
STABLE = ["--set", "train.lr_schedule=cosine", "--set", "train.lr_horizon=4", "--set", "train.warmup_epochs=1",
          "--set", "train.ema=0.9"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cosine_factor_warms_up_decays_to_the_floor_and_stays():
    f = [lr_factor(s, 10, "cosine", 1, 5, 0.05) for s in range(80)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)          # linear warm-up over 10 steps
    assert all(a >= b for a, b in zip(f[10:], f[11:]))                         # then non-increasing
    assert f[30] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way: epoch 3 of 1..5
    assert f[50] == pytest.approx(0.05) and f[79] == pytest.approx(0.05)       # the floor from the horizon on
    assert {lr_factor(s, 10, "constant", 1, 5, 0.05) for s in range(30)} == {1.0}


def test_schedule_writes_lr_and_base_lr_of_every_group():
    cfg = Config()
    cfg.train.lr_schedule, cfg.train.lr_horizon, cfg.train.warmup_epochs = "cosine", 3.0, 1.0
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": torch.tensor(1e-3)}, {"params": [b], "lr": torch.tensor(2e-5)}])
    sch = LRSchedule(cfg.train, opt, steps_per_epoch=4)
    sch.apply(2, 0)                                     # step 8: epoch 2 = half-way through the decay
    want = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5))
    for pg, lr in zip(opt.param_groups, (1e-3, 2e-5)):
        assert float(pg["lr"]) == pytest.approx(lr * want) and float(pg["base_lr"]) == pytest.approx(lr * want)


def test_ema_update_rule_and_warmup():
    torch.manual_seed(0)
    net = torch.nn.BatchNorm1d(3)
    ema = WeightEMA(net, 0.9)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    net(torch.randn(8, 3))                              # moves the running statistics (float buffers)
    ema.update()                                        # t = 1: d = min(0.9, 2 / 11)
    d = 2 / 11
    assert torch.allclose(ema.model.weight, w0 + (1 - d) * (net.weight.detach() - w0))
    assert torch.allclose(ema.model.running_mean, (1 - d) * net.running_mean)
    assert int(ema.model.num_batches_tracked) == int(net.num_batches_tracked)   # non-float buffers copied
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_jitter_is_the_mean_absolute_epoch_to_epoch_change_after_the_first_epochs():
    assert jitter([9, 9, 9, 0.5, 0.7, 0.4]) == pytest.approx((0.2 + 0.3) / 2)
    assert jitter([1.0, 0.9, 0.8, 0.7]) is None


def test_resume_with_schedule_and_ema_equals_uninterrupted(tiny_pkl, tmp_path):
    args = ["--data", tiny_pkl, *TINY, *STABLE]
    assert cli("train", "--out", tmp_path / "a", "--epochs", 3, *args).exit_code == 0
    assert cli("train", "--out", tmp_path / "b", "--epochs", 1, *args).exit_code == 0
    r = cli("train", "--out", tmp_path / "b", "--epochs", 3, "--resume", *args)
    assert r.exit_code == 0 and "resuming after epoch 0" in r.output, r.output
    logs = [[json.loads(x) for x in (tmp_path / d / "seed1" / "log.jsonl").read_text().splitlines()] for d in "ab"]
    for x, y in zip(*logs):
        assert x["valid"] == y["valid"] and x["train"] == y["train"]
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert ra["test"] == rb["test"] and ra.get("jitter") == rb.get("jitter")


def test_checkpoints_hold_the_averaged_weights_and_last_pt_the_raw_ones(tiny_pkl, tmp_path):
    r = cli("train", "--out", tmp_path, "--epochs", 2, "--data", tiny_pkl, *TINY, *STABLE)
    assert r.exit_code == 0, r.output
    last = torch.load(tmp_path / "seed1" / "last.pt", weights_only=True)
    assert last["ema_updates"] == 2 * 4                 # 64 samples / batch 16 = 4 steps per epoch
    k = "head.net.0.weight" if "head.net.0.weight" in last["model"] else next(iter(last["model"]))
    assert not torch.equal(last["model"][k], last["train_model"][k])
    # the lr in the saved optimizer state follows the schedule: step 7 of 4 per epoch, horizon 4 epochs
    f = lr_factor(7, 4, "cosine", 1, 4, 0.05)
    lrs = {pg["name"]: float(pg["lr"]) for pg in last["optimizer"]["param_groups"]}
    assert lrs["shared"] == pytest.approx(1e-3 * f)


def test_a_horizon_inside_the_warmup_is_one_error_line(tiny_pkl, tmp_path):
    r = CliRunner().invoke(main, ["train", "--data", str(tiny_pkl), "--out", str(tmp_path), "--set", "train.lr_schedule=cosine",
                                  "--set", "train.lr_horizon=1", "--set", "train.warmup_epochs=2", "--quiet"])
    assert r.exit_code == 2 and r.output.startswith("error:") and "train.lr_horizon" in r.output, r.output


def test_path_scope_adds_each_modalitys_own_fusion_entry_and_keeps_groups_disjoint():
    from cpsl.model import CPSLModel
    cfg = Config()
    cfg.model.d, cfg.model.heads = 16, 2
    model = CPSLModel({"text": 12, "audio": 5, "vision": 7}, cfg.model)
    enc, path = model.modality_parameters(), model.modality_parameters(scope="path")
    names = {id(p): n for n, p in model.named_parameters()}
    for m in ("text", "audio", "vision"):
        extra = {names[id(p)] for p in path[m]} - {names[id(p)] for p in enc[m]}
        assert extra and all(n.startswith((f"fusion.att.{m}_", f"fusion.gate.{m}_", f"fusion.ln.{m}.")) for n in extra)
        assert any(n.startswith(f"fusion.gate.{m}_") for n in extra) and any(n.startswith(f"fusion.ln.{m}.") for n in extra)
    ids = [id(p) for g in path.values() for p in g]
    assert len(ids) == len(set(ids))                        # disjoint groups
    assert not any(names[i].startswith(("fusion.mlp.", "fusion.res.")) for i in ids)   # shared stays shared


def test_ablate_define_runs_an_extra_variant_and_reports_jitter(tiny_pkl, tmp_path):
    r = cli("ablate", "--data", tiny_pkl, "--out", tmp_path, "--variants", "none", "--seeds", "1,2", "--epochs", 5,
            "--define", "ema", "train.ema=0.9 train.lr_schedule=cosine train.lr_horizon=5", "--reference", "none",
            "--cost-steps", 0, *TINY)
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "ablation.json").read_text())
    assert list(s["variants"]) == ["none", "ema"] and s["reference"] == "none"
    cfg = json.loads((tmp_path / "ema" / "config.json").read_text())
    assert cfg["train"]["ema"] == 0.9 and cfg["train"]["lr_schedule"] == "cosine"
    assert len(s["variants"]["ema"]["jitter"]["values"]) == 2 and "vs_none" in s["variants"]["ema"]
    md = (tmp_path / "ablation.md").read_text()
    assert "| ema |" in md and "jitter" in md and (tmp_path / "valid_curves.png").is_file()


@pytest.mark.parametrize("define, needle", [(("x", "train.nope=1"), "train.nope"), (("cp", "train.ema=0.9"), "already"),
                                            (("x", "train.ema=2"), "train.ema")])
def test_ablate_define_errors_are_one_line(tiny_pkl, tmp_path, define, needle):
    r = CliRunner().invoke(main, ["ablate", "--data", str(tiny_pkl), "--out", str(tmp_path), "--variants", "none",
                                  "--define", *define, "--quiet"])
    assert r.exit_code == 2 and r.output.startswith("error:") and needle in r.output, r.output
