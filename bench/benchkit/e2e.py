"""``bench/run.py --e2e``: the end-to-end student on CMU-MOSI (raw text + openSMILE audio in, sentiment out).

1. data: the MMSA pickle built from the data pack (``--data-dir``, the pack's layout) with MiniLM ids;
2. teacher: ``--ckpt`` (a fine-tuned MiniLM checkpoint) or, with ``--quick``, 2 epochs of fine-tuning;
3. shallow encoders: ``--encoder-ckpts`` or distilled (cpsl/compress/text_distill.py) per ``--layers``;
4. export: every model end to end at fp32, fp16 and int8 (``cpsl.deploy.export_artifact``);
5. accuracy: MOSI valid through the torch-free front end (export/frontend.py tokenizes the raw
   transcripts), retention vs the fp32 teacher (PyTorch);
6. latency: batch 1 and 32 of real valid transcripts (≤ 50 tokens after truncation), tokenization
   included and also alone, 1 and 2 ONNX Runtime threads; the precisions of one encoder depth are timed
   interleaved (same input, rotating order) so that load changes hit them alike;
7. profiles: ONNX Runtime per-op time of the fp32 and int8 graphs of the student at batch 1.
Writes ``OUT/bench.json`` (``summary`` first) and ``OUT/bench.md``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np

from cpsl.errors import CPSLError

from . import REPO
from .machine import machine_info


def _load_frontend():
    """export/frontend.py, loaded from its file: export/ is not a package (the device copies it as files)."""
    spec = importlib.util.spec_from_file_location("frontend", REPO / "export" / "frontend.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fe = _load_frontend()

PRECISIONS = ("fp32", "fp16", "int8")
from .e2e_report import (TARGET_B1_MS, TARGET_INT8_MB, TARGET_INT8_VS_FP32_MAE, TARGET_MAE_REL,  # noqa: E402
                         TARGET_RETENTION)


def build_data(data_dir: Path, work: Path, say):
    from cpsl.data.builders import build_mosi
    from cpsl.data.mmsa import load_mmsa, save_mmsa
    pkl = work / "mosi_minilm.pkl"
    if not pkl.is_file():
        mosi = data_dir / "mosi"
        for f in ("labels.csv", "audio_opensmile.csv"):
            if not (mosi / f).is_file():
                raise CPSLError(f"{mosi / f} not found (--data-dir must hold the data pack's mosi/ folder)")
        data, _ = build_mosi(mosi / "labels.csv", mosi / "audio_opensmile.csv", progress=False)
        save_mmsa(data, pkl)
        say(f"built {pkl}")
    return pkl, load_mmsa(pkl)


def quick_teacher(pkl: Path, data, work: Path, epochs: int, say) -> Path:
    from cpsl.config import preset
    from cpsl.train import run
    cfg = preset("teacher")
    cfg.model.text_encoder, cfg.model.finetune_text = "minilm", True
    cfg.data.path, cfg.train.seeds, cfg.train.epochs, cfg.train.num_threads = str(pkl), [1], epochs, 1
    cfg.train.progress = False                # no progress bars (was cfg.train.quiet, no such key)
    run(cfg, data, work / "teacher", log=say)
    return work / "teacher" / "seed1" / "best.pt"


def session(path: Path, threads: int):
    from cpsl.deploy.onnx import ort_session
    return ort_session(path, threads)


def others_of(art) -> list[str]:
    """The graph's inputs besides the token ids (a text-only student has none)."""
    return fe.other_modalities(json.loads(art.manifest_path.read_text()))


def _feats(split, others, i: int, j: int) -> dict:
    return {m: split.features[m][i:j] for m in others}


def predict_valid(sess, tok, split, others=("audio",), batch: int = 64) -> np.ndarray:
    """Raw transcripts through the front end and the graph, as a device would run them."""
    texts = [str(t) for t in split.raw_text]
    out = []
    for s in range(0, len(texts), batch):
        f = fe.feeds_for(tok, texts[s:s + batch], _feats(split, others, s, s + batch))
        out.append(sess.run(["sentiment"], f)[0])
    return np.concatenate(out).astype(np.float32)


def _pct(a) -> dict:
    a = np.asarray(a) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "iters": int(a.size)}


