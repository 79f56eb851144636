"""``cp``: the Conflict-aware Penalty (docs/method.md §5) as a plug-in. The rule and its backends
(reference, foreach, native) stay in :mod:`cpsl.cp`; this module only wires
:class:`~cpsl.cp.penalty.ConflictAwarePenalty` to the loop's hook points (binding its groups'
learning rates for mode ``update``, wrapping each step's record into :class:`~.base.StepStats`) and
gives CP's groups a gradient arena (one native plan per run).

Two rule options live here (docs/cp_rules.md):

* ``cp.signal=ema``: the smoothed conflict signal's state (``self.state``) is saved in ``last.pt``.
* ``cp.stop=plateau``: at each epoch end (:meth:`after_valid`), the groups whose mean ``k`` over the
  epoch was 1 (not penalised) are looked at; when none of their unimodal aux heads' *validation*
  losses beat its best by more than ``cp.stop_delta`` for ``cp.stop_patience`` consecutive epochs,
  the penalty is switched off for the rest of the run (sticky; ``k = 1``). An epoch in which every
  group was penalised does not count either way. The epoch is logged as ``cp_stopped_epoch``
  (log.jsonl under ``modulation``, and results.json) and kept in ``last.pt``.

The rule shipped: ``groups.scope=encoder``, ``cp.signal=step``, ``cp.stop=plateau`` (docs/cp_rules.md,
"The rule we ship"). Validation evidence across every cell measured: on the unimodal-bias family
(the one benchmark where joint training provably under-learns a modality, docs/unimodal_bias.md)
CP closes about half of the late-fusion deficit with either stop rule; on the imbalance grid and
on MOSI (text the only informative modality) CP never beats ``none``, and the plateau rule is never
worse than ``never`` and better on fine-tuned MOSI (−0.015 valid MAE), where it ties ``none``.
"""
from __future__ import annotations

import math

import torch

from ..cp.arena import GradArena
from ..cp.penalty import ConflictAwarePenalty, resolve_backend
from ..errors import CPSLError
from .base import BaseModulator, Step, StepStats, bind_group_lrs, has_unimodal_predictions, register
from .plans import PlanCount

UNPENALISED = 1.0 - 1e-6   # mean k over an epoch at or above this: the group was not penalised


