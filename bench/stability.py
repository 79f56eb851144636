"""Before/after figure and table of training stability from finished ablation folders.

    python bench/stability.py --run BEFORE_DIR:VARIANT[:LABEL] --run AFTER_DIR:VARIANT[:LABEL] ... --out OUT

Each ``--run`` names a ``cpsl ablate`` output folder and one of its variants; writes
``OUT/stability.md`` (jitter = mean |Δ valid MAE| between consecutive epochs after epoch 3,
valid/test MAE of the selected checkpoints, best epochs, per seed) and ``OUT/valid_curves.png``
(valid MAE per epoch, every seed, one panel per run)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from benchkit.errors import BenchError, bench_main

from cpsl.ablate import plot_valid_curves, read_history, variant_dir
from cpsl.train import jitter


@bench_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="ABLATION_DIR:VARIANT[:LABEL]")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    histories, rows = {}, []
    for spec in a.run:
        d, v, *lab = spec.split(":") + [""]
        if not v:
            raise BenchError(f"--run {spec!r}: expected ABLATION_DIR:VARIANT[:LABEL]")
        label = lab[0] or v
        f = Path(d) / variant_dir(v) / "results.json"
        if not f.is_file():
            raise BenchError(f"--run {spec!r}: {f} not found (a finished cpsl ablate folder and one of its variants)")
        res = json.loads(f.read_text())
        hs = [read_history(Path(d) / variant_dir(v) / f"seed{s}") for s in res["seeds"]]
        histories[label] = hs
        j = [jitter([h["valid"]["MAE"] for h in hh]) for hh in hs]
        va = res["valid"]["MAE"]["values"]
        te = res["test"]["MAE"]["values"] if "test" in res else []
        rows.append((label, res["seeds"], j, va, te, [r["best_epoch"] for r in res["per_seed"]]))
    plot_valid_curves(histories, out / "valid_curves.png")
    f = lambda xs: f"{np.mean(xs):.4f} ± {np.std(xs):.4f}" if xs else ""  # noqa: E731
    lines = ["| run | seeds | jitter (mean ± std) | per seed | valid MAE | per seed | test MAE | best epochs |",
             "|---|---|---|---|---|---|---|---|"]
    for label, seeds, j, va, te, be in rows:
        lines.append(f"| {label} | {','.join(map(str, seeds))} | {f(j)} | {', '.join(f'{x:.4f}' for x in j)} | {f(va)} | "
                     f"{', '.join(f'{x:.4f}' for x in va)} | {f(te)} | {', '.join(map(str, be))} |")
    (out / "stability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
