"""Import the native extension ``cpsl._C`` if it was built, and say why not otherwise."""
from __future__ import annotations

_C = None
_ERR = ""
try:
    from . import _C  # type: ignore[attr-defined,no-redef]
except ImportError as e:  # pragma: no cover - depends on the install
    _ERR = f"cpsl._C not importable ({e}); reinstall with `pip install .`"


def extension_info() -> dict:
    if _C is None:
        return {"available": False, "reason": _ERR}
    d = {"available": True}
    d.update(dict(_C.build_info()))
    return d
