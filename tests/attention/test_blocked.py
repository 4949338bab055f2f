"""The blocked two-pass clipped-softmax kernel against eager float64 attention: outputs, gradients (gradcheck),
masks, causal, per-row T, ragged blocks, fully clipped / fully masked rows, dropout, whole models and training."""

import dataclasses
from types import MappingProxyType

import pytest
import torch

import outlierfree as of
from outlierfree import AttentionConfig
from outlierfree.attention import blocked as bl
from outlierfree.attention import kernels
from outlierfree.attention.blocked import blocked_clipped_attention
from outlierfree.attention.softmax import clipped_softmax, keep_mask, visible_keys


def swap_kernel(monkeypatch, name, **changes):
    """Replace one row of the (read-only) kernel table for a test."""
    table = dict(kernels.KERNELS)
    table[name] = dataclasses.replace(table[name], **changes)
    monkeypatch.setattr(kernels, "KERNELS", MappingProxyType(table))


def eager_ref(q, k, v, gamma, zeta, keep=None, causal=False, scale=None):
    """The eager path: materialised clipped probabilities (T x T), autograd through torch ops."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    if causal:
        tri = keep_mask(None, Tq, Tk, True, q.device)
        keep = tri if keep is None else (keep & tri)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    return torch.matmul(clipped_softmax(s, gamma, zeta, keep), v)


def qkv(B, H, Tq, Tk, D, dtype=torch.float64, spread=2.0):
    q = (torch.randn(B, H, Tq, D, dtype=dtype) * spread).requires_grad_()
    k = (torch.randn(B, H, Tk, D, dtype=dtype) * spread).requires_grad_()
    v = torch.randn(B, H, Tk, D, dtype=dtype).requires_grad_()
    return q, k, v


def padding_keep(B, Tq, Tk, per_row=False):
    keep = torch.rand(B, 1, Tq if per_row else 1, Tk) > 0.3
    keep[..., 0] = True
    return keep


def compare(q, k, v, gamma, zeta, keep, causal, atol=1e-10, **kw):
    ref = eager_ref(q, k, v, gamma, zeta, keep, causal)
    out = blocked_clipped_attention(q, k, v, gamma, zeta, keep, causal, **kw)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    d_out = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (q, k, v), d_out)
    g_out = torch.autograd.grad(out, (q, k, v), d_out)
    for name, a, b in zip("qkv", g_out, g_ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"d{name}: {m}")
    return out


CASES = {
    # name: (B, H, Tq, Tk, D, mask, causal, q_block, k_block, tile_elems)
    "plain_one_pass": (2, 3, 17, 17, 8, None, False, 5, None, 1 << 19),
    "plain_two_pass_ragged": (2, 3, 17, 17, 8, None, False, 5, 4, 50),
    "padding_keys": (2, 2, 13, 13, 8, "keys", False, 4, None, 60),
    "padding_rows_two_pass": (2, 2, 13, 13, 8, "rows", False, 6, 5, 60),
    "causal_one_pass": (2, 2, 19, 19, 8, None, True, 7, None, 1 << 19),
    "causal_two_pass_ragged": (1, 3, 19, 19, 8, None, True, 7, 3, 40),
    "causal_kv_cache": (2, 2, 5, 12, 8, None, True, 2, 5, 1 << 19),
    "causal_and_padding": (2, 2, 11, 11, 4, "keys", True, 3, 4, 30),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("gamma_kind", ["fixed", "row"])
@pytest.mark.parametrize("zeta", [1.0, 1.05])
def test_matches_eager_float64(case, gamma_kind, zeta):
    B, H, Tq, Tk, D, mask, causal, qb, kb, te = CASES[case]
    q, k, v = qkv(B, H, Tq, Tk, D)
    keep = None if mask is None else padding_keep(B, Tq, Tk, per_row=mask == "rows")
    if gamma_kind == "fixed":
        gamma = -0.1
    else:  # alpha / T with T = the keys each row can see
        clipped = AttentionConfig("clipped", alpha=1.5, alpha_t="row").params
        gamma = clipped.gamma_at(visible_keys(keep, Tk, causal, Tq))
        gamma = gamma.double() if torch.is_tensor(gamma) else gamma  # a number when nothing is masked
    compare(q, k, v, gamma, zeta, keep, causal, q_block=qb, k_block=kb, tile_elems=te)


def test_causal_flag_counts_equal_the_materialised_mask():
    """visible_keys / gamma_at with the causal mask as a flag (the blocked kernel) and as a T x T tensor (eager)."""
    keep = padding_keep(2, 9, 9, per_row=True)
    tri = keep_mask(None, 9, 9, True)
    for m, causal in ((None, True), (keep, False), (keep, True)):
        full = tri if m is None else (m & tri if causal else m)
        assert torch.equal(visible_keys(m, 9, causal, 9), visible_keys(full, 9))
    cfg = AttentionConfig("clipped", alpha=2.0, alpha_t="row")
    gamma_at = cfg.params.gamma_at
    assert torch.equal(gamma_at(visible_keys(keep, 9, True, 9)), gamma_at(visible_keys(keep & tri, 9)))
    assert cfg.params.gamma_at(visible_keys(None, 9)) == -2.0 / 9
    # the kernel's (gamma, zeta) of clipped softmax and NCS are the eager path's
    for c in (cfg, AttentionConfig("ncs", eta=1.05, beta=0.9)):
        g, z = bl.clip_rows(c, keep, True, 9, 9)
        g_ref, z_ref = c.params.clip_params(visible_keys(keep & tri, 9))
        assert torch.equal(g, g_ref) and z == z_ref


@pytest.mark.parametrize("k_block", [None, 3])
def test_gradcheck(k_block):
    q, k, v = qkv(1, 2, 7, 7, 4, spread=1.5)
    keep = padding_keep(1, 7, 7)
    gamma = -0.6 / visible_keys(keep, 7, True, 7).double()

    def f(q, k, v):
        return blocked_clipped_attention(q, k, v, gamma, 1.1, keep, True, q_block=3, k_block=k_block, tile_elems=10)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)


def test_every_probability_clipped_gives_zero_output_and_gradient():
    # gamma = -0.5 with 8 keys of similar score: (1 - gamma) p + gamma < 0 for every key of every row
    q, k, v = qkv(1, 2, 6, 8, 4, spread=0.05)
    for kb in (None, 3):
        compare(q, k, v, -0.5, 1.0, None, False, q_block=4, k_block=kb)
        out = blocked_clipped_attention(q, k, v, -0.5, 1.0, q_block=4, k_block=kb)
        assert (out == 0).all()
        assert all((g == 0).all() for g in torch.autograd.grad(out.sum(), (q, k, v)))


def test_rows_seeing_no_key_give_zero_without_nan():
    q, k, v = qkv(2, 1, 5, 5, 4)
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[1, :, 2] = False  # row 2 of batch 1 sees nothing
    for kb in (None, 2):
        out = compare(q, k, v, -0.05, 1.0, keep, False, q_block=2, k_block=kb)
        assert (out[1, :, 2] == 0).all()
    # causal with more queries than keys: the first rows see nothing
    q2, k2, v2 = qkv(1, 1, 6, 4, 4)
    out = compare(q2, k2, v2, -0.05, 1.0, None, True, q_block=4, k_block=3)
    assert (out[0, 0, :2] == 0).all()


def test_dropout_is_reproducible_and_its_backward_regenerates_the_mask():
    q, k, v = qkv(1, 2, 6, 6, 4, spread=1.0)

    def f(q, k, v):
        return blocked_clipped_attention(q, k, v, -0.05, 1.0, q_block=4, k_block=4, tile_elems=8, dropout_p=0.3,
                                         seed=123)

    assert torch.equal(f(q, k, v), f(q, k, v))
    assert not torch.allclose(f(q, k, v), blocked_clipped_attention(q, k, v, -0.05, 1.0))
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)


def test_half_precision_matches_float32():
    q, k, v = qkv(1, 2, 33, 33, 16, dtype=torch.float32)
    ref = eager_ref(q, k, v, -0.025, 1.0)
    out = blocked_clipped_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), -0.025, 1.0, q_block=8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)


def test_flex_two_call_form_maths_on_cpu(monkeypatch):
    """FlexAttention's eager reference (no Triton) on the CPU: checks the two-call formula and its gradients.
    The compiled GPU kernel itself is only exercised by the CUDA test below."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)  # it refuses CPU + requires_grad
    q, k, v = qkv(2, 2, 9, 9, 8)
    keep = padding_keep(2, 9, 9)
    clipped = AttentionConfig("clipped", alpha=1.0, alpha_t="row").params
    gamma = clipped.gamma_at(visible_keys(keep, 9, True, 9)).double()
    for m, causal, g in ((None, False, -0.1), (keep, True, gamma)):
        ref = eager_ref(q, k, v, g, 1.05, m, causal)
        out = bl.flex_clipped_attention(q, k, v, g, 1.05, m, causal, compiled=False)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
        d = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), d), torch.autograd.grad(ref, (q, k, v), d)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_kernel_on_gpu_matches_blocked():
    q, k, v = (t.detach().cuda().float().requires_grad_() for t in qkv(2, 4, 256, 256, 64))
    for causal in (False, True):
        ref = blocked_clipped_attention(q, k, v, -0.03, 1.0, None, causal)
        out = bl.flex_clipped_attention(q, k, v, -0.03, 1.0, None, causal)
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)
        d = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), d), torch.autograd.grad(ref, (q, k, v), d)):
            torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


