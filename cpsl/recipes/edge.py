"""The edge stage of the MOSI recipe (``cpsl recipe mosi --edge``; issue 32): from the recipe's
teachers to the device artefact in ``OUT/edge/``.

1. student: :func:`cpsl.compress.layer_distill.distill_layers` — the first seed's encoder cut to
   ``layers`` layers, distilled layer by layer on MOSI train + the MOSEI transcripts (the transfer
   set; never MOSI valid/test), prediction targets from the ensemble of every seed's
   ``best.pt``; kept on MOSI valid loss (``OUT/edge_work/student_L*``, reused when unchanged);
2. export: the student end to end (token ids in) at int8 — ``OUT/edge/sentiment.onnx`` with its
   tokenizer, manifest, golden batches, model card (README) and TensorRT build script — and its
   fp32 twin in ``OUT/edge_work/`` for the speed comparison;
3. scores: MMSA metrics of the single-model teacher (first seed, PyTorch), the ensemble (mean of
   the seeds' predictions) and the int8 student run as a device runs it (raw transcripts through
   the exported tokenizer, ONNX Runtime) on valid and, where the labels have test rows, test;
4. latency: batch 1, one thread, tokenization included, int8 and fp32 twin interleaved.

The results go to ``OUT/results.json`` under ``teacher``, ``ensemble``, ``student`` (``student.test``,
``teacher.test``: MMSA metric names; ``student.latency_b1_p50_ms``) and ``edge``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CPSLError
from ..fileutil import content_tag

EDGE_MODEL = "sentiment.onnx"
_RUN_ONLY = ("threads",)              # EdgeSettings that change how fast a run goes, not what it gives
_RUN_ONLY_DISTILL = ("progress",)     # the same among LayerDistillSettings


def _result_only(settings: dict, run_only: tuple) -> dict:
    return {k: v for k, v in settings.items() if k not in run_only}


@dataclass
class EdgeSettings:
    """The ``--edge-*`` options of ``cpsl recipe mosi``."""
    layers: int = 3                    # 3 (was 2): on the recipe's 5 folds the 3-layer student is closer to its teacher
    epochs: int = 6
    transfer: bool = True              # MOSEI transcripts in the transfer set (else MOSI train only)
    transfer_rows: int = 0             # 0: all of them
    audio: bool = False                # True: the student reads the audio vector too (False: text only, the
    #                                    default: the k-fold ties fused and text head, and valid favours text only)
    precision: str = "int8"
    calib_batches: int = 16
    threads: int = 0
    distill: dict = field(default_factory=dict)   # further LayerDistillSettings fields

    def check(self) -> None:
        if self.layers < 1 or self.epochs < 1:
            raise CPSLError("--edge-layers and --edge-epochs must be >= 1")


def _metrics(pred, y) -> dict:
    from ..metrics import METRIC_KEYS, mmsa_metrics
    m = mmsa_metrics(np.asarray(pred, np.float32), np.asarray(y, np.float32))
    return {k: float(m[k]) for k in METRIC_KEYS}


def _labelled_splits(data) -> list[str]:
    """valid, and test where the labels file has test rows."""
    return [s for s in ("valid", "test") if s in data.splits and len(data[s])]


def distill_settings(s: EdgeSettings):
    """The :class:`~cpsl.compress.layer_distill.LayerDistillSettings` the edge stage distils with."""
    from ..compress.layer_distill import LayerDistillSettings
    return LayerDistillSettings(layers=s.layers, epochs=s.epochs, transfer_rows=s.transfer_rows,
                                text_only=not s.audio, **s.distill)


def student_stage(teachers, mosi: Path, mosei: Path | None, out: Path, s: EdgeSettings, say) -> tuple[Path, dict]:
    """The distilled student (``OUT/edge_work/student_L<layers>_<tag>``; reused when teachers, data and
    settings are the same)."""
    import torch

    from ..compress.layer_distill import distill_layers, transfer_ids
    from ..data.mmsa import load_mmsa
    ds = distill_settings(s)
    tag = content_tag([str(t) for t in teachers], [Path(t).stat().st_mtime for t in teachers], str(mosi),
               str(mosei) if s.transfer else None, _result_only(asdict(ds), _RUN_ONLY_DISTILL))
    d = out / "edge_work" / f"student_L{s.layers}{'' if s.audio else '_text'}_{tag}"
    if (d / "results.json").is_file() and (d / "best.pt").is_file():
        say(f"[edge] student: cached {d}")
        return d / "best.pt", json.loads((d / "results.json").read_text())
    if s.threads:
        torch.set_num_threads(s.threads)
    data = load_mmsa(mosi)
    ids = None
    if s.transfer:
        if mosei is None:
            raise CPSLError("--edge with the MOSEI transfer set needs the MOSEI pickle (not built when --encoder "
                            "is given): pass --edge-no-transfer or drop --encoder")
        ids = transfer_ids(mosei, s.transfer_rows, ds.seed)
        say(f"[edge] transfer set: {len(data['train'])} MOSI training rows + {len(ids)} transcripts of {mosei.name}")
    say(f"[edge] distilling a {s.layers}-layer student from {len(teachers)} teacher(s) -> {d}")
    res = distill_layers(teachers, data, ids, d, ds, log=say)
    return d / "best.pt", res


def export_stage(student: Path, mosi: Path, out: Path, s: EdgeSettings, say) -> dict:
    """The int8 artefact in ``OUT/edge/`` and its fp32 twin in ``OUT/edge_work/``; their manifests."""
    from ..deploy import ExportSettings, export_artifact
    edge = out / "edge"
    edge.mkdir(parents=True, exist_ok=True)
    arts = {}
    for prec, path in ((s.precision, edge / EDGE_MODEL), ("fp32", out / "edge_work" / "sentiment_fp32.onnx")):
        t0 = time.perf_counter()
        m = export_artifact(student, path, ExportSettings(precision=prec, data=str(mosi), e2e=True,
                                                          calib_batches=s.calib_batches))
        arts[prec] = {"path": str(path), "bytes": m.files[m.model]["bytes"], "quantization": m.quantization}
        say(f"[edge] exported {prec}: {path} ({arts[prec]['bytes'] / 1e6:.1f} MB, {time.perf_counter() - t0:.0f} s)")
    return arts


def score_stage(teachers, student_res: dict, arts: dict, mosi: Path, s: EdgeSettings, say) -> dict:
    """Teacher, ensemble and student metrics on valid (and test), the student's b1 latency."""
    from ..compress.layer_distill import ensemble_predictions
    from ..data.mmsa import load_mmsa
    from ..deploy.scoring import latency_b1, predict_texts
    data = load_mmsa(mosi)
    splits = _labelled_splits(data)
    teacher, ensemble, student, fp32 = {}, {}, {}, {}
    ensembles = dict(zip(splits, ensemble_predictions(teachers, [data[sp] for sp in splits])))
    for sp in splits:
        y = data[sp].labels
        mean, members = ensembles[sp]
        teacher[sp], ensemble[sp] = _metrics(members[0], y), _metrics(mean, y)
        student[sp] = _metrics(predict_texts(arts[s.precision]["path"], data[sp]), y)
        fp32[sp] = _metrics(predict_texts(arts["fp32"]["path"], data[sp]), y)
        say(f"[edge] {sp}: teacher MAE {teacher[sp]['MAE']:.4f} Non0_acc_2 {teacher[sp]['Non0_acc_2']:.4f} | "
            f"ensemble({len(teachers)}) MAE {ensemble[sp]['MAE']:.4f} | {s.precision} student MAE "
            f"{student[sp]['MAE']:.4f} Non0_acc_2 {student[sp]['Non0_acc_2']:.4f}")
    lat = latency_b1({s.precision: arts[s.precision]["path"], "fp32": arts["fp32"]["path"]}, data["valid"])
    say(f"[edge] batch 1, 1 thread, tokenization included: {s.precision} {lat[s.precision]['p50_ms']:.2f} ms, "
        f"fp32 twin {lat['fp32']['p50_ms']:.2f} ms (p50)")
    ref = {sp: teacher[sp] for sp in splits}
    block = {
        "teacher": {**ref, "ckpt": str(teachers[0]), "note": "the single-model teacher (first seed), PyTorch fp32"},
        "ensemble": {**ensemble, "members": [str(t) for t in teachers]},
        "student": {**student, "layers": s.layers, "precision": s.precision, "audio": s.audio, "file": arts[s.precision]["path"],
                    "bytes": arts[s.precision]["bytes"], "latency_b1_p50_ms": lat[s.precision]["p50_ms"],
                    "latency_b1": lat[s.precision], "best_epoch": student_res.get("best_epoch"),
                    "distill_valid_pytorch": student_res.get("valid"),
                    "retention_non0_acc2": {sp: student[sp]["Non0_acc_2"] / ref[sp]["Non0_acc_2"] for sp in splits},
                    "mae_vs_teacher": {sp: student[sp]["MAE"] / ref[sp]["MAE"] - 1 for sp in splits},
                    "scored": "raw transcripts through the exported tokenizer and ONNX Runtime (CPU), as a device runs it"},
        "student_fp32": {**fp32, "bytes": arts["fp32"]["bytes"], "latency_b1_p50_ms": lat["fp32"]["p50_ms"],
                         "file": arts["fp32"]["path"]},
    }
    return block


