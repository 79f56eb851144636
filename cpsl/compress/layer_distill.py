"""Layer-wise distillation of a fine-tuned teacher into a 2–3 layer end-to-end student (issue 32).

The student is the teacher cut to its first ``N`` encoder layers (:func:`text_distill.shallow_student`:
initialised from the teacher's fine-tuned layers, its head, fusion and AME encoders copied), then
trained on a **transfer set**: MOSI's training split plus unlabelled transcripts (MOSEI's), never
MOSI valid or test.

On every transfer batch (text only) the student imitates the teacher's encoder layer by layer:

* hidden states, TinyBERT's uniform layer map (student layer ``i`` ↔ teacher layer ``i·T/N``):
  ``L_hid = mean_i MSE(H_s^i, H_t^{i·T/N})`` over real tokens;
* MiniLM-v2 self-attention relations of the last layer: for each of the query, key and value
  vectors, split into ``R`` relation heads, ``softmax(X Xᵀ / √d_r)`` (keys masked to real tokens);
  ``L_rel = mean over Q,K,V, heads and real query tokens of KL(teacher ‖ student)``.

Every ``mosi_every``-th step adds one MOSI training batch with the same two terms plus the
prediction terms ``w_kd · MSE(ŷ_s, ȳ_ens) + w_task · ℓ(ŷ_s, y)``, where ``ȳ_ens`` is the mean
prediction of the teacher **ensemble** (every checkpoint given; the first one is also the layer
teacher). The word-embedding table stays the teacher's (frozen: the int8 export quantizes one
table, and the 11.7 M rows need no optimizer state). AdamW, linear warm-up and decay; the student
is scored on MOSI valid after each epoch and the epoch with the lowest valid task loss is kept.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import CPSLError
from .text_distill import check_layers, fused_prediction, shallow_student

# torch is imported inside the functions (the CLI imports this module for --help)


@dataclass
class LayerDistillSettings:
    layers: int = 3
    epochs: int = 6
    lr: float = 1e-4                    # student encoder layers
    head_lr: float = 5e-5               # the rest (AME encoders, fusion, heads)
    batch_size: int = 32
    mosi_every: int = 4                 # one MOSI training batch every N transfer batches
    transfer_rows: int = 0              # 0: every unlabelled transcript; else a seeded subset
    w_hidden: float = 1.0
    w_rel: float = 1.0
    w_kd: float = 1.0
    w_kd_transfer: float = 3.0          # prediction KD on the transfer transcripts (other modalities: their mean)
    w_task: float = 0.5
    relation_heads: int = 12                # MiniLM-v2; the encoder's attention heads where 12 does not divide its width
    warmup: float = 0.06                # share of the steps with a linear warm-up
    freeze_word_embeddings: bool = True
    text_only: bool = False             # a student without the other modalities (text_only_student)
    bucket: int = 8                     # transfer batches of similar lengths (cpsl.data.batch.bucket_order)
    seed: int = 1
    progress: bool = True

    def check(self) -> None:
        if self.layers < 1:
            raise CPSLError(f"layers must be >= 1, got {self.layers}")
        if self.epochs < 1:
            raise CPSLError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.mosi_every < 1:
            raise CPSLError("batch_size and mosi_every must be >= 1")
        if self.relation_heads < 1:
            raise CPSLError("relation_heads must be >= 1")
        if min(self.w_hidden, self.w_rel, self.w_kd, self.w_task) < 0:
            raise CPSLError("loss weights must be >= 0")


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer (1-based) each student layer imitates: TinyBERT's uniform map, the last onto the last."""
    if not 1 <= n_student <= n_teacher:
        raise CPSLError(f"a {n_student}-layer student of a {n_teacher}-layer teacher is not possible")
    return [round((i + 1) * n_teacher / n_student) for i in range(n_student)]


# ---------------------------------------------------------------------------- losses
def log_relations(x, mask, heads: int):
    """``log softmax(X Xᵀ/√d_r)`` per relation head, keys masked: (B, R, L, L)."""
    import torch
    B, L, d = x.shape
    if d % heads:
        raise CPSLError(f"relation_heads {heads} does not divide the hidden size {d}")
    dr = d // heads
    xh = x.reshape(B, L, heads, dr).transpose(1, 2)                              # (B, R, L, d_r)
    s = torch.matmul(xh, xh.transpose(-1, -2)) / math.sqrt(dr)
    s = s.masked_fill(~mask[:, None, None, :], -1e4)
    return torch.log_softmax(s, dim=-1)


