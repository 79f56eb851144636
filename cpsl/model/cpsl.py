"""The whole CPSL model: AME encoders → gated cross-modal fusion → heads (docs/method.md §1–3).

Works for whichever one, two or three modalities the data holds (one: the fusion reduces to
its residual MLP over that modality, and the balancing strategies have a single group). ``modality_parameters()`` returns
the named parameter groups the Conflict-aware Penalty acts on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import CPSLError
from .ame import AME
from .fusion import ConcatFusion, GatedCrossModalFusion
from .heads import ScalarHead, StatsHead, mlp


@dataclass
class ModelOutput:
    pred: torch.Tensor                 # (B,) fused prediction ŷ
    aux: dict                          # m -> (B,) unimodal prediction ŷ_m
    rec: dict                          # m -> (B, d_m) reconstruction Dec_m(h_m)
    mu: dict                           # m -> (B, d_m) empirical masked mean after normalisation
    sigma: dict                        # m -> (B, d_m) empirical masked std after normalisation
    mu_hat: dict                       # m -> (B, d_m) predicted mean
    log_sigma_hat: dict                # m -> (B, d_m) predicted log std
    h: dict                            # m -> (B, d) pooled unimodal representation
    z: torch.Tensor                    # (B, d) joint representation


class CPSLModel(nn.Module):
    def __init__(self, dims: dict[str, int], cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.modalities = tuple(m for m in ("text", "audio", "vision") if m in dims)
        if not self.modalities:
            raise ValueError(f"CPSLModel needs at least one modality, got {list(dims)}")
        self.dims = {m: int(dims[m]) for m in self.modalities}
        d, hid = cfg.d, cfg.head_hidden or cfg.d
        self.text_backbone = None
        if cfg.text_encoder and "text" in self.modalities:
            from .text import TextBackbone
            self.text_backbone = TextBackbone(cfg.text_encoder, finetune=cfg.finetune_text)
            self.dims["text"] = self.text_backbone.hidden
        self.encoders = nn.ModuleDict({
            m: AME(self.dims[m], d, cfg.heads, getattr(cfg, f"{m}_layers"), getattr(cfg, f"{m}_kernel"),
                   cfg.dropout, cfg.norm_momentum, cfg.max_len, adaptive=cfg.ame)
            for m in self.modalities})
        if cfg.fusion == "gcf":
            self.fusion = GatedCrossModalFusion(self.modalities, d, cfg.heads, cfg.dropout)
        else:
            self.fusion = ConcatFusion(self.modalities, d, cfg.dropout)
        self.head = ScalarHead(d, hid, cfg.dropout)
        self.aux_heads = nn.ModuleDict({m: ScalarHead(d, hid, cfg.dropout) for m in self.modalities})
        self.decoders = nn.ModuleDict({m: mlp(d, hid, self.dims[m]) for m in self.modalities})
        self.stats_heads = nn.ModuleDict({m: StatsHead(d, hid, self.dims[m]) for m in self.modalities})

    # ------------------------------------------------------------------ parameter groups
    def modality_parameters(self, prefixes: dict | None = None, scope: str = "encoder") -> dict[str, list[nn.Parameter]]:
        """Modality → trainable parameters. Default (``scope="encoder"``): each modality's AME encoder
        (plus the pretrained text encoder for text). ``scope="path"`` adds the modality's own entry
        into the gated fusion: the cross-attention and gate that modality m's stream owns
        (``fusion.att.m_*``, ``fusion.gate.m_*``) and its LayerNorm ``fusion.ln.m``, so a penalty
        also slows what the fusion reads from m (the fusion MLP and residual stay shared).
        ``prefixes`` maps a modality to module-name prefixes (overrides ``scope``)."""
        named = dict(self.named_parameters())
        unknown = [str(k) for k in (prefixes or {}) if k not in self.modalities]
        if unknown:
            raise CPSLError(f"groups.prefixes names {unknown[0]!r}, which is not a modality of this model "
                            f"({', '.join(self.modalities)})")
        groups = {}
        for m in self.modalities:
            pre = (prefixes or {}).get(m)
            if not pre:
                pre = [f"encoders.{m}."] + (["text_backbone."] if m == "text" and self.text_backbone else [])
                if scope == "path":
                    pre += [f"fusion.att.{m}_", f"fusion.gate.{m}_", f"fusion.ln.{m}."]
            else:
                pre = [pre] if isinstance(pre, str) else pre
                bad = [x for x in pre if not isinstance(x, str) or not any(n.startswith(x) for n in named)] \
                    if isinstance(pre, list) else [pre]
                if bad:
                    raise CPSLError(f"groups.prefixes.{m}: {str(bad[0])[:60]!r} is not a prefix of any parameter name "
                                    f"(e.g. encoders.{m}., fusion.att.{m}_)")
            groups[m] = [p for n, p in named.items() if p.requires_grad and any(n.startswith(x) for x in pre)]
        return groups

    def num_parameters(self, exclude_backbone: bool = True) -> int:
        return sum(p.numel() for n, p in self.named_parameters()
                   if not (exclude_backbone and n.startswith("text_backbone.")))

    # ------------------------------------------------------------------ forward
    def encode(self, x: dict, mask: dict, text_bert: torch.Tensor | None = None):
        x = dict(x)
        mask = dict(mask)
        if self.text_backbone is not None:
            if text_bert is None:
                raise ValueError("this model runs a pretrained text encoder and needs text_bert token ids")
            x["text"], mask["text"] = self.text_backbone(text_bert)
        H, h, mu, sigma = {}, {}, {}, {}
        for m in self.modalities:
            H[m], h[m], mu[m], sigma[m] = self.encoders[m](x[m], mask[m])
        return H, h, mu, sigma, mask

    def forward(self, x: dict, mask: dict, text_bert: torch.Tensor | None = None) -> ModelOutput:
        H, h, mu, sigma, mask = self.encode(x, mask, text_bert)
        z = self.fusion(H, h, mask)
        pred = self.head(z)
        aux = {m: self.aux_heads[m](h[m]) for m in self.modalities}
        rec = {m: self.decoders[m](h[m]) for m in self.modalities}
        st = {m: self.stats_heads[m](h[m]) for m in self.modalities}
        return ModelOutput(pred, aux, rec, mu, sigma, {m: st[m][0] for m in st}, {m: st[m][1] for m in st}, h, z)

    def predict(self, x: dict, mask: dict, text_bert=None) -> torch.Tensor:
        """Fused prediction only (the deployment path: no auxiliary heads computed)."""
        H, h, _, _, mask = self.encode(x, mask, text_bert)
        return self.head(self.fusion(H, h, mask))


class ExportWrapper(nn.Module):
    """Positional inputs ``(x_m, mask_m)`` per modality → ``sentiment`` (B,), for ONNX export."""

    def __init__(self, model: CPSLModel):
        super().__init__()
        self.model = model
        self.modalities = model.modalities

    def forward(self, *args):
        x = {m: args[2 * i] for i, m in enumerate(self.modalities)}
        mask = {m: args[2 * i + 1] > 0.5 if args[2 * i + 1].dtype != torch.bool else args[2 * i + 1]
                for i, m in enumerate(self.modalities)}
        return self.model.predict(x, mask)