def run_edge(out: Path, seeds: str, mosi: Path, mosei: Path | None, s: EdgeSettings, say) -> dict:
    """Every edge stage; returns the blocks :func:`cpsl.recipes.mosi.run_recipe` merges into results.json."""
    s.check()
    teachers = [out / f"seed{x.strip()}" / "best.pt" for x in seeds.split(",") if x.strip()]
    missing = [str(t) for t in teachers if not t.is_file()]
    if missing:
        raise CPSLError(f"--edge needs the trained seeds' checkpoints; missing {', '.join(missing)}")
    t0 = time.perf_counter()
    student, res = student_stage(teachers, mosi, mosei, out, s, say)
    t1 = time.perf_counter()
    arts = export_stage(student, mosi, out, s, say)
    t2 = time.perf_counter()
    block = score_stage(teachers, res, arts, mosi, s, say)
    block["edge"] = {"dir": str(out / "edge"), "model": EDGE_MODEL, "student_ckpt": str(student),
                     "settings": asdict(s), "distill": {k: res[k] for k in ("layer_map", "history", "transfer_rows",
                                                                            "mosi_train_rows", "settings") if k in res},
                     "timing": {"distill_s": t1 - t0, "export_s": t2 - t1, "score_s": time.perf_counter() - t2}}
    return block


