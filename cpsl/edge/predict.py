"""``runner.py predict``: sentiment of raw text (+ the other modalities' features) with an
end-to-end export (token ids in). Imports neither torch nor transformers: tokenization is
export/frontend.py (``tokenizers``), the model runs on runner.py's backends (ONNX Runtime or
TensorRT)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

try:                                   # inside the cpsl package (cpsl.edge)
    from . import frontend as fe
except ImportError:                    # a plain file copied beside runner.py and frontend.py
    import frontend as fe


def parse_predict_args(argv):
    ap = argparse.ArgumentParser(prog="runner.py predict",
                                 description="Sentiment of raw text (+ the other modalities' features) with an "
                                             "end-to-end export; torch-free.")
    ap.add_argument("--model", required=True, help="model.onnx (ONNX Runtime) or model.plan (TensorRT), with its "
                    "manifest and tokenizer.json beside it")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to score (repeat for several)")
    src.add_argument("--csv", help="batch mode: a CSV with a 'text' column (optional 'id'), plus a0..aN "
                     "audio features per row when the model reads audio")
    ap.add_argument("--audio-features", help="with --text: a CSV (header a0..aN) with one row per audio step")
    ap.add_argument("--out", help="batch mode: write id,text,sentiment here (default: print)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch mode: texts per run (default 32)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"], help="onnxruntime provider")
    ap.add_argument("--json", metavar="OUT.json", help="also write the predictions as JSON")
    return ap.parse_args(argv)


def main(argv, rt) -> int:
    """``rt``: the runner module (its backends and UsageError), passed in so this file does not import it."""
    UsageError, open_backend, run_checked = rt.UsageError, rt.open_backend, rt.run_checked
    args = parse_predict_args(argv)
    try:
        if args.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        for t in args.text or ():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:                 # undecodable bytes in argv arrive as surrogates
                raise UsageError("--text is not valid UTF-8 text") from None
        model = Path(args.model)
        if not model.is_file():
            raise UsageError(f"model file not found: {args.model}")
        man = fe.load_manifest(model)
        tok = fe.load_tokenizer(model, man)
        others = fe.other_modalities(man)
        if args.csv:
            ids, texts, feats = fe.read_batch_csv(args.csv, man)
        else:
            ids, texts = [str(k) for k in range(len(args.text))], list(args.text)
            feats = {}
            for m in others:
                if m != "audio" or not args.audio_features:
                    raise UsageError(f"the model also reads {m} ({man['dims'][m]} features): pass "
                                     f"--{m}-features FILE.csv" + (" or use --csv" if m != "audio" else ""))
                x = fe.sequence_features(args.audio_features, m, int(man["dims"][m]))
                feats[m] = np.repeat(x[None], len(texts), 0)                       # (B, L, d)
        backend = open_backend(str(model), args.threads, args.provider)
        preds = []
        for s in range(0, len(texts), args.batch_size):
            chunk = {m: x[s:s + args.batch_size] for m, x in feats.items()}
            feeds = fe.feeds_for(tok, texts[s:s + args.batch_size], chunk)
            preds.append(np.asarray(run_checked(backend, feeds, f"texts {s}..{s + len(feeds['input_ids']) - 1}"),
                                    np.float32).reshape(-1))
        preds = np.concatenate(preds)
        for o in (args.out, args.json):
            if o and Path(o).exists() and not Path(o).is_file():
                raise UsageError(f"{o} is a folder, pipe or device; give a regular file name")
        if args.out:
            fe.write_predictions(args.out, ids, texts, preds)
            print(f"wrote {args.out}: {len(preds)} predictions ({backend.name} {backend.device})")
        else:
            for t, p in zip(texts, preds):
                print(f"{float(p):+.6f}\t{t}")
        if args.json:
            Path(args.json).write_text(json.dumps({"model": str(model), "backend": backend.name, "predictions": [
                {"id": i, "text": t, "sentiment": float(p)} for i, t, p in zip(ids, texts, preds)]}, indent=2))
    except (UsageError, fe.InputError) as e:  # noqa: F821 - bound from rt above
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                       # an unwritable output (/dev/full, a read-only folder)
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2
    return 0
