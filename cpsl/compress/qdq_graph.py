"""Graph rewrites of an int8 Q/DQ graph (used by :func:`cpsl.compress.quantize.quantize_int8`; docs/int8.md).

* :func:`dedicate_qdq` — one QuantizeLinear → DequantizeLinear pair, with its own scale and zero point,
  per quantized input; other readers of a quantized tensor read the float tensor.
* :func:`quantize_gathers` — float tables read only by Gather stored in int8, the gathered rows
  dequantized (``Gather(int8) → DequantizeLinear``); :func:`dequantize_before_gather` gives the other order.
"""
from __future__ import annotations

import copy

import numpy as np


def dedicate_qdq(model, op_types=("MatMul", "Gemm", "Conv")) -> dict:
    """Give every quantized input of an ``op_types`` node its own QuantizeLinear → DequantizeLinear pair with its
    own scale and zero-point initializers, and let every other reader of a quantized activation read the float
    tensor (in place). Returns counts.

    Why, with ONNX Runtime 1.32 CPU (x86): a DQ → MatMul ← DQ(weight) group becomes MatMulIntegerToFloat only
    with uint8 activations, and the int8 Q → DQ pair is turned into uint8 only when the Q feeds a single DQ. The
    quantizer leaves two forms that break this: (1) one Q/DQ pair whose DQ feeds a MatMul and the residual Add
    (``DedicatedQDQPair`` only splits tensors with several *quantized* readers; the Add then also read the
    fake-quantized tensor), (2) dedicated pairs of Q, K and V that share one scale initializer, which ONNX
    Runtime's common-subexpression elimination merges back into one Q with three DQs. Both leave the weight
    DequantizeLinear running at every call. The result is the same math for the quantized ops (same scales)
    and exact float for the rest; TensorRT reads it as ordinary Q/DQ pairs."""
    from onnx import helper

    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    graph_outs = {o.name for o in g.output}

    def is_act_dq(n) -> bool:
        return (n is not None and n.op_type == "DequantizeLinear"
                and getattr(prod.get(n.input[0]), "op_type", "") == "QuantizeLinear")

    quantized = {id(n) for n in g.node if n.op_type in op_types
                 and all(getattr(prod.get(x), "op_type", "") == "DequantizeLinear" for x in n.input[:2])}
    # 1. readers that are not quantized ops read the float tensor
    n_float = 0
    for n in g.node:
        if id(n) in quantized:
            continue
        for k, x in enumerate(n.input):
            dq = prod.get(x)
            if is_act_dq(dq) and x not in graph_outs:
                n.input[k] = prod[dq.input[0]].input[0]
                n_float += 1
    # 2. one Q → DQ pair, with its own scale and zero point, per quantized input
    uses: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    q_param_uses: dict[str, int] = {}
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            for x in n.input[1:3]:
                q_param_uses[x] = q_param_uses.get(x, 0) + 1
    out, n_new, k = [], 0, 0
    for n in g.node:
        if id(n) in quantized:
            for slot, x in enumerate(n.input[:2]):
                dq = prod.get(x)
                if not is_act_dq(dq):
                    continue
                q = prod[dq.input[0]]
                if uses[x] == 1 and uses[q.output[0]] == 1 and all(q_param_uses[p] == 1 for p in q.input[1:3]):
                    continue
                k += 1
                tag = f"{q.input[0]}__pair{k}"
                for src, dst in ((q.input[1], f"{tag}_scale"), (q.input[2], f"{tag}_zero_point")):
                    t = copy.deepcopy(inits[src])
                    t.name = dst
                    g.initializer.append(t)
                out.append(helper.make_node("QuantizeLinear", [q.input[0], f"{tag}_scale", f"{tag}_zero_point"],
                                            [f"{tag}_q"], name=f"{tag}_QuantizeLinear"))
                dq_new = helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zero_point"],
                                          [f"{tag}_dq"], name=f"{tag}_DequantizeLinear")
                dq_new.attribute.extend(copy.deepcopy(a) for a in dq.attribute)
                out.append(dq_new)
                n.input[slot] = f"{tag}_dq"
                n_new += 1
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    removed = prune_dead(model)
    return {"float_readers_rewired": n_float, "pairs_added": n_new, "nodes_removed": removed}


def prune_dead(model) -> int:
    """Remove QuantizeLinear/DequantizeLinear nodes whose outputs nobody reads, and the initializers only they
    read (in place); returns the number of nodes removed."""
    g = model.graph
    removed, params = 0, set()
    while True:
        used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        ids = {id(n) for n in dead}
        params |= {x for n in dead for x in n.input}
        keep = [n for n in g.node if id(n) not in ids]
        del g.node[:]
        g.node.extend(keep)
        removed += len(dead)
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used or t.name not in params]
    del g.initializer[:]
    g.initializer.extend(keep)
    return removed


