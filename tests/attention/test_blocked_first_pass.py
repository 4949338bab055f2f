"""The blocked clipped-softmax kernel's first pass by (mantissa, exponent) pairs (``first_pass="two_pass"``) against
today's online first pass: the same outputs and gradients within float rounding, one key block and several, masks,
causal, per-row gamma, rows that see nothing, scores beyond the pair's range; and the option through the kernel
table (``cfg.extra["first_pass"]``)."""

import math

import pytest
import torch

from outlierfree import AttentionConfig
from outlierfree.attention import two_pass as tp
from outlierfree.attention.blocked import blocked_clipped_attention, blocked_kernel
from outlierfree.attention.softmax import visible_keys
from outlierfree.errors import OutlierfreeError

BACKENDS = ["torch"] + (["compiled"] if tp.compiled_available() else [])

CASES = {
    # name: (B, H, Tq, Tk, D, mask, causal, q_block, k_block)
    "one_tile": (2, 3, 17, 17, 8, None, False, 5, None),
    "streamed_ragged": (2, 3, 17, 17, 8, None, False, 5, 4),
    "padding_rows_streamed": (2, 2, 13, 13, 8, "rows", False, 6, 5),
    "causal_one_tile": (2, 2, 19, 19, 8, None, True, 7, None),
    "causal_streamed": (1, 3, 19, 19, 8, None, True, 7, 3),
    "causal_kv_cache_no_key_rows": (2, 2, 6, 4, 8, None, True, 4, 3),  # the first rows see nothing
    "causal_and_padding": (2, 2, 11, 11, 4, "keys", True, 3, 4),
}


def inputs(B, H, Tq, Tk, D, mask, dtype, spread=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Tq, D, generator=g, dtype=dtype) * spread).requires_grad_()
    k = (torch.randn(B, H, Tk, D, generator=g, dtype=dtype) * spread).requires_grad_()
    v = torch.randn(B, H, Tk, D, generator=g, dtype=dtype).requires_grad_()
    keep = None
    if mask is not None:
        keep = torch.rand(B, 1, Tq if mask == "rows" else 1, Tk, generator=g) > 0.3
        keep[..., 0] = True
        if mask == "rows":
            keep[0, 0, 1] = False  # a row that sees no key
    return q, k, v, keep


def run(q, k, v, gamma, zeta, keep, causal, qb, kb, first_pass, d_out):
    out = blocked_clipped_attention(q, k, v, gamma, zeta, keep, causal, q_block=qb, k_block=kb, tile_elems=60,
                                    first_pass=first_pass)
    return (out, *torch.autograd.grad(out, (q, k, v), d_out))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma_kind", ["fixed", "row"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_pass_first_pass_equals_online(monkeypatch, backend, dtype, gamma_kind, case):
    if backend == "torch":
        monkeypatch.setattr(tp, "compiled_available", lambda: False)
        monkeypatch.setattr(tp.native, "library", lambda: None)
    B, H, Tq, Tk, D, mask, causal, qb, kb = CASES[case]
    q, k, v, keep = inputs(B, H, Tq, Tk, D, mask, dtype)
    if gamma_kind == "fixed":
        gamma, zeta = -0.1, 1.0
    else:
        gamma = AttentionConfig("clipped", alpha=1.5, alpha_t="row").params.gamma_at(visible_keys(keep, Tk, causal, Tq))
        gamma = gamma.to(dtype) if torch.is_tensor(gamma) else gamma
        zeta = 1.05
    d_out = torch.randn(B, H, Tq, D, dtype=dtype)
    ref = run(q, k, v, gamma, zeta, keep, causal, qb, kb, "online", d_out)
    got = run(q, k, v, gamma, zeta, keep, causal, qb, kb, "two_pass", d_out)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kb", [None, 3])
def test_gradcheck_two_pass_first_pass(kb):
    q, k, v, keep = inputs(1, 2, 7, 7, 4, "keys", torch.float64, spread=1.5)
    gamma = -0.3

    def f(q, k, v):
        return blocked_clipped_attention(q, k, v, gamma, 1.1, keep, True, q_block=3, k_block=kb, tile_elems=10,
                                         first_pass="two_pass")

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kb", [None, 2])
def test_scores_beyond_the_pair_range_fall_back_exactly(kb):
    """Scores with a row max beyond 2^21 (where x log2 e -> (n, t) loses bits): the kernel redoes that block with
    the online pass, so both options still agree."""
    q, k, v, _ = inputs(1, 1, 4, 5, 2, None, torch.float64)
    with torch.no_grad():
        q[..., 0, :] *= 3e6  # row 0's scores reach millions
    outs = [blocked_clipped_attention(q, k, v, -0.05, 1.0, q_block=4, k_block=kb, first_pass=fp)
            for fp in ("online", "two_pass")]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(outs[1]).all()


def test_option_through_the_kernel_table_and_bad_value():
    q, k, v, keep = inputs(2, 2, 9, 9, 4, "keys", torch.float32)
    module = torch.nn.Module()
    outs = {}
    for fp in ("online", "two_pass"):
        cfg = AttentionConfig("clipped", gamma=-0.05, impl="blocked", extra={"first_pass": fp})
        outs[fp] = blocked_kernel(module, q, k, v, keep, 0.5, 0.0, cfg, causal=True)
    torch.testing.assert_close(outs["two_pass"], outs["online"], rtol=2e-5, atol=2e-6)
    with pytest.raises(OutlierfreeError, match="unknown first pass"):
        blocked_clipped_attention(q, k, v, first_pass="three_pass")
    with pytest.raises(OutlierfreeError, match="unknown first pass"):
        blocked_kernel(module, q, k, v, keep, 0.5, 0.0, AttentionConfig("clipped", extra={"first_pass": "x"}))


def test_masked_key_rows_keep_the_no_key_convention():
    """A row that sees no key stores lse = +inf and returns 0 with either first pass (no NaN)."""
    q, k, v, _ = inputs(1, 1, 3, 4, 2, None, torch.float64)
    keep = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    keep[0, 0, 1] = False
    for kb in (None, 2):
        out = blocked_clipped_attention(q, k, v, -0.05, 1.0, keep, q_block=3, k_block=kb, first_pass="two_pass")
        assert (out[0, 0, 1] == 0).all() and torch.isfinite(out).all()
        assert not math.isnan(float(out.sum()))
