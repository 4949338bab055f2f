"""The simulator on BERT, OPT, ViT and Llama: W16A16 equals float, sites covered, planted outlier found."""

import pytest
import torch

from outlierfree.errors import OutlierfreeError
from outlierfree.models.build import build_model
from outlierfree.quant.config import QuantConfig, QuantSpec, linear_w8a8, paper_w8a8
from outlierfree.quant.evaluate import evaluate_quantized, model_output
from outlierfree.quant.simulator import quantize


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def model_and_batches(family, n=3):
    g = torch.Generator().manual_seed(1)
    if family == "llama":
        m = tiny_llama()
        return m, [dict(input_ids=torch.randint(3, 300, (2, 16), generator=g)) for _ in range(n)]
    m = build_model(family, "tiny", "vanilla", seed=0).eval()
    if family == "vit":
        return m, [dict(pixel_values=torch.randn(2, 1, 28, 28, generator=g)) for _ in range(n)]
    return m, [dict(input_ids=torch.randint(5, 8000, (2, 16), generator=g)) for _ in range(n)]


W16A16 = QuantConfig(weight=QuantSpec(16, True, "per_tensor", "current_minmax"),
                     activation=QuantSpec(16, False, "per_tensor", "minmax"), sites="full")


@pytest.mark.parametrize("family", ["bert", "opt", "vit", "llama"])
def test_w16a16_equals_float_and_remove_restores(family):
    m, batches = model_and_batches(family)
    params = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        ref = [m(**b).logits for b in batches]
    qm = quantize(m, W16A16)
    qm.calibrate(batches, progress=False)
    with torch.no_grad():
        out = [m(**b).logits for b in batches]
    for r, o in zip(ref, out):
        scale = float(r.abs().max())
        assert float((r - o).abs().max()) < 2e-3 * scale
        assert not torch.equal(r, o)  # something was quantized
    kinds = {qm.site_of[n].kind for n in qm.act}
    # every activation kind this architecture has is quantized somewhere (as a first site or an alias)
    assert {"residual", "ln_output", "attn_scores", "attn_probs", "context", "ffn_hidden"} <= kinds
    assert len(qm.weights) > 0
    qm.remove()
    with torch.no_grad():
        after = [m(**b).logits for b in batches]
    assert all(torch.equal(r, a) for r, a in zip(ref, after))
    assert all(torch.equal(p, params[n]) for n, p in m.named_parameters())


@pytest.mark.parametrize("family", ["bert", "opt"])
def test_w8a8_is_lossy_and_linear_quantizes_only_linear_inputs(family):
    m, batches = model_and_batches(family)
    with torch.no_grad():
        ref = m(**batches[0]).logits
    for cfg in (paper_w8a8(), linear_w8a8()):
        with quantize(m, cfg) as qm:
            qm.calibrate(batches, progress=False)
            with torch.no_grad():
                out = m(**batches[0]).logits
            kinds = {qm.site_of[n].kind for n in qm.act}
            if cfg.sites == "linear":
                assert kinds <= {"linear_input", "head_input"}
                linear_weights = {id(mod.weight) for mod in m.modules() if isinstance(mod, torch.nn.Linear)}
                assert {k[0] for k in qm.weights} == linear_weights  # Linear weights only (a tied LM head counts as Linear)
            sq = 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())
            assert 10 < float(sq) < 60


def test_fp32_head_keeps_the_tied_head_in_float():
    m, batches = model_and_batches("bert")
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight  # tied
    with quantize(m, paper_w8a8(fp32_head=True)) as qm:
        qm.calibrate(batches[:1], progress=False)
        names = {qz.name for _, _, qz in qm.weights.values()}
        assert any("word_embeddings" in n for n in names)  # the embedding lookup is quantized...
        assert not any(qm.site_of[n].kind == "head_input" for n in qm.act)
        seen = []
        orig = qm._weight_fn
        qm.observed.mode.weight_fn = lambda path, func, name, w: seen.append((path, func)) or orig(path, func, name, w)
        with torch.no_grad():
            m(**batches[0])
        assert ("cls.predictions.decoder", "linear") in seen
        w = m.cls.predictions.decoder.weight
        assert orig("cls.predictions.decoder", "linear", "bert.embeddings.word_embeddings.weight", w) is None  # ...not in the head
        assert "bert.embeddings.word_embeddings.weight" in qm.float_weights


