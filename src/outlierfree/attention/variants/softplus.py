"""softplus: length-scaled softplus attention (Gao & Spratling 2025, "Softplus Attention with Re-weighting Boosts
Length Extrapolation in Large Language Models", arXiv:2501.13428).

    p_j = softplus(lambda s_j) / sum_k softplus(lambda s_k),   lambda = log n / log d_head

(the entropy-invariant scale; ``softplus_scale='none'``: lambda = 1). Re-weighting with power p (``softplus_power``)
sharpens the row: weights above uniform are amplified, those below removed,

    r_j = relu(n p_j - 1) ** p,   p'_j = r_j / sum_k r_k.

The stored copies of the paper gave us its abstract, not its equations: this is our reading of them
(docs/variants.md); the re-weighting is meant for inference-time length extrapolation.
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

# lambda = log(n) / log(d_head) (entropy-invariant), or none (lambda = 1)
SOFTPLUS_SCALES = ("entropy", "none")


def softplus_attention(scores: torch.Tensor, n: torch.Tensor | float, head_dim: int, scale: str = "entropy",
                       power: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softplus attention with l1 normalisation, the length scale ``log n / log d_head`` and optional re-weighting
    (see the module docstring)."""
    if scale == "entropy":
        logn = torch.log(n) if isinstance(n, torch.Tensor) else math.log(n)
        lam = logn / math.log(max(head_dim, 2))  # (.., Tq, 1) or a number; 1 when n == d_head
        scores = scores * lam
    a = F.softplus(scores)  # (B, H, Tq, Tk), > 0
    if mask is not None:
        a = a.masked_fill(~mask, 0.0)
    p = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    if power is not None:
        r = F.relu(n * p - 1.0) ** power  # above-uniform weights amplified, the rest removed
        p = r / r.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(r.dtype).tiny)
    return p


@dataclass(frozen=True)
class Softplus(Variant):
    """Softplus attention: ``softplus_scale`` entropy|none, ``softplus_power`` p >= 1 (None: no re-weighting)."""

    softplus_scale: str = "entropy"
    softplus_power: float | None = None

    name: ClassVar[str] = "softplus"
    summary: ClassVar[str] = "softplus(lambda x) / l1, lambda = log n / log d_head (Gao & Spratling 2025)"
    flags: ClassVar[tuple[Flag, ...]] = (
        Flag("softplus_scale", f"softplus: {'|'.join(SOFTPLUS_SCALES)} (lambda = log n / log d_head, or 1)", str),
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

    def normalise(self, module: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None,
                  n: torch.Tensor | float, head_dim: int) -> torch.Tensor:
        return softplus_attention(scores, n, head_dim, self.softplus_scale, self.softplus_power, mask)

    def describe(self) -> str:
        p = f", power={self.softplus_power:g}" if self.softplus_power is not None else ""
        return f"softplus(scale={self.softplus_scale}{p})"
