"""Plans of the ``native`` CP backend: per gradient layout, the chunk table, group info and
workspaces that ``cpsl._C`` reads (csrc/cp.h), cached and pinned by CUDA graph captures.

* A plan is built on the first call for a gradient layout and cached, keyed by every
  gradient's (data pointer, byte size, dtype, contiguity) plus the group ids: later steps
  only compare that key. Up to ``MAX_PLANS`` layouts are kept (least recently used evicted).
* A plan used while the current stream of the *gradients'* device captures a CUDA graph is
  pinned under that capture's :class:`GraphHandle` (the graph holds raw pointers to its
  table and workspaces): neither :func:`clear_cache` nor eviction frees it.
  :func:`release_graph_plans` takes one handle and unpins only the plans of that capture;
  a plan two graphs use stays pinned until both handles are released.

The extension module is passed in (``C``) by :mod:`cpsl.cp.native` (loaded by :mod:`cpsl.native_info`).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

CHUNK_CPU = 1 << 16  # elements per chunk-table row on CPU (work unit of one OpenMP iteration)
CHUNK_CUDA = 1 << 15  # elements per row on CUDA (work unit of one thread block)
MAX_PLANS = 8
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclass(frozen=True, order=True)
class GraphHandle:
    """One CUDA graph capture: the device index and the capture's number (cpsl._C.cuda_capture_id)."""

    device: int
    capture: int


def capture_id(C, device: torch.device) -> int:
    """Nonzero (that capture's number) while the current stream of ``device`` captures a CUDA
    graph, else 0. Asks about ``device``'s stream, whatever the current device is."""
    if device.type != "cuda":
        return 0
    return int(C.cuda_capture_id(torch.cuda.current_stream(device).cuda_stream))


# ------------------------------------------------------------------ layout
def is_dense(g: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + nbytes) exactly."""
    if g.is_contiguous():
        return True
    expect = 1
    for st, sz in sorted((st, sz) for st, sz in zip(g.stride(), g.shape) if sz != 1):
        if st != expect:
            return False
        expect *= sz
    return True


def memory_runs(grads, group_index, n_groups: int):
    """Per group, the memory runs [(address, elements, dtype code)] of its present gradients
    (back-to-back gradients of one dtype merged), the element counts, and a note when two
    gradients overlap in memory ('' otherwise)."""
    runs: list[list[list[int]]] = [[] for _ in range(n_groups)]
    numel = [0] * n_groups
    spans = []
    for i, g in enumerate(grads):
        if g is None or g.numel() == 0:
            continue
        m, n, esize, base, code = group_index[i], g.numel(), g.element_size(), g.data_ptr(), DTYPE_CODES[g.dtype]
        spans.append((base, base + n * esize, i))
        last = runs[m][-1] if runs[m] else None
        if last is not None and last[2] == code and last[0] + last[1] * esize == base:
            last[1] += n
        else:
            runs[m].append([base, n, code])
        numel[m] += n
    spans.sort()
    alias = ""
    for (b0, e0, i0), (b1, _, i1) in zip(spans, spans[1:]):
        if b1 < e0:
            alias = (f"grads[{min(i0, i1)}] and grads[{max(i0, i1)}] overlap in memory (one parameter in two CP "
                     "groups, or tied weights)")
            break
    return runs, numel, alias


def check_layout(grads, group_index, n_groups: int) -> torch.device:
    """Python-side argument checks (run when a plan is built); returns the grads' device."""
    if not isinstance(n_groups, int) or n_groups < 1:
        raise ValueError(f"n_groups must be an int >= 1, got {n_groups!r}")
    if len(grads) != len(group_index):
        raise ValueError(f"grads and group_index differ in length ({len(grads)} vs {len(group_index)})")
    device = None
    first = -1
    for i, (g, m) in enumerate(zip(grads, group_index)):
        if not 0 <= int(m) < n_groups:
            raise ValueError(f"group_index[{i}] = {m} is out of range [0, {n_groups})")
        if g is None:
            continue
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"grads[{i}] is a {type(g).__name__}, not a tensor or None")
        if g.layout != torch.strided:
            raise TypeError(f"grads[{i}] has layout {g.layout}; the native backend needs dense tensors")
        if g.dtype not in DTYPE_CODES:
            raise TypeError(f"grads[{i}] has unsupported dtype {g.dtype} (native supports float32, float16, bfloat16)")
        if g.device.type not in ("cpu", "cuda"):
            raise ValueError(f"grads[{i}] is on {g.device}; the native backend runs on cpu or cuda")
        if device is None:
            device, first = g.device, i
        elif g.device != device:
            raise ValueError(f"grads[{i}] is on {g.device} but grads[{first}] is on {device}: one device per call")
        if not is_dense(g):
            raise ValueError(f"grads[{i}] is neither contiguous nor dense (strides {tuple(g.stride())} for shape "
                             f"{tuple(g.shape)}: a strided view with gaps or overlaps)")
    return device if device is not None else torch.device("cpu")


