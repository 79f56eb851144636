"""``cpsl compare``: paired comparison of real ``cpsl train`` folders (tiny runs, 2 epochs)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_cli import cli, one_error_line


def train(pkl, out, seeds, *sets):
    args = ["train", "--data", pkl, "--out", out, "--preset", "student", "--epochs", 2, "--quiet",
            "--seeds", seeds, "--set", "train.num_threads=1"]
    for s in sets:
        args += ["--set", s]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def runs(tiny_pkl, tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    return {"none": train(tiny_pkl, d / "none", "1,2,3", "train.modulation=none"),
            "cp_a": train(tiny_pkl, d / "cp_a", "1,2", "train.modulation=cp"),       # one setting, two folders
            "cp_b": train(tiny_pkl, d / "cp_b", "3", "train.modulation=cp"),
            "other_seeds": train(tiny_pkl, d / "os", "2,4", "train.modulation=none")}


def test_paired_differences_are_those_of_the_seeds(runs, tmp_path):
    out = tmp_path / "cmp.md"
    r = cli("compare", f"none={runs['none']}", f"cp={runs['cp_a']},{runs['cp_b']}", "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["reference"] == "none" and res["seeds"] == [1, 2, 3] and res["split"] == "test"
    per = {n: {p["seed"]: p["test"]["MAE"] for p in json.loads((runs[f].joinpath("results.json")).read_text())["per_seed"]}
           for n, f in (("none", "none"), ("cp_a", "cp_a"), ("cp_b", "cp_b"))}
    cp = {**per["cp_a"], **per["cp_b"]}
    d = [cp[s] - per["none"][s] for s in (1, 2, 3)]
    v = res["runs"]["cp"]["vs_reference"]["MAE"]
    assert v["mean"] == pytest.approx(np.mean(d)) and v["n"] == 3
    half = (v["ci95"][1] - v["ci95"][0]) / 2
    assert half == pytest.approx(4.302652729911275 * np.std(d, ddof=1) / np.sqrt(3))   # t(0.975, 2)
    assert res["runs"]["cp"]["config_vs_reference"] == {"train.modulation": "cp"}
    assert set(res["runs"]["cp"]["heads_MAE"]) == {"text", "audio", "vision"}
    md = out.read_text()
    assert "| cp |" in md and "cp differs from none in: train.modulation=\"cp\"" in md
    assert r.output.startswith("Paired over seeds [1, 2, 3] (test split)")


def test_only_common_seeds_are_paired_and_valid_split_can_be_asked(runs):
    r = cli("compare", f"none={runs['none']}", f"os={runs['other_seeds']}", "--split", "valid")
    assert r.exit_code == 0, r.output
    assert "Paired over seeds [2] (valid split)" in r.output
    assert "not paired (seed missing in another run): none [1, 3]; os [4]" in r.output
    assert "(n=1)" in r.output                                  # one pair: no interval, said so


def test_bad_inputs_are_one_error_line(runs, tmp_path, tiny_mmsa):
    one_error_line(cli("compare", f"none={runs['none']}"), "at least two runs")
    one_error_line(cli("compare", f"none={runs['none']}", "cp"), "NAME=DIR")
    one_error_line(cli("compare", f"a={runs['none']}", f"b={tmp_path / 'absent'}"), "results.json not found")
    one_error_line(cli("compare", f"a={runs['none']}", f"b={runs['none']},{runs['other_seeds']}"),
                   "seed 2 appears in two of its folders")
    one_error_line(cli("compare", f"a={runs['cp_a']}", f"b={runs['cp_b']},{runs['other_seeds']}"),
                   "other settings", "train.modulation")
    other = train(tiny_mmsa(seed=1), tmp_path / "other_data", "1", "train.modulation=none")
    one_error_line(cli("compare", f"a={runs['none']}", f"b={other}"), "different data")
