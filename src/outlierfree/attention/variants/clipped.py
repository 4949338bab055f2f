"""clipped: clipped softmax (Bondarenko et al. 2023, eq. 4.1).

    p = clip((zeta - gamma) softmax(s) + gamma, 0, 1),   gamma <= 0 <= 1 <= zeta

Gamma is a number (``gamma``) or ``-alpha / T`` with T fixed (``alpha_t='fixed'``: ``max_len``, the model's maximum
length unless given, the paper) or the keys each row sees (``alpha_t='row'``: padding and causal masks counted).
Without ``gamma`` or ``alpha``: alpha = 1 with T per row (gamma = -1/T), the strongest clip that keeps a near-uniform
row alive at any length; the paper's gamma = -0.025 zeroes every near-uniform row of T >= 41 keys (see
:meth:`Clipped.dead_at_init`). :meth:`Clipped.gamma_at` is the one place gamma is computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...errors import require
from .base import ClipVariant, Flag, finite

# Where T in gamma = -alpha / T comes from: a fixed length (the paper), or the keys each row can see.
ALPHA_T = ("fixed", "row")
# alpha and its T when neither gamma nor alpha is given: gamma = -1/T per row
DEFAULT_ALPHA, DEFAULT_ALPHA_T = 1.0, "row"


@dataclass(frozen=True)
class Clipped(ClipVariant):
    """Clipped softmax. Give ``gamma`` or ``alpha`` (not both); neither: alpha = 1, T per row.

    Attributes:
        gamma: lower stretch, <= 0 (None: from alpha).
        zeta: upper stretch, >= 1.
        alpha: gamma = -alpha / T.
        alpha_t: ``fixed`` (T = ``max_len``) or ``row`` (T = keys each query row sees); default ``fixed`` with an
            alpha, ``row`` without.
        max_len: T for ``alpha_t='fixed'``; filled from the model's maximum length when a model is patched.
    """

    gamma: float | None = None
    zeta: float = 1.0
    alpha: float | None = None
    alpha_t: str | None = None
    max_len: int | None = None

    name: ClassVar[str] = "clipped"
    summary: ClassVar[str] = "clip((zeta - gamma) softmax + gamma, 0, 1) (Bondarenko et al. 2023); gamma = -alpha/T"
    flags: ClassVar[tuple[Flag, ...]] = (
        Flag("gamma", "clipped softmax gamma (<= 0)", default="alpha 1 with T per row, gamma = -1/T"),
        Flag("zeta", "clipped softmax zeta (>= 1)"),
        Flag("alpha", "clipped softmax: gamma = -alpha / T", default="1 without --gamma"),
        Flag("alpha_t", f"T for --alpha: {'|'.join(ALPHA_T)}", str, default="row without --alpha, fixed with it"),
        Flag("max_len", "T for --alpha-t fixed", int, default="model max length"),
    )

    def __post_init__(self) -> None:
        require(self.gamma is None or self.alpha is None, "clipped softmax takes gamma or alpha, not both",
                "drop one of them (alpha sets gamma = -alpha / T)")
        if self.gamma is None and self.alpha is None:  # the one default, in Python and on the command line
            object.__setattr__(self, "alpha", DEFAULT_ALPHA)
            object.__setattr__(self, "alpha_t", self.alpha_t or DEFAULT_ALPHA_T)
        elif self.alpha is not None:
            object.__setattr__(self, "alpha_t", self.alpha_t or "fixed")
        else:  # a fixed gamma: T plays no part
            object.__setattr__(self, "alpha_t", None)
            object.__setattr__(self, "max_len", None)
        super().__post_init__()

    def validate(self) -> None:
        if self.gamma is not None:
            require(finite(self.gamma) and self.gamma <= 0, f"gamma must be <= 0, got {self.gamma}",
                    "pass a gamma such as -0.025 (gamma = 0 with zeta = 1 is plain softmax)")
        require(finite(self.zeta) and self.zeta >= 1, f"zeta must be >= 1, got {self.zeta}",
                "pass a zeta such as 1.0")
        if self.alpha is not None:
            require(finite(self.alpha) and self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}",
                    "pass an alpha such as 12 (gamma = -alpha / T)")
            require(self.alpha_t in ALPHA_T, f"unknown alpha T mode {self.alpha_t!r}",
                    f"use one of {', '.join(ALPHA_T)}")
        if self.max_len is not None:
            require(int(self.max_len) > 0, f"max_len must be positive, got {self.max_len}", "pass the training length")

    # ---- the one gamma function ----------------------------------------------------------------------------
    def gamma_at(self, n: torch.Tensor | float) -> torch.Tensor | float:
        """Gamma for rows that see ``n`` keys: ``gamma``, or ``-alpha / T`` with T = ``n`` (row) or ``max_len``."""
        if self.alpha is None:
            return self.gamma
        if self.alpha_t == "row":
            return -self.alpha / n
        require(self.max_len is not None, "alpha with a fixed T needs max_len",
                "pass --max-len (the training sequence length) or use --alpha-t row")
        return -self.alpha / float(self.max_len)

    def zeta_value(self) -> float:
        return self.zeta

    def needs_rows(self) -> bool:
        return self.alpha is not None and self.alpha_t == "row"

    def for_model(self, max_len: int | None) -> "Clipped":
        if self.alpha is not None and self.alpha_t == "fixed" and self.max_len is None:
            return dataclasses.replace(self, max_len=max_len)
        return self

    def dead_at_init(self, T: int) -> str | None:
        """A near-uniform row has p = 1/T on each key; clipped softmax maps it to (zeta - gamma) / T + gamma, which is
        <= 0 (every entry clipped, the row sums to 0 and gets no gradient) exactly when -gamma >= zeta / (T - 1),
        i.e. alpha >= zeta * T / (T - 1) with gamma = -alpha / T. Rows of 1 key (T = 1) never die. A fixed T not
        filled in yet is the row's T."""
        if T <= 1:
            return None
        unfilled = self.alpha is not None and self.alpha_t == "fixed" and self.max_len is None
        g = -self.alpha / float(T) if unfilled else self.gamma_at(T)
        if (self.zeta - g) / T + g > 0:
            return None
        return f"clipped softmax with gamma = {g:.4g} zeroes every near-uniform row of {T} keys at initialisation " \
               f"((zeta - gamma) / T + gamma <= 0)"

    def dead_fix(self, T: int) -> str:
        return f"pass --alpha 1 --alpha-t row (alpha <= 1, i.e. gamma >= -1/T = {-1 / T:.4g}) or train with " \
               f"--gamma-ramp-steps N (gamma grows from 0)"

    def describe(self) -> str:
        if self.alpha is not None:
            t = f"{self.alpha_t}{'=' + str(self.max_len) if self.alpha_t == 'fixed' else ''}"
            return f"clipped(alpha={self.alpha:g}/T[{t}], zeta={self.zeta:g})"
        return f"clipped(gamma={self.gamma:g}, zeta={self.zeta:g})"

    # ---- (de)serialisation -----------------------------------------------------------------------------------
    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> "Clipped":
        """Also reads configs written before issue 25, which stored gamma (default -0.025) beside alpha, where
        alpha, when set, decided."""
        if fields.get("alpha") is not None:
            fields = {k: v for k, v in fields.items() if k != "gamma"}
        return cls(**fields)

    def replace(self, **changes: Any) -> "Clipped":
        """A copy with some parameters changed; a new gamma replaces alpha (and its T) and a new alpha gamma."""
        if changes.get("gamma") is not None and "alpha" not in changes:
            changes.update(alpha=None, alpha_t=None, max_len=None)
        if changes.get("alpha") is not None and "gamma" not in changes:
            changes.update(gamma=None)
        return dataclasses.replace(self, **changes)
