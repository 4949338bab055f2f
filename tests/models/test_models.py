"""Models: vanilla equals stock transformers; every variant trains; save/load round-trips; patching."""

import pytest
import torch
import transformers

import outlierfree as of
from outlierfree import AttentionConfig, OutlierfreeError
from outlierfree.attention.interface import outlierfree_attention
from outlierfree import hf_compat
from outlierfree.models.build import attention_config_of, model_config

FAMILIES = ["bert", "opt", "vit"]
VARIANTS = {
    "vanilla": AttentionConfig("vanilla"),
    "clipped": AttentionConfig("clipped", gamma=-0.01, zeta=1.0),
    "clipped_alpha_row": AttentionConfig("clipped", alpha=0.5, alpha_t="row"),
    "gated": AttentionConfig("gated", gate_type="head_linear"),
    "gated_mlp_head": AttentionConfig("gated", gate_type="mlp", gate_per="head"),
}


def batch(family, model, padded=True):
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        c = model.config
        return dict(pixel_values=torch.randn(2, c.num_channels, c.image_size, c.image_size, generator=g),
                    labels=torch.tensor([1, 3]))
    ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def stock(family, attn_impl):
    cls = getattr(transformers, hf_compat.FAMILIES[family].task_class)
    cfg = model_config(family, "tiny")
    return cls._from_config(cfg, attn_implementation=attn_impl)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("impl", ["auto", "eager"])
def test_vanilla_equals_stock_transformers(family, attn_impl, impl):
    ref = stock(family, attn_impl).eval()
    ours = of.build_model(family, "tiny", AttentionConfig("vanilla", impl=impl)).eval()
    ours.load_state_dict(ref.state_dict())
    b = batch(family, ours)
    with torch.no_grad():
        a, o = ref(**b), ours(**b)
    key = "logits"
    if family != "vit":  # padded positions are garbage in both; compare real tokens only
        m = b["attention_mask"].bool()
        torch.testing.assert_close(o[key][m], a[key][m], atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(o[key], a[key], atol=1e-5, rtol=0)
    torch.testing.assert_close(o.loss, a.loss, atol=1e-5, rtol=0)


def test_clipped_with_gamma0_zeta1_equals_vanilla():
    ref = of.build_model("bert", "tiny", "vanilla", seed=0).eval()
    clip = of.build_model("bert", "tiny", AttentionConfig("clipped", gamma=0.0, zeta=1.0), seed=0).eval()
    b = batch("bert", ref)
    with torch.no_grad():
        torch.testing.assert_close(clip(**b).loss, ref(**b).loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_trains_and_round_trips(family, name, tmp_path):
    model = of.build_model(family, "tiny", VARIANTS[name], seed=0)
    model.train()
    b = batch(family, model)
    out = model(**b)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(out.loss) and all(g is not None and torch.isfinite(g).all() for g in grads[:5])
    if name.startswith("gated"):
        gate_grads = [p.grad for n, p in model.named_parameters() if "outlierfree_gate" in n]
        assert gate_grads and all(g is not None and g.abs().sum() > 0 for g in gate_grads)
    # round trip
    model.eval()
    of.save_model(model, tmp_path / "m")
    loaded = of.load_model(tmp_path / "m")
    assert attention_config_of(loaded) == attention_config_of(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, model(**b).logits, atol=0, rtol=0)
    assert not list(tmp_path.glob(".m.tmp-*"))  # nothing half-written left behind


def test_clipped_alpha_fixed_T_defaults_to_model_length():
    m = of.build_model("opt", "tiny", AttentionConfig("clipped", alpha=12.0))
    cfg = attention_config_of(m).params
    assert cfg.max_len == m.config.max_position_embeddings
    assert cfg.gamma_at(3.0) == pytest.approx(-12.0 / cfg.max_len)  # the same gamma whatever the row's length


def test_attention_probs_in_model_follow_clipped_formula_with_per_row_T():
    """OPT is causal: row i sees i + 1 keys, so gamma_i = -alpha / (i + 1); padded keys get exactly zero."""
    alpha = 0.5
    m = of.build_model("opt", "tiny", AttentionConfig("clipped", alpha=alpha, alpha_t="row"), seed=0).eval()
    b = batch("opt", m)
    captured = {}
    attn = hf_compat.attention_modules(m)[0][1]

    def probe(module, name, t):
        captured[name] = t
        return t

    attn.outlierfree_probe = probe
    with torch.no_grad():
        m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    del attn.outlierfree_probe
    s, p = captured["scores"].double(), captured["probs"].double()
    T = s.shape[-1]
    for bi, n_real in ((0, 12), (1, 8)):
        for i in range(n_real):
            vis = s[bi, :, i, : i + 1]
            sm = torch.softmax(vis, -1)
            g = -alpha / (i + 1)
            expect = torch.clamp((1 - g) * sm + g, 0, 1)
            torch.testing.assert_close(p[bi, :, i, : i + 1], expect, atol=1e-6, rtol=0)
            assert (p[bi, :, i, i + 1:] == 0).all()
    assert (p[1, :, :, 8:] == 0).all() and T == 12


def test_output_attentions_returns_probabilities():
    m = of.build_model("opt", "tiny", "gated").eval()
    out = m(**{k: v for k, v in batch("opt", m).items() if k != "labels"}, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 12, 12)


def test_gate_finetune_patch_leaves_pretrained_model_unchanged():
    ref = of.build_model("bert", "tiny", "vanilla", seed=0).eval()
    b = batch("bert", ref)
    with torch.no_grad():
        before = ref(**b).logits.clone()
        of.patch_model(ref, AttentionConfig("gated", gate_type="linear", gate_finetune=True, gate_init=0.25))
        after = ref(**b).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    assert any("outlierfree_gate" in n for n, _ in ref.named_parameters())
    # patching again replaces the variant (no stale gates)
    of.patch_model(ref, "vanilla")
    assert not any("outlierfree_gate" in n for n, _ in ref.named_parameters())


def test_patch_stock_pretrained_model_from_disk(tmp_path):
    ref = stock("bert", "sdpa").eval()
    ref.save_pretrained(tmp_path / "stock")
    loaded = of.load_model(tmp_path / "stock")  # a stock checkpoint: no variant
    assert attention_config_of(loaded) is None
    of.patch_model(loaded, AttentionConfig("clipped", gamma=-0.02))
    of.save_model(loaded, tmp_path / "patched")
    again = of.load_model(tmp_path / "patched")
    assert attention_config_of(again).variant == "clipped"
    b = batch("bert", ref)
    with torch.no_grad():
        torch.testing.assert_close(again(**b).logits, loaded(**b).logits, atol=0, rtol=0)


def test_patch_rejects_unsupported_family():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, vocab_size=50)
    with pytest.raises(OutlierfreeError, match="cannot patch a 'llama' model"):
        of.patch_model(transformers.LlamaForCausalLM(cfg), "clipped")


def test_generic_patch_on_llama_with_gqa_when_not_strict():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    m = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        of.patch_model(m, AttentionConfig("vanilla", impl="eager"), strict=False)
        torch.testing.assert_close(m(input_ids=ids).logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(variant="clipped", gamma=0.1), "gamma must be <= 0"),
    (dict(variant="clipped", zeta=0.9), "zeta must be >= 1"),
    (dict(variant="gated", gate_init=1.0), "gate init probability"),
    (dict(variant="gated", gate_type="conv"), "unknown gate type"),
    (dict(variant="sparsemax"), "unknown attention variant"),
    (dict(variant="clipped", impl="sdpa"), "cannot run on the fused SDPA"),
])
def test_config_validation(bad, match):
    with pytest.raises(OutlierfreeError, match=match):
        AttentionConfig(**bad)


