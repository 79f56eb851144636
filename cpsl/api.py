"""The Python API: the CLI's main tasks as functions (``import cpsl``). The names avoid the
package's module names (``cpsl.config``, ``cpsl.train`` are modules): ``configure``, ``fit``.

    import cpsl
    cfg = cpsl.configure("student", epochs=3, **{"model.text_encoder": "minilm"})
    run = cpsl.fit(cfg, data="reviews.pkl", out="runs/api")      # -> Run (results, checkpoints)
    model = run.load()                                              # -> Model (best.pt of the first seed)
    model.evaluate("reviews.pkl", split="test")["MAE"]
    model.predict(["a wonderful film", "a dull plot"])              # -> numpy array, sentiment in [-3, 3]
    manifest = cpsl.export(run.ckpt(), "dist", data="reviews.pkl")  # -> cpsl.deploy.Manifest
    cpsl.predict("dist/model.onnx", ["a wonderful film"])           # the exported artefact, torch-free

Every function raises :class:`cpsl.CPSLError` on bad input (the CLI prints it as one ``error:``
line). Importing cpsl does not import torch; the functions do when called.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .config import Config
    from .data import MMSAData
    from .deploy import Manifest

DataLike = "str | Path | MMSAData"


def configure(preset: str = "teacher", file: str | Path | None = None, sets: Sequence[str] = (),
           **keys: Any) -> "Config":
    """The run config: ``preset`` ← ``file`` (YAML/JSON) ← ``sets`` (``"section.key=value"``) ← ``keys``.

    ``keys`` are ``section.key`` names (``**{"train.lr": 1e-3}``) or the short names ``epochs``,
    ``seeds``, ``modulation``, ``device``. Every value is checked; unknown keys raise."""
    from .config import apply_overrides, build_config
    short = {"epochs": "train.epochs", "seeds": "train.seeds", "modulation": "train.modulation",
             "device": "train.device"}
    cfg = build_config(preset, str(file) if file else None, list(sets), check=False)
    more = []
    for k, v in keys.items():
        path = short.get(k, k)
        if path == "train.seeds":
            cfg.train.seeds = [int(s) for s in ([v] if isinstance(v, int) else v)]
        else:
            more.append(f"{path}={json.dumps(v) if isinstance(v, (dict, bool, list)) else v}")
    apply_overrides(cfg, more)                       # validates the whole config, once
    return cfg


def toy_text(out: str | Path, seed: int = 0, text_encoder: str = "minilm", max_len: int = 24) -> Path:
    """Write the built-in toy text set (900 template sentences, rule-made labels; ``cpsl data toy-text``)
    as an MMSA pickle ``out`` (sentences in ``out`` with suffix .csv) and return its path."""
    from .data.builders import build_mosei
    from .data.mmsa import save_mmsa
    from .data.toytext import write_csv
    out = Path(out)
    data, _ = build_mosei(write_csv(out.with_suffix(".csv"), seed), text_encoder=text_encoder, max_len=max_len,
                          progress=False)
    save_mmsa(data, out)
    return out


def _data(data: "DataLike", cfg: "Config | None" = None) -> "MMSAData":
    from .data import MMSAData, load_data
    if isinstance(data, MMSAData):
        return data
    return load_data(str(data), cfg.data.synth_seed if cfg else 0, cfg.data.synth if cfg else None)


@dataclass
class Run:
    """A finished training run folder (``cpsl train``'s layout)."""

    out: Path
    results: dict = field(repr=False)

    @property
    def seeds(self) -> list[int]:
        return sorted(int(p.name[4:]) for p in self.out.glob("seed*")
                      if p.name[4:].isdigit() and (p / "best.pt").is_file())

    def ckpt(self, seed: int | None = None) -> Path:
        """``OUT/seed<seed>/best.pt`` (default: the first seed)."""
        seed = self.seeds[0] if seed is None else seed
        return self.out / f"seed{seed}" / "best.pt"

    def metrics(self, split: str = "valid") -> dict[str, float]:
        """Mean over seeds of each metric on ``split`` (``valid`` or ``test``)."""
        return {k: v["mean"] for k, v in self.results.get(split, {}).items()}

    def load(self, seed: int | None = None, device: str = "cpu") -> "Model":
        return load(self.ckpt(seed), device)


def fit(cfg: "Config | None" = None, data: "DataLike" = "synth", out: str | Path = "runs/api",
          overwrite: bool = False, resume: bool = False, log=None) -> Run:
    """Train ``cfg`` (default: :func:`configure` ()) on ``data`` ("synth", an MMSA .pkl or an MMSAData);
    writes ``out`` exactly as ``cpsl train`` does and returns the :class:`Run`."""
    from . import strategies
    from .runs import check_out
    from .train import run as run_training
    cfg = cfg if cfg is not None else configure()
    strategies.check(cfg)
    check_out(str(out), resume=resume, overwrite=overwrite)
    d = _data(data, cfg)
    cfg.data.path = str(data) if not hasattr(data, "splits") else (d.path or "(in memory)")   # recorded in the run
    res = run_training(cfg, d, str(out), resume=resume, log=log or (lambda *a, **k: None), overwrite=overwrite)
    return Run(Path(out), res)


class Model:
    """A loaded checkpoint: :meth:`predict` on raw text (+ features), :meth:`evaluate` on data."""

    def __init__(self, ckpt: str | Path, device: str = "cpu"):
        from .checkpoint import load_model
        self.ckpt = Path(ckpt)
        self.device = device
        self.module, self.config, _ = load_model(ckpt, device)
        self.module.eval()

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.module.modalities)

    def predict(self, texts: Sequence[str], audio=None, vision=None, max_len: int = 128) -> "np.ndarray":
        """Sentiment ``(N,)`` in [-3, 3] of ``texts``; ``audio`` / ``vision``: one ``(L, d)`` array for
        every text, or a list of them, where the model reads those modalities. Needs a model trained
        with a text encoder (``model.text_encoder``)."""
        from .inference import predict_checkpoint
        feats = {m: x for m, x in (("audio", audio), ("vision", vision)) if x is not None}
        return predict_checkpoint(self.module, self.config, list(texts), feats, max_len=max_len)

    def evaluate(self, data: "DataLike", split: str = "test") -> dict[str, float]:
        """MMSA metrics of the fused prediction on ``split`` of ``data``."""
        from .checkpoint import check_compatible
        from .evaluation import evaluate
        d = _data(data, self.config)
        check_compatible(self.module, d, str(self.ckpt))
        return evaluate(self.module, d[split], self.config, self.device)["metrics"]


