"""A toy attention variant, defined in one file as docs/variants.md says a new variant is: softmax at a learned
per-head temperature, ``softmax(s * exp(t_h))``, t_h starting at ``toy_init``.

Not a test module: test_variant_suite.py puts it in the variant table for its tests (the table itself is read-only
and lists the package's variants), so it goes through the same suite as every real variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from outlierfree.attention.softmax import clipped_softmax
from outlierfree.attention.variants.base import Flag, Variant, finite
from outlierfree.errors import require

TEMPERATURE = "outlierfree_toy_temperature"  # its submodule on each attention module


class LogTemperature(nn.Module):
    """One learned log-temperature per head."""

    def __init__(self, n_heads: int, init: float):
        super().__init__()
        self.log_t = nn.Parameter(torch.full((n_heads,), float(init)))  # (H,)

    def scale(self, dtype: torch.dtype) -> torch.Tensor:
        """exp(t_h) as (1, H, 1, 1), broadcastable to the scores."""
        return self.log_t.to(dtype).exp().view(1, -1, 1, 1)


@dataclass(frozen=True)
class Toy(Variant):
    """softmax(s * exp(t_h)), t_h learned per head, starting at ``toy_init`` (|toy_init| <= 3)."""

    toy_init: float = 0.0

    name: ClassVar[str] = "toy"
    summary: ClassVar[str] = "softmax at a learned per-head temperature (a test's toy)"
    flags: ClassVar[tuple[Flag, ...]] = (Flag("toy_init", "toy: initial per-head log-temperature"),)
    modules: ClassVar[tuple[str, ...]] = (TEMPERATURE,)

    def validate(self) -> None:
        require(finite(self.toy_init) and abs(self.toy_init) <= 3, f"toy init must be in [-3, 3], got "
                f"{self.toy_init}", "pass e.g. 0")

    def submodules(self, d_model: int, n_heads: int, head_dim: int) -> dict[str, nn.Module]:
        return {TEMPERATURE: LogTemperature(n_heads, self.toy_init)}

    def normalise(self, module: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None,
                  n: torch.Tensor | float, head_dim: int) -> torch.Tensor:
        return clipped_softmax(scores * getattr(module, TEMPERATURE).scale(scores.dtype), 0.0, 1.0, mask)

    def describe(self) -> str:
        return f"toy(init={self.toy_init:g})"