def relation_kl(xs, xt, mask, heads: int):
    """Mean KL(teacher ‖ student) of the relation distributions over heads and real query tokens."""
    ls, lt = log_relations(xs, mask, heads), log_relations(xt, mask, heads)
    kl = (lt.exp() * (lt - ls)).masked_fill(~mask[:, None, None, :], 0.0).sum(-1)   # (B, R, L)
    m = mask[:, None, :].to(kl.dtype)
    return (kl * m).sum() / (m.sum() * heads).clamp_min(1)


def masked_mse(a, b, mask):
    m = mask.unsqueeze(-1).to(a.dtype)
    return ((a - b) ** 2 * m).sum() / (m.sum() * a.shape[-1]).clamp_min(1)


class EncoderTap:
    """Runs a Hugging Face BERT encoder returning every layer's hidden states and the last
    layer's query/key/value projections (forward hooks)."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.enc = backbone.encoder
        att = self.enc.encoder.layer[-1].attention.self
        self.qkv = {}
        self.hooks = [getattr(att, k).register_forward_hook(self._keep(k)) for k in ("query", "key", "value")]

    def _keep(self, name):
        def hook(mod, inp, out):
            self.qkv[name] = out
        return hook

    def __call__(self, text_bert):
        ids, att, seg = text_bert[:, 0], text_bert[:, 1], text_bert[:, 2]
        out = self.enc(input_ids=ids, attention_mask=att, token_type_ids=seg, output_hidden_states=True)
        return list(out.hidden_states[1:]), dict(self.qkv), att.bool()

    def close(self):
        for h in self.hooks:
            h.remove()


def layer_losses(s_tap, t_tap, text_bert, lmap, heads):
    """(hidden, relation) losses of one batch; also the student's and the teacher's last hidden states
    (zero on padding) and the mask."""
    import torch
    with torch.no_grad():
        t_hid, t_qkv, _ = t_tap(text_bert)
    s_hid, s_qkv, mask = s_tap(text_bert)
    hid = sum(masked_mse(s_hid[i], t_hid[j - 1], mask) for i, j in enumerate(lmap)) / len(lmap)
    rel = sum(relation_kl(s_qkv[k], t_qkv[k], mask, heads) for k in ("query", "key", "value")) / 3
    m = mask.unsqueeze(-1).to(s_hid[-1].dtype)
    return hid, rel, s_hid[-1] * m, t_hid[-1] * m, mask


@contextlib.contextmanager
def frozen_others(model):
    """The non-text AME encoders in eval mode (running statistics, no dropout) inside the block."""
    others = [model.encoders[m] for m in model.modalities if m != "text"]
    modes = [e.training for e in others]
    for e in others:
        e.eval()
    try:
        yield
    finally:
        for e, t in zip(others, modes):
            e.train(t)


class _Fill:
    """The other modalities of a text-only transfer batch: each modality's mean training frame, one step."""

    def __init__(self, split, modalities, device):
        import torch
        self.frames = {}
        for m in modalities:
            if m == "text":
                continue
            f, n = split.features[m], split.lengths[m]
            valid = np.arange(f.shape[1])[None, :] < n[:, None]
            self.frames[m] = torch.from_numpy((f * valid[..., None]).sum((0, 1)) / max(1, valid.sum())).float().to(device)

    def batch(self, B: int, modalities):
        import torch
        from types import SimpleNamespace
        x = {m: self.frames[m].expand(B, 1, -1) for m in modalities if m in self.frames}
        mask = {m: torch.ones(B, 1, dtype=torch.bool, device=v.device) for m, v in x.items()}
        return SimpleNamespace(x=x, mask=mask)


def text_only_student(teacher, cfg, layers: int):
    """A text-only student (no audio/vision input): the teacher's first ``layers`` encoder layers, its
    text AME encoder and head; the fusion's MLP and residual start from their text columns."""
    import torch

    from ..model import CPSLModel
    if teacher.modalities == ("text",):
        return shallow_student(teacher, cfg, layers)
    shallow, scfg = shallow_student(teacher, cfg, layers)
    student = CPSLModel({"text": teacher.dims["text"]}, scfg.model)
    d = scfg.model.d
    src = shallow.state_dict()
    own = student.state_dict()
    with torch.no_grad():
        for k, v in own.items():
            if k in src and src[k].shape == v.shape:
                v.copy_(src[k])
            elif k in ("fusion.mlp.0.weight", "fusion.res.weight") and k in src:
                v.copy_(src[k][:, :d])                       # text is the first block of the concatenation
    for p in student.parameters():
        p.requires_grad_(True)
    return student, scfg


