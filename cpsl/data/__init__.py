"""Data: the MMSA pickle format, the embedded synthetic generator, real-data builders, batching."""
from __future__ import annotations

import numpy as np

from ..errors import CPSLError
from .mmsa import MMSAData, Split, load_mmsa, save_mmsa
from . import unimodal_bias
from .synthetic import SynthSpec, generate
from .unimodal_bias import UnimodalBiasSpec

__all__ = ["MMSAData", "Split", "load_mmsa", "save_mmsa", "SynthSpec", "UnimodalBiasSpec", "generate",
           "load_data", "describe", "FAMILIES"]

# the embedded generators: family name -> (spec class, generate(spec) -> MMSAData)
FAMILIES = {"default": (SynthSpec, generate), "unimodal_bias": (UnimodalBiasSpec, unimodal_bias.generate)}


def family_spec(family: str, seed: int = 0):
    """A fresh spec of a generator family (``default``: the MOSI-like data; ``unimodal_bias``)."""
    if family not in FAMILIES:
        raise CPSLError(f"unknown synthetic family {family!r} (choose from: {', '.join(FAMILIES)})")
    return FAMILIES[family][0](seed=int(seed))


def synth_spec_from_args(seed=0, imbalance=None, text_memo=None, av_noise=None, sizes=None, knobs=(),
                         family: str = "default"):
    spec = family_spec(family, seed)
    for k, v in (("imbalance", imbalance), ("text_memo", text_memo), ("av_noise", av_noise)):
        if v is not None:
            if not hasattr(spec, k):
                raise CPSLError(f"--{k.replace('_', '-')} is a knob of the default family, not of {family!r}")
            setattr(spec, k, float(v))
    if sizes:
        try:
            a, b, c = (int(x) for x in str(sizes).split(","))
        except ValueError:
            raise CPSLError(f"--sizes must be three integers like 1284,229,686, got {sizes!r}") from None
        spec.n_train, spec.n_valid, spec.n_test = a, b, c
    pairs = {}
    for kv in knobs:
        if "=" not in kv:
            raise CPSLError(f"synthetic knob {kv!r} must look like name=value")
        k, v = kv.split("=", 1)
        pairs[k] = v
    # all at once, checked once: --set dims=30,30,30 --set variances=4,2,1 in either order
    return set_knobs(spec, pairs) if pairs else spec


def set_knobs(spec, knobs: dict, where: str = ""):
    """Override a family spec's knobs in place (values as given, or strings like ``"3,9"`` for tuples):
    the one place every synthetic-knob override goes through (--set of cpsl data synth, data.synth)."""
    for k, v in knobs.items():
        if not hasattr(spec, k):
            raise CPSLError(f"unknown synthetic knob {k!r}{where} (known: {', '.join(spec.to_dict())})")
        cur = getattr(spec, k)
        try:
            if isinstance(cur, tuple):
                kind = float if cur and isinstance(cur[0], float) else int    # (8, 40) or (3.0, 1.0)
                v = tuple(kind(x) for x in (v.split(",") if isinstance(v, str) else v))
            setattr(spec, k, v if isinstance(cur, tuple) else type(cur)(v))
        except (TypeError, ValueError, OverflowError):
            raise CPSLError(f"synthetic knob {k}{where}: bad value {v!r}") from None
    spec.check()
    return spec


def load_data(path: str, synth_seed: int = 0, synth: dict | None = None, trust_pickle: bool = False) -> MMSAData:
    """``'synth'`` (or ``'synth:SEED'``) gives the embedded generator (``synth``: knob overrides);
    anything else is an MMSA pickle, read without executing code unless ``trust_pickle`` (unsafe)."""
    if path == "synth" or str(path).startswith("synth:"):
        try:
            seed = int(str(path).split(":", 1)[1]) if ":" in str(path) else synth_seed
            if not 0 <= seed <= 2**32 - 1:
                raise ValueError
        except ValueError:
            raise CPSLError(f"bad synthetic data spec {path!r} (use synth or synth:SEED with 0 <= SEED < 2**32)") from None
        knobs = dict(synth or {})
        family = str(knobs.pop("family", "default"))
        spec = set_knobs(family_spec(family, seed), knobs, " in data.synth")
        return FAMILIES[family][1](spec)
    return load_mmsa(path, trust_pickle=trust_pickle)


def describe(d: MMSAData) -> dict:
    out = {"path": d.path, "modalities": list(d.modalities), "dims": d.dims, "cleaned": d.cleaned,
           "extreme": d.extreme, "warnings": d.warnings(), "splits": {}}
    for name, s in d.splits.items():
        y = s.labels
        sd = {"n": len(s), "labels": {
            "mean": float(y.mean()) if len(y) else 0.0, "std": float(y.std()) if len(y) else 0.0,
            "min": float(y.min()) if len(y) else 0.0, "max": float(y.max()) if len(y) else 0.0,
            "zeros": int((y == 0).sum()), "positive": int((y > 0).sum())}, "modalities": {}}
        for m in d.modalities:
            ln = s.lengths[m]
            sd["modalities"][m] = {"shape": list(s.features[m].shape), "lengths": {
                "min": int(ln.min()) if len(ln) else 0, "mean": float(ln.mean()) if len(ln) else 0.0,
                "max": int(ln.max()) if len(ln) else 0}}
        if s.text_bert is not None:
            sd["text_bert"] = list(s.text_bert.shape)
        out["splits"][name] = sd
    return out