FOLD_EDGE = "edge_results.json"


def _same_settings(blk: dict, s: EdgeSettings) -> bool:
    """A kept edge block was made with the settings ``s`` would use, but for what changes only how a
    run goes: the same :class:`EdgeSettings` and the same effective distillation settings (those the
    block recorded, defaults resolved, so a later change of a default is not mistaken for a match)."""
    def edge(x):
        return {k: v for k, v in _result_only(x, _RUN_ONLY).items() if k != "distill"}
    ran = (blk["edge"].get("distill") or {}).get("settings")
    return (edge(blk["edge"]["settings"]) == edge(asdict(s)) and ran is not None
            and _result_only(ran, _RUN_ONLY_DISTILL) == _result_only(asdict(distill_settings(s)), _RUN_ONLY_DISTILL))


def edge_fold(fold_dir: Path, seed: str, pkl: Path, mosei: Path | None, s: EdgeSettings, say) -> dict:
    """:func:`run_edge` on one k-fold run (its teacher ``fold_dir/seed<seed>/best.pt``, its fold pickle:
    transfer set = the fold's train rows + the MOSEI transcripts, scores on the fold's valid rows);
    the block is kept in ``fold_dir/edge_results.json`` and reused for the same settings."""
    f = fold_dir / FOLD_EDGE
    if f.is_file():
        blk = json.loads(f.read_text())
        if _same_settings(blk, s):
            say(f"[kfold edge] {fold_dir.name}: kept {f}")
            return blk
    t0 = time.perf_counter()
    blk = run_edge(fold_dir, seed, pkl, mosei, s, say)
    blk["edge"]["timing"]["fold_edge_s"] = time.perf_counter() - t0
    f.write_text(json.dumps(blk, indent=1))
    return blk