def gather_scale(table: np.ndarray, percentile: float = 100.0) -> float:
    """Symmetric per-tensor int8 scale of a table: its ``percentile`` of |value| (100: the max) / 127."""
    a = np.abs(np.asarray(table, np.float32))
    r = float(a.max() if percentile >= 100 else np.percentile(a, percentile))
    return (r if r > 0 else 1.0) / 127.0


def quantize_gathers(model, min_elems: int, percentile: float = 100.0) -> list[dict]:
    """Store every float initializer of ``min_elems`` elements or more that only Gathers read (axis 0,
    the embedding tables) in int8 and dequantize the gathered rows (in place):

        Gather(table float32, ids) → x    becomes    Gather(table int8, ids) → DequantizeLinear(scale, 0) → x

    per-tensor symmetric (``scale`` from :func:`gather_scale`, zero point an int8 0). The other order,
    DequantizeLinear(table) → Gather, would dequantize the whole table at every ONNX Runtime call (it
    keeps DequantizeLinear of initializers for its Q/DQ fusions). Returns one entry per table."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list] = {}
    for n in g.node:
        for k, x in enumerate(n.input):
            if x in inits:
                readers.setdefault(x, []).append((n, k))
    done, out = {}, []
    for name, uses in readers.items():
        t = inits[name]
        if t.data_type != TensorProto.FLOAT or int(np.prod(t.dims)) < min_elems:
            continue
        if not all(n.op_type == "Gather" and k == 0 and _axis(n) == 0 for n, k in uses):
            continue
        table = numpy_helper.to_array(t)
        scale = gather_scale(table, percentile)
        q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
        err = np.abs(q.astype(np.float32) * scale - table)
        base = name.replace("/", "_")
        t.CopyFrom(numpy_helper.from_array(q, f"{base}_int8"))
        g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{base}_scale"),
                              numpy_helper.from_array(np.array(0, np.int8), f"{base}_zero_point")])
        done[name] = base
        out.append({"table": name, "shape": list(table.shape), "scale": float(scale),
                    "percentile": float(percentile), "clipped": int((np.abs(table) > 127 * scale).sum()),
                    "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean())})
    nodes = []
    for n in g.node:
        nodes.append(n)
        if n.op_type == "Gather" and n.input[0] in done:
            base, y = done[n.input[0]], n.output[0]
            n.input[0] = f"{base}_int8"
            n.output[0] = f"{y}_int8"
            nodes.append(helper.make_node("DequantizeLinear", [f"{y}_int8", f"{base}_scale", f"{base}_zero_point"],
                                          [y], name=f"{n.name}_DequantizeLinear"))
    del g.node[:]
    g.node.extend(nodes)
    return out


def dequantize_before_gather(model) -> int:
    """Rewrite every ``Gather(int8 table, ids) → DequantizeLinear`` of :func:`quantize_gathers` as
    ``DequantizeLinear(int8 table) → Gather`` (in place; same values, same file size); returns how many.

    TensorRT 10's ONNX parser lists Gather for float/int32/int64/bool data only and treats int8 as a type
    reached through Q/DQ, so this is the form for a TensorRT build (a DequantizeLinear on a constant, like a
    pre-quantized weight); ONNX Runtime CPU would dequantize the whole table at every call in it."""
    from onnx import helper

    g = model.graph
    vals = _const_values(model)
    prod = {o: n for n in g.node for o in n.output}
    tables: dict[str, str] = {}
    out, n_done = [], 0
    for n in g.node:
        gat = prod.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if not _int8_gather(gat, vals):
            out.append(n)
            continue
        table = gat.input[0]
        if table not in tables:
            tables[table] = f"{table}_dequantized"
            out.insert(0, helper.make_node("DequantizeLinear", [table, n.input[1], n.input[2]], [tables[table]],
                                           name=f"{table}_DequantizeLinear"))
        gat.input[0] = tables[table]
        gat.output[0] = n.output[0]
        n_done += 1
    del g.node[:]
    g.node.extend(out)
    return n_done


def _axis(node, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), default)


def _int8_gather(node, vals) -> bool:
    """``node`` is a Gather (axis 0) whose data is an int8 initializer or constant."""
    return (node is not None and node.op_type == "Gather" and _axis(node) == 0 and node.input[0] in vals
            and vals[node.input[0]].dtype == np.int8)


def _const_values(model) -> dict:
    from onnx import numpy_helper
    vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
    return vals
