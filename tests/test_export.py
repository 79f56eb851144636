"""ONNX export, fp16/int8 conversion, manifest/golden/engine-script artefacts and `cpsl export` errors."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from cpsl.checkpoint import load_model, save_checkpoint  # noqa: E402
from cpsl.cli import main  # noqa: E402
from cpsl.compress.quantize import check_qdq, quantize_int8, to_fp16  # noqa: E402
from cpsl.config import preset  # noqa: E402
from cpsl.data import SynthSpec, generate  # noqa: E402
from cpsl.data.batch import iterate, make_batch  # noqa: E402
from cpsl.data.mmsa import save_mmsa  # noqa: E402
from cpsl.deploy import onnx as ox  # noqa: E402
from cpsl.errors import CPSLError  # noqa: E402
from cpsl.model import CPSLModel  # noqa: E402
from cpsl.train import run  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data():
    return generate(SynthSpec(n_train=64, n_valid=32, n_test=16, seed=3))


@pytest.fixture(scope="module")
def model(data):
    torch.manual_seed(0)
    m = CPSLModel(data.dims, preset("student").model)
    # non-trivial BatchNorm statistics, as after training
    with torch.no_grad():
        for enc in m.encoders.values():
            enc.norm.running_mean.normal_(0, 0.3)
            enc.norm.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def fp32(model, data, tmp_path_factory):
    p = tmp_path_factory.mktemp("fp32") / "m.onnx"
    example = make_batch(data["train"], np.arange(2), model.modalities)
    proto = ox.export_onnx(model, p, example)
    return p, proto, example


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A student trained for a few epochs on small synthetic data (for accuracy retention)."""
    d = generate(SynthSpec(n_train=320, n_valid=160, n_test=16, seed=1))
    root = tmp_path_factory.mktemp("trained")
    pkl = root / "d.pkl"
    save_mmsa(d, pkl)
    cfg = preset("student")
    cfg.train.epochs, cfg.train.seeds, cfg.train.progress, cfg.train.num_threads = 6, [1], False, 1
    cfg.data.path = str(pkl)
    d.path = str(pkl)
    run(cfg, d, root / "run", log=lambda *a: None)
    return root / "run" / "seed1" / "best.pt", pkl, d


def feeds_of(b, mods):
    return ox.batch_feeds(b, mods)


# ---------------------------------------------------------------------------- fp32 graph
def test_graph_interface_and_opset(fp32, model, data):
    p, proto, _ = fp32
    onnx.checker.check_model(str(p), full_check=True)
    assert ox.opset_of(proto) <= 20
    io = ox.graph_io(proto)
    names = [i["name"] for i in io["inputs"]]
    assert names == ["text", "text_mask", "audio", "audio_mask", "vision", "vision_mask"]
    for i in io["inputs"]:
        assert i["dtype"] == "float32"
        m = i["name"].removesuffix("_mask")
        assert i["shape"][:2] == ["batch", f"{m}_len"]
        if not i["name"].endswith("_mask"):
            assert i["shape"][2] == data.dims[m]
    assert io["outputs"][0]["name"] == "sentiment" and io["outputs"][0]["shape"] == ["batch"]


def test_fp32_parity_batch_1_and_7_other_lengths(fp32, model, data):
    p, _, example = fp32
    sess = ox.ort_session(p)
    mods = model.modalities
    valid = data["valid"]
    for rows in (np.array([5]), np.arange(9, 16)):
        b = make_batch(valid, rows, mods)
        # lengths differ from the trace's example: the axes really are dynamic
        assert any(b.x[m].shape[1] != example.x[m].shape[1] for m in mods)
        out = sess.run(["sentiment"], feeds_of(b, mods))[0]
        with torch.no_grad():
            ref = model.predict(b.x, b.mask).numpy()
        assert out.shape == (len(rows),)
        assert np.abs(out - ref).max() <= 1e-4
    # the whole split, batched like the trainer
    err = np.abs(ox.ort_predict(sess, valid, mods, 8) - ox.torch_predict(model, valid, 8)).max()
    assert err <= 1e-4