def _epoch_curves(fold_dir: Path, seed: str, blk: dict) -> tuple[list[dict], list[dict]]:
    """Valid MAE and Non0_acc_2 after every epoch of the fold's teacher (its ``log.jsonl``; empty
    where absent) and of its student (PyTorch fp32, the distillation's history)."""
    from ..ablate import read_history

    def pick(v):
        return {k: float(v[k]) for k in ("MAE", "Non0_acc_2") if k in v}
    teacher = [pick(rec["valid"]) for rec in read_history(fold_dir / f"seed{seed}") if "MAE" in (rec.get("valid") or {})]
    student = [pick(h["valid"]) for h in blk["edge"]["distill"].get("history", [])]
    return teacher, student


def cross_fold_epochs(teacher_curves: list[list[dict]], student_curves: list[list[dict]]) -> dict | None:
    """The student against its teacher with neither checkpoint chosen on the rows it is scored on:
    for fold i each model takes the epoch with the lowest mean valid MAE over the *other* folds
    (among the epochs all of them reached; the fold's own last epoch where it stopped earlier), and
    both are read off fold i's curves at those epochs. Returns per fold the epochs (1-based) and
    MAEs, and the student's MAE change and Non0_acc_2 retention as means with 95 % t-intervals;
    None with under 2 folds or where a fold lacks a curve."""
    from ..ablate import mean_interval
    k = len(teacher_curves)
    if k < 2 or len(student_curves) != k or any(not c for c in teacher_curves + student_curves):
        return None

    def epoch(curves, i):
        others = [c for j, c in enumerate(curves) if j != i]
        n = min(len(c) for c in others)
        mean = np.mean([[e["MAE"] for e in c[:n]] for c in others], axis=0)
        return min(int(np.argmin(mean)), len(curves[i]) - 1)
    te = [epoch(teacher_curves, i) for i in range(k)]
    se = [epoch(student_curves, i) for i in range(k)]
    t = [teacher_curves[i][e] for i, e in enumerate(te)]
    s = [student_curves[i][e] for i, e in enumerate(se)]
    has_acc = all("Non0_acc_2" in x for x in t + s)
    return {"teacher_epoch": [e + 1 for e in te], "student_epoch": [e + 1 for e in se],
            "teacher_mae": [x["MAE"] for x in t], "student_fp32_mae": [x["MAE"] for x in s],
            "mae_vs_teacher": mean_interval([b["MAE"] / a["MAE"] - 1 for a, b in zip(t, s)]),
            "retention_non0_acc2": (mean_interval([b["Non0_acc_2"] / a["Non0_acc_2"] for a, b in zip(t, s)])
                                    if has_acc else None),
            "note": "each model's epoch chosen on the other folds' valid rows (lowest mean MAE), scored on this "
                    "fold's; the student fp32 (PyTorch), distilled from the teacher checkpoint kept on this fold"}


