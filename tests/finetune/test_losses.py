"""The outlier penalties of `outlierfree finetune` against float64 references, their gradients (gradcheck), and the
property each is chosen for."""

import pytest
import torch

from outlierfree.finetune.losses import outlier_penalty


def _sums(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 10, 8, generator=g, dtype=torch.float64)  # (B, T, D) residual sums
    x[0, 4, 2] = 40.0  # one outlier in the first sequence
    return x


def _reference(x: torch.Tensor, kind: str) -> torch.Tensor:
    rows = []
    for seq in x.reshape(x.shape[0], -1).tolist():  # plain Python over each sequence's values
        n = len(seq)
        mu = sum(seq) / n
        var = sum((v - mu) ** 2 for v in seq) / n
        peak = max(abs(v) for v in seq)
        rms = (sum(v * v for v in seq) / n) ** 0.5
        rows.append({"infnorm": peak, "crest": peak / rms,
                     "kurtosis": torch.log1p(torch.tensor(sum((v - mu) ** 4 for v in seq) / n / (var ** 2 + 1e-6),
                                                          dtype=torch.float64)).item()}[kind])
    return torch.tensor(sum(rows) / len(rows), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["infnorm", "crest", "kurtosis"])
def test_penalty_matches_a_float64_reference_and_passes_gradcheck(kind):
    x = _sums()
    torch.testing.assert_close(outlier_penalty([x], kind), _reference(x, kind), rtol=1e-9, atol=1e-9)
    # two tensors: the mean of the two; tokens flattened as (B * T, D) regrouped per sequence by ``batch``
    y = _sums(1)
    both = outlier_penalty([x, y.reshape(-1, 8)], kind, batch=3)
    torch.testing.assert_close(both, (_reference(x, kind) + _reference(y, kind)) / 2, rtol=1e-9, atol=1e-9)
    z = _sums(2)[:, :4, :3].clone().requires_grad_(True)  # small: gradcheck perturbs every value
    z.data[0, 1, 1] = 9.0  # a unique maximum, where max |x| is differentiable
    assert torch.autograd.gradcheck(lambda t: outlier_penalty([t], kind), (z,))


def test_crest_is_scale_free_where_infnorm_rewards_shrinking_the_whole_tensor():
    """A residual sum scaled down as a whole (free for the LayerNorm after it) lowers infnorm but not crest or
    kurtosis; removing the outlier lowers all three."""
    x = _sums()
    calm = x.clone()
    calm[0, 4, 2] = 1.0
    for kind in ("crest", "kurtosis"):
        torch.testing.assert_close(outlier_penalty([0.25 * x], kind), outlier_penalty([x], kind), rtol=1e-3, atol=0)
    assert outlier_penalty([0.25 * x], "infnorm") < 0.3 * outlier_penalty([x], "infnorm")
    for kind in ("infnorm", "crest", "kurtosis"):
        assert outlier_penalty([calm[:1]], kind) < 0.5 * outlier_penalty([x[:1]], kind)  # the sequence it sat in
