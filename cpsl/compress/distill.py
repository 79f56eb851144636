"""Knowledge distillation of a CPSL teacher into a small student (docs/method.md §7).

    L = [the student's own objective: ℓ(ŷ_s, y) + aux + rec + SL + div, with CP active]
        + λ_kd · MSE(ŷ_s, sg ŷ_t) + λ_hint · MSE(P z_s, sg z_t)

``P`` is a trainable ``Linear(d_s → d_t)``. The distillation terms are the trainer's
``extra_loss`` (``cpsl.train.run(..., extra_loss_factory=...)``), so the student is trained,
checkpointed and evaluated exactly like ``cpsl train`` does it. :func:`distill` is handed that
loop (``train_loop``) by its caller (the CLI, bench): ``cpsl.compress`` never imports
``cpsl.train`` (an import-linter contract), it reads the teacher through :mod:`cpsl.checkpoint`.

The teacher runs in eval mode (no dropout, BatchNorm running statistics): its outputs for a
training sample do not depend on the batch it sits in (everything is masked), so they are
computed once over the training split and looked up by row index (``cache``). A batch whose
labels do not match the cached rows (another split) falls back to running the teacher.
The teacher is held outside the module's registered children: it is neither trained nor
saved in the student's checkpoints.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..data.batch import iterate
from ..data.mmsa import MMSAData, Split
from ..errors import CPSLError
from ..metrics import retention as metric_retention
from ..model import CPSLModel
from .settings import DistillSettings

MAX_PARAM_RATIO = DistillSettings.max_ratio


@torch.no_grad()
def teacher_targets(teacher: CPSLModel, split: Split, batch_size: int = 128, device="cpu"):
    """Teacher's (ŷ_t (N,), z_t (N, d_t)) on every row of ``split``, in row order (eval mode)."""
    teacher.eval()
    pred = torch.zeros(len(split))
    z = torch.zeros(len(split), teacher.cfg.d)
    for b in iterate(split, batch_size, modalities=teacher.modalities):
        b = b.to(device)
        out = teacher(b.x, b.mask, b.text_bert)
        idx = torch.as_tensor(b.index)
        pred[idx] = out.pred.float().cpu()
        z[idx] = out.z.float().cpu()
    return pred, z


