"""ncs: normalised clipped softmax (Liao & Monz 2024, "Is It a Free Lunch for Removing Outliers during
Pretraining?", arXiv:2402.12102, and the authors' code BaohaoLiao/improved_transformer_v3,
``normalized_clipped_softmax``).

    p = clip( (n eta - beta) / (n - 1) * softmax(s) + (beta - eta) / (n - 1), 0, 1 ),   n > 1 keys in the row

and softmax itself for n = 1. It is clipped softmax with zeta = eta and gamma_n = -(eta - beta) / (n - 1): a
probability of 1 maps to eta and a uniform row (1/n each) to beta/n each, so the row's unclipped sum is beta for every
length. eta = beta = 1 is softmax exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import require
from .base import ClipVariant, Flag, finite


@dataclass(frozen=True)
class NCS(ClipVariant):
    """Normalised clipped softmax: a probability of 1 maps to ``eta`` (>= 1), a uniform row to rows summing to
    ``beta`` (0 <= beta <= eta), whatever the number of keys."""

    eta: float = 1.03
    beta: float = 1.0

    name: ClassVar[str] = "ncs"
    summary: ClassVar[str] = "normalised clipped softmax (Liao & Monz 2024): per-row stretch, any length, causal too"
    flags: ClassVar[tuple[Flag, ...]] = (
        Flag("eta", "ncs: a probability of 1 maps to eta (>= 1)"),
        Flag("beta", "ncs: a uniform row sums to beta (0..eta)"),
    )

    def validate(self) -> None:
        require(finite(self.eta) and self.eta >= 1, f"eta must be >= 1, got {self.eta}",
                "pass an eta such as 1.03 (eta = beta = 1 is plain softmax)")
        require(finite(self.beta) and 0 <= self.beta <= self.eta, f"beta must be in [0, eta = {self.eta}], got "
                f"{self.beta}", "pass beta = 1 (a uniform row keeps summing to 1, so attention trains)")

    def gamma_at(self, n: torch.Tensor | float) -> torch.Tensor | float:
        """gamma_n = -(eta - beta) / (n - 1), and 0 for a row with one key (softmax gives it 1; eta clips back)."""
        if isinstance(n, torch.Tensor):
            return -(self.eta - self.beta) / (n - 1).clamp_min(1) * (n > 1)
        return -(self.eta - self.beta) / (n - 1) if n > 1 else 0.0

    def zeta_value(self) -> float:
        return self.eta

    def needs_rows(self) -> bool:
        return True

    def dead_at_init(self, T: int) -> str | None:
        """NCS maps a uniform row to beta / T per key: dead only when beta = 0."""
        if T <= 1:
            return None
        return "beta = 0 maps a uniform row to all zeros" if self.beta <= 0 else None

    def dead_fix(self, T: int) -> str:
        return "pass beta = 1"

    def describe(self) -> str:
        return f"ncs(eta={self.eta:g}, beta={self.beta:g})"
