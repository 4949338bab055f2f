"""softmax1: "softmax plus one" (E. Miller, "Attention is off by one", 2023).

    p_j = exp(s_j) / (1 + sum_k exp(s_k))

an extra logit 0 in the denominator takes the mass a head does not want to spend. Rows sum to less than one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .base import Variant
from .sink import softmax_with_sink


@dataclass(frozen=True)
class Softmax1(Variant):
    """softmax with an extra logit 0 in the denominator: no parameters."""

    name: ClassVar[str] = "softmax1"
    summary: ClassVar[str] = "softmax with an extra logit 0 in the denominator (Miller 2023)"

    def normalise(self, module: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None,
                  n: torch.Tensor | float, head_dim: int) -> torch.Tensor:
        return softmax_with_sink(scores, 0.0, mask)
