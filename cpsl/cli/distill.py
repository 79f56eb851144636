"""``cpsl distill``: a teacher checkpoint into a small student (cpsl.compress.distill)."""
from __future__ import annotations

from pathlib import Path

import click

from ..compress.settings import DistillSettings
from ..compress.text_distill import distill_text_encoder as _td
from ..config import Config
from .options import (deprecated_alias, device_check, overwrite_option, param_option, run_config, run_options,
                      setting_option, trust_pickle_option)


@click.command()
@click.option("--teacher", required=True, type=click.Path(), help="The teacher's best.pt (from cpsl train).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (cpsl train's layout).")
@run_options(preset="student")
@setting_option(DistillSettings, "lambda_kd")
@setting_option(DistillSettings, "lambda_hint")
@setting_option(DistillSettings, "max_ratio")
@click.option("--no-cache", is_flag=True, help="Run the teacher on every batch instead of caching its outputs.")
@overwrite_option
@trust_pickle_option
def distill(teacher, out, data_path, preset, config, sets, seeds, epochs, device, threads, quiet, lambda_kd,
            lambda_hint, max_ratio, no_cache, overwrite, trust_pickle):
    """Distil a teacher checkpoint into a small student; writes OUT/results.json (+ teacher, retention).

    With --data synth the teacher's synthetic seed and knobs are used unless --set data.synth_seed=... /
    data.synth=... say otherwise."""
    from ..checkpoint import read_checkpoint
    from ..compress.distill import distill as run_distill
    from ..data import load_data
    from ..train import run as train_loop

    cfg = run_config(preset, config, sets, seeds, epochs, device, quiet, threads)
    tck = read_checkpoint(teacher)
    tdata = tck.get("config", {}).get("data", {})
    if not any(s.strip().startswith("data.synth_seed") for s in sets):
        cfg.data.synth_seed = int(tdata.get("synth_seed", cfg.data.synth_seed))
    if not any(s.strip().startswith("data.synth=") for s in sets):
        cfg.data.synth = dict(tdata.get("synth", {}) or {})
    del tck
    from ..runs import check_out
    check_out(out, overwrite=overwrite)
    data = load_data(data_path, cfg.data.synth_seed, cfg.data.synth, trust_pickle=trust_pickle)
    cfg.data.path = data_path
    click.echo(f"data: {data_path} ({', '.join(data.modalities)}; "
               f"{'/'.join(str(len(s)) for s in data.splits.values())} train/valid/test)")
    res = run_distill(teacher, data, cfg, out, lambda_kd=lambda_kd, lambda_hint=lambda_hint,
                      max_ratio=max_ratio, cache=not no_cache, log=click.echo, overwrite=overwrite,
                      train_loop=train_loop)
    _summary(res, out)


def _summary(res: dict, out) -> None:
    from ..metrics import format_table
    rows = {}
    for s in ("valid", "test"):
        if s in res["teacher"]:
            rows[f"teacher {s}"] = res["teacher"][s]
        if s in res:
            rows[f"student {s}"] = res[s]
    click.echo(format_table(rows, keys=("MAE", "Corr", "Non0_acc_2", "Has0_acc_2", "Mult_acc_7")))
    pr = res["distill"]["params"]
    click.echo(f"student/teacher parameters: {pr['student']:,}/{pr['teacher']:,} = {pr['ratio']:.1%}")
    for s, r in res["retention"].items():
        click.echo(f"retention ({s}): Non0_acc_2 {r['Non0_acc_2']:.1%}, Corr {r['Corr']:.1%}, "
                   f"MAE {r['MAE_increase']:+.4f} ({r['MAE_increase_rel']:+.1%})")
    click.echo(f"wrote {Path(out) / 'results.json'}")


@click.command("distill-text")
@click.option("--teacher", required=True, type=click.Path(), help="A best.pt with a fine-tuned text encoder.")
@click.option("--data", "data_path", required=True, help="The MMSA .pkl with text_bert token ids.")
@click.option("--layers", required=True, type=int, help="Encoder layers the student keeps (the teacher's first N).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (best.pt, results.json).")
@param_option(_td, "epochs", "--epochs")
@param_option(_td, "lr", "--lr", help="Learning rate of the encoder layers.")
@param_option(_td, "lambda_kd", "--lambda-kd", help="Weight of MSE(student prediction, teacher prediction).")
@param_option(_td, "lambda_task", "--lambda-task", help="Weight of the task loss on the labels.")
@param_option(_td, "seed", "--seeds", help="The seed (one: this is one run).")
@deprecated_alias("--seed", "--seeds", "seed_old", type=int)
@click.option("--device", default=Config().train.device, show_default=True, help="cpu or cuda.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
@trust_pickle_option
def distill_text(teacher, data_path, layers, out, epochs, lr, lambda_kd, lambda_task, seed, seed_old, device, threads,
                 trust_pickle):
    """Distil a checkpoint's fine-tuned text encoder into its first N layers (the end-to-end student).

    Loss: MSE of the last-layer token states + MSE of the prediction against the teacher's + the task
    loss; writes OUT/best.pt (config: text_encoder <spec>@N) and OUT/results.json."""
    import torch

    from ..data import load_data
    if seed_old is not None:
        seed = seed_old
    device_check(device)
    torch.set_num_threads(max(1, threads))
    data = load_data(data_path, 0, None, trust_pickle=trust_pickle)
    res = _td(teacher, data, layers, out, epochs=epochs, lr=lr, lambda_kd=lambda_kd, lambda_task=lambda_task,
              seed=seed, log=click.echo, device=device)
    t, s = res["teacher"]["valid"], res["valid"]
    click.echo(f"{layers}-layer student (epoch {res['best_epoch']}): valid MAE {s['MAE']:.4f} (teacher {t['MAE']:.4f}), "
               f"Non0_acc_2 {s['Non0_acc_2']:.4f} (teacher {t['Non0_acc_2']:.4f}); wrote {Path(out) / 'best.pt'}")


COMMANDS = [distill, distill_text]
