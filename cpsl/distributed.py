"""Data-parallel training with ``torch.distributed`` (``torchrun``): one process per GPU (NCCL) or per
CPU slot (gloo), every rank holding the whole model.

How a step is shared out (``cpsl/train.py`` calls in here; world size 1 is a no-op)::

    b = modulator.prepare_batch(global_batch)   # every rank: the single-process batch and its draws
    b = ctx.shard(b)                            # this rank's contiguous rows (np.array_split)
    with ctx.rng():                             # dropout draws from a per-rank stream; the global
        out = model(b); loss = ...              # generator stays identical on every rank
    modulator.backward(loss)
    loss, step = ctx.reduce_step(params, loss, step)   # ONE coalesced all-reduce of Σ_r (n_r/N)·∇L_r
    guard.check(loss); modulator.after_backward(step); optimizer.step()

The gradient average is weighted by each rank's share of the global batch, so a global batch of
``data.batch_size`` rows gives the single-process mean gradient exactly (up to float summation
order) whatever the split, including the last partial batch. A rank whose share is empty (a last
batch with fewer rows than ranks) runs one row of the batch with weight 0. After the all-reduce
every rank holds bit-identical gradients, so CP and every gradient-reading strategy compute the
same factors with no further communication; ``after_backward`` sees the global batch's mean loss
terms and the gathered predictions/labels (``step.out.pred``, ``step.out.aux``, ``step.batch.y``,
``step.batch.index``: the global batch), ``step.batch.x``/``mask`` and ``step.out.h`` stay local.

Why not ``DistributedDataParallel``: DDP averages with 1/W (wrong for an uneven last batch), runs
its reduction inside ``backward`` (before a strategy's extra passes could be combined) and moves
gradients into its own buckets (CP's gradient arena holds them in one aligned buffer per group).
Here the arena stays on: the reduced values are copied back in place, so its pointers (one native
plan per run) survive. The cost: communication does not overlap the backward pass.

Not synchronised per step: the masked BatchNorm statistics (each rank normalises with its own
rows, as DDP without SyncBatchNorm); its running buffers are averaged at each epoch's end so every
rank evaluates and checkpoints the same model. ``docs/distributed.md`` measures the effect.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import zlib

import numpy as np
import torch

from .errors import CPSLError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: strategies refused under world size > 1 (their extra backward passes read per-sample
#: activations whose batch-level statistics would differ per rank; see docs/distributed.md)
REFUSED_NEEDS = frozenset({"extra_backward"})


def launched() -> bool:
    """True under ``torchrun`` (or any launcher that sets its environment variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def rows_of(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s contiguous share of ``n`` rows (``np.array_split`` sizes)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_world(world: int, n_train: int, batch_size: int) -> None:
    """A world size the data can feed: every rank needs rows of every full global batch."""
    if world > n_train:
        raise CPSLError(f"world size {world} is larger than the training split ({n_train} samples); "
                        "launch fewer processes")
    if world > batch_size:
        raise CPSLError(f"world size {world} is larger than the global batch (data.batch_size={batch_size}); "
                        "raise data.batch_size or launch fewer processes")


def config_digest(cfg_dict: dict, fingerprint: str) -> str:
    """What every rank must agree on: the run config (less its device) and the data's fingerprint."""
    d = json.loads(json.dumps(cfg_dict, default=str))
    d.get("train", {}).pop("device", None)
    d.get("train", {}).pop("progress", None)
    d.get("data", {}).pop("path", None)          # the same data may sit at another path on each node
    return hashlib.sha256((json.dumps(d, sort_keys=True) + fingerprint).encode()).hexdigest()[:16]


class Context:
    """The process group as the training loop sees it (world size 1: everything is a no-op)."""

    def __init__(self, world_size: int = 1, rank: int = 0, local_rank: int = 0, backend: str | None = None):
        self.world_size, self.rank, self.local_rank, self.backend = world_size, rank, local_rank, backend
        self.share = 1.0                  # this rank's share of the current global batch
        self._sizes: list[int] = []       # every rank's row count in the current global batch
        self._crc = 0                     # digest of the epoch's global batches (rows, in order)
        self._epoch, self._step = 0, 0     # position in the run: seeds the forward pass's stream
        self.epoch_record: dict = {}

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend}

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def _gather_objects(self, obj) -> list:
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def on_main(self, fn, *args, **kwargs):
        """``fn`` on rank 0 only (file-system work); a CPSLError there is raised on every rank."""
        if not self.active:
            return fn(*args, **kwargs)
        res, err = None, None
        if self.is_main:
            try:
                res = fn(*args, **kwargs)
            except CPSLError as e:
                err = str(e)
        msg = [err]
        torch.distributed.broadcast_object_list(msg, src=0)
        if msg[0] is not None:
            raise CPSLError(msg[0])
        return res

    def agree(self, digest: str) -> None:
        """Every rank runs the same config on the same data (else one error on every rank)."""
        if not self.active:
            return
        seen = self._gather_objects(digest)
        if len(set(seen)) > 1:
            odd = [r for r, d in enumerate(seen) if d != seen[0]]
            raise CPSLError(f"the ranks were launched with different configs or data (ranks {odd} differ from "
                            "rank 0); launch every rank with the same command, config and data")

    # ------------------------------------------------------------------ a training step
    def shard(self, batch):
        """This rank's contiguous rows of the global batch (world 1: the batch itself)."""
        self._step += 1
        if not self.active:
            self.share, self._sizes = 1.0, [len(batch)]
            return batch
        n = len(batch)
        self._sizes = [b - a for a, b in (rows_of(n, self.world_size, r) for r in range(self.world_size))]
        a, b = rows_of(n, self.world_size, self.rank)
        self.share = (b - a) / n
        if a == b:                         # an empty share: one row, weight 0
            a, b = 0, 1
        from .data.batch import Batch
        return Batch({m: v[a:b] for m, v in batch.x.items()}, {m: v[a:b] for m, v in batch.mask.items()},
                     batch.y[a:b], batch.index[a:b], None if batch.text_bert is None else batch.text_bert[a:b])

    def rng(self):
        """Under world size > 1: the forward pass draws (dropout) from a per-rank stream seeded by
        (global generator state, epoch, step, rank) without advancing the global generator, which
        so stays identical on every rank and is consumed by the strategies exactly as in one
        process (ModDrop masks, GE noise); ``last.pt`` saves it, so ``--resume`` is deterministic."""
        if not self.active:
            return contextlib.nullcontext()
        where = np.array([self._epoch, self._step, self.rank], dtype=np.int64).tobytes()
        return _seeded_fork(zlib.crc32(torch.get_rng_state().numpy().tobytes(), zlib.crc32(where)))

    def reduce_step(self, params, loss: torch.Tensor, step, bns=()):
        """All-reduce the weighted gradients (in place), the loss, the loss terms and the batch
        statistics' finiteness; gather predictions/labels. Returns the global (loss, step)."""
        if not self.active:
            self._crc = zlib.crc32(np.ascontiguousarray(step.batch.index, dtype=np.int64).tobytes(), self._crc)
            return loss, step
        dist = torch.distributed
        dev = loss.device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dev)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [p for p, h in zip(params, has.tolist()) if h]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        keys = sorted(step.terms)
        dtype = live[0].grad.dtype if live else torch.float32
        bad = sum((~bn.stats_ok).to(dtype) for bn in bns if getattr(bn, "stats_ok", None) is not None) \
            if bns else torch.zeros((), dtype=dtype, device=dev)
        scalars = torch.stack([loss.detach().to(dtype) * self.share] +
                              [torch.as_tensor(step.terms[k], device=dev).to(dtype) * self.share for k in keys])
        flat = torch.cat([g.grad.reshape(-1) for g in live] + [scalars.reshape(-1)]) if live else scalars
        flat[:flat.numel() - scalars.numel()] *= self.share
        flat = torch.cat([flat, torch.as_tensor(bad, dtype=dtype, device=dev).reshape(1)])
        dist.all_reduce(flat)
        off = 0
        for p in live:
            n = p.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
            off += n
        loss_g = flat[off]
        terms = {k: flat[off + 1 + i].detach() for i, k in enumerate(keys)}
        ok = flat[-1] == 0
        for bn in bns:
            bn.stats_ok = ok
        return loss_g, self._global_step(step, terms)

    def _global_step(self, step, terms):
        """The step as ``after_backward`` sees it: global terms, gathered pred/aux/y/index."""
        out, b = step.out, step.batch
        mods = list(out.aux)
        n_local = self._sizes[self.rank]
        cols = [out.pred.detach().double()] + [out.aux[m].detach().double() for m in mods] + \
               [b.y.double(), torch.as_tensor(b.index, dtype=torch.float64, device=b.y.device)]
        local = torch.stack(cols, 1)[:n_local]                       # (n_r, M + 3)
        g = self.gather_rows(local, self._sizes)                      # (N, M + 3)
        index = g[:, -1].cpu().numpy().astype(np.int64)
        self._crc = zlib.crc32(np.ascontiguousarray(index).tobytes(), self._crc)
        aux = {m: g[:, 1 + i].to(out.aux[m].dtype) for i, m in enumerate(mods)}
        out = dataclasses.replace(out, pred=g[:, 0].to(out.pred.dtype), aux=aux)
        batch = dataclasses.replace(b, y=g[:, -2].to(b.y.dtype), index=index)
        return dataclasses.replace(step, batch=batch, out=out, terms=terms)

    def gather_rows(self, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's (n_r, k) rows in rank order (``sizes``: every n_r)."""
        if not self.active:
            return local
        width = max(sizes)
        pad = torch.zeros(width, *local.shape[1:], dtype=local.dtype, device=local.device)
        pad[:local.shape[0]] = local
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, pad)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    # ------------------------------------------------------------------ epochs and evaluation
    def begin_epoch(self, epoch: int = 0) -> None:
        self._crc, self._epoch, self._step = 0, int(epoch), 0

    def average_buffers(self, model: torch.nn.Module) -> None:
        """The model's floating buffers (BatchNorm running statistics) := their mean over ranks."""
        if not self.active:
            return
        bufs = [b for b in model.buffers() if b.is_floating_point()]
        if bufs:
            flat = torch.cat([b.reshape(-1).double() for b in bufs])
            torch.distributed.all_reduce(flat)
            flat /= self.world_size
            off = 0
            for b in bufs:
                b.copy_(flat[off:off + b.numel()].view_as(b))
                off += b.numel()

    def end_epoch(self, model: torch.nn.Module, balance: dict | None) -> dict:
        """Average the model's floating buffers (BatchNorm running statistics) across ranks, then
        gather what must be identical on every rank (a CRC of the parameters' bytes, the mean
        factors k): differing parameters are an error, not a silent divergence (ranks on different
        hardware whose kernels round differently would trip it). Returns (and keeps) the record."""
        rec = {"world_size": self.world_size, "backend": self.backend, "batches_crc": self._crc}
        if self.active:
            self.average_buffers(model)
            check = 0                                   # CRC-32 of every parameter's bytes: exact
            for p in model.parameters():
                check = zlib.crc32(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), check)
            k = sorted((balance or {}).get("k", {}).items())
            mine = {"params": check, "k": [v for _, v in k]}
            seen = self._gather_objects(mine)
            rec["rank_params"] = [s["params"] for s in seen]
            rec["rank_k"] = [s["k"] for s in seen]
            if any(s["params"] != seen[0]["params"] for s in seen):
                raise CPSLError(f"the ranks' models diverged in an epoch (parameter CRCs {rec['rank_params']}, "
                                f"mean k per rank {rec['rank_k']}); please report this with the config")
        self.epoch_record = rec
        return rec

    def predict(self, predict_fn, model, split, *args):
        """``predict_fn(model, split, *args) -> (pred, aux, y)`` on this rank's contiguous rows,
        gathered in the original order: every sample evaluated once."""
        if not self.active:
            return predict_fn(model, split, *args)
        n = len(split)
        sizes = [b - a for a, b in (rows_of(n, self.world_size, r) for r in range(self.world_size))]
        a, b = rows_of(n, self.world_size, self.rank)
        mods = list(model.modalities)
        dev = next(model.parameters()).device
        if b > a:
            pred, aux, _ = predict_fn(model, _rows(split, a, b), *args)
            local = torch.from_numpy(np.stack([pred] + [aux[m] for m in mods], 1).astype(np.float64))
        else:
            local = torch.zeros(0, 1 + len(mods), dtype=torch.float64)
        g = self.gather_rows(local.to(dev), sizes).cpu().numpy()
        return (g[:, 0].astype(np.float32), {m: g[:, 1 + i].astype(np.float32) for i, m in enumerate(mods)},
                split.labels.astype(np.float32))


