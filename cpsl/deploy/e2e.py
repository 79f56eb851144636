"""The two graph interfaces an export can have.

``features`` (checkpoints that read text features): one ``(x_m, x_m_mask)`` pair per modality,
as documented in :mod:`cpsl.deploy.onnx`.

``tokens`` (end to end; checkpoints with a pretrained text encoder): the fine-tuned encoder and
the fused model in one graph, so that a device needs nothing but the tokenizer and a runtime:

=====================  ================================  =========================================
``input_ids``          int64 ``(batch, seq)``            token ids from ``tokenizer.json``
``attention_mask``     int64 ``(batch, seq)``            1 on real tokens, 0 on padding
``{m}`` / ``{m}_mask``  float32 as in the features graph  every non-text modality
``sentiment``          float32 ``(batch,)``              the fused prediction
=====================  ================================  =========================================

Token type ids are all 0 (single-segment input, as in training) and are made inside the graph.
``batch`` and ``seq`` are dynamic. Beside the graph the export writes ``OUT.tokenizer.json`` (a
copy of the encoder's) and the manifest's ``tokenizer`` entry (max length, truncation, padding),
which is everything ``export/runner.py predict`` needs.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import CPSLError
from . import onnx as ox

TOKEN_INPUTS = ("input_ids", "attention_mask")
TOKEN_DTYPE = np.int64


class TokenExportWrapper(nn.Module):
    """``(input_ids, attention_mask, x_m, x_m_mask, ...)`` → ``sentiment`` (B,) for ONNX export."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.others = tuple(m for m in model.modalities if m != "text")

    def forward(self, input_ids, attention_mask, *rest):
        ids, am = input_ids.long(), attention_mask.long()                        # (B, L)
        tb = torch.stack([ids, am, torch.zeros_like(ids)], 1)                     # (B, 3, L)
        x = {m: rest[2 * i] for i, m in enumerate(self.others)}
        mask = {m: rest[2 * i + 1] > 0.5 for i, m in enumerate(self.others)}
        return self.model.predict(x, mask, tb)


class FeatureGraph:
    """Text (if any) as features: the graph :mod:`cpsl.deploy.onnx` exports."""

    kind = "features"
    int8_per_channel = True          # int8 defaults of this interface (ExportSettings may override)
    int8_min_weight = 0
    int8_gather_min = 0              # int8: Gather tables of this many elements or more stored in int8 (0: none)
    preprocessing = ox.PREPROCESSING
    mask = "float32, 1.0 on valid steps and 0.0 on padding (the graph tests mask > 0.5)"

    def __init__(self, model):
        ox.check_exportable(model)
        self.modalities = tuple(model.modalities)

    def input_names(self) -> list[str]:
        return ox.input_names(self.modalities)

    def feeds(self, batch) -> dict[str, np.ndarray]:
        return ox.batch_feeds(batch, self.modalities)

    def export(self, model, path, example, opset: int):
        return ox.export_onnx(model, path, example, opset)

    def profile(self, prof: dict, data, max_len: int | None = None) -> dict:
        return prof

    def golden_lengths(self, batch) -> dict:
        return {m: int(batch.x[m].shape[1]) for m in self.modalities}


