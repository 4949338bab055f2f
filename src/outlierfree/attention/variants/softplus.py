"""softplus: length-scaled softplus attention, LSSA (Gao, Spratling & Gionfrida, "Softplus Attention with
Re-weighting Boosts Length Extrapolation in Large Language Models", arXiv:2501.13428, v4/v5 = ICML 2026).

Queries and keys are l2-normalised per row (the scores are cosines in [-1, 1], no 1/sqrt(d_head)):

    p_j = softplus(lambda c_j) / sum_k softplus(lambda c_k),   lambda = log d_head * log n

with n the keys the row sees (the paper's matrix N, row i = i under its causal mask). Re-weighting, LSSAR
(``softplus_power`` p): r_j = relu(n p_j - 1) ** p, p'_j = r_j / sum_k r_k (weights above uniform amplified, the
rest removed); a row with no weight above uniform (a uniform row, a causal row with one key) would be all zeros
and keeps p instead (our guard; the paper does not say). ``softplus_scale``: ``paper`` (the above, default),
``entropy`` (this project's earlier reading of the abstract: lambda = log n / log d_head on the usual scaled dot
products), ``none`` (lambda = 1). docs/variants.md says how the formula was checked against the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import require
from .base import Flag, Variant, finite

# the paper's (cosine scores, lambda = log d_head * log n), the earlier reading (lambda = log n / log d_head on
# q k / sqrt(d_head)), or none (lambda = 1)
SOFTPLUS_SCALES = ("paper", "entropy", "none")


def softplus_qk(query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """l2-normalised query and key rows with score scaling 1, so that ``q k^T`` are cosines (the paper's LSSA)."""
    return F.normalize(query, dim=-1), F.normalize(key, dim=-1), 1.0  # (B, H, T, D), rows of norm 1


def softplus_attention(scores: torch.Tensor, n: torch.Tensor | float, head_dim: int, scale: str = "paper",
                       power: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softplus attention with l1 normalisation, a length scale and optional re-weighting (see the module
    docstring). With ``scale='paper'`` the scores must be the cosines of :func:`softplus_qk`."""
    logn = torch.log(n) if isinstance(n, torch.Tensor) else math.log(n)
    if scale == "paper":
        scores = scores * (math.log(head_dim) * logn)  # lambda (.., Tq, 1) or a number; 0 for a row of one key
    elif scale == "entropy":
        scores = scores * (logn / math.log(max(head_dim, 2)))
    a = F.softplus(scores)  # (B, H, Tq, Tk), > 0
    if mask is not None:
        a = a.masked_fill(~mask, 0.0)
    p = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    if power is not None:
        r = F.relu(n * p - 1.0) ** power  # above-uniform weights amplified, the rest removed
        total = r.sum(dim=-1, keepdim=True)  # (.., Tq, 1)
        # a row with nothing above uniform keeps its LSSA weights rather than becoming all zeros
        p = torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)
    return p


@dataclass(frozen=True)
class Softplus(Variant):
    """Softplus attention: ``softplus_scale`` paper|entropy|none, ``softplus_power`` p >= 1 (None: no
    re-weighting)."""

    softplus_scale: str = "paper"
    softplus_power: float | None = None

    name: ClassVar[str] = "softplus"
    summary: ClassVar[str] = "softplus(lambda cos(q, k)) / l1, lambda = log d_head log n (Gao et al. 2025)"
    flags: ClassVar[tuple[Flag, ...]] = (
        Flag("softplus_scale", f"softplus: {'|'.join(SOFTPLUS_SCALES)} (paper: cosine scores x log d_head log n; "
             f"entropy: log n / log d_head; none: 1)", str),
        Flag("softplus_power", "softplus: re-weighting power p >= 1", default="off"),
    )

    def validate(self) -> None:
        require(self.softplus_scale in SOFTPLUS_SCALES, f"unknown softplus scale {self.softplus_scale!r}",
                f"use one of {', '.join(SOFTPLUS_SCALES)}")
        if self.softplus_power is not None:
            require(finite(self.softplus_power) and self.softplus_power >= 1, f"softplus re-weighting power must "
                    f"be >= 1, got {self.softplus_power}", "pass e.g. 2 (or leave it out: no re-weighting)")

    def needs_rows(self) -> bool:
        return True

    def query_key(self, query: torch.Tensor, key: torch.Tensor, scaling: float
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
        return softplus_qk(query, key) if self.softplus_scale == "paper" else (query, key, scaling)

    def normalise(self, module: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None,
                  n: torch.Tensor | float, head_dim: int) -> torch.Tensor:
        return softplus_attention(scores, n, head_dim, self.softplus_scale, self.softplus_power, mask)

    def describe(self) -> str:
        p = f", power={self.softplus_power:g}" if self.softplus_power is not None else ""
        return f"softplus(scale={self.softplus_scale}{p})"
