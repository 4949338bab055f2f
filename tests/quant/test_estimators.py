"""Range estimators against torch.ao.quantization observers and on known distributions."""

import math

import pytest
import torch
from torch.ao.quantization import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, \
    PerChannelMinMaxObserver

from outlierfree.quant.config import QuantSpec
from outlierfree.quant.estimators import make_estimator
from outlierfree.quant.grid import fake_quant_range, qparams


def batches(n=5, shape=(64, 32), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale * (1 + i) + 0.3 * i for i in range(n)]


def sqnr(x, lo, hi, bits, sym=False):
    q = fake_quant_range(x.double(), torch.as_tensor(lo).double(), torch.as_tensor(hi).double(), bits, sym)
    return 10 * math.log10(float((x.double() ** 2).sum() / ((x.double() - q) ** 2).sum()))


def test_minmax_matches_torch_minmax_observer_and_its_qparams():
    est = make_estimator(QuantSpec(8, False, "per_tensor", "minmax"))
    obs = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    for x in batches():
        est.update(x)
        obs(x)
    lo, hi = est.range()
    assert float(lo) == float(obs.min_val) and float(hi) == float(obs.max_val)
    scale, zp, _, _ = qparams(lo, hi, 8, False)
    t_scale, t_zp = obs.calculate_qparams()
    assert float(scale) == pytest.approx(float(t_scale), rel=1e-6) and int(zp) == int(t_zp)


def test_current_minmax_is_the_last_batch():
    est = make_estimator(QuantSpec(8, False, "per_tensor", "current_minmax"))
    xs = batches()
    for x in xs:
        est.update(x)
    assert float(est.range()[0]) == float(xs[-1].min()) and float(est.range()[1]) == float(xs[-1].max())


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_running_minmax_matches_moving_average_observer(momentum):
    est = make_estimator(QuantSpec(8, False, "per_tensor", "running_minmax", momentum=momentum))
    obs = MovingAverageMinMaxObserver(averaging_constant=1 - momentum)
    for x in batches(16):
        est.update(x)
        obs(x)
    lo, hi = est.range()
    assert float(lo) == pytest.approx(float(obs.min_val), rel=1e-5)
    assert float(hi) == pytest.approx(float(obs.max_val), rel=1e-5)


def test_per_channel_minmax_matches_torch():
    est = make_estimator(QuantSpec(8, True, "per_channel", "minmax"))
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    for x in batches(3, (16, 8, 4)):
        est.update(x)
        obs(x)
    lo, hi = est.range()
    assert torch.allclose(lo, obs.min_val) and torch.allclose(hi, obs.max_val)


def test_percentile_matches_torch_quantile():
    xs = batches(3, (2000,))
    est = make_estimator(QuantSpec(8, False, "per_tensor", "percentile", percentile=99.0))
    for x in xs:
        est.update(x)
    lo, hi = est.range()
    ref_lo = sum(float(torch.quantile(x.double(), 0.01)) for x in xs) / 3
    ref_hi = sum(float(torch.quantile(x.double(), 0.99)) for x in xs) / 3
    assert float(lo) == pytest.approx(ref_lo, rel=1e-5) and float(hi) == pytest.approx(ref_hi, rel=1e-5)


def test_percentile_on_a_uniform_distribution():
    x = torch.linspace(-1, 1, 200001)
    est = make_estimator(QuantSpec(8, False, "per_tensor", "percentile", percentile=99.0))
    est.update(x)
    lo, hi = est.range()
    assert float(hi) == pytest.approx(0.98, abs=1e-4) and float(lo) == pytest.approx(-0.98, abs=1e-4)


def test_mse_clips_a_gaussian_near_the_known_optimum():
    # the MSE-optimal symmetric 4-bit clipping of a unit Gaussian is about 2.5 sigma (Banner et al. 2019: 2.55)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200000, generator=g)
    est = make_estimator(QuantSpec(4, True, "per_tensor", "mse"))
    est.update(x)
    lo, hi = est.range()
    absmax = max(-float(lo), float(hi))  # a symmetric grid spans [-absmax, absmax]
    assert 2.2 < absmax < 2.9
    assert sqnr(x, lo, hi, 4, True) > sqnr(x, x.min(), x.max(), 4, True) + 1.0


def test_mse_keeps_the_full_range_of_a_uniform_distribution():
    x = torch.rand(100000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    est = make_estimator(QuantSpec(8, False, "per_tensor", "mse"))
    est.update(x)
    lo, hi = est.range()
    assert float(hi) > 0.97 and float(lo) < -0.97


def test_histogram_matches_torch_histogram_observer_on_heavy_tails():
    g = torch.Generator().manual_seed(2)
    lap = torch.distributions.Laplace(0.0, 1.0)
    torch.manual_seed(2)
    xs = [lap.sample((20000,)) for _ in range(3)]
    est = make_estimator(QuantSpec(8, False, "per_tensor", "histogram"))
    obs = HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    for x in xs:
        est.update(x)
        obs(x)
    lo, hi = est.range()
    scale, zp = obs.calculate_qparams()
    t_lo, t_hi = float(scale) * (0 - int(zp)), float(scale) * (255 - int(zp))
    x = torch.cat(xs)
    ours, theirs, full = sqnr(x, lo, hi, 8), sqnr(x, t_lo, t_hi, 8), sqnr(x, x.min(), x.max(), 8)
    # the search minimises the squared error (= maximises SQNR): never worse than min-max, and at least as good
    # as torch's HistogramObserver search
    assert ours >= full - 1e-6
    assert ours > theirs - 0.05


def test_histogram_clips_heavy_tails_at_low_bits():
    torch.manual_seed(3)
    x = torch.distributions.StudentT(2.0).sample((50000,))  # very heavy tails
    est = make_estimator(QuantSpec(4, False, "per_tensor", "histogram"))
    est.update(x)
    lo, hi = est.range()
    assert float(hi) < 0.5 * float(x.max()) and float(lo) > 0.5 * float(x.min())
    assert sqnr(x, lo, hi, 4) > sqnr(x, x.min(), x.max(), 4) + 0.5


def test_histogram_rebins_when_the_range_grows():
    est = make_estimator(QuantSpec(8, False, "per_tensor", "histogram", bins=256))
    est.update(torch.linspace(0, 1, 1000))
    est.update(torch.linspace(-1, 3, 1000))
    assert float(est.hist.sum()) == pytest.approx(2000, rel=1e-9)  # no count is lost
    assert float(est.edges_lo[0]) == -1.0 and float(est.edges_hi[0]) == 3.0
