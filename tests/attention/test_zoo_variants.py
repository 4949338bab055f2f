"""The attention zoo (attention/variants/): each normaliser's formula, its softmax limit, float64 gradients,
the blocked kernel for NCS, the gamma ramp, the dead-at-initialisation warning. What every variant must do in BERT,
OPT and ViT (train, save and load...) is test_variant_suite.py's."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from outlierfree.attention import AttentionConfig
from outlierfree.attention.blocked import blocked_clipped_attention, blocked_kernel
from outlierfree.attention.eager import normalise
from outlierfree.attention.ramp import set_gamma_ramp
from outlierfree.attention.variants.sigmoid import sigmoid_attention
from outlierfree.attention.variants.sink import AttentionSink, softmax_with_sink
from outlierfree.attention.variants.softplus import softplus_attention
from outlierfree.attention.variants.softpick import softpick
from outlierfree.attention.softmax import clipped_softmax, keep_mask
from outlierfree.errors import OutlierfreeError
from outlierfree.models.build import DeadAttentionWarning, build_model

ZOO = ("ncs", "softmax1", "sink", "softpick", "sigmoid", "softplus")


def _scores(seed=0, shape=(2, 3, 5, 7), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * 2).requires_grad_(True)


def _pad_mask(B=2, Tq=5, Tk=7):
    keep = torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
    keep[1, ..., 4:] = False  # the second sequence has 4 real keys
    return keep


class _Module(torch.nn.Module):
    """Stands in for an attention module: the normalisers read the sink and the ramp from it."""


# ---- formulas and their softmax limits ---------------------------------------------------------------------
def test_ncs_is_the_authors_formula_and_softmax_at_eta_beta_one():
    x, keep = _scores().detach(), _pad_mask()
    cfg = AttentionConfig("ncs", eta=1.03, beta=1.0)
    p = normalise(_Module(), x, keep, cfg, 4)
    # BaohaoLiao/improved_transformer_v3 bert_attention.normalized_clipped_softmax, written out
    n = keep.sum(-1, keepdim=True).double()  # (B, 1, Tq, 1)
    factor, shift = (n * 1.03 - 1.0) / (n - 1), (1.0 - 1.03) / (n - 1)
    sm = F.softmax(x.masked_fill(~keep, -1e30), -1)
    ref = ((sm * factor + shift) * keep).clamp(0, 1)
    torch.testing.assert_close(p, ref)
    # a uniform row (equal scores) of any length keeps summing to beta
    u = normalise(_Module(), torch.zeros(1, 1, 3, 11, dtype=torch.float64), None, cfg.replace(beta=0.7), 4)
    torch.testing.assert_close(u.sum(-1), torch.full((1, 1, 3), 0.7, dtype=torch.float64))
    # eta = beta = 1 is softmax
    plain = normalise(_Module(), x, keep, cfg.replace(eta=1.0, beta=1.0), 4)
    torch.testing.assert_close(plain, clipped_softmax(x, 0.0, 1.0, keep))
    # a causal row with one key gets probability 1 (gamma = 0 there, not a division by zero)
    causal = keep_mask(None, 5, 5, causal=True)
    pc = normalise(_Module(), x[..., :5], causal, cfg, 4)
    assert torch.all(pc[..., 0, 0] == 1) and torch.isfinite(pc).all()


def test_softmax1_and_sink_are_softmax_with_an_extra_logit():
    x, keep = _scores().detach(), _pad_mask()
    # softmax1 = softmax over [x, 0] without the last column
    ext = torch.cat([x.masked_fill(~keep, -math.inf), torch.zeros(*x.shape[:-1], 1, dtype=x.dtype)], -1)
    torch.testing.assert_close(softmax_with_sink(x, 0.0, keep), F.softmax(ext, -1)[..., :-1])
    # a per-head sink logit b: softmax over [x, b]; b -> -inf is softmax
    b = torch.tensor([-1.0, 0.5, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    ext_b = torch.cat([x.masked_fill(~keep, -math.inf), b.expand(*x.shape[:-1], 1)], -1)
    torch.testing.assert_close(softmax_with_sink(x, b, keep), F.softmax(ext_b, -1)[..., :-1])
    torch.testing.assert_close(softmax_with_sink(x, -math.inf, keep), clipped_softmax(x, 0.0, 1.0, keep))
    # large scores do not overflow (the max is subtracted)
    assert torch.isfinite(softmax_with_sink(x.float() * 1000, 0.0, keep)).all()


def test_softpick_formula_masks_and_stability():
    x, keep = _scores().detach(), _pad_mask()
    e = torch.exp(x) - 1
    ref = (F.relu(e) * keep) / ((e.abs() * keep).sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(softpick(x, keep, 1e-6), ref)
    assert torch.all(softpick(x, keep)[~keep.expand_as(x)] == 0)
    big = softpick(torch.tensor([[500.0, 499.0, -3.0]]), None)  # exp(500) overflows float32; the stable form not
    assert torch.isfinite(big).all() and big[0, 2] == 0 and big.sum() <= 1
    assert torch.all(softpick(torch.tensor([[-1.0, -2.0]])) == 0)  # all scores <= 0: the head does nothing


def test_sigmoid_bias_is_minus_log_of_the_visible_keys():
    x, keep = _scores().detach(), _pad_mask()
    n = keep.sum(-1, keepdim=True).double()
    torch.testing.assert_close(sigmoid_attention(x, n, keep), torch.sigmoid(x - torch.log(n)) * keep)
    p = normalise(_Module(), x, keep, AttentionConfig("sigmoid"), 4)
    torch.testing.assert_close(p, torch.sigmoid(x - torch.log(n)) * keep)


def _lssa_reference(q, k, keep, power=None):
    """The paper's formula written out in float64 from q and k (arXiv:2501.13428 v4/v5, eqs. of LSSA and LSSAR):
    A = softplus((log d * log N) . Qn Kn^T) . M', rows l1-normalised; re-weighting relu(A . N - 1)^p, l1 again."""
    d = q.shape[-1]
    qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    cos = qn @ kn.transpose(-1, -2)  # (B, H, Tq, Tk) in [-1, 1]
    n = keep.sum(-1, keepdim=True).double()  # N: the keys each row sees
    a = torch.log1p(torch.exp(math.log(d) * torch.log(n) * cos)) * keep
    a = a / a.sum(-1, keepdim=True)
    if power is None:
        return a
    r = torch.clamp(a * n - 1, min=0) ** power
    return r / r.sum(-1, keepdim=True)