# ---- inside models ----------------------------------------------------------------------------------------------
def model_batch(family, model, T=24):
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        c = model.config
        return dict(pixel_values=torch.randn(2, c.num_channels, c.image_size, c.image_size, generator=g),
                    labels=torch.tensor([1, 3]))
    ids = torch.randint(5, model.config.vocab_size, (2, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, T - 7:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


@pytest.mark.parametrize("family", ["bert", "opt", "vit"])
@pytest.mark.parametrize("cfg", [dict(gamma=-0.03), dict(alpha=1.0, alpha_t="row", zeta=1.02)])
def test_whole_model_blocked_equals_eager(family, cfg):
    eager = of.build_model(family, "tiny", AttentionConfig("clipped", impl="eager", **cfg), seed=0).eval()
    blocked = of.build_model(family, "tiny", AttentionConfig("clipped", impl="blocked", block_size=5, **cfg),
                             seed=0).eval()
    for padded in (True, False):
        b = model_batch(family, eager)
        if not padded and "attention_mask" in b:
            b.pop("attention_mask")
        with torch.no_grad():
            a, o = eager(**b), blocked(**b)
        torch.testing.assert_close(o.logits, a.logits, atol=1e-5, rtol=0)


def test_causal_model_passes_a_flag_not_a_mask(monkeypatch):
    seen = []
    kernel = kernels.KERNELS["blocked"].fn

    def spy(module, q, k, v, keep, scaling, dropout, cfg, **kw):
        seen.append((keep, kw.get("causal", False)))
        return kernel(module, q, k, v, keep, scaling, dropout, cfg, **kw)

    swap_kernel(monkeypatch, "blocked", fn=spy)
    model = of.build_model("opt", "tiny", AttentionConfig("clipped", impl="blocked"), seed=0).eval()
    with torch.no_grad():
        model(input_ids=torch.randint(5, 100, (2, 16)))
    assert seen and all(keep is None and causal for keep, causal in seen)


def test_training_blocked_matches_eager_step_for_step():
    no_drop = dict(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    losses = {}
    for impl in ("eager", "blocked"):
        model = of.build_model("bert", "tiny", AttentionConfig("clipped", gamma=-0.03, impl=impl), seed=0, **no_drop)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        b = model_batch("bert", model, T=32)
        losses[impl] = []
        for _ in range(5):
            loss = model(**b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
        losses[impl + "_params"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(torch.tensor(losses["blocked"]), torch.tensor(losses["eager"]), atol=1e-5, rtol=0)
    assert losses["eager"][-1] < losses["eager"][0]  # it did train
    torch.testing.assert_close(losses["blocked_params"], losses["eager_params"], atol=1e-4, rtol=0)


def test_dropout_in_training_stays_on_the_blocked_kernel(monkeypatch):
    calls = []
    swap_kernel(monkeypatch, "eager", fn=lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("eager used")))
    model = of.build_model("bert", "tiny", AttentionConfig("clipped", impl="blocked"), seed=0).train()
    assert model.config.attention_probs_dropout_prob > 0
    out = model(**model_batch("bert", model))
    out.loss.backward()
    assert not calls and torch.isfinite(out.loss)


def test_auto_chooser():
    cfg = AttentionConfig("clipped", impl="auto")

    def choose(B, H, Tq, Tk):
        return kernels.choose_kernel(cfg, (B, H, Tq, Tk), want_probs=False)

    assert choose(32, 4, 128, 128) == "eager"  # 2M probabilities
    assert choose(1, 4, 1024, 1024) == "eager"  # 4M
    assert choose(8, 4, 512, 512) == "blocked"  # 8M
    assert choose(1, 4, 4096, 4096) == "blocked"
    assert choose(1, 4, 1, 4096) == "eager"  # one query row (decoding)


def test_auto_model_uses_blocked_on_long_sequences(monkeypatch):
    seen = []
    kernel = kernels.KERNELS["blocked"].fn

    def spy(*a, **kw):
        seen.append(1)
        return kernel(*a, **kw)

    # the tiny test model counts as "long"
    swap_kernel(monkeypatch, "blocked", fn=spy, auto_min_elems=2 * 2 * 24 * 24)
    model = of.build_model("bert", "tiny", AttentionConfig("clipped", impl="auto"), seed=0).eval()
    with torch.no_grad():
        model(**{k: v for k, v in model_batch("bert", model).items() if k != "labels"})
    assert len(seen) == model.config.num_hidden_layers


def test_gated_runs_on_sdpa_and_matches_eager(monkeypatch):
    import transformers.integrations.sdpa_attention as sd

    used = []
    real = sd.sdpa_attention_forward
    monkeypatch.setattr(sd, "sdpa_attention_forward", lambda *a, **k: used.append(1) or real(*a, **k))
    eager = of.build_model("bert", "tiny", AttentionConfig("gated", impl="eager"), seed=0).eval()
    b = model_batch("bert", eager)
    for impl in ("auto", "blocked"):  # blocked, for softmax variants, means the fused SDPA kernel
        used.clear()
        fused = of.build_model("bert", "tiny", AttentionConfig("gated", impl=impl), seed=0).eval()
        with torch.no_grad():
            torch.testing.assert_close(fused(**b).logits, eager(**b).logits, atol=1e-5, rtol=0)
        assert len(used) == fused.config.num_hidden_layers


def test_cli_flags_select_blocked():
    from outlierfree.cli import attention_from_flags

    cfg = attention_from_flags(dict(attention="clipped", attention_impl="blocked"))
    assert cfg.impl == "blocked" and cfg.variant == "clipped"
    model = of.build_model("opt", "tiny", cfg)
    assert of.models.build.attention_config_of(model).impl == "blocked"
