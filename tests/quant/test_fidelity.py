"""The simulator as an instrument: invariants on twelve architectures, the paper's site set, rounding at most once,
and the calibration contract."""

import importlib.util
from pathlib import Path

import pytest
import torch

from outlierfree.errors import OutlierfreeError
from outlierfree.models.build import build_model
from outlierfree.quant import quantize
from outlierfree.quant.config import QuantSpec, full_w8a8, paper_w8a8
from outlierfree.quant.quantizer import Quantizer
from outlierfree.sites import observe

_spec = importlib.util.spec_from_file_location("archs", Path(__file__).parents[1] / "archs.py")
archs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(archs)


def _out(y):
    return y.logits if getattr(y, "logits", None) is not None else y[0]


def _sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref, y = ref.double(), y.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum()))


def _real(name, batch, t):
    mask = archs.real_token_mask(name, batch)
    return t[mask] if mask is not None and t.dim() == 3 and t.shape[:2] == mask.shape else t


@pytest.mark.parametrize("name", archs.ARCH_NAMES)
def test_invariants_on_every_architecture(name):
    """Observing changes nothing; W16A16 `full` is float to 40 dB on real tokens; W8A8 is finite; every attention
    module is instrumented; no mask or position bias is taken for a residual sum."""
    model = archs.build(name)
    batch = archs.batch(name, model)
    with torch.no_grad():
        stock = _out(model(**batch))  # transformers' own eager attention
        with observe(model, lambda s, t: None, residual=True, grids=True):
            observed = _out(model(**batch))
    torch.testing.assert_close(_real(name, batch, observed), _real(name, batch, stock), rtol=1e-4, atol=1e-4)

    for cfg, floor in ((full_w8a8(16, 16), 40.0), (paper_w8a8(), None)):
        with quantize(model, cfg) as qm:
            qm.calibrate([batch, archs.batch(name, model, seed=1)], progress=False)
            with torch.no_grad():
                y = _out(model(**batch))
                with qm.float_mode():
                    ref = _out(model(**batch))
            assert torch.isfinite(y).all(), (name, cfg.sites)
            assert qm.uninstrumented == [], qm.uninstrumented
            kinds = {qm.site_of[n].kind for n in qm.act}
            assert {"attn_scores", "attn_probs", "residual"} <= kinds, (name, kinds)
            for n, q in qm.act.items():
                assert -1e4 < float(q.lo) <= float(q.hi) < 1e4, (name, n, float(q.lo), float(q.hi))
            if floor is not None:
                assert _sqnr(_real(name, batch, ref), _real(name, batch, y)) >= floor, name


def _distinct_inputs(model, batches, cfg):
    """Quantize under ``cfg`` and return, for every activation quantization of the evaluation pass, the number of
    distinct values of the tensor it received (<= 2^bits means it had been rounded already). The activation
    function's output is left out under ``full``: it is a new tensor computed elementwise from the quantized FFN
    input, so it has at most 2^bits values without having been rounded."""
    seen = []
    orig = Quantizer.__call__
    skip = {n for n, m in model.named_modules() if cfg.sites == "full"
            and any(k in n.rsplit(".", 1)[-1] for k in ("act", "activation"))}

    def spy(self, x, calibrate=False):
        if x.numel() >= 1024 and self.name.split(":")[0] not in skip:
            seen.append((self.name, int(torch.unique(x.detach()).numel())))
        return orig(self, x, calibrate)

    with quantize(model, cfg) as qm:
        qm.calibrate(batches, progress=False)
        Quantizer.__call__ = spy
        try:
            with torch.no_grad():
                model(**batches[0])
        finally:
            Quantizer.__call__ = orig
    return seen


@pytest.mark.parametrize("name", ["bert", "opt", "vit", "llama"])
def test_no_tensor_is_rounded_twice(name, monkeypatch):
    model = archs.build(name)
    batches = [archs.batch(name, model, seed=s) for s in (0, 1)]
    for cfg in (paper_w8a8(), full_w8a8()):
        seen = _distinct_inputs(model, batches, cfg)
        assert len(seen) > 10
        twice = [(n, d) for n, d in seen if d <= 256]
        assert not twice, (cfg.sites, twice)
    # the check can fail: without grid tracking the attention context is rounded again before the output
    # projection (a transposed copy), OPT's scaled query and the weights' copies likewise
    import outlierfree.quant.simulator as sim

    monkeypatch.setattr(sim, "grid_of", lambda t: None)
    seen = _distinct_inputs(model, batches, full_w8a8())
    assert any(d <= 256 for _, d in seen)


