"""``cpsl train``, ``cpsl eval`` and ``cpsl ablate``."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import click

from ..config import Config
from ..errors import CPSLError
from .options import (RegistryChoice, config_flag, config_option, declared_options, declared_values, device_check,
                      overwrite_option, run_config, run_options, trust_pickle_option)


def _strategy_names():
    from .. import strategies
    return strategies.names()


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@run_options()
@config_option("train.modulation", "--modulation", type=RegistryChoice(_strategy_names))
@click.option("--no-sl", is_flag=True, help="Switch the Statistical Loss off (config loss.sl=0).")
@declared_options
@config_option("train.amp", "--amp")
@config_flag("train.tensorboard", "--tensorboard")
@click.option("--resume", is_flag=True, help="Continue a stopped run in --out from its last.pt.")
@overwrite_option
@trust_pickle_option
def train(data_path, out, preset, config, sets, seeds, epochs, device, threads, quiet, modulation, no_sl, amp,
          tensorboard, resume, overwrite, trust_pickle, **declared):
    """Train CPSL; writes OUT/results.json and OUT/seed*/best.pt.

    \b
    Several processes (docs/distributed.md): torchrun --nproc_per_node N -m cpsl train ...
    (gloo on CPU, NCCL on CUDA; global batch = data.batch_size, split across the ranks)."""
    from ..data import load_data
    from ..runs import check_out
    from ..train import run
    echo = click.echo if os.environ.get("RANK", "0") == "0" else _quiet   # under torchrun: rank 0 speaks
    cfg = run_config(preset, config, sets, seeds, epochs, device, quiet, threads, **{
        "train.modulation": modulation, "loss.sl": 0.0 if no_sl else None, **declared_values(declared),
        "train.amp": amp, "train.tensorboard": True if tensorboard else None})
    from .. import strategies
    strategy = strategies.get(cfg.train.modulation)
    strategy.check(cfg)                                    # the strategy can run with this config
    check_out(out, resume=resume, overwrite=overwrite)     # refuse before the data is read
    data = load_data(data_path, cfg.data.synth_seed, cfg.data.synth, trust_pickle=trust_pickle)
    cfg.data.path = data_path
    echo(strategy.describe(cfg))
    echo(f"data: {data_path} ({', '.join(data.modalities)}; "
               f"{'/'.join(str(len(s)) for s in data.splits.values())} train/valid/test)")
    res = run(cfg, data, out, resume=resume, log=click.echo, overwrite=overwrite)
    from ..metrics import format_table
    rows = {s: res[s] for s in ("valid", "test") if s in res}
    echo(format_table(rows, keys=("MAE", "Corr", "Non0_acc_2", "Has0_acc_2", "Mult_acc_7")))
    echo(f"wrote {Path(out) / 'results.json'}")


def _quiet(*args, **kwargs) -> None:
    pass


@click.command("eval")
@click.option("--ckpt", required=True, type=click.Path(), help="A best.pt written by cpsl train.")
@click.option("--data", "data_path", default=None,
              help="MMSA .pkl file, or 'synth' (default: the data the checkpoint was trained on).")
@click.option("--split", default="test", show_default=True)
@click.option("--out", type=click.Path(), help="Output folder: predictions.csv (id,label,pred,pred_<m>...) and "
              "eval.json. (A path ending in .csv: that file, the old form, deprecated.)")
@overwrite_option
@click.option("--mask-modality", help="Remove this modality at inference (balance diagnostic).")
@click.option("--device", default=Config().train.device, show_default=True, help="cpu or cuda.")
@click.option("--contributions", is_flag=True,
              help="Each modality's exact Shapley contribution to the fused error (all 2^M modality masks).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@trust_pickle_option
def eval_cmd(ckpt, data_path, split, out, overwrite, mask_modality, device, contributions, as_json, trust_pickle):
    """Evaluate a checkpoint on a split with MMSA's metrics."""
    from ..data import load_data
    from ..metrics import format_table
    from ..checkpoint import check_compatible, load_model
    from ..evaluation import evaluate
    device_check(device)
    if split not in ("train", "valid", "test"):
        raise CPSLError(f"unknown split {split!r} (choose train, valid or test)")
    csv_out, json_out = _eval_outputs(out, overwrite)
    model, cfg, _ = load_model(ckpt, device)
    data_path = data_path or cfg.data.path
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
    if ev["undefined"]:                        # NaN in the metrics, and here why
        result["undefined"] = ev["undefined"]
        click.echo("warning: " + "; ".join(f"{k} is undefined: {v}" for k, v in ev["undefined"].items()), err=True)
    if mask_modality:
        full = evaluate(model, s, cfg, device)
        result["unmasked"] = full["metrics"]
        result["drop"] = {k: full["metrics"][k] - ev["metrics"][k] for k in ev["metrics"]}
        rows = {"all modalities": full["metrics"], f"without {mask_modality}": ev["metrics"]}
    if contributions:
        from ..train import contributions as shapley
        result["contributions"] = shapley(model, s, cfg, device)
    if csv_out:
        from ..fileutil import check_output_file
        check_output_file(csv_out)
        check_output_file(json_out)
        csv_out.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_out, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["id", "label", "pred"] + [f"pred_{m}" for m in model.modalities])
            for i in range(len(s)):
                wr.writerow([s.ids[i], repr(float(s.labels[i])), repr(float(ev["pred"][i]))]
                            + [repr(float(ev["aux_pred"][m][i])) for m in model.modalities])
        json_out.write_text(json.dumps(result, indent=2))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{ckpt} on {data_path}:{split} (n={len(s)})" + (f", {mask_modality} removed" if mask_modality else ""))
    click.echo(format_table(rows))
    if contributions:
        c = result["contributions"]
        click.echo(f"Shapley contributions to the fused {c['metric']} (error reduction; {c['metric']} with every "
                   f"modality masked {c['error_none']:.4f}, with none masked {c['error_all']:.4f}):")
        for m, v in c["shapley"].items():
            click.echo(f"  {m:8s} {v:+.4f}")
    if csv_out:
        click.echo(f"wrote {csv_out} and {json_out}")


