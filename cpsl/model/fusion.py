"""Gated cross-modal fusion with residual injection (docs/method.md §2), and the concat ablation."""
from __future__ import annotations

import torch
import torch.nn as nn

from .ame import MultiHeadAttention, masked_mean


class GatedCrossModalFusion(nn.Module):
    def __init__(self, modalities: tuple[str, ...], d: int, heads: int, dropout: float):
        super().__init__()
        self.mods = modalities
        self.pairs = [(m, n) for m in modalities for n in modalities if n != m]
        self.att = nn.ModuleDict({f"{m}_{n}": MultiHeadAttention(d, heads, dropout) for m, n in self.pairs})
        self.gate = nn.ModuleDict({f"{m}_{n}": nn.Linear(2 * d, d) for m, n in self.pairs})
        self.ln = nn.ModuleDict({m: nn.LayerNorm(d) for m in modalities})
        k = len(modalities)
        self.mlp = nn.Sequential(nn.Linear(k * d, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, d))
        self.res = nn.Linear(k * d, d)

    def forward(self, H: dict, h: dict, mask: dict) -> torch.Tensor:
        f = []
        for m in self.mods:
            acc = h[m]
            for n in self.mods:
                if n == m:
                    continue
                key = f"{m}_{n}"
                c = masked_mean(self.att[key](H[m], H[n], mask[n]), mask[m])      # (B, d)
                g = torch.sigmoid(self.gate[key](torch.cat([h[m], c], -1)))       # (B, d)
                acc = acc + g * c
            f.append(self.ln[m](acc))                                            # f_m
        hs = torch.cat([h[m] for m in self.mods], -1)
        return self.mlp(torch.cat(f, -1)) + self.res(hs)                         # z (B, d)


class ConcatFusion(nn.Module):
    def __init__(self, modalities: tuple[str, ...], d: int, dropout: float):
        super().__init__()
        self.mods = modalities
        self.mlp = nn.Sequential(nn.Linear(len(modalities) * d, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, d))

    def forward(self, H: dict, h: dict, mask: dict) -> torch.Tensor:
        return self.mlp(torch.cat([h[m] for m in self.mods], -1))
