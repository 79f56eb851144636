"""The ``cpsl`` command line. Every command fails on bad input with one line and exit code 2."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .errors import CPSLError


class _Group(click.Group):
    """Turns CPSLError (and a few obvious user errors) into one line + exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CPSLError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            click.echo(f"error: {e.strerror or e}: {e.filename}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cpsl")
def main():
    """cpsl: balanced multimodal sentiment analysis (CP + SL), from training to the edge.

    \b
    Main job:   cpsl train --data synth --out runs/synth
    Evaluate:   cpsl eval --ckpt runs/synth/seed1/best.pt --data synth --split test
    Data:       cpsl data synth --out s.pkl ; cpsl data info s.pkl
    """


# ---------------------------------------------------------------------------- info
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json):
    """Versions, the native extension's build and the CP backends available here."""
    import platform

    import numpy
    import torch

    from . import __version__
    from .native_info import extension_info

    ext = extension_info()
    d = {
        "cpsl": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_cuda_available": torch.cuda.is_available(),
        "extension": ext,
    }
    try:
        from .cp import available_backends
        d["cp_backends"] = available_backends()
    except Exception as e:  # noqa: BLE001 - info must always print
        d["cp_backends"] = f"unavailable: {e}"
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    for k, v in d.items():
        if isinstance(v, dict):
            click.echo(f"{k}:")
            for kk, vv in v.items():
                click.echo(f"  {kk}: {vv}")
        else:
            click.echo(f"{k}: {v}")


# ---------------------------------------------------------------------------- data
@main.group()
def data():
    """Make, inspect and build datasets in the MMSA pickle format."""


@data.command("synth")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .pkl path.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--imbalance", type=float, help="Weight of the text cue in the label (default 1.6).")
@click.option("--text-memo", type=float, help="Norm of the per-segment identity code in text (default 3.0).")
@click.option("--av-noise", type=float, help="Per-frame noise of audio/visual (default 1.0).")
@click.option("--sizes", help="train,valid,test sizes (default 1284,229,686).")
@click.option("--set", "knobs", multiple=True, metavar="KNOB=VALUE", help="Any SynthSpec knob, e.g. --set d_text=32.")
def data_synth(out, seed, imbalance, text_memo, av_noise, sizes, knobs):
    """Write the embedded synthetic dataset (dominant text, weak audio/visual) as an MMSA pickle."""
    from .data import synth_spec_from_args
    from .data.mmsa import save_mmsa
    from .data.synthetic import generate

    spec = synth_spec_from_args(seed=seed, imbalance=imbalance, text_memo=text_memo,
                                av_noise=av_noise, sizes=sizes, knobs=knobs)
    d = generate(spec)
    save_mmsa(d, out)
    n = {k: len(s) for k, s in d.splits.items()}
    click.echo(f"wrote {out}: train/valid/test = {n['train']}/{n['valid']}/{n['test']}, "
               f"modalities {', '.join(d.modalities)} (dims {d.dims})")
    Path(str(out) + ".json").write_text(json.dumps({"spec": spec.to_dict(), "sizes": n}, indent=2))


@data.command("info")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--trust-pickle", is_flag=True,
              help="UNSAFE: read the .pkl with plain pickle, which runs any code it carries (only for files you made).")
def data_info(path, as_json, trust_pickle):
    """Splits, shapes, lengths and label statistics of an MMSA pickle (or 'synth')."""
    from .data import describe, load_data

    d = load_data(path, trust_pickle=trust_pickle)
    desc = describe(d)
    if as_json:
        click.echo(json.dumps(desc, indent=2))
        return
    click.echo(f"{path}: modalities {', '.join(d.modalities)}; dims {d.dims}")
    for w in d.warnings():
        click.echo(f"warning: {w}")
    for name, s in desc["splits"].items():
        lab = s["labels"]
        click.echo(f"  {name:5s} n={s['n']:5d}  labels mean {lab['mean']:+.3f} std {lab['std']:.3f} "
                   f"range [{lab['min']:+.2f}, {lab['max']:+.2f}] zeros {lab['zeros']} positive {lab['positive']}")
        for m, ms in s["modalities"].items():
            ln = ms["lengths"]
            click.echo(f"        {m:6s} shape {tuple(ms['shape'])}  lengths min/mean/max "
                       f"{ln['min']}/{ln['mean']:.1f}/{ln['max']}")
        if s.get("text_bert"):
            click.echo(f"        text_bert shape {tuple(s['text_bert'])}")


def _register_optional():
    """Commands that live beside their subsystem (imported lazily so `cpsl --help` stays fast)."""
    from .commands import register
    register(main, data)


_register_optional()


def run():  # pragma: no cover - console entry for `python -m cpsl`
    main(prog_name="cpsl")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
