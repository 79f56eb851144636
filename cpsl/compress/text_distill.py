"""A shallower text encoder for the end-to-end student (issue 15).

The student is the teacher with its fine-tuned text encoder cut to its first ``N`` transformer
layers (initialised from the teacher's fine-tuned layers, so from MiniLM's); the rest of the
model (AME encoders, fusion, heads) starts as the teacher's. It is trained on the training split
with

    L = MSE(H_s, sg H_t) over real tokens  +  λ_kd · MSE(ŷ_s, sg ŷ_t)  +  λ_task · ℓ(ŷ_s, y)

where ``H`` are the encoder's last-layer token states (the input of the text AME) and ``ŷ`` the
fused prediction; the teacher's targets are computed once (eval mode). The checkpoint with the
lowest valid task loss is kept; its config names the encoder ``<spec>@N``, so ``load_model`` and
``cpsl export`` rebuild the N-layer encoder.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from ..errors import CPSLError

# torch is imported inside the functions: `cpsl --help` (which imports this module) stays light


def teacher_token_targets(teacher, split, batch_size: int = 64):
    """``(states (N, L, d) float32, pred (N,))`` of the teacher on every row, zero on padding."""
    import torch

    from ..data.batch import iterate
    teacher.eval()
    dev = next(teacher.parameters()).device
    L = split.text_bert.shape[2]
    states = torch.zeros(len(split), L, teacher.text_backbone.hidden, device=dev)
    pred = torch.zeros(len(split), device=dev)
    with torch.no_grad():
        for b in iterate(split, batch_size, modalities=teacher.modalities):
            b = b.to(dev)
            h, _ = teacher.text_backbone(b.text_bert)                           # (B, w, d)
            idx = torch.as_tensor(b.index, device=dev)
            states[idx, :h.shape[1]] = h
            pred[idx] = teacher.predict(b.x, b.mask, b.text_bert)
    return states, pred


def check_layers(teacher, layers: int) -> None:
    if teacher.text_backbone is None:
        raise CPSLError("the teacher has no text encoder (model.text_encoder): nothing to make shallower")
    n_have = len(teacher.text_backbone.encoder.encoder.layer)
    if not 1 <= layers <= n_have:
        raise CPSLError(f"--layers must be between 1 and the teacher's {n_have} encoder layers, got {layers}")


def shallow_student(teacher, cfg, layers: int):
    """A copy of ``teacher`` whose text encoder keeps its first ``layers`` layers; ``(model, cfg)``."""
    from ..text_encoder import split_spec, truncate_layers
    check_layers(teacher, layers)
    base = split_spec(cfg.model.text_encoder)[0]
    student = copy.deepcopy(teacher)
    truncate_layers(student.text_backbone.encoder, layers)
    scfg = copy.deepcopy(cfg)
    scfg.model.text_encoder = f"{base}@{layers}"
    scfg.model.finetune_text = True
    student.cfg = scfg.model
    student.text_backbone.finetune = True
    for p in student.parameters():
        p.requires_grad_(True)
    return student, scfg


def fused_prediction(model, b, h, mask):
    """The model's fused prediction with the text encoder's output given (``h``, ``mask``); the other
    modalities from ``b.x`` / ``b.mask``."""
    x, mk = dict(b.x), dict(b.mask)
    x["text"], mk["text"] = h, mask
    H, hp = {}, {}
    for m in model.modalities:
        H[m], hp[m], _, _ = model.encoders[m](x[m], mk[m])
    return model.head(model.fusion(H, hp, mk))


def _loss(student, b, t_states, t_pred, lambda_kd, lambda_task, task):
    import torch
    import torch.nn.functional as F

    from ..losses import task_loss
    idx = torch.as_tensor(b.index, device=t_pred.device)
    h, mask = student.text_backbone(b.text_bert)                                # (B, w, d), (B, w)
    ht = t_states[idx, :h.shape[1]]
    m = mask.unsqueeze(-1).to(h.dtype)
    hidden = ((h - ht) ** 2 * m).sum() / (m.sum() * h.shape[-1]).clamp_min(1)
    pred = fused_prediction(student, b, h, mask)
    kd = F.mse_loss(pred, t_pred[idx])
    return hidden + lambda_kd * kd + lambda_task * task_loss(pred, b.y, task), {"hidden": hidden, "kd": kd}


def distill_text_encoder(teacher_ckpt, data, layers: int, out, epochs: int = 3, lr: float = 5e-5,
                         head_lr: float = 1e-4, lambda_kd: float = 1.0, lambda_task: float = 0.5,
                         batch_size: int = 32, seed: int = 1, log=print, device: str = "cpu") -> dict:
    """Distil the teacher's encoder into its first ``layers`` layers; write ``out/best.pt`` and
    ``out/results.json``; return the results (teacher and student valid metrics, timings).
    ``device``: where teacher and student run."""
    import torch

    from ..data.batch import iterate
    from ..metrics import METRIC_KEYS
    from ..checkpoint import check_compatible, load_model, save_checkpoint
    from ..evaluation import evaluate
    if epochs < 1:
        raise CPSLError("--epochs must be >= 1")
    teacher, cfg, tck = load_model(teacher_ckpt, device)
    check_compatible(teacher, data, str(teacher_ckpt))
    check_layers(teacher, layers)
    tr, va = data["train"], data["valid"]
    if len(tr) == 0 or len(va) == 0:
        raise CPSLError("distilling the text encoder needs non-empty train and valid splits")
    t0 = time.perf_counter()
    t_states, t_pred = teacher_token_targets(teacher, tr)
    log(f"teacher targets on {len(tr)} training rows: {time.perf_counter() - t0:.1f} s")
    t_valid = evaluate(teacher, va, cfg, device)["metrics"]
    torch.manual_seed(seed)
    student, scfg = shallow_student(teacher, cfg, layers)
    del teacher
    enc = list(student.text_backbone.parameters())
    enc_ids = {id(p) for p in enc}
    rest = [p for p in student.parameters() if id(p) not in enc_ids]
    opt = torch.optim.AdamW([{"params": enc, "lr": lr}, {"params": rest, "lr": head_lr}], weight_decay=0.01)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    best, history = None, []
    for ep in range(epochs):
        student.train()
        t1, sums, n = time.perf_counter(), {"hidden": 0.0, "kd": 0.0}, 0
        for b in iterate(tr, batch_size, shuffle=True, generator=gen, modalities=student.modalities):
            b = b.to(device)
            loss, parts = _loss(student, b, t_states, t_pred, lambda_kd, lambda_task, cfg.loss.task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            for k in sums:
                sums[k] += float(parts[k].detach())
            n += 1
        ev = evaluate(student, va, scfg, device)["metrics"]
        rec = {"epoch": ep, "seconds": time.perf_counter() - t1, **{k: v / max(n, 1) for k, v in sums.items()},
               "valid": {k: ev[k] for k in METRIC_KEYS}, "valid_loss": ev["loss"]}
        history.append(rec)
        log(f"layers {layers} epoch {ep}: hidden {rec['hidden']:.4f} kd {rec['kd']:.4f} | valid MAE {ev['MAE']:.4f} "
            f"Non0_acc_2 {ev['Non0_acc_2']:.4f} ({rec['seconds']:.0f} s)")
        if best is None or ev["loss"] < best["valid_loss"]:
            best = rec
            save_checkpoint(out / "best.pt", student, None, scfg, ep,
                            {"data_path": tck.get("data_path"), "teacher": str(teacher_ckpt)})
    res = {"layers": layers, "teacher": {"ckpt": str(teacher_ckpt), "valid": {k: t_valid[k] for k in METRIC_KEYS}},
           "valid": best["valid"], "best_epoch": best["epoch"], "history": history,
           "encoder_params": int(sum(p.numel() for p in enc)),
           "settings": {"epochs": epochs, "lr": lr, "head_lr": head_lr, "lambda_kd": lambda_kd,
                        "lambda_task": lambda_task, "batch_size": batch_size, "seed": seed},
           "loss": "MSE(H_s, H_t) over real tokens + lambda_kd*MSE(pred_s, pred_t) + lambda_task*task(pred_s, y)"}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res

