"""One explicit training loop: seed → epochs (train, valid, early stop, checkpoint) → test once.

    loss.backward()
    stats = modulator.step(epoch, terms)   # ← gradient modulation (CP / OGM-GE / none)
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

from .checkpoint import CKPT_FORMAT, load_model, read_checkpoint, save_checkpoint  # noqa: F401 - re-exports
from .checkpoint import set_rng_state as _set_rng_state
from .config import Config
from .cp import native
from .cp.arena import GradArena
from .cp.baselines import OGMGE, NoModulation, ogm_scores
from .cp.penalty import ConflictAwarePenalty
from .data.batch import iterate
from .data.mmsa import MMSAData, Split
from .errors import CPSLError
from .losses import task_loss, total_loss
from .metrics import METRIC_KEYS, mean_std, mmsa_metrics
from .model import CPSLModel
from .tblog import ScalarLog


# ---------------------------------------------------------------------------- set-up
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def build_model(cfg: Config, data: MMSAData) -> CPSLModel:
    return CPSLModel(data.dims, cfg.model)


def build_optimizer(model: CPSLModel, cfg: Config, groups: dict[str, list], extra_params=()) -> torch.optim.Optimizer:
    """AdamW with one param group per modality group (per-group tensor lr: CP's ``update`` mode
    scales it on the device), a group for a pretrained text encoder (``train.text_lr``) and one
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
    return torch.optim.AdamW(pgs, weight_decay=cfg.train.weight_decay, fused=True)


def build_modulator(cfg: Config, model: CPSLModel, optimizer, device):
    groups = model.modality_parameters(cfg.cp.groups or None)
    if cfg.cp.modulation == "none":
        return NoModulation(groups, cfg.cp, diagnostics=cfg.cp.diagnostics, device=device)
    if cfg.cp.modulation == "ogm_ge":
        return OGMGE(groups, cfg.cp)
    return ConflictAwarePenalty(groups, cfg.cp, optimizer=optimizer if cfg.cp.mode == "update" else None,
                                device=device)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: CPSLModel, split: Split, batch_size: int, device, mask_modality: str | None = None):
    """Fused and unimodal predictions on a split: (pred (N,), aux {m: (N,)}, labels (N,))."""
    model.eval()
    preds, aux = [], {m: [] for m in model.modalities}
    for b in iterate(split, batch_size, modalities=model.modalities):
        b = b.to(device)
        if mask_modality:
            B = len(b)
            b.x[mask_modality] = torch.zeros(B, 1, b.x[mask_modality].shape[-1], device=device)
            b.mask[mask_modality] = torch.ones(B, 1, dtype=torch.bool, device=device)
        out = model(b.x, b.mask, b.text_bert)
        preds.append(out.pred.float().cpu())
        for m in model.modalities:
            aux[m].append(out.aux[m].float().cpu())
    return (torch.cat(preds).numpy(), {m: torch.cat(v).numpy() for m, v in aux.items()},
            split.labels.astype(np.float32))


def evaluate(model, split, cfg: Config, device, mask_modality=None) -> dict:
    pred, aux, y = predict(model, split, cfg.data.eval_batch_size, device, mask_modality)
    res = mmsa_metrics(pred, y)
    res["loss"] = float(task_loss(torch.from_numpy(pred), torch.from_numpy(y), cfg.loss.task))
    return {"metrics": res, "aux": {m: mmsa_metrics(p, y) for m, p in aux.items()}, "pred": pred, "aux_pred": aux}


