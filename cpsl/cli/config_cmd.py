"""``cpsl config show``: every config key with its value (preset ← --config ← --set), default and help."""
from __future__ import annotations

import json

import click

from ..config import PRESETS
from .options import config_file_option, set_option


@click.group("config")
def config():
    """Inspect the run configuration."""


@config.command("show")
@click.option("--preset", default="teacher", show_default=True, type=click.Choice(list(PRESETS)), help="Config preset.")
@config_file_option
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def show(preset, config, sets, as_json):
    """Print every key (section.key = value  # help); values that differ from the default say so."""
    from .. import config_doc
    from ..config import build_config
    cfg = build_config(preset, config, sets)
    if as_json:
        click.echo(json.dumps(config_doc.keys(cfg), indent=2, default=str))
    else:
        click.echo(config_doc.text(cfg))


COMMANDS = [config]
