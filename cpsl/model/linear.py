"""The model class of the unimodal-bias theory (Zhang, Latham & Saxe, ICML 2024): deep linear (or
ReLU) fully connected networks that fuse the modalities at a chosen layer.

Layer sizes are ``d_m → H → … → H → 1`` (``model.linear_depth`` weight matrices of width
``model.linear_width``, no biases, every weight drawn from N(0, ``model.init_std``²): the
small initialisation the theory needs). ``model.fusion_layer`` = f says where the modalities meet:

* ``f = 0`` (**early fusion**, ``--preset linear_early``): the first layer reads the concatenated
  input. It is stored as one block per modality (``fuse.<m>``, the modality's columns of that
  layer), which computes exactly ``W [x_1; x_2]``.
* ``1 ≤ f < depth`` (**late fusion**, ``--preset linear_late``, f = 1): each modality has its own
  branch of f layers (``encoders.<m>``); layer f + 1 reads the concatenated branch outputs (again
  one block per modality), the remaining layers are shared.
* ``f = depth``: every branch ends in a scalar and the prediction is their sum.

A balancing strategy's group of modality m is its *branch*: every weight that reads m alone
(``encoders.<m>`` and ``fuse.<m>``). For two layers and f = 1 that is ``W1_m`` and ``W2_m`` of
``ŷ = Σ_m W2_m W1_m x_m``, the per-modality network of the theory.

With ``model.activation = linear`` the prediction is the sum of the modalities' contributions,
and the unimodal prediction ``aux[m]`` (what OGM-GE and the other balancing strategies score) is
modality m's contribution: the network's output with the other modalities' inputs to the
fusion layer set to zero. No reconstruction decoders, statistics heads or auxiliary heads:
``loss.rec``, ``loss.sl`` and ``loss.div`` must be 0 (the presets set them so).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import CPSLError
from .cpsl import ModelOutput

MODALITY_ORDER = ("text", "audio", "vision")


def _linear(i: int, o: int, std: float) -> nn.Linear:
    lin = nn.Linear(i, o, bias=False)
    nn.init.normal_(lin.weight, 0.0, std)
    return lin


class LinearFusionNet(nn.Module):
    """Deep linear/ReLU network fusing the modalities at layer ``cfg.fusion_layer``."""

    def __init__(self, dims: dict[str, int], cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.modalities = tuple(m for m in MODALITY_ORDER if m in dims)
        if not self.modalities:
            raise ValueError(f"LinearFusionNet needs at least one modality, got {list(dims)}")
        if cfg.text_encoder:
            raise CPSLError("model.arch=linear reads feature vectors; model.text_encoder must be empty")
        self.dims = {m: int(dims[m]) for m in self.modalities}
        self.text_backbone = None
        H, L, f, std = cfg.linear_width, cfg.linear_depth, cfg.fusion_layer, cfg.init_std
        if not 0 <= f <= L:
            raise CPSLError(f"model.fusion_layer must be in [0, model.linear_depth={L}], got {f}")
        width = lambda i: 1 if i == L else H          # noqa: E731 - output size of layer i (1-based)
        self.encoders = nn.ModuleDict({
            m: nn.Sequential(*[_linear(self.dims[m] if i == 1 else H, width(i), std) for i in range(1, f + 1)])
            for m in self.modalities})
        self.fuse = nn.ModuleDict()
        self.shared = nn.ModuleList()
        if f < L:
            self.fuse = nn.ModuleDict({m: _linear(self.dims[m] if f == 0 else H, width(f + 1), std)
                                       for m in self.modalities})
            self.shared = nn.ModuleList([_linear(H, width(i), std) for i in range(f + 2, L + 1)])
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.Identity()

    # ------------------------------------------------------------------ parameter groups
    def modality_parameters(self, prefixes: dict | None = None, scope: str = "encoder") -> dict[str, list[nn.Parameter]]:
        """Modality → its branch: every weight that reads that modality alone, i.e. its layers
        before the fusion (``encoders.<m>``) and its block of the fusion layer (``fuse.<m>``; early
        fusion: only that block). Both scopes give the branch (there is no encoder/fusion split
        within a modality's own weights). ``prefixes`` maps a modality to module-name prefixes."""
        named = dict(self.named_parameters())
        groups = {}
        for m in self.modalities:
            pre = (prefixes or {}).get(m) or [f"encoders.{m}.", f"fuse.{m}."]
            pre = [pre] if isinstance(pre, str) else pre
            groups[m] = [p for n, p in named.items() if p.requires_grad and any(n.startswith(x) for x in pre)]
        return groups

    def num_parameters(self, exclude_backbone: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def _branches(self, x: dict, mask: dict) -> dict:
        """Per modality: the masked mean over steps (B, d_m), then its branch layers."""
        h = {}
        for m in self.modalities:
            w = mask[m].to(x[m].dtype).unsqueeze(-1)                    # (B, L, 1)
            v = (x[m] * w).sum(1) / w.sum(1).clamp(min=1.0)             # (B, d_m)
            for lin in self.encoders[m]:
                v = self.act(lin(v))
            h[m] = v
        return h

    def _head(self, fused: torch.Tensor) -> torch.Tensor:
        """From the fusion layer's pre-activation (B, H or 1) to the prediction (B,)."""
        if not len(self.shared) and fused.shape[-1] == 1:
            return fused.squeeze(-1)
        v = self.act(fused)
        for i, lin in enumerate(self.shared):
            v = lin(v)
            if i < len(self.shared) - 1:
                v = self.act(v)
        return v.squeeze(-1)

    def _contributions(self, h: dict) -> dict:
        if len(self.fuse):
            return {m: self.fuse[m](h[m]) for m in self.modalities}          # (B, H) or (B, 1)
        return h                                                             # f = depth: scalars (B, 1)

    def forward(self, x: dict, mask: dict, text_bert=None) -> ModelOutput:
        h = self._branches(x, mask)
        c = self._contributions(h)
        z = sum(c.values())
        pred = self._head(z)
        aux = {m: self._head(c[m]) for m in self.modalities} if len(self.modalities) > 1 else {self.modalities[0]: pred}
        return ModelOutput(pred, aux, {}, {}, {}, {}, {}, h, z)

    def predict(self, x: dict, mask: dict, text_bert=None) -> torch.Tensor:
        return self._head(sum(self._contributions(self._branches(x, mask)).values()))
