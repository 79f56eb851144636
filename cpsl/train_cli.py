"""``cpsl train``, ``cpsl eval`` and ``cpsl ablate``."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import click

from .errors import CPSLError


def _common_config(preset, config, sets, seeds=None, epochs=None, modulation=None, no_sl=False,
                   cp_backend=None, device=None):
    from .config import apply_overrides, build_config
    cfg = build_config(preset, config, sets)
    if seeds:
        try:
            cfg.train.seeds = [int(s) for s in str(seeds).split(",") if s.strip()]
        except ValueError:
            raise CPSLError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    if epochs is not None:
        cfg.train.epochs = int(epochs)
    if modulation:
        cfg.cp.modulation = modulation
    if no_sl:
        cfg.loss.sl = 0.0
    if cp_backend:
        cfg.cp.backend = cp_backend
    if device:
        cfg.train.device = device
    apply_overrides(cfg, ())
    return cfg


def _device_check(device: str) -> None:
    import torch
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CPSLError(f"device {device!r} requested but torch sees no CUDA GPU")


@click.command()
@click.option("--data", "data_path", default="synth", show_default=True,
              help="MMSA .pkl file, or 'synth' for the embedded synthetic data.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--preset", default="teacher", show_default=True, type=click.Choice(["teacher", "student"]))
@click.option("--config", type=click.Path(), help="YAML/JSON config file (sections data, model, loss, cp, train).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config value.")
@click.option("--seeds", help="Comma-separated seeds, e.g. 1,2,3 (mean ± std is reported).")
@click.option("--epochs", type=int, help="Maximum epochs (early stopping on valid loss still applies).")
@click.option("--modulation", type=click.Choice(["cp", "ogm_ge", "none"]), help="Gradient modulation (default cp).")
@click.option("--no-sl", is_flag=True, help="Switch the Statistical Loss off.")
@click.option("--cp-backend", type=click.Choice(["auto", "native", "foreach", "reference"]),
              help="CP backend (default auto: native when built, else foreach).")
@click.option("--device", help="cpu (default) or cuda.")
@click.option("--resume", is_flag=True, help="Continue a stopped run in --out from its last.pt.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out (default: refuse).")
@click.option("--trust-pickle", is_flag=True,
              help="UNSAFE: read the .pkl with plain pickle, which runs any code it carries (only for files you made).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(data_path, out, preset, config, sets, seeds, epochs, modulation, no_sl, cp_backend, device, resume,
          overwrite, trust_pickle, quiet):
    """Train CPSL; writes OUT/results.json and OUT/seed*/best.pt."""
    from .data import load_data
    from .train import run
    cfg = _common_config(preset, config, sets, seeds, epochs, modulation, no_sl, cp_backend, device)
    _device_check(cfg.train.device)
    if quiet:
        cfg.train.progress = False
    from .runs import check_out
    check_out(out, resume=resume, overwrite=overwrite)     # refuse before the data is read
    data = load_data(data_path, cfg.data.synth_seed, cfg.data.synth, trust_pickle=trust_pickle)
    cfg.data.path = data_path
    from .cp.penalty import resolve_backend
    if cfg.cp.modulation == "cp":
        be, why = resolve_backend(cfg.cp.backend, cfg.train.device)
        click.echo(f"modulation: cp (backend {be}, mode {cfg.cp.mode})")
    else:
        click.echo(f"modulation: {cfg.cp.modulation}")
    click.echo(f"data: {data_path} ({', '.join(data.modalities)}; "
               f"{'/'.join(str(len(s)) for s in data.splits.values())} train/valid/test)")
    res = run(cfg, data, out, resume=resume, log=click.echo, overwrite=overwrite)
    from .metrics import format_table
    rows = {s: res[s] for s in ("valid", "test") if s in res}
    click.echo(format_table(rows, keys=("MAE", "Corr", "Non0_acc_2", "Has0_acc_2", "Mult_acc_7")))
    click.echo(f"wrote {Path(out) / 'results.json'}")


@click.command("eval")
@click.option("--ckpt", required=True, type=click.Path(), help="A best.pt written by cpsl train.")
@click.option("--data", "data_path", default="synth", show_default=True)
@click.option("--split", default="test", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Write predictions (id,label,pred,pred_<m>...) here.")
@click.option("--mask-modality", help="Remove this modality at inference (balance diagnostic).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--trust-pickle", is_flag=True,
              help="UNSAFE: read the .pkl with plain pickle, which runs any code it carries (only for files you made).")
def eval_cmd(ckpt, data_path, split, out, mask_modality, device, as_json, trust_pickle):
    """Evaluate a checkpoint on a split with MMSA's metrics."""
    from .data import load_data
    from .metrics import format_table
    from .train import check_compatible, evaluate, load_model
    _device_check(device)
    if split not in ("train", "valid", "test"):
        raise CPSLError(f"unknown split {split!r} (choose train, valid or test)")
    model, cfg, _ = load_model(ckpt, device)
    data = load_data(data_path, cfg.data.synth_seed, cfg.data.synth, trust_pickle=trust_pickle)
    check_compatible(model, data, ckpt)
    if mask_modality and mask_modality not in model.modalities:
        raise CPSLError(f"--mask-modality {mask_modality!r} is not one of the model's modalities {list(model.modalities)}")
    s = data[split]
    if len(s) == 0:
        raise CPSLError(f"split {split!r} of {data_path} is empty")
    ev = evaluate(model, s, cfg, device, mask_modality)
    rows = {"fused": ev["metrics"]}
    rows.update({f"{m} head": v for m, v in ev["aux"].items()})
    result = {"ckpt": str(ckpt), "data": data_path, "split": split, "mask_modality": mask_modality,
              "metrics": ev["metrics"], "aux": ev["aux"]}
    if mask_modality:
        full = evaluate(model, s, cfg, device)
        result["unmasked"] = full["metrics"]
        result["drop"] = {k: full["metrics"][k] - ev["metrics"][k] for k in ev["metrics"]}
        rows = {"all modalities": full["metrics"], f"without {mask_modality}": ev["metrics"]}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["id", "label", "pred"] + [f"pred_{m}" for m in model.modalities])
            for i in range(len(s)):
                wr.writerow([s.ids[i], repr(float(s.labels[i])), repr(float(ev["pred"][i]))]
                            + [repr(float(ev["aux_pred"][m][i])) for m in model.modalities])
        Path(str(out) + ".json").write_text(json.dumps(result, indent=2))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{ckpt} on {data_path}:{split} (n={len(s)})" + (f", {mask_modality} removed" if mask_modality else ""))
    click.echo(format_table(rows))
    if out:
        click.echo(f"wrote {out}")


