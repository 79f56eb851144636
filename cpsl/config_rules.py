"""The rule builders of config values, :func:`coerce` (a file's or ``--set``'s value as the key's
type) and :func:`check`, which applies the rules.

A config key declares its rule once, beside its default, in the ``check`` metadata of its field
(``cpsl/config.py``, or a plug-in strategy's own section): ``field(default=1.2,
metadata={"check": number(0.0, lo_open=True)})``; a string key declares ``choices`` instead. A
rule takes the value and returns ``None`` (fine) or what the value must be. :func:`check` raises
:class:`CPSLError` with one line that names the key (``section.key``). ``cpsl.config.validate``
calls it once per config that enters a run (presets, config files, ``--set`` overrides and
checkpoint configs all pass through it).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from typing import Any

from .errors import CPSLError
from .limits import gib, limit

INF = math.inf
MAX_SEED = 2**32 - 1            # what every generator (Python, NumPy, torch) takes
MAX_WIDTH = 1 << 16             # model.d, head_hidden: beyond any model this package builds
MAX_LAYERS = 256


def integer(lo=-INF, hi=INF, odd=False):
    """An integer in [lo, hi] (odd: and odd)."""
    def chk(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return "an integer"
        if not lo <= v <= hi or (odd and v % 2 == 0):
            return _range("an" + (" odd" if odd else "") + " integer", lo, hi)
        return None
    return chk


def number(lo=-INF, hi=INF, lo_open=False, hi_open=False):
    """A finite number in the interval from lo to hi (each end closed unless ``*_open``)."""
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


def coerce(value: Any, current: Any, key: str) -> Any:
    """``value`` (from a file or ``--set``) as the type of the field's current value, or CPSLError naming ``key``."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise CPSLError(f"config key {key}: expected true/false, got {value!r}")
    if isinstance(current, (int, float)) and isinstance(value, bool):
        raise CPSLError(f"config key {key}: expected a number, got {value!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        try:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        except (TypeError, ValueError, OverflowError):
            raise CPSLError(f"config key {key}: expected an integer, got {value!r}") from None
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise CPSLError(f"config key {key}: expected a number, got {value!r}") from None
    if isinstance(current, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
            try:
                return [int(v) for v in value]
            except ValueError:
                return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [value]            # train.seeds=7 -> [7]
        if not isinstance(value, (list, tuple)):
            raise CPSLError(f"config key {key}: expected a list, got {value!r}")
        return list(value)
    if isinstance(current, dict):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise CPSLError(f"config key {key}: expected a JSON mapping, got {value!r}") from None
        if not isinstance(value, dict):
            raise CPSLError(f"config key {key}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(current, str):
        return str(value)
    return value


def _type(t, name):
    return lambda v: None if isinstance(v, t) else name


def seeds(v):
    if not isinstance(v, list) or not v:
        return "a non-empty list of integers (e.g. 1,2,3)"
    if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED for s in v):
        return f"a list of integers in [0, {MAX_SEED}] (e.g. 1,2,3)"
    if len(set(v)) != len(v):
        return "a list of distinct seeds"
    return None


def device(v):
    if isinstance(v, str) and re.fullmatch(r"cpu|cuda(:\d+)?", v):
        return None
    return "cpu, cuda or cuda:N"


BOOL, STR, MAPPING = _type(bool, "true or false"), _type(str, "a string"), _type(dict, "a mapping")
NONNEG = number(0.0)
FRACTION = number(0.0, 1.0)                       # [0, 1]
DECAY = number(0.0, 1.0, hi_open=True)            # [0, 1): an EMA's β


def check(cfg, sections: list) -> None:
    """Raise :class:`CPSLError` naming the first config value outside its rule. ``sections``:
    ``[(name, section object), ...]`` of ``cfg`` (``cpsl.config.sections``); each field's rule is
    its ``choices`` or ``check`` metadata, and ``at_least`` names a key of the same section it
    must not be below."""
    for name, obj in sections:
        for f in fields(obj):
            key, v, meta = f"{name}.{f.name}", getattr(obj, f.name), f.metadata
            if "choices" in meta:
                if v not in meta["choices"]:
                    raise CPSLError(f"config key {key}: {v!r} is not one of {', '.join(meta['choices'])}")
                continue
            why = meta["check"](v) if "check" in meta else None
            if why:
                raise CPSLError(f"config key {key} must be {why}, got {v!r}")
    _together(cfg)
    for name, obj in sections:
        for f in fields(obj):
            other = f.metadata.get("at_least")
            if other and getattr(obj, f.name) < getattr(obj, other):
                raise CPSLError(f"config key {name}.{f.name} ({getattr(obj, f.name)}) must be >= "
                                f"{name}.{other} ({getattr(obj, other)})")


def _together(cfg) -> None:
    """The rules that tie keys of the core sections together."""
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