def _layer0(qm, prefix):
    return sorted(n[len(prefix):] for n in qm.act if n.startswith(prefix))


def _tiny_batches(family, n=2):
    g = torch.Generator().manual_seed(0)
    if family == "vit":
        return [{"pixel_values": torch.randn(2, 3, 32, 32, generator=g)} for _ in range(n)]
    return [{"input_ids": torch.randint(5, 100, (2, 16), generator=g),
             "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(n)]


# The reference's quantizers of one block (quantized_bert.py l.238-246, 550-554, 581-589, 618; quantized_opt.py
# l.68-76, 290-301), named as our sites
BERT_LAYER0 = sorted(["attention.self.query:output", "attention.self.key:output", "attention.self.value:output",
                      "attention.self:scores", "attention.self:probs", "attention.self:context",
                      "attention.output.dense:output", "attention.output:add0", "attention.output.LayerNorm:output",
                      "intermediate.intermediate_act_fn:output", "output.dense:output", "output:add0",
                      "output.LayerNorm:output"])
OPT_LAYER0 = sorted(["self_attn.q_proj:output", "self_attn.k_proj:output", "self_attn.v_proj:output",
                     "self_attn:scores", "self_attn:probs", "self_attn:context", "self_attn.out_proj:output", ":add0",
                     "self_attn_layer_norm:output", "activation_fn:output", "fc2:output", ":add1",
                     "final_layer_norm:output"])


@pytest.mark.parametrize("variant", ["vanilla", "gated"])
def test_paper_set_is_the_reference_set(variant):
    bert = build_model("bert", "tiny", variant, seed=0).eval()
    with quantize(bert, paper_w8a8()) as qm:
        qm.calibrate(_tiny_batches("bert"), progress=False)
        want = list(BERT_LAYER0)
        if variant == "gated":  # BERT: the context once, after the gate and the head reshape (l.431-435)
            want = sorted([w for w in want if w != "attention.self:context"] + ["attention.output.dense:input"])
        assert _layer0(qm, "bert.encoder.layer.0.") == want
        assert sorted(n for n in qm.act if n.startswith("bert.embeddings")) == \
            ["bert.embeddings.LayerNorm:output", "bert.embeddings:add0", "bert.embeddings:add1"]
        assert not any(n.startswith("cls.") for n in qm.act)  # masked-LM head in float (l.866)
        quantized = {qz.name for _, _, qz in qm.weights.values()}
        assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in quantized  # gamma (8-bit symmetric)
        assert "bert.embeddings.position_embeddings.weight" in quantized
        assert not any(n.endswith("bias") or "outlierfree_gate" in n or n.startswith("cls.") for n in quantized)
        assert qm.float_weights["bert.encoder.layer.0.attention.output.LayerNorm.bias"].startswith("bias")

    opt = build_model("opt", "tiny", variant, seed=0).eval()
    with quantize(opt, paper_w8a8()) as qm:
        qm.calibrate(_tiny_batches("opt"), progress=False)
        got = _layer0(qm, "model.decoder.layers.0")
        assert sorted(g.lstrip(".") for g in got) == sorted(w.lstrip(".") for w in OPT_LAYER0)  # context pre-gate
        assert "lm_head:output" in qm.act and "model.decoder:add0" in qm.act  # logits; the embeddings' sum
        assert "model.decoder.layers.0.self_attn:query" in qm.aliases  # the scaled query: q_proj's grid, scaled


def test_calibration_happens_only_in_calibrate():
    m = build_model("opt", "tiny", "vanilla", seed=0).eval()
    batches = _tiny_batches("opt", 3)
    with quantize(m, paper_w8a8()) as qm:
        with pytest.raises(OutlierfreeError, match="before calibrate"):
            with torch.no_grad():
                m(**batches[0])
        with torch.no_grad(), qm.float_mode():
            m(**batches[0])  # a float reference is fine
        assert not qm.act  # and set no range
        # calibrate through the decoder alone: the LM head's logits are then first met in evaluation
        qm.calibrate(batches[:2], forward=lambda model, b: model.model(**b), progress=False)
        with pytest.raises(OutlierfreeError, match="first met after calibration") as e:
            with torch.no_grad():
                m(**batches[2])
        assert "lm_head:output" in str(e.value) and "\n" not in str(e.value)


def test_bad_calibration_input_is_one_line():
    m = build_model("bert", "tiny", "vanilla", seed=0).eval()
    pad = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.zeros(2, 8, dtype=torch.long)}
    with quantize(m, paper_w8a8()) as qm:
        with pytest.raises(OutlierfreeError, match="padding only"):
            qm.calibrate([pad], progress=False)
        with pytest.raises(OutlierfreeError, match="no batches"):
            qm.calibrate([], progress=False)
    with quantize(m, paper_w8a8().replace(sites=("gate",))) as qm:  # a vanilla model has no gate
        with pytest.raises(OutlierfreeError, match="matched no activation"):
            qm.calibrate(_tiny_batches("bert"), progress=False)


def test_quantization_parameters_are_float32_for_half_tensors():
    q = Quantizer(QuantSpec(8, False, "per_tensor", "current_minmax", static=False))
    zeros = torch.zeros(4, 8, dtype=torch.float16)
    assert torch.equal(q(zeros), zeros)  # an all-zero tensor: no NaN
    small = (torch.linspace(-1, 1, 64) * 1e-3).to(torch.float16).view(8, 8)  # a range of 2e-3: fp16 scale underflows
    out = q(small)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert float((out.float() - small.float()).abs().max()) <= 1e-5


def test_analyze_measures_the_residual_sums_quantize_uses():
    from outlierfree.analysis.analyze import analyze_model

    m = build_model("opt", "tiny", "vanilla", seed=0).eval()
    rep = analyze_model(m, _tiny_batches("opt"), kinds=("residual",), attention=False)
    names = {s["name"] for s in rep["sites"]}
    with quantize(m, paper_w8a8()) as qm:
        qm.calibrate(_tiny_batches("opt"), progress=False)
        residual = {n for n in qm.act if qm.site_of[n].kind == "residual"}
    assert names == residual and "model.decoder.layers.1:add1" in names


def _handwritten(name):
    import transformers as T

    torch.manual_seed(0)
    if name == "mpnet":
        return T.MPNetForMaskedLM(T.MPNetConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128,
                                                max_position_embeddings=66)).eval()
    if name == "bloom":
        return T.BloomForCausalLM(T.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)).eval()
    return T.FalconForCausalLM(T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4)).eval()