# ---------------------------------------------------------------------------- targets
def ensemble_predictions(ckpts, splits, device: str = "cpu", batch_size: int = 64) -> list:
    """For each split, ``(mean (N,), per member (M, N))``: the fused predictions of every checkpoint
    (each loaded once)."""
    import torch

    from ..checkpoint import load_model
    from ..data.batch import iterate
    preds = [[] for _ in splits]
    for ck in ckpts:
        model, _, _ = load_model(ck, device)
        model.eval()
        for out, split in zip(preds, splits):
            p = np.zeros(len(split), np.float32)
            with torch.no_grad():
                for b in iterate(split, batch_size, modalities=model.modalities):
                    b = b.to(device)
                    p[b.index] = model.predict(b.x, b.mask, b.text_bert).float().cpu().numpy()
            out.append(p)
        del model
    return [(np.stack(P).mean(0), np.stack(P)) for P in preds]


def transfer_ids(path, max_rows: int = 0, seed: int = 0) -> np.ndarray:
    """Token ids (N, 3, L) of every row of an MMSA pickle (all its splits): the unlabelled part of the
    transfer set. ``max_rows`` > 0 keeps a seeded random subset."""
    from ..data.mmsa import load_mmsa
    data = load_mmsa(path)
    parts = [s.text_bert for s in data.splits.values() if s.text_bert is not None and len(s)]
    if not parts:
        raise CPSLError(f"{path} has no text_bert token ids: it cannot be a transfer set")
    L = max(p.shape[2] for p in parts)
    ids = np.concatenate([np.pad(p, ((0, 0), (0, 0), (0, L - p.shape[2]))) for p in parts]).astype(np.int64)
    if max_rows and max_rows < len(ids):
        ids = ids[np.random.default_rng(seed).choice(len(ids), max_rows, replace=False)]
    return ids


def _id_batches(ids: np.ndarray, batch_size: int, bucket: int, gen):
    import torch

    from ..data.batch import bucket_order
    lens = ids[:, 1].astype(bool).sum(1)
    order = bucket_order(torch.randperm(len(ids), generator=gen).numpy(), lens, batch_size, bucket, gen)
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        L = max(int(lens[rows].max()), 1)
        yield torch.from_numpy(np.ascontiguousarray(ids[rows, :, :L]))


def _cycle(split, batch_size, gen, modalities):
    from ..data.batch import iterate
    while True:
        yield from iterate(split, batch_size, shuffle=True, generator=gen, modalities=modalities)


