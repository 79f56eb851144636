"""One explicit training loop: seed → epochs (train, valid, early stop, checkpoint) → test once.

    batch = modulator.prepare_batch(batch, epoch)      # ┐
    loss = modulator.objective(loss, step)             # │ the modulation strategy's hook points
    modulator.backward(loss, step)                     # │ (cpsl/strategies/base.py documents them;
    if not guard.check(loss): skip the step            # │  no strategy-specific code in this file)
    stats = modulator.after_backward(step)             # ┘
    clip_grad_norm_(...)
    optimizer.step()

Per seed ``DIR/seed{N}/`` holds ``best.pt`` (selected on validation loss), ``last.pt`` (for
``--resume``), ``log.jsonl`` (one line per epoch), ``curves.png`` and ``balance.png``;
``DIR/results.json`` aggregates the seeds (mean ± std of MMSA metrics).
"""
from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import distributed, strategies
from .amp import Precision
from .checkpoint import check_lengths, load_model, read_checkpoint, save_checkpoint
from .checkpoint import set_rng_state as _set_rng_state
from .evaluation import contributions, evaluate, predict  # noqa: F401 - re-exports (cpsl.train's public API)
from .config import Config
from .data.batch import iterate
from .data.mmsa import MMSAData
from .errors import CPSLError
from .losses import total_loss
from .metrics import METRIC_KEYS, mean_std
from .model import CPSLModel
from .tblog import ScalarLog


# ---------------------------------------------------------------------------- set-up
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def build_model(cfg: Config, data: MMSAData) -> CPSLModel:
    from .model import build
    return build(data.dims, cfg.model)


def batch_size(cfg: Config, data: MMSAData) -> int:
    """The training batch size (``data.batch_size`` 0: the whole training split)."""
    return cfg.data.batch_size or max(len(data["train"]), 1)


def build_optimizer(model: CPSLModel, cfg: Config, groups: dict[str, list], extra_params=()) -> torch.optim.Optimizer:
    """AdamW (or plain SGD: ``train.optimizer``) with one param group per modality group (per-group tensor lr: a strategy's
    ``update`` mode scales it on the device), a group for a pretrained text encoder (``train.text_lr``) and one
    for the rest. Fused AdamW (CPU and CUDA) reads tensor learning rates without host sync."""
    dev = next(model.parameters()).device
    assigned: set[int] = set()
    pgs = []

    def add(params, lr, name):
        params = [p for p in params if p.requires_grad and id(p) not in assigned]
        if params:
            assigned.update(id(p) for p in params)
            pgs.append({"params": params, "lr": torch.tensor(float(lr), device=dev), "name": name})

    backbone = {id(p) for p in model.text_backbone.parameters()} if model.text_backbone is not None else set()
    for name, params in groups.items():
        add([p for p in params if id(p) in backbone], cfg.train.text_lr, f"{name}/pretrained")
        add([p for p in params if id(p) not in backbone], cfg.train.lr, name)
    add([p for p in model.parameters() if id(p) in backbone], cfg.train.text_lr, "pretrained")
    add(list(model.parameters()) + list(extra_params), cfg.train.lr, "shared")
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(pgs, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=False)
    return torch.optim.AdamW(pgs, weight_decay=cfg.train.weight_decay, fused=True)


def build_modulator(cfg: Config, model: CPSLModel, optimizer, device):
    """The registered strategy ``cfg.train.modulation`` (see :mod:`cpsl.strategies`)."""
    return strategies.build(cfg, model, optimizer, device)