def test_length_one_and_padding_invariance(fp32, model, data):
    """L_m = 1 works, and extra padding (mask 0) leaves the ONNX output unchanged."""
    p, _, _ = fp32
    sess = ox.ort_session(p)
    mods = model.modalities
    b = make_batch(data["valid"], np.arange(4), mods)
    f = feeds_of(b, mods)
    one = {k: (v[:, :1] if v.ndim >= 2 else v) for k, v in f.items()}
    for m in mods:
        one[f"{m}_mask"][:] = 1.0
    out1 = sess.run(["sentiment"], one)[0]
    with torch.no_grad():
        ref1 = model.predict({m: torch.from_numpy(one[m]) for m in mods},
                             {m: torch.from_numpy(one[f"{m}_mask"] > 0.5) for m in mods}).numpy()
    assert np.abs(out1 - ref1).max() <= 1e-4
    padded = {}
    for k, v in f.items():
        pad = [(0, 0)] * v.ndim
        pad[1] = (0, 5)
        padded[k] = np.pad(v, pad)
    base = sess.run(["sentiment"], f)[0]
    assert np.abs(sess.run(["sentiment"], padded)[0] - base).max() <= 1e-5


def test_export_rejects_opset_above_20(model, data, tmp_path):
    ex = make_batch(data["train"], np.arange(2), model.modalities)
    with pytest.raises(CPSLError, match="opset"):
        ox.export_onnx(model, tmp_path / "x.onnx", ex, opset=21)


# ---------------------------------------------------------------------------- fp16
def test_fp16_graph_runs_with_float32_io(fp32, model, data):
    p, proto, _ = fp32
    h = to_fp16(proto)
    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert all(i.type.tensor_type.elem_type == FLOAT for i in h.graph.input)
    assert all(o.type.tensor_type.elem_type == FLOAT for o in h.graph.output)
    assert not [t.name for t in h.graph.initializer if t.data_type == FLOAT]
    assert sum(t.data_type == HALF for t in h.graph.initializer) >= 20
    types = {v.name: v.type.tensor_type.elem_type for v in h.graph.value_info}
    ln = [n for n in h.graph.node if n.op_type == "LayerNormalization"]
    assert ln and all(types.get(n.input[0]) == FLOAT for n in ln)      # kept in float32
    mm = [n for n in h.graph.node if n.op_type == "MatMul"]
    assert mm and all(types.get(n.output[0]) == HALF for n in mm)      # the heavy ops are half
    s16 = ox.ort_session(h.SerializeToString())
    s32 = ox.ort_session(p)
    b = make_batch(data["valid"], np.arange(7), model.modalities)
    f = feeds_of(b, model.modalities)
    o16, o32 = s16.run(["sentiment"], f)[0], s32.run(["sentiment"], f)[0]
    assert o16.dtype == np.float32
    err = np.abs(o16 - o32).max()
    assert 0 < err < 1e-2          # it really is computed in half precision, and close


# ---------------------------------------------------------------------------- int8
@pytest.fixture(scope="module")
def int8(fp32, model, data, tmp_path_factory):
    p, _, _ = fp32
    q = tmp_path_factory.mktemp("int8") / "q.onnx"
    calib = [feeds_of(b, model.modalities) for b in iterate(data["train"], 16, modalities=model.modalities)]
    info = quantize_int8(p, q, calib, method="percentile")
    return q, info


