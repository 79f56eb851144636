"""A small built-in text set for the quickstart: template sentences about films with a rule-made label.

It exists so that a first run can end with a prediction from raw text in under a minute without any
download. It is a toy: sentences are drawn from a few templates over a word list whose valence is
fixed here, and the label is a rule over those words (intensifiers scale, negation flips and damps),
clipped to MOSI's range [-3, 3]. A model trained on it learns that rule and nothing about real
speech; it is not a benchmark.

The rows have the columns of a MOSI/MOSEI ``labels.csv`` (video_id, clip_id, text, label, mode), so
:func:`cpsl.data.builders.build_mosei` turns them into an MMSA pickle (text only: frozen encoder
states plus ``text_bert`` token ids).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .mmsa import SPLITS

VALENCE = {  # word -> valence in [-3, 3]
    "wonderful": 2.6, "brilliant": 2.8, "moving": 2.0, "great": 2.4, "charming": 1.8, "funny": 1.6,
    "good": 1.4, "decent": 0.8, "fine": 0.6, "clever": 1.6, "beautiful": 2.2, "gripping": 2.0,
    "okay": 0.2, "predictable": -0.8, "slow": -1.0, "forgettable": -1.2, "bland": -1.4, "dull": -1.8,
    "boring": -2.0, "awful": -2.6, "terrible": -2.8, "painful": -2.2, "confusing": -1.4, "weak": -1.2,
}
INTENSIFIERS = {"": 1.0, "really ": 1.4, "very ": 1.4, "quite ": 1.15, "a bit ": 0.6, "somewhat ": 0.7}
SUBJECTS = ("the movie", "the film", "the acting", "the plot", "the ending", "the soundtrack", "the script",
            "this story", "the dialogue", "the cast")
TEMPLATES = ("{s} was {i}{a}", "i thought {s} was {i}{a}", "honestly, {s} is {i}{a}", "{s} felt {i}{a}",
             "{s} was not {i}{a}", "i would not call {s} {i}{a}", "{s} was {i}{a} but {s2} was {i2}{a2}")
SIZES = (600, 150, 150)


def _sentence(rng: np.random.Generator) -> tuple[str, float]:
    words = list(VALENCE)
    t = TEMPLATES[rng.integers(len(TEMPLATES))]
    s, s2 = (SUBJECTS[k] for k in rng.choice(len(SUBJECTS), 2, replace=False))
    a, a2 = (words[k] for k in rng.integers(len(words), size=2))
    i, i2 = (list(INTENSIFIERS)[k] for k in rng.integers(len(INTENSIFIERS), size=2))
    v = VALENCE[a] * INTENSIFIERS[i]
    if " not " in t:
        v = -0.5 * v                                   # "not great" is mildly negative, not awful
    if "{a2}" in t:
        v = 0.35 * v + 0.65 * VALENCE[a2] * INTENSIFIERS[i2]   # after "but" weighs more
    return t.format(s=s, s2=s2, a=a, a2=a2, i=i, i2=i2), float(np.clip(round(v, 1), -3.0, 3.0))


def rows(seed: int = 0, sizes=SIZES) -> list[dict]:
    """``sum(sizes)`` rows with the labels.csv columns; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    out = []
    for mode, n in zip(SPLITS, sizes):
        for k in range(int(n)):
            text, label = _sentence(rng)
            out.append({"video_id": f"{mode}{k // 10:03d}", "clip_id": str(k % 10), "text": text,
                        "label": f"{label:.1f}", "mode": mode})
    return out


def write_csv(path, seed: int = 0, sizes=SIZES) -> Path:
    """Write the rows as a labels.csv (the input of ``cpsl data build-mosei``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["video_id", "clip_id", "text", "label", "mode"])
        w.writeheader()
        w.writerows(rows(seed, sizes))
    return path
