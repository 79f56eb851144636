"""``cpsl diagnose``: is any modality under-learned by joint training here (could balancing help)?"""
from __future__ import annotations

import json
from pathlib import Path

import click

from .options import overwrite_option, run_config, run_options, trust_pickle_option


@click.command()
@run_options()
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for diagnose.json and diagnose.png (default: print only).")
@overwrite_option
@trust_pickle_option
def diagnose(data_path, preset, config, sets, seeds, epochs, device, threads, quiet, out, overwrite, trust_pickle):
    """Before choosing a strategy: per modality, what it reaches alone vs its part of a plain joint
    model, its learning speed and Shapley contribution; one verdict per modality.

    \b
    Short unimodal runs (one per modality) and one joint run (--modulation none) with the given
    preset/config; scored on the valid split only. Use --epochs to shorten the runs.
    Example: cpsl diagnose --data ub.pkl --preset linear_late --out diag"""
    from ..data import load_data
    from ..diagnose import diagnose as run_diagnose
    from ..diagnose import plot
    from ..errors import CPSLError
    cfg = run_config(preset, config, sets, seeds, epochs, device, quiet, threads)
    seed = int(cfg.train.seeds[0])
    if out is not None:
        o = Path(out)
        if (o / "diagnose.json").exists() and not overwrite:
            raise CPSLError(f"{o / 'diagnose.json'} exists; pass --overwrite to replace it")
        from ..fileutil import check_output_file
        for f in ("diagnose.json", "diagnose.png"):
            check_output_file(o / f)
    data = load_data(data_path, cfg.data.synth_seed, cfg.data.synth, trust_pickle=trust_pickle)
    cfg.data.path = data_path
    click.echo(f"data: {data_path} ({', '.join(data.modalities)}); model {cfg.model.arch}, "
               f"{cfg.train.epochs} epochs, seed {seed}")
    from tqdm.auto import tqdm
    with tqdm(total=len(data.modalities) + 1, desc="diagnose", unit="run", disable=not cfg.train.progress,
              leave=False) as bar:
        rep = run_diagnose(cfg, data, seed=seed, log=lambda *_: None, progress=bar.update)
    rep["data"] = data_path
    click.echo(f"constant predictor: valid {rep['loss']} {rep['constant_valid_loss']:.4f}; joint part = {rep['joint_part']}")
    click.echo(f"{'modality':9s} {'alone':>8s} {'joint':>8s} {'recovered':>9s} {'t½ (ep)':>8s} {'speed':>6s} {'Shapley':>8s}")
    for m, v in rep["modalities"].items():
        rec = f"{100 * v['recovered']:.0f} %" if v["recovered"] is not None else "-"
        t = str(v["half_epoch"]) if v["half_epoch"] is not None else "-"
        sp = f"{v['speed_ratio']:.2f}" if v["speed_ratio"] is not None else "-"
        click.echo(f"{m:9s} {v['unimodal_valid_loss']:8.4f} {v['joint_part_valid_loss']:8.4f} {rec:>9s} {t:>8s} "
                   f"{sp:>6s} {v['shapley_MAE']:+8.4f}")
    for line in rep["verdicts"]:
        click.echo(line)
    if out is not None:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "diagnose.json").write_text(json.dumps(rep, indent=2))
        plot(rep, o / "diagnose.png")
        click.echo(f"wrote {o / 'diagnose.json'}, {o / 'diagnose.png'}")


COMMANDS = [diagnose]
