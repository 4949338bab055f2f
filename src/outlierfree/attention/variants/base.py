"""What an attention variant is: the base class every variant file subclasses, and its CLI flag declaration.

A variant is a frozen dataclass whose fields are its parameters (validated in ``__post_init__``, one-line errors
naming the fix) and whose class attributes and methods say everything the rest of the package asks about it:

    name, summary        its ``--attention`` name and one line for ``outlierfree models``
    flags                its CLI flags (:class:`Flag`): the train / demo commands build their options from them
    kernels              the kernels of attention/kernels.py that compute it (eager always)
    modules              the submodules it adds to each attention module (gates, sinks), made by submodules()
    needs_layer_input    the attention function must get the layer input x (a gate does)
    ramps                training's gamma ramp (attention/ramp.py) applies to it
    describe()           a short summary, e.g. ``clipped(gamma=-0.025, zeta=1)``
    normalise()          the attention weights of one call from its scores (the eager kernel)
    after_attention()    what it does to the attention output (a gate multiplies it)
    dead_at_init(T)      why it zeroes every near-uniform row of T keys at initialisation (None: it does not)

:class:`ClipVariant` is the base of the variants that are clipped softmax with some gamma and zeta (clipped, NCS):
the blocked kernel computes them, the gamma ramp scales their gamma, and their one gamma function is ``gamma_at``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from ..ramp import ramp_of
from ..softmax import clipped_softmax


@dataclass(frozen=True)
class Flag:
    """One CLI flag of a variant: ``--name-with-dashes`` sets the parameter ``name``.

    ``type`` is ``float``, ``int``, ``str`` or ``bool`` (an on/off flag); ``default`` is the default as ``--help``
    shows it (None: the field's default)."""

    name: str
    help: str
    type: type = float
    default: str | None = None

    @property
    def option(self) -> str:
        """The flag as typed: ``--gate-type``."""
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Variant:
    """Base of every attention variant (see the module docstring for what a subclass declares)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    flags: ClassVar[tuple[Flag, ...]] = ()
    kernels: ClassVar[tuple[str, ...]] = ("eager",)
    modules: ClassVar[tuple[str, ...]] = ()
    needs_layer_input: ClassVar[bool] = False
    ramps: ClassVar[bool] = False
    # the eager path normalises half-precision scores in float32 and casts back (as softmax does); False for the
    # variants that go through clipped_softmax, which does that itself
    upcast: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every parameter; raise :class:`OutlierfreeError` naming the bad value and the fix."""

    def describe(self) -> str:
        """A short human-readable summary of the variant and its parameters."""
        return self.name

    def needs_rows(self) -> bool:
        """Whether the weights depend on the number of keys each row sees (then ``n`` is a per-row tensor)."""
        return False

    def query_key(self, query: torch.Tensor, key: torch.Tensor, scaling: float
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The query, key and score scaling the scores ``scaling * q k^T`` are made of; unchanged for every
        variant but one whose scores are not scaled dot products (the paper's softplus attention: cosines)."""
        return query, key, scaling

    def normalise(self, module: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None,
                  n: torch.Tensor | float, head_dim: int) -> torch.Tensor:
        """Attention weights (B, H, Tq, Tk) from the masked, biased scores of one call.

        Args:
            module: the attention module (its submodules: a sink's logits; training's ramp factor).
            scores: (B, H, Tq, Tk); float32 or wider when ``upcast`` is true.
            mask: boolean "may attend", broadcastable to ``scores``, or None; masked keys must get exactly 0.
            n: keys each row sees, (.., Tq, 1) tensor or a number (the key length when ``needs_rows`` is false).
            head_dim: d_head.
        """
        raise NotImplementedError(f"{type(self).__name__} has no normaliser")

    def submodules(self, d_model: int, n_heads: int, head_dim: int) -> dict[str, nn.Module]:
        """The modules to add to one attention module, by the names in ``modules`` (saved with the model)."""
        return {}

    def after_attention(self, module: nn.Module, out: torch.Tensor, layer_input: torch.Tensor | None,
                        attention_mask: torch.Tensor | None, k_len: int, probe: Callable | None) -> torch.Tensor:
        """The attention output (B, Tq, H, D) after the variant (unchanged unless it gates its output)."""
        return out

    def dead_at_init(self, T: int) -> str | None:
        """Why this variant zeroes every near-uniform attention row of T keys at initialisation, or None."""
        return None

    def dead_fix(self, T: int) -> str:
        """What to pass instead when :meth:`dead_at_init` says the rows die."""
        return ""

    def for_model(self, max_len: int | None) -> "Variant":
        """The variant with what the model decides filled in (clipped softmax's fixed T)."""
        return self

    def to_fields(self) -> dict[str, Any]:
        """The parameters as a JSON-serialisable dict (unset ones, None, left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> "Variant":
        """Inverse of :meth:`to_fields`; also reads the variant's fields of a config written before issue 25."""
        return cls(**fields)

    def replace(self, **changes: Any) -> "Variant":
        """A validated copy with some parameters changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ClipVariant(Variant):
    """Clipped softmax with a gamma (<= 0, per row or not) and a zeta (>= 1): clip((zeta - gamma) p + gamma, 0, 1)."""

    kernels: ClassVar[tuple[str, ...]] = ("eager", "blocked")
    ramps: ClassVar[bool] = True
    upcast: ClassVar[bool] = False

    def gamma_at(self, n: torch.Tensor | float) -> torch.Tensor | float:
        """Gamma for rows that see ``n`` keys ((.., Tq, 1) tensor or a number)."""
        raise NotImplementedError

    def zeta_value(self) -> float:
        """The upper stretch zeta."""
        raise NotImplementedError

    def clip_params(self, n: torch.Tensor | float, ramp: float = 1.0) -> tuple[torch.Tensor | float, float]:
        """(gamma, zeta) for rows that see ``n`` keys; ``ramp`` in [0, 1] moves both from softmax's (gamma 0,
        zeta 1) to the target (the gamma ramp of training and of ``finetune``'s retrofit: at 0 the variant is softmax
        exactly, so a retrofit starts from the original model's outputs, also with zeta > 1 as NCS's eta).
        The eager path and the blocked kernel both use it."""
        gamma, zeta = self.gamma_at(n), self.zeta_value()
        if ramp != 1.0:
            gamma, zeta = gamma * ramp, 1.0 + (zeta - 1.0) * ramp
        return gamma, zeta

    def normalise(self, module: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None,
                  n: torch.Tensor | float, head_dim: int) -> torch.Tensor:
        gamma, zeta = self.clip_params(n, ramp_of(module))
        return clipped_softmax(scores, gamma, zeta, mask)


def finite(x: Any) -> bool:
    """Whether ``x`` is a finite number."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