def test_softplus_is_the_papers_lssa_and_lssar_in_float64():
    from outlierfree.attention.eager import eager_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64) for _ in range(3))
    keep = _pad_mask(2, 5, 5)
    for power in (None, 3.0, 15.0):
        cfg = AttentionConfig("softplus", softplus_power=power)
        ctx, probs = eager_attention(_Module(), q, k, v, keep, 16 ** -0.5, 0.0, cfg)
        ref = _lssa_reference(q, k, keep, power)
        torch.testing.assert_close(probs, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ctx, ref @ v, rtol=1e-12, atol=1e-12)
    # cosine scores: rescaling a query or a key row changes nothing (the dot-product readings all change)
    p1 = eager_attention(_Module(), q * 7.0, k * 0.1, v, keep, 0.25, 0.0, AttentionConfig("softplus"))[1]
    torch.testing.assert_close(p1, _lssa_reference(q, k, keep))
    # a causal row with one key: lambda = 0, weight 1; with re-weighting it keeps that weight (nothing is above
    # uniform there, and relu(1 * 1 - 1) = 0 would leave no weight at all)
    causal = keep_mask(None, 5, 5, causal=True)
    for power in (None, 15.0):
        pc = eager_attention(_Module(), q, k, v, causal, 0.25, 0.0, AttentionConfig("softplus", softplus_power=power))[1]
        assert torch.all(pc[..., 0, 0] == 1) and torch.isfinite(pc).all()
        torch.testing.assert_close(pc.sum(-1), torch.ones_like(pc.sum(-1)))
    # float64 gradients through the l2 normalisation of q and k, the scale, softplus and the re-weighting
    small = [t[:1, :2, :4, :4].clone().requires_grad_(True) for t in (q, k, v)]
    for power in (None, 3.0):
        cfg = AttentionConfig("softplus", softplus_power=power)
        assert torch.autograd.gradcheck(
            lambda a, b, c: eager_attention(_Module(), a, b, c, keep[:1, :, :4, :4], 0.5, 0.0, cfg)[0], small)
    # the paper's rows sum to one, and the re-weighting only sharpens: the top weight never falls
    sharp = eager_attention(_Module(), q, k, v, keep, 0.25, 0.0, AttentionConfig("softplus", softplus_power=3.0))[1]
    plain = eager_attention(_Module(), q, k, v, keep, 0.25, 0.0, AttentionConfig("softplus"))[1]
    assert torch.all(sharp.amax(-1) >= plain.amax(-1) - 1e-12)


