"""sigmoid: sigmoid attention (Ramapuram et al. 2024, Apple, "Theory, Analysis, and Best Practices for Sigmoid
Self-Attention", arXiv:2409.04431).

    p_j = sigmoid(s_j - log n),   n = keys the row sees

so a uniform row of scores 0 sums to about 1 at any length. No normalisation over the row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .base import Variant


def sigmoid_attention(scores: torch.Tensor, n: torch.Tensor | float, mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """``sigmoid(s - log n)`` elementwise; ``n`` is the keys each row sees ((.., Tq, 1) tensor or a number)."""
    logn = torch.log(n) if isinstance(n, torch.Tensor) else math.log(n)
    p = torch.sigmoid(scores - logn)
    return p.masked_fill(~mask, 0.0) if mask is not None else p


@dataclass(frozen=True)
class Sigmoid(Variant):
    """sigmoid(s - log n) per entry: no parameters."""

    name: ClassVar[str] = "sigmoid"
    summary: ClassVar[str] = "sigmoid(x - log n), n = keys the row sees (Apple 2024)"

    def needs_rows(self) -> bool:
        return True

    def normalise(self, module: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None,
                  n: torch.Tensor | float, head_dim: int) -> torch.Tensor:
        return sigmoid_attention(scores, n, mask)

    def describe(self) -> str:
        return "sigmoid(bias=-log n)"
