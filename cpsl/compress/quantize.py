"""Post-training quantization of an exported fp32 ONNX graph (docs/method.md §7).

* :func:`to_fp16` — a float16 graph with float32 inputs/outputs: float initializers and
  constants become float16, ``Cast(to=float)`` becomes ``Cast(to=float16)``, a Cast is inserted
  after each float input and before each float output. Ops in ``keep_fp32`` (default:
  ``LayerNormalization``, ``Softmax``, ``ReduceSum``, ``ReduceMean`` — normalisations (also
  LayerNorm decomposed below opset 17) and masked sums, where fp16 accumulation loses the
  most) run in float32 between Casts.
* :func:`quantize_int8` — explicit Q/DQ in the form TensorRT consumes directly: symmetric int8
  weights per output channel (MatMul axis 1 of the (K, N) weight, Gemm(transB) axis 0, Conv
  axis 0), symmetric per-tensor int8 activations calibrated on training batches, zero points 0
  of type int8, only the inputs of MatMul/Gemm/Conv quantized (no output Q/DQ, no int32 bias),
  LayerNorm/Softmax/GELU left in float. Uses ``onnxruntime.quantization.quantize_static``, then the
  rewrites of :mod:`.qdq_graph`: one Q/DQ pair per quantized input (what ONNX Runtime CPU fuses into
  MatMulIntegerToFloat) and, for end-to-end graphs, the word-embedding table in int8
  (``Gather(int8) → DequantizeLinear``). docs/int8.md.
* :func:`check_qdq` — verifies the above on any graph (every DequantizeLinear reads int8 with
  an int8 zero point equal to 0, per-channel axes are output channels, standard domain only).
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np

from ..errors import CPSLError
from .qdq_graph import (_axis, _const_values, _int8_gather, dedicate_qdq, dequantize_before_gather,  # noqa: F401
                        gather_scale, prune_dead, quantize_gathers)

CALIB_METHODS = ("minmax", "percentile", "entropy")
KEEP_FP32_DEFAULT = ("LayerNormalization", "Softmax", "ReduceSum", "ReduceMean")
FP16_MAX = 65504.0


# ---------------------------------------------------------------------------- fp16
def _keep_in_fp32(m, keep_fp32) -> None:
    """Run the ops of ``keep_fp32`` in float32 between Casts (in place)."""
    import onnx
    from onnx import TensorProto, helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    g = m.graph
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    out_nodes = []
    for n in g.node:
        if n.op_type not in keep_fp32:
            out_nodes.append(n)
            continue
        for k, x in enumerate(n.input):
            if x and types.get(x) == HALF:
                up = f"{x}__fp32_for_{n.name}"
                out_nodes.append(helper.make_node("Cast", [x], [up], name=f"{up}__cast", to=FLOAT))
                n.input[k] = up
        casts = []
        for k, y in enumerate(n.output):
            if y and types.get(y) == HALF:
                y32 = f"{y}__fp32"
                n.output[k] = y32
                casts.append(helper.make_node("Cast", [y32], [y], name=f"{y}__cast_fp16", to=HALF))
        out_nodes.append(n)
        out_nodes.extend(casts)
    del g.node[:]
    g.node.extend(out_nodes)


def _rename(g, old: str, new: str, outputs: bool) -> None:
    """Rename the tensor ``old`` in every node's inputs (and outputs when ``outputs``)."""
    for n in g.node:
        for names in ((n.input, n.output) if outputs else (n.input,)):
            for k, x in enumerate(names):
                if x == old:
                    names[k] = new