def test_softplus_other_scales_are_their_formulas():
    x, keep = _scores().detach(), _pad_mask()
    n = keep.sum(-1, keepdim=True).double()
    lam = torch.log(n) / math.log(16)  # the project's earlier reading, kept as softplus_scale="entropy"
    a = F.softplus(lam * x) * keep
    ref = a / a.sum(-1, keepdim=True)
    torch.testing.assert_close(normalise(_Module(), x, keep, AttentionConfig("softplus", softplus_scale="entropy"),
                                         16), ref)
    torch.testing.assert_close(softplus_attention(x, n, 16, "none", None, keep),
                               (F.softplus(x) * keep) / (F.softplus(x) * keep).sum(-1, keepdim=True))
    r = F.relu(n * ref - 1) ** 2
    torch.testing.assert_close(softplus_attention(x, n, 16, "entropy", 2.0, keep), r / r.sum(-1, keepdim=True))
    torch.testing.assert_close(ref.sum(-1), torch.ones_like(ref.sum(-1)))
    # the paper's scale on given (cosine) scores: lambda = log d * log n
    lam_p = math.log(16) * torch.log(n)
    a = F.softplus(lam_p * x.clamp(-1, 1)) * keep
    torch.testing.assert_close(softplus_attention(x.clamp(-1, 1), n, 16, "paper", None, keep),
                               a / a.sum(-1, keepdim=True))


# ---- gradients ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ZOO)
def test_gradcheck_float64(variant):
    keep = _pad_mask(2, 4, 5)
    x = _scores(1, (2, 3, 4, 5))
    cfg = AttentionConfig(variant, **({"softplus_power": 2.0} if variant == "softplus" else {}))
    m = _Module()
    if variant == "sink":
        m.outlierfree_sink = AttentionSink(3, 0.3).double()
        assert torch.autograd.gradcheck(lambda s, b: softmax_with_sink(s, b.view(1, 3, 1, 1), keep),
                                        (x, torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64, requires_grad=True)))
    if variant == "ncs":  # keep clear of the clip's kinks, where the derivative jumps
        cfg = cfg.replace(eta=1.5, beta=0.9)
    assert torch.autograd.gradcheck(lambda s: normalise(m, s, keep, cfg, 8), (x,))


# ---- NCS in the blocked linear-memory kernel ---------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_ncs_blocked_kernel_matches_eager(causal):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., 6:] = False
    cfg = AttentionConfig("ncs", eta=1.2, beta=0.8)
    full = keep_mask(None, 9, 9, causal=True) & keep if causal else keep
    probs = normalise(_Module(), (q @ k.transpose(-1, -2)) * 0.5, full, cfg, 4)
    ref = probs @ v
    out = blocked_kernel(_Module(), q, k, v, keep, 0.5, 0.0, cfg.replace(block_size=4), causal=causal)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(ref)
    gr = torch.autograd.grad(ref, (q, k, v), go)
    gb = torch.autograd.grad(out, (q, k, v), go)
    for a, b in zip(gb, gr):
        torch.testing.assert_close(a, b)


# ---- gamma ramp --------------------------------------------------------------------------------------------
def test_gamma_ramp_scales_gamma_and_zero_is_softmax():
    cfg = AttentionConfig("clipped", gamma=-0.2)
    assert cfg.params.clip_params(8.0, 0.25) == (-0.05, 1.0)
    model = build_model("bert", "tiny", cfg, seed=0).eval()
    ref = build_model("bert", "tiny", "vanilla", seed=0).eval()
    ids = torch.randint(5, 100, (2, 16))
    set_gamma_ramp(model, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        set_gamma_ramp(model, 1.0)
        assert not torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits)


