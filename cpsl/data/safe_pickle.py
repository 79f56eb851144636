"""A pickle reader that cannot execute code or forge memory: it admits only what MMSA files contain.

An MMSA file is a pickled dict of dicts of numpy arrays (plus str/bytes/numbers, lists and
tuples). Three layers keep a hostile file harmless:

1. :func:`scan` walks the opcode stream *before* anything is built (nothing is called, no
   container is hashed) and refuses containers nested deeper than ``CPSL_MAX_PICKLE_DEPTH``
   (a dict key that is a 200,000-deep tuple would crash the interpreter while being hashed),
   more than ``CPSL_MAX_PICKLE_ITEMS`` items once shared references are expanded (what
   ``np.asarray`` would build from them), self-referencing containers, and malformed streams.
2. ``find_class`` answers only for the names genuine numpy pickles use, and answers with the
   validating stand-ins below, never with numpy's own functions: ``numpy.ndarray`` itself cannot
   be called (so no array with a chosen buffer, offset or strides, or with pointers as objects),
   a ``dtype`` is rebuilt from its type code (bool, integers, floats, complex, fixed strings; no
   structured, sub-array or datetime dtype, no attacker flags), and every array's shape, byte
   size and buffer length are checked before numpy sees them. An object array is admitted only
   as genuine numpy writes it: a list of str/bytes/numbers, one per element.
3. :func:`check_tree` refuses anything left in the result that is not plain data.

``trust=True`` falls back to plain ``pickle.load``: it runs whatever code the file carries, so
use it only on files you made.
"""
from __future__ import annotations

import math
import pickle
import pickletools
import re
from typing import BinaryIO

import numpy as np

from ..errors import CPSLError
from ..limits import gib, limit

_INPLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
_PLAIN_ITEMS = (str, bytes, int, float, bool)


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global outside the allow-list, or forges an array/dtype."""


# ---------------------------------------------------------------------------- 1. the opcode scan
class _Node:
    __slots__ = ("kids",)

    def __init__(self, kids):
        self.kids = kids


_LEAF = _Node(())                 # every value that holds nothing (numbers, strings, bytes)
_CONTAINERS = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"}


class _Bounded:
    """A reader that never asks the file for more bytes than are left (a declared 2**60-byte string allocates nothing)."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        b = self.f.read(n)
        self.left -= len(b)
        return b

    def readline(self) -> bytes:
        b = self.f.readline(min(self.left, 1 << 20))
        self.left -= len(b)
        return b


def _shadow_run(f: BinaryIO, size: int):
    """Run the opcodes on a shadow stack of :class:`_Node` (children only, no values); the root node."""
    stack, marks, memo = [], [], {}
    for op, arg, _ in pickletools.genops(_Bounded(f, size)):
        name = op.name
        if name == "MARK":
            marks.append(len(stack))
        elif name in _MEMO_PUT:
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in _MEMO_GET:
            stack.append(memo[arg])
        elif name == "STOP":
            return stack[-1]
        else:
            before = op.stack_before
            kids = []
            if pickletools.markobject in before:
                k = marks.pop()
                kids, stack[k:] = stack[k:], []
                before = before[:before.index(pickletools.markobject)]
            if len(before) > len(stack) - (marks[-1] if marks else 0):
                raise ValueError("stack underflow")
            kids = [stack.pop() for _ in before][::-1] + kids
            if name in _INPLACE:
                if kids[0] is _LEAF:
                    raise ValueError(f"{name} on a value that is not a container")
                kids[0].kids.extend(kids[1:])
                stack.append(kids[0])
            elif name == "DUP":
                stack += kids * 2
            elif op.stack_after:
                stack.append(_Node(kids) if kids or name in _CONTAINERS else _LEAF)
    raise ValueError("no STOP opcode")


