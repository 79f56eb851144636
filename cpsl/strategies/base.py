"""The ``Modulator`` protocol, its registry and the helpers every strategy shares.

One training loop (``cpsl/train.py``) calls a modulator at seven documented points and never asks
which strategy it is::

    modulator.bind(optimizer)                         # once, after the optimizer (and any resumed state)
    for epoch ...:
        modulator.begin_epoch(epoch)                  # (1) e.g. InfoReg snapshots θ₀ of the epoch
        for batch ...:
            batch = modulator.prepare_batch(batch, epoch)      # (2) inputs, e.g. moddrop masks modalities
            out = model(batch); loss, terms = total_loss(out, batch.y)
            step = Step(epoch, batch, out, terms, loss)
            loss = modulator.objective(loss, step)    # (3) add a loss term (CGGM's direction term)
            optimizer.zero_grad()
            modulator.backward(loss, step)            # (4) backward; extra passes (MMPareto) go here
            if not guard.check(loss): continue        #     non-finite step: skipped whole, before (5)
            stats = modulator.after_backward(step)    # (5) scale gradients or learning rates → StepStats
            clip_grad_norm_(...); optimizer.step()
        log["modulation"] = modulator.end_epoch(epoch)  # (6) per-epoch bookkeeping (InfoReg's Fisher trace)
        valid = evaluate(...)
        log["modulation"] |= modulator.after_valid(epoch, valid aux losses)   # (7) e.g. CP's stop rule
    results.update(modulator.results())               # per-seed results (e.g. cp_stopped_epoch)

What is said about a strategy comes from the strategy too: ``describe(cfg)`` is the line the CLI
prints at start, ``start_warnings(cfg)`` the warnings a run logs before its seeds, and
``aggregate(per_seed)`` what results.json adds over the seeds. Its knobs are its config section:
``section`` names it; a plug-in gives the dataclass as ``config`` (``register`` adds it to every
config made after), with each key's rule in its field metadata (``cpsl.config.key``).

A strategy declares what it ``needs`` from a step and what ``effects`` it has (both sets of
strings from :data:`NEEDS` / :data:`EFFECTS`); :func:`check` turns an impossible configuration
into one :class:`~cpsl.errors.CPSLError`. Its state for ``--resume`` goes through
``state_dict``/``load_state_dict`` (saved in ``last.pt``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..errors import CPSLError

NEEDS = {
    "unimodal_heads": "per-modality predictions ŷ_m and losses ℓ_m (model aux heads trained: loss.aux > 0, "
                      "or a model whose unimodal predictions are its own branches: model.arch=linear)",
    "optimizer": "the optimizer's per-modality param groups with tensor learning rates",
    "extra_backward": "backward passes beyond the one of the objective",
    "per_sample": "per-sample access to the batch (masks modalities sample by sample)",
}
EFFECTS = {
    "scale_grad": "multiplies a modality group's gradients",
    "scale_lr": "multiplies a modality group's learning rate (the update under Adam/AdamW)",
    "replace_grad": "replaces a modality group's gradient by a combination of per-loss gradients",
    "grad_noise": "adds noise to a modality group's gradients",
    "loss_term": "adds a term to the objective",
    "mask_inputs": "masks whole modalities of training samples",
}


@dataclass
class StepStats:
    """What ``after_backward`` hands the loop's balance log (tensors stay on the device)."""
    names: tuple[str, ...]
    ghat: torch.Tensor         # (G,) group gradient norms
    r: torch.Tensor            # (G,) ĝ relative to the mean
    k: torch.Tensor            # (G,) the factor applied (1: untouched)
    conflict: torch.Tensor     # (G,) 0/1
    guard: torch.Tensor        # () 0/1
    w: float                   # the epoch's schedule weight

    @classmethod
    def of_penalty(cls, names, rec) -> "StepStats":
        """From CP's record (a :class:`cpsl.cp.penalty.PenaltyStep`: the rule's statistics and w)."""
        st = rec.stats
        return cls(tuple(names), st.ghat, st.r, st.k, st.conflict, st.guard, rec.w)


def bind_group_lrs(opt, groups: dict) -> dict[int, list[tuple[dict, torch.Tensor]]]:
    """``{group index: [(optimizer param group, its base lr), ...]}`` for scaling each of
    ``groups``' (``{name: parameters}``) learning rate. Each group must be the union of whole
    optimizer param groups with tensor ``lr``s (e.g. a text AME group plus a pretrained encoder
    group with its own learning rate); the base lr is kept in the param group (``base_lr``)."""
    pg_ids = [({id(p) for p in pg["params"]}, pg) for pg in opt.param_groups]
    out = {}
    for gi, (name, params) in enumerate(groups.items()):
        ids = {id(p) for p in params}
        if not ids:
            continue
        mine = [pg for s, pg in pg_ids if s and s <= ids]
        covered = set().union(*[{id(p) for p in pg["params"]} for pg in mine]) if mine else set()
        if covered != ids:
            raise ValueError(f"mode 'update': group {name!r} is not a union of optimizer param groups "
                             "(build the optimizer with cpsl.train.build_optimizer)")
        slots = []
        for pg in mine:
            if not torch.is_tensor(pg["lr"]):
                raise ValueError(f"mode 'update': a param group of {name!r} needs a tensor lr")
            if "base_lr" not in pg:
                pg["base_lr"] = pg["lr"].detach().clone()
            slots.append((pg, pg["base_lr"]))
        out[gi] = slots
    return out


