"""Learned (LSQ+-style) quantization ranges: gradients checked in float64, forward identical to the simulator's."""

import pytest
import torch

from outlierfree.quant.config import QuantSpec
from outlierfree.quant.learned import LearnedRange, lsq_fake_quant
from outlierfree.quant.grid import fake_quant_range, qparams


def identity(t):
    return t


def _inputs(seed, n=40, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_surrogate_through_scale_zero_point_and_clamps(symmetric):
    """With rounding replaced by the identity (the straight-through estimator's assumption), the quantizer is
    smooth almost everywhere: gradcheck verifies the analytic gradients to x, lo and hi through the scale, the zero
    point, the maximum of a symmetric grid and the clamps against finite differences, in float64."""
    x = _inputs(0)
    x = x[(x.abs() - 2.0).abs() > 0.05]  # away from the clipping thresholds, where the surrogate has a kink
    x = x[(x + 1.5).abs() > 0.05]
    lo = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    hi = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    x.requires_grad_(True)

    def f(x, lo, hi):
        return lsq_fake_quant(x, lo, hi, 8, symmetric, signed=True, round_fn=identity)

    assert torch.autograd.gradcheck(f, (x, lo, hi), eps=1e-6, atol=1e-7)
    # the clipped values pass their gradient to the range, and inside values to x
    y = f(x, lo, hi).sum()
    gx, glo, ghi = torch.autograd.grad(y, (x, lo, hi))
    assert float(ghi) != 0 and (symmetric or float(glo) != 0)
    assert bool(((gx == 0) | (gx == 1)).all()) and 0 < int(gx.sum()) < len(x)  # clipped values pass nothing to x


def test_gradcheck_per_channel_surrogate():
    x = _inputs(1, 24).reshape(4, 6)
    lo = torch.tensor([-1.0, -2.0, -0.5, -1.2], dtype=torch.float64).view(4, 1).requires_grad_(True)
    hi = torch.tensor([1.1, 2.5, 0.7, 1.9], dtype=torch.float64).view(4, 1).requires_grad_(True)
    keep = ((x - lo.detach()).abs() > 0.05) & ((x - hi.detach()).abs() > 0.05)
    x = torch.where(keep, x, x + 0.2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: lsq_fake_quant(a, b, c, 8, False, round_fn=identity),
                                    (x, lo, hi), eps=1e-6, atol=1e-7)


def test_ste_gradient_is_lsq_closed_form():
    """With the straight-through round, the step-size gradient is LSQ's: round(x/s) - x/s inside the grid and the
    grid's end where clipped; the input gradient is 1 inside and 0 where clipped."""
    x = _inputs(2, 200).requires_grad_(True)
    hi = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    lo = torch.tensor(-1.0, dtype=torch.float64)  # |lo| < hi: the scale is hi / 127
    q = lsq_fake_quant(x, lo, hi, 8, True, signed=True)
    gx, ghi = torch.autograd.grad(q.sum(), (x, hi))
    s = 2.0 / 127
    v = x.detach() / s
    inside = (torch.round(v) >= -128) & (torch.round(v) <= 127)
    ds = torch.where(inside, torch.round(v) - v, torch.where(v > 0, torch.full_like(v, 127.0),
                                                                torch.full_like(v, -128.0)))
    torch.testing.assert_close(ghi, ds.sum() / 127, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, inside.double())
    assert 0 < int(inside.sum()) < len(x)  # both cases are exercised


@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_equals_the_simulators_fake_quant(symmetric):
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)) * 4
    lo, hi = torch.tensor(-3.0), torch.tensor(5.0)
    got = lsq_fake_quant(x.requires_grad_(True), lo, hi, 8, symmetric, signed=True)
    ref = fake_quant_range(x.detach(), lo, hi, 8, symmetric)
    scale = qparams(lo, hi, 8, symmetric)[0]
    # the same grid point for every value (the two differ only by float32 rounding of (q - z) * s)
    assert float((got.detach() - ref).abs().max()) < 1e-3 * float(scale)
    assert int((got.detach() != x.detach()).sum()) > 0 and len(torch.unique(ref)) <= 256


def test_learned_range_trains_both_ends_per_channel():
    spec = QuantSpec(8, True, "per_channel", "current_minmax")
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64).requires_grad_(True)
    lo, hi = torch.aminmax(w.detach(), dim=1)
    r = LearnedRange(lo * 0.5, hi * 0.5, spec).double()  # too narrow: clipping error pushes the range out
    loss = ((r(w) - w.detach()) ** 2).sum()
    loss.backward()
    assert r.b.grad.shape == (6,) and bool((r.b.grad < 0).all())  # every channel wants a wider range
    assert w.grad is not None and bool((w.grad != 0).any())
    a = LearnedRange(torch.tensor(-1.0), torch.tensor(1.0), QuantSpec(8, False))
    y = a(torch.linspace(-3, 3, 50, requires_grad=True))
    (y ** 2).sum().backward()
    assert a.a.grad is not None and a.b.grad is not None and float(a.a.grad) != 0