def test_config_dict_round_trip_and_unknown_keys():
    c = AttentionConfig("gated", gate_type="mlp", gate_init=0.4)
    assert AttentionConfig.from_dict(c.to_dict()) == c
    with pytest.raises(OutlierfreeError, match="unknown attention config keys"):
        AttentionConfig.from_dict({"variant": "gated", "gate_typo": 1})


@pytest.mark.parametrize("path_kind", ["missing", "file", "empty_dir", "corrupt_json", "no_weights"])
def test_load_model_bad_paths(tmp_path, path_kind):
    p = tmp_path / "x"
    if path_kind == "file":
        p.write_text("hello")
    elif path_kind == "empty_dir":
        p.mkdir()
    elif path_kind == "corrupt_json":
        p.mkdir()
        (p / "config.json").write_text("{not json")
    elif path_kind == "no_weights":
        of.build_model("bert", "tiny", "gated").config.save_pretrained(p)
    with pytest.raises(OutlierfreeError):
        of.load_model(p)


def test_attention_function_matches_torch_sdpa_on_gqa():
    class M(torch.nn.Module):
        is_causal = True
        training = False

    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, 8, dtype=torch.float64)
    module = M()
    module.outlierfree = AttentionConfig("vanilla", impl="eager")
    out, probs = outlierfree_attention(module, q, k, v, None, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True, scale=0.3)
    torch.testing.assert_close(out, ref.transpose(1, 2))