@register
class CPModulator(ConflictAwarePenalty, BaseModulator):
    name = "cp"
    needs = frozenset({"optimizer"})
    effects = frozenset({"scale_lr", "scale_grad", "grad_noise"})
    section = "cp"

    def __init__(self, groups, cfg, model=None, optimizer=None, device=None):
        update = cfg.cp.mode == "update" and optimizer is not None
        try:
            slots = bind_group_lrs(optimizer, groups) if update else None
        except ValueError as e:
            raise CPSLError(str(e)) from None
        ConflictAwarePenalty.__init__(self, groups, cfg.cp, lr_slots=slots, device=device)
        self.groups, self.model, self.optimizer, self.device = groups, model, optimizer, device
        self.arena = None
        self.effects = frozenset({"scale_lr" if cfg.cp.mode == "update" else "scale_grad"}
                                 | ({"grad_noise"} if cfg.cp.ge_noise > 0 else set()))
        self.plateau = cfg.cp.stop == "plateau"
        self.stopped_epoch: int | None = None
        self.best: dict[str, float] = {}     # best valid aux loss per group (plateau rule)
        self.bad_epochs = 0
        self._ksum = None                    # (G,) device sum of k over the epoch's steps
        self._nk = 0

    @classmethod
    def describe(cls, cfg) -> str:
        be, _ = resolve_backend(cfg.cp.backend, cfg.train.device)
        return f"modulation: cp (backend {be}, mode {cfg.cp.mode})"

    @classmethod
    def start_warnings(cls, cfg) -> list[str]:
        be, why = resolve_backend(cfg.cp.backend, cfg.train.device)
        return [f"CP backend 'native' unavailable ({why}); using '{be}'"] if why else []

    @classmethod
    def aggregate(cls, per_seed: list[dict]) -> dict:
        if any("cp_stopped_epoch" in r for r in per_seed):   # cp.stop=plateau: the epoch each seed's penalty stopped
            return {"cp_stopped_epoch": [r.get("cp_stopped_epoch") for r in per_seed]}
        return {}

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.cp.stop == "plateau" and not has_unimodal_predictions(cfg):
            raise CPSLError(f"cp.stop=plateau (the default stop rule) reads the unimodal aux heads' validation "
                            f"losses, which are not trained (loss.aux={cfg.loss.aux}); set loss.aux > 0, or "
                            f"cp.stop=never")

    def bind(self, optimizer) -> None:
        # CP groups' grads live in a stable arena (zero_grad goes through it): one native plan per run
        self.arena = GradArena.for_modulator(self, optimizer)
        self.plans = PlanCount()

    def begin_epoch(self, epoch: int) -> None:
        self._ksum, self._nk = None, 0

    step = BaseModulator.step   # the modulator's hook (→ StepStats), not the penalty's record

    def after_backward(self, step: Step) -> StepStats:
        st = StepStats.of_penalty(self.names, ConflictAwarePenalty.step(self, step.epoch, step.terms))
        if self.plateau:
            self._ksum = st.k.detach().clone() if self._ksum is None else self._ksum + st.k
            self._nk += 1
        return st

    # ------------------------------------------------------------------ stop rule
    def after_valid(self, epoch: int, aux_loss: dict) -> dict | None:
        """The plateau rule at the end of ``epoch`` (``aux_loss``: {modality: valid aux loss})."""
        if not self.plateau:
            return None
        if self.stopped:
            return {"cp_stopped_epoch": self.stopped_epoch}
        kmean = (self._ksum / self._nk).tolist() if self._nk else [1.0] * len(self.names)   # one host read
        free = [n for n, k in zip(self.names, kmean) if k >= UNPENALISED and n in aux_loss]
        improved = False
        for n in self.names:
            v = aux_loss.get(n)
            if v is None or not math.isfinite(v):
                continue
            best = self.best.get(n, math.inf)
            if n in free and v < best - self.cfg.stop_delta:
                improved = True
            self.best[n] = min(best, v)
        if free:
            self.bad_epochs = 0 if improved else self.bad_epochs + 1
        if self.bad_epochs >= self.cfg.stop_patience:
            self.stopped, self.stopped_epoch = True, epoch
        return {"cp_unpenalised": free, "cp_plateau_epochs": self.bad_epochs,
                "cp_stopped_epoch": self.stopped_epoch}

    def results(self) -> dict:
        return {**self.plans.results(), **({"cp_stopped_epoch": self.stopped_epoch} if self.plateau else {})}

    # ------------------------------------------------------------------ --resume
    def state_dict(self) -> dict:
        out = {}
        if self.state is not None:
            out["signal_state"] = self.state.detach().cpu().clone()
        if self.plateau:
            out["stop"] = {"stopped": self.stopped, "stopped_epoch": self.stopped_epoch,
                           "best": dict(self.best), "bad_epochs": self.bad_epochs}
        return out

    def load_state_dict(self, state: dict) -> None:
        if self.state is not None and state.get("signal_state") is not None:
            s = state["signal_state"]
            if not torch.is_tensor(s) or s.shape != self.state.shape:
                raise CPSLError(f"checkpoint: CP signal state of shape {getattr(s, 'shape', None)} does not fit "
                                f"{len(self.names)} groups")
            self.state.copy_(s.to(self.state.device, torch.float64))
        stop = state.get("stop")
        if self.plateau and stop:
            self.stopped, self.stopped_epoch = bool(stop["stopped"]), stop["stopped_epoch"]
            self.best, self.bad_epochs = dict(stop["best"]), int(stop["bad_epochs"])
