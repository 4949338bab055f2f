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


def masked_abs(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """|x| as float32 (B, T, d) with padded tokens set to 0 (which never exceeds a real magnitude)."""
    a = x.detach().abs().float()
    return a if mask is None else a * mask.to(device=x.device, dtype=a.dtype)[..., None]


def token_max(a: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token max of magnitudes ``a = masked_abs(x, mask)`` (B, T, d) -> (B, T), padded tokens -inf."""
    norms = a.amax(dim=-1)  # (B, T)
    return norms if mask is None else norms.masked_fill(~mask.to(device=a.device, dtype=torch.bool), float("-inf"))


def sequence_kurtosis(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Kurtosis of each sequence over all values of its real tokens, (B,): m4 / m2^2 with central moments
    m_k = mean((x - mean(x))^k) (population moments; a Gaussian gives 3, not 0). NaN where undefined."""
    xd = x.detach().to(torch.float64, copy=True)  # (B, T, d) our own copy: modified in place below
    if mask is None:
        n = torch.full((x.shape[0],), float(x[0].numel()), dtype=torch.float64, device=x.device)
        w = None
    else:
        w = mask.to(device=x.device, dtype=torch.float64)[..., None]  # (B, T, 1): 1 real, 0 padding
        xd.mul_(w)
        n = w.sum(dim=(1, 2)) * x.shape[-1]  # (B,) number of values per sequence
    mean = xd.sum(dim=(1, 2)) / n  # (B,)
    c = xd.sub_(mean[:, None, None])  # (B, T, d) centred, in place (xd is our own float64 copy)
    if w is not None:
        c.mul_(w)  # padding back to zero
    c2 = c.square_()
    m2 = c2.sum(dim=(1, 2)) / n
    m4 = c2.square_().sum(dim=(1, 2)) / n
    k = m4 / (m2 * m2)
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
    return masked_abs(x, mask).amax(dim=(0, 1))


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
    """Attention mass each head puts on sets of keys, summed over real query rows.

    Args:
        p: probabilities (B, H, Tq, Tk).
        keys: boolean (B, Tk) for one set (e.g. delimiter tokens), or (B, Tk, S) for S sets at once.
        query_mask: boolean (B, Tq), True for real query rows (None: all).
    Returns:
        (mass summed over sequences and real rows: (H,) float64, or (H, S); number of real rows summed, scalar).
        Their ratio is the average over query rows of sum_{k in set} p[b, h, q, k].
    """
    B, H, Tq, Tk = p.shape
    one = keys.dim() == 2
    k = (keys[..., None] if one else keys).to(device=p.device, dtype=p.dtype if p.is_floating_point() else torch.float32)
    qm = torch.ones(B, Tq, dtype=torch.bool, device=p.device) if query_mask is None else query_mask.to(p.device)
    on_set = torch.matmul(p.detach(), k[:, None]).to(torch.float64)  # (B, H, Tq, S): row mass on each set
    mass = (on_set * qm.to(torch.float64)[:, None, :, None]).sum(dim=(0, 2))  # (H, S)
    return (mass[:, 0] if one else mass), qm.sum().to(torch.float64)