def to_fp16(model, keep_fp32=KEEP_FP32_DEFAULT):
    """Return a float16 copy of ``model`` (an ``onnx.ModelProto``) with float32 graph I/O."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    m = copy.deepcopy(model)
    g = m.graph
    for n in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise CPSLError(f"to_fp16: node {n.name} ({n.op_type}) has a subgraph; not supported")

    def half_tensor(t):
        arr = numpy_helper.to_array(t).astype(np.float32)
        arr = np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)
        return numpy_helper.from_array(arr, t.name)

    # 1. initializers and constants
    for i, t in enumerate(g.initializer):
        if t.data_type == FLOAT:
            g.initializer[i].CopyFrom(half_tensor(t))
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT:
                a.t.CopyFrom(half_tensor(a.t))
            if n.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
                a.i = HALF
    # 2. float inputs: cast to fp16 once, rewire consumers
    inits = {t.name for t in g.initializer}
    new_nodes = []
    for v in g.input:
        if v.name in inits or v.type.tensor_type.elem_type != FLOAT:
            continue
        h = f"{v.name}__fp16"
        _rename(g, v.name, h, outputs=False)
        for o in g.output:
            if o.name == v.name:
                raise CPSLError(f"to_fp16: graph input {v.name} is also an output")
        new_nodes.append(helper.make_node("Cast", [v.name], [h], name=f"{v.name}__to_fp16", to=HALF))
    # 3. float outputs: produce fp16 internally, cast back
    tail = []
    for o in g.output:
        if o.type.tensor_type.elem_type != FLOAT:
            continue
        h = f"{o.name}__fp16"
        _rename(g, o.name, h, outputs=True)
        tail.append(helper.make_node("Cast", [h], [o.name], name=f"{o.name}__to_fp32", to=FLOAT))
    nodes = new_nodes + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    # 4. ops kept in float32: cast their fp16 inputs up and their outputs back down
    if keep_fp32:
        _keep_in_fp32(m, keep_fp32)
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    onnx.checker.check_model(m, full_check=True)
    return m


# ---------------------------------------------------------------------------- int8
class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of feed dicts.

    ``set_range`` lets quantize_static's ``CalibStridedMinMax`` hand the calibrator one batch
    at a time (for every method, despite the option's name): the histogram calibrators stack
    the outputs of one ``collect_data`` call into one array and fail on batches of different
    lengths, but merge histograms across calls."""

    def __init__(self, feeds: list[dict]):
        self.feeds = list(feeds)
        self.start, self.end = 0, len(self.feeds)
        self.i = 0

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.feeds))
        self.i = self.start

    def get_next(self):
        if self.i >= self.end:
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = self.start


def activation_matmuls(model) -> list[str]:
    """Names of MatMul nodes whose inputs are both activations (attention QKᵀ and AV)."""
    inits = {t.name for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and not any(x in inits or x in consts for x in n.input)]


