"""SmoothQuant: exact in float on every family, and it removes the damage of a planted activation outlier channel."""

import importlib.util
from pathlib import Path

import pytest
import torch

from outlierfree.errors import OutlierfreeError
from outlierfree.quant import quantize
from outlierfree.quant.config import paper_w8a8
from outlierfree.quant.transforms import parse_transforms, smoothquant

_spec = importlib.util.spec_from_file_location("archs", Path(__file__).parents[1] / "archs.py")
archs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(archs)


def _out(y):
    return y.logits if getattr(y, "logits", None) is not None else y[0]


@pytest.mark.parametrize("name", ["bert", "opt", "llama", "gemma3", "vit", "gpt2"])
def test_smoothquant_leaves_float_outputs_unchanged(name):
    model = archs.build(name)
    batches = [archs.batch(name, model, seed=s) for s in (0, 1)]
    with torch.no_grad():
        ref = [_out(model(**b)) for b in batches]
    res = smoothquant(model, batches, alpha=0.5)
    with torch.no_grad():
        for b, r in zip(batches, ref):  # the second batch was not used for the exactness check
            y = _out(model(**b))
            assert float((y - r).norm() / r.norm()) < 1e-5, name
    applied = [f for f in res.folds if f.applied]
    if name in ("opt", "llama", "gemma3", "vit"):  # pre-norm: each block's two norms fold, and the value projection
        assert sum(f.producer.endswith(("norm", "layernorm", "layer_norm", "layernorm_before", "layernorm_after"))
                   for f in applied) >= 4, [f.to_dict() for f in res.folds]
        assert any(f.max_scale != 1.0 for f in applied)
    if name == "bert":  # post-norm: the norm feeds the residual too, so only V -> output projection folds
        assert sum("value" in f.producer for f in applied) == 2
        inner = [f for f in res.folds if f.producer == "bert.encoder.layer.0.output.LayerNorm"]
        assert inner and not inner[0].applied and "not exact" in inner[0].why


def test_smoothquant_removes_a_planted_outlier_channel():
    """An OPT block whose q/k/v input carries one channel 100x larger than the rest: per-tensor 8 bits of that input
    lose the other channels; SmoothQuant moves the channel's scale into the weights. Judged on that site alone
    (the other sites of a random tiny model are noisier than the planted one)."""
    model = archs.build("opt")
    with torch.no_grad():
        model.model.decoder.layers[1].self_attn_layer_norm.weight[7] = 100.0  # a massive channel, as LLMs grow
    batches = [archs.batch("opt", model, seed=s) for s in (0, 1, 2)]
    site = "model.decoder.layers.1.self_attn_layer_norm:output"

    def sqnr(m):
        with quantize(m, paper_w8a8()) as qm:
            qm.calibrate(batches[:2], progress=False)
            with torch.no_grad(), qm.only_sites([site]):
                y = _out(m(**batches[2]))
                with qm.float_mode():
                    r = _out(m(**batches[2]))
        return float(10 * torch.log10(r.pow(2).sum() / (r - y).pow(2).sum()))

    before = sqnr(model)
    smoothquant(model, batches[:2], alpha=0.5)
    after = sqnr(model)
    assert after > before + 6, (before, after)  # measured: 26.5 -> 38.0 dB


def test_bad_transform_input_is_one_line():
    assert parse_transforms("smoothquant:0.8") == [("smoothquant", 0.8)]
    assert parse_transforms("smoothquant") == [("smoothquant", 0.5)]
    for bad in ("smoothquant:1.5", "smoothquant:x", "rotate-everything"):
        with pytest.raises(OutlierfreeError):
            parse_transforms(bad)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_rotation_is_exact_and_spreads_a_massive_channel(name):
    from outlierfree.quant.transforms import random_rotation, rotate

    q, kind = random_rotation(64, seed=3)
    assert kind == "hadamard" and torch.allclose(q @ q.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    q, kind = random_rotation(48, seed=3)
    assert kind == "orthogonal" and torch.allclose(q @ q.T, torch.eye(48, dtype=torch.float64), atol=1e-12)

    model = archs.build(name)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] *= 300.0  # a massive residual channel, as in LLMs
    batches = [archs.batch(name, model, seed=s) for s in (0, 1, 2)]
    mask = batches[2]["attention_mask"].bool()

    def sqnr(m):
        with quantize(m, paper_w8a8()) as qm:
            qm.calibrate(batches[:2], progress=False)
            with torch.no_grad():
                y = _out(m(**batches[2]))[mask]
                with qm.float_mode():
                    r = _out(m(**batches[2]))[mask]
        return float(10 * torch.log10(r.pow(2).sum() / (r - y).pow(2).sum()))

    with torch.no_grad():
        ref = _out(model(**batches[1]))
    before = sqnr(model)
    rotate(model, batches[0])
    with torch.no_grad():
        assert float((_out(model(**batches[1])) - ref).norm() / ref.norm()) < 1e-5  # exact on another batch
    assert sqnr(model) > before + 3  # measured on llama: 16.6 -> 23.3 dB