@dataclass
class Step:
    """What one training step hands the modulator (tensors stay on the device)."""
    epoch: int
    batch: Any                  # cpsl.data.batch.Batch
    out: Any                    # cpsl.model.cpsl.ModelOutput (pred, aux, h, ...)
    terms: dict                 # detached loss terms, incl. aux_<m> per modality
    loss: torch.Tensor | None = None   # the objective before objective() (graph attached)


class Modulator(Protocol):
    name: ClassVar[str]
    needs: ClassVar[frozenset]
    effects: ClassVar[frozenset]
    names: tuple                # modality group names, in order
    backend_name: str

    def bind(self, optimizer) -> None: ...
    def begin_epoch(self, epoch: int) -> None: ...
    def prepare_batch(self, batch, epoch: int): ...
    def objective(self, loss: torch.Tensor, step: Step) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor, step: Step) -> None: ...
    def after_backward(self, step: Step) -> StepStats | None: ...
    def end_epoch(self, epoch: int) -> dict | None: ...
    def after_valid(self, epoch: int, aux_loss: dict) -> dict | None: ...
    def results(self) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class BaseModulator:
    """Default hooks (each a no-op) so a strategy overrides only the points it acts at."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset] = frozenset()
    effects: ClassVar[frozenset] = frozenset()
    section: ClassVar[str | None] = None      # its config section (cfg.<section>)
    config: ClassVar[type | None] = None      # a plug-in's section dataclass (registered as ``section``)

    def __init__(self, groups: dict, cfg, model=None, optimizer=None, device=None):
        self.names = tuple(groups)
        self.groups = groups
        self.cfg = cfg
        self.scfg = getattr(cfg, self.section) if self.section else None
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.backend_name = self.name

    @classmethod
    def check(cls, cfg) -> None:
        """Raise CPSLError when this strategy cannot run with ``cfg``."""
        if "unimodal_heads" in cls.needs and not has_unimodal_predictions(cfg):
            raise CPSLError(f"modulation {cls.name!r} needs the unimodal heads, which are switched off "
                            f"(loss.aux={cfg.loss.aux}); set loss.aux > 0")

    @classmethod
    def describe(cls, cfg) -> str:
        """The line said when a run of this strategy starts (``cpsl train``)."""
        return f"modulation: {cls.name}"

    @classmethod
    def start_warnings(cls, cfg) -> list[str]:
        """Warnings a run logs before its seeds (e.g. a backend that fell back)."""
        return []

    @classmethod
    def aggregate(cls, per_seed: list[dict]) -> dict:
        """Entries results.json adds over the seeds' :meth:`results`."""
        return {}

    def bind(self, optimizer) -> None:
        self.optimizer = optimizer

    def begin_epoch(self, epoch: int) -> None:
        pass

    def prepare_batch(self, batch, epoch: int):
        return batch

    def objective(self, loss, step: Step):
        return loss

    def backward(self, loss, step: Step) -> None:
        loss.backward()

    def after_backward(self, step: Step) -> StepStats | None:
        return None

    def step(self, epoch: int, terms: dict | None = None):
        """The pre-plug-in single hook (``after_backward`` with only epoch and terms)."""
        return self.after_backward(Step(epoch, None, None, terms or {}))

    def end_epoch(self, epoch: int) -> dict | None:
        return None

    def after_valid(self, epoch: int, aux_loss: dict) -> dict | None:
        """After the epoch's validation; ``aux_loss`` = {modality: the unimodal head's valid loss}.
        A dict returned is logged under ``"modulation"``; state changed here is saved in last.pt."""
        return None

    def results(self) -> dict:
        """Entries added to the seed's results (results.json)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def has_unimodal_predictions(cfg) -> bool:
    """The model gives meaningful per-modality predictions: trained aux heads (``loss.aux > 0``), or
    the linear fusion networks, whose ``aux[m]`` is modality m's own contribution to the output."""
    return cfg.loss.aux > 0 or cfg.model.arch == "linear"


