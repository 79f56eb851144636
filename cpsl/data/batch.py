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


def iterate(split: Split, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
            modalities=None):
    """Yield :class:`Batch` objects; shuffling draws from ``generator`` (deterministic per seed)."""
    n = len(split)
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    for i in range(0, n, batch_size):
        yield make_batch(split, order[i:i + batch_size], modalities)


def n_batches(split: Split, batch_size: int) -> int:
    return (len(split) + batch_size - 1) // batch_size