def small_weight_nodes(model, op_types, min_elems: int) -> list[str]:
    """Names of ``op_types`` nodes whose largest initializer input has fewer than ``min_elems`` elements."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in op_types and max([sizes.get(x, 0) for x in n.input] or [0]) < min_elems]


def quantize_int8(fp32_model, out_path: str | Path, calib_feeds: list[dict], method: str = "percentile",
                  percentile: float = 99.999, quantize_attention: bool = False,
                  op_types=("MatMul", "Gemm", "Conv"), per_channel: bool = True, min_weight_elems: int = 0,
                  dedicated_pairs: bool = True, gather_min_elems: int = 0,
                  gather_percentile: float = 100.0, nodes_to_exclude=()) -> dict:
    """Write an explicit-Q/DQ int8 copy of ``fp32_model`` (path or ModelProto) to ``out_path``.

    ``min_weight_elems`` leaves ops with smaller weights in float (end-to-end graphs: only the text
    encoder's Linear layers are worth their Q/DQ pairs). ``dedicated_pairs`` gives every quantized
    consumer of an activation its own QuantizeLinear → DequantizeLinear pair: ONNX Runtime fuses a
    DQ → MatMul ← DQ group into MatMulIntegerToFloat only when each DQ feeds that MatMul alone, and
    without it the shared DQ of a LayerNorm output also fed the residual Add (which then read the
    fake-quantized tensor). ``per_channel`` gives per-output-channel weight scales.
    ``gather_min_elems`` > 0 also stores every float table of at least that many elements read only by
    Gather (the word embeddings) in int8: :func:`quantize_gathers`, scale from ``gather_percentile``.
    ``nodes_to_exclude``: more node names to leave in float.

    Returns a description (method, number of calibration batches, counts of Q/DQ nodes and of
    quantized ops) for the manifest. The result is checked with :func:`check_qdq`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIB_METHODS:
        raise CPSLError(f"unknown calibration method {method!r} (choose from: {', '.join(CALIB_METHODS)})")
    if not calib_feeds:
        raise CPSLError("int8 quantization needs at least one calibration batch")
    proto = onnx.load(str(fp32_model)) if isinstance(fp32_model, (str, Path)) else fp32_model
    # explicit value_info lets the quantizer know every tensor's type
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    exclude = [] if quantize_attention else activation_matmuls(proto)
    if min_weight_elems:
        exclude += [n for n in small_weight_nodes(proto, op_types, int(min_weight_elems)) if n not in exclude]
    exclude += [n for n in nodes_to_exclude if n not in exclude]
    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    extra = {
        "ActivationSymmetric": True, "WeightSymmetric": True,          # zero points 0
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},             # (K, N) weight: output channels
        "OpTypesToExcludeOutputQuantization": list(op_types),          # quantize op inputs only
        "QuantizeBias": False,                                         # TensorRT: no int32 bias DQ
        "DedicatedQDQPair": bool(dedicated_pairs),
        "CalibTensorRangeSymmetric": True,
        "CalibStridedMinMax": 1,                                       # one batch per collect (see _Reader)
    }
    if method == "percentile":
        extra["CalibPercentile"] = float(percentile)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        src = Path(td) / "fp32.onnx"
        onnx.save(proto, str(src))
        quantize_static(str(src), str(out_path), _Reader(calib_feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(op_types), per_channel=bool(per_channel), reduce_range=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude, calibrate_method=cm, extra_options=extra)
    q = onnx.load(str(out_path))
    pairs = dedicate_qdq(q, op_types) if dedicated_pairs else None
    gathers = quantize_gathers(q, int(gather_min_elems), gather_percentile) if gather_min_elems else []
    if pairs or gathers:
        onnx.save(q, str(out_path))
    onnx.checker.check_model(q, full_check=True)
    info = check_qdq(q)
    info.update({"calibration": method, "calib_batches": len(calib_feeds),
                 "calib_samples": int(sum(next(iter(f.values())).shape[0] for f in calib_feeds)),
                 "percentile": float(percentile) if method == "percentile" else None,
                 "quantize_attention": bool(quantize_attention), "excluded_nodes": exclude,
                 "weights": f"int8 symmetric per {'output channel' if per_channel else 'tensor'}",
                 "activations": "int8 symmetric per tensor", "ops": list(op_types),
                 "min_weight_elems": int(min_weight_elems), "dedicated_pairs": pairs,
                 "gathers": gathers})
    return info


def _check_channel_axis(dq, weight: np.ndarray, scale, consumers) -> None:
    """A per-channel weight scale must run along the output channels of every consumer."""
    if scale is None or scale.size <= 1:
        return
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % weight.ndim
    for c in consumers:
        want = None
        if c.op_type == "MatMul":
            want = weight.ndim - 1
        elif c.op_type == "Conv":
            want = 0
        elif c.op_type == "Gemm":
            want = 0 if next((a.i for a in c.attribute if a.name == "transB"), 0) else 1
        if want is not None and axis != want:
            raise CPSLError(f"DequantizeLinear {dq.name}: per-channel axis {axis} is not the "
                            f"output-channel axis {want} of {c.op_type} {c.name}")


def check_qdq(model) -> dict:
    """Verify the Q/DQ form TensorRT consumes; raise ``CPSLError`` naming the first offender.

    Every DequantizeLinear must read an int8 tensor (an int8 initializer, the output of a
    QuantizeLinear whose zero point is int8, or the rows a Gather takes from an int8 initializer, with
    one per-tensor scale: :func:`quantize_gathers`) with an explicit int8 zero point that is all 0;
    every QuantizeLinear likewise; activation scales are scalars; per-channel weight scales
    run along the output-channel axis of the consuming MatMul (1), Gemm (0 when transB) or
    Conv (0). Returns counts for the manifest."""
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    g = model.graph
    vals = _const_values(model)
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    bad = non_standard_ops(model)
    if bad:
        raise CPSLError(f"quantized graph has non-standard ops: {', '.join(bad)}")

    def zp_ok(node) -> bool:
        if len(node.input) < 3 or not node.input[2]:
            return False          # a missing zero point means uint8 0
        zp = vals.get(node.input[2])
        return zp is not None and zp.dtype == np.int8 and not np.any(zp)

    n_q = n_dq = n_w = n_a = n_g = 0
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            n_q += 1
            if not zp_ok(n):
                raise CPSLError(f"QuantizeLinear {n.name}: zero point is not an int8 0")
            sc = vals.get(n.input[1])
            if sc is None or sc.size != 1:
                raise CPSLError(f"QuantizeLinear {n.name}: activation scale must be one constant (per tensor)")
        if n.op_type != "DequantizeLinear":
            continue
        n_dq += 1
        if not zp_ok(n):
            raise CPSLError(f"DequantizeLinear {n.name}: zero point is not an int8 0")
        x = n.input[0]
        if x in vals:                                  # a quantized weight
            if vals[x].dtype != np.int8:
                raise CPSLError(f"DequantizeLinear {n.name}: weight {x} is {vals[x].dtype}, not int8")
            n_w += 1
            _check_channel_axis(n, vals[x], vals.get(n.input[1]), consumers.get(n.output[0], []))
        elif _int8_gather(producers.get(x), vals):      # rows of an int8 table (quantize_gathers)
            sc = vals.get(n.input[1])
            if sc is None or sc.size != 1:
                raise CPSLError(f"DequantizeLinear {n.name}: the scale of gathered int8 rows must be one constant")
            n_g += 1
        else:                                          # an activation
            p = producers.get(x)
            if p is None or p.op_type != "QuantizeLinear":
                raise CPSLError(f"DequantizeLinear {n.name}: input {x} is not produced by a QuantizeLinear "
                                "(nor by a Gather of an int8 initializer)")
            n_a += 1
    # normalisations and activations must stay float: no QuantizeLinear may feed them directly
    float_ops = {"LayerNormalization", "Softmax", "Erf", "Gelu", "Tanh", "Sigmoid"}
    for n in g.node:
        if n.op_type in float_ops and any(getattr(producers.get(x), "op_type", "") == "QuantizeLinear"
                                          for x in n.input):
            raise CPSLError(f"{n.op_type} {n.name} reads a quantized (int8) tensor; it must stay in float")
    quantized = {}
    for n in g.node:
        if n.op_type in ("MatMul", "Gemm", "Conv"):
            ins = [producers.get(x) for x in n.input[:2]]
            q = all(p is not None and p.op_type == "DequantizeLinear" for p in ins)
            quantized.setdefault(n.op_type, [0, 0])
            quantized[n.op_type][0 if q else 1] += 1
    return {"quantize_linear": n_q, "dequantize_linear": n_dq, "int8_weights": n_w, "int8_activations": n_a,
            "int8_gathers": n_g,
            "quantized_ops": {k: v[0] for k, v in quantized.items()},
            "float_ops": {k: v[1] for k, v in quantized.items()}}


def non_standard_ops(proto) -> list[str]:
    """Nodes outside the default ONNX domain (TensorRT's ONNX parser would reject them)."""
    return sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
