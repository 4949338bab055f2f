"""The shippable export directory: outlierfree.deploy.load runs it in both runtimes, without torch, and the export
refuses bad input with one line and nothing written."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from outlierfree.cli import main  # noqa: E402
from outlierfree.errors import OutlierfreeError  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")
TEXTS = ["the cat sat on a mat.", "a dog ran in the park while birds sang in the tall green trees and the cat sat."]
HAS_OV = __import__("importlib").util.find_spec("openvino") is not None
RUNTIME = "openvino" if HAS_OV else "onnxruntime"


@pytest.fixture(scope="module")
def exported(tiny_gated_bert):
    """``outlierfree export --runtime openvino`` (ONNX Runtime only where openvino is missing) of the tiny BERT."""
    root = tiny_gated_bert
    out = root / "shipped"
    main(["export", str(root / "model"), "--data", str(root / "text.txt"), "--calib-batches", "2",
          "--eval-batches", "2", "--batch-size", "4", "--seq-len", "32", "--quiet", "--threads", "1",
          "--runtime", RUNTIME, "--out", str(out)])
    return out


def test_directory_layout_and_record(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"model.onnx", "model_float.onnx", "config.json", "tokenizer.json", "ranges.json", "README.md",
            "export.json"} <= names
    if HAS_OV:
        assert {"openvino_model.xml", "openvino_model.bin"} <= names
    rep = json.loads((exported / "export.json").read_text())
    assert rep["deploy"]["inputs"] == ["input_ids", "attention_mask"] and rep["deploy"]["max_length"] == 32
    ranges = json.loads((exported / "ranges.json").read_text())
    assert len(ranges["activations"]) == rep["ranges"]["activation_sites"]
    for r in ranges["activations"].values():  # each grid is the simulator's: scale = (hi - min(lo, 0)) / 255
        assert r["scale"] == pytest.approx((r["hi"] - min(r["lo"], 0.0)) / (r["qmax"] - r["qmin"]), rel=1e-5)
    if HAS_OV:  # the simulator's metric within the ONNX Runtime tolerance in OpenVINO too
        s, o = rep["simulated"]["perplexity"], rep["openvino_int8"]["perplexity"]
        assert abs(o - s) / s < 0.01
        assert sum(rep["openvino"]["kernels"]["integer_ops"].values()) >= 4
    assert "outlierfree.deploy" in (exported / "README.md").read_text()


def test_load_matches_the_runtime_on_transformers_tokenization(exported):
    """deploy.load(DIR)(texts) is the exported graph run on what transformers' tokenizer makes of the texts."""
    from transformers import AutoTokenizer

    from outlierfree.deploy import load
    from outlierfree.export.ort import run, session

    tok = AutoTokenizer.from_pretrained(exported)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    ref = run(session(exported / "model.onnx", threads=1), dict(enc)).numpy()
    m = load(exported, runtime="onnxruntime", threads=1)
    got = m(TEXTS)
    assert got.shape == ref.shape and np.array_equal(got, ref)
    assert m(TEXTS[0]).shape[0] == 1
    if HAS_OV:  # the other runtime computes the same INT8 model: the same top token nearly everywhere
        ov = load(exported, runtime="openvino", threads=1)(TEXTS)
        real = enc["attention_mask"].numpy().astype(bool)
        assert (ov.argmax(-1) == ref.argmax(-1))[real].mean() > 0.9
        rel = np.abs(ov - ref)[real].max() / np.abs(ref[real]).max()
        assert rel < 0.1, rel


def test_load_without_torch(exported):
    """Importing outlierfree.deploy and running a model works with torch and transformers unimportable."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        sys.modules["transformers"] = None
        from outlierfree.deploy import load
        m = load({str(exported)!r}, threads=1)
        out = m({TEXTS!r})
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print(m.runtime, out.shape)
    """)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[0] == RUNTIME and "(2," in p.stdout


def test_image_model_bundle(tmp_path):
    """A ViT export: load(DIR) takes pixel arrays and returns what the runtime computes on them."""
    from outlierfree.export import bundle
    from outlierfree.export.ort import run, session
    from outlierfree.export.realint8 import real_int8
    from outlierfree.deploy import load
    from outlierfree.models.build import build_model
    from outlierfree.quant.config import paper_w8a8
    from outlierfree.quant.simulator import quantize

    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(4, 1, 28, 28, generator=g), "labels": torch.arange(4)} for _ in range(2)]
    model = build_model("vit", "tiny", "gated", seed=0).eval()
    with quantize(model, paper_w8a8(), "image") as qm:
        qm.calibrate(data[:1], progress=False)
        real = real_int8(qm, data[1:], "image", data[0], out_dir=tmp_path, threads=1, with_float=True)
        report = {"model": "vit", "model_class": "ViT", "command": "test", "commit": "x", "config": qm.config.to_dict(),
                  "metric": "top1", "ranges": {"source": "1 batch", "activation_sites": len(qm.act),
                                               "quantized_weights": len(qm.weights)}, "simulated": None}
        meta = bundle.finish(tmp_path, qm, model, None, "image", ["pixel_values"], None, "onnxruntime", report)
    (tmp_path / "export.json").write_text(json.dumps({"deploy": meta}))
    x = data[1]["pixel_values"].numpy()
    got = load(tmp_path, threads=1)(x)
    ref = run(session(tmp_path / "model.onnx", threads=1), data[1]).numpy()
    assert got.shape == (4, model.config.num_labels) and np.array_equal(got, ref)
    assert real["export"]["bytes"]["int8"] < real["export"]["bytes"]["float"]
    with pytest.raises(OutlierfreeError, match="pixel values"):
        load(tmp_path)(x[0])


def test_load_refuses_other_directories(tmp_path):
    with pytest.raises(OutlierfreeError, match="export.json"):
        from outlierfree.deploy import load

        load(tmp_path)


def test_export_refuses_missing_runtime(tiny_gated_bert, tmp_path, monkeypatch, capsys):
    """--runtime openvino without openvino: one line naming the fix, exit 2, no directory."""
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError, as when not installed
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny_gated_bert / "model"), "--runtime", "openvino", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "openvino" in err and "pip install" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not HAS_OV, reason="openvino not installed")
def test_openvino_refuses_a_broken_model(tmp_path):
    """A model OpenVINO cannot read: one-line OutlierfreeError, no IR left behind."""
    from outlierfree.export.openvino import compile_model, to_ir

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not an onnx graph")
    with pytest.raises(OutlierfreeError, match="OpenVINO cannot convert") as e:
        to_ir(bad, tmp_path / "bad.xml")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "bad.xml").exists()
    with pytest.raises(OutlierfreeError, match="OpenVINO cannot compile"):
        compile_model(bad)
