"""The pipeline stages of bench/run.py: data, teacher, student, export (through cpsl.deploy.export_artifact), sizes."""
from __future__ import annotations

import math
import traceback
from pathlib import Path

import numpy as np
import torch




# ---------------------------------------------------------------------------- data
def load_bench_data(spec: str, sizes: str | None, synth_seed: int, work: Path):
    """-> (MMSAData, data argument for ``cpsl export``)."""
    from cpsl.data import generate, load_data, synth_spec_from_args
    from cpsl.data.mmsa import save_mmsa
    if spec == "synth" or spec.startswith("synth:"):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else synth_seed
        data = generate(synth_spec_from_args(seed=seed, sizes=sizes))
        if sizes:  # not reproducible from a "synth:N" string: write it for cpsl export
            p = work / "synth.pkl"
            save_mmsa(data, p)
            return data, str(p)
        return data, f"synth:{seed}"
    if sizes:
        from cpsl.errors import CPSLError
        raise CPSLError("--sizes applies to synthetic data only")
    return load_data(spec), spec


def eval_split_name(data) -> str:
    """``test`` when it has usable labels (non-empty, finite, not constant), else ``valid``."""
    s = data.splits.get("test")
    if s is not None and len(s) >= 2:
        y = np.asarray(s.labels, dtype=np.float64)
        if np.isfinite(y).all() and y.std() > 0:
            return "test"
    return "valid"


def bench_lengths(split, modalities, rule: str = "p95") -> dict:
    out = {}
    for m in modalities:
        ln = np.asarray(split.lengths[m])
        L = int(ln.max()) if rule == "max" else int(math.ceil(np.percentile(ln, 95)))
        out[m] = max(1, min(L, int(split.features[m].shape[1])))
    return out