def time_e2e(sessions: dict, tok, split, batch: int, iters: int, budget_s: float, others=("audio",)) -> dict:
    """Tokenize + run on consecutive real transcripts; total, tokenization and graph times of every session
    in ``sessions`` (name -> session), interleaved: each round runs all of them on the same input in a
    rotating order, so that a change of machine load hits them alike. ``ratio_vs_<first>``: the median over
    rounds of (session / first session) total time."""
    texts = [str(t) for t in split.raw_text]
    n, names = len(texts), list(sessions)
    for k in range(3):                                              # warm-up
        i = (k * batch) % n
        for s in sessions.values():
            s.run(["sentiment"], fe.feeds_for(tok, texts[i:i + batch] or texts[:batch], _feats(split, others, i, i + batch)))
    rec = {m: ([], [], [], []) for m in names}                      # total, tokenize, graph, seq
    t_end = time.perf_counter() + budget_s * len(names)
    for k in range(iters):
        i = (k * batch) % max(1, n - batch + 1)
        for m in names[k % len(names):] + names[:k % len(names)]:
            t0 = time.perf_counter()
            enc = fe.encode(tok, texts[i:i + batch])
            t1 = time.perf_counter()
            f = dict(enc)
            for mod, x in _feats(split, others, i, i + batch).items():
                f[mod], f[f"{mod}_mask"] = np.ascontiguousarray(x, np.float32), np.ones(x.shape[:2], np.float32)
            sessions[m].run(["sentiment"], f)
            t2 = time.perf_counter()
            for lst, v in zip(rec[m], (t2 - t0, t1 - t0, t2 - t1, enc["input_ids"].shape[1])):
                lst.append(v)
        if time.perf_counter() > t_end and k >= 20:
            break
    base = np.asarray(rec[names[0]][0])
    return {m: {"total": _pct(tot), "tokenize": _pct(tk), "graph": _pct(gr), "seq_len_mean": float(np.mean(sq)),
                "seq_len_max": int(max(sq)), f"ratio_vs_{names[0]}": float(np.median(np.asarray(tot) / base)),
                "interleaved_with": names}
            for m, (tot, tk, gr, sq) in rec.items()}


