"""Batching: per-modality padded tensors and masks, trimmed to each batch's longest item."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .mmsa import Split


@dataclass
class Batch:
    x: dict[str, torch.Tensor]       # modality -> (B, L_m, d_m) float32
    mask: dict[str, torch.Tensor]    # modality -> (B, L_m) bool, True on valid steps
    y: torch.Tensor                  # (B,) float32
    index: np.ndarray                # (B,) row indices into the split
    text_bert: torch.Tensor | None = None  # (B, 3, L) int64 when the split has it

    def to(self, device) -> "Batch":
        return Batch({m: v.to(device, non_blocking=True) for m, v in self.x.items()},
                     {m: v.to(device, non_blocking=True) for m, v in self.mask.items()},
                     self.y.to(device), self.index,
                     None if self.text_bert is None else self.text_bert.to(device))

    def __len__(self) -> int:
        return int(self.y.shape[0])


def make_batch(split: Split, rows: np.ndarray, modalities=None) -> Batch:
    mods = modalities or tuple(split.features)
    x, mask = {}, {}
    for m in mods:
        lens = split.lengths[m][rows]
        L = int(lens.max())
        x[m] = torch.from_numpy(np.ascontiguousarray(split.features[m][rows, :L]))
        mask[m] = torch.from_numpy(np.arange(L)[None, :] < lens[:, None])
    tb = None
    if split.text_bert is not None:
        t = split.text_bert[rows]
        L = max(int(t[:, 1].astype(bool).sum(1).max()), 1)
        tb = torch.from_numpy(np.ascontiguousarray(t[:, :, :L]))
    y = torch.from_numpy(split.labels[rows].astype(np.float32))
    return Batch(x, mask, y, rows, tb)


def row_lengths(split: Split, modalities=None) -> np.ndarray:
    """What a row costs to batch: its real token count where the split has ``text_bert`` (a
    fine-tuned text encoder dominates), else the sum of its modalities' valid steps."""
    if split.text_bert is not None:
        return split.text_bert[:, 1].astype(bool).sum(1)
    mods = modalities or tuple(split.features)
    return np.sum([split.lengths[m] for m in mods], axis=0)


def bucket_order(order: np.ndarray, lengths: np.ndarray, batch_size: int, bucket: int,
                 generator: torch.Generator | None = None) -> np.ndarray:
    """``order`` rearranged so that each run of ``batch_size`` rows holds rows of similar length.

    Each window of ``bucket × batch_size`` consecutive rows of the (shuffled) ``order`` is sorted
    by length and cut into batches; the full batches are then shuffled (``generator``) and the
    one short batch, if any, goes last. A batch is trimmed to its longest row (:func:`make_batch`),
    so this removes most padding. ``bucket <= 0`` returns ``order`` unchanged.
    """
    order = np.asarray(order)
    if bucket <= 0 or len(order) <= batch_size:
        return order
    win = int(bucket) * int(batch_size)
    flat = np.concatenate([w[np.argsort(lengths[w], kind="stable")]
                           for w in np.split(order, range(win, len(order), win))])
    n_full = len(flat) // batch_size
    full = flat[:n_full * batch_size].reshape(n_full, batch_size)
    full = full[torch.randperm(n_full, generator=generator).numpy()]
    return np.concatenate([full.reshape(-1), flat[n_full * batch_size:]])


def iterate(split: Split, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
            modalities=None, bucket: int = 0):
    """Yield :class:`Batch` objects; shuffling draws from ``generator`` (deterministic per seed);
    ``bucket > 0`` (with ``shuffle``) groups rows of similar length (:func:`bucket_order`)."""
    n = len(split)
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    if shuffle and bucket > 0:
        order = bucket_order(order, row_lengths(split, modalities), batch_size, bucket, generator)
    for i in range(0, n, batch_size):
        yield make_batch(split, order[i:i + batch_size], modalities)


def n_batches(split: Split, batch_size: int) -> int:
    return (len(split) + batch_size - 1) // batch_size
