"""`outlierfree quantize`: a full run on a saved tiny model, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
import torch

from outlierfree.models.build import build_model
from outlierfree.models.io import save_model


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from toy import paragraphs, save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("q"), "clipped", paragraphs(400, tail=True))


def run(*args):
    p = subprocess.run([sys.executable, "-m", "outlierfree.cli", *args], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(__import__("pathlib")
                                                                                   .Path.home())})
    return p.returncode, p.stdout, p.stderr


def test_quantize_writes_json_markdown_and_plot(tiny_bert):
    out = tiny_bert / "quant"
    rc, so, se = run("quantize", str(tiny_bert / "model"), "--data", str(tiny_bert / "text.txt"), "--bits",
                     "w8a8,w16a16", "--sites", "full,linear", "--calib-batches", "2", "--eval-batches", "2",
                     "--batch-size", "4", "--seq-len", "32", "--diag-batches", "1", "--ablation", "--quiet",
                     "--out", str(out))
    assert rc == 0, se
    rep = json.loads((out / "quant.json").read_text())
    assert len(rep["runs"]) == 4 and rep["task"] == "mlm"
    for r in rep["runs"]:
        assert r["config"]["describe"] and r["calib_batches"] == 2 and r["eval_batches"] == 2
        assert r["float"]["perplexity"] > 1 and r["quantized"]["perplexity"] > 1
        assert r["ablation"] and r["sites"]
    by = {(r["config"]["weight"]["bits"], r["config"]["sites"]): r for r in rep["runs"]}
    assert by[(16, "full")]["quantized"]["output_sqnr_db"] > by[(8, "full")]["quantized"]["output_sqnr_db"]
    assert "| config |" in (out / "quant.md").read_text()
    assert (out / "sites.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("flags, words", [
    (["--bits", "w0a8"], "outside 2..16"),
    (["--bits", "w8"], "malformed --bits"),
    (["--bits", "w8a17"], "outside 2..16"),
    (["--estimator", "magic"], "unknown --estimator"),
    (["--sites", "everything"], "unknown --sites"),
    (["--calib-batches", "100000"], "too few for 100000 calibration batches"),  # a whole text: no split
    (["--transform", "smoothquant:1.5"], "alpha"),
    (["--transform", "rotate-everything"], "unknown transform"),
    (["--keep-16bit", "999", "--diag-batches", "1"], "more than the"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_bert, flags, words):
    out = tiny_bert / "bad"
    rc, so, se = run("quantize", str(tiny_bert / "model"), "--data", str(tiny_bert / "text.txt"), "--seq-len",
                     "32", "--eval-batches", "1", "--diag-batches", "0", "--quiet", "--out", str(out), *flags)
    assert rc == 2 and words in se
    assert se.strip().count("\n") == 0 and "Traceback" not in se and se.startswith("error: ")
    assert not out.exists()


def test_nan_weights_and_missing_model_are_one_line(tiny_bert, tmp_path):
    model = build_model("bert", "tiny", "vanilla", seed=0)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    save_model(model, tmp_path / "nan")
    for path in (tmp_path / "nan", tmp_path / "missing"):
        rc, so, se = run("quantize", str(path), "--out", str(tmp_path / "o"), "--quiet")
        assert rc == 2 and se.strip().count("\n") == 0 and "Traceback" not in se
        assert not (tmp_path / "o").exists()
    assert "NaN" in run("quantize", str(tmp_path / "nan"), "--out", str(tmp_path / "o"))[2]


def test_transform_and_16bit_exceptions_end_to_end(tiny_bert):
    out = tiny_bert / "sq"
    rc, so, se = run("quantize", str(tiny_bert / "model"), "--data", str(tiny_bert / "text.txt"), "--calib-batches",
                     "2", "--eval-batches", "1", "--batch-size", "4", "--seq-len", "32", "--diag-batches", "1",
                     "--transform", "smoothquant:0.5", "--keep-16bit", "1", "--quiet", "--out", str(out))
    assert rc == 0, se
    rep = json.loads((out / "quant.json").read_text())
    t = rep["transforms"][0]
    assert t["transform"] == "smoothquant" and t["applied"] >= 2  # post-norm BERT: the value projections
    k = rep["runs"][0]["keep_16bit"]
    assert k["k"] == 1 and len(k["groups"]) == 1
    assert 0 < k["values_16bit_share"] < 1 and "16-bit exceptions" in (out / "quant.md").read_text()


def test_doctor_measures_every_fix_and_says_what_to_do(tiny_bert):
    out = tiny_bert / "doctor"
    rc, so, se = run("doctor", str(tiny_bert / "model"), "--data", str(tiny_bert / "text.txt"), "--calib-batches",
                     "2", "--eval-batches", "1", "--batch-size", "4", "--seq-len", "32", "--keep-16bit", "1",
                     "--quiet", "--out", str(out))
    assert rc == 0, se
    rep = json.loads((out / "doctor.json").read_text())
    labels = [c["label"] for c in rep["configs"]]
    assert labels[:4] == ["W8A8 paper", "W8A8 full", "per-channel weights", "per-token activations (dynamic)"]
    assert any(lab.startswith("SmoothQuant") for lab in labels) and labels[-1].startswith("stacked")
    assert all(c["quantized"].get("perplexity") for c in rep["configs"])
    assert rep["verdict"]["summary"] and rep["verdict"]["keep_in_16bit"] and (out / "doctor.png").stat().st_size
    assert rep["outliers"]["headline"]["max_inf_norm"] > 0 and "Took" in (out / "doctor.md").read_text()
    rc, so, se = run("doctor", str(tiny_bert / "model"), "--keep-16bit", "-1", "--out", str(tiny_bert / "d2"))
    assert rc == 2 and se.startswith("error: ") and not (tiny_bert / "d2").exists()


def test_quantize_checkpoint_library_entry_transforms_keep_float_and_report_like_the_cli(tiny_bert, tmp_path):
    """quantize_checkpoint (what the CLI calls with its request): SmoothQuant + rotation leave the float metric
    unchanged (exact transforms), the report records the transforms, and W16A16 stays within 1 % of float."""
    from outlierfree.quant import QuantConfig, QuantSpec, paper_w8a8
    from outlierfree.quant.run import QuantizeRequest, quantize_checkpoint

    kw = dict(data=str(tiny_bert / "text.txt"), calib_batches=2, eval_batches=2, batch_size=4, seq_len=32,
              diag_batches=0, progress=False)
    w16 = QuantConfig(weight=QuantSpec(16, True), activation=QuantSpec(16, False), sites="full")
    result = quantize_checkpoint(QuantizeRequest(tiny_bert / "model", [paper_w8a8(), w16], **kw))
    written = result.write(tmp_path / "q")
    plain = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert all(p.exists() for p in written) and plain["runs"][1]["quantized"] == pytest.approx(
        result.runs[1]["quantized"]) and plain["model"] == str(tiny_bert / "model")
    seen = []
    moved = quantize_checkpoint(QuantizeRequest(tiny_bert / "model", [paper_w8a8()],
                                                transforms=[("smoothquant", 0.5), ("rotate", 0)], **kw),
                                on_run=lambda cfg, r, info: seen.append((cfg.describe(), info["whole_text"])))
    moved = moved.to_dict()
    f0, f1 = plain["runs"][0]["float"]["perplexity"], moved["runs"][0]["float"]["perplexity"]
    assert abs(f1 - f0) <= 1e-5 * f0
    assert [t["transform"] for t in moved["transforms"]] == ["smoothquant", "rotate"]
    assert seen == [(paper_w8a8().describe(), True)] and plain["task"] == "mlm" and plain["data"]["whole_text"]
    r16 = plain["runs"][1]
    assert abs(r16["quantized"]["perplexity"] - r16["float"]["perplexity"]) <= 0.01 * r16["float"]["perplexity"]
    # the typed record other packages read: the same numbers, harm signed so that positive is worse
    from outlierfree.quant.evaluate import Measured

    m = Measured.of(plain["runs"][0])
    r = plain["runs"][0]
    assert (m.metric, m.float, m.quantized, m.int8_ort) == ("perplexity", r["float"]["perplexity"],
                                                             r["quantized"]["perplexity"], None)
    assert m.harm(higher_is_better=False) == r["quantized"]["perplexity"] - r["float"]["perplexity"]
    assert Measured.of(r, scale=100.0).float == pytest.approx(100 * m.float)


def test_reference_scores_against_another_checkpoints_float_on_the_same_batches(tiny_bert, tmp_path):
    """--reference: the model itself as reference reads exactly as its own float (float SQNR inf, the quantized
    SQNR unchanged); another checkpoint's float metric is the one quantize reports for that checkpoint alone on the
    same batches; the CLI prints and writes the comparison."""
    from outlierfree.models.io import load_model
    from outlierfree.quant import paper_w8a8
    from outlierfree.quant.run import QuantizeRequest, quantize_checkpoint

    kw = dict(data=str(tiny_bert / "text.txt"), calib_batches=2, eval_batches=2, batch_size=4, seq_len=32,
              diag_batches=0, progress=False)
    model = str(tiny_bert / "model")
    (self_ref,) = quantize_checkpoint(QuantizeRequest(model, [paper_w8a8()], reference=model, **kw)).runs
    ref = self_ref["reference"]
    assert ref["float"]["perplexity"] == self_ref["float"]["perplexity"]
    assert ref["float_vs_reference"]["output_sqnr_db"] == float("inf")
    assert ref["quantized_vs_reference"]["output_sqnr_db"] == pytest.approx(self_ref["quantized"]["output_sqnr_db"])
    other = load_model(model)  # the same architecture and vocabulary, other weights
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_model(other, tmp_path / "other")
    (alone,) = quantize_checkpoint(QuantizeRequest(str(tmp_path / "other"), [paper_w8a8()],
                                                   tokenizer=model, **kw)).runs
    (vs,) = quantize_checkpoint(QuantizeRequest(model, [paper_w8a8()], reference=str(tmp_path / "other"),
                                                **kw)).runs
    assert vs["reference"]["float"]["perplexity"] == pytest.approx(alone["float"]["perplexity"], rel=1e-9)
    assert vs["reference"]["float_vs_reference"]["output_sqnr_db"] < 60
    out = tmp_path / "q"
    rc, so, se = run("quantize", model, "--data", str(tiny_bert / "text.txt"), "--seq-len", "32", "--batch-size",
                     "4", "--calib-batches", "2", "--eval-batches", "2", "--diag-batches", "0", "--quiet",
                     "--reference", str(tmp_path / "other"), "--out", str(out))
    assert rc == 0, se
    assert "against the reference's float perplexity" in so and "Against the reference" in (
        out / "quant.md").read_text()


def test_reference_of_another_task_or_shape_or_missing_is_one_line(tiny_bert, tmp_path):
    vit = build_model("vit", "tiny", "vanilla", seed=0)
    save_model(vit, tmp_path / "vit")
    wide = build_model("bert", "tiny", "vanilla", seed=0, vocab_size=500)  # another vocabulary
    save_model(wide, tmp_path / "wide")
    for ref, words in ((tmp_path / "vit", "(task image)"), (tmp_path / "wide", "gives outputs of shape"),
                       (tmp_path / "missing", "does not exist")):
        rc, so, se = run("quantize", str(tiny_bert / "model"), "--data", str(tiny_bert / "text.txt"), "--seq-len",
                         "32", "--eval-batches", "1", "--diag-batches", "0", "--quiet", "--reference", str(ref),
                         "--out", str(tmp_path / "o"))
        assert rc == 2 and words in se, se
        assert se.strip().count("\n") == 0 and "Traceback" not in se and se.startswith("error: ")
        assert not (tmp_path / "o").exists()
