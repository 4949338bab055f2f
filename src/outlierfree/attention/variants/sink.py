"""sink: softmax with a learned logit b_h per head in the denominator (gpt-oss's attention sinks, OpenAI 2025).

    p_j = exp(s_j) / (exp(b_h) + sum_k exp(s_k))

b_h -> -inf is softmax. Stable form: with m = max(b_h, max_k s_k), p_j = exp(s_j - m) / (exp(b_h - m) + sum_k
exp(s_k - m)). The logits are the :class:`AttentionSink` submodule ``<attention module>.outlierfree_sink``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ...errors import require
from ..softmax import masked_max
from .base import Flag, Variant, finite

SINK = "outlierfree_sink"  # the submodule's name on an attention module (and in saved state dicts)


def softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor | float = 0.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(s_j) / (exp(b) + sum_k exp(s_k))`` over the last dim: softmax1 (b = 0) or a learned sink.

    Args:
        scores: (B, H, Tq, Tk).
        sink: the extra logit b: a number, or a tensor broadcastable to (B, H, Tq, 1) (a (H,) logit as (1, H, 1, 1)).
        mask: boolean "may attend", broadcastable to ``scores``, or None.
    """
    m = masked_max(scores, mask)  # (B, H, Tq, 1)
    b = sink if isinstance(sink, torch.Tensor) else torch.tensor(float(sink), dtype=scores.dtype,
                                                                 device=scores.device)
    m = torch.maximum(m, b.to(scores.dtype)).detach()  # any m gives the same value; detach keeps autograd small
    e = torch.exp(scores - m)  # (B, H, Tq, Tk), each <= 1
    if mask is not None:
        e = e.masked_fill(~mask, 0.0)
    return e / (e.sum(dim=-1, keepdim=True) + torch.exp(b - m))


class AttentionSink(nn.Module):
    """The learned sink logits b_h of one attention layer, one per head.

    They start at ``init`` (default 0: softmax1 at initialisation, so an untrained sink takes 1/(n+1) of a
    uniform row and the layer starts close to softmax)."""

    def __init__(self, n_heads: int, init: float = 0.0):
        super().__init__()
        self.sink = nn.Parameter(torch.full((n_heads,), float(init)))  # (H,)

    def logits(self, dtype: torch.dtype) -> torch.Tensor:
        """(1, H, 1, 1): broadcastable to the scores."""
        return self.sink.to(dtype).view(1, -1, 1, 1)


@dataclass(frozen=True)
class Sink(Variant):
    """Learned per-head attention sink starting at ``sink_init``."""

    sink_init: float = 0.0

    name: ClassVar[str] = "sink"
    summary: ClassVar[str] = "softmax with a learned logit per head in the denominator (gpt-oss)"
    flags: ClassVar[tuple[Flag, ...]] = (Flag("sink_init", "sink: initial per-head sink logit"),)
    modules: ClassVar[tuple[str, ...]] = (SINK,)

    def validate(self) -> None:
        require(finite(self.sink_init), f"sink init must be a finite logit, got {self.sink_init}", "pass e.g. 0")

    def submodules(self, d_model: int, n_heads: int, head_dim: int) -> dict[str, nn.Module]:
        return {SINK: AttentionSink(n_heads, self.sink_init)}

    def normalise(self, module: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None,
                  n: torch.Tensor | float, head_dim: int) -> torch.Tensor:
        return softmax_with_sink(scores, getattr(module, SINK).logits(scores.dtype), mask)

    def describe(self) -> str:
        return f"sink(init={self.sink_init:g})"
