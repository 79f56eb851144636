"""The export library API: :func:`export_artifact` turns a checkpoint into a deployable ONNX
artefact (any precision of the registry) and returns its :class:`Manifest`.

Writes beside ``OUT.onnx``: ``OUT.manifest.json`` (inputs/outputs, preprocessing, parity, VALID
metrics under ONNX Runtime, sizes, sha256), ``OUT.golden.npz`` (real batches with expected
outputs), ``OUT.build_engine.sh`` (the trtexec command for the target) and, with ``trt`` where
TensorRT is installed, ``OUT.plan``. ``cpsl export`` and ``bench/`` both call it.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CPSLError
from ..fileutil import check_output_file, sha256_file
from . import precisions

MANIFEST_FORMAT = "cpsl-onnx-manifest-1"


def _opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ExportSettings:
    """Every knob of an export (``cpsl export`` derives its options, defaults and help from these)."""

    precision: str = _opt("fp32", "Artefact precision (the precision registry).", registry=True)
    e2e: bool | None = _opt(None, "End to end: token ids in, the text encoder inside the graph, OUT.tokenizer.json "
                                  "beside it (default: on where the checkpoint has a text encoder).")
    data: str | None = _opt(None, "Data for parity, golden batches and VALID metrics "
                                  "(default: the data the checkpoint was trained on).")
    calib_data: str | None = _opt(None, "Calibrating precisions: data whose training split calibrates "
                                        "activations (default: --data).")
    calib_batches: int = _opt(16, "Calibrating precisions: calibration batches.")
    calib_batch_size: int = _opt(32, "Calibrating precisions: calibration batch size.")
    calib_method: str = _opt("percentile", "int8: activation range calibration.",
                             choices=("minmax", "percentile", "entropy"))
    quantize_attention: bool = _opt(False, "int8: also quantize the activation×activation MatMuls (QKᵀ, AV); off "
                                           "by default: at MSA sequence lengths their Q/DQ pairs cost more than "
                                           "they save (bench/results).")
    int8_per_channel: bool | None = _opt(None, "int8: per-output-channel weight scales (default: on; else per "
                                               "tensor).")
    int8_min_weight: int | None = _opt(None, "int8: ops whose weight has fewer elements stay float (default: 0, "
                                             "end-to-end graphs 65536: the text encoder's Linear layers).")
    trt: bool = _opt(False, "Build a TensorRT engine (.plan) here when `import tensorrt` works.")
    opset: int = _opt(17, "ONNX opset (13-20); a precision may force its own.")
    max_batch: int = _opt(64, "Engine profile: largest batch.")
    opt_batch: int = _opt(1, "Engine profile: batch to tune for.")
    opt_len: str = _opt("p95", "Engine profile: length to tune for (p95, max or N).")
    max_len: int | None = _opt(None, "Engine profile: longest sequence (default: the data's longest).")
    workspace: int = _opt(1024, "TensorRT workspace (MiB).")
    trust_pickle: bool = _opt(False, "UNSAFE: read .pkl data with plain pickle, which runs any code it carries "
                                     "(only for files you made).")

    def check(self, onnx_path: Path) -> None:
        if onnx_path.suffix != ".onnx":
            raise CPSLError(f"the artefact name must end in .onnx, got {onnx_path.name}")
        if self.calib_batches < 1 or self.calib_batch_size < 1:
            raise CPSLError("--calib-batches and --calib-batch-size must be >= 1")
        if self.max_batch < 1:
            raise CPSLError("--max-batch must be >= 1")
        precisions.get(self.precision)


@dataclass
class Manifest:
    """The manifest of an exported artefact (``OUT.manifest.json``: every field but the paths)."""

    model: str
    precision: str
    opset: int
    modalities: list
    dims: dict
    inputs: list
    output: dict
    mask: str
    preprocessing: dict
    parity: dict
    metrics: dict
    checkpoint: dict
    quantization: dict | None
    engine_profile: dict
    engine: dict
    golden: dict
    versions: dict
    graph: str = "features"          # "features" or "tokens" (end to end, cpsl/deploy/e2e.py)
    tokenizer: dict | None = None    # tokens graphs: the tokenizer file and its settings
    files: dict = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    onnx_path: Path = field(default=Path(), metadata={"json": False})
    manifest_path: Path = field(default=Path(), metadata={"json": False})

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("json", True)}
        return {"format": d.pop("format"), **d}

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        d = json.loads(Path(path).read_text())
        if d.get("format") != MANIFEST_FORMAT:
            raise CPSLError(f"{path} is not a {MANIFEST_FORMAT} manifest")
        p = Path(path)
        return cls(**d, onnx_path=p.parent / d["model"], manifest_path=p)


@dataclass
class _Paths:
    onnx: Path
    manifest: Path
    golden: Path
    script: Path
    plan: Path
    tokenizer: Path

    @classmethod
    def beside(cls, onnx_path: Path) -> "_Paths":
        d, stem = onnx_path.parent, onnx_path.stem
        return cls(onnx_path, d / f"{stem}.manifest.json", d / f"{stem}.golden.npz", d / f"{stem}.build_engine.sh",
                   d / f"{stem}.plan", d / f"{stem}.tokenizer.json")


def export_artifact(ckpt: str | Path, onnx_path: str | Path, settings: ExportSettings | None = None,
                    log=None, warn=None) -> Manifest:
    """Export ``ckpt`` to ``onnx_path`` at ``settings.precision``; check parity; write the golden
    batches, the TensorRT build script (and engine), the manifest; return the manifest.

    ``log`` receives progress lines, ``warn`` lines that must be shown even when quiet."""
    s = settings or ExportSettings()
    say = log or (lambda *a: None)
    paths = _Paths.beside(Path(onnx_path))
    s.check(paths.onnx)
    from .stages import tensorrt_path
    for p in (paths.onnx, paths.manifest, paths.golden, paths.script, paths.plan, paths.tokenizer,
              tensorrt_path(paths.onnx)):
        check_output_file(p)                       # a FIFO would block the export, a device cannot hold it
    prec = precisions.get(s.precision)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise CPSLError(f"export needs onnx and onnxruntime ({e.name} missing): pip install 'cpsl[export]'") from None
    from ..checkpoint import load_model
    from .stages import export_graphs, load_inputs, reference_outputs
    model, cfg, ck = load_model(ckpt, "cpu")
    model.eval()
    inp = load_inputs(model, cfg, ck, ckpt, s, prec)
    paths.onnx.parent.mkdir(parents=True, exist_ok=True)
    ref = reference_outputs(model, inp.data, inp.graph)
    with tempfile.TemporaryDirectory() as td:
        say(f"exporting {ckpt} ({', '.join(model.modalities)}; {model.num_parameters():,} parameters) "
            f"to ONNX opset {prec.opset or s.opset}")
        graphs = export_graphs(model, ref, prec, s, paths.onnx, Path(td), inp, say)
    tok = None
    if inp.graph.kind == "tokens":
        from .e2e import tokenizer_entry
        tok = tokenizer_entry(model, cfg, inp.data, paths.tokenizer)
    return _finish(model, ck, ckpt, s, prec, inp, ref, graphs, paths, say, warn or say, tok)


def _finish(model, ck, ckpt, s, prec, inp, ref, graphs, paths, say, warn, tok) -> Manifest:
    from . import onnx as ox
    from .stages import check_artefact, engine_stage, manifest_fields
    art = check_artefact(paths.onnx, graphs, ref, inp.graph, inp.data["valid"])
    tol = {"atol": prec.tolerance(art["dev_max"]), "rtol": 0.0}
    ox.save_golden(paths.golden, ref["golden_feeds"], art["golden"], ref["torch_golden"],
                   {"model": paths.onnx.name, "precision": prec.name, "inputs": inp.graph.input_names(),
                    "output": ox.OUTPUT_NAME, "tolerance": tol,
                    "expected": "this artefact's output under ONNX Runtime (CPU)",
                    "reference": "the PyTorch fp32 checkpoint"})
    engine = engine_stage(paths, inp.profile, prec.name, s, say, warn)
    m = Manifest(**manifest_fields(model, ck, ckpt, prec, inp, ref, graphs, art, tol, engine, paths),
                 tokenizer=tok, onnx_path=paths.onnx, manifest_path=paths.manifest)
    from .stages import tensorrt_path
    m.files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
               for p in (paths.onnx, paths.golden, paths.script, paths.plan, paths.tokenizer,
                         tensorrt_path(paths.onnx))
               if p.is_file() and (p != paths.tokenizer or tok)}
    paths.manifest.write_text(json.dumps(m.to_dict(), indent=2))
    from .card import write_card
    write_card(m.to_dict(), paths.onnx)                            # README.md / <stem>.README.md: the model card
    return m