# ---------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: ``@register class X(BaseModulator): name = "x"``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"modulator name {cls.name!r} is empty or already registered")
    unknown = (set(cls.needs) - set(NEEDS)) | (set(cls.effects) - set(EFFECTS))
    if unknown:
        raise ValueError(f"modulator {cls.name!r} declares unknown needs/effects {sorted(unknown)}")
    if cls.config is not None:
        from ..config import register_section
        cls.section = cls.section or cls.name
        register_section(cls.section, cls.config)
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a registered strategy (and its config section); for tests."""
    cls = _REGISTRY.pop(name, None)
    if cls is not None and cls.config is not None:
        from ..config import unregister_section
        unregister_section(cls.section)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> type:
    if name not in _REGISTRY:
        raise CPSLError(f"unknown modulation {name!r} (choose from: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def check(cfg) -> None:
    """The configured strategy exists and can run with ``cfg`` (else CPSLError)."""
    get(cfg.train.modulation).check(cfg)


def model_groups(cfg, model) -> dict:
    """``{modality: parameters}``: the groups every strategy acts on (config section ``groups``)."""
    return model.modality_parameters(cfg.groups.prefixes or None, cfg.groups.scope)


def build(cfg, model, optimizer=None, device=None) -> BaseModulator:
    """The configured strategy over :func:`model_groups`."""
    cls = get(cfg.train.modulation)
    cls.check(cfg)
    return cls(model_groups(cfg, model), cfg, model=model, optimizer=optimizer, device=device)


# ---------------------------------------------------------------------------- shared helpers
def group_norms(groups: dict, names) -> torch.Tensor:
    """(G,) float64 L2 norm of each group's gradients (0 for a group without any)."""
    out = []
    for n in names:
        gs = [p.grad for p in groups[n] if p.grad is not None]
        out.append(torch.sqrt(sum((g.double() ** 2).sum() for g in gs)) if gs else torch.zeros((), dtype=torch.float64))
    return torch.stack(out)


def stats(names, groups, k: torch.Tensor, flagged: torch.Tensor | None = None, w: float = 1.0) -> StepStats:
    """StepStats for the balance log: ĝ = group gradient norms (after modulation), r = ĝ / mean ĝ."""
    ghat = group_norms(groups, names)
    r = ghat / ghat.mean().clamp(min=1e-30)
    k = k.double().to(ghat.device)
    flagged = (k < 1).double() if flagged is None else flagged.double().to(ghat.device)
    return StepStats(tuple(names), ghat, r, k, flagged, torch.zeros((), dtype=torch.float64), w)


def unimodal_losses(terms: dict, names) -> torch.Tensor:
    """(G,) per-modality unimodal losses ℓ_m of the step (the ``aux_<m>`` terms, detached)."""
    return torch.stack([terms[f"aux_{m}"].detach().double() for m in names])


def regression_scores(aux: dict, y: torch.Tensor, kind: str, names) -> torch.Tensor:
    """(G,) s_m = Σ_i exp(−ℓ(ŷ_m,i, y_i)): OGM-GE's Σ_i p_m,i[y_i] for regression (detached)."""
    out = []
    for m in names:
        d = aux[m].detach().double() - y.double()
        err = (d.abs() if kind == "l1" else d ** 2 if kind == "mse" else 0.5 * d ** 2 if kind == "half_mse"
               else torch.where(d.abs() < 1, 0.5 * d ** 2, d.abs() - 0.5))
        out.append(torch.exp(-err).sum())
    return torch.stack(out)


class GroupScale:
    """Applies per-group factors k (G,) in mode ``grad`` (∇p ← k_m ∇p, right for SGD) or ``update``
    (lr_m ← lr · k_m on the group's optimizer param groups: what survives Adam's normalisation)."""

    def __init__(self, groups: dict, names, mode: str):
        self.groups, self.names, self.mode = groups, tuple(names), mode
        self.slots: dict[int, list] = {}

    def bind(self, optimizer) -> None:
        if self.mode != "update":
            return
        if optimizer is None:
            raise CPSLError("mode 'update' needs the optimizer (per-group learning rates)")
        try:
            self.slots = bind_group_lrs(optimizer, {n: self.groups[n] for n in self.names})
        except ValueError as e:
            raise CPSLError(str(e)) from None

    def apply(self, k: torch.Tensor) -> None:
        for gi, n in enumerate(self.names):
            if self.mode == "grad":
                for p in self.groups[n]:
                    if p.grad is not None:
                        p.grad.mul_(k[gi].to(p.grad.device, p.grad.dtype))
            else:
                for pg, base in self.slots.get(gi, ()):
                    pg["lr"].copy_(base * k[gi].to(base.device, base.dtype))


class ScalingModulator(BaseModulator):
    """A strategy whose action is a factor k_m per group, applied by :class:`GroupScale` in its
    section's ``mode`` (``update`` default; ``grad`` = the published action, warned under Adam)."""

    def __init__(self, groups, cfg, model=None, optimizer=None, device=None):
        super().__init__(groups, cfg, model, optimizer, device)
        self.scale = GroupScale(groups, self.names, self.scfg.mode)
        # what this instance does (the class declares both modes)
        self.effects = (self.effects - {"scale_grad", "scale_lr"}) | {"scale_lr" if self.scfg.mode == "update" else "scale_grad"}

    def bind(self, optimizer) -> None:
        self.optimizer = optimizer
        self.scale.bind(optimizer)
        if self.scfg.mode == "grad":
            warn_sgd_only(self.name, optimizer)


def warn_sgd_only(name: str, optimizer) -> None:
    """A strategy whose effect an adaptive optimizer largely divides away says so once."""
    if optimizer is not None and isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        warnings.warn(f"modulation {name!r} scales gradients, which Adam/AdamW largely normalise away; "
                      "use its mode 'update' (per-group learning rate) with an adaptive optimizer", stacklevel=3)