def _table(runs, numel, n_groups: int, chunk: int) -> tuple[list[int], list[int], int]:
    """The flat chunk table, the flat group info and the number of chunks (csrc/cp.h)."""
    flat: list[int] = []
    ginfo: list[int] = []
    begin = 0
    for m in range(n_groups):
        rows = 0
        for base, n, code in runs[m]:
            esize = 4 if code == 0 else 2
            for off in range(0, n, chunk):
                flat.extend((base + off * esize, min(chunk, n - off), code, m))
                rows += 1
        ginfo.extend((numel[m], begin, begin + rows))
        begin += rows
    return flat, ginfo, begin


# ------------------------------------------------------------------ the plan
class Plan:
    """Chunk table + group info + workspaces for one gradient layout (see csrc/cp.h)."""

    __slots__ = ("device", "dev_index", "n_groups", "n_chunks", "total", "table", "group_info", "partials",
                 "counter", "table_host", "group_info_host", "alias", "stream", "key", "captures")

    def __init__(self, C, grads, group_index, n_groups: int, device: torch.device, key=None):
        if capture_id(C, device):
            raise RuntimeError("native CP: no plan for this gradient layout, and one cannot be built during "
                               "CUDA graph capture (it copies the table to the device); run one step on the "
                               "same gradients before capturing")
        runs, numel, self.alias = memory_runs(grads, group_index, n_groups)
        flat, ginfo, self.n_chunks = _table(runs, numel, n_groups, CHUNK_CUDA if device.type == "cuda" else CHUNK_CPU)
        self.device, self.key, self.n_groups = device, key, n_groups
        self.dev_index = -1 if device.type == "cpu" else (device.index if device.index is not None
                                                          else torch.cuda.current_device())
        self.captures: set[GraphHandle] = set()
        self.table_host = torch.tensor(flat, dtype=torch.int64).reshape(-1, 4)
        self.group_info_host = torch.tensor(ginfo, dtype=torch.int64).reshape(-1, 3)
        check_residency = device.type == "cuda" or (torch.cuda.is_available() and torch.cuda.is_initialized())
        self.total = C.cp_validate(self.table_host.data_ptr(), self.n_chunks, self.group_info_host.data_ptr(),
                                   n_groups, self.dev_index, check_residency)
        if device.type == "cuda":
            self.stream = torch.cuda.current_stream(device).cuda_stream
            self.table = self.table_host.to(device)
            self.group_info = self.group_info_host.to(device)
            self.counter = torch.zeros(1, dtype=torch.int32, device=device)
        else:
            self.stream = 0
            self.table = self.table_host
            self.group_info = self.group_info_host
            self.counter = None
        self.partials = torch.empty(max(self.n_chunks, 1), dtype=torch.float64, device=device)
        if device.type == "cuda":  # the table copy and the counter's zero-fill are done before any stream uses them
            torch.cuda.current_stream(device).synchronize()

    @property
    def pinned(self) -> bool:
        return bool(self.captures)

    def on_stream(self, C) -> int:
        """The current CUDA stream of the plan's device; pins the plan under the capture's
        handle during a graph capture and records its tensors on a stream it was not built
        on (the caching allocator then keeps them)."""
        s = torch.cuda.current_stream(self.device)
        cid = int(C.cuda_capture_id(s.cuda_stream))
        if cid:
            pin(self, GraphHandle(self.dev_index, cid))  # kept until that capture is released
            return s.cuda_stream
        if s.cuda_stream != self.stream:
            for t in (self.table, self.group_info, self.partials, self.counter):
                t.record_stream(s)
        return s.cuda_stream


