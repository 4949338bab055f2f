"""softpick: rectified softmax (Zuhri et al. 2025, "Softpick: No Attention Sink, No Massive Activations with
Rectified Softmax", arXiv:2504.20966).

    p_j = relu(exp(s_j) - 1) / (sum_k |exp(s_k) - 1| + eps)

Stable form (the paper's): divide numerator and denominator by exp(m),
p_j = relu(exp(s_j - m) - exp(-m)) / (sum_k |exp(s_k - m) - exp(-m)| + eps exp(-m)); we take m = max(0, max_k s_k) so
that exp(-m) <= 1 never overflows. Rows need not sum to one; a row whose scores are all <= 0 is all zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import require
from ..softmax import masked_max
from .base import Flag, Variant, finite


def softpick(scores: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``relu(exp(s) - 1) / (sum |exp(s) - 1| + eps)`` over the last dim, masked keys excluded (stable form)."""
    m = masked_max(scores, mask).clamp_min(0.0).detach()  # (B, H, Tq, 1); >= 0 so exp(-m) <= 1
    em = torch.exp(-m)
    d = torch.exp(scores - m) - em  # (B, H, Tq, Tk): (exp(s) - 1) / exp(m)
    if mask is not None:
        d = d.masked_fill(~mask, 0.0)  # a masked key would otherwise add |0 - 1| to the denominator
    return F.relu(d) / (d.abs().sum(dim=-1, keepdim=True) + eps * em)


@dataclass(frozen=True)
class Softpick(Variant):
    """Rectified softmax with denominator epsilon ``softpick_eps`` (> 0)."""

    softpick_eps: float = 1e-6

    name: ClassVar[str] = "softpick"
    summary: ClassVar[str] = "relu(exp(x) - 1) / sum |exp(x) - 1| (Zuhri et al. 2025)"
    flags: ClassVar[tuple[Flag, ...]] = (Flag("softpick_eps", "softpick: denominator epsilon", default="1e-6"),)

    def validate(self) -> None:
        require(finite(self.softpick_eps) and self.softpick_eps > 0, f"softpick eps must be > 0, got "
                f"{self.softpick_eps}", "pass e.g. 1e-6")

    def normalise(self, module: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None,
                  n: torch.Tensor | float, head_dim: int) -> torch.Tensor:
        return softpick(scores, mask, self.softpick_eps)

    def describe(self) -> str:
        return f"softpick(eps={self.softpick_eps:g})"
