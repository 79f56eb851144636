"""``cpsl recipe``: workflows that chain cpsl commands into one result (cpsl.recipes, cpsl.kfold)."""
from __future__ import annotations

import click

from .options import packaged_config


@click.group("recipe")
def recipe():
    """Workflows: the MOSI recipe (mosi) and the paired comparison of their k-folds (kfold-compare)."""


@recipe.command("mosi")
@click.option("--data-dir", envvar="CPSL_DATA_DIR", required=True, type=click.Path(file_okay=False),
              help="The data pack (mosi/labels.csv, mosi/audio_opensmile.csv, mosei/labels.csv); $CPSL_DATA_DIR.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The run folder (OUT/results.json, OUT/seed*/best.pt).")
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated seeds of the fused model.")
@click.option("--encoder", type=click.Path(), help="An already transferred encoder folder (skips the MOSEI build "
                                                   "and transfer).")
@click.option("--config", default="mosi_best", show_default=True, callback=lambda ctx, p, v: packaged_config(v),
              help="cpsl train config of the fused model (a file or a packaged config name).")
@click.option("--transfer-config", default="mosei_transfer", show_default=True,
              callback=lambda ctx, p, v: packaged_config(v), help="build + pretrain-text settings of the transfer.")
@click.option("--source-encoder", default="minilm", show_default=True, help="The encoder the transfer starts from.")
@click.option("--cache", type=click.Path(file_okay=False),
              help="Pickles and the transferred encoder (default $XDG_CACHE_HOME/cpsl/mosi_recipe).")
@click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="torch threads of every stage (0: torch's default).")
@click.option("--epochs", type=click.IntRange(1), help="Max epochs of the fused model (default: the config's).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="A config override of every run.")
@click.option("--kfold", type=click.IntRange(0), default=0, help="Also k-fold cross-validate the config over "
                                                                 "train+valid (video-grouped); with --edge, each fold's "
                                                                 "teacher also gets its edge student, scored against it.")
@click.option("--kfold-baseline", is_flag=True, help="k-fold the source encoder fine-tuned on MOSI only as well.")
@click.option("--kfold-only", is_flag=True,
              help="With --kfold: keep OUT's finished training run (its results.json) and only add the k-fold.")
@click.option("--edge", is_flag=True,
              help="Also make the device artefact: a student distilled from the seeds' ensemble, int8, end to end, "
                   "in OUT/edge/ (teacher, ensemble and student metrics + batch-1 latency in OUT/results.json).")
@click.option("--edge-only", is_flag=True,
              help="Keep OUT's finished training run (its results.json and seed checkpoints) and only add --edge.")
@click.option("--edge-layers", type=click.IntRange(1, 6), default=3, show_default=True,
              help="--edge: encoder layers of the student (the teacher's first N, distilled).")
@click.option("--edge-epochs", type=click.IntRange(1), default=6, show_default=True,
              help="--edge: distillation epochs over the transfer set.")
@click.option("--edge-transfer/--edge-no-transfer", default=True, show_default=True,
              help="--edge: the MOSEI transcripts join MOSI train in the transfer set.")
@click.option("--edge-transfer-rows", type=click.IntRange(0), default=0, show_default=True,
              help="--edge: a random subset of that many MOSEI transcripts (0: all).")
@click.option("--edge-audio/--edge-no-audio", default=False, show_default=True,
              help="--edge: the student reads the openSMILE audio vector too (default: text only; the device "
                   "needs no audio features; the teacher ensemble still uses audio; docs/mosi.md says why).")
@click.option("--transfer-max-steps", type=int, default=0, hidden=True)
@click.option("--resume", is_flag=True, help="Continue a stopped training run in OUT.")
@click.option("--overwrite", is_flag=True, help="Replace a training run already in OUT.")
@click.option("--quiet", is_flag=True, help="Logs to files instead of the console.")
def mosi(**kw):
    """The MOSI recipe: build, MOSEI transfer, fused model, ridge line (and k-fold) into OUT/results.json."""
    from ..recipes.mosi import RecipeSettings, run_recipe
    kw["sets"] = list(kw["sets"])
    run_recipe(RecipeSettings(**kw))


@recipe.command("kfold-compare")
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("--kfold-variant", default="transferred", show_default=True, help="The k-fold variant to compare.")
@click.option("--assume-same-folds", is_flag=True,
              help="Compare a run that predates fold signatures, on other MOSI features.")
def kfold_compare(results, kfold_variant, assume_same_folds):
    """The k-folds of recipe results.json files, paired fold by fold with the first's (no training)."""
    from ..kfold import compare_kfold
    click.echo(compare_kfold(list(results), kfold_variant, assume_same_folds))


COMMANDS = [recipe]
