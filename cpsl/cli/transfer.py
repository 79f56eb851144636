"""``cpsl pretrain-text``: fine-tune the text encoder on labelled sentiment text (e.g. MOSEI) and
save it as a Hugging Face folder for ``model.text_encoder=PATH`` (cpsl.transfer)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..transfer import TransferSettings
from ..config import Config
from .options import deprecated_alias, device_check, pick, setting_option, threads_option, trust_pickle_option


@click.command("pretrain-text")
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=True),
              help="MMSA .pkl with text_bert token ids (cpsl data build-mosei / build-mosi).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output Hugging Face folder (encoder, tokenizer, head, README.md card, transfer.json).")
@setting_option(TransferSettings, "text_encoder", "--text-encoder", metavar="PATH|minilm")
@setting_option(TransferSettings, "epochs")
@setting_option(TransferSettings, "lr")
@setting_option(TransferSettings, "head_lr")
@setting_option(TransferSettings, "weight_decay")
@setting_option(TransferSettings, "warmup")
@setting_option(TransferSettings, "batch_size")
@setting_option(TransferSettings, "bucket")
@setting_option(TransferSettings, "dropout")
@setting_option(TransferSettings, "loss")
@setting_option(TransferSettings, "clip")
@setting_option(TransferSettings, "seed", "--seeds", help="The seed (one: a transfer is one run).")
@deprecated_alias("--seed", "--seeds", "seed_old", type=int)
@click.option("--max-steps", default=0, show_default=True, type=int,
              help="Stop after this many optimisation steps in all (0: run every epoch); --resume continues.")
@click.option("--device", default=Config().train.device, show_default=True, help="cpu or cuda.")
@threads_option
@deprecated_alias("--num-threads", "--threads", "num_threads", type=int)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its train_state.pt.")
@click.option("--overwrite", is_flag=True, help="Replace a transfer already in --out (default: refuse).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@trust_pickle_option
def pretrain_text(data_path, out, max_steps, device, threads, num_threads, seed_old, resume, overwrite, quiet,
                  trust_pickle, **kw):
    """Fine-tune the text encoder + a regression head on a text split; keep the best valid epoch as an HF folder."""
    import torch

    from ..data.mmsa import load_mmsa
    from ..transfer import check_out, pretrain_text as run

    num_threads = pick(threads, num_threads, "--threads", "--num-threads") or 0
    if seed_old is not None:
        kw["seed"] = seed_old
    settings = TransferSettings(**kw)
    settings.check()
    device_check(device)
    check_out(Path(out), resume, overwrite, remove=False)              # refuse before loading anything
    if num_threads < 0:
        raise click.UsageError("--threads must be >= 0")
    if num_threads:
        torch.set_num_threads(num_threads)
    data = load_mmsa(data_path, trust_pickle=trust_pickle)
    click.echo(f"data: {data_path} ({', '.join(data.modalities)}; "
               f"{'/'.join(str(len(s)) for s in data.splits.values())} train/valid/test)")
    cmd = "cpsl " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv and "cpsl" in sys.argv[0] else ""
    res = run(data, out, settings, max_steps=max_steps, resume=resume, overwrite=overwrite, progress=not quiet,
              command=cmd or f"cpsl pretrain-text --data {data_path} --out {out}", log=click.echo, device=device)
    if not res["complete"]:
        click.echo(f"stopped after step {res['step']} of {res['total_steps']}: continue with --resume")
    b = res["best"]
    if b is not None:
        v = b["valid"]
        click.echo(f"best epoch {b['epoch']}: valid MAE {v['MAE']:.4f} Corr {v['Corr']:.4f} "
                   f"Non0_acc_2 {v['Non0_acc_2']:.4f}")
        click.echo(f"wrote {out} (Hugging Face folder; use --set model.text_encoder={out})")


COMMANDS = [pretrain_text]