# ---------------------------------------------------------------------------- one seed
class _Balance:
    """Per-epoch device-side sums of the modulation statistics (one host sync per epoch)."""

    def __init__(self, names):
        self.names = tuple(names)
        self.sums = None
        self.steps = 0

    def add(self, st) -> None:
        if st is None:
            return
        v = torch.stack([st.ghat.double(), st.r.double(), st.k.double(), st.conflict.double()])  # (4, G)
        g = st.guard.double().reshape(1).expand(len(self.names))
        v = torch.cat([v, g.unsqueeze(0)])
        self.sums = v if self.sums is None else self.sums + v
        self.steps += 1

    def summary(self) -> dict | None:
        if self.sums is None:
            return None
        s = (self.sums / self.steps).cpu().tolist()
        ghat = dict(zip(self.names, s[0]))
        pos = [v for v in ghat.values() if v > 0]
        return {"ghat": ghat, "r": dict(zip(self.names, s[1])), "k": dict(zip(self.names, s[2])),
                "conflict_rate": dict(zip(self.names, s[3])), "guard_rate": s[4][0],
                "imbalance": (max(pos) / min(pos)) if len(pos) >= 2 else None}


class _State:
    """Everything one seed's training carries between epochs (what ``last.pt`` restores)."""

    def __init__(self, cfg: Config, data: MMSAData, seed: int, out: Path, device, extra_loss, fingerprint: str):
        from .guard import StepGuard
        from .runs import run_identity
        self.cfg, self.data, self.seed, self.out, self.device = cfg, data, seed, out, device
        self.fingerprint, self.identity = fingerprint, run_identity(cfg, fingerprint)
        set_seed(seed)
        self.model = build_model(cfg, data).to(device)
        self.extra_loss = extra_loss
        if extra_loss is not None:
            extra_loss.to(device)
        extra_params = [p for p in extra_loss.parameters() if p.requires_grad] if extra_loss is not None else []
        self.optimizer = build_optimizer(self.model, cfg, strategies.model_groups(cfg, self.model), extra_params)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        from .stability import LRSchedule, WeightEMA
        self.batch_size = batch_size(cfg, data)
        self.steps_per_epoch = -(-len(data["train"]) // self.batch_size)
        self.schedule = LRSchedule(cfg.train, self.optimizer, self.steps_per_epoch)
        self.ema = WeightEMA(self.model, cfg.train.ema) if cfg.train.ema > 0 else None
        self.guard = StepGuard(self.model, self.params, cfg.train.skip_limit, cfg.train.lr,
                               extreme=data["train"].extreme, extra_params=extra_params)
        self.start_epoch, self.best_val, self.best_epoch, self.bad_epochs = 0, float("inf"), -1, 0
        self.history: list[dict] = []
        self.modulator_state: dict = {}
        self.dist = distributed.current()                 # world size 1 outside torchrun
        self.amp = Precision(cfg.train.amp, device, strategies.get(cfg.train.modulation).needs)

    @property
    def eval_model(self) -> CPSLModel:
        """What validation, selection and the checkpoints use: the EMA of the weights when on."""
        return self.ema.model if self.ema is not None else self.model

    def resume(self, log) -> None:
        path = self.out / "last.pt"
        if not path.is_file():
            log(f"seed {self.seed}: nothing to resume in {self.out}; starting fresh")
            return
        from .runs import resume_differences
        ck = read_checkpoint(path)
        diffs = resume_differences(ck, self.cfg, self.fingerprint)
        if diffs:
            raise CPSLError(f"cannot resume from {path}: it was written with another "
                            f"{'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}")
        try:
            self.model.load_state_dict(ck.get("train_model") or ck["model"])
            if self.ema is not None:
                self.ema.load(ck["model"], ck.get("ema_updates", 0))
            if self.extra_loss is not None and ck.get("extra_loss") is not None:
                self.extra_loss.load_state_dict(ck["extra_loss"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.schedule.bind()
            _set_rng_state(ck["rng"])
            self.start_epoch = int(ck["epoch"]) + 1
            self.best_val, self.best_epoch = float(ck["best_val"]), int(ck["best_epoch"])
            self.bad_epochs, self.history = int(ck["bad_epochs"]), list(ck.get("history", []))
            self.guard.skipped = int(ck.get("skipped_steps", 0))
            self.modulator_state = ck.get("modulator") or {}
            self.amp.load_state_dict(ck.get("amp_scaler"))
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, IndexError, AttributeError) as e:
            raise CPSLError(f"{path} cannot be resumed from ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else ''})") from None
        if self.start_epoch > self.cfg.train.epochs:
            raise CPSLError(f"cannot resume from {path}: it is after epoch {ck['epoch']}, past train.epochs="
                            f"{self.cfg.train.epochs}; pass --epochs {self.start_epoch + 1} or more to continue it")
        log(f"seed {self.seed}: resuming after epoch {ck['epoch']}")

    def checkpoint_extra(self, modulator) -> dict:
        return {"best_val": self.best_val, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "history": self.history, "seed": self.seed, "data_path": self.data.path,
                "identity": self.identity, "skipped_steps": self.guard.skipped, "modulator": modulator.state_dict(),
                "extra_loss": self.extra_loss.state_dict() if self.extra_loss is not None else None,
                "amp_scaler": self.amp.state_dict()}


def _make_modulator(st: _State):
    # built after any optimizer state is loaded: scaled learning rates hold the live param groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a backend fallback is reported once by run() (start_warnings)
        modulator = build_modulator(st.cfg, st.model, st.optimizer, st.device)
    modulator.load_state_dict(st.modulator_state)
    modulator.bind(st.optimizer)                      # hook point 0 (e.g. a gradient arena)
    return modulator


_GRAD_EFFECTS = frozenset({"scale_grad", "replace_grad", "grad_noise", "loss_term"})


def _train_step(st: _State, modulator, b, epoch: int):
    """One optimisation step through the modulator's hook points; returns (terms, StepStats), or
    None when the step guard skips it (non-finite loss, gradient or batch statistic)."""
    b = st.dist.shard(modulator.prepare_batch(b.to(st.device), epoch))   # this rank's rows (world 1: all)
    with st.dist.rng(), st.amp.autocast():
        out = st.model(b.x, b.mask, b.text_bert)
        loss, terms = total_loss(out, b.y, st.cfg.loss, epoch)
        if st.extra_loss is not None:
            st.extra_loss.train()
            l2, t2 = st.extra_loss(out, b)
            loss = loss + l2
            terms.update({k: v.detach() for k, v in t2.items()})
    step = strategies.Step(epoch, b, out, terms, loss)
    loss = modulator.objective(loss, step)
    st.optimizer.zero_grad(set_to_none=True)
    modulator.backward(st.amp.scale(loss), step)
    loss, step = st.dist.reduce_step(st.params + st.guard.extra, loss, step, st.guard.bns)  # global mean gradient
    st.amp.unscale(st.optimizer)                       # the guard and the modulator read true gradients
    if not st.guard.check(loss):                       # ← non-finite: skip the whole step
        st.optimizer.zero_grad(set_to_none=True)
        st.amp.skipped()
        return None
    stats = modulator.after_backward(step)
    if _GRAD_EFFECTS & modulator.effects:              # the guard's norm predates these gradient changes
        st.guard.norm = torch.nn.utils.get_total_norm([p.grad for p in st.params if p.grad is not None])
    st.guard.clip(st.cfg.train.clip)
    st.amp.step(st.optimizer)
    if st.ema is not None:
        st.ema.update()
    return step.terms, stats


def _train_epoch(st: _State, modulator, epoch: int) -> tuple[dict, dict | None, dict | None]:
    """(mean train terms, balance summary, the modulator's epoch record)."""
    st.model.train()
    gen = torch.Generator().manual_seed(st.seed * 1_000_003 + epoch)
    sums: dict[str, torch.Tensor] = {}
    balance = _Balance(modulator.names)
    modulator.begin_epoch(epoch)
    st.guard.new_epoch()
    st.dist.begin_epoch(epoch)
    nb = 0
    for i, b in enumerate(iterate(st.data["train"], st.batch_size, shuffle=True, generator=gen,
                                  modalities=st.model.modalities, bucket=st.cfg.data.bucket)):
        st.schedule.apply(epoch, i)
        done = _train_step(st, modulator, b, epoch)
        if done is None:
            continue
        terms, stats = done
        balance.add(stats)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        nb += 1
    return {k: float(v) / max(nb, 1) for k, v in sums.items()}, balance.summary(), modulator.end_epoch(epoch)


def _record_epoch(st: _State, modulator, epoch: int, train_terms: dict, balance, mod_rec, t0: float, tb,
                  log=print) -> dict:
    ev = evaluate(st.eval_model, st.data["valid"], st.cfg, st.device)
    val_loss = ev["metrics"]["loss"]
    if st.cfg.train.select == "last":                  # no selection, no early stop: best.pt = the final weights
        improved = epoch + 1 >= st.cfg.train.epochs
        if improved:
            st.best_val, st.best_epoch = val_loss, epoch
    elif val_loss < st.best_val - 1e-9:
        improved = True
        st.best_val, st.best_epoch, st.bad_epochs = val_loss, epoch, 0
    else:
        improved = False
        st.bad_epochs += 1
    after = modulator.after_valid(epoch, ev["aux_loss"])   # hook 7 (e.g. a stop rule); saved in last.pt below
    if after:
        mod_rec = {**(mod_rec or {}), **after}
    g = st.guard
    rec = {"epoch": epoch, "train": train_terms, "valid": ev["metrics"], "valid_aux": ev["aux"],
           "balance": balance, "skipped_steps": g.epoch_skipped, "time_s": time.perf_counter() - t0}
    if mod_rec:
        rec["modulation"] = mod_rec
    rec["distributed"] = st.dist.epoch_record
    st.history.append(rec)
    if st.dist.is_main:                                # log, TensorBoard and checkpoints: rank 0 only
        with open(st.out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    tb.add(rec, epoch)
    if g.epoch_skipped:
        log(f"seed {st.seed}: epoch {epoch}: skipped {g.epoch_skipped} step(s) with a non-finite loss, "
            f"gradient or batch statistic ({g.skipped} in all)")
    extra = st.checkpoint_extra(modulator)
    if improved and st.dist.is_main:
        save_checkpoint(st.out / "best.pt", st.eval_model, st.optimizer, st.cfg, epoch, extra)
    if st.dist.is_main:
        if st.ema is not None:   # last.pt: the averaged weights as "model", the raw ones to resume from
            extra = {**extra, "train_model": st.model.state_dict(), "ema_updates": st.ema.updates}
        save_checkpoint(st.out / "last.pt", st.eval_model, st.optimizer, st.cfg, epoch, extra)
    return ev


def stepper(cfg: Config, data: MMSAData, seed: int = 1, epoch: int = 5):
    """``step(batch)``: one training step of a fresh run of ``cfg`` (model, AdamW, the modulator at its
    hook points, the guard), exactly as :func:`train_seed` takes it; for timing a strategy."""
    st = _State(cfg, data, seed, Path("."), torch.device(cfg.train.device), None, "")
    modulator = _make_modulator(st)
    modulator.begin_epoch(epoch)
    st.model.train()

    def step(b) -> None:
        _train_step(st, modulator, b, epoch)
    return step


def train_seed(cfg: Config, data: MMSAData, seed: int, out: Path, resume: bool = False,
               log=print, extra_loss=None, fingerprint: str = "") -> dict:
    """Train one seed. ``extra_loss`` (optional ``nn.Module``, e.g. distillation) is called as
    ``extra_loss(model_output, batch) -> (loss, terms)``; its parameters train with the model.
    ``fingerprint``: the data's content fingerprint, recorded in checkpoints for ``--resume``."""
    out.mkdir(parents=True, exist_ok=True)
    st = _State(cfg, data, seed, out, torch.device(cfg.train.device), extra_loss, fingerprint)
    if resume:
        st.resume(log)
    if st.dist.is_main:
        (out / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in st.history))
    tb = ScalarLog(out / "tb", cfg.train.tensorboard and st.dist.is_main)  # every scalar of log.jsonl, when asked
    modulator = _make_modulator(st)
    steps, step_s = 0, 0.0

    from tqdm.auto import tqdm
    stopped = st.bad_epochs >= cfg.train.patience
    bar = tqdm(range(st.start_epoch, cfg.train.epochs), desc=f"seed {seed}", unit="ep",
               disable=not cfg.train.progress or stopped or not st.dist.is_main, leave=False, dynamic_ncols=True)
    for epoch in bar:
        if stopped:
            break
        t0 = time.perf_counter()
        train_terms, balance, mod_rec = _train_epoch(st, modulator, epoch)
        st.dist.end_epoch(st.model, balance)           # BN buffers averaged; replicas checked equal
        if st.ema is not None:
            st.dist.average_buffers(st.ema.model)      # the averaged model's BN statistics too
        steps += st.steps_per_epoch
        step_s += time.perf_counter() - t0
        if (epoch + 1) % cfg.train.eval_every and epoch + 1 < cfg.train.epochs:
            continue                                   # train.eval_every: validate every N epochs
        ev = _record_epoch(st, modulator, epoch, train_terms, balance, mod_rec, t0, tb, log)
        bar.set_postfix(loss=f"{train_terms.get('task', float('nan')):.3f}", val_mae=f"{ev['metrics']['MAE']:.3f}",
                        best=st.best_epoch, skipped=st.guard.skipped)
        if st.bad_epochs >= cfg.train.patience:
            log(f"seed {seed}: early stop at epoch {epoch} (best {st.best_epoch})")
            break
    bar.close()
    tb.close()
    st.dist.barrier()                                  # rank 0 has written best.pt
    if not (out / "best.pt").is_file():
        raise CPSLError(f"seed {seed}: no epoch reached a finite validation loss, so there is no best.pt in {out} "
                        f"({st.guard.skipped} steps skipped as non-finite); likely cause: {st.guard.cause()}")
    res = _final(st, modulator, log)
    res["ms_per_step"] = 1e3 * step_s / steps if steps else None
    res["jitter"] = jitter([h["valid"]["MAE"] for h in st.history])
    return res


def _final(st: _State, modulator, log=print) -> dict:
    """The selected checkpoint, evaluated once on valid and test; plots."""
    out = st.out
    best, _, _ = load_model(out / "best.pt", st.device)
    res = {"seed": st.seed, "best_epoch": st.best_epoch, "epochs_run": len(st.history),
           "skipped_steps": st.guard.skipped, "backend": modulator.backend_name, "ckpt": str(out / "best.pt"),
           **modulator.results()}
    for split in ("valid", "test"):
        if split in st.data.splits and len(st.data[split]):
            ev = evaluate(best, st.data[split], st.cfg, st.device)
            res[split] = {k: ev["metrics"][k] for k in METRIC_KEYS}
            res[f"{split}_aux"] = ev["aux"]
            if ev["undefined"]:
                res[f"{split}_undefined"] = ev["undefined"]
                log(f"warning: seed {st.seed}: on {split}, " + "; ".join(f"{k} is undefined: {v}"
                                                                          for k, v in ev["undefined"].items()))
    try:
        from .plots import plot_balance, plot_curves
        if not st.dist.is_main:
            return res
        plot_curves(st.history, out / "curves.png", title=f"seed {st.seed}")
        plot_balance(st.history, out / "balance.png", title=f"seed {st.seed}")
    except Exception as e:  # noqa: BLE001 - plots must never sink a finished run
        log(f"warning: plots not written ({e})")
    return res


# ---------------------------------------------------------------------------- seeds
def run(cfg: Config, data: MMSAData, out: str | Path, resume: bool = False, log=print,
        extra_loss_factory=None, overwrite: bool = False) -> dict:
    """Train every seed of ``cfg.train.seeds`` and write ``out/results.json``.
    ``out`` holding a run is refused unless ``resume`` (same run: checked) or ``overwrite``.
    ``extra_loss_factory(seed) -> nn.Module`` adds a loss term per seed (see :func:`train_seed`)."""
    from .data.mmsa import require_splits
    from .runs import data_fingerprint, prepare_out, release_out
    strategies.check(cfg)
    require_splits({n: len(sp) for n, sp in data.splits.items()}, data.path or "the data")
    check_lengths(cfg.model, data, data.modalities, "config")
    fingerprint = data_fingerprint(data)
    ctx = distributed.setup(cfg, fingerprint, len(data["train"]), strategies.get(cfg.train.modulation).needs)
    if not ctx.is_main:                                # under torchrun rank 0 speaks and writes
        log = _silent
    out = ctx.on_main(prepare_out, out, resume=resume, overwrite=overwrite, seeds=cfg.train.seeds) or Path(out)
    try:
        return _run_seeds(cfg, data, out, ctx, resume, log, extra_loss_factory, fingerprint)
    finally:
        release_out(out)


def _run_seeds(cfg, data, out: Path, ctx, resume, log, extra_loss_factory, fingerprint) -> dict:
    """:func:`run` once ``out`` is prepared and locked."""
    for w in data.warnings():
        log(f"warning: {data.path or 'the data'}: {w}")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if ctx.is_main:
        cfg.save(out / "config.json")
    for w in strategies.get(cfg.train.modulation).start_warnings(cfg):
        log(f"warning: {w}")
    per_seed = []
    for seed in cfg.train.seeds:
        extra = extra_loss_factory(int(seed)) if extra_loss_factory is not None else None
        r = train_seed(cfg, data, int(seed), out / f"seed{seed}", resume=resume, log=log, extra_loss=extra,
                       fingerprint=fingerprint)
        per_seed.append(r)
        log(seed_summary(r))
    results = aggregate(cfg, data, per_seed, fingerprint)
    results["distributed"] = ctx.describe()            # never mistaken for N independent copies
    if ctx.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=2))
    ctx.barrier()
    return results