def _vals(m):
    v = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            v[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    return v


def test_int8_every_dequantize_reads_int8_with_zero_point_0(int8):
    q, info = int8
    m = onnx.load(str(q))
    assert ox.opset_of(m) <= 20
    assert not ox.non_standard_ops(m)
    vals = _vals(m)
    prod = {o: n for n in m.graph.node for o in n.output}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) > 50
    for n in dqs:
        assert len(n.input) == 3, f"{n.name} has no explicit zero point (would default to uint8)"
        zp = vals[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
        x = n.input[0]
        if x in vals:
            assert vals[x].dtype == np.int8
        else:
            qn = prod[x]
            assert qn.op_type == "QuantizeLinear"
            assert vals[qn.input[2]].dtype == np.int8 and not vals[qn.input[2]].any()
            assert vals[qn.input[1]].size == 1                      # per-tensor activation scale
    # every MatMul/Gemm/Conv reads dequantized int8 on both inputs; per-channel weight axes
    # QKᵀ and AV stay float by default (--quantize-attention): exactly the recorded exclusions,
    # two per attention block (self-attention layers + cross-modal pairs of the student)
    float_attention = set(info["excluded_nodes"])
    float_mm = {n.name for n in m.graph.node if n.op_type == "MatMul"
                and not all(prod.get(x) is not None and prod[x].op_type == "DequantizeLinear" for x in n.input[:2])}
    assert float_mm == float_attention and len(float_attention) % 2 == 0 and float_attention
    for n in m.graph.node:
        if n.name in float_attention:   # both inputs are activations, never weights
            assert not any(x in vals for x in n.input)
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Gemm", "Conv") and n.name not in float_attention:
            ps = [prod.get(x) for x in n.input[:2]]
            assert all(p is not None and p.op_type == "DequantizeLinear" for p in ps), n.name
            w = ps[1]
            if w.input[0] in vals:
                scale = vals[w.input[1]]
                axis = next((a.i for a in w.attribute if a.name == "axis"), 1)
                wt = vals[w.input[0]]
                if n.op_type == "MatMul":
                    assert axis == 1 and scale.size == wt.shape[1]
                elif n.op_type == "Conv":
                    assert axis == 0 and scale.size == wt.shape[0]
                else:
                    assert scale.size == wt.shape[0 if any(a.name == "transB" and a.i for a in n.attribute) else 1]
        if n.op_type in ("LayerNormalization", "Softmax", "Erf"):
            assert all(getattr(prod.get(x), "op_type", "") != "QuantizeLinear" for x in n.input)
    assert info["int8_weights"] >= 20 and info["quantized_ops"]["MatMul"] >= 10


def test_check_qdq_rejects_uint8_zero_point(int8):
    q, _ = int8
    m = onnx.load(str(q))
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized"))
    zname = dq.input[2]
    for i, t in enumerate(m.graph.initializer):
        if t.name == zname:
            arr = onnx.numpy_helper.to_array(t).astype(np.uint8)
            m.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(arr, zname))
            break
    with pytest.raises(CPSLError, match="zero point"):
        check_qdq(m)


def test_int8_keeps_accuracy_of_trained_model(trained, tmp_path):
    ckpt, pkl, d = trained
    r = CliRunner().invoke(main, ["export", "--ckpt", str(ckpt), "--onnx", str(tmp_path / "s8.onnx"),
                                  "--precision", "int8", "--data", str(pkl), "--quiet"])
    assert r.exit_code == 0, r.output
    model, _, _ = load_model(ckpt)
    valid = d["valid"]
    y = valid.labels
    from cpsl.metrics import mmsa_metrics
    ref = mmsa_metrics(ox.torch_predict(model, valid), y)
    q = mmsa_metrics(ox.ort_predict(ox.ort_session(tmp_path / "s8.onnx"), valid, model.modalities), y)
    assert ref["Non0_acc_2"] > 0.6, "the fixture model did not learn; the retention test would be vacuous"
    assert q["Non0_acc_2"] >= 0.97 * ref["Non0_acc_2"]
    assert q["MAE"] <= 1.05 * ref["MAE"]
    man = json.loads((tmp_path / "s8.manifest.json").read_text())
    assert man["metrics"]["valid_onnxruntime"]["MAE"] == pytest.approx(q["MAE"], rel=1e-6)
    assert man["quantization"]["calibration"] == "percentile"


