"""Clipped softmax against a plain float64 reference: masks, causal rows, per-row T, gradients."""

import pytest
import torch

from outlierfree.attention import AttentionConfig, clipped_softmax, keep_mask, visible_keys


def reference(scores, gamma, zeta, keep):
    """Written out the slow way, in float64, row by row."""
    out = torch.zeros_like(scores, dtype=torch.float64)
    B, H, Tq, Tk = scores.shape
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                vis = [j for j in range(Tk) if keep is None or bool(keep.expand(B, H, Tq, Tk)[b, h, i, j])]
                if not vis:
                    continue
                s = scores[b, h, i, vis].double()
                p = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
                g = gamma if not torch.is_tensor(gamma) else float(gamma.expand(B, H, Tq, 1)[b, h, i, 0])
                out[b, h, i, vis] = torch.clamp((zeta - g) * p + g, 0, 1)
    return out


def test_gamma0_zeta1_is_softmax_exactly():
    x = torch.randn(2, 3, 5, 7)
    assert torch.equal(clipped_softmax(x, 0.0, 1.0), torch.softmax(x, -1))


@pytest.mark.parametrize("gamma,zeta", [(-0.025, 1.0), (-0.2, 1.1), (0.0, 1.3)])
def test_matches_reference_unmasked(gamma, zeta):
    x = torch.randn(2, 2, 4, 6, dtype=torch.float64) * 3
    torch.testing.assert_close(clipped_softmax(x, gamma, zeta), reference(x, gamma, zeta, None))


def test_clipping_reaches_exact_zero_and_one():
    x = torch.tensor([[[[10.0, 0.0, 0.0, 0.0]]]], dtype=torch.float64)
    p = clipped_softmax(x, -0.1, 1.1)
    assert p[0, 0, 0, 0] == 1.0 and (p[0, 0, 0, 1:] == 0).all()


def test_padding_mask_gives_exact_zeros():
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    attn = torch.ones(2, 5, dtype=torch.bool)
    attn[1, 3:] = False
    keep = keep_mask(attn[:, None, None, :], 5, 5, causal=False)
    p = clipped_softmax(x, -0.025, 1.0, keep)
    assert (p[1, :, :, 3:] == 0).all()
    torch.testing.assert_close(p, reference(x, -0.025, 1.0, keep))
    # vanilla: rows still sum to one over the visible keys
    torch.testing.assert_close(clipped_softmax(x, 0.0, 1.0, keep).sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))


def test_additive_float_mask_is_understood():
    x = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    add = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    add[..., 2:] = torch.finfo(torch.float64).min
    keep = keep_mask(add, 3, 4, causal=False)
    assert keep.dtype == torch.bool and not keep[..., 2:].any() and keep[..., :2].all()


def test_causal_rows_and_per_row_T():
    Tq = Tk = 6
    x = torch.randn(1, 2, Tq, Tk, dtype=torch.float64)
    keep = keep_mask(None, Tq, Tk, causal=True)
    cfg = AttentionConfig("clipped", alpha=0.5, alpha_t="row")
    gamma = cfg.params.gamma_at(visible_keys(keep, Tk))
    # a causal row i sees i + 1 keys
    torch.testing.assert_close(gamma.flatten(), torch.tensor([-0.5 / (i + 1) for i in range(Tq)]).to(gamma))
    p = clipped_softmax(x, gamma, 1.0, keep)
    assert (p.triu(1) == 0).all()
    torch.testing.assert_close(p, reference(x, gamma, 1.0, keep))


def test_per_row_T_with_padding_and_fixed_T():
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    keep = keep_mask(attn[:, None, None, :], 4, 4, causal=False)
    g = AttentionConfig("clipped", alpha=2.0, alpha_t="row").params.gamma_at(visible_keys(keep, 4))
    assert g[0].unique().item() == -0.5 and g[1].unique().item() == -1.0
    fixed = AttentionConfig("clipped", alpha=12.0, max_len=512).params
    assert fixed.gamma_at(visible_keys(keep, 4)) == -12.0 / 512


def test_fully_masked_row_is_zero_not_nan():
    x = torch.randn(1, 1, 2, 3)
    keep = torch.tensor([[[[True, True, False], [False, False, False]]]])
    p = clipped_softmax(x, -0.1, 1.0, keep)
    assert torch.isfinite(p).all() and (p[0, 0, 1] == 0).all()


def test_gradcheck_clipped_softmax():
    # keep values away from the clip kinks, where the function is not differentiable
    x = torch.tensor([[[[1.0, 0.2, -0.5, 0.8], [0.3, 0.1, 0.0, -0.2], [2.0, -1.0, 0.5, 0.4]]]],
                     dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([True, True, True, False]).view(1, 1, 1, 4)
    assert torch.autograd.gradcheck(lambda t: clipped_softmax(t, -0.05, 1.05, keep), (x,))
    g = torch.tensor([-0.05, -0.02, -0.1], dtype=torch.float64).view(1, 1, 3, 1)
    assert torch.autograd.gradcheck(lambda t: clipped_softmax(t, g, 1.0), (x,))


def test_clipped_entries_get_no_gradient():
    x = torch.tensor([[[[5.0, 0.0, 0.0]]]], dtype=torch.float64, requires_grad=True)
    p = clipped_softmax(x, -0.3, 1.3)
    (p * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    assert p[0, 0, 0, 1] == 0 and p[0, 0, 0, 0] == 1
    assert (x.grad == 0).all()  # every entry sits in a clipped region
