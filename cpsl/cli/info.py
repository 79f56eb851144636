"""``cpsl info``: versions, the native extension's build and the CP backends available here."""
from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json):
    """Versions, the native extension's build and the CP backends available here."""
    import platform

    import numpy
    import torch

    from .. import __version__
    from ..native_info import extension_info

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
        from ..cp import available_backends
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


COMMANDS = [info]
