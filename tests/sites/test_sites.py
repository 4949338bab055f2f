"""Site discovery on BERT, OPT and ViT (ours and stock Hugging Face) and on architectures we do not know (Llama,
Gemma-3 built from configs); observe() measures without changing outputs (also through sliding-window, grouped-query
attention, against transformers' own sdpa), replaces when asked, and restores everything on exit."""

import pytest
import torch

from outlierfree import hf_compat
from outlierfree.models.build import build_model, model_config
from outlierfree.sites import SITE_KINDS, discover, observe, select


def _kinds_by_layer(sites, layer):
    return {(s.module, s.kind) for s in sites if s.layer == layer}


@pytest.mark.parametrize("stock", [False, True])
def test_bert_sites(stock):
    if stock:
        from transformers import BertModel

        model = BertModel(model_config("bert", "tiny"))  # a stock model: not patched, sdpa attention
        prefix = ""
    else:
        model = build_model("bert", "tiny", "clipped")
        prefix = "bert."
    sites = discover(model)
    got = _kinds_by_layer(sites, 1)
    L = f"{prefix}encoder.layer.1"
    for expected in [(f"{L}.attention.output.dense", "attn_output"), (f"{L}.attention.output.LayerNorm", "ln_input"),
                     (f"{L}.attention.output.LayerNorm", "ln_output"), (f"{L}.output.dense", "ffn_output"),
                     (f"{L}.output.LayerNorm", "ln_input"), (f"{L}.attention.self", "attn_probs")]:
        assert expected in got
    assert all(s.kind in SITE_KINDS for s in sites)
    assert len({s.name for s in sites}) == len(sites)  # unique names


def test_opt_and_vit_sites_ours_and_stock():
    from transformers import OPTForCausalLM, ViTForImageClassification

    for model, L, attn_out, ffn_out, lns in [
        (build_model("opt", "tiny"), "model.decoder.layers.0", "self_attn.out_proj", "fc2",
         ("self_attn_layer_norm", "final_layer_norm")),
        (OPTForCausalLM(model_config("opt", "tiny")), "model.decoder.layers.0", "self_attn.out_proj", "fc2",
         ("self_attn_layer_norm", "final_layer_norm")),
        (build_model("vit", "tiny", "gated"), "vit.layers.0", "attention.o_proj", "mlp.fc2",
         ("layernorm_before", "layernorm_after")),
        (ViTForImageClassification(model_config("vit", "tiny")), "vit.layers.0", "attention.o_proj", "mlp.fc2",
         ("layernorm_before", "layernorm_after")),
    ]:
        got = _kinds_by_layer(discover(model), 0)
        assert (f"{L}.{attn_out}", "attn_output") in got, type(model).__name__
        assert (f"{L}.{ffn_out}", "ffn_output") in got
        for ln in lns:
            assert (f"{L}.{ln}", "ln_input") in got and (f"{L}.{ln}", "ln_output") in got
        probs = [s for s in select(discover(model), "attn_probs") if s.layer == 0]
        assert len(probs) == 1
    gated = discover(build_model("vit", "tiny", "gated"))
    assert len(select(gated, "gate")) == 2  # gated variant: its gate is a site too


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=4,
                           max_position_embeddings=64,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


def test_generic_rule_on_unknown_architectures():
    for model in (_tiny_llama(), _tiny_gemma3()):
        sites = discover(model)
        got = _kinds_by_layer(sites, 1)
        assert ("model.layers.1.input_layernorm", "ln_input") in got
        assert ("model.layers.1.post_attention_layernorm", "ln_input") in got
        assert ("model.layers.1.self_attn.o_proj", "attn_output") in got
        assert ("model.layers.1.mlp.down_proj", "ffn_output") in got
        assert ("model.layers.1.self_attn", "attn_probs") in got
        assert ("model.layers.1.mlp.act_fn", "ffn_hidden") in got
        assert any(s.kind == "head_input" and s.module == "lm_head" for s in sites)


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_gemma3])
def test_observe_matches_transformers_sdpa(make):
    """Observing every site (attention through outlierfree's eager function, to materialise probabilities) gives
    the same logits as transformers' own sdpa, with sliding windows, grouped-query attention and padding."""
    model = make()
    assert hf_compat.attention_implementation(model) == "sdpa"
    ids = torch.randint(0, 96, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        seen = {}

        def fn(site, t):
            seen[site.kind] = seen.get(site.kind, 0) + 1
            return None

        with observe(model, fn):
            assert hf_compat.attention_implementation(model) == "outlierfree"
            out = model(input_ids=ids, attention_mask=mask).logits
    assert hf_compat.attention_implementation(model) == "sdpa"  # restored
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-4, atol=1e-5)
    assert seen["attn_probs"] == model.config.num_hidden_layers and seen["ln_input"] > 0


def test_observed_probabilities_respect_sliding_window():
    model = _tiny_gemma3()
    ids = torch.randint(0, 96, (1, 10))
    probs = {}

    def keep(site, t):
        probs[site.layer] = t.clone()  # returns None: observe only

    with torch.no_grad(), observe(model, keep, select(discover(model), "attn_probs")):
        model(input_ids=ids)
    sliding, full = probs[0][0, 0], probs[2][0, 0]  # (Tq, Tk) of head 0
    q = torch.arange(10)[:, None]
    k = torch.arange(10)[None, :]
    assert torch.all(sliding[(k > q) | (q - k >= 4)] == 0)  # causal and at most 4 keys back
    assert torch.all(full[k > q] == 0) and torch.all(full[9, :10] > 0)
    torch.testing.assert_close(sliding.sum(-1), torch.ones(10))


def test_observe_replaces_and_cleans_up():
    model = build_model("bert", "tiny", "vanilla", seed=0)
    model.eval()
    ids = torch.randint(5, 500, (2, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        target = select(discover(model), "attn_output")
        with observe(model, lambda s, t: torch.zeros_like(t), target):
            zeroed = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(zeroed, ref)
    torch.testing.assert_close(after, ref)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
               if not hasattr(m, "outlierfree_gate"))
    assert not any("outlierfree_probe" in m.__dict__ for m in model.modules())


def test_gpt2_conv1d_linears_are_sites():
    """GPT-2's linears are transformers' Conv1D: its attention and FFN output projections still get named."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    got = _kinds_by_layer(discover(model), 1)
    assert ("transformer.h.1.attn.c_proj", "attn_output") in got
    assert ("transformer.h.1.mlp.c_proj", "ffn_output") in got
    assert ("transformer.h.1.ln_2", "ln_input") in got
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with observe(model, lambda s, t: None):
            out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref)