def jitter(values, skip: int = 3) -> float | None:
    """Mean |Δ| between consecutive epochs' values (valid MAE) after the first ``skip`` epochs
    (None with fewer than two such epochs): how much checkpoint selection is at the mercy of noise."""
    v = [float(x) for x in values[skip:]]
    return float(np.mean(np.abs(np.diff(v)))) if len(v) >= 2 else None


def _silent(*args, **kwargs) -> None:
    pass


def seed_summary(r: dict) -> str:
    msg = f"seed {r['seed']}: best epoch {r['best_epoch']}" + (f", {r['skipped_steps']} steps skipped"
                                                               if r.get("skipped_steps") else "")
    for split in ("valid", "test"):
        if split in r:
            msg += f" | {split} MAE {r[split]['MAE']:.4f} Corr {r[split]['Corr']:.4f} Non0_acc_2 {r[split]['Non0_acc_2']:.4f}"
    return msg


def aggregate(cfg: Config, data: MMSAData, per_seed: list[dict], fingerprint: str = "") -> dict:
    """results.json of a run: per-seed results and mean ± std over seeds per split."""
    results = {"data": data.path, "modalities": list(data.modalities), "seeds": [r["seed"] for r in per_seed],
               "modulation": cfg.train.modulation, "backend": per_seed[0]["backend"],
               "config": cfg.to_dict(), "data_fingerprint": fingerprint,
               "skipped_steps": sum(r.get("skipped_steps", 0) for r in per_seed), "per_seed": per_seed}
    results.update(strategies.get(cfg.train.modulation).aggregate(per_seed))   # e.g. CP's stopped epochs
    jit = [r.get("jitter") for r in per_seed]
    if all(j is not None for j in jit):
        results["jitter"] = mean_std([{"valid_MAE": j} for j in jit])["valid_MAE"]
    for split in ("valid", "test"):
        why = {r["seed"]: r[f"{split}_undefined"] for r in per_seed if f"{split}_undefined" in r}
        if why:                                        # NaN in the table below, and here why
            results[f"{split}_undefined"] = why
        if all(split in r for r in per_seed):
            results[split] = mean_std([r[split] for r in per_seed])
            results[f"{split}_aux"] = {m: mean_std([r[f"{split}_aux"][m] for r in per_seed])
                                       for m in data.modalities}
    return results