def _measure(root: _Node, path: str) -> None:
    """Refuse a tree deeper than the depth limit, larger than the item limit, or holding itself."""
    max_depth, max_items = limit("CPSL_MAX_PICKLE_DEPTH"), limit("CPSL_MAX_PICKLE_ITEMS")
    done: dict[int, int] = {id(_LEAF): 1}
    on_path: set[int] = set()
    todo = [(root, 0)]
    while todo:
        node, i = todo.pop()
        if i == 0:
            if id(node) in done:
                continue
            on_path.add(id(node))
            if len(on_path) > max_depth:
                raise CPSLError(f"{path} nests containers more than {max_depth} deep (limit CPSL_MAX_PICKLE_DEPTH); "
                                "an MMSA file or checkpoint never does; refusing to load it")
        if i < len(node.kids):
            todo.append((node, i + 1))
            kid = node.kids[i]
            if id(kid) in on_path:
                raise CPSLError(f"{path} holds a container that contains itself; refusing to load it")
            if id(kid) not in done:
                todo.append((kid, 0))
            continue
        n = 1 + sum(done[id(k)] for k in node.kids)
        if n > max_items:
            raise CPSLError(f"{path} expands to more than {max_items:,} items once its shared references are "
                            "counted (limit CPSL_MAX_PICKLE_ITEMS; raise it if the file is genuine); refusing to load it")
        done[id(node)] = n
        on_path.discard(id(node))


def scan(f: BinaryIO, path: str, size: int | None = None) -> None:
    """Check the pickle in ``f`` (from its current position, ``size`` bytes) without building it; rewinds ``f``."""
    start = f.tell()
    if size is None:
        f.seek(0, 2)
        size = f.tell() - start
        f.seek(start)
    try:
        root = _shadow_run(f, size)
    except (ValueError, IndexError, KeyError, TypeError, EOFError, UnicodeDecodeError) as e:
        raise CPSLError(f"{path} is not a readable pickle ({type(e).__name__}: {str(e)[:80]})") from None
    finally:
        f.seek(start)
    if isinstance(root, _Node):
        _measure(root, path)


# ---------------------------------------------------------------------------- 2. validating stand-ins
_DTYPE_CODE = re.compile(r"[|<>=]?(b1|[iu][1248]|f[248]|c(8|16)|[US]\d{1,9}|O8?|O4)")


def _array_limit(nbytes: int, what: str) -> None:
    cap = limit("CPSL_MAX_ARRAY_BYTES")
    if nbytes > cap:
        raise UnsafePickleError(f"{what} of {gib(nbytes)} beyond the limit CPSL_MAX_ARRAY_BYTES={gib(cap)} "
                                "(raise it if the file is genuine)")


class DtypeSpec:
    """What ``numpy.dtype(code, align, copy)`` + its state in a file stand for; made real by :func:`real_dtype`."""

    code = state = None

    def __init__(self, code=None, align=False, copy=False):
        self.code, self.state = code, None

    def __setstate__(self, state):
        self.state = state


def _dtype(code, align=False, copy=False):
    if isinstance(code, bytes):
        code = code.decode("latin1")
    if not isinstance(code, str) or not _DTYPE_CODE.fullmatch(code):
        raise UnsafePickleError(f"numpy dtype {str(code)[:20]!r} (only bool, integer, float, complex, fixed string "
                                "and object-of-str dtypes)")
    return DtypeSpec(code)


def real_dtype(spec) -> np.dtype:
    """The canonical dtype a :class:`DtypeSpec` stands for (its byte order only is taken from the state)."""
    if not isinstance(spec, DtypeSpec) or spec.code is None:
        raise UnsafePickleError(f"an array whose dtype is a {type(spec).__name__}")
    dt = np.dtype(spec.code)
    st = spec.state
    if st is not None:
        if not isinstance(st, tuple) or len(st) not in (8, 9) or any(x is not None for x in st[2:5]):
            raise UnsafePickleError("numpy dtype with fields, sub-arrays or an unknown state")
        if st[1] in ("<", ">") and dt.itemsize > 1 and dt.kind != "O":
            dt = dt.newbyteorder(st[1])
    return dt


def _shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > 32 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise UnsafePickleError(f"numpy array with shape {str(shape)[:40]}")
    return shape


class SafeArray(np.ndarray):
    """An array built only through :func:`_reconstruct` and a checked ``__setstate__``."""

    def __new__(cls, *args, **kwargs):        # a file calling numpy.ndarray(...) directly lands here
        raise UnsafePickleError("numpy.ndarray called directly (a forged array)")

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("numpy array with an unknown state")
        shape, spec, fortran, data = state[-4:]
        shape, dt = _shape(shape), real_dtype(spec)
        n = math.prod(shape)
        _array_limit(n * dt.itemsize, f"numpy array {shape} {dt}")
        if not isinstance(fortran, bool):
            raise UnsafePickleError("numpy array with a non-bool order flag")
        if dt.kind == "O":
            if not isinstance(data, list) or len(data) != n or not all(isinstance(x, _PLAIN_ITEMS) for x in data):
                raise UnsafePickleError("a numpy object array holding something other than str/bytes/numbers")
        elif not isinstance(data, (bytes, bytearray)) or len(data) != n * dt.itemsize:
            raise UnsafePickleError(f"numpy array {shape} {dt} whose data is not exactly its {n * dt.itemsize} bytes")
        super().__setstate__((1, shape, dt, fortran, data))


