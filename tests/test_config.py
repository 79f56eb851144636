"""Config defaults (docs/method.md), presets, YAML/JSON round trip, overrides and their errors."""
from __future__ import annotations

import json

import pytest
import yaml

from cpsl.config import (PRESETS, Config, apply_overrides, build_config, copy_config, load_mapping,
                         preset)
from cpsl.errors import CPSLError


def test_defaults_follow_method_md():
    c = Config()
    # §4 losses
    assert c.loss.task == "l1"
    assert (c.loss.aux, c.loss.rec, c.loss.sl, c.loss.div) == (0.1, 0.1, 0.05, 0.01)
    assert c.loss.sl_out == 0.1
    assert c.loss.warmup_epochs == 3
    # §5 CP
    assert c.train.modulation == "cp"
    assert (c.cp.tau, c.cp.alpha, c.cp.k_min, c.cp.beta) == (1.2, 0.5, 0.1, 0.5)
    assert c.cp.penalty == "ratio"
    assert c.cp.normalize is False
    assert c.cp.mode == "update"
    assert c.cp.ge_noise == 0.0          # OGM-GE style noise off by default
    # §1 AME and the teacher size
    assert c.model.d == 128
    assert (c.model.text_layers, c.model.audio_layers, c.model.vision_layers) == (1, 2, 2)
    assert (c.model.text_kernel, c.model.audio_kernel, c.model.vision_kernel) == (1, 3, 3)
    assert c.model.fusion == "gcf" and c.model.ame is True


def test_presets():
    t, s = preset("teacher"), preset("student")
    assert t.to_dict() == Config().to_dict()
    assert s.model.d < t.model.d and 32 <= s.model.d <= 64            # method.md §7: student d 32-64
    assert (s.model.text_layers, s.model.audio_layers, s.model.vision_layers) == (1, 1, 1)
    assert s.model.d % s.model.heads == 0
    assert s.to_dict()["loss"] == t.to_dict()["loss"] and s.to_dict()["cp"] == t.to_dict()["cp"]
    # presets are fresh objects: editing one does not leak into the next call or PRESETS
    s.model.d = 999
    assert preset("student").model.d == PRESETS["student"]["model"]["d"] != 999
    with pytest.raises(CPSLError, match="unknown preset 'huge'"):
        preset("huge")


def _modified() -> Config:
    c = preset("student")
    c.loss.aux = 0.25
    c.cp.normalize = True
    c.cp.mode = "grad"
    c.groups.prefixes = {"text": ["encoders.text"], "audio": ["encoders.audio", "extra"]}
    c.train.seeds = [1, 2, 3]
    c.train.epochs = 7
    c.data.path = "some/file.pkl"
    return c


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    c = _modified()
    p = tmp_path / f"cfg{suffix}"
    c.save(p)
    raw = yaml.safe_load(p.read_text()) if suffix != ".json" else json.loads(p.read_text())
    assert set(raw) == {"data", "model", "loss", "groups", "cp", "ogm_ge", "cggm", "ags", "mmpareto", "inforeg", "moddrop", "train"}
    assert raw["train"]["seeds"] == [1, 2, 3]
    back = Config.load(p)
    assert back.to_dict() == c.to_dict()
    assert back.train.seeds == [1, 2, 3] and back.cp.normalize is True
    assert isinstance(back.loss.aux, float) and isinstance(back.train.epochs, int)


def test_partial_file_and_precedence(tmp_path):
    p = tmp_path / "part.yaml"
    p.write_text("model:\n  d: 64\ntrain:\n  epochs: 5\n")
    c = build_config("student", str(p), ["train.epochs=9"])
    assert c.model.d == 64                  # file beats preset
    assert c.train.epochs == 9              # override beats file
    assert c.model.heads == PRESETS["student"]["model"]["heads"]   # untouched preset value kept
    assert Config.load(p).model.audio_layers == 2                  # untouched default kept


