"""Dataclass configs with the defaults of docs/method.md, presets, YAML/JSON load/save and
``section.key=value`` overrides. Unknown keys are errors that name the key."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .config_rules import BOOL, DECAY, FRACTION, MAPPING, MAX_LAYERS, MAX_SEED, MAX_WIDTH, NONNEG, STR
from .config_rules import check as _check
from .config_rules import coerce as _coerce
from .config_rules import device, integer, number, seeds
from .errors import CPSLError

MODALITIES = ("text", "audio", "vision")


def key(default: Any = dataclasses.MISSING, check=None, *, factory=None, **meta) -> Any:
    """A config field, declared once: its default (``factory`` for a list or a mapping), its rule
    (``check``: a builder of cpsl/config_rules.py; a string key gives ``choices=`` instead) and its
    other metadata: ``help``, ``at_least`` (a key of the section it must not be below) and
    ``identity=False`` for a key that does not change what a run learns (:func:`non_identity_keys`)."""
    if check is not None:
        meta["check"] = check
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(slots=True)
class DataConfig:
    path: str = key("synth", STR, identity=False)     # "synth" (embedded generator) or an MMSA .pkl path
    batch_size: int = key(32, integer(0), help="Training batch size (0: the whole training split, full-batch).")
    eval_batch_size: int = key(128, integer(1), identity=False)
    bucket: int = key(0, integer(0), help=(
        "Batch rows of similar length: sort each window of bucket x batch_size shuffled rows by length, "
        "then shuffle the batches (0: plain shuffle). Removes most padding, so a fine-tuned text encoder "
        "trains faster; the batches differ, so results are not bit-identical to bucket 0."))
    synth_seed: int = key(0, integer(0, MAX_SEED))    # seed of the embedded generator when path == "synth"
    synth: dict = key(check=MAPPING, factory=dict)    # SynthSpec knob overrides, e.g. {"text_memo": 0}


@dataclass(slots=True)
class ModelConfig:
    d: int = key(128, integer(1, MAX_WIDTH))          # hidden size
    heads: int = key(4, integer(1, MAX_WIDTH))
    dropout: float = key(0.1, number(0.0, 1.0, hi_open=True))
    text_layers: int = key(1, integer(0, MAX_LAYERS))  # AME temporal encoder depth per modality
    audio_layers: int = key(2, integer(0, MAX_LAYERS))
    vision_layers: int = key(2, integer(0, MAX_LAYERS))
    text_kernel: int = key(1, integer(1, odd=True))   # AME projection conv kernel per modality
    audio_kernel: int = key(3, integer(1, odd=True))
    vision_kernel: int = key(3, integer(1, odd=True))
    norm_momentum: float = key(0.1, FRACTION)         # running statistics of the adaptive input normalisation
    max_len: int = key(512, integer(1, 1 << 24))      # longest sequence the positional encoding covers
    ame: bool = key(True, BOOL)                       # False: plain projection + mean pooling
    fusion: str = key("gcf", choices=("gcf", "concat"), help="gcf (gated cross-modal fusion) or concat.")
    head_hidden: int = key(0, integer(0, MAX_WIDTH))  # hidden width of the heads (0: = d)
    # End-to-end text: run a pretrained encoder on text_bert ids ("" = use the text features).
    text_encoder: str = key("", STR)                  # "", "minilm" or a local Hugging Face folder
    finetune_text: bool = key(False, BOOL)            # fine-tune the encoder (else frozen)
    # the model class: the CPSL model, or the deep linear/ReLU fusion networks of the unimodal-bias
    # theory (cpsl/model/linear.py; presets linear_late / linear_early); linear_* keys only for "linear"
    arch: str = key("cpsl", choices=("cpsl", "linear"), help=(
        "cpsl (AME + gated fusion + heads) or linear (deep linear/ReLU network fusing at model.fusion_layer)."))
    linear_width: int = key(100, integer(1, MAX_WIDTH), help="arch=linear: hidden width H.")
    linear_depth: int = key(2, integer(1, MAX_LAYERS), help="arch=linear: number of weight layers.")
    fusion_layer: int = key(1, integer(0, MAX_LAYERS), help=(
        "arch=linear: layers each modality has to itself before they meet (0: early fusion; "
        "linear_depth: sum of per-modality scalar outputs)."))
    activation: str = key("linear", choices=("linear", "relu"), help="arch=linear: activation between layers.")
    init_std: float = key(1e-3, number(0.0, lo_open=True),
                          help="arch=linear: std of every initial weight (small: the theory's regime).")


@dataclass(slots=True)
class LossConfig:
    task: str = key("l1", choices=("l1", "mse", "smoothl1", "half_mse"),
                    help="Task loss (half_mse: 0.5 * MSE, the linear theory's loss).")
    aux: float = key(0.1, NONNEG)
    rec: float = key(0.1, NONNEG)
    sl: float = key(0.05, NONNEG)
    div: float = key(0.01, NONNEG)
    sl_out: float = key(0.1, NONNEG)                  # λ_out: batch statistics of predictions vs labels
    warmup_epochs: int = key(3, integer(0))           # λ_SL and λ_div ramp linearly from 0 over these epochs
    eps: float = key(1e-4, number(0.0, lo_open=True))


@dataclass(slots=True)
class GroupsConfig:
    """The modality parameter groups every strategy acts on (formerly cp.groups, cp.scope, cp.diagnostics)."""
    prefixes: dict = key(check=MAPPING, factory=dict, help=(
        "Parameter groups: modality -> module-name prefixes (\"\" = the modality's AME encoder; empty: "
        "the default of groups.scope)."))
    scope: str = key("encoder", choices=("encoder", "path"), help=(
        "Default parameter groups: each modality's encoder, or its whole path into the fusion "
        "(encoder + its cross-attention, gate and fusion LayerNorm)."))
    diagnostics: bool = key(True, BOOL, identity=False, help=(
        "Modulation none: still measure CP's ĝ/r/conflicts for the balance plots."))


@dataclass(slots=True)
class CPConfig:
    backend: str = key("auto", choices=("auto", "native", "foreach", "reference"), identity=False,
                       option="--cp-backend", help="CP backend (auto: native when built, else foreach).")
    mode: str = key("update", choices=("update", "grad"), help="update (per-group lr, default with AdamW) or grad.")
    tau: float = key(1.2, number(0.0, lo_open=True))
    penalty: str = key("ratio", choices=("tanh", "fixed", "ratio"), help=(
        "Penalty factor of a conflicting group: ratio (default: min of the other groups' gradient norms / "
        "its own, clamped to [k_min, 1]), tanh (1 - tanh(alpha (r - 1)), the default before 0.2.0) or fixed (beta)."))
    alpha: float = key(0.5, NONNEG)
    k_min: float = key(0.1, FRACTION)
    beta: float = key(0.5, FRACTION)
    normalize: bool = key(False, BOOL)
    start_epoch: int = key(0, integer(0))
    ramp_epochs: int = key(0, integer(0))
    end_epoch: int = key(1_000_000, integer(0), at_least="start_epoch")
    ge_noise: float = key(0.0, NONNEG)                # σ_GE of the optional generalisation noise (0 = off)
    # rules of issue 13 (docs/cp_rules.md); the defaults are the original rule
    signal: str = key("step", choices=("step", "ema"), help=(
        "Conflict signal: step (r of this step's gradients) or ema (bias-corrected EMA of r over "
        "steps, per group; conflict and k use it)."))
    signal_beta: float = key(0.9, DECAY, help="β of cp.signal=ema: r̃ ← β r̃ + (1 − β) r, in [0, 1).")
    stop: str = key("plateau", choices=("never", "plateau"), help=(
        "Stop rule: plateau (default: switch the penalty off for the rest of the run once the valid "
        "losses of the unpenalised modalities' unimodal predictions stop improving; needs them: "
        "loss.aux > 0 or model.arch=linear) or never."))
    stop_patience: int = key(3, integer(1), help=(
        "cp.stop=plateau: epochs without improvement (> cp.stop_delta) before the penalty stops."))
    stop_delta: float = key(0.0, NONNEG, help=(
        "cp.stop=plateau: an aux valid loss improves when it beats its best by more than this."))


def _scale_mode():
    return key("update", choices=("update", "grad"),
               help="update (scale the group's learning rate: survives AdamW) or grad (published; SGD).")


@dataclass(slots=True)
class OGMGEConfig:
    alpha: float = key(0.1, NONNEG)                   # OGM-GE's α
    ge: bool = key(True, BOOL)                        # generalisation-enhancement noise
    mode: str = _scale_mode()


@dataclass(slots=True)
class CGGMConfig:
    rho: float = key(1.0, NONNEG)                     # ρ: the magnitude factor is ρ · c_m
    lam: float = key(0.1, NONNEG)                     # λ of the direction term L_gm
    ema: float = key(0.9, DECAY)                      # EMA of the unimodal losses before differencing (0 = published per batch)
    mode: str = _scale_mode()


@dataclass(slots=True)
class AGSConfig:
    alpha: float = key(0.5, NONNEG)                   # α of k = 1 − tanh(α · ratio / (1 + ratio))
    end_epoch: int = key(1_000_000, integer(0))       # scale until this epoch (inclusive)
    mode: str = _scale_mode()


@dataclass(slots=True)
class MMParetoConfig:
    gamma: float = key(1.5, number(0.0, lo_open=True))  # γ of the published code
    uni_weight: float = key(1.0, NONNEG)              # weight of the unimodal loss in the Pareto pair (published: 1)


@dataclass(slots=True)
class InfoRegConfig:
    beta: float = key(0.95, NONNEG)                   # β of β exp(tanh(s_d − s_other))
    threshold: float = key(0.04, number())            # the prime learning window is open while κ > threshold
    horizon: int = key(10, integer(1))                # epochs averaged in κ's trace means


@dataclass(slots=True)
class ModDropConfig:
    p: float = key(0.1, FRACTION)                     # drop probability of a non-dominant modality
    p_dominant: float = key(0.3, FRACTION)            # drop probability of the dominant modality
    ema: float = key(0.9, DECAY)                      # EMA of the unimodal losses that picks the dominant modality


@dataclass(slots=True)
class TrainConfig:
    modulation: str = key("cp", STR, registry="cpsl.strategies",
                          help="Modulation strategy (a registered name; its knobs are its config section).")
    epochs: int = key(30, integer(1), help="Maximum epochs (early stopping on valid loss still applies).")
    patience: int = key(8, integer(1))
    lr: float = key(1e-3, number(0.0, lo_open=True))
    text_lr: float = key(2e-5, NONNEG)                # learning rate of a fine-tuned pretrained text encoder
    weight_decay: float = key(1e-4, NONNEG)
    clip: float = key(1.0, NONNEG)                    # max grad norm (0 = off)
    seeds: list = key(check=seeds, factory=lambda: [1], identity=False)  # which replicas, not what each learns
    device: str = key("cpu", device, identity=False, help="cpu or cuda.")
    num_threads: int = key(0, integer(0, 1024), identity=False)   # torch CPU threads (0 = leave torch's default)
    progress: bool = key(True, BOOL, identity=False)
    tensorboard: bool = key(False, BOOL, identity=False,
                            help="Also write every logged scalar to OUT/seed*/tb (needs the tensorboard package).")
    skip_limit: int = key(20, integer(1), identity=False,
                          help="Stop after this many consecutive training steps skipped as non-finite.")
    # stability (cpsl/stability.py, docs/stability.md)
    lr_schedule: str = key("constant", choices=("constant", "cosine"),
                           help="Learning-rate schedule: constant, or warm-up + cosine decay.")
    warmup_epochs: float = key(1.0, NONNEG)           # cosine: linear warm-up over these epochs
    lr_horizon: float = key(30.0, number(0.0, lo_open=True))  # cosine: epochs to reach lr_min (its own key: resume-safe, not train.epochs)
    lr_min: float = key(0.05, FRACTION)               # cosine: final lr as a fraction of lr / text_lr
    ema: float = key(0.99, DECAY, help="Decay of an EMA of the weights used for validation and checkpoints (0 = off).")
    optimizer: str = key("adamw", choices=("adamw", "sgd"),
                         help="adamw (fused, per-group tensor learning rates) or sgd (plain gradient descent).")
    eval_every: int = key(1, integer(1),
                          help="Validate (log, checkpoint, early-stopping count) every N epochs; the last epoch always.")
    select: str = key("best", choices=("best", "last"),
                      help="best.pt = the best validation epoch (best) or the final weights (last: no selection on valid).")
    amp: str = key("off", choices=("off", "bf16", "fp16"), help=(
        "Mixed precision: autocast forward/loss in bf16 (CUDA or CPU) or fp16 (CUDA, with a GradScaler; "
        "gradients are unscaled before the modulator reads them)."))


# sections registered by plug-ins (a strategy's knobs: cpsl.strategies.register), beyond the fields of Config
_PLUGIN_SECTIONS: dict[str, type] = {}


def _plugin_sections() -> dict:
    return {name: cls() for name, cls in _PLUGIN_SECTIONS.items()}


@dataclass(slots=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    cp: CPConfig = field(default_factory=CPConfig)
    ogm_ge: OGMGEConfig = field(default_factory=OGMGEConfig)
    cggm: CGGMConfig = field(default_factory=CGGMConfig)
    ags: AGSConfig = field(default_factory=AGSConfig)
    mmpareto: MMParetoConfig = field(default_factory=MMParetoConfig)
    inforeg: InfoRegConfig = field(default_factory=InfoRegConfig)
    moddrop: ModDropConfig = field(default_factory=ModDropConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plugins: dict = field(default_factory=_plugin_sections, repr=False, metadata={"plugins": True})

    def __getattr__(self, name: str):
        """A plug-in's section (``cfg.<name>``), registered with :func:`register_section`."""
        try:
            return object.__getattribute__(self, "plugins")[name]
        except (AttributeError, KeyError):
            raise AttributeError(f"config has no section {name!r}") from None

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return {name: asdict(obj) for name, obj in sections(self)}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        d = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            import yaml
            path.write_text(yaml.safe_dump(d, sort_keys=False))
        else:
            path.write_text(json.dumps(d, indent=2))

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        merge(cfg, d)
        return cfg

    @classmethod
    def load(cls, path: str | Path, base: "Config | None" = None) -> "Config":
        cfg = base or cls()
        merge(cfg, load_mapping(path))
        return cfg


