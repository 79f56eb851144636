"""A pickle reader that cannot execute code: it admits only what MMSA files contain.

An MMSA file is a pickled dict of dicts of numpy arrays (plus str/bytes/numbers, lists and
tuples). Unpickling resolves every class or function a file names through
``Unpickler.find_class``; this reader answers only for the numpy array/scalar/dtype
reconstructors and ``_codecs.encode`` (which protocol 2 uses for bytes) and refuses any other
global with one line that names it, so a file whose object ``__reduce__``s to ``os.system``
(or anything else) is refused before the call is built. ``trust=True`` falls back to plain
``pickle.load``: it runs whatever code the file carries, so use it only on files you made.
"""
from __future__ import annotations

import pickle
from typing import BinaryIO

from ..errors import CPSLError

# (module, name) pairs that numpy arrays, scalars and dtypes reduce to (numpy 1.x and 2.x)
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global outside :data:`ALLOWED_GLOBALS`."""


class MMSAUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "numpy.dtypes" and name.endswith("DType"):   # numpy 2 dtype classes (plain data)
            return super().find_class(module, name)
        raise UnsafePickleError(f"{module}.{name}")

    def persistent_load(self, pid):  # noqa: D401 - MMSA files hold no persistent ids
        raise UnsafePickleError(f"persistent id {str(pid)[:40]!r}")


def safe_load(f: BinaryIO, path: str = "file", trust: bool = False):
    """Unpickle ``f`` admitting only MMSA content; :class:`CPSLError` (one line) otherwise."""
    if trust:
        return pickle.load(f)  # noqa: S301 - the user asked for it (--trust-pickle)
    try:
        return MMSAUnpickler(f).load()
    except UnsafePickleError as e:
        raise CPSLError(f"{path} refers to {e}, which an MMSA data file never contains; refusing to load it "
                        "(it could run code). If you made this file yourself, --trust-pickle loads it unsafely") from None