def selection_optimism(teacher_epochs: list[list[float]], student_epochs: list[list[float]],
                       teacher_kept: list[float], student_kept: list[float]) -> dict | None:
    """How much of the fold figures is the choice of checkpoint on the rows they are scored on: per
    model, the median valid MAE over its epochs after the first (a checkpoint taken without looking
    at those rows, typically) minus the kept one's; and the student's change against the teacher
    compared median to median. None where a fold lacks a teacher log or has under 2 epochs."""
    from ..ablate import mean_interval
    if any(len(t) < 2 for t in teacher_epochs) or any(len(s) < 2 for s in student_epochs):
        return None
    t_med = [float(np.median(t[1:])) for t in teacher_epochs]
    s_med = [float(np.median(s[1:])) for s in student_epochs]
    return {"teacher": mean_interval([m - k for m, k in zip(t_med, teacher_kept)]),
            "student": mean_interval([m - k for m, k in zip(s_med, student_kept)]),
            "teacher_median_mae": t_med, "student_fp32_median_mae": s_med,
            "mae_vs_teacher_median_epochs": mean_interval([s / t - 1 for s, t in zip(s_med, t_med)]),
            "note": "median valid MAE over epochs 2.. minus the kept checkpoint's (PyTorch fp32); "
                    "an indication of best-of-N optimism, not an unbiased estimate"}


def edge_kfold(folder: Path, paths: list[Path], seed: str, mosei: Path | None, s: EdgeSettings, say) -> dict:
    """The edge student of every k-fold teacher (``folder/fold<i>``), each scored on its fold's valid
    rows as a device runs it, paired with its own teacher: per fold and as the mean with its 95 %
    t-interval over folds — the int8 student's Non0_acc_2 retention and MAE change, the metrics of
    both, and student − teacher per metric."""
    from ..ablate import mean_interval
    from ..kfold import paired
    from ..plots import plot_kfold_edge
    blocks = []
    for i, p in enumerate(paths):
        say(f"[kfold edge] fold {i + 1}/{len(paths)}")
        blocks.append(edge_fold(folder / f"fold{i}", seed, p, mosei, s, say))
    teacher = [b["teacher"]["valid"] for b in blocks]
    student = [b["student"]["valid"] for b in blocks]
    fp32 = [b["student_fp32"]["valid"] for b in blocks]
    ret = [b["student"]["retention_non0_acc2"]["valid"] for b in blocks]
    mae = [b["student"]["mae_vs_teacher"]["valid"] for b in blocks]
    curves = [_epoch_curves(folder / f"fold{i}", seed, b) for i, b in enumerate(blocks)]
    epochs = [([e["MAE"] for e in t], [e["MAE"] for e in s_]) for t, s_ in curves]
    res = {"k": len(paths), "seed": int(seed), "layers": s.layers, "precision": s.precision, "audio": s.audio,
            "retention_non0_acc2": mean_interval(ret), "mae_vs_teacher": mean_interval(mae),
            "student_minus_teacher": paired(student, teacher), "fp32_minus_teacher": paired(fp32, teacher),
            "teacher": {m: mean_interval([t[m] for t in teacher]) for m in teacher[0]},
            "student": {m: mean_interval([t[m] for t in student]) for m in student[0]},
            "per_fold": {"teacher": teacher, "student": student, "student_fp32": fp32, "retention_non0_acc2": ret,
                         "mae_vs_teacher": mae, "bytes": [b["student"]["bytes"] for b in blocks],
                         "latency_b1_p50_ms": [b["student"]["latency_b1_p50_ms"] for b in blocks],
                         "best_epoch": [b["student"]["best_epoch"] for b in blocks],
                         "teacher_valid_mae_by_epoch": [e[0] for e in epochs],
                         "student_valid_mae_by_epoch": [e[1] for e in epochs],
                         "edge_s": [sum(b["edge"]["timing"][k] for k in ("distill_s", "export_s", "score_s"))
                                    for b in blocks]},
            "selection": "each fold's teacher checkpoint and student epoch kept on that fold's valid rows",
            "selection_optimism": selection_optimism(
                [e[0] for e in epochs], [e[1] for e in epochs], [t["MAE"] for t in teacher],
                [(b["student"].get("distill_valid_pytorch") or {}).get("MAE", float("nan")) for b in blocks]),
            "cross_fold_epochs": cross_fold_epochs([c[0] for c in curves], [c[1] for c in curves]),
            "plot": str(folder / "edge_kfold.png")}
    plot_kfold_edge(res, folder / "edge_kfold.png")
    return res