# ---------------------------------------------------------------------------- checkpoints
# (cpsl/checkpoint.py; re-exported here so existing imports keep working)
def check_compatible(model: CPSLModel, data: MMSAData, ckpt_path: str = "checkpoint") -> None:
    if tuple(model.modalities) != tuple(data.modalities):
        raise CPSLError(f"{ckpt_path} was trained on modalities {list(model.modalities)} "
                        f"but the data has {list(data.modalities)}")
    for m in model.modalities:
        if m == "text" and model.text_backbone is not None:
            if next(iter(data.splits.values())).text_bert is None:
                raise CPSLError(f"{ckpt_path} runs a text encoder on token ids but the data has no text_bert")
            continue
        if model.dims[m] != data.dims[m]:
            raise CPSLError(f"{ckpt_path} expects {m} features of size {model.dims[m]} but the data has {data.dims[m]}")
    check_lengths(model.cfg, data, model.modalities, ckpt_path)


def check_lengths(mcfg, data: MMSAData, modalities, what: str = "the model") -> None:
    """Sequences longer than the positional table (``model.max_len``) cannot be encoded."""
    if not mcfg.ame:
        return
    for m in modalities:
        if m == "text" and mcfg.text_encoder:
            continue
        L = max((s.features[m].shape[1] for s in data.splits.values()), default=0)
        if L > mcfg.max_len:
            raise CPSLError(f"{what}: {m} sequences of the data are {L} steps long but model.max_len is "
                            f"{mcfg.max_len}; raise model.max_len")


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


def _resume(ck: dict, out: Path, cfg: Config, identity_fp: str, model, optimizer, extra_loss) -> dict:
    """Load ``last.pt`` into the model/optimizer after checking it is the same run; its loop state."""
    from .runs import resume_differences
    diffs = resume_differences(ck, cfg, identity_fp)
    if diffs:
        raise CPSLError(f"cannot resume from {out / 'last.pt'}: it was written with another "
                        f"{'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}")
    try:
        model.load_state_dict(ck["model"])
        if extra_loss is not None and ck.get("extra_loss") is not None:
            extra_loss.load_state_dict(ck["extra_loss"])
        optimizer.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"])
        return {"start": int(ck["epoch"]) + 1, "best_val": float(ck["best_val"]), "best_epoch": int(ck["best_epoch"]),
                "bad_epochs": int(ck["bad_epochs"]), "history": list(ck.get("history", [])),
                "skipped": int(ck.get("skipped_steps", 0))}
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CPSLError(f"{out / 'last.pt'} cannot be resumed from ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:100] if str(e) else ''})") from None