# the unimodal-bias theory's regime (docs/unimodal_bias.md): full-batch gradient descent on 0.5·MSE
# from a small initialisation, no early stopping, selection or weight averaging, no extra loss terms;
# the penalty too runs the whole schedule (cp.stop=never): a weak deep-linear branch's valid loss can
# sit flat while it still learns, which the plateau rule reads as done (docs/cp_rules.md)
_LINEAR = {
    "data": {"batch_size": 0},
    "cp": {"stop": "never"},
    "model": {"arch": "linear", "linear_width": 100, "linear_depth": 2, "activation": "linear", "init_std": 1e-3},
    "loss": {"task": "half_mse", "aux": 0.0, "rec": 0.0, "sl": 0.0, "div": 0.0},
    "train": {"optimizer": "sgd", "lr": 0.04, "epochs": 3000, "patience": 1_000_000, "weight_decay": 0.0,
              "clip": 0.0, "ema": 0.0, "eval_every": 100, "select": "last", "progress": False},
}

PRESETS: dict[str, dict] = {
    "teacher": {},
    "student": {
        "model": {"d": 32, "heads": 2, "text_layers": 1, "audio_layers": 1, "vision_layers": 1,
                  "dropout": 0.1, "head_hidden": 32},
    },
    "linear_late": {**_LINEAR, "model": {**_LINEAR["model"], "fusion_layer": 1}},
    "linear_early": {**_LINEAR, "model": {**_LINEAR["model"], "fusion_layer": 0}},
}


