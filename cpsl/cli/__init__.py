"""The ``cpsl`` command line: one module per command group (data, train/eval/ablate, distill,
export, info), thin wrappers over the library. Every command fails on bad input with one line and
exit code 2. A command module that cannot be imported fails loudly (no silent skipping)."""
from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import CPSLError


class _Group(click.Group):
    """Turns CPSLError (and a few obvious user errors) into one line + exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CPSLError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:         # a missing/unreadable input, an unwritable output (/dev/full, too long a name)
            name = str(e.filename or "")
            where = f": {name[:120]}{'...' if len(name) > 120 else ''}" if name else " (writing an output)"
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory (lower the data or model sizes, or the batch size)", err=True)
            sys.exit(2)
        except click.UsageError as e:  # a subcommand's bad option: one line too (not click's usage block)
            if isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                raise                      # a bare group: its help, as click prints it
            cmd = f" (see: {e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{cmd}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="cpsl")
def main():
    """cpsl: balanced multimodal sentiment analysis (CP + SL), from training to the edge.

    \b
    Train:      cpsl train --data synth --out runs/synth --seeds 1
    Evaluate:   cpsl eval --ckpt runs/synth/seed1/best.pt --data synth --split test
    Export:     cpsl export --ckpt runs/synth/seed1/best.pt --out dist
    Predict:    cpsl predict --model dist/model.onnx --text "a wonderful film"
    Config:     cpsl config show [--preset student]
    """


from . import config_cmd, data, diagnose, distill, export, info, predict, recipe, train, transfer  # noqa: E402 - the command modules attach to `main`

for _mod in (info, data, config_cmd, train, diagnose, transfer, distill, export, predict, recipe):
    for _cmd in _mod.COMMANDS:
        main.add_command(_cmd)


def run():  # pragma: no cover - console entry for `python -m cpsl`
    main(prog_name="cpsl")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
