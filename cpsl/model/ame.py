"""Adaptive Modality Encoding (docs/method.md §1): one encoder per modality.

masked BatchNorm (running statistics over valid steps) → Conv1d projection → pre-LN
Transformer layers with key padding mask and positional encoding → masked attention + mean
pooling. Everything is masked so that extra padding never changes the outputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, L, d), mask (B, L) bool → (B, d) mean over valid steps."""
    w = mask.to(x.dtype).unsqueeze(-1)                       # (B, L, 1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def masked_std(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Population std over valid steps: (B, L, d) → (B, d)."""
    w = mask.to(x.dtype).unsqueeze(-1)
    mean = masked_mean(x, mask) if mean is None else mean
    var = (((x - mean.unsqueeze(1)) ** 2) * w).sum(1) / w.sum(1).clamp(min=1.0)
    return torch.sqrt(var + 1e-8)


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the valid steps of a padded sequence batch, with running statistics.

    Training statistics and the normalisation are computed in float64, where no finite float32
    input can overflow (|x| < 3.4e38, so x² < 1.2e77). A batch whose variance does not fit the
    float32 running buffer (e.g. one feature of 1e30) leaves the running statistics untouched
    and sets ``stats_ok`` (a 0-d bool tensor, no host sync) to False: the training loop skips
    such a step."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, L, d)
        w = mask.to(x.dtype).unsqueeze(-1)
        if self.training:
            x64, w64 = x.double(), w.double()
            n = w64.sum().clamp(min=1.0)
            mean = (x64 * w64).sum((0, 1)) / n
            var = (((x64 - mean) ** 2) * w64).sum((0, 1)) / n
            with torch.no_grad():
                unbiased = (var * n / (n - 1).clamp(min=1.0)).float()
                ok = torch.isfinite(unbiased).all()
                self.stats_ok = ok
                m32 = mean.detach().float()
                self.running_mean.copy_(torch.where(ok, torch.lerp(self.running_mean, m32, self.momentum), self.running_mean))
                self.running_var.copy_(torch.where(ok, torch.lerp(self.running_var, unbiased, self.momentum), self.running_var))
            xn = ((x64 - mean) / torch.sqrt(var + self.eps)).to(x.dtype)
        else:
            xn = (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)
        y = xn * self.weight + self.bias
        return y * w                                            # padded steps are exactly 0


class SinusoidalPE(nn.Module):
    def __init__(self, d: int, max_len: int = 512):
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
        pe = torch.zeros(max_len, d)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div[: d // 2])
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (B, L, d)
        return x + self.pe[: x.shape[1]].unsqueeze(0)


class MultiHeadAttention(nn.Module):
    """Plain multi-head attention (MatMul/Softmax only: exports to ONNX and quantizes cleanly)."""

    def __init__(self, d: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.h, self.dk = heads, d // heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, Lq, d = q_in.shape
        Lk = kv_in.shape[1]
        q = self.q(q_in).view(B, Lq, self.h, self.dk).transpose(1, 2)           # (B, h, Lq, dk)
        k, v = self.kv(kv_in).view(B, Lk, 2, self.h, self.dk).permute(2, 0, 3, 1, 4)  # (B, h, Lk, dk) each
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dk)                   # (B, h, Lq, Lk)
        scores = scores.masked_fill(~key_mask[:, None, None, :], -1e4)
        att = torch.softmax(scores, dim=-1)
        out = (att @ v).transpose(1, 2).reshape(B, Lq, d)
        return self.o(out)


class EncoderLayer(nn.Module):
    """Pre-LN Transformer encoder layer."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = MultiHeadAttention(d, heads, dropout)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.att(h, h, mask))
        x = x + self.drop(self.ff(self.ln2(x)))
        return x * mask.to(x.dtype).unsqueeze(-1)


class AttentionPool(nn.Module):
    """h = LN(Σ_i softmax_masked(wᵀ tanh(W H_i)) H_i + mean_masked(H))."""

    def __init__(self, d: int):
        super().__init__()
        self.W = nn.Linear(d, d)
        self.w = nn.Linear(d, 1, bias=False)
        self.ln = nn.LayerNorm(d)

    def forward(self, H: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = self.w(torch.tanh(self.W(H))).squeeze(-1)           # (B, L)
        s = s.masked_fill(~mask, -1e4)
        a = torch.softmax(s, dim=-1).unsqueeze(-1)             # (B, L, 1)
        return self.ln((a * H).sum(1) + masked_mean(H, mask))


class AME(nn.Module):
    """Adaptive modality encoder. Returns (H (B,L,d), h (B,d), μ (B,d_m), σ (B,d_m))."""

    def __init__(self, d_in: int, d: int, heads: int, layers: int, kernel: int, dropout: float,
                 momentum: float = 0.1, max_len: int = 512, adaptive: bool = True):
        super().__init__()
        self.adaptive = adaptive
        if adaptive:
            self.norm = MaskedBatchNorm(d_in, momentum)
            self.proj = nn.Conv1d(d_in, d, kernel, padding=kernel // 2)
            self.pe = SinusoidalPE(d, max_len)
            self.layers = nn.ModuleList(EncoderLayer(d, heads, dropout) for _ in range(layers))
            self.pool = AttentionPool(d)
        else:  # ablation: plain projection + mean pooling
            self.proj = nn.Linear(d_in, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        w = mask.to(x.dtype).unsqueeze(-1)
        if not self.adaptive:
            xn = x * w
            mu = masked_mean(xn, mask)
            sigma = masked_std(xn, mask, mu)
            H = self.drop(self.proj(xn)) * w
            return H, masked_mean(H, mask), mu, sigma
        xn = self.norm(x, mask)                                  # (B, L, d_m), 0 on padding
        mu = masked_mean(xn, mask)
        sigma = masked_std(xn, mask, mu)
        H = self.proj(xn.transpose(1, 2)).transpose(1, 2)       # (B, L, d)
        H = self.drop(F.gelu(H)) * w
        H = self.pe(H) * w
        for layer in self.layers:
            H = layer(H, mask)
        return H, self.pool(H, mask), mu, sigma
