"""``cpsl data``: make, inspect and build datasets in the MMSA pickle format."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..data import FAMILIES
from ..data.synthetic import SynthSpec
from .data_build import build_bclstm, build_mosei, build_mosi, toy_text
from .options import trust_pickle_option

_SPEC = SynthSpec()


@click.group()
def data():
    """Make, inspect and build datasets in the MMSA pickle format."""


@data.command("synth")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .pkl path.")
@click.option("--family", type=click.Choice(list(FAMILIES)), default="default", show_default=True,
              help="Generator: default (MOSI-like: dominant text, weak audio/visual) or unimodal_bias (the "
                   "deep-linear benchmark where joint training provably under-learns a modality; knobs "
                   "n_train, n_valid, n_test, dims, variances, rho, weights, noise, variant, xor_gain: docs/unimodal_bias.md).")
@click.option("--seed", default=_SPEC.seed, show_default=True, type=int, help="Generator seed.")
@click.option("--imbalance", type=float, show_default=f"{_SPEC.imbalance}",
              help="Weight of the text cue in the label.")
@click.option("--text-memo", type=float, show_default=f"{_SPEC.text_memo}",
              help="Norm of the per-segment identity code in text.")
@click.option("--av-noise", type=float, show_default=f"{_SPEC.av_noise}",
              help="Per-frame noise of audio/visual.")
@click.option("--sizes", show_default=f"{_SPEC.n_train},{_SPEC.n_valid},{_SPEC.n_test}", help="train,valid,test sizes.")
@click.option("--set", "knobs", multiple=True, metavar="KNOB=VALUE",
              help="Any knob of the family, e.g. --set d_text=32 or --set dims=50,50.")
def data_synth(out, family, seed, imbalance, text_memo, av_noise, sizes, knobs):
    """Write an embedded synthetic dataset as an MMSA pickle (default family: dominant text, weak
    audio/visual; --family unimodal_bias: the deep-linear unimodal-bias benchmark)."""
    from ..data import synth_spec_from_args
    from ..data.mmsa import save_mmsa

    spec = synth_spec_from_args(seed=seed, imbalance=imbalance, text_memo=text_memo,
                                av_noise=av_noise, sizes=sizes, knobs=knobs, family=family)
    from ..fileutil import check_output_file
    side = Path(str(out) + ".json")
    check_output_file(side)                  # a FIFO or device there would block or swallow the report
    d = FAMILIES[family][1](spec)
    save_mmsa(d, out)
    n = {k: len(s) for k, s in d.splits.items()}
    click.echo(f"wrote {out}: train/valid/test = {n['train']}/{n['valid']}/{n['test']}, "
               f"modalities {', '.join(d.modalities)} (dims {d.dims})")
    side.write_text(json.dumps({"family": family, "spec": spec.to_dict(), "sizes": n}, indent=2))


@data.command("info")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@trust_pickle_option
def data_info(path, as_json, trust_pickle):
    """Splits, shapes, lengths and label statistics of an MMSA pickle (or 'synth')."""
    from ..data import describe, load_data

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


data.add_command(build_mosi)
data.add_command(build_mosei)
data.add_command(build_bclstm)
data.add_command(toy_text)
COMMANDS = [data]