def test_override_coercion():
    c = apply_overrides(Config(), [
        "train.epochs=5.0", "loss.aux=1e-3", "cp.tau=2", "cp.normalize=yes", "model.ame=false",
        "train.seeds=1,2,3", "model.fusion=concat", "data.path=123", "groups.prefixes={\"text\": [\"enc\"]}",
    ])
    assert c.train.epochs == 5 and type(c.train.epochs) is int
    assert c.loss.aux == 1e-3 and type(c.loss.aux) is float       # YAML reads "1e-3" as a string
    assert c.cp.tau == 2.0 and type(c.cp.tau) is float
    assert c.cp.normalize is True and c.model.ame is False
    assert c.train.seeds == [1, 2, 3]
    assert c.model.fusion == "concat"
    assert c.data.path == "123"
    assert c.groups.prefixes == {"text": ["enc"]}
    assert apply_overrides(Config(), ["train.seeds=[4, 5]"]).train.seeds == [4, 5]
    assert apply_overrides(Config(), ["train.seeds=7"]).train.seeds == [7]
    assert apply_overrides(Config(), ["cp.normalize=0"]).cp.normalize is False


def test_overrides_validated_together():
    # 30 % 4 != 0 would fail on its own; together with heads=3 it is valid, in either order
    for ov in (["model.d=30", "model.heads=3"], ["model.heads=3", "model.d=30"]):
        c = apply_overrides(Config(), ov)
        assert (c.model.d, c.model.heads) == (30, 3)
    with pytest.raises(CPSLError, match="divisible"):
        apply_overrides(Config(), ["model.d=30"])