def _output_sqnr(m, qm, batch):
    with torch.no_grad():
        with qm.float_mode():
            ref = m(**batch).logits
        out = m(**batch).logits
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_planted_outlier_in_one_residual_sum_ruins_w8a8_and_is_named():
    from outlierfree.quant.evaluate import ablation, evaluate_pair

    m, batches = model_and_batches("bert", n=4)
    target = "bert.encoder.layer.1.output.LayerNorm"
    ln = dict(m.named_modules())[target]

    def plant(module, args):
        x = args[0].clone()
        x[:, 0, 5] += 2000.0  # one token, one channel: what BERT's delimiter-token outliers look like
        return (x,)

    # the tiny model is untrained, so its perplexity says little: judge by the output SQNR against float
    with quantize(m, paper_w8a8()) as qm:
        qm.calibrate(batches[:2], progress=False)
        sq_clean = _output_sqnr(m, qm, batches[2])
    h = ln.register_forward_pre_hook(plant)  # registered before the quantizer's hook, so it runs first
    try:
        with quantize(m, paper_w8a8()) as qm:
            qm.calibrate(batches[:2], progress=False)
            with qm.recording():
                sq = _output_sqnr(m, qm, batches[2])
            widest = max(qm.sites_table(), key=lambda r: r["hi"] - r["lo"])
            g = torch.Generator().manual_seed(0)
            ev = [dict(b, labels=torch.where(torch.rand(b["input_ids"].shape, generator=g) < 0.3, b["input_ids"],
                                             -100)) for b in batches[2:]]
            rows = ablation(qm, ev, "mlm", evaluate_pair(qm, ev, "mlm", progress=False)["float"], progress=False)
    finally:
        h.remove()
    assert sq < sq_clean - 10  # the outlier ruins per-tensor W8A8
    assert widest["site"] == f"{target}:input"  # the per-site table names the planted site (widest range)
    by_sqnr = min(rows, key=lambda r: r["output_sqnr_db"])  # and the one-group-at-a-time ablation its group
    assert by_sqnr["group"] == "layer 1 / ln_input" and f"{target}:input" in by_sqnr["sites"]


def test_nan_weights_are_a_one_line_error():
    m, _ = model_and_batches("bert")
    with torch.no_grad():
        m.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    with pytest.raises(OutlierfreeError) as e:
        quantize(m, paper_w8a8())
    assert "NaN" in str(e.value) and "\n" not in str(e.value)


def test_dynamic_per_token_needs_no_calibration():
    m, batches = model_and_batches("opt")
    cfg = paper_w8a8().replace(activation=QuantSpec(8, False, "per_token", "current_minmax", static=False))
    with torch.no_grad():
        ref = m(**batches[0]).logits
    with quantize(m, cfg) as qm:
        assert qm.mode == "quantize"
        with torch.no_grad():
            out = m(**batches[0]).logits
        assert len(qm.act) > 10
    sq = 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())
    assert float(sq) > 20


def test_evaluate_quantized_api_reports_config_and_metrics():
    m, batches = model_and_batches("opt", n=3)
    r = evaluate_quantized(m, None, batches[:2], batches[2:], paper_w8a8(), progress=False)
    assert r["task"] == "clm" and r["config"]["sites"] == "paper" and r["calib_batches"] == 2
    assert r["float"]["perplexity"] > 1 and r["quantized"]["perplexity"] > 1
    assert r["config"]["activation"]["estimator"] == "running_minmax" and r["config"]["weight"]["symmetric"]
    x = model_output(m, batches[2], "clm")  # hooks are gone: plain float forward
    assert x.shape[-1] == m.config.vocab_size


def test_a_weight_read_through_its_transpose_property_is_quantized_like_a_linear_weight():
    """Falcon's FalconLinear computes ``x @ self.weight.T``: the matmul sees a transposed copy, not the parameter.
    Its weight must be quantized all the same, on the grid nn.Linear's gets: a model built of such layers gives,
    under W8A8, exactly the outputs of the same model with nn.Linear (and every weight matrix quantized)."""
    import torch.nn as nn

    class TransposedLinear(nn.Linear):  # FalconLinear's forward
        def forward(self, x):
            return x @ self.weight.T + self.bias

    class Net(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.a, self.b = linear(16, 32), linear(32, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    plain = Net(nn.Linear).eval()
    falcon = Net(TransposedLinear).eval()
    falcon.load_state_dict(plain.state_dict())
    xs = [torch.randn(4, 10, 16) for _ in range(3)]
    outs = []
    for m in (plain, falcon):
        with quantize(m, paper_w8a8(), "encoder") as qm:
            qm.calibrate(xs[:2], lambda mod, b: mod(b), progress=False)
            with torch.no_grad():
                outs.append(m(xs[2]))
            assert {qz.name for _, _, qz in qm.weights.values()} == {"a.weight", "b.weight"}
    # nn.Linear runs addmm, ``x @ W.T + b`` a matmul and an add: their float sums may differ in the last bit on some
    # CPUs and move a value across a rounding boundary, so the outputs agree to two steps of an 8-bit grid over
    # their range (the weights themselves are the same grid: the names above and the test's premise)
    step = float(outs[0].max() - outs[0].min()) / 255
    assert float((outs[1] - outs[0]).abs().max()) <= 2 * step
    assert float((outs[1] - outs[0]).abs().mean()) <= 0.01 * step
    with torch.no_grad():
        assert not torch.equal(outs[1], falcon(xs[2]))  # quantization did change the output