# ---------------------------------------------------------------------------- the run
def distill_layers(teachers, data, transfer, out, s: LayerDistillSettings, device: str = "cpu", log=print) -> dict:
    """Distil ``teachers[0]``'s encoder (and the ensemble's predictions) into an ``s.layers``-layer
    student; write ``out/best.pt``, ``out/results.json`` and ``out/curve.png``; return the results.

    ``data``: the MOSI :class:`MMSAData` (train, valid); ``transfer``: token ids (N, 3, L) of the
    unlabelled transcripts (:func:`transfer_ids`), or None for MOSI train only."""
    import torch

    from ..checkpoint import check_compatible, load_model, save_checkpoint
    from ..evaluation import evaluate
    from ..losses import task_loss
    from ..metrics import METRIC_KEYS, mmsa_metrics
    s.check()
    teachers = [Path(t) for t in teachers]
    if not teachers:
        raise CPSLError("layer-wise distillation needs at least one teacher checkpoint")
    tr, va = data["train"], data["valid"]
    if len(tr) == 0 or len(va) == 0:
        raise CPSLError("distillation needs non-empty train and valid splits")
    if tr.text_bert is None:
        raise CPSLError("the data has no text_bert token ids (an end-to-end teacher needs them)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    (ens_train, _), (ens_valid, members_valid) = ensemble_predictions(teachers, [tr, va], device)
    y_va = va.labels.astype(np.float32)
    log(f"ensemble of {len(teachers)}: targets on {len(tr)} training rows ({time.perf_counter() - t0:.0f} s); "
        f"valid MAE {mmsa_metrics(ens_valid, y_va)['MAE']:.4f}")
    teacher, cfg, tck = load_model(teachers[0], device)
    check_compatible(teacher, data, str(teachers[0]))
    check_layers(teacher, s.layers)
    teacher.eval()
    n_t = len(teacher.text_backbone.encoder.encoder.layer)
    enc_cfg = teacher.text_backbone.encoder.config
    rel_heads = s.relation_heads
    if enc_cfg.hidden_size % rel_heads:        # e.g. a small encoder: its own attention heads instead
        rel_heads = int(enc_cfg.num_attention_heads)
        log(f"relation heads: {s.relation_heads} does not divide the hidden size {enc_cfg.hidden_size}; "
            f"using the encoder's {rel_heads} attention heads")
    vocab = int(teacher.text_backbone.encoder.config.vocab_size)
    if transfer is not None and len(transfer) and int(transfer[:, 0].max()) >= vocab:
        raise CPSLError(f"the transfer set has token ids up to {int(transfer[:, 0].max())} but the teacher's "
                        f"vocabulary has {vocab}: it was tokenized for another encoder")
    lmap = layer_map(n_t, s.layers)
    t_valid = mmsa_metrics(members_valid[0], y_va)              # the first member is this teacher
    torch.manual_seed(s.seed)
    student, scfg = (text_only_student if s.text_only else shallow_student)(teacher, cfg, s.layers)
    student.to(device)
    word = student.text_backbone.encoder.embeddings.word_embeddings.weight
    if s.freeze_word_embeddings:
        word.requires_grad_(False)
    enc_ids = {id(p) for p in student.text_backbone.parameters()}
    enc = [p for p in student.text_backbone.parameters() if p.requires_grad]
    rest = [p for p in student.parameters() if id(p) not in enc_ids and p.requires_grad]
    opt = torch.optim.AdamW([{"params": enc, "lr": s.lr}, {"params": rest, "lr": s.head_lr}], weight_decay=0.01)
    gen = torch.Generator().manual_seed(s.seed)
    n_tr_batches = len(transfer) // s.batch_size + bool(len(transfer) % s.batch_size) if transfer is not None else 0
    steps_per_epoch = n_tr_batches or ((len(tr) + s.batch_size - 1) // s.batch_size)
    total = steps_per_epoch * s.epochs
    warm = max(1, int(s.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min((k + 1) / warm, max(0.0, (total - k) / max(1, total - warm))))
    t_tap, s_tap = EncoderTap(teacher.text_backbone), EncoderTap(student.text_backbone)
    mosi_it = _cycle(tr, s.batch_size, gen, student.modalities)
    fill = _Fill(tr, teacher.modalities, device)
    ens_t = torch.from_numpy(ens_train).to(device)
    history, best = [], None
    log(f"{s.layers}-layer student (teacher layers {lmap} of {n_t}): {len(transfer) if transfer is not None else 0} "
        f"transfer transcripts + {len(tr)} MOSI training rows, {steps_per_epoch} steps/epoch × {s.epochs}")
    try:
        for ep in range(s.epochs):
            student.train()
            t1 = time.perf_counter()
            sums = {"hidden": 0.0, "relation": 0.0, "kd": 0.0, "task": 0.0, "kd_transfer": 0.0}
            counts = {"transfer": 0, "mosi": 0}
            batches = _id_batches(transfer, s.batch_size, s.bucket, gen) if n_tr_batches else None
            bar = None
            if s.progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=steps_per_epoch, desc=f"distil L{s.layers} epoch {ep + 1}/{s.epochs}",
                           unit="step", leave=False)
            for step in range(steps_per_epoch):
                loss = 0.0
                if batches is not None:
                    tb = next(batches).to(device)
                    hid, rel, h, ht, mask = layer_losses(s_tap, t_tap, tb, lmap, rel_heads)
                    loss = s.w_hidden * hid + s.w_rel * rel
                    if s.w_kd_transfer:
                        with torch.no_grad():
                            t_pred = fused_prediction(teacher, fill.batch(len(tb), teacher.modalities), ht, mask)
                        with frozen_others(student):     # a constant frame must not move their BatchNorm stats
                            s_pred = fused_prediction(student, fill.batch(len(tb), student.modalities), h, mask)
                        kdt = torch.nn.functional.mse_loss(s_pred, t_pred)
                        loss = loss + s.w_kd_transfer * kdt
                        sums["kd_transfer"] += float(kdt.detach())
                    sums["hidden"] += float(hid.detach())
                    sums["relation"] += float(rel.detach())
                    counts["transfer"] += 1
                if batches is None or step % s.mosi_every == 0:
                    b = next(mosi_it).to(device)
                    hid, rel, h, _, mask = layer_losses(s_tap, t_tap, b.text_bert, lmap, rel_heads)
                    pred = fused_prediction(student, b, h, mask)
                    idx = torch.as_tensor(b.index, device=device)
                    kd = torch.nn.functional.mse_loss(pred, ens_t[idx])
                    tl = task_loss(pred, b.y, cfg.loss.task)
                    loss = loss + s.w_hidden * hid + s.w_rel * rel + s.w_kd * kd + s.w_task * tl
                    sums["hidden"] += float(hid.detach())
                    sums["relation"] += float(rel.detach())
                    sums["kd"] += float(kd.detach())
                    sums["task"] += float(tl.detach())
                    counts["mosi"] += 1
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
                opt.step()
                sched.step()
                if bar is not None:
                    bar.update(1)
                    if step % 20 == 0:
                        bar.set_postfix(hid=f"{float(hid.detach()):.3f}", rel=f"{float(rel.detach()):.3f}")
            if bar is not None:
                bar.close()
            ev = evaluate(student, va, scfg, device)["metrics"]
            n_layer = max(1, counts["transfer"] + counts["mosi"])       # batches with the layer terms
            rec = {"epoch": ep + 1, "seconds": time.perf_counter() - t1,
                   "hidden": sums["hidden"] / n_layer, "relation": sums["relation"] / n_layer,
                   "kd": sums["kd"] / max(1, counts["mosi"]), "task": sums["task"] / max(1, counts["mosi"]),
                   "kd_transfer": sums["kd_transfer"] / max(1, counts["transfer"]),
                   "batches": counts, "valid": {k: ev[k] for k in METRIC_KEYS}, "valid_loss": ev["loss"]}
            history.append(rec)
            log(f"L{s.layers} epoch {ep + 1}/{s.epochs}: hidden {rec['hidden']:.4f} relation {rec['relation']:.4f} "
                f"kd {rec['kd']:.4f} kd_transfer {rec['kd_transfer']:.4f} | valid MAE {ev['MAE']:.4f} Non0_acc_2 {ev['Non0_acc_2']:.4f} "
                f"({rec['seconds']:.0f} s)")
            if best is None or ev["loss"] < best["valid_loss"]:
                best = rec
                save_checkpoint(out / "best.pt", student, None, scfg, ep,
                                {"data_path": tck.get("data_path"), "teacher": str(teachers[0]),
                                 "ensemble": [str(t) for t in teachers]})
    finally:
        t_tap.close()
        s_tap.close()
    res = {"layers": s.layers, "layer_map": lmap, "teacher": {"ckpt": str(teachers[0]),
                                                              "valid": {k: t_valid[k] for k in METRIC_KEYS}},
           "ensemble": {"members": [str(t) for t in teachers],
                        "valid": {k: v for k, v in mmsa_metrics(ens_valid, y_va).items() if k in METRIC_KEYS}},
           "valid": best["valid"], "best_epoch": best["epoch"], "history": history,
           "transfer_rows": 0 if transfer is None else int(len(transfer)), "mosi_train_rows": len(tr),
           "trainable_params": int(sum(p.numel() for p in enc + rest)),
           "settings": asdict(s), "seconds": time.perf_counter() - t0,
           "loss": "w_hidden*MSE(H_s^i, H_t^map(i)) + w_rel*KL(rel_t || rel_s) [Q,K,V of the last layer] on every "
                   "batch; + w_kd_transfer*MSE(pred_s, pred_t) on transfer batches (other modalities: their mean "
                   "training frame); + w_kd*MSE(pred_s, ensemble mean) + w_task*task(pred_s, y) on MOSI training batches"}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    from ..plots import plot_distill_curve
    plot_distill_curve(res, out / "curve.png")
    return res