@pytest.mark.parametrize("override, needle", [
    ("nosuch.x=1", "nosuch"),
    ("model.nosuch=1", "model.nosuch"),
    ("loss.tau=1.0", "loss.tau"),                  # tau lives in cp, not loss
    ("model.fusion=sum", "model.fusion"),
    ("cp.mode=adam", "cp.mode"),
    ("loss.task=huber", "loss.task"),
    ("cp.backend=cuda", "cp.backend"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.epochs=many", "train.epochs"),
    ("train.epochs=true", "train.epochs"),
    ("train.epochs=0", "train.epochs"),
    ("data.bucket=-1", "data.bucket"),
    ("cp.tau=high", "cp.tau"),
    ("cp.normalize=maybe", "cp.normalize"),
    ("groups.prefixes=[1]", "groups.prefixes"),
    ("epochs=3", "section.key=value"),
    ("train.epochs", "section.key=value"),
])
def test_override_errors_name_the_key(override, needle):
    with pytest.raises(CPSLError) as e:
        apply_overrides(Config(), [override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_file_errors(tmp_path):
    with pytest.raises(CPSLError, match="not found"):
        load_mapping(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CPSLError, match="cannot parse"):
        load_mapping(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(CPSLError, match="mapping"):
        load_mapping(lst)
    unk = tmp_path / "unk.yaml"
    unk.write_text("cp:\n  tua: 1.5\n")
    with pytest.raises(CPSLError, match=r"cp\.tua"):
        Config.load(unk)
    sec = tmp_path / "sec.yaml"
    sec.write_text("optim:\n  lr: 1.0\n")
    with pytest.raises(CPSLError, match="optim"):
        Config.load(sec)
    notmap = tmp_path / "notmap.yaml"
    notmap.write_text("cp: 3\n")
    with pytest.raises(CPSLError, match="'cp' must be a mapping"):
        Config.load(notmap)


def test_copy_config_is_deep():
    c = _modified()
    d = copy_config(c)
    assert d.to_dict() == c.to_dict()
    d.train.seeds.append(4)
    d.groups.prefixes["vision"] = ["v"]
    assert c.train.seeds == [1, 2, 3] and "vision" not in c.groups.prefixes


def test_moved_grouping_keys_still_load():
    """cp.groups / cp.scope / cp.diagnostics moved to the neutral section groups (prefixes, scope,
    diagnostics): old config files, --set keys, saved runs and checkpoint identities still load."""
    from cpsl.config import flatten, upgrade_flat
    old = {"cp": {"groups": {"text": ["encoders.text."]}, "scope": "path", "diagnostics": False, "tau": 1.5}}
    c = Config.from_dict(old)
    assert (c.groups.prefixes, c.groups.scope, c.groups.diagnostics, c.cp.tau) == (
        {"text": ["encoders.text."]}, "path", False, 1.5)
    c = apply_overrides(Config(), ["cp.scope=path", "cp.diagnostics=false", "cp.groups={audio: [encoders.audio.]}"])
    assert (c.groups.scope, c.groups.diagnostics, c.groups.prefixes) == ("path", False, {"audio": ["encoders.audio."]})
    assert c.to_dict()["groups"] == {"prefixes": {"audio": ["encoders.audio."]}, "scope": "path", "diagnostics": False}
    assert "groups" not in c.to_dict()["cp"] and "scope" not in c.to_dict()["cp"]
    # an old results.json config flattens to the new names; an old checkpoint identity too
    assert flatten(old)["groups.scope"] == "path" and "cp.scope" not in flatten(old)
    assert upgrade_flat({"cp.scope": "path", "cp.tau": 1.5}) == {"groups.scope": "path", "cp.tau": 1.5}


def test_old_checkpoint_identity_resumes():
    from cpsl.runs import resume_differences, run_identity
    cfg = Config()
    ident = run_identity(cfg, "fp")
    old = {("cp." + {"groups.prefixes": "groups"}.get(k, k.split(".", 1)[1]) if k.startswith("groups.") else k): v
           for k, v in ident.items()}
    assert "cp.groups" in old and "cp.scope" in old and "groups.scope" not in old
    assert resume_differences({"identity": old, "config": cfg.to_dict()}, cfg, "fp") == []
    cfg.groups.scope = "path"
    assert resume_differences({"identity": old, "config": {}}, cfg, "fp") == ["groups.scope ('encoder' -> 'path')"]


def test_unknown_attribute_raises():
    c = Config()
    for obj, name in ((c.train, "quiet"), (c.cp, "groups"), (c.model, "dim"), (c, "trian")):
        with pytest.raises(AttributeError):
            setattr(obj, name, 1)


def test_every_key_declares_its_rule_once():
    """Each key's rule sits in its field's metadata (``check`` or ``choices``), nowhere else."""
    import dataclasses
    import cpsl.config_rules as rules
    from cpsl.config import sections
    for name, obj in sections(Config()):
        for f in dataclasses.fields(obj):
            assert ("check" in f.metadata) != ("choices" in f.metadata), f"{name}.{f.name}"
    assert not hasattr(rules, "RULES")


def test_non_identity_keys():
    from cpsl.config import flatten, non_identity_keys
    keys = non_identity_keys()
    assert isinstance(keys, frozenset) and keys <= set(flatten(Config().to_dict()))
    assert {"train.num_threads", "train.progress", "train.device", "data.path", "cp.backend",
            "groups.diagnostics", "train.tensorboard", "train.seeds"} <= keys   # seeds: which replicas run
    # what a run learns: never in the set
    assert not keys & {"train.epochs", "train.patience", "train.lr", "train.eval_every", "model.d",
                       "data.synth", "data.batch_size", "groups.prefixes", "groups.scope", "train.modulation"}


def test_validated_once_on_the_way_in(monkeypatch, tmp_path):
    import cpsl.config as config
    from cpsl.cli.options import run_config
    calls = []
    real = config._check
    monkeypatch.setattr(config, "_check", lambda cfg, secs: (calls.append(1), real(cfg, secs)))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"epochs": 3}}))
    build_config("student", str(p), ["model.d=32"])
    assert len(calls) == 1
    calls.clear()
    run_config("student", str(p), ["model.d=32"], seeds="1,2", epochs=4, device="cpu", quiet=True, threads=1)
    assert len(calls) == 1