@pytest.mark.parametrize("name", ["gemma3", "opt", "bert", "vit"])
def test_residual_rotation_refuses_models_whose_norms_break_invariance(name):
    from outlierfree.quant.transforms import rotate_residual

    model = archs.build(name)
    b = archs.batch(name, model)
    with torch.no_grad():
        ref = _out(model(**b))
    with pytest.raises(OutlierfreeError, match="rotation does not apply"):
        rotate_residual(model, b)
    with torch.no_grad():
        assert torch.equal(_out(model(**b)), ref)  # untouched


@pytest.mark.parametrize("name", sorted(archs._FACTORIES))
def test_rotate_is_exact_on_every_family(name):
    """`--transform rotate` applies every rotation that is exact for the architecture, and leaves the float output
    unchanged on a batch it was not checked on."""
    from outlierfree.quant.transforms import rotate

    model = archs.build(name)
    batches = [archs.batch(name, model, seed=s) for s in (0, 1)]
    with torch.no_grad():
        ref = _out(model(**batches[1]))
    if name in ("gpt2", "gemma3"):
        # GPT-2: a fused QKV projection and no RMSNorm; Gemma-3: sandwich norms, RoPE and grouped-query values
        with pytest.raises(OutlierfreeError, match="no rotation is exact"):
            rotate(model, batches[0], seed=1)
        with torch.no_grad():
            assert torch.equal(_out(model(**batches[1])), ref)  # every attempt undone
        return
    res = rotate(model, batches[0], seed=1)
    with torch.no_grad():
        y = _out(model(**batches[1]))
    assert float((y - ref).norm() / ref.norm()) < 1e-5, (name, res.to_dict())
    assert res.layers + res.heads_qk + res.heads_vo > 0
    if name in ("llama", "qwen2"):  # pre-norm RMSNorm decoders: the residual stream rotates
        assert res.layers == archs.LAYERS and not res.residual_why_not
    if name in ("bert", "vit", "opt"):  # norms that break the residual rotation: heads only
        assert res.layers == 0 and res.residual_why_not
    if name in ("bert", "vit", "opt", "roberta", "electra"):  # MHA, no RoPE: both head rotations are exact
        assert res.heads_qk == res.heads_vo == archs.LAYERS, res.to_dict()
    if name in ("llama", "qwen2"):  # RoPE: rotating queries and keys would change the scores
        assert res.heads_qk == 0


def test_rotate_refuses_a_model_where_nothing_rotates(monkeypatch):
    from outlierfree import hf_compat
    from outlierfree.quant.transforms import rotate

    model = archs.build("bert")
    b = archs.batch("bert", model)
    with torch.no_grad():
        ref = _out(model(**b))
    monkeypatch.setattr(hf_compat, "attention_modules", lambda m: [])  # no attention found: no head to rotate
    with pytest.raises(OutlierfreeError, match="no rotation is exact"):
        rotate(model, b)
    with torch.no_grad():
        assert torch.equal(_out(model(**b)), ref)


def test_head_rotation_spreads_a_value_outlier():
    """BERT is post-norm, so only per-head rotations are exact there; they do reach the value site: a value channel
    100x larger than the rest (per-tensor 8 bits of that site lose the others) is spread over its head."""
    from outlierfree.quant.transforms import rotate

    model = archs.build("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.value.weight[3] *= 100.0
    batches = [archs.batch("bert", model, seed=s) for s in (0, 1, 2)]
    mask = batches[2]["attention_mask"].bool()
    site = "bert.encoder.layer.0.attention.self.value:output"

    def sqnr(m):
        with quantize(m, paper_w8a8()) as qm:
            qm.calibrate(batches[:2], progress=False)
            with torch.no_grad(), qm.only_sites([site]):
                y = _out(m(**batches[2]))[mask]
                with qm.float_mode():
                    r = _out(m(**batches[2]))[mask]
        return float(10 * torch.log10(r.pow(2).sum() / (r - y).pow(2).sum()))

    before = sqnr(model)
    rotate(model, batches[0])
    after = sqnr(model)
    assert after > before + 3, (before, after)