def _eval_outputs(out, overwrite: bool) -> tuple[Path | None, Path | None]:
    """``(predictions csv, result json)``: ``--out DIR`` -> DIR/predictions.csv, DIR/eval.json (refused when
    present unless --overwrite); ``--out FILE.csv`` -> FILE.csv, FILE.csv.json (the old form, with a note)."""
    if not out:
        return None, None
    if str(out).endswith(".csv"):
        click.echo("note: --out FILE.csv is deprecated, use --out DIR (DIR/predictions.csv, DIR/eval.json)", err=True)
        return Path(out), Path(f"{out}.json")
    if Path(out).exists() and not Path(out).is_dir():
        from ..fileutil import check_output_file
        check_output_file(out)                 # a pipe or device: one line naming it
        raise CPSLError(f"--out {out} is a file; give a folder (DIR/predictions.csv, DIR/eval.json)")
    p = Path(out) / "predictions.csv"
    if p.exists() and not overwrite:
        raise CPSLError(f"{p} exists: pass --overwrite to replace it (or choose another --out)")
    return p, p.with_name("eval.json")


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Ablation folder.")
@run_options(seeds="1,2,3")
@click.option("--variants", help="Comma-separated variants: the method's parts (full,-CP,-SL,-CP-SL,-AME,-GCF,OGM-GE; "
              "the default) and/or registered strategies (e.g. none,cp,ogm_ge,cggm,ags,mmpareto,inforeg,moddrop).")
@click.option("--define", "defines", multiple=True, nargs=2, metavar="NAME 'SECTION.KEY=VALUE ...'",
              help="An extra variant: a name and space-separated overrides, e.g. --define ema 'train.ema=0.99'; "
                   "repeatable; list it in --variants (default: appended).")