def _train_epoch(model, modulator, optimizer, guard, cfg: Config, split, epoch: int, seed: int, device,
                 extra_loss=None):
    """One pass over the training split; returns (mean terms of the steps taken, balance)."""
    model.train()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    sums: dict[str, torch.Tensor] = {}
    balance = _Balance(getattr(modulator, "names", ()))
    guard.new_epoch()
    nb = 0
    for b in iterate(split, cfg.data.batch_size, shuffle=True, generator=gen, modalities=model.modalities):
        b = b.to(device)
        out_ = model(b.x, b.mask, b.text_bert)
        loss, terms = total_loss(out_, b.y, cfg.loss, epoch)
        if extra_loss is not None:
            extra_loss.train()
            l2, t2 = extra_loss(out_, b)
            loss = loss + l2
            terms.update({k: v.detach() for k, v in t2.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not guard.check(loss):                          # ← non-finite: skip the whole step
            optimizer.zero_grad(set_to_none=True)
            continue
        if isinstance(modulator, OGMGE):
            terms.update(ogm_scores(out_.aux, b.y, cfg.loss.task))
        balance.add(modulator.step(epoch, terms))          # ← gradient modulation hook
        guard.clip(cfg.train.clip)
        optimizer.step()
        for k, v in terms.items():
            if not k.startswith("ogm_score"):
                sums[k] = sums.get(k, 0.0) + v
        nb += 1
    return {k: float(v) / nb for k, v in sums.items()}, balance


def train_seed(cfg: Config, data: MMSAData, seed: int, out: Path, resume: bool = False,
               log=print, extra_loss=None, fingerprint: str = "") -> dict:
    """Train one seed. ``extra_loss`` (optional ``nn.Module``, e.g. distillation) is called as
    ``extra_loss(model_output, batch) -> (loss, terms)``; its parameters train with the model.
    ``fingerprint``: the data's content fingerprint, recorded in checkpoints for ``--resume``."""
    from .guard import StepGuard
    from .runs import run_identity
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.train.device)
    set_seed(seed)
    model = build_model(cfg, data).to(device)
    optimizer_groups = model.modality_parameters(cfg.cp.groups or None)
    if extra_loss is not None:
        extra_loss.to(device)
    extra_params = [p for p in extra_loss.parameters() if p.requires_grad] if extra_loss is not None else []
    optimizer = build_optimizer(model, cfg, optimizer_groups, extra_params)
    train_split, valid_split = data["train"], data["valid"]
    st = {"start": 0, "best_val": float("inf"), "best_epoch": -1, "bad_epochs": 0, "history": [], "skipped": 0}
    log_path = out / "log.jsonl"
    if resume and (out / "last.pt").is_file():
        st = _resume(read_checkpoint(out / "last.pt"), out, cfg, fingerprint, model, optimizer, extra_loss)
        log(f"seed {seed}: resuming after epoch {st['start'] - 1}")
    elif resume:
        log(f"seed {seed}: nothing to resume in {out}; starting fresh")
    history, best_val, best_epoch, bad_epochs = st["history"], st["best_val"], st["best_epoch"], st["bad_epochs"]
    log_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    tb = ScalarLog(out / "tb", cfg.train.tensorboard)     # every scalar of log.jsonl, when asked
    # built after any optimizer state is loaded: update mode holds the live param groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the backend fallback is reported once by run()
        modulator = build_modulator(cfg, model, optimizer, device)
    # CP groups' grads live in a stable arena (zero_grad goes through it): one native plan per run
    GradArena.for_modulator(modulator, optimizer)
    plan_builds0 = native.plan_builds()
    params = [p for p in model.parameters() if p.requires_grad]
    guard = StepGuard(model, params, cfg.train.skip_limit, cfg.train.lr, extreme=train_split.extreme,
                      extra_params=extra_params)
    guard.skipped = st["skipped"]
    identity = run_identity(cfg, fingerprint)

    from tqdm.auto import tqdm
    stopped = bad_epochs >= cfg.train.patience
    bar = tqdm(range(st["start"], cfg.train.epochs), desc=f"seed {seed}", unit="ep",
               disable=not cfg.train.progress or stopped, leave=False, dynamic_ncols=True)
    for epoch in bar:
        if stopped:
            break
        t0 = time.perf_counter()
        train_terms, balance = _train_epoch(model, modulator, optimizer, guard, cfg, train_split, epoch, seed,
                                            device, extra_loss)
        ev = evaluate(model, valid_split, cfg, device)
        val_loss = ev["metrics"]["loss"]
        improved = val_loss < best_val - 1e-9
        if improved:
            best_val, best_epoch, bad_epochs = val_loss, epoch, 0
        else:
            bad_epochs += 1
        rec = {"epoch": epoch, "train": train_terms, "valid": ev["metrics"], "valid_aux": ev["aux"],
               "balance": balance.summary(), "skipped_steps": guard.epoch_skipped, "time_s": time.perf_counter() - t0}
        history.append(rec)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        tb.add(rec, epoch)
        if guard.epoch_skipped:
            log(f"seed {seed}: epoch {epoch}: skipped {guard.epoch_skipped} step(s) with a non-finite loss, "
                f"gradient or batch statistic ({guard.skipped} in all)")
        extra = {"best_val": best_val, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                 "history": history, "seed": seed, "data_path": data.path, "identity": identity,
                 "skipped_steps": guard.skipped,
                 "extra_loss": extra_loss.state_dict() if extra_loss is not None else None}
        if improved:
            save_checkpoint(out / "best.pt", model, optimizer, cfg, epoch, extra)
        save_checkpoint(out / "last.pt", model, optimizer, cfg, epoch, extra)
        bar.set_postfix(loss=f"{train_terms.get('task', float('nan')):.3f}", val_mae=f"{ev['metrics']['MAE']:.3f}",
                        best=best_epoch, skipped=guard.skipped)
        if bad_epochs >= cfg.train.patience:
            log(f"seed {seed}: early stop at epoch {epoch} (best {best_epoch})")
            break
    bar.close()
    tb.close()
    if not (out / "best.pt").is_file():
        raise CPSLError(f"seed {seed}: no epoch reached a finite validation loss, so there is no best.pt in {out} "
                        f"({guard.skipped} steps skipped as non-finite); likely cause: {guard.cause()}")
    res = _finish_seed(cfg, data, seed, out, device, history, best_epoch, modulator, guard.skipped, log)
    res["cp_plan_builds"] = native.plan_builds() - plan_builds0
    return res


def _finish_seed(cfg, data, seed, out, device, history, best_epoch, modulator, skipped, log) -> dict:
    """Evaluate the selected checkpoint once on valid and test; plots."""
    best, _, _ = load_model(out / "best.pt", device)
    res = {"seed": seed, "best_epoch": best_epoch, "epochs_run": len(history), "skipped_steps": skipped,
           "backend": getattr(modulator, "backend_name", "none"), "ckpt": str(out / "best.pt")}
    for split in ("valid", "test"):
        if split in data.splits and len(data[split]):
            ev = evaluate(best, data[split], cfg, device)
            res[split] = {k: ev["metrics"][k] for k in METRIC_KEYS}
            res[f"{split}_aux"] = ev["aux"]
    try:
        from .plots import plot_balance, plot_curves
        plot_curves(history, out / "curves.png", title=f"seed {seed}")
        plot_balance(history, out / "balance.png", title=f"seed {seed}")
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
    from .runs import data_fingerprint, prepare_out
    require_splits({n: len(sp) for n, sp in data.splits.items()}, data.path or "the data")
    check_lengths(cfg.model, data, data.modalities, "config")
    out = prepare_out(out, resume=resume, overwrite=overwrite)
    for w in data.warnings():
        log(f"warning: {data.path or 'the data'}: {w}")
    fingerprint = data_fingerprint(data)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    cfg.save(out / "config.json")
    if cfg.cp.modulation == "cp":
        from .cp.penalty import resolve_backend
        be, why = resolve_backend(cfg.cp.backend, cfg.train.device)
        if why:
            log(f"warning: CP backend 'native' unavailable ({why}); using '{be}'")
    per_seed = []
    for seed in cfg.train.seeds:
        extra = extra_loss_factory(int(seed)) if extra_loss_factory is not None else None
        r = train_seed(cfg, data, int(seed), out / f"seed{seed}", resume=resume, log=log, extra_loss=extra,
                       fingerprint=fingerprint)
        per_seed.append(r)
        msg = f"seed {seed}: best epoch {r['best_epoch']}" + (f", {r['skipped_steps']} steps skipped"
                                                             if r["skipped_steps"] else "")
        for split in ("valid", "test"):
            if split in r:
                msg += f" | {split} MAE {r[split]['MAE']:.4f} Corr {r[split]['Corr']:.4f} Non0_acc_2 {r[split]['Non0_acc_2']:.4f}"
        log(msg)
    results = {"data": data.path, "modalities": list(data.modalities), "seeds": list(cfg.train.seeds),
               "modulation": cfg.cp.modulation, "backend": per_seed[0]["backend"],
               "config": cfg.to_dict(), "data_fingerprint": fingerprint,
               "skipped_steps": sum(r["skipped_steps"] for r in per_seed), "per_seed": per_seed}
    for split in ("valid", "test"):
        if all(split in r for r in per_seed):
            results[split] = mean_std([r[split] for r in per_seed])
            results[f"{split}_aux"] = {m: mean_std([r[f"{split}_aux"][m] for r in per_seed])
                                       for m in data.modalities}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
