"""Outlier metrics on one batch of one site, as plain tensor functions (every formula is in docs/metrics.md).

Conventions: a hidden-state site is a tensor ``x`` of shape (B, T, d) (sequences, tokens, hidden dimensions) and
``mask`` is a boolean (B, T) tensor, True for real tokens (padding is never measured); an attention site is the
probability tensor ``p`` of shape (B, H, Tq, Tk). Moments are computed in float64, so that activations of order 1e5
(Gemma-3's massive activations) raised to the fourth power keep their precision.
"""

from __future__ import annotations

import torch

# LLM.int8() (Dettmers et al., 2022): a hidden dimension is an outlier feature where a magnitude reaches 6
DEFAULT_ABS_THRESHOLD = 6.0
# relative rule: a dimension whose largest magnitude is this many times the median dimension's largest magnitude
DEFAULT_REL_THRESHOLD = 6.0


def _mask_or_all(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) boolean mask, all True when ``mask`` is None."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.to(device=x.device, dtype=torch.bool)


def token_inf_norms(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """max_j |x[b, t, j]| per token, (B, T); padded tokens get -inf so that they never win a max."""
    m = _mask_or_all(x, mask)
    norms = x.detach().abs().amax(dim=-1).float()  # (B, T)
    return norms.masked_fill(~m, float("-inf"))


def sequence_inf_norms(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Infinity norm of each sequence over all its real tokens and hidden dimensions: max_{t,j} |x[b,t,j]|, (B,).

    A sequence without real tokens gets NaN (it is then skipped by the aggregates)."""
    v = token_inf_norms(x, mask).amax(dim=-1)  # (B,)
    return torch.where(torch.isinf(v), torch.full_like(v, float("nan")), v)


def sequence_kurtosis(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Kurtosis of each sequence over all values of its real tokens, (B,): m4 / m2^2 with central moments
    m_k = mean((x - mean(x))^k) (population moments; a Gaussian gives 3, not 0). NaN where undefined."""
    m = _mask_or_all(x, mask)
    xd = x.detach().to(torch.float64)  # (B, T, d)
    w = m.to(torch.float64)[..., None].expand_as(xd)  # (B, T, d) weights: 1 real, 0 padding
    n = w.sum(dim=(1, 2))  # (B,) number of values per sequence
    mean = (xd * w).sum(dim=(1, 2)) / n  # (B,)
    c = (xd - mean[:, None, None]) * w  # (B, T, d) centred, padding zeroed
    m2 = (c ** 2).sum(dim=(1, 2)) / n
    m4 = (c ** 4).sum(dim=(1, 2)) / n
    k = m4 / m2 ** 2
    return torch.where((n > 0) & (m2 > 0), k, torch.full_like(k, float("nan"))).float()


def reference_kurtosis(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The reference code's kurtosis (``transformers_language/utils.py``), for comparison: x is (B, n) with every
    value of a sequence (padding included); ``mu4 / (std^4 + eps)`` with the unbiased (n - 1) std.

    For n values and no padding it equals ``sequence_kurtosis * ((n - 1) / n)^2`` up to the eps term."""
    x = x.detach().to(torch.float64)
    mu = x.mean(dim=1, keepdim=True)
    s = x.std(dim=1)
    mu4 = ((x - mu) ** 4).mean(dim=1)
    return mu4 / (s ** 4 + eps)


def dim_abs_max(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Largest magnitude of each hidden dimension over the real tokens of the batch, (d,)."""
    m = _mask_or_all(x, mask)
    a = x.detach().abs().float().masked_fill(~m[..., None], 0.0)  # (B, T, d)
    return a.amax(dim=(0, 1))


def outlier_dims(dim_max: torch.Tensor, abs_threshold: float = DEFAULT_ABS_THRESHOLD,
                 rel_threshold: float = DEFAULT_REL_THRESHOLD) -> dict[str, list[int]]:
    """Hidden dimensions whose largest magnitude ``dim_max[j]`` marks them as outlier features.

    ``absolute``: ``dim_max[j] >= abs_threshold`` (LLM.int8()'s rule, threshold 6);
    ``relative``: ``dim_max[j] >= rel_threshold * median(dim_max)`` (scale-free: finds dimensions that stand out
    in a model whose activations are all small or all large). Both sorted by magnitude, largest first."""
    order = torch.argsort(dim_max, descending=True)
    med = float(dim_max.float().median()) if dim_max.numel() else 0.0
    return {
        "absolute": [int(j) for j in order if float(dim_max[j]) >= abs_threshold],
        "relative": [int(j) for j in order if med > 0 and float(dim_max[j]) >= rel_threshold * med],
    }


def key_mass(p: torch.Tensor, keys: torch.Tensor, query_mask: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mass each head puts on a set of keys, summed over real query rows.

    Args:
        p: probabilities (B, H, Tq, Tk).
        keys: boolean (B, Tk), True for the keys in the set (e.g. delimiter tokens).
        query_mask: boolean (B, Tq), True for real query rows (None: all).
    Returns:
        (mass summed over sequences and real rows, (H,) float64; number of real rows summed, scalar).
        Their ratio is the average over query rows of sum_{k in set} p[b, h, q, k].
    """
    B, H, Tq, Tk = p.shape
    qm = torch.ones(B, Tq, dtype=torch.bool, device=p.device) if query_mask is None else query_mask.to(p.device)
    on_set = (p.detach().to(torch.float64) * keys.to(p.device, torch.float64)[:, None, None, :]).sum(-1)  # (B,H,Tq)
    mass = (on_set * qm.to(torch.float64)[:, None, :]).sum(dim=(0, 2))  # (H,)
    return mass, qm.sum().to(torch.float64)