class DistillLoss(nn.Module):
    """``forward(student_output, batch) -> (λ_kd·kd + λ_hint·hint, {"kd", "hint"})``."""

    def __init__(self, teacher: CPSLModel, d_student: int, lambda_kd: float = 1.0, lambda_hint: float = 0.1,
                 cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self._teacher = (teacher,)                      # a tuple: not a registered child module
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        self.proj = nn.Linear(d_student, teacher.cfg.d)  # P: z_s (d_s) → z_t space (d_t)
        self.lambda_kd, self.lambda_hint = float(lambda_kd), float(lambda_hint)
        # cached teacher outputs over the training split (+ its labels, to detect other splits)
        for name, t in zip(("t_pred", "t_z", "t_y"), cache or (None, None, None)):
            self.register_buffer(name, t, persistent=False)
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def teacher(self) -> CPSLModel:
        return self._teacher[0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()                             # the trainer calls .train() every step
        return self

    def _apply(self, fn, *args, **kwargs):               # .to(device) moves the teacher too
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def targets(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.t_pred is not None:
            idx = torch.as_tensor(np.asarray(batch.index), dtype=torch.long, device=self.t_pred.device)
            if int(idx.max()) < self.t_pred.shape[0] and torch.equal(self.t_y[idx], batch.y.to(self.t_y)):
                self.cache_hits += 1
                return self.t_pred[idx], self.t_z[idx]
        self.cache_misses += 1
        with torch.no_grad():
            out = self.teacher(batch.x, batch.mask, batch.text_bert)
        return out.pred.detach(), out.z.detach()

    def forward(self, out, batch):
        pred_t, z_t = self.targets(batch)
        kd = F.mse_loss(out.pred, pred_t.to(out.pred.dtype))
        hint = F.mse_loss(self.proj(out.z), z_t.to(out.z.dtype))
        return self.lambda_kd * kd + self.lambda_hint * hint, {"kd": kd, "hint": hint}


# ---------------------------------------------------------------------------- the whole job
def param_ratio(student: CPSLModel, teacher: CPSLModel) -> dict:
    s, t = student.num_parameters(exclude_backbone=True), teacher.num_parameters(exclude_backbone=True)
    return {"student": int(s), "teacher": int(t), "ratio": s / t if t else float("inf")}


def retention(student: dict, teacher: dict) -> dict:
    """Student relative to teacher on one split (plain metric dicts)."""
    return metric_retention(student, teacher, missing=float("nan"))


def distill(teacher_ckpt: str | Path, data: MMSAData, cfg: Config, out: str | Path,
            lambda_kd: float = DistillSettings.lambda_kd, lambda_hint: float = DistillSettings.lambda_hint,
            max_ratio: float = MAX_PARAM_RATIO, cache: bool = True, log=print, overwrite: bool = False, *,
            train_loop: Callable[..., dict]) -> dict:
    """Train ``cfg.train.seeds`` students against the teacher checkpoint; write ``out/results.json``
    (``cpsl train``'s layout plus ``teacher``, ``retention`` and ``distill``) and return it.
    ``train_loop``: :func:`cpsl.train.run` (called as ``train_loop(cfg, data, out, log=...,
    extra_loss_factory=..., overwrite=...)``, returning its results dict)."""
    from ..checkpoint import check_compatible, load_model
    from ..evaluation import evaluate
    from ..metrics import METRIC_KEYS

    if lambda_kd < 0 or lambda_hint < 0:
        raise CPSLError("--lambda-kd and --lambda-hint must be >= 0")
    device = torch.device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    teacher, tcfg, tck = load_model(teacher_ckpt, device)
    check_compatible(teacher, data, str(teacher_ckpt))
    probe = CPSLModel(data.dims, cfg.model)
    pr = param_ratio(probe, teacher)
    del probe
    if pr["ratio"] > max_ratio:
        raise CPSLError(f"the student has {pr['student']:,} parameters, {pr['ratio']:.1%} of the teacher's "
                        f"{pr['teacher']:,} (limit {max_ratio:.0%}); choose a smaller student (e.g. --set model.d=32)")
    log(f"student {pr['student']:,} parameters = {pr['ratio']:.1%} of the teacher's {pr['teacher']:,}"
        + (" (frozen text backbone excluded)" if teacher.text_backbone is not None else ""))
    tres = {}
    for split in ("valid", "test"):
        if split in data.splits and len(data[split]):
            ev = evaluate(teacher, data[split], tcfg, device)
            tres[split] = {k: ev["metrics"][k] for k in METRIC_KEYS}
    cached = None
    if cache:
        tr = data["train"]
        p, z = teacher_targets(teacher, tr, tcfg.data.eval_batch_size, device)
        cached = (p, z, torch.from_numpy(tr.labels.astype(np.float32)))

    def factory(seed: int) -> DistillLoss:
        torch.manual_seed(seed)
        c = tuple(t.clone() for t in cached) if cached is not None else None
        return DistillLoss(teacher, cfg.model.d, lambda_kd, lambda_hint, cache=c)

    res = train_loop(cfg, data, out, log=log, extra_loss_factory=factory, overwrite=overwrite)
    res["teacher"] = {"ckpt": str(teacher_ckpt), "params": pr["teacher"],
                      "trained_on": tck.get("data_path"), **tres}
    res["retention"] = {s: retention({k: v["mean"] for k, v in res[s].items()}, tres[s])
                        for s in ("valid", "test") if s in res and s in tres}
    res["distill"] = {"lambda_kd": float(lambda_kd), "lambda_hint": float(lambda_hint),
                      "params": pr, "max_ratio": float(max_ratio), "teacher_cache": bool(cache),
                      "loss": "task + aux + rec + SL + div (student, CP active) + lambda_kd*MSE(pred_s, pred_t) "
                              "+ lambda_hint*MSE(P z_s, z_t)"}
    (Path(out) / "results.json").write_text(json.dumps(res, indent=2))
    return res