# ---------------------------------------------------------------------------- CLI artefacts
def test_cli_export_writes_manifest_golden_and_engine_script(trained, tmp_path):
    from cpsl.deploy.tensorrt import tensorrt_available
    if tensorrt_available()[0] is not None:
        pytest.skip("TensorRT is installed here: --trt builds an engine instead")
    ckpt, pkl, d = trained
    out = tmp_path / "fp16.onnx"
    r = CliRunner().invoke(main, ["export", "--ckpt", str(ckpt), "--onnx", str(out), "--precision", "fp16",
                                  "--data", str(pkl), "--trt", "--max-batch", "16", "--opt-len", "max"])
    assert r.exit_code == 0, r.output
    assert "TensorRT is absent" in r.output
    man = json.loads((tmp_path / "fp16.manifest.json").read_text())
    assert man["precision"] == "fp16" and man["opset"] <= 20
    assert [i["name"] for i in man["inputs"]] == ["text", "text_mask", "audio", "audio_mask", "vision", "vision_mask"]
    assert man["inputs"][1]["dtype"] == "float32" and man["inputs"][1]["dynamic_axes"] == {"0": "batch", "1": "text_len"}
    assert man["output"]["name"] == "sentiment"
    assert "BatchNorm statistics are inside the graph" in man["preprocessing"]
    assert man["parity"]["fp32_onnxruntime_vs_pytorch"]["max_abs"] <= 1e-4
    for name, f in man["files"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == f["sha256"]
        assert (tmp_path / name).stat().st_size == f["bytes"]
    g = np.load(tmp_path / "fp16.golden.npz")
    meta = json.loads(str(g["meta"]))
    sizes = [g[f"batch{i}_text"].shape[0] for i in range(meta["n_batches"])]
    assert 1 in sizes and 7 in sizes
    assert len({g[f"batch{i}_audio"].shape[1] for i in range(meta["n_batches"])}) > 1
    # the engine script: precision flag and the profile from the data
    sh = (tmp_path / "fp16.build_engine.sh").read_text()
    assert "--fp16" in sh and "--int8" not in sh and "--saveEngine=fp16.plan" in sh
    mx = {m: max(int(s.lengths[m].max()) for s in d.splits.values()) for m in d.modalities}
    assert f"--minShapes=text:1x1x{d.dims['text']},text_mask:1x1,audio:1x1x{d.dims['audio']}" in sh
    assert f"--optShapes=text:1x{mx['text']}x{d.dims['text']},text_mask:1x{mx['text']}" in sh
    assert (f"--maxShapes=text:16x{mx['text']}x{d.dims['text']},text_mask:16x{mx['text']},"
            f"audio:16x{mx['audio']}x{d.dims['audio']},audio_mask:16x{mx['audio']},"
            f"vision:16x{mx['vision']}x{d.dims['vision']},vision_mask:16x{mx['vision']}") in sh
    assert man["engine"]["built"] is False


def test_engine_script_int8_flags(trained, tmp_path):
    from cpsl.deploy.tensorrt import shape_profile, write_build_script
    _, _, d = trained
    prof = shape_profile(d, d.modalities, d.dims)
    cmd = write_build_script(tmp_path / "b.sh", "m.onnx", "m.plan", prof, "int8")
    assert "--int8 --fp16" in cmd and "--memPoolSize=workspace:1024" in cmd
    p95 = int(np.ceil(np.percentile(d["train"].lengths["audio"], 95)))
    assert prof["audio"]["opt"] == [1, p95, d.dims["audio"]] and prof["audio"]["max"][0] == 64
    assert "--noTF32" in write_build_script(tmp_path / "c.sh", "m.onnx", "m.plan", prof, "fp32")


# ---------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny_ckpt(model, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    cfg = preset("student")
    save_checkpoint(root / "best.pt", model, None, cfg, 0, {"data_path": str(root / "d.pkl")})
    save_mmsa(data, root / "d.pkl")
    other = generate(SynthSpec(n_train=8, n_valid=8, n_test=8, d_text=32))
    save_mmsa(other, root / "other.pkl")
    return root


@pytest.mark.parametrize("args, msg", [
    (["--precision", "int4"], "Invalid value for '--precision'"),
    (["--data", "{root}/other.pkl"], "text features of size"),
    (["--calib-data", "{root}/other.pkl", "--precision", "int8"], "text features of size"),
    (["--data", "{root}/missing.pkl"], "error:"),
    (["--opset", "21"], "opset"),
])
def test_cli_export_bad_input_exit_2(tiny_ckpt, tmp_path, args, msg):
    args = [a.replace("{root}", str(tiny_ckpt)) for a in args]
    r = CliRunner().invoke(main, ["export", "--ckpt", str(tiny_ckpt / "best.pt"), "--out", str(tmp_path / "m")] + args)
    assert r.exit_code == 2, r.output
    assert msg in r.output
    assert "Traceback" not in r.output


def test_cli_export_unreadable_checkpoint_exit_2(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for ck in (bad, tmp_path / "missing.pt"):
        r = CliRunner().invoke(main, ["export", "--ckpt", str(ck), "--out", str(tmp_path / "m")])
        assert r.exit_code == 2 and r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["export", "--ckpt", str(bad), "--onnx", str(tmp_path / "m.txt")])
    assert r.exit_code == 2 and ".onnx" in r.output


def test_cli_export_unreadable_data_exit_2(tiny_ckpt, tmp_path):
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"\x80\x04garbage")
    r = CliRunner().invoke(main, ["export", "--ckpt", str(tiny_ckpt / "best.pt"), "--out", str(tmp_path / "m"),
                                  "--data", str(junk)])
    assert r.exit_code == 2, r.output
    assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1
