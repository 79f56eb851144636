"""Dataclass configs with the defaults of docs/method.md, presets, YAML/JSON load/save and
``section.key=value`` overrides. Unknown keys are errors that name the key."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import CPSLError

MODALITIES = ("text", "audio", "vision")


@dataclass
class DataConfig:
    path: str = "synth"           # "synth" (embedded generator) or an MMSA .pkl path
    batch_size: int = field(default=32, metadata={"help": "Training batch size (0: the whole training split, full-batch)."})
    eval_batch_size: int = 128
    bucket: int = field(default=0, metadata={
        "help": "Batch rows of similar length: sort each window of bucket x batch_size shuffled rows by length, "
                "then shuffle the batches (0: plain shuffle). Removes most padding, so a fine-tuned text encoder "
                "trains faster; the batches differ, so results are not bit-identical to bucket 0."})
    synth_seed: int = 0           # seed of the embedded generator when path == "synth"
    synth: dict = field(default_factory=dict)  # SynthSpec knob overrides, e.g. {"text_memo": 0}


@dataclass
class ModelConfig:
    d: int = 128                  # hidden size
    heads: int = 4
    dropout: float = 0.1
    text_layers: int = 1          # AME temporal encoder depth per modality
    audio_layers: int = 2
    vision_layers: int = 2
    text_kernel: int = 1          # AME projection conv kernel per modality
    audio_kernel: int = 3
    vision_kernel: int = 3
    norm_momentum: float = 0.1    # running statistics of the adaptive input normalisation
    max_len: int = 512            # longest sequence the positional encoding covers
    ame: bool = True              # False: plain projection + mean pooling
    fusion: str = field(default="gcf", metadata={"choices": ("gcf", "concat"),
                                                "help": "gcf (gated cross-modal fusion) or concat."})
    head_hidden: int = 0          # hidden width of the heads (0: = d)
    # End-to-end text: run a pretrained encoder on text_bert ids ("" = use the text features).
    text_encoder: str = ""        # "", "minilm" or a local Hugging Face folder
    finetune_text: bool = False   # fine-tune the encoder (else frozen)
    # the model class: the CPSL model, or the deep linear/ReLU fusion networks of the unimodal-bias
    # theory (cpsl/model/linear.py; presets linear_late / linear_early); linear_* keys only for "linear"
    arch: str = field(default="cpsl", metadata={
        "choices": ("cpsl", "linear"),
        "help": "cpsl (AME + gated fusion + heads) or linear (deep linear/ReLU network fusing at model.fusion_layer)."})
    linear_width: int = field(default=100, metadata={"help": "arch=linear: hidden width H."})
    linear_depth: int = field(default=2, metadata={"help": "arch=linear: number of weight layers."})
    fusion_layer: int = field(default=1, metadata={
        "help": "arch=linear: layers each modality has to itself before they meet (0: early fusion; "
                "linear_depth: sum of per-modality scalar outputs)."})
    activation: str = field(default="linear", metadata={"choices": ("linear", "relu"),
                                                       "help": "arch=linear: activation between layers."})
    init_std: float = field(default=1e-3, metadata={"help": "arch=linear: std of every initial weight (small: the theory's regime)."})


@dataclass
class LossConfig:
    task: str = field(default="l1", metadata={"choices": ("l1", "mse", "smoothl1", "half_mse"),
                                              "help": "Task loss (half_mse: 0.5 * MSE, the linear theory's loss)."})
    aux: float = 0.1
    rec: float = 0.1
    sl: float = 0.05
    div: float = 0.01
    sl_out: float = 0.1           # λ_out: batch statistics of predictions vs labels
    warmup_epochs: int = 3        # λ_SL and λ_div ramp linearly from 0 over these epochs
    eps: float = 1e-4


@dataclass
class CPConfig:
    backend: str = field(default="auto", metadata={"choices": ("auto", "native", "foreach", "reference"),
                                                   "help": "CP backend (auto: native when built, else foreach)."})
    mode: str = field(default="update", metadata={"choices": ("update", "grad"),
                                                  "help": "update (per-group lr, default with AdamW) or grad."})
    tau: float = 1.2
    penalty: str = field(default="tanh", metadata={"choices": ("tanh", "fixed", "ratio"), "help": "Penalty rule."})
    alpha: float = 0.5
    k_min: float = 0.1
    beta: float = 0.5
    normalize: bool = False
    start_epoch: int = 0
    ramp_epochs: int = 0
    end_epoch: int = 1_000_000
    ge_noise: float = 0.0         # σ_GE of the optional generalisation noise (0 = off)
    diagnostics: bool = True      # other strategies: still measure CP's ĝ/r/conflicts for the balance plots
    # parameter groups of every strategy: modality -> module-name prefixes ("" = the modality's AME encoder)
    groups: dict = field(default_factory=dict)
    scope: str = field(default="encoder", metadata={
        "choices": ("encoder", "path"),
        "help": "Default parameter groups: each modality's encoder, or its whole path into the fusion "
                "(encoder + its cross-attention, gate and fusion LayerNorm)."})
    # rules of issue 13 (docs/cp_rules.md); the defaults are the original rule
    signal: str = field(default="step", metadata={
        "choices": ("step", "ema"),
        "help": "Conflict signal: step (r of this step's gradients) or ema (bias-corrected EMA of r over "
                "steps, per group; conflict and k use it)."})
    signal_beta: float = field(default=0.9, metadata={
        "help": "β of cp.signal=ema: r̃ ← β r̃ + (1 − β) r, in [0, 1)."})
    stop: str = field(default="plateau", metadata={
        "choices": ("never", "plateau"),
        "help": "Stop rule: plateau (default: switch the penalty off for the rest of the run once the valid "
                "losses of the unpenalised modalities' unimodal predictions stop improving; needs them: "
                "loss.aux > 0 or model.arch=linear) or never."})
    stop_patience: int = field(default=3, metadata={
        "help": "cp.stop=plateau: epochs without improvement (> cp.stop_delta) before the penalty stops."})
    stop_delta: float = field(default=0.0, metadata={
        "help": "cp.stop=plateau: an aux valid loss improves when it beats its best by more than this."})


_SCALE_MODE = {"choices": ("update", "grad"),
               "help": "update (scale the group's learning rate: survives AdamW) or grad (published; SGD)."}


@dataclass
class OGMGEConfig:
    alpha: float = 0.1            # OGM-GE's α
    ge: bool = True               # generalisation-enhancement noise
    mode: str = field(default="update", metadata=_SCALE_MODE)


@dataclass
class CGGMConfig:
    rho: float = 1.0              # ρ: the magnitude factor is ρ · c_m
    lam: float = 0.1              # λ of the direction term L_gm
    ema: float = 0.9              # EMA of the unimodal losses before differencing (0 = published per batch)
    mode: str = field(default="update", metadata=_SCALE_MODE)


@dataclass
class AGSConfig:
    alpha: float = 0.5            # α of k = 1 − tanh(α · ratio / (1 + ratio))
    end_epoch: int = 1_000_000    # scale until this epoch (inclusive)
    mode: str = field(default="update", metadata=_SCALE_MODE)


@dataclass
class MMParetoConfig:
    gamma: float = 1.5            # γ of the published code
    uni_weight: float = 1.0       # weight of the unimodal loss in the Pareto pair (published: 1)


@dataclass
class InfoRegConfig:
    beta: float = 0.95            # β of β exp(tanh(s_d − s_other))
    threshold: float = 0.04       # the prime learning window is open while κ > threshold
    horizon: int = 10             # epochs averaged in κ's trace means


@dataclass
class ModDropConfig:
    p: float = 0.1                # drop probability of a non-dominant modality
    p_dominant: float = 0.3       # drop probability of the dominant modality
    ema: float = 0.9              # EMA of the unimodal losses that picks the dominant modality


@dataclass
class TrainConfig:
    modulation: str = field(default="cp", metadata={
        "registry": "cpsl.strategies", "help": "Modulation strategy (a registered name; its knobs are its config section)."})
    epochs: int = field(default=30, metadata={"help": "Maximum epochs (early stopping on valid loss still applies)."})
    patience: int = 8
    lr: float = 1e-3
    text_lr: float = 2e-5         # learning rate of a fine-tuned pretrained text encoder
    weight_decay: float = 1e-4
    clip: float = 1.0             # max grad norm (0 = off)
    seeds: list = field(default_factory=lambda: [1])
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    num_threads: int = 0          # torch CPU threads (0 = leave torch's default)
    progress: bool = True
    tensorboard: bool = field(default=False, metadata={
        "help": "Also write every logged scalar to OUT/seed*/tb (needs the tensorboard package)."})
    skip_limit: int = field(default=20, metadata={
        "help": "Stop after this many consecutive training steps skipped as non-finite."})
    # stability (cpsl/stability.py, docs/stability.md)
    lr_schedule: str = field(default="constant", metadata={
        "choices": ("constant", "cosine"), "help": "Learning-rate schedule: constant, or warm-up + cosine decay."})
    warmup_epochs: float = 1.0    # cosine: linear warm-up over these epochs
    lr_horizon: float = 30.0      # cosine: epochs to reach lr_min (its own key: resume-safe, not train.epochs)
    lr_min: float = 0.05          # cosine: final lr as a fraction of lr / text_lr
    ema: float = field(default=0.99, metadata={
        "help": "Decay of an EMA of the weights used for validation and checkpoints (0 = off)."})
    optimizer: str = field(default="adamw", metadata={
        "choices": ("adamw", "sgd"), "help": "adamw (fused, per-group tensor learning rates) or sgd (plain gradient descent)."})
    eval_every: int = field(default=1, metadata={
        "help": "Validate (log, checkpoint, early-stopping count) every N epochs; the last epoch always."})
    select: str = field(default="best", metadata={
        "choices": ("best", "last"),
        "help": "best.pt = the best validation epoch (best) or the final weights (last: no selection on valid)."})
    amp: str = field(default="off", metadata={
        "choices": ("off", "bf16", "fp16"),
        "help": "Mixed precision: autocast forward/loss in bf16 (CUDA or CPU) or fp16 (CUDA, with a GradScaler; "
                "gradients are unscaled before the modulator reads them)."})


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cp: CPConfig = field(default_factory=CPConfig)
    ogm_ge: OGMGEConfig = field(default_factory=OGMGEConfig)
    cggm: CGGMConfig = field(default_factory=CGGMConfig)
    ags: AGSConfig = field(default_factory=AGSConfig)
    mmpareto: MMParetoConfig = field(default_factory=MMParetoConfig)
    inforeg: InfoRegConfig = field(default_factory=InfoRegConfig)
    moddrop: ModDropConfig = field(default_factory=ModDropConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return asdict(self)

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
# from a small initialisation, no early stopping, selection or weight averaging, no extra loss terms
_LINEAR = {
    "data": {"batch_size": 0},
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


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise CPSLError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})")
    return Config.from_dict(PRESETS[name])


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


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Coerce ``value`` to the type of the field's current value."""
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


