"""``cpsl export``: a thin wrapper over :func:`cpsl.deploy.export_artifact` (options, defaults and
help derive from :class:`cpsl.deploy.ExportSettings`; precision choices from the registry)."""
from __future__ import annotations

import click

from ..deploy import ExportSettings, Manifest, export_artifact
from ..deploy import precisions
from .options import deprecated_alias, pick, setting_option, settings_from

S = ExportSettings


@click.command()
@click.option("--ckpt", required=True, type=click.Path(), help="A best.pt from cpsl train / cpsl distill.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder: model.onnx, its manifest, golden batches, engine script and README.md card.")
@deprecated_alias("--onnx", "--out DIR", "onnx_path", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace an artefact already in --out (default: refuse).")
@setting_option(S, "precision", registry=precisions.names)
@setting_option(S, "e2e", "--e2e/--no-e2e")
@setting_option(S, "data")
@setting_option(S, "calib_data")
@setting_option(S, "calib_batches")
@setting_option(S, "calib_batch_size")
@setting_option(S, "calib_method")
@setting_option(S, "quantize_attention", "--quantize-attention/--no-quantize-attention")
@setting_option(S, "int8_per_channel", "--int8-per-channel/--int8-per-tensor")
@setting_option(S, "int8_min_weight", type=int)
@setting_option(S, "trt")
@setting_option(S, "opset")
@setting_option(S, "max_batch")
@setting_option(S, "opt_batch")
@setting_option(S, "opt_len")
@setting_option(S, "max_len", type=int)
@setting_option(S, "workspace")
@setting_option(S, "trust_pickle")
@click.option("--quiet", is_flag=True, help="Only the summary.")
def export(ckpt, out, onnx_path, overwrite, quiet, **settings):
    """Export a checkpoint to ONNX (any registered precision) with manifest, golden batches and engine script.

    \b
    Writes into OUT/:
      model.onnx            the graph (token-id input when the checkpoint has a text encoder)
      model.manifest.json   inputs/outputs, preprocessing, parity, VALID metrics (ONNX Runtime), sizes, sha256
      model.golden.npz      real batches (batch 1, 7 and the longest items) with expected outputs
      model.build_engine.sh the trtexec command for the target (JetPack 6.x / TensorRT 10.3)
      model.tokenizer.json  token-id graphs: the tokenizer cpsl predict / cpsl-runner predict use
      README.md             the model card (data, metrics with split, intended use, limits)
      model.plan            with --trt where TensorRT is installed
    Check: cpsl-runner OUT/model.onnx --check OUT/model.golden.npz
    Predict: cpsl predict --model OUT/model.onnx --text "..."
    """
    from pathlib import Path

    from ..errors import CPSLError
    if pick(out, onnx_path, "--out", "--onnx") is None:
        raise click.UsageError("Missing option '--out'")
    target = Path(out) / "model.onnx" if out is not None else Path(onnx_path)
    if out is not None and target.exists() and not overwrite:
        raise CPSLError(f"{target} exists: pass --overwrite to replace it (or choose another --out)")
    m = export_artifact(ckpt, target, settings_from(ExportSettings, settings),
                        log=None if quiet else click.echo, warn=click.echo)
    _summary(m)


def _summary(m: Manifest) -> None:
    par, met = m.parity, m.metrics
    art, ref = met["valid_onnxruntime"], met["valid_pytorch_fp32"]
    click.echo(f"wrote {m.onnx_path} ({m.precision}, opset {m.opset}, {m.files[m.model]['bytes'] / 1024:.1f} KiB)")
    click.echo(f"  parity: fp32 ONNX Runtime vs PyTorch max abs {par['fp32_onnxruntime_vs_pytorch']['max_abs']:.2e}; "
               f"this artefact vs PyTorch fp32 max abs {par['artefact_vs_pytorch_fp32']['max_abs']:.2e}")
    click.echo(f"  valid ({met['samples']}): MAE {art['MAE']:.4f} (fp32 {ref['MAE']:.4f}), Non0_acc_2 "
               f"{art['Non0_acc_2']:.4f} (fp32 {ref['Non0_acc_2']:.4f}), Corr {art['Corr']:.4f}")
    q = m.quantization
    if q:
        click.echo(f"  int8: {q['int8_weights']} int8 weights, {q['int8_activations']} int8 activations, "
                   f"quantized ops {q['quantized_ops']}")
    click.echo(f"  {m.manifest_path.name}, {m.golden['file']}, {m.engine['script']}"
               + (f", {m.onnx_path.stem}.plan" if m.engine.get("built") else ""))
    click.echo(f"  check: cpsl-runner {m.onnx_path} --check {m.onnx_path.parent / m.golden['file']}")
    if m.graph == "tokens":
        click.echo(f"  predict: cpsl predict --model {m.onnx_path} --text \"...\"")


COMMANDS = [export]