def load(ckpt: str | Path, device: str = "cpu") -> Model:
    """Load a ``best.pt`` written by ``cpsl train`` / ``cpsl distill`` (read without executing code)."""
    return Model(ckpt, device)


def export(ckpt: str | Path, out: str | Path, precision: str = "fp32", data: str | None = None,
           overwrite: bool = False, **settings: Any) -> "Manifest":
    """Export ``ckpt`` to ``out/model.onnx`` (+ manifest, golden batches, engine script, README.md card),
    as ``cpsl export --out``; ``settings``: any other field of :class:`cpsl.deploy.ExportSettings`."""
    from .deploy import ExportSettings, export_artifact
    from .errors import CPSLError
    target = Path(out) / "model.onnx"
    if target.exists() and not overwrite:
        raise CPSLError(f"{target} exists: pass overwrite=True to replace it")
    return export_artifact(ckpt, target, ExportSettings(precision=precision, data=data, **settings))


def predict(model: str | Path, texts: Sequence[str], audio=None, vision=None) -> "np.ndarray":
    """Sentiment of ``texts`` with a checkpoint (``.pt``, PyTorch) or an end-to-end export
    (``.onnx`` / ``.plan``, torch-free through :mod:`cpsl.edge`)."""
    if str(model).endswith(".pt"):
        return load(model).predict(texts, audio, vision)
    from .inference import predict_artifact
    feats = {m: x for m, x in (("audio", audio), ("vision", vision)) if x is not None}
    return predict_artifact(model, list(texts), feats)[0]


def evaluate(ckpt: str | Path, data: "DataLike", split: str = "test") -> dict[str, float]:
    """MMSA metrics of a checkpoint on ``split`` of ``data`` (as ``cpsl eval``)."""
    return load(ckpt).evaluate(data, split)


__all__: list[str] = ["configure", "toy_text", "fit", "Run", "load", "Model", "evaluate", "export", "predict"]