# keys that moved when strategies became plug-ins (old configs and checkpoints still load)
_MOVED = {("cp", "modulation"): ("train", "modulation"), ("cp", "ogm_alpha"): ("ogm_ge", "alpha")}


def upgrade_keys(d: dict) -> dict:
    """A copy of a config mapping with the keys of ``_MOVED`` at their new places (old configs, checkpoints)."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for (sec, key), (new_sec, new_key) in _MOVED.items():
        if isinstance(d.get(sec), dict) and key in d[sec]:
            v = d[sec].pop(key)
            tgt = d.setdefault(new_sec, {})
            if isinstance(tgt, dict):
                tgt.setdefault(new_key, v)
    return d


def flatten(cfg: dict) -> dict:
    """``section.key -> value`` of a config dict; nested values (``data.synth``, ``cp.groups``) stay whole."""
    out = {}
    for section, keys in cfg.items():
        if isinstance(keys, dict):
            out.update({f"{section}.{k}": v for k, v in keys.items()})
        else:
            out[section] = keys
    return out


def merge(cfg: Config, d: dict) -> Config:
    """Merge a nested mapping into ``cfg`` in place; unknown sections/keys raise CPSLError."""
    sections = {f.name for f in fields(cfg)}
    for sec, vals in upgrade_keys(d).items():
        if sec not in sections:
            raise CPSLError(f"unknown config section {sec!r} (known: {', '.join(sorted(sections))})")
        if not isinstance(vals, dict):
            raise CPSLError(f"config section {sec!r} must be a mapping")
        obj = getattr(cfg, sec)
        keys = {f.name for f in fields(obj)}
        for k, v in vals.items():
            if k not in keys:
                raise CPSLError(f"unknown config key {sec}.{k}")
            setattr(obj, k, _coerce(v, getattr(obj, k), f"{sec}.{k}"))
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars).

    All overrides are merged before validation, so ``model.d=30 model.heads=3`` works in any order."""
    merge(cfg, parse_overrides(overrides))
    return cfg


