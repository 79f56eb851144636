"""The imbalance benchmark (issue 13): every strategy on every imbalance cell, one command.

    python bench/balance.py --out OUT [--cells synth_sc0,...,mosi_ft] [--variants none,cp,...]
        [--define NAME 'overrides' ...] [--seeds 1,2,3,4,5] [--preset student|default] [--jobs 2]
        [--threads 1] [--epochs N] [--data-dir ../shared/data] [--kfold 5] [--set k=v ...] [--quick]

Cells (``CELLS``): the text-shortcut family ``synth_sc<X>`` (``text_shortcut = X``), the slow-audio
family ``synth_slow`` (``audio_xor = 1``: audio is learnt late, not out-competed by a shortcut), and
MOSI from the data pack with frozen MiniLM states (``mosi_frozen``) or MiniLM fine-tuned end to end
(``mosi_ft``, the text lr of configs/mosi_best.yaml). Each cell's folder ``OUT/<cell>/`` is exactly
a ``cpsl ablate --out`` folder (``--reference none --quiet``, run as a subprocess; its log is
``OUT/<cell>.log``); a cell whose ``ablation.json`` has the same variants (or more) and seeds is skipped, so a
stopped run resumes cell by cell (a cell stopped part-way is rerun whole, ``--overwrite``); a
finished cell made with other settings (data, preset, epochs, ``--set``, ``--define``) is an
error naming the differing keys, never reused or overwritten.
``--kfold K`` adds, for the MOSI cells (or those of ``--kfold-cells``), the video-grouped K-fold
over train + valid (never test rows): fold pickles in the recipe's cache, ablations in ``OUT/<cell>/kfold/fold<i>/``, paired
differences over (fold, seed) pairs of the fold-valid MAE.

Writes ``OUT/balance.json``, ``OUT/balance.md`` (per cell × variant: MAE mean ± std, the paired ΔMAE
to ``none`` with its 95 % t-interval, the weak modalities' unimodal-head MAE, the Shapley
contribution per modality; the machine and the exact command) and ``OUT/balance.png``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from benchkit.errors import BenchError, bench_main

from cpsl.kfold import GROUPING, fold_pickles
from cpsl.proc import run_cpsl
from cpsl.recipes.mosi import CONFIGS, default_cache, load_yaml, mosi_pickle as recipe_pickle

ROOT = Path(__file__).resolve().parent.parent

SYNTH = {"synth_sc0": {"text_shortcut": 0}, "synth_sc0.5": {"text_shortcut": 0.5},
         "synth_sc1": {"text_shortcut": 1}, "synth_sc2": {"text_shortcut": 2}, "synth_slow": {"audio_xor": 1}}
MOSI = ("mosi_frozen", "mosi_ft")
CELLS = (*SYNTH, *MOSI)
VARIANTS = "none,cp,ogm_ge,cggm,ags,mmpareto,inforeg,moddrop,full,-SL"
QUICK_SYNTH = {"n_train": 64, "n_valid": 24, "n_test": 24}
QUICK_MOSI = (96, 32)               # train / valid rows of the MOSI cut of --quick


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (one cpsl-ablate folder per cell + balance.*)")
    ap.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated cells of {', '.join(CELLS)}")
    ap.add_argument("--variants", default=VARIANTS, help="comma-separated cpsl ablate variants (none is added: the reference)")
    ap.add_argument("--define", nargs=2, action="append", default=[], metavar=("NAME", "OVERRIDES"),
                    help="an extra variant, as cpsl ablate --define (repeatable; appended to --variants)")
    ap.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated seeds (paired across variants)")
    ap.add_argument("--preset", default="student", choices=("student", "default", "teacher"),
                    help="cpsl preset (default = teacher: the default model)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel variant × seed processes inside each cell")
    ap.add_argument("--threads", type=int, default=1, help="train.num_threads of each run (and OMP/MKL threads)")
    ap.add_argument("--epochs", type=int, help="max epochs (default: the preset's)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                    help="the data pack (MOSI cells need DIR/mosi/labels.csv + audio_opensmile.csv)")
    ap.add_argument("--cache", help="MOSI pickles and folds (default: the MOSI recipe's cache, cpsl recipe mosi)")
    ap.add_argument("--kfold", type=int, default=0, help="MOSI cells: also the video-grouped K-fold over train+valid")
    ap.add_argument("--kfold-cells", help="with --kfold: only these MOSI cells get the k-fold (default: every MOSI cell "
                                          "in --cells), e.g. mosi_frozen where mosi_ft's k-fold is too costly")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="a config override for every run (repeatable)")
    ap.add_argument("--cost-steps", type=int, default=0, help="cpsl ablate --cost-steps (isolated step timing; 0: skip)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: seeds 1,2, 2 epochs, synthetic sizes {QUICK_SYNTH}, a MOSI cut of {QUICK_MOSI} rows")
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds, a.epochs = "1,2", a.epochs or 2
    a.cells = [c.strip() for c in a.cells.split(",") if c.strip()]
    bad = [c for c in a.cells if c not in CELLS]
    if bad:
        raise BenchError(f"unknown cell(s) {', '.join(bad)} (known: {', '.join(CELLS)})")
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    names += [n for n, _ in a.define if n not in names]
    a.names = (["none"] if "none" not in names else []) + names
    try:
        a.seed_list = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise BenchError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if a.kfold and a.kfold < 2:
        raise BenchError(f"--kfold must be >= 2 (or 0: off), got {a.kfold}")
    mosi_cells = [c for c in a.cells if c not in SYNTH]
    if a.kfold_cells is None:
        a.kfold_cells = mosi_cells if a.kfold else []
    else:
        if not a.kfold:
            raise BenchError("--kfold-cells needs --kfold K")
        a.kfold_cells = [c.strip() for c in a.kfold_cells.split(",") if c.strip()]
        bad = [c for c in a.kfold_cells if c not in mosi_cells]
        if bad:
            raise BenchError(f"--kfold-cells: {', '.join(bad)} not among the MOSI cells of --cells "
                               f"({', '.join(mosi_cells) or 'none'})")
    return a


def ablate_args(a, data: str, out: Path, extra_sets=()) -> list[str]:
    """The ``cpsl ablate`` command line of one cell (or fold)."""
    preset = "teacher" if a.preset == "default" else a.preset
    args = ["ablate", "--data", data, "--out", str(out), "--preset", preset, "--seeds", a.seeds,
            "--variants", ",".join(a.names), "--reference", "none", "--quiet", "--jobs", str(a.jobs),
            "--cost-steps", str(a.cost_steps), "--set", f"train.num_threads={a.threads}"]
    if a.epochs:
        args += ["--epochs", str(a.epochs)]
    for name, sets in a.define:
        args += ["--define", name, sets]
    for s in [*extra_sets, *a.sets]:
        args += ["--set", s]
    return args


def cell_differences(out: Path, a, data: str, extra_sets=()) -> list[str]:
    """Where OUT's finished ablation differs from what this command would run: its data, and per
    requested variant its ``config.json`` against the config this command builds (preset, --epochs,
    --set, --define, the cell's own overrides), by :func:`cpsl.runs.kept_run_differences`."""
    from cpsl.ablate import variant_config, variant_dir
    from cpsl.config import build_config, parse_overrides
    from cpsl.runs import kept_run_differences
    s = json.loads((out / "ablation.json").read_text())
    diffs = [] if s.get("data") == data else [f"data = {s.get('data')!r} (this command: {data!r})"]
    preset = "teacher" if a.preset == "default" else a.preset
    base = build_config(preset, None, [*extra_sets, *a.sets, *([f"train.epochs={a.epochs}"] if a.epochs else [])])
    defined = {name: parse_overrides(sets.split()) for name, sets in a.define}
    for n in a.names:
        p = out / variant_dir(n) / "config.json"
        if not p.is_file():
            diffs.append(f"{n}: no config.json")
            continue
        diff, unrecorded = kept_run_differences(json.loads(p.read_text()), variant_config(base, n, defined))
        diffs += [f"{n}: {d}" for d in diff]
        if unrecorded:
            log(f"note: {p} predates the config keys {', '.join(unrecorded)} (not compared)")
    return diffs


def finished(out: Path, a, data: str, extra_sets=()) -> bool:
    """OUT holds a finished ablation of the same variants, seeds, data and settings. One with the
    same variants and seeds but other settings (preset, epochs, --set, ...) is an error, not
    silently reused or overwritten: it may be hours of work."""
    p = out / "ablation.json"
    if not p.is_file():
        return False
    s = json.loads(p.read_text())
    # a superset of the requested variants counts as finished: cells run with more variants (e.g. the
    # CP candidates on the shortcut cell) are reused and reported whole
    if not (set(a.names) <= set(s.get("variants", {})) and [int(x) for x in s.get("seeds", [])] == a.seed_list):
        return False
    diffs = cell_differences(out, a, data, extra_sets)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise BenchError(f"{out} holds a finished ablation made with other settings: {'; '.join(diffs[:3])}{more}; "
                         f"rerun with those settings, or use another --out")
    return True


def run_ablate(a, data: str, out: Path, extra_sets=()) -> str:
    """Run one ablation unless finished; 'skipped' or 'ran'. Its log: ``OUT/../<name>.log``."""
    if finished(out, a, data, extra_sets):
        return "skipped"
    args = ablate_args(a, data, out, extra_sets) + (["--overwrite"] if out.exists() else [])
    run_cpsl(args, out.parent / f"{out.name}.log", quiet=True, threads=a.threads)
    return "ran"


def synth_sets(a, cell: str) -> list[str]:
    knobs = dict(SYNTH[cell], **(QUICK_SYNTH if a.quick else {}))
    return [f"data.synth={json.dumps(knobs)}"]


def mosi_sets(cell: str) -> list[str]:
    """mosi_frozen: the default model on the frozen MiniLM states; mosi_ft: MiniLM fine-tuned end to
    end with the text lr of configs/mosi_best.yaml."""
    if cell == "mosi_frozen":
        return []
    best = load_yaml(CONFIGS / "mosi_best.yaml")
    return ["model.text_encoder=minilm", "model.finetune_text=true", f"train.text_lr={best['train']['text_lr']}"]


def mosi_missing(data_dir: Path) -> str | None:
    for p in (data_dir / "mosi" / "labels.csv", data_dir / "mosi" / "audio_opensmile.csv"):
        if not p.is_file():
            return f"{p} not found (MOSI cells need the data pack; --data-dir)"
    return None


def mosi_pickle(a, cache: Path) -> Path:
    """The recipe's cached MOSI pickle (built once from --data-dir); with --quick a small cut of it."""
    pkl = recipe_pickle(a.data_dir, cache, a.threads)
    if not a.quick:
        return pkl
    cut = cache / f"{pkl.stem}_cut{QUICK_MOSI[0]}_{QUICK_MOSI[1]}.pkl"
    if not cut.is_file():
        from cpsl.data.mmsa import load_mmsa, save_mmsa
        save_mmsa(cut_data(load_mmsa(pkl, require_splits=("train", "valid")), *QUICK_MOSI), cut)
    return cut


def cut_data(data, n_train: int, n_valid: int):
    """The first rows of train and valid (MOSI's rows are ordered by video, so whole videos mostly)."""
    from cpsl.data.mmsa import MMSAData, Split

    def take(s, n):
        return Split(s.name, {m: x[:n] for m, x in s.features.items()}, {m: x[:n] for m, x in s.lengths.items()},
                     s.labels[:n], s.ids[:n], s.raw_text[:n], None if s.text_bert is None else s.text_bert[:n])
    splits = {"train": take(data["train"], n_train), "valid": take(data["valid"], n_valid),
              "test": take(data["test"], 0) if "test" in data.splits else take(data["valid"], 0)}
    return MMSAData(splits, data.modalities, path=f"{data.path}#cut{n_train}_{n_valid}", meta=dict(data.meta))


def run_cell(a, cell: str, out: Path, cache: Path) -> dict:
    if cell in SYNTH:
        return {"status": run_ablate(a, "synth", out / cell, synth_sets(a, cell)), "kind": "synth",
                "knobs": SYNTH[cell]}
    missing = mosi_missing(Path(a.data_dir))
    if missing:
        return {"status": "unavailable", "kind": "mosi", "reason": missing}
    pkl = mosi_pickle(a, cache)
    rec = {"status": run_ablate(a, str(pkl), out / cell, mosi_sets(cell)), "kind": "mosi", "pickle": str(pkl)}
    if cell in a.kfold_cells:
        paths = fold_pickles(pkl, a.kfold, cache)
        for i, p in enumerate(paths):
            log(f"{cell}: fold {i + 1}/{a.kfold}")
            run_ablate(a, str(p), out / cell / "kfold" / f"fold{i}", mosi_sets(cell))
        rec["kfold"] = {"k": a.kfold, "folds": [str(p) for p in paths], "grouping": GROUPING}
    return rec


def log(msg: str) -> None:
    print(f"[balance] {msg}", flush=True)


@bench_main
def main(argv=None) -> int:
    a = parse(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(a.cache) if a.cache else default_cache()
    cells = {}
    for cell in a.cells:
        t0 = time.time()
        log(f"{cell}: started")
        rec = run_cell(a, cell, out, cache)
        rec["wall_s"] = time.time() - t0
        if rec["status"] == "unavailable":
            log(f"{cell}: skipped: {rec['reason']}")
        else:
            log(f"{cell}: finished ({rec['status']}) in {rec['wall_s']:.0f} s")
        cells[cell] = rec
    from balance_report import write_report
    command = "python bench/balance.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_report(out, cells, a.names, command)
    log(f"wrote {out / 'balance.md'}, balance.json and balance.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
