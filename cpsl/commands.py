"""Registers the subsystem commands (train, eval, ablate, distill, export, data builders)."""
from __future__ import annotations

import importlib


def register(main, data) -> None:
    for module, attr, group in (
        ("cpsl.train_cli", "COMMANDS", main),
        ("cpsl.data.build_cli", "COMMANDS", data),
        ("cpsl.deploy.cli", "COMMANDS", main),
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):  # not written yet: nothing to register
                continue
            raise
        for cmd in getattr(mod, attr):
            group.add_command(cmd)
