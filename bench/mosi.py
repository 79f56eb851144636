"""Real-data experiments: CMU-MOSI (standard folds, valid split) with MiniLM text + openSMILE
audio, and the tri-modal bc-LSTM feature set on its own split.

    python bench/mosi.py [--data-dir DATA] [--seeds 1,2,3] [--out DIR (default: runs/bench/mosi)]
                         [--variants frozen_none,frozen_cpsl,ft_none,ft_cpsl] [--epochs N] [--bclstm]
    python bench/mosi.py --ensemble RUN_DIR RUN_DIR [...] [--ensemble-json FILE]  (bench/mosi_ensemble.py)
    python bench/mosi.py --recipe best ... / --kfold-compare ...   (kept names of `cpsl recipe mosi ...`
                         and `cpsl recipe kfold-compare ...`: the recipe lives in cpsl.recipes.mosi)

Variants (each over the seeds, valid metrics of the checkpoint selected on valid loss —
MOSI's test fold is not in the data pack):
  frozen_none   frozen MiniLM token states, --modulation none --no-sl
  frozen_cpsl   frozen MiniLM token states, CP + SL (defaults)
  ft_none       MiniLM fine-tuned end to end on text_bert (lr 2e-5), --modulation none --no-sl
  ft_cpsl       fine-tuned, CP + SL
plus the text-only auxiliary head of each run and a ridge regression on frozen mean-pooled
MiniLM sentence embeddings (the reference line). Writes OUT/mosi.md and OUT/mosi.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from benchkit.errors import BenchError, bench_main

from cpsl.baselines import ridge
from cpsl.proc import exec_cpsl, run_cpsl
from cpsl.runs import epoch_times

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "frozen_none": ["--modulation", "none", "--no-sl"],
    "frozen_cpsl": [],
    "ft_none": ["--modulation", "none", "--no-sl", "--set", "model.text_encoder=minilm", "--set", "model.finetune_text=true"],
    "ft_cpsl": ["--set", "model.text_encoder=minilm", "--set", "model.finetune_text=true"],
}
KEYS = ("MAE", "Corr", "Non0_acc_2", "Non0_F1_score", "Has0_acc_2", "Mult_acc_7")
DEFAULT_DATA = os.environ.get("CPSL_DATA_DIR", str(ROOT.parent / "shared" / "data"))


def table(rows: dict, title: str) -> str:
    lines = [f"### {title}", "", "| variant | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for name, m in rows.items():
        cells = []
        for k in KEYS:
            v = m.get(k)
            cells.append("" if v is None else f"{v['mean']:.4f} ± {v['std']:.4f}" if isinstance(v, dict) else f"{v:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_set(name, pkl, variants, seeds, epochs, out, extra=()):
    res, timing = {}, {}
    for v in variants:
        d = out / f"{name}_{v}"
        cmd = ["train", "--data", str(pkl), "--out", str(d), "--seeds", seeds, "--quiet", *VARIANTS[v], *extra]
        if epochs:
            cmd += ["--epochs", str(epochs)]
        print(f"[{name}] {v} ...", flush=True)
        wall = run_cpsl(cmd, out / f"{name}_{v}.log")
        r = json.loads((d / "results.json").read_text())
        res[v] = r["valid"]
        res[f"{v}: text head"] = r["valid_aux"]["text"]
        et = epoch_times(d)
        timing[v] = {"wall_s": wall, "epoch_s_median": float(np.median(et)) if et else None, "epochs": len(et)}
        print(f"[{name}] {v}: valid MAE {r['valid']['MAE']['mean']:.4f} ± {r['valid']['MAE']['std']:.4f}, "
              f"Non0_acc_2 {r['valid']['Non0_acc_2']['mean']:.4f}; {timing[v]['epoch_s_median']:.1f} s/epoch", flush=True)
    return res, timing


def forward(argv: list[str]) -> None:
    """``--recipe best ...`` and ``--kfold-compare ...`` are ``cpsl recipe mosi|kfold-compare`` (this
    process becomes that command: its output, errors and exit code)."""
    if "--kfold-compare" in argv:
        exec_cpsl(["recipe", "kfold-compare", *[w for w in argv if w != "--kfold-compare"]])
    i = next(i for i, w in enumerate(argv) if w.startswith("--recipe"))
    rest = argv[:i] + argv[i + (1 if "=" in argv[i] else 2):]
    if not any(w.startswith("--data-dir") for w in rest):
        rest = ["--data-dir", DEFAULT_DATA, *rest]
    exec_cpsl(["recipe", "mosi", *rest])


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--bclstm", action="store_true", help="Also run the bc-LSTM set (frozen variants only).")
    ap.add_argument("--work", default="/tmp/cpsl_mosi", help="Pickles and run folders (outside the repo).")
    ap.add_argument("--out", help="report folder (default: the scratch folder runs/bench/mosi; a bench/results folder "
                    "with files needs --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace the files of a committed results folder")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="Extra --set for every run.")
    g = ap.add_argument_group("ensemble ceiling (--ensemble)")
    g.add_argument("--ensemble", nargs="+", metavar="RUN_DIR",
                   help="only score: the prediction-averaging ensemble of finished recipe runs, on MOSI valid and "
                        "(unless --ensemble-valid-only) on their common k-fold; no training")
    g.add_argument("--ensemble-valid-only", action="store_true", help="--ensemble without the k-fold part")
    g.add_argument("--ensemble-json", help="also write the --ensemble figures here (JSON)")
    g.add_argument("--kfold-variant", default="transferred", help="the recipe k-fold variant --ensemble reads")
    g.add_argument("--threads", type=int, default=0, help="torch threads of --ensemble (0: torch's default)")
    ap.epilog = ("--recipe best ... and --kfold-compare ... run cpsl recipe mosi / cpsl recipe kfold-compare "
                 "(see their --help)")
    return ap.parse_args(argv)


def ensemble(a) -> None:
    import mosi_ensemble
    md, report = mosi_ensemble.ensemble_report(a.ensemble, a.kfold_variant, not a.ensemble_valid_only, a.threads)
    if a.ensemble_json:
        Path(a.ensemble_json).write_text(json.dumps(report, indent=2))
    print(md)


@bench_main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(w == "--kfold-compare" or w.startswith("--recipe") for w in argv):
        return forward(argv)
    a = parse(argv)
    if a.ensemble:
        ensemble(a)
        return 0
    from benchkit.outdir import output_dir
    a.out = str(output_dir(a.out, "mosi", a.overwrite))
    data = Path(a.data_dir)
    if not (data / "mosi" / "labels.csv").is_file():
        raise BenchError(f"the data pack is not at {data} (pass --data-dir or set CPSL_DATA_DIR)")
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    extra = [x for s in a.sets for x in ("--set", s)]
    report = {"seeds": a.seeds, "split": "valid", "machine": os.uname().machine, "nproc": os.cpu_count()}
    mosi = work / "mosi_minilm.pkl"
    if not mosi.is_file():
        run_cpsl(["data", "build-mosi", "--labels", data / "mosi/labels.csv", "--audio", data / "mosi/audio_opensmile.csv",
                  "--quiet", "--out", mosi], work / "build_mosi.log")
    rows = {"ridge on frozen mean-pooled MiniLM": ridge(mosi)}
    res, timing = run_set("mosi", mosi, [v for v in a.variants.split(",") if v], a.seeds, a.epochs, work, extra)
    rows.update(res)
    report["mosi"] = {"rows": rows, "timing": timing}
    md = ["# CMU-MOSI (standard folds; valid split, mean ± std over seeds " + a.seeds + ")", "",
          table(rows, "MOSI: MiniLM text + openSMILE audio"),
          "Wall time per epoch (2-core CPU unless stated): " +
          ", ".join(f"{k} {v['epoch_s_median']:.1f} s" for k, v in timing.items() if v["epoch_s_median"]), ""]
    if a.bclstm:
        bc = work / "bclstm.pkl"
        if not bc.is_file():
            run_cpsl(["data", "build-bclstm", "--train", data / "mosi/bclstm/train.csv", "--out", bc],
                     work / "build_bclstm.log")
        brows = {"ridge on text features": ridge(bc)}
        bres, btiming = run_set("bclstm", bc, ["frozen_none", "frozen_cpsl"], a.seeds, a.epochs, work, extra)
        brows.update(bres)
        report["bclstm"] = {"rows": brows, "timing": btiming}
        md += [table(brows, "bc-LSTM tri-modal utterance features (its own split; validation carved by video)")]
    (out / "mosi.json").write_text(json.dumps(report, indent=2))
    (out / "mosi.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
