"""The one loader of the native extension ``cpsl._C``, with its ABI handshake.

:func:`load` imports ``cpsl._C`` once and checks that it is the extension this Python code
was written for (``CP_ABI`` and the entry points :mod:`cpsl.cp.native` calls); every user of
the extension goes through it, and :func:`extension_info` says why it is unusable otherwise.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

CP_ABI = 5  # csrc/bindings.cpp kCpAbi: bumped with a table layout or an entry point signature
NEEDED = ("cp_validate", "cp_stats", "cp_scale", "cuda_usable", "cuda_capture_id", "PENALTY_FIELDS",
          "PENALTY_MODES")
_REBUILD = "build it with `pip install --no-build-isolation .`"

_ext: Optional[ModuleType] = None
_err: Optional[str] = None


def load() -> tuple[Optional[ModuleType], str]:
    """``(cpsl._C, "")`` when the extension is importable and current, else ``(None, why)``."""
    global _ext, _err
    if _ext is None and _err is None:
        try:
            from . import _C  # type: ignore[attr-defined]
        except ImportError as e:
            _err = f"cpsl._C is not importable ({e}); {_REBUILD}"
        else:
            missing = [n for n in NEEDED if not hasattr(_C, n)]
            abi = getattr(_C, "CP_ABI", None)
            if missing or abi != CP_ABI:
                _err = (f"cpsl._C at {getattr(_C, '__file__', '?')} is stale (missing {', '.join(missing) or 'nothing'}, "
                        f"CP_ABI {abi} != {CP_ABI}); {_REBUILD}")
            else:
                _ext = _C
    return _ext, _err or ""


def reset() -> None:
    """Forget the loaded module (tests swap ``cpsl._C``)."""
    global _ext, _err
    _ext, _err = None, None


def extension_info() -> dict:
    C, why = load()
    if C is None:
        return {"available": False, "reason": why}
    d = {"available": True}
    d.update(dict(C.build_info()))
    return d
