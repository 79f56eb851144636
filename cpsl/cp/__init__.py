"""Conflict-aware Penalty: the rule (core) and its backends (the strategies live in cpsl.strategies)."""
from __future__ import annotations

from .core import Backend, CPStats, PenaltyParams, backend_names, get_backend, register_backend
from . import reference  # noqa: F401  (registers "reference")

try:  # registers "foreach"
    from . import foreach  # noqa: F401
except ImportError:  # pragma: no cover
    pass
try:  # registers "native" when the extension has the CP kernels
    from . import native  # noqa: F401
except ImportError:  # pragma: no cover
    pass


def available_backends() -> dict[str, str]:
    out = {}
    for name in backend_names():
        ok, why = get_backend(name).available()
        out[name] = "yes" if ok else f"no: {why}"
    return out
