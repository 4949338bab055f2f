"""The gated variant's layer input reaches the attention function as a keyword argument (``outlierfree_gate_input``),
for every family, and nothing is left on the attention modules after a forward; modules that cannot pass it on get a
clear error."""

import pytest
import torch
import torch.nn as nn
import transformers
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import outlierfree as of
from outlierfree.attention.interface import GATE_INPUT, outlierfree_attention
from outlierfree.errors import OutlierfreeError
from outlierfree import hf_compat


def llama_gated():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    return of.patch_model(transformers.LlamaForCausalLM(cfg), "gated", strict=False)


def model_and_batch(family):
    if family == "llama":
        return llama_gated(), dict(input_ids=torch.randint(0, 50, (2, 9)))
    model = of.build_model(family, "tiny", "gated", seed=0)
    if family == "vit":
        c = model.config
        return model, dict(pixel_values=torch.randn(2, c.num_channels, c.image_size, c.image_size))
    ids = torch.randint(5, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return model, dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("family", ["bert", "opt", "vit", "llama"])
def test_gate_input_is_passed_explicitly_and_nothing_stays_on_the_module(family):
    model, batch = model_and_batch(family)
    modules = [m for _, m in hf_compat.attention_modules(model)]
    inputs, seen = [], []

    def record(module, args, kwargs):  # registered after the gate's hook: sees what the module's forward gets
        inputs.append((module, hf_compat.layer_input(args, {k: v for k, v in kwargs.items() if k != GATE_INPUT})))

    def spy(module, *args, **kwargs):
        seen.append((module, kwargs.get(GATE_INPUT)))
        return outlierfree_attention(module, *args, **kwargs)

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    before = [dict(m.__dict__) for m in modules]
    transformers.AttentionInterface.register(hf_compat.IMPL_NAME, spy)
    try:
        model.train()
        out = model(**batch)
        out.logits.float().sum().backward()
        model.eval()
        with torch.no_grad():
            model(**batch)
    finally:
        transformers.AttentionInterface.register(hf_compat.IMPL_NAME, outlierfree_attention)
        for h in handles:
            h.remove()
    assert len(seen) == len(inputs) == 2 * len(modules)
    for (module, x), (called, x_in) in zip(seen, inputs):  # the very tensor the attention module was called with
        assert module is called and x is not None and x is x_in
    for m, b in zip(modules, before):
        assert m.__dict__.keys() == b.keys(), set(m.__dict__) ^ set(b)  # nothing stashed, nothing left
        assert not any(isinstance(v, torch.Tensor) for v in m.__dict__.values())


def test_missing_gate_input_is_a_clear_error():
    model = of.build_model("bert", "tiny", "gated", seed=0)
    module = hf_compat.attention_modules(model)[0][1]
    q = k = v = torch.randn(1, 2, 5, 32)
    with pytest.raises(RuntimeError, match="gated attention needs the layer input"):
        outlierfree_attention(module, q, k, v, None)
    x = torch.randn(1, 5, 64)
    out, _ = outlierfree_attention(module, q, k, v, None, **{GATE_INPUT: x})
    assert out.shape == (1, 5, 2, 32)


# ---- a custom attention module, as strict=False patching meets them ------------------------------------------------
class ToyAttention(nn.Module):
    """An attention module that calls transformers' attention interface; ``pass_kwargs=False`` drops its **kwargs."""

    is_causal = False

    def __init__(self, config, pass_kwargs=True):
        super().__init__()
        self.config, self.pass_kwargs = config, pass_kwargs
        self.num_heads, self.head_dim = 2, 4
        self.qkv = nn.Linear(8, 24)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        B, T, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(B, T, 3, 2, 4).permute(2, 0, 3, 1, 4)
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
        out, _ = fn(self, q, k, v, attention_mask, scaling=0.5, **(kwargs if self.pass_kwargs else {}))
        return out.reshape(B, T, 8)


class NoKwargsAttention(ToyAttention):
    def forward(self, hidden_states, attention_mask=None):
        return super().forward(hidden_states, attention_mask)  # calls ALL_ATTENTION_FUNCTIONS


class Toy(nn.Module):
    def __init__(self, attention_cls, **kw):
        super().__init__()
        self.config = transformers.PretrainedConfig(hidden_size=8, num_attention_heads=2)
        self.attn = attention_cls(self.config, **kw)

    def forward(self, x):
        return self.attn(x)


def test_toy_attention_module_gets_its_gate_input():
    model = of.patch_model(Toy(ToyAttention), "gated", strict=False)
    assert model(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    assert not any(isinstance(v, torch.Tensor) for v in model.attn.__dict__.values())


def test_module_without_kwargs_is_refused_at_patch_time():
    model = Toy(NoKwargsAttention)
    with pytest.raises(OutlierfreeError, match=r"takes no \*\*kwargs"):
        of.patch_model(model, "gated", strict=False)
    assert getattr(model.attn, "outlierfree", None) is None and not hasattr(model.attn, "outlierfree_gate")
    of.patch_model(model, "clipped", strict=False)  # the other variants need no keyword arguments
    assert model(torch.randn(2, 3, 8)).shape == (2, 3, 8)


def test_module_that_drops_its_kwargs_gets_the_old_error():
    model = of.patch_model(Toy(ToyAttention, pass_kwargs=False), "gated", strict=False)
    with pytest.raises(RuntimeError, match="gated attention needs the layer input.*pass its keyword arguments"):
        model(torch.randn(2, 3, 8))