def parse_overrides(overrides) -> dict[str, dict]:
    """``["section.key=value", ...]`` (values parsed as YAML scalars) → ``{section: {key: value}}``."""
    import yaml
    upd: dict[str, dict] = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise CPSLError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        sec, k = key.strip().split(".", 1)
        try:
            val = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            val = raw
        upd.setdefault(sec, {})[k] = val
    return upd


def field_choices(section_cls) -> dict[str, tuple]:
    """``{key: choices}`` of a config section, from the ``choices`` metadata of its fields."""
    return {f.name: f.metadata["choices"] for f in fields(section_cls) if "choices" in f.metadata}


# the allowed values of every string option, declared once on the fields above
_CHOICES = {(f.name, k): c for f in fields(Config) for k, c in field_choices(f.default_factory).items()}


def validate(cfg: Config) -> None:
    """Every value's type, range or choices: the rules live in cpsl/config_rules.py."""
    from .config_rules import check
    check(cfg, _CHOICES)


def build_config(preset_name: str = "teacher", config_file: str | None = None,
                 overrides: tuple[str, ...] | list[str] = ()) -> Config:
    cfg = preset(preset_name)
    if config_file:
        merge(cfg, load_mapping(config_file))
    apply_overrides(cfg, overrides)
    return cfg


def copy_config(cfg: Config) -> Config:
    return Config.from_dict(dataclasses.asdict(cfg))


# --- provisional (helper A) ---
def non_identity_keys() -> frozenset[str]:
    """The ``section.key`` settings that say where, how fast or how verbosely a run went, not what it
    learns (threads, device and eval batch size: float rounding only; the CP backend: the same maths).
    The one list that ``cpsl compare``, ``--resume`` (cpsl.runs), the MOSI recipe and bench/balance.py
    leave out when they ask whether two runs are the same run."""
    return frozenset({"train.seeds", "train.num_threads", "train.device", "train.progress", "train.tensorboard",
                      "data.path", "data.eval_batch_size", "cp.backend", "cp.diagnostics"})