# ------------------------------------------------------------------ cache and pins
_lock = threading.Lock()
_plans: "OrderedDict[tuple, Plan]" = OrderedDict()  # least recently used first
_pinned: dict = {}  # key -> plan used by a captured CUDA graph: never evicted, see release_graph_plans()
_builds: dict[str, int] = {}


def pin(plan: Plan, handle: GraphHandle) -> None:
    """Keep ``plan`` (and its buffers) until ``handle`` is released."""
    with _lock:
        plan.captures.add(handle)
        _pinned[plan.key] = plan


def clear_cache() -> None:
    """Forget every cached plan (frees the workspaces), except plans a CUDA graph captured."""
    with _lock:
        _plans.clear()


def graph_handles() -> list[GraphHandle]:
    """The captures that pin plans now (not yet released)."""
    with _lock:
        return sorted({h for plan in _pinned.values() for h in plan.captures})


def release_graph_plans(handle: GraphHandle) -> int:
    """Unpin the plans of one capture (call once its graph is destroyed: replaying it
    afterwards may read freed memory); plans another live capture uses stay pinned. Returns
    how many plans that capture had pinned."""
    if not isinstance(handle, GraphHandle):
        raise TypeError(f"release_graph_plans takes a GraphHandle (native.capture_handle()), got {handle!r}")
    n = 0
    with _lock:
        for key, plan in list(_pinned.items()):
            if handle in plan.captures:
                n += 1
                plan.captures.discard(handle)
                if not plan.captures:
                    del _pinned[key]
    return n


def plan_builds(device: torch.device | str | None = None) -> int:
    """How many plans were built in this process (on ``device``, or on every device)."""
    if device is None:
        return sum(_builds.values())
    d = torch.device(device)
    if d.index is None:  # "cuda": every CUDA device
        return sum(n for k, n in _builds.items() if torch.device(k).type == d.type)
    return _builds.get(str(d), 0)


def _sig(g):
    if g is None:
        return None
    if g.is_contiguous():
        return (g.data_ptr(), g.nbytes, g.dtype, True)
    return (g.data_ptr(), g.nbytes, g.dtype, g.stride(), tuple(g.shape))


def plan_for(C, grads, group_index, n_groups: int) -> Plan:
    """The cached plan of this layout, built on a miss (``C``: the extension module)."""
    try:
        sig = tuple([_sig(g) for g in grads])
    except (AttributeError, RuntimeError):  # not a tensor, or a tensor without storage (meta)
        check_layout(grads, group_index, n_groups)
        raise
    key = (n_groups, tuple(group_index), sig)
    with _lock:
        plan = _plans.get(key) or _pinned.get(key)
        if plan is not None:
            if key in _plans:
                _plans.move_to_end(key)  # LRU: a hit is the most recent use
            return plan
    device = check_layout(grads, group_index, n_groups)
    plan = Plan(C, grads, group_index, n_groups, device, key)
    with _lock:
        _builds[str(device)] = _builds.get(str(device), 0) + 1
        _plans[key] = plan
        while len(_plans) > MAX_PLANS:
            _plans.popitem(last=False)
    return plan
