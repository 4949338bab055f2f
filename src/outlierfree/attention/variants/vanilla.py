"""vanilla: softmax attention, the same outputs as stock transformers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..softmax import clipped_softmax
from .base import Variant


@dataclass(frozen=True)
class Vanilla(Variant):
    """softmax(s): no parameters. torch's fused SDPA kernel computes it."""

    name: ClassVar[str] = "vanilla"
    summary: ClassVar[str] = "softmax; same outputs as stock transformers"
    kernels: ClassVar[tuple[str, ...]] = ("eager", "sdpa")
    upcast: ClassVar[bool] = False

    def normalise(self, module: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None,
                  n: torch.Tensor | float, head_dim: int) -> torch.Tensor:
        return clipped_softmax(scores, 0.0, 1.0, mask)  # gamma = 0, zeta = 1: softmax bit for bit
