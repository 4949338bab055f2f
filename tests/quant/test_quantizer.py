"""Fake quantizer: round trip against torch.fake_quantize_per_tensor_affine, float64 reference, STE gradients."""

import pytest
import torch

from outlierfree.errors import OutlierfreeError
from outlierfree.quant.config import QuantConfig, QuantSpec, parse_bits
from outlierfree.quant.grid import fake_quant, fake_quant_range, int_range, qparams
from outlierfree.quant.quantizer import Quantizer


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_matches_torch_fake_quantize(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4096, generator=g) * 3 + 0.5
    lo, hi = torch.tensor(-2.0), torch.tensor(4.0)  # clips some values on both sides
    scale, zp, qmin, qmax = qparams(lo, hi, bits, symmetric)
    ours = fake_quant(x, scale, zp, qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zp.reshape(1).int(), qmin, qmax)
    # same integer grid point everywhere; the dequantized values agree up to float rounding of (q - zp) * scale
    diff = (ours - ref).abs()
    assert float(diff.max()) <= 1e-6 * float(x.abs().max())
    # the training path (divide, straight-through round) may land one step off at exact ties only
    ours_grad = fake_quant(x.clone().requires_grad_(), scale, zp, qmin, qmax).detach()
    assert float((ours_grad - ref).abs().max()) <= float(scale) * 1.0001
    assert float(((ours_grad - ref).abs() > float(scale) / 2).float().mean()) < 1e-2
    # and the grid holds at most 2^bits distinct values
    assert ours.unique().numel() <= 2 ** bits


def test_float32_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, dtype=torch.float64, generator=g)
    lo, hi = x.min(), x.max()
    q64 = fake_quant_range(x, lo, hi, 8, False)
    q32 = fake_quant_range(x.float(), lo.float(), hi.float(), 8, False).double()
    scale = float((hi - torch.clamp(lo, max=0)) / 255)
    assert float((q64 - q32).abs().max()) <= scale * 1.001  # at most one step, at ties
    assert float((q64 - q32).abs().gt(1e-5).float().mean()) < 1e-3
    # quantization error of a min-max grid is at most half a step
    assert float((q64 - x).abs().max()) <= scale / 2 + 1e-12


def test_grid_conventions_follow_reference_code():
    # asymmetric: the range is widened to contain zero, and zero is exactly representable
    scale, zp, qmin, qmax = qparams(torch.tensor(0.5), torch.tensor(2.0), 8, False)
    assert (qmin, qmax) == (0, 255) and float(zp) == 0.0 and float(scale) == pytest.approx(2.0 / 255)
    q = fake_quant(torch.tensor([0.0, -1.0, 3.0]), scale, zp, qmin, qmax)
    assert q.tolist() == pytest.approx([0.0, 0.0, 2.0])
    # symmetric: signed grid for mixed-sign ranges, unsigned for non-negative ones (softmax probabilities)
    s1, _, lo1, hi1 = qparams(torch.tensor(-1.0), torch.tensor(0.5), 8, True)
    assert (lo1, hi1) == int_range(8, True, True) == (-128, 127) and float(s1) == pytest.approx(1 / 127)
    s2, _, lo2, hi2 = qparams(torch.tensor(0.0), torch.tensor(1.0), 8, True)
    assert (lo2, hi2) == (0, 255) and float(s2) == pytest.approx(1 / 255)


def test_ste_gradient_matches_torch():
    x = torch.linspace(-3, 3, 601, dtype=torch.float32, requires_grad=True)
    scale, zp, qmin, qmax = qparams(torch.tensor(-1.0), torch.tensor(2.0), 8, False)
    fake_quant(x, scale, zp, qmin, qmax).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zp.reshape(1).int(), qmin, qmax).sum().backward()
    assert torch.equal(ours, x.grad)
    inside = (x > -0.99) & (x < 1.99)
    assert bool((ours[inside] == 1).all()) and bool((ours[(x < -1.1) | (x > 2.1)] == 0).all())


def test_ste_gradient_through_a_weighted_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(64, dtype=torch.float64, generator=g)
    q = Quantizer(QuantSpec(8, False, "per_tensor", "minmax"))
    (q(x, calibrate=True) * w).sum().backward()
    # min-max range: nothing is clipped, so the straight-through gradient is exactly w
    assert torch.allclose(x.grad, w)


def test_per_token_and_per_channel_ranges():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 16, generator=g) * torch.arange(1, 17).float()
    q = Quantizer(QuantSpec(8, False, "per_token", "current_minmax"))
    y = q(x)
    for b in range(2):
        for t in range(5):
            ref = fake_quant_range(x[b, t], x[b, t].min(), x[b, t].max(), 8, False)
            assert torch.allclose(y[b, t], ref)
    w = torch.randn(6, 4, generator=g) * torch.arange(1, 7).float()[:, None]
    qw = Quantizer(QuantSpec(4, True, "per_channel", "current_minmax"))
    yw = qw(w, calibrate=True)
    for c in range(6):
        assert torch.allclose(yw[c], fake_quant_range(w[c], w[c].min(), w[c].max(), 4, True))


@pytest.mark.parametrize("text", ["w0a8", "w8", "a8", "w17a8", "w8a1", "8a8", "w8a8x", ""])
def test_bad_bits_are_one_line_errors(text):
    with pytest.raises(OutlierfreeError) as e:
        parse_bits(text)
    assert "\n" not in str(e.value) and ";" in str(e.value)


def test_specs_validate():
    assert parse_bits("W4A16") == (4, 16)
    with pytest.raises(OutlierfreeError):
        QuantSpec(estimator="nope")
    with pytest.raises(OutlierfreeError):
        QuantSpec(bits=1)
    with pytest.raises(OutlierfreeError):
        QuantConfig(sites="everything")
    with pytest.raises(OutlierfreeError):
        QuantConfig(sites=("ln_input", "bogus"))
    with pytest.raises(OutlierfreeError):
        QuantConfig(activation=QuantSpec(granularity="per_channel"))