@click.option("--reference", help="The variant the paired differences are taken to (default: none, else -CP).")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Variant × seed runs in parallel processes (each with train.num_threads threads, 1 when unset).")
@click.option("--cost-steps", default=20, show_default=True, type=click.IntRange(0, 10_000),
              help="Interleaved training steps per variant timed in one process after the runs (0: skip).")
@click.option("--cost-only", is_flag=True,
              help="Only time the variants' training steps; merged into OUT/ablation.json/md when present.")
@declared_options
@overwrite_option
@trust_pickle_option
def ablate(data_path, out, preset, config, sets, seeds, epochs, device, threads, quiet, variants, defines, reference,
           jobs, cost_steps, cost_only, overwrite, trust_pickle, **declared):
    """Run variants on the same seeds; write OUT/ablation.md, ablation.json and a trajectory figure."""
    from ..ablate import DEFAULT, add_step_costs, run_ablation, variant_config
    from ..ablate import variants as known
    from ..data import load_data
    cfg = run_config(preset, config, sets, seeds, epochs, device, quiet, threads, **declared_values(declared))
    from ..config import parse_overrides
    defined = {}
    for name, sets_ in defines:
        if not name.strip() or "/" in name or name in known():
            raise CPSLError(f"--define: {name!r} is empty, has a '/' or is already a variant")
        defined[name] = parse_overrides(sets_.split())
        variant_config(cfg, name, defined)                 # validates the overrides now, naming the key
    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else list(DEFAULT)
    names += [n for n in defined if n not in names]
    unknown = [v for v in names if v not in known(defined)]
    if unknown:
        raise CPSLError(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(known(defined))})")
    if reference and reference not in names:
        raise CPSLError(f"--reference {reference!r} is not one of the variants run ({', '.join(names)})")
    if jobs > 1:
        cfg.train.progress = False
    data = load_data(data_path, cfg.data.synth_seed, cfg.data.synth, trust_pickle=trust_pickle)
    cfg.data.path = data_path
    if cost_only:
        costs = add_step_costs(cfg, data, out, names, max(cost_steps, 1), defined=defined)
        for n, c in costs.items():
            click.echo(f"{n:10s} {c['ms_median']:8.1f} ms/step (median of {c['steps']}, interleaved)")
        click.echo(f"wrote {Path(out) / 'step_cost.json'}")
        return
    summary = run_ablation(cfg, data, out, names, jobs=jobs, log=click.echo, overwrite=overwrite,
                           cost_steps=cost_steps, defined=defined, reference=reference)
    click.echo((Path(out) / "ablation.md").read_text())
    click.echo(f"wrote {Path(out) / 'ablation.md'} and ablation.json ({summary['wall_s']:.0f} s wall, {jobs} job(s))")


@click.command()
@click.argument("runs", nargs=-1, required=True, metavar="NAME=DIR[,DIR...] NAME=DIR ...")
@click.option("--split", default="auto", show_default=True, type=click.Choice(["auto", "valid", "test"]),
              help="auto: test when every paired seed has test metrics, else valid.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the table here (.md) and NAME.json beside it.")
def compare(runs, split, out):
    """Paired comparison of finished cpsl train folders over their common seeds (the first run is the
    reference): mean ± std, the paired difference with its 95 % t-interval, unimodal heads, and the
    config keys each run changes. Several folders of one setting are merged by seed (DIR,DIR)."""
    from ..compare import compare as run_compare
    from ..compare import markdown
    res = run_compare(list(runs), split)
    md = markdown(res)
    click.echo(md, nl=False)
    if out:
        from ..fileutil import check_output_file
        p = Path(out)
        check_output_file(p)
        check_output_file(p.with_suffix(".json"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(md)
        p.with_suffix(".json").write_text(json.dumps(res, indent=2))
        click.echo(f"wrote {p} and {p.with_suffix('.json')}")


COMMANDS = [train, eval_cmd, ablate, compare]