class TokenGraph(FeatureGraph):
    """Token ids in, the text encoder inside the graph (module docstring)."""

    kind = "tokens"
    # only the encoder's Linear layers (384x384 and up) and the head's widest are worth Q/DQ; with one Q/DQ pair
    # per quantized input (compress/quantize.dedicate_qdq) ONNX Runtime CPU fuses every one into
    # MatMulIntegerToFloat, per-channel scales included; the word-embedding table (30522 x 384, 71 % of an
    # fp32 2-layer graph) is stored in int8 and only the gathered rows are dequantized. The position and
    # token-type tables (512 x 384, 2 x 384) stay float. bench/results/int8_e2e
    int8_per_channel = True
    int8_min_weight = 65536
    int8_gather_min = 262144
    mask = ("attention_mask: int64, 1 on real tokens and 0 on padding; other modalities' masks float32, 1.0 on "
            "valid steps (the graph tests mask > 0.5)")
    preprocessing = ("text: the tokenizer in tokenizer.json (lower-casing WordPiece), [CLS] … [SEP], truncated "
                     "to tokenizer.max_length tokens, padded with id 0 / mask 0 to the batch's longest; "
                     "token type ids are 0 inside the graph; other modalities: features as in the MMSA pickle, "
                     "masks 1 on valid steps; BatchNorm statistics are inside the graph")

    def __init__(self, model):
        if model.text_backbone is None:
            raise CPSLError("--e2e needs a checkpoint with a text encoder (model.text_encoder); this one reads "
                            "text features")
        self.modalities = tuple(model.modalities)
        self.others = tuple(m for m in self.modalities if m != "text")

    def input_names(self) -> list[str]:
        return list(TOKEN_INPUTS) + ox.input_names(self.others)

    def dynamic_axes(self) -> dict:
        ax = {n: {0: "batch", 1: "seq"} for n in TOKEN_INPUTS}
        ax.update({k: v for k, v in ox.dynamic_axes(self.others).items()})
        return ax

    def feeds(self, batch) -> dict[str, np.ndarray]:
        if batch.text_bert is None:
            raise CPSLError("the data has no text_bert token ids: an end-to-end graph needs them")
        tb = batch.text_bert.detach().cpu().numpy()
        f = {"input_ids": np.ascontiguousarray(tb[:, 0], TOKEN_DTYPE),
             "attention_mask": np.ascontiguousarray(tb[:, 1], TOKEN_DTYPE)}
        f.update(ox.batch_feeds(batch, self.others))
        return f

    def export(self, model, path, example, opset: int):
        """The legacy TorchScript exporter over :class:`TokenExportWrapper`; returns the checked proto."""
        enc = model.text_backbone.encoder
        old_impl = getattr(enc.config, "_attn_implementation", None)
        enc.config._attn_implementation = "eager"   # plain MatMul/Softmax attention: what TensorRT fuses
        f = self.feeds(example)
        args = tuple(torch.from_numpy(f[n]) for n in self.input_names())
        try:
            return ox.trace_export(model, TokenExportWrapper(model).eval(), args, path, self.input_names(),
                                   self.dynamic_axes(), opset)
        finally:
            if old_impl is not None:
                enc.config._attn_implementation = old_impl

    def profile(self, prof: dict, data, max_len: int | None = None) -> dict:
        """The features profile with ``text``/``text_mask`` replaced by the two (batch, seq) token inputs;
        the longest sequence is the tokenizer's truncation length (or ``max_len``)."""
        t = prof.pop("text")
        prof.pop("text_mask")
        seq = {k: v[:2] for k, v in t.items()}
        seq["max"][1] = int(max_len or max_length(data))
        seq["opt"][1] = min(seq["opt"][1], seq["max"][1])
        seq["min"] = [1, min(2, seq["max"][1])]        # [CLS] [SEP] at least
        return {"input_ids": seq, "attention_mask": dict(seq), **prof}

    def golden_lengths(self, batch) -> dict:
        return {"seq": int(batch.text_bert.shape[2]), **{m: int(batch.x[m].shape[1]) for m in self.others}}


def graph_for(model, e2e: bool | None):
    """``e2e`` True: tokens (error without a text encoder); False: features; None: tokens where the
    checkpoint has a text encoder, else features."""
    if e2e is None:
        e2e = model.text_backbone is not None
    return TokenGraph(model) if e2e else FeatureGraph(model)


def max_length(data) -> int:
    """The truncation length the data was tokenized with (its ``text_bert`` width)."""
    tb = next((s.text_bert for s in data.splits.values() if s.text_bert is not None), None)
    if tb is None:
        raise CPSLError("the data has no text_bert token ids: an end-to-end graph needs them")
    return int(tb.shape[2])


def tokenizer_entry(model, cfg, data, out_path: Path) -> dict:
    """Copy the encoder's ``tokenizer.json`` to ``out_path``; return the manifest's ``tokenizer`` entry."""
    from ..text_encoder import resolve_encoder_path
    src = resolve_encoder_path(cfg.model.text_encoder) / "tokenizer.json"
    if not src.is_file():
        raise CPSLError(f"the text encoder has no tokenizer.json at {src}: the runner needs it")
    shutil.copyfile(src, out_path)
    return {"file": out_path.name, "max_length": max_length(data), "truncation": "longest_first, right",
            "padding": "right to the batch's longest, id 0, mask 0", "token_type_ids": "all 0 (in the graph)",
            "library": "tokenizers (Hugging Face), Tokenizer.from_file"}
