"""Hostile pickles for the security, reliability and fuzz tests (issue 29): forged numpy arrays and
dtypes, deep nesting, shared-reference bombs. Each ``forge_*`` returns an object that pickles to
the attack (or the raw bytes, where ``pickle.dumps`` itself could not write it)."""
from __future__ import annotations

import pickle
import struct

import numpy as np

try:
    from numpy._core import multiarray as _ma
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _ma


class Reduce:
    """Pickles as ``func(*args)`` (+ ``state`` via BUILD): any call a hostile file could ask for."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def forged_dtype(code="O8", state=(3, "|", None, None, None, -1, -1, 0)):
    """A dtype whose state (flags, fields, sub-array) is chosen by the file."""
    return Reduce(np.dtype, (code, False, True), state)


def ndarray_call(shape=(4,), dtype="O", buffer=b"\x41" * 32, offset=0, strides=None):
    """``numpy.ndarray(shape, dtype, buffer, offset, strides)``: pointers as objects, or reads past the buffer."""
    args = (shape, np.dtype(dtype), buffer, offset) + ((strides,) if strides is not None else ())
    return Reduce(np.ndarray, args)


def reconstructed(shape, dtype, data, fortran=False):
    """``_reconstruct`` + ``__setstate__`` with a chosen shape/dtype/data (genuine numpy's own form, forged)."""
    return Reduce(_ma._reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, fortran, data))


FORGED_ARRAYS = {
    "object dtype from a buffer (pointers)": lambda: ndarray_call(),
    "ndarray with strides past its buffer": lambda: ndarray_call((1 << 20,), "f8", b"\0" * 8, 0, (8,)),
    "ndarray with an offset past its buffer": lambda: ndarray_call((2,), "f8", b"\0" * 16, 1 << 16),
    "object array state from bytes": lambda: reconstructed((3,), np.dtype("O"), b"\0" * 24),
    "object array of arrays": lambda: reconstructed((1,), np.dtype("O"), [np.zeros(2)]),
    "declared shape far beyond its data": lambda: reconstructed((1 << 20, 1 << 20), np.dtype("f4"), b"\0" * 16),
    "structured dtype with an object field": lambda: reconstructed((1,), np.dtype([("a", "O")]), [("x",)]),
    "sub-array dtype (a shape inside the dtype)": lambda: reconstructed((4,), np.dtype(("f8", (64, 64))), b"\0" * 8),
    "dtype with fields in its state": lambda: reconstructed((1,), forged_dtype("f8", (3, "<", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 8, 63)), b"\0" * 8),
    "scalar of an object dtype": lambda: Reduce(_ma.scalar, (np.dtype("O"), b"\0" * 8)),
    "scalar with a short buffer": lambda: Reduce(_ma.scalar, (np.dtype("f8"), b"\0")),
}

# harmless once read: the dtype is rebuilt from its type code, so the file's flags never reach numpy
CANONICALISED = {"object dtype with forged flags": lambda: reconstructed((2,), forged_dtype(), ["a", "b"])}


# ---------------------------------------------------------------------------- raw streams
def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def deep_tuple_key(depth: int = 200_000) -> bytes:
    """``{((((0,),),)...): None}``: hashing the key recurses ``depth`` times in C."""
    return b"\x80\x02}" + _int(0) + b"\x85" * depth + b"Ns."


def deep_list(depth: int = 200_000) -> bytes:
    """``[[[[...]]]]`` ``depth`` deep."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def shared_bomb(width: int = 1000, levels: int = 3) -> bytes:
    """A list of ``width`` references to a list of ``width`` references ... (``width**levels`` numbers once expanded)."""
    out = b"\x80\x02]" + b"(" + _int(1) * width + b"e" + b"q\x00"
    for lvl in range(1, levels):
        out += b"]" + b"(" + (b"h" + bytes([lvl - 1])) * width + b"e" + b"q" + bytes([lvl])
    return out + b"."


def in_split(attack, base: dict) -> dict:
    """``base`` (an MMSA dict) with ``attack`` as the train split's text features."""
    raw = {k: dict(v) for k, v in base.items()}
    raw["train"]["text"] = attack
    return raw


def dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)