def _ndarray_name(*args, **kwargs):
    raise UnsafePickleError("numpy.ndarray called directly (a forged array)")


def _reconstruct(subtype, shape, code):
    if subtype is not _ndarray_name or _shape(shape) != (0,) or code not in (b"b", "b"):
        raise UnsafePickleError("numpy _reconstruct with arguments genuine numpy never writes")
    return np.ndarray.__new__(SafeArray, (0,), np.int8)


def _scalar(spec, data=None):
    dt = real_dtype(spec)
    if dt.kind == "O" or not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise UnsafePickleError(f"numpy scalar {dt} whose data is not exactly {dt.itemsize} bytes")
    return np.frombuffer(data, dt)[0].copy()


def _frombuffer(buf, spec, shape, order="C"):
    dt, shape = real_dtype(spec), _shape(shape)
    n = math.prod(shape) * dt.itemsize
    _array_limit(n, f"numpy array {shape} {dt}")
    if dt.kind == "O" or not isinstance(buf, (bytes, bytearray)) or len(buf) != n or order not in ("C", "F"):
        raise UnsafePickleError(f"numpy array {shape} {dt} whose buffer is not exactly its {n} bytes")
    return np.frombuffer(buf, dt).reshape(shape, order=order).copy()


def _encode(obj, encoding="utf-8"):
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode of something other than a latin-1 string")
    return obj.encode("latin1")


# the names genuine numpy pickles (1.x and 2.x) use -> the checked stand-ins
STAND_INS = {f"{m}.{n}": f for m in ("numpy.core.multiarray", "numpy._core.multiarray")
             for n, f in (("_reconstruct", _reconstruct), ("scalar", _scalar))}
STAND_INS.update({f"{m}._frombuffer": _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")})
STAND_INS.update({"numpy.ndarray": _ndarray_name, "numpy.dtype": _dtype, "_codecs.encode": _encode})


def torch_safe_globals() -> list:
    """The stand-ins as ``torch.serialization.safe_globals`` entries (plus the two types their BUILD may touch)."""
    out = [(f, name) for name, f in STAND_INS.items() if name != "_codecs.encode"]
    return out + [(SafeArray, "cpsl.data.safe_pickle.SafeArray"), (DtypeSpec, "cpsl.data.safe_pickle.DtypeSpec")]


class MMSAUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        f = STAND_INS.get(f"{module}.{name}")
        if f is None:
            raise UnsafePickleError(f"{module}.{name}")
        return f

    def persistent_load(self, pid):  # noqa: D401 - MMSA files hold no persistent ids
        raise UnsafePickleError(f"persistent id {str(pid)[:40]!r}")


# ---------------------------------------------------------------------------- 3. the result
def check_tree(obj, path: str, extra_types: tuple = ()) -> None:
    """Refuse anything in ``obj`` that is not plain data (containers of numbers, strings and checked arrays)."""
    seen, todo = set(), [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, dict):
            todo += list(o.values()) + list(o.keys())
        elif isinstance(o, (list, tuple)):
            todo += list(o)
        elif isinstance(o, np.ndarray) and o.dtype.kind == "O":
            todo += o.ravel().tolist()
        elif not (o is None or isinstance(o, (*_PLAIN_ITEMS, complex, bytearray, np.ndarray, np.generic, *extra_types))):
            raise CPSLError(f"{path} holds a {type(o).__name__}, which an MMSA data file never contains; "
                            "refusing to load it")


def safe_load(f: BinaryIO, path: str = "file", trust: bool = False):
    """Unpickle ``f`` admitting only MMSA content; :class:`CPSLError` (one line) otherwise."""
    if trust:
        return pickle.load(f)  # noqa: S301 - the user asked for it (--trust-pickle)
    scan(f, path)
    try:
        obj = MMSAUnpickler(f).load()
    except UnsafePickleError as e:
        raise CPSLError(f"{path} refers to {e}; refusing to load it (an MMSA data file never holds that; it "
                        "could run code or forge memory). If you made this file yourself, --trust-pickle loads it "
                        "unsafely") from None
    check_tree(obj, path)
    return obj