@click.command()
@click.option("--data", "data_path", default="synth", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seeds", default="1,2,3", show_default=True)
@click.option("--epochs", type=int)
@click.option("--preset", default="teacher", show_default=True, type=click.Choice(["teacher", "student"]))
@click.option("--config", type=click.Path())
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--variants", help="Comma-separated subset of: full,-CP,-SL,-CP-SL,-AME,-GCF,OGM-GE (default all).")
@click.option("--cp-backend", type=click.Choice(["auto", "native", "foreach", "reference"]))
@click.option("--quiet", is_flag=True)
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out (default: refuse).")
@click.option("--trust-pickle", is_flag=True,
              help="UNSAFE: read the .pkl with plain pickle, which runs any code it carries (only for files you made).")
def ablate(data_path, out, seeds, epochs, preset, config, sets, variants, cp_backend, quiet, overwrite, trust_pickle):
    """Run the ablation variants and write OUT/ablation.md, ablation.json and a trajectory figure."""
    from .ablate import VARIANTS, run_ablation
    from .data import load_data
    cfg = _common_config(preset, config, sets, seeds, epochs, cp_backend=cp_backend)
    if quiet:
        cfg.train.progress = False
    names = [v.strip() for v in variants.split(",")] if variants else list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise CPSLError(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    data = load_data(data_path, cfg.data.synth_seed, cfg.data.synth, trust_pickle=trust_pickle)
    cfg.data.path = data_path
    run_ablation(cfg, data, out, names, log=click.echo, overwrite=overwrite)
    click.echo((Path(out) / "ablation.md").read_text())
    click.echo(f"wrote {Path(out) / 'ablation.md'} and ablation.json")


COMMANDS = [train, eval_cmd, ablate]