@pytest.mark.parametrize("name", ["mpnet", "bloom", "falcon"])
def test_attention_outside_the_interface_is_named_not_silently_float(name):
    """MPNet and BLOOM compute softmax by hand, Falcon called SDPA directly before transformers 5.25: their attention
    modules are named as not instrumented (and Falcon's, once it uses the interface, is instrumented), and everything
    else still holds (16 bits is float to 40 dB, no mask becomes a site)."""
    m = _handwritten(name)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 4:] = 0
    batch = {"input_ids": torch.randint(4, 128, (3, 12), generator=torch.Generator().manual_seed(0)),
             "attention_mask": mask if name == "mpnet" else mask.flip(1)}
    with quantize(m, full_w8a8(16, 16)) as qm:
        qm.calibrate([batch], progress=False)
        with torch.no_grad():
            y = m(**batch).logits
            with qm.float_mode():
                ref = m(**batch).logits
        from outlierfree import hf_compat

        if any(hf_compat.calls_attention_interface(mod) for mod in m.modules()):
            # transformers 5.25 moved Falcon onto the attention interface: then its internals are sites
            assert not qm.uninstrumented and any(":probs" in s or "probs" in s for s in qm.act), sorted(qm.act)[:8]
        else:
            assert len(qm.uninstrumented) == 2 and all(u.endswith(("attn", "attention")) for u in qm.uninstrumented)
        sel = batch["attention_mask"].bool()
        assert _sqnr(ref[sel], y[sel]) >= 40
        assert all(-1e4 < float(q.lo) <= float(q.hi) < 1e4 for q in qm.act.values())


def test_encoder_decoder_is_evaluated_on_its_logits_without_decoder_inputs():
    from outlierfree.quant.evaluate import evaluate_quantized

    m = archs.build("t5")
    b = archs.batch("t5", m)
    b = {k: v for k, v in b.items() if not k.startswith("decoder_")}  # what a user's text batch holds
    r = evaluate_quantized(m, None, [b], [b], paper_w8a8(), progress=False)
    assert r["task"] == "encoder" and 0.9 < r["quantized"]["cosine"] < 1.0 and r["quantized"]["output_sqnr_db"] > 10
