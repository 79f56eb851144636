"""Evaluation of a trained model on a split: fused and unimodal predictions, MMSA metrics with the
task and unimodal losses, and each modality's exact Shapley contribution. ``cpsl.train`` re-exports
these names; the loop validates with :func:`evaluate`."""
from __future__ import annotations

import numpy as np
import torch

from . import distributed
from .config import Config
from .data.batch import iterate
from .data.mmsa import Split
from .model import CPSLModel
from .errors import CPSLError
from .losses import task_loss
from .metrics import mmsa_metrics, undefined_metrics


@torch.no_grad()
def predict(model: CPSLModel, split: Split, batch_size: int, device, mask_modality=None):
    """Fused and unimodal predictions on a split: (pred (N,), aux {m: (N,)}, labels (N,)).
    ``mask_modality``: a modality or a collection of them, each replaced by one zero frame."""
    model.eval()
    masked = [mask_modality] if isinstance(mask_modality, str) else list(mask_modality or ())
    preds, aux = [], {m: [] for m in model.modalities}
    for b in iterate(split, batch_size, modalities=model.modalities):
        b = b.to(device)
        for m in masked:
            B = len(b)
            b.x[m] = torch.zeros(B, 1, b.x[m].shape[-1], device=device)
            b.mask[m] = torch.ones(B, 1, dtype=torch.bool, device=device)
        out = model(b.x, b.mask, b.text_bert)
        preds.append(out.pred.float().cpu())
        for m in model.modalities:
            aux[m].append(out.aux[m].float().cpu())
    return (torch.cat(preds).numpy(), {m: torch.cat(v).numpy() for m, v in aux.items()},
            split.labels.astype(np.float32))


def evaluate(model, split, cfg: Config, device, mask_modality=None) -> dict:
    pred, aux, y = distributed.current().predict(predict, model, split, cfg.data.eval_batch_size, device, mask_modality)
    res = mmsa_metrics(pred, y)
    res["loss"] = float(task_loss(torch.from_numpy(pred), torch.from_numpy(y), cfg.loss.task))
    aux_loss = {m: float(task_loss(torch.from_numpy(p), torch.from_numpy(y), cfg.loss.task)) for m, p in aux.items()}
    return {"metrics": res, "aux": {m: mmsa_metrics(p, y) for m, p in aux.items()}, "aux_loss": aux_loss,
            "pred": pred, "aux_pred": aux, "undefined": undefined_metrics(pred, y)}


def contributions(model: CPSLModel, split: Split, cfg: Config, device, metric: str = "MAE") -> dict:
    """Each modality's exact Shapley contribution to the fused prediction's error on ``split``.

    The value of a coalition S of modalities is the error (``metric``, MAE by default) of the
    fused prediction with every modality outside S replaced by one zero frame (all 2^M masks,
    M ≤ 4); a modality's contribution is its Shapley value of the error *reduction*
    ``v(∅) − v(S)``: positive = it lowers the error. The contributions sum to
    ``v(∅) − v(all)`` (efficiency)."""
    from .metrics import shapley_values
    mods = tuple(model.modalities)
    if len(mods) > 4:
        raise CPSLError(f"exact Shapley contributions need at most 4 modalities, the model has {len(mods)}")
    values = {}
    for mask in range(2 ** len(mods)):
        keep = frozenset(m for i, m in enumerate(mods) if mask >> i & 1)
        pred, _, y = predict(model, split, cfg.data.eval_batch_size, device, [m for m in mods if m not in keep])
        values[keep] = mmsa_metrics(pred, y)[metric]
    empty = values[frozenset()]
    phi = shapley_values({S: empty - v for S, v in values.items()}, mods)
    return {"metric": metric, "shapley": phi, "error_all": values[frozenset(mods)], "error_none": empty,
            "coalitions": {"+".join(sorted(S)) or "-": v for S, v in values.items()}}
