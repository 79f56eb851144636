#!/usr/bin/env python3
"""Write a copy of an MMSA pickle with ONE feature value replaced (the issue-18 robustness check).

    python scripts/poison_one_value.py clean.pkl poisoned.pkl --split train --modality audio \
        --index 100,5,3 --value 1e30

Then train on both with the same seed and compare (``cpsl train ... --seeds 1``): the poisoned
run must finish with finite weights, valid metrics close to the clean run's, and report the
skipped steps (log.jsonl ``skipped_steps``, results.json ``skipped_steps``).
"""
from __future__ import annotations

import argparse
import sys

from cpsl.data.mmsa import load_mmsa, save_mmsa
from cpsl.errors import CPSLError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--split", default="train")
    ap.add_argument("--modality", default="audio")
    ap.add_argument("--index", default="100,5,3", help="item,step,feature")
    ap.add_argument("--value", type=float, default=1e30)
    a = ap.parse_args(argv)
    try:
        d = load_mmsa(a.src)
        x = d[a.split].features.get(a.modality)
        if x is None:
            raise CPSLError(f"{a.src} has no {a.modality} features")
        idx = tuple(int(v) for v in a.index.split(","))
        if len(idx) != 3 or any(not 0 <= i < n for i, n in zip(idx, x.shape)):
            raise CPSLError(f"--index must be item,step,feature within {x.shape}, got {a.index}")
        x[idx] = a.value
        save_mmsa(d, a.dst)
    except (CPSLError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.dst}: {a.split}/{a.modality}{list(idx)} = {a.value:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