def bench_inputs(split, modalities, lengths: dict, batch: int, seed: int = 0) -> dict:
    """Real rows of ``split`` cut/padded to ``lengths``: ``{m: (B, L, d) float32, m_mask: (B, L) float32}``."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(split), size=batch, replace=len(split) < batch)
    feeds = {}
    for m in modalities:
        L = lengths[m]
        x = np.zeros((batch, L, split.features[m].shape[2]), np.float32)
        n = min(L, split.features[m].shape[1])
        x[:, :n] = split.features[m][rows, :n]
        valid = np.minimum(np.asarray(split.lengths[m])[rows], L)
        mask = (np.arange(L)[None, :] < valid[:, None])
        x *= mask[:, :, None]
        feeds[m] = np.ascontiguousarray(x)
        feeds[f"{m}_mask"] = mask.astype(np.float32)
    return feeds


def torch_inputs(feeds: dict, modalities, device="cpu"):
    x = {m: torch.from_numpy(feeds[m]).to(device) for m in modalities}
    mask = {m: torch.from_numpy(feeds[f"{m}_mask"] > 0.5).to(device) for m in modalities}
    return x, mask


# ---------------------------------------------------------------------------- train / distill / export
def train_teacher(data, data_arg: str, synth_seed: int, epochs: int, device: str, out: Path, log) -> dict:
    from cpsl.config import build_config
    from cpsl.train import run
    cfg = build_config("teacher")
    cfg.train.epochs, cfg.train.seeds, cfg.train.progress, cfg.train.device = epochs, [1], False, device
    cfg.data.path, cfg.data.synth_seed = data_arg, synth_seed
    res = run(cfg, data, out, log=log, overwrite=True)     # --work is scratch: a rerun replaces it
    return {"source": "trained", "epochs": epochs, "epochs_run": res["per_seed"][0]["epochs_run"],
            "best_epoch": res["per_seed"][0]["best_epoch"], "ckpt": out / "seed1" / "best.pt"}


def distill_student(teacher_ckpt: Path, data, data_arg: str, synth_seed: int, epochs: int, device: str,
                    out: Path, log) -> dict:
    from cpsl.compress.distill import distill
    from cpsl.config import build_config
    from cpsl.train import run
    cfg = build_config("student")
    cfg.train.epochs, cfg.train.seeds, cfg.train.progress, cfg.train.device = epochs, [1], False, device
    cfg.data.path, cfg.data.synth_seed = data_arg, synth_seed
    res = distill(teacher_ckpt, data, cfg, out, log=log, overwrite=True, train_loop=run)
    return {"source": "distilled", "epochs": epochs, "epochs_run": res["per_seed"][0]["epochs_run"],
            "best_epoch": res["per_seed"][0]["best_epoch"], "ckpt": out / "seed1" / "best.pt",
            "param_ratio": res["distill"]["params"]["ratio"]}


def artefact_plan(teacher_ckpt, student_ckpt) -> list[tuple[str, str, Path, str]]:
    """``(key, kind, ckpt, precision)``: the teacher at fp32, the student at every registered precision."""
    from cpsl.deploy import precisions
    return ([("teacher_fp32", "teacher", Path(teacher_ckpt), "fp32")]
            + [(f"student_{p}", "student", Path(student_ckpt), p) for p in precisions.names()])


def export_artefact(ckpt: Path, onnx_path: Path, precision: str, data_arg: str, log_file) -> dict:
    """:func:`cpsl.deploy.export_artifact` (its progress goes to the log); returns its manifest as a dict."""
    from cpsl.deploy import ExportSettings, export_artifact

    def log(msg):
        log_file.write(f"{msg}\n")
    log(f"export {ckpt} -> {onnx_path} ({precision}, data {data_arg})")
    m = export_artifact(ckpt, onnx_path, ExportSettings(precision=precision, data=data_arg), log=log, warn=log)
    return m.to_dict()


def export_all(plan, arts: Path, data_arg: str, log_file, log) -> tuple[dict, dict]:
    """Export every artefact of ``plan``; a failure is recorded and the others go on."""
    manifests, errors = {}, {}
    for key, _kind, ckpt, prec in plan:
        try:
            manifests[key] = export_artefact(ckpt, arts / f"{key}.onnx", prec, data_arg, log_file)
        except Exception as e:  # noqa: BLE001 - recorded; the rows of that artefact are skipped
            errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(traceback.format_exc())
    return manifests, errors


def onnx_graph_params(path: Path) -> int:
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    return int(sum(numpy_helper.to_array(t).size for t in m.graph.initializer))


def size_breakdown(path: Path, k: int = 8) -> dict:
    """Where the bytes of an ONNX file are: initializers, Constant nodes, the rest (graph structure,
    names); and the largest tensors of either kind."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    rows = []
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        rows.append({"name": t.name, "kind": "initializer", "dtype": str(a.dtype), "shape": list(a.shape),
                     "bytes": int(a.nbytes)})
    for n in m.graph.node:
        if n.op_type == "Constant":
            for at in n.attribute:
                if at.name == "value":
                    a = numpy_helper.to_array(at.t)
                    rows.append({"name": n.output[0], "kind": "Constant", "dtype": str(a.dtype),
                                 "shape": list(a.shape), "bytes": int(a.nbytes)})
    file_bytes = path.stat().st_size
    init = sum(r["bytes"] for r in rows if r["kind"] == "initializer")
    const = sum(r["bytes"] for r in rows if r["kind"] == "Constant")
    by_dtype: dict[str, int] = {}
    for r in rows:
        by_dtype[r["dtype"]] = by_dtype.get(r["dtype"], 0) + r["bytes"]
    rows.sort(key=lambda r: -r["bytes"])
    return {"file_bytes": file_bytes, "initializer_bytes": init, "constant_bytes": const,
            "other_bytes": file_bytes - init - const, "nodes": len(m.graph.node), "tensor_bytes_by_dtype": by_dtype,
            "largest": [dict(r, share=r["bytes"] / file_bytes) for r in rows[:k]]}