def preset(name: str, check: bool = True) -> Config:
    if name not in PRESETS:
        raise CPSLError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})")
    return merge(Config(), PRESETS[name], check)


def load_mapping(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CPSLError(f"config file not found: {path}" if not path.exists() else
                        f"config file {path} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CPSLError(f"config {path} is not UTF-8 text (a YAML or JSON file?)") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise CPSLError(f"cannot parse config {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise CPSLError(f"config {path} must hold a mapping of sections")
    return d


# keys that moved (old configs, --set keys, saved runs and checkpoints still load): when strategies
# became plug-ins, and when the parameter groups every strategy uses left CP's section
_MOVED = {("cp", "modulation"): ("train", "modulation"), ("cp", "ogm_alpha"): ("ogm_ge", "alpha"),
          ("cp", "groups"): ("groups", "prefixes"), ("cp", "scope"): ("groups", "scope"),
          ("cp", "diagnostics"): ("groups", "diagnostics")}


def upgrade_keys(d: dict) -> dict:
    """A copy of a config mapping with the keys of ``_MOVED`` at their new places (old configs, checkpoints)."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for (sec, old), (new_sec, new_key) in _MOVED.items():
        if isinstance(d.get(sec), dict) and old in d[sec]:
            v = d[sec].pop(old)
            tgt = d.setdefault(new_sec, {})
            if isinstance(tgt, dict):
                tgt.setdefault(new_key, v)
    return d


def upgrade_flat(d: dict) -> dict:
    """:func:`upgrade_keys` for a flat ``{"section.key": value}`` mapping (a checkpoint's run identity)."""
    moved = {f"{s}.{k}": f"{ns}.{nk}" for (s, k), (ns, nk) in _MOVED.items()}
    out = {k: v for k, v in d.items() if k not in moved}
    for k, v in d.items():
        if k in moved:
            out.setdefault(moved[k], v)
    return out


def flatten(cfg: dict) -> dict:
    """``section.key -> value`` of a config dict (old key names at their new places); nested values
    (``data.synth``, ``groups.prefixes``) stay whole."""
    out = {}
    for section, keys in upgrade_keys(cfg).items():
        if isinstance(keys, dict):
            out.update({f"{section}.{k}": v for k, v in keys.items()})
        else:
            out[section] = keys
    return out


def sections(cfg: Config) -> list[tuple[str, Any]]:
    """``[(name, section object), ...]`` of ``cfg``: its fields, then the plug-ins' sections."""
    out = [(f.name, getattr(cfg, f.name)) for f in fields(cfg) if not f.metadata.get("plugins")]
    return out + list(cfg.plugins.items())


def register_section(name: str, cls: type) -> None:
    """Add a config section ``name`` (a dataclass of knobs, rules in field metadata) to every
    :class:`Config` made from now on: ``cfg.<name>.<key>``, ``--set name.key=value``."""
    if name in {f.name for f in fields(Config)} or name in _PLUGIN_SECTIONS or not dataclasses.is_dataclass(cls):
        raise ValueError(f"config section {name!r} exists already, or {cls!r} is not a dataclass")
    _PLUGIN_SECTIONS[name] = cls


def unregister_section(name: str) -> None:
    _PLUGIN_SECTIONS.pop(name, None)


def merge(cfg: Config, d: dict, check: bool = True) -> Config:
    """Merge a nested mapping into ``cfg`` in place; unknown sections/keys raise CPSLError. ``check``:
    validate the result (False when more settings follow; the last step validates once)."""
    known = dict(sections(cfg))
    for sec, vals in upgrade_keys(d).items():
        if sec not in known:
            raise CPSLError(f"unknown config section {sec!r} (known: {', '.join(sorted(known))})")
        if not isinstance(vals, dict):
            raise CPSLError(f"config section {sec!r} must be a mapping")
        obj = known[sec]
        keys = {f.name for f in fields(obj)}
        for k, v in vals.items():
            if k not in keys:
                raise CPSLError(f"unknown config key {sec}.{k}")
            setattr(obj, k, _coerce(v, getattr(obj, k), f"{sec}.{k}"))
    if check:
        validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], check: bool = True) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars).

    All overrides are merged before validation, so ``model.d=30 model.heads=3`` works in any order."""
    merge(cfg, parse_overrides(overrides), check)
    return cfg


def parse_overrides(overrides) -> dict[str, dict]:
    """``["section.key=value", ...]`` (values parsed as YAML scalars) → ``{section: {key: value}}``."""
    import yaml
    upd: dict[str, dict] = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise CPSLError(f"override {item!r} must look like section.key=value")
        name, raw = item.split("=", 1)
        sec, k = name.strip().split(".", 1)
        try:
            val = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            val = raw
        upd.setdefault(sec, {})[k] = val
    return upd


def field_choices(section_cls) -> dict[str, tuple]:
    """``{key: choices}`` of a config section, from the ``choices`` metadata of its fields."""
    return {f.name: f.metadata["choices"] for f in fields(section_cls) if "choices" in f.metadata}


# the allowed values of every string option of the core sections, declared once on the fields above
_CHOICES = {(f.name, k): c for f in fields(Config) if not f.metadata.get("plugins")
            for k, c in field_choices(f.default_factory).items()}


def non_identity_keys() -> frozenset[str]:
    """``section.key`` of every key declared ``identity=False``: where, how fast or how verbosely a run
    goes (data path, device, threads, progress, TensorBoard, the CP backend, diagnostics), not what it
    learns. Compared runs, resumed runs and reused benchmark cells may differ in these."""
    return frozenset(f"{name}.{f.name}" for name, obj in sections(Config()) for f in fields(obj)
                     if f.metadata.get("identity") is False)


def validate(cfg: Config) -> None:
    """Every value's type, range or choices (the ``check``/``choices`` metadata of its field) and the
    rules across keys of cpsl/config_rules.py."""
    _check(cfg, sections(cfg))


def build_config(preset_name: str = "teacher", config_file: str | None = None,
                 overrides: tuple[str, ...] | list[str] = (), check: bool = True) -> Config:
    """preset ← config file ← overrides, validated once at the end (``check=False``: left to the caller)."""
    cfg = preset(preset_name, check=False)
    if config_file:
        merge(cfg, load_mapping(config_file), check=False)
    apply_overrides(cfg, overrides, check=False)
    if check:
        validate(cfg)
    return cfg


def copy_config(cfg: Config) -> Config:
    return Config.from_dict(cfg.to_dict())