def _rows(split, a: int, b: int):
    """Rows [a, b) of a split (views, no copy)."""
    return dataclasses.replace(
        split, features={m: f[a:b] for m, f in split.features.items()},
        lengths={m: v[a:b] for m, v in split.lengths.items()}, labels=split.labels[a:b], ids=split.ids[a:b],
        raw_text=split.raw_text[a:b], text_bert=None if split.text_bert is None else split.text_bert[a:b])


@contextlib.contextmanager
def _seeded_fork(seed: int):
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------- set-up
_CURRENT = Context()


def current() -> Context:
    """The context :func:`setup` made (world size 1 outside a launched run)."""
    return _CURRENT


def setup(cfg, fingerprint: str, n_train: int, needs=frozenset()) -> Context:
    """Under ``torchrun``: initialise the process group (NCCL on CUDA, gloo on CPU) unless the caller
    did, check the world size against the data, the strategy and that every rank runs the same
    config and data. Outside a launcher: world size 1. Every refusal is one CPSLError on every rank."""
    global _CURRENT
    dist = torch.distributed
    if not (launched() or (dist.is_available() and dist.is_initialized())):
        _CURRENT = Context()
        return _CURRENT
    if not dist.is_available():
        raise CPSLError("launched under torchrun but this torch build has no torch.distributed")
    cuda = cfg.train.device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda and cfg.train.device != "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise CPSLError(f"train.device={cfg.train.device} names one GPU for every rank; under torchrun pass "
                        "--device cuda (rank r uses cuda:LOCAL_RANK)")
    if not dist.is_initialized():
        if cuda:
            if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
                raise CPSLError(f"rank with LOCAL_RANK={local_rank} has no GPU (found "
                                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}); "
                                "use --nproc_per_node <= the GPUs per node")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_teardown)
    elif cuda:
        torch.cuda.set_device(local_rank)
    ctx = Context(dist.get_world_size(), dist.get_rank(), local_rank, dist.get_backend())
    _CURRENT = ctx
    ctx.agree(config_digest(cfg.to_dict(), fingerprint))
    if ctx.active:
        check_world(ctx.world_size, n_train, cfg.data.batch_size or n_train)
        refused = REFUSED_NEEDS & set(needs)
        if refused:
            raise CPSLError(f"modulation {cfg.train.modulation!r} cannot run with world size {ctx.world_size}: its "
                            "extra backward passes compare per-rank gradients of batch-level terms; train it "
                            "in one process")
    return ctx


def _teardown() -> None:
    """At exit: every rank reaches a barrier first, so no rank tears its gloo connections down while
    another still uses them (seen as ``terminate called without an active exception``, SIGABRT, on
    the slower rank); a rank that died is waited for 60 s at most."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: tear down anyway
            pass
        dist.destroy_process_group()
