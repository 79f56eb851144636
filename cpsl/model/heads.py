"""Prediction, auxiliary, reconstruction and statistics heads (docs/method.md §3)."""
from __future__ import annotations

import torch
import torch.nn as nn


def mlp(d_in: int, hidden: int, d_out: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out))


class ScalarHead(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float):
        super().__init__()
        self.net = mlp(d, hidden, 1, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, d) → (B,)
        return self.net(x).squeeze(-1)


class StatsHead(nn.Module):
    """S_m(h_m) → (μ̂_m, log σ̂_m), each (B, d_m)."""

    def __init__(self, d: int, hidden: int, d_m: int):
        super().__init__()
        self.net = mlp(d, hidden, 2 * d_m)

    def forward(self, h: torch.Tensor):
        mu, log_sigma = self.net(h).chunk(2, dim=-1)
        return mu, log_sigma
