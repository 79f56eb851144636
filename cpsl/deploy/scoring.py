"""An end-to-end artefact scored as a device runs it: raw transcripts through the exported
tokenizer (``cpsl.edge.frontend``, the runner's own front end) and the graph under ONNX Runtime.

* :func:`predict_texts` — predictions of a split's raw transcripts (+ its other modalities);
* :func:`latency_b1` — batch-1 latency on consecutive real transcripts, tokenization included,
  several graphs interleaved in rounds so that a change of machine load hits all of them alike.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..edge import frontend as fe
from ..errors import CPSLError


def load(onnx_path: str | Path, threads: int = 1):
    """``(session, tokenizer, other modalities)`` of an end-to-end artefact."""
    from .onnx import ort_session
    onnx_path = Path(onnx_path)
    man = json.loads(onnx_path.with_name(f"{onnx_path.stem}.manifest.json").read_text())
    if man.get("graph") != "tokens":
        raise CPSLError(f"{onnx_path.name} is not an end-to-end (token ids) graph")
    return ort_session(onnx_path, threads), fe.load_tokenizer(onnx_path, man), fe.other_modalities(man)


def _feeds(tok, split, others, rows) -> dict:
    texts = [str(split.raw_text[i]) for i in rows]
    return fe.feeds_for(tok, texts, {m: split.features[m][rows] for m in others})


def predict_texts(onnx_path, split, threads: int = 1, batch: int = 64) -> np.ndarray:
    """The artefact's predictions on every row of ``split`` from its raw transcripts."""
    if split.raw_text is None:
        raise CPSLError("the split has no raw transcripts (raw_text): an end-to-end score needs them")
    sess, tok, others = load(onnx_path, threads)
    out = [sess.run(["sentiment"], _feeds(tok, split, others, np.arange(s, min(s + batch, len(split)))))[0]
           for s in range(0, len(split), batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def latency_b1(onnx_paths: dict, split, iters: int = 300, budget_s: float = 20.0, threads: int = 1) -> dict:
    """name -> p50/p90/p99 ms at batch 1 (tokenize + run), 1 thread, over consecutive real transcripts,
    the graphs interleaved row by row."""
    loaded = {k: load(p, threads) for k, p in onnx_paths.items()}
    n = len(split)
    times = {k: [] for k in loaded}
    for k, (sess, tok, others) in loaded.items():                 # warm-up
        for i in range(3):
            sess.run(["sentiment"], _feeds(tok, split, others, [i % n]))
    t_end = time.perf_counter() + budget_s
    for it in range(iters):
        for k, (sess, tok, others) in loaded.items():
            t0 = time.perf_counter()
            sess.run(["sentiment"], _feeds(tok, split, others, [it % n]))
            times[k].append(time.perf_counter() - t0)
        if time.perf_counter() > t_end and it >= 30:
            break
    return {k: {"p50_ms": float(np.percentile(v, 50) * 1e3), "p90_ms": float(np.percentile(v, 90) * 1e3),
                "p99_ms": float(np.percentile(v, 99) * 1e3), "iters": len(v), "threads": threads,
                "includes": "tokenization + graph, batch 1"} for k, v in times.items()}
