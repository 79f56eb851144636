"""Every config value's type, range or choices, checked in one place.

:func:`check` raises :class:`CPSLError` with one line that names the key (``section.key``) and
says what it must be. ``cpsl.config.validate`` calls it after every merge, so presets, config
files, ``--set`` overrides and checkpoint configs all pass through the same rules.
"""
from __future__ import annotations

import math
import re
from dataclasses import fields

from .errors import CPSLError
from .limits import gib, limit

INF = math.inf
MAX_SEED = 2**32 - 1            # what every generator (Python, NumPy, torch) takes
MAX_WIDTH = 1 << 16             # model.d, head_hidden: beyond any model this package builds
MAX_LAYERS = 256


def _int(lo=-INF, hi=INF, odd=False):
    def chk(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return "an integer"
        if not lo <= v <= hi or (odd and v % 2 == 0):
            return _range("an" + (" odd" if odd else "") + " integer", lo, hi)
        return None
    return chk


def _float(lo=-INF, hi=INF, lo_open=False, hi_open=False):
    def chk(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return "a finite number"
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            return _range("a number", lo, hi, lo_open, hi_open)
        return None
    return chk


def _range(what, lo, hi, lo_open=False, hi_open=False) -> str:
    lo_s, hi_s = (str(x) if isinstance(x, int) else f"{x:g}" for x in (lo, hi))
    if hi == INF:
        return f"{what} {'>' if lo_open else '>='} {lo_s}"
    if lo == -INF:
        return f"{what} {'<' if hi_open else '<='} {hi_s}"
    return f"{what} in {'(' if lo_open else '['}{lo_s}, {hi_s}{')' if hi_open else ']'}"


def _type(t, name):
    return lambda v: None if isinstance(v, t) else name


def _seeds(v):
    if not isinstance(v, list) or not v:
        return "a non-empty list of integers (e.g. 1,2,3)"
    if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED for s in v):
        return f"a list of integers in [0, {MAX_SEED}] (e.g. 1,2,3)"
    if len(set(v)) != len(v):
        return "a list of distinct seeds"
    return None


def _device(v):
    if isinstance(v, str) and re.fullmatch(r"cpu|cuda(:\d+)?", v):
        return None
    return "cpu, cuda or cuda:N"


_BOOL, _STR, _DICT = _type(bool, "true or false"), _type(str, "a string"), _type(dict, "a mapping")
_NONNEG = _float(0.0)

RULES = {
    "data": {"path": _STR, "batch_size": _int(0), "eval_batch_size": _int(1), "bucket": _int(0),
             "synth_seed": _int(0, MAX_SEED), "synth": _DICT},
    "model": {"d": _int(1, MAX_WIDTH), "heads": _int(1, MAX_WIDTH), "dropout": _float(0.0, 1.0, hi_open=True),
              "text_layers": _int(0, MAX_LAYERS), "audio_layers": _int(0, MAX_LAYERS),
              "vision_layers": _int(0, MAX_LAYERS),
              "text_kernel": _int(1, odd=True), "audio_kernel": _int(1, odd=True), "vision_kernel": _int(1, odd=True),
              "norm_momentum": _float(0.0, 1.0), "max_len": _int(1, 1 << 24), "ame": _BOOL,
              "head_hidden": _int(0, MAX_WIDTH),
              "text_encoder": _STR, "finetune_text": _BOOL, "linear_width": _int(1, MAX_WIDTH),
              "linear_depth": _int(1, MAX_LAYERS), "fusion_layer": _int(0, MAX_LAYERS), "init_std": _float(0.0, lo_open=True)},
    "loss": {"aux": _NONNEG, "rec": _NONNEG, "sl": _NONNEG, "div": _NONNEG, "sl_out": _NONNEG,
             "warmup_epochs": _int(0), "eps": _float(0.0, lo_open=True)},
    "cp": {"tau": _float(0.0, lo_open=True), "alpha": _NONNEG, "k_min": _float(0.0, 1.0), "beta": _float(0.0, 1.0),
           "normalize": _BOOL, "start_epoch": _int(0), "ramp_epochs": _int(0), "end_epoch": _int(0),
           "ge_noise": _NONNEG, "diagnostics": _BOOL, "groups": _DICT,
           "signal_beta": _float(0.0, 1.0, hi_open=True), "stop_patience": _int(1), "stop_delta": _NONNEG},
    # the strategies' sections (cpsl/strategies/; train.modulation is checked against their registry)
    "ogm_ge": {"alpha": _NONNEG, "ge": _BOOL},
    "cggm": {"rho": _NONNEG, "lam": _NONNEG, "ema": _float(0.0, 1.0, hi_open=True)},
    "ags": {"alpha": _NONNEG, "end_epoch": _int(0)},
    "mmpareto": {"gamma": _float(0.0, lo_open=True), "uni_weight": _NONNEG},
    "inforeg": {"beta": _NONNEG, "threshold": _float(), "horizon": _int(1)},
    "moddrop": {"p": _float(0.0, 1.0), "p_dominant": _float(0.0, 1.0), "ema": _float(0.0, 1.0, hi_open=True)},
    "train": {"epochs": _int(1), "patience": _int(1), "lr": _float(0.0, lo_open=True), "text_lr": _NONNEG,
              "weight_decay": _NONNEG, "clip": _NONNEG, "seeds": _seeds, "device": _device,
              "num_threads": _int(0, 1024), "progress": _BOOL, "modulation": _STR, "skip_limit": _int(1), "tensorboard": _BOOL,
              "warmup_epochs": _NONNEG, "lr_horizon": _float(0.0, lo_open=True), "lr_min": _float(0.0, 1.0),
              "ema": _float(0.0, 1.0, hi_open=True), "eval_every": _int(1)},
}


def check(cfg, choices: dict) -> None:
    """Raise :class:`CPSLError` naming the first config value outside its rule (``choices``:
    ``{(section, key): allowed values}``, declared on the config fields)."""
    for sec in fields(cfg):
        obj = getattr(cfg, sec.name)
        for f in fields(obj):
            key, v = f"{sec.name}.{f.name}", getattr(obj, f.name)
            if (sec.name, f.name) in choices:
                ok = choices[(sec.name, f.name)]
                if v not in ok:
                    raise CPSLError(f"config key {key}: {v!r} is not one of {', '.join(ok)}")
                continue
            rule = RULES.get(sec.name, {}).get(f.name)
            why = rule(v) if rule else None
            if why:
                raise CPSLError(f"config key {key} must be {why}, got {v!r}")
    m = cfg.model
    _memory(m)
    if m.d % m.heads:
        raise CPSLError(f"config: model.d ({m.d}) must be divisible by model.heads ({m.heads})")
    if cfg.train.lr_schedule == "cosine" and cfg.train.lr_horizon <= cfg.train.warmup_epochs:
        raise CPSLError(f"config key train.lr_horizon ({cfg.train.lr_horizon:g}) must be > train.warmup_epochs "
                        f"({cfg.train.warmup_epochs:g})")
    if cfg.train.amp == "fp16" and not cfg.train.device.startswith("cuda"):
        raise CPSLError("config key train.amp: fp16 needs train.device=cuda (loss scaling on the GPU); "
                        "use bf16 or off on the CPU")
    if m.arch == "linear":
        if m.fusion_layer > m.linear_depth:
            raise CPSLError(f"config key model.fusion_layer ({m.fusion_layer}) must be <= model.linear_depth "
                            f"({m.linear_depth})")
        extra = [k for k in ("rec", "sl", "div") if getattr(cfg.loss, k) > 0]
        if extra:
            raise CPSLError(f"config: model.arch=linear has no decoders or statistics heads; set "
                            f"{', '.join(f'loss.{k}=0' for k in extra)}")
        if m.text_encoder:
            raise CPSLError("config: model.arch=linear reads feature vectors; model.text_encoder must be empty")
    if cfg.cp.end_epoch < cfg.cp.start_epoch:
        raise CPSLError(f"config key cp.end_epoch ({cfg.cp.end_epoch}) must be >= cp.start_epoch ({cfg.cp.start_epoch})")


def _memory(m) -> None:
    """Refuse a model whose weights and optimizer state (about 16 bytes a parameter: weight, gradient, two
    Adam moments; per modality (layers + 2) x 12 d^2 parameters and a max_len x d positional table) exceed
    ``CPSL_MAX_ARRAY_BYTES``, before anything is allocated."""
    cap = limit("CPSL_MAX_ARRAY_BYTES")
    d, hh = m.d, max(m.head_hidden, m.d)
    params = sum(12 * d * d * (n + 2) + m.max_len * d for n in (m.text_layers, m.audio_layers, m.vision_layers))
    need = 16 * (params + 4 * d * hh)
    if need > cap:
        raise CPSLError(f"config: model.d={m.d}, its layers and model.max_len={m.max_len} need about {gib(need)} for "
                        f"the weights and optimizer state, beyond the limit CPSL_MAX_ARRAY_BYTES={gib(cap)} "
                        "(set the environment variable to allow more)")