# ---- defaults that train -------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [17, 64, 128])
def test_dead_at_init_boundary(T):
    # near-uniform rows die exactly when -gamma >= zeta / (T - 1)
    edge = -1.0 / (T - 1)
    assert AttentionConfig("clipped", gamma=edge).dead_at_init(T) is not None
    assert AttentionConfig("clipped", gamma=edge * 0.99).dead_at_init(T) is None
    assert AttentionConfig("clipped", alpha=1.0, alpha_t="row").dead_at_init(T) is None
    assert AttentionConfig("ncs").dead_at_init(T) is None and AttentionConfig("ncs", beta=0).dead_at_init(T)
    # and the probabilities agree: a uniform row of T keys at the edge is all zeros
    p = clipped_softmax(torch.zeros(1, T, dtype=torch.float64), edge, 1.0)
    assert torch.all(p == 0)


def test_dead_config_warns_and_the_default_does_not():
    with pytest.warns(DeadAttentionWarning, match="alpha 1"):
        build_model("bert", "tiny", AttentionConfig("clipped", gamma=-0.025))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadAttentionWarning)
        build_model("bert", "tiny", AttentionConfig("clipped", alpha=1.0, alpha_t="row"))
        build_model("bert", "tiny", "ncs")


# ---- validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,needle", [
    ({"variant": "ncs", "eta": 0.9}, "eta must be >= 1"),
    ({"variant": "ncs", "beta": 1.5}, "beta must be in"),
    ({"variant": "ncs", "beta": -0.1}, "beta must be in"),
    ({"variant": "sink", "sink_init": float("nan")}, "sink init"),
    ({"variant": "softpick", "softpick_eps": 0.0}, "softpick eps"),
    ({"variant": "softplus", "softplus_scale": "cube"}, "unknown softplus scale"),
    ({"variant": "softplus", "softplus_power": 0.5}, "power must be >= 1"),
    ({"variant": "sigmoid", "impl": "sdpa"}, "cannot run on the fused SDPA"),
    ({"variant": "softpick", "impl": "blocked"}, "blocked kernel does not compute"),
])
def test_bad_parameters_name_the_fix(kw, needle):
    with pytest.raises(OutlierfreeError, match=needle) as e:
        AttentionConfig(**kw)
    assert "\n" not in str(e.value)


# ---- inside the models -----------------------------------------------------------------------------------------
def test_elementwise_gate_is_qwen3_next_output_gate():
    """Qwen3-Next (transformers' modeling_qwen3_next): gate = the second half of q_proj(hidden_states), where
    hidden_states is the attention module's input (after input_layernorm); attn_output.reshape(B, T, H * D) *
    sigmoid(gate), then o_proj. Ours with gate_type='elementwise' must be that, in OPT's layer 0."""
    cfg = AttentionConfig("gated", gate_type="elementwise")
    gated = build_model("opt", "tiny", cfg, seed=0).eval()
    plain = build_model("opt", "tiny", "vanilla", seed=0).eval()  # same base weights: gates are drawn after them
    seen = {}

    def grab(name):
        return lambda m, args, kwargs=None: seen.__setitem__(name, (kwargs or {}).get("hidden_states", args[0]
                                                                                      if args else None))

    for tag, model in (("g", gated), ("p", plain)):
        attn = model.model.decoder.layers[0].self_attn
        attn.register_forward_pre_hook(grab(tag + "_x"), with_kwargs=True)
        attn.out_proj.register_forward_pre_hook(lambda m, args, tag=tag: seen.__setitem__(tag + "_o", args[0]))
    ids = torch.randint(5, 200, (2, 10))
    with torch.no_grad():
        gated(input_ids=ids)
        plain(input_ids=ids)
        x = seen["g_x"]
        torch.testing.assert_close(x, seen["p_x"])
        gate = gated.model.decoder.layers[0].self_attn.outlierfree_gate.proj(x)  # (B, T, H * D), like Qwen's gate
        torch.testing.assert_close(seen["g_o"], seen["p_o"] * torch.sigmoid(gate))