def ort_op_profile(path: Path, feeds: dict, threads: int, runs: int, prefix: Path, top: int = 8) -> dict:
    """ONNX Runtime per-op time at one feed (averaged over ``runs`` after 3 warm-ups)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.enable_profiling, so.profile_file_prefix = True, str(prefix)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(3 + runs):
        sess.run(["sentiment"], feeds)
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink(missing_ok=True)
    runs_ev = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    start = runs_ev[3]["ts"] if len(runs_ev) > 3 else 0
    by: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e["ts"] >= start and e.get("name", "").endswith("_kernel_time"):
            s = by.setdefault(e.get("args", {}).get("op_name", "?"), [0.0, 0])
            s[0] += e["dur"]
            s[1] += 1
    n = max(1, len([e for e in runs_ev if e["ts"] >= start]))
    total = sum(v[0] for v in by.values()) / n
    ops = sorted(({"op": k, "ms_per_run": v[0] / n / 1e3, "calls": v[1] / n, "share": v[0] / n / total if total else 0}
                  for k, v in by.items()), key=lambda r: -r["ms_per_run"])
    return {"model": path.name, "node_ms": total / 1e3, "top_ops": ops[:top]}


# ---------------------------------------------------------------------------- the run
def _models(a, pkl, data, work, say) -> dict[int, Path]:
    from cpsl.compress.text_distill import distill_text_encoder
    if a.ckpt:
        teacher = Path(a.ckpt)
    elif a.quick:
        teacher = quick_teacher(pkl, data, work, a.epochs or 2, say)
    else:
        raise CPSLError("--e2e needs --ckpt (a checkpoint with a fine-tuned text encoder) or --quick")
    layers = [int(x) for x in a.layers.split(",") if x.strip()]
    given = [Path(p) for p in a.encoder_ckpts.split(",")] if a.encoder_ckpts else []
    if given and len(given) != len(layers):
        raise CPSLError(f"--encoder-ckpts needs one checkpoint per --layers entry ({len(layers)})")
    models = {6: teacher}
    for k, L in enumerate(layers):
        if given:
            models[L] = given[k]
            continue
        distill_text_encoder(teacher, data, L, work / f"enc{L}", epochs=a.student_epochs or (1 if a.quick else 3),
                             log=say)
        models[L] = work / f"enc{L}" / "best.pt"
    return models


def _export_all(models, pkl, work, say) -> dict:
    """Every model at every precision, calibrated as ``cpsl recipe mosi --edge`` calibrates its shipped
    int8 artefact (the same number of training batches), so that the int8 rows measure what ships."""
    from cpsl.deploy import ExportSettings, export_artifact
    from cpsl.recipes.edge import EdgeSettings
    calib = EdgeSettings().calib_batches
    arts = {}
    for L, ck in models.items():
        for p in PRECISIONS:
            t0 = time.perf_counter()
            m = export_artifact(ck, work / f"e2e_L{L}_{p}.onnx", ExportSettings(precision=p, data=str(pkl), e2e=True,
                                                                                  calib_batches=calib))
            arts[(L, p)] = m
            say(f"exported {L}-layer {p}: {m.files[m.model]['bytes'] / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)")
    return arts


def run_e2e(a, out: Path, work: Path, say) -> int:
    from cpsl.metrics import METRIC_KEYS, mmsa_metrics, retention

    from .e2e_report import summarize, write_markdown
    info = machine_info("cpu", 1)
    pkl, data = build_data(Path(a.data_dir), work, say)
    models = _models(a, pkl, data, work, say)
    arts = _export_all(models, pkl, work, say)
    valid = data["valid"]
    y = valid.labels.astype(np.float32)
    teacher_ref = arts[(6, "fp32")].metrics["valid_pytorch_fp32"]
    rows = []
    for L in sorted({L for L, _ in arts}, reverse=True):
        arts_l = {p: arts[(L, p)] for p in PRECISIONS if (L, p) in arts}           # fp32 first: the ratio's base
        tok = fe.load_tokenizer(arts_l["fp32"].onnx_path, json.loads(arts_l["fp32"].manifest_path.read_text()))
        others = others_of(arts_l["fp32"])
        lat: dict = {p: {} for p in arts_l}
        for threads in (1, 2):
            sessions = {p: session(m.onnx_path, threads) for p, m in arts_l.items()}
            for b in (1, 32):
                it = (a.iters or (150 if a.quick else 400)) if b == 1 else (20 if a.quick else 60)
                res = time_e2e(sessions, tok, valid, b, it, a.budget or (3.0 if a.quick else 8.0), others)
                for p in arts_l:
                    lat[p][f"t{threads}_b{b}"] = res[p]
        for p, m in arts_l.items():
            met = mmsa_metrics(predict_valid(session(m.onnx_path, 1), tok, valid, others), y)
            rows.append({"layers": L, "precision": p, "file": m.model, "bytes": m.files[m.model]["bytes"],
                         "metrics": {k: met[k] for k in METRIC_KEYS},
                         "retention_vs_teacher_fp32": retention(met, teacher_ref),
                         "pytorch_fp32": m.metrics["valid_pytorch_fp32"], "latency": lat[p]})
            say(f"{L}-layer {p}: {rows[-1]['bytes'] / 1e6:.1f} MB, Non0_acc_2 {met['Non0_acc_2']:.4f} MAE "
                f"{met['MAE']:.4f}; 1 thread b1 p50 {lat[p]['t1_b1']['total']['p50_ms']:.2f} ms")
    student = int(a.student_layers)
    def feeds(L):
        art = arts[(L, "fp32")]
        return fe.feeds_for(fe.load_tokenizer(art.onnx_path, json.loads(art.manifest_path.read_text())),
                            [str(valid.raw_text[0])], _feats(valid, others_of(art), 0, 1))
    profiles = {f"{L}-layer {p}": ort_op_profile(arts[(L, p)].onnx_path, feeds(L), 1, 50, work / f"prof_{L}_{p}")
                for L in sorted({student, 6}) for p in ("fp32", "int8")}
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res = {"summary": summarize(rows, student, teacher_ref), "machine": info, "teacher_pytorch_fp32": teacher_ref,
           "models": {str(L): str(p) for L, p in models.items()}, "rows": rows, "profiles_b1_1thread": profiles,
           "profile_input_tokens": int(feeds(student)["input_ids"].shape[1]), "command": "python bench/run.py " + " ".join(a.argv),
           "targets": {"int8_b1_p50_ms": TARGET_B1_MS, "retention_non0_acc2": TARGET_RETENTION,
                       "mae_increase_rel": TARGET_MAE_REL, "int8_mb": TARGET_INT8_MB,
                       "int8_vs_fp32_mae_rel": TARGET_INT8_VS_FP32_MAE}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    write_markdown(out / "bench.md", res)
    say(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0
