"""A pretrained Transformer text encoder run end to end on ``text_bert`` token ids."""
from __future__ import annotations

import torch
import torch.nn as nn


class TextBackbone(nn.Module):
    def __init__(self, spec: str, finetune: bool = False):
        super().__init__()
        from ..text_encoder import load_encoder
        self.encoder, self.hidden = load_encoder(spec)
        self.finetune = finetune
        for p in self.encoder.parameters():
            p.requires_grad_(finetune)

    def forward(self, text_bert: torch.Tensor):
        ids, att, seg = text_bert[:, 0], text_bert[:, 1], text_bert[:, 2]      # (B, L) each
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            out = self.encoder(input_ids=ids, attention_mask=att, token_type_ids=seg).last_hidden_state
        mask = att.bool()
        return out * mask.unsqueeze(-1).to(out.dtype), mask                   # (B, L, hidden), (B, L)
