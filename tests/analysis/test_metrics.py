"""Metrics against hand-computed values and float64 references on small tensors with planted outliers."""

import math

import numpy as np
import pytest
import torch

from outlierfree.analysis import metrics


def _inf_norms(x, mask=None):
    """Per-sequence inf-norms as the analysis computes them (HiddenStats.update: masked_abs -> token_max -> max)."""
    from outlierfree.analysis.inputs import EvalBatch
    from outlierfree.analysis.stats import HiddenStats
    from outlierfree.sites import Site

    st = HiddenStats(Site("m:output", "ffn_output", 0, "m", "output"))
    full = torch.ones(x.shape[:2], dtype=torch.bool)
    st.update(x, EvalBatch({}, full if mask is None else mask, []))
    return st.inf_norms


def test_inf_norm_per_sequence_ignores_padding():
    x = torch.zeros(2, 3, 4)  # (B, T, d)
    x[0, 1, 2] = -7.0
    x[1, 0, 0] = 2.0
    x[1, 2, 3] = 100.0  # padding: must not count
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert _inf_norms(x, mask) == [7.0, 2.0]
    assert _inf_norms(x) == [7.0, 100.0]
    tok = metrics.token_max(metrics.masked_abs(x, mask), mask)
    assert tok[0].tolist() == [0.0, 7.0, 0.0] and tok[1, 2] == float("-inf")
    # against a float64 reference on random values with ragged padding
    g = torch.Generator().manual_seed(4)
    y = torch.randn(3, 7, 5, generator=g, dtype=torch.float64) * 10
    m = torch.ones(3, 7, dtype=torch.bool)
    m[1, 4:] = False
    m[2, 1:] = False
    ref = [y[b][m[b]].abs().max().item() for b in range(3)]
    assert _inf_norms(y, m) == pytest.approx(ref, rel=1e-6)


def test_kurtosis_hand_values():
    # values {-1, 1}: m2 = 1, m4 = 1 -> kurtosis 1
    x = torch.tensor([[[-1.0, 1.0], [1.0, -1.0]]])
    assert metrics.sequence_kurtosis(x).item() == pytest.approx(1.0)
    # one spike a among n values: kurtosis = (1 + (n-1)^3) / ((n-1) n), independent of a
    n = 12
    spike = torch.zeros(1, 3, 4)
    spike[0, 2, 1] = 1e5  # Gemma-sized: the fourth power needs float64 moments
    expected = (1 + (n - 1) ** 3) / ((n - 1) * n)
    assert metrics.sequence_kurtosis(spike).item() == pytest.approx(expected, rel=1e-6)


def test_kurtosis_matches_float64_reference_and_excludes_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 8, generator=g) * torch.linspace(0.1, 5, 8)  # (B, T, d) uneven dimensions
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 3:] = False
    got = metrics.sequence_kurtosis(x, mask)
    for b in range(3):
        v = x[b][mask[b]].double().numpy().ravel()
        c = v - v.mean()
        ref = (c ** 4).mean() / (c ** 2).mean() ** 2
        assert got[b].item() == pytest.approx(ref, rel=1e-5)
    # a Gaussian sample's kurtosis is near 3
    big = torch.randn(1, 500, 200, generator=g)
    assert metrics.sequence_kurtosis(big).item() == pytest.approx(3.0, abs=0.05)


def test_reference_kurtosis_relation():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 5, generator=g) ** 3  # heavy tails
    n = 6 * 5
    ours = metrics.sequence_kurtosis(x).double()
    ref = metrics.reference_kurtosis(x.reshape(4, -1), eps=0.0)
    torch.testing.assert_close(ref, ours * ((n - 1) / n) ** 2, rtol=1e-5, atol=0)


def test_dim_abs_max_and_planted_outlier_dims():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 32, generator=g) * 0.5  # (B, T, d)
    x[1, 5, 7] = -40.0  # planted outlier dimension 7
    x[0, 2, 19] = 9.0  # dimension 19: above the absolute threshold, smaller than dimension 7
    pad = torch.ones(2, 16, dtype=torch.bool)
    dm = metrics.dim_abs_max(x, pad)
    assert dm[7].item() == 40.0 and dm[19].item() == 9.0
    med = float(dm.median())
    dims = metrics.outlier_dims(dm, abs_threshold=6.0, rel_threshold=6.0)
    assert dims["absolute"][:2] == [7, 19]  # sorted by magnitude
    assert set(dims["absolute"]) == {7, 19}
    assert dims["relative"] == [j for j in (7, 19) if dm[j] >= 6 * med]
    assert 7 in dims["relative"]
    # padding hides a planted value
    mask = pad.clone()
    mask[1, 5] = False
    assert metrics.dim_abs_max(x, mask)[7].item() < 6


def test_key_mass_hand_example():
    # one sequence, 2 heads, 3 queries, 3 keys; head 0 attends to key 2 (a delimiter), head 1 uniformly
    p = torch.zeros(1, 2, 3, 3)
    p[0, 0, :, 2] = 1.0
    p[0, 1] = 1.0 / 3
    keys = torch.tensor([[False, False, True]])
    mass, rows = metrics.key_mass(p, keys)
    assert rows.item() == 3
    torch.testing.assert_close(mass / rows, torch.tensor([1.0, 1 / 3], dtype=torch.float64))
    # several sets at once, and a padded query row that must not count
    sets = torch.stack([keys, torch.tensor([[True, False, False]])], dim=-1)  # (B, Tk, 2)
    qmask = torch.tensor([[True, True, False]])
    mass2, rows2 = metrics.key_mass(p, sets, qmask)
    assert rows2.item() == 2
    ref = np.array([[2.0, 0.0], [2 / 3, 2 / 3]])
    np.testing.assert_allclose(mass2.numpy(), ref, rtol=1e-6)


def test_empty_sequence_is_nan():
    x = torch.ones(1, 2, 3)
    mask = torch.zeros(1, 2, dtype=torch.bool)
    assert math.isnan(_inf_norms(x, mask)[0])
    assert math.isnan(metrics.sequence_kurtosis(x, mask).item())


def test_metrics_leave_their_input_unchanged():
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    before = x.clone()
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    for m in (None, mask):
        metrics.sequence_kurtosis(x, m)
        metrics.token_max(metrics.masked_abs(x, m), m)
        metrics.dim_abs_max(x, m)
    assert torch.equal(x, before)
