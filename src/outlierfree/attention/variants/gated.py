"""gated: gated attention. Each head's output is multiplied by ``sigmoid(G(x))`` before the output projection.

x is the attention layer's input (B, T, d_model); head h's output o_h (B, T, d_head) becomes
``o_h * sigmoid(G_h(x))``. A head can then switch itself off (gate -> 0) instead of learning a no-op through
extreme softmax logits (Bondarenko et al., 2023, eq. 4.2). The gate networks (``gate_type``):

    head_linear   G_h(x) = x_h . w_h + b_h                     x_h = head h's own slice of x (d_head features)
    linear        G_h(x) = x . w_h + b_h                       all d_model features (Qwen's head-wise gate)
    mlp           G_h(x) = w2_h . relu(W1_h x_h + b1_h) + b2_h  d_head -> d_head/4 -> 1
    elementwise   G_hd(x) = x . w_hd + b_hd                    one gate per output element (Qwen's element-wise)
    scalar        G_h = b_h                                    unconditional, one learned scalar per head

``gate_per='head'`` makes a conditional gate one value per head and sequence: the mean of G over (unpadded)
tokens. The bias starts at ``logit(gate_init)``; in ``gate_finetune`` mode the weights start at zero and the
output is divided by ``gate_init``, so a patched pretrained model is unchanged at initialisation.

The gate is the :class:`AttentionGate` submodule ``<attention module>.outlierfree_gate``. Its input x reaches the
attention function as the keyword argument :data:`GATE_INPUT`, added by a forward pre-hook of the attention module
(``models/build.py``); softmax itself is computed by any softmax kernel (eager, sdpa).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from ...errors import require
from ..softmax import clipped_softmax, keep_mask
from .base import Flag, Variant, finite

GATE = "outlierfree_gate"  # the submodule's name on an attention module (and in saved state dicts)
# The keyword argument that carries the layer input x (B, T, d_model) to the attention function.
GATE_INPUT = "outlierfree_gate_input"
GATE_TYPES = ("head_linear", "linear", "mlp", "elementwise", "scalar")
SLICE_GATE_TYPES = frozenset({"head_linear", "mlp"})  # gates that read each head's own slice of the layer input
# Conditioning of the conditional gates: one gate per token, or per head and sequence (mean over tokens).
GATE_PER = ("token", "head")


class AttentionGate(nn.Module):
    """The gate of one attention layer; ``forward(x)`` returns the multiplier for the per-head output."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, cfg: "Gated"):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.gate_type, self.gate_per = cfg.gate_type, cfg.gate_per
        self.scale = 1.0 / cfg.gate_init if cfg.gate_finetune else 1.0
        H, D = n_heads, head_dim
        if cfg.gate_type in SLICE_GATE_TYPES and H * D != d_model:
            raise ValueError(f"per-head gates need d_model == n_heads * d_head ({d_model} != {H} * {D})")
        if cfg.gate_type == "head_linear":
            self.weight = nn.Parameter(torch.empty(H, D))  # (H, D): one d_head -> 1 linear per head
            self.bias = nn.Parameter(torch.empty(H))
        elif cfg.gate_type == "linear":
            self.proj = nn.Linear(d_model, H)
        elif cfg.gate_type == "mlp":
            hidden = max(1, D // 4)
            self.w1 = nn.Parameter(torch.empty(H, D, hidden))  # (H, D, D/4)
            self.b1 = nn.Parameter(torch.zeros(H, hidden))
            self.w2 = nn.Parameter(torch.empty(H, hidden))  # (H, D/4)
            self.bias = nn.Parameter(torch.empty(H))
        elif cfg.gate_type == "elementwise":
            self.proj = nn.Linear(d_model, H * D)
        elif cfg.gate_type == "scalar":
            self.bias = nn.Parameter(torch.empty(H))
        self.reset_parameters(cfg)

    @torch.no_grad()
    def reset_parameters(self, cfg: "Gated") -> None:
        """Weights ~ N(0, 0.02^2) (zeros in fine-tuning mode); bias = logit(gate_init)."""
        std = 0.0 if cfg.gate_finetune else 0.02
        for name, p in self.named_parameters():
            if name.endswith("bias") and name in ("bias", "proj.bias"):
                p.fill_(cfg.gate_bias_init)
            elif name == "b1":
                p.zero_()
            else:
                p.normal_(0.0, std) if std > 0 else p.zero_()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Gate logits G(x): (B, T, H, 1), or (B, T, H, D) for ``elementwise``, or (1, 1, H, 1) for ``scalar``."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        if self.gate_type == "head_linear":
            xh = x.view(B, T, H, D)
            # multiply-and-sum rather than einsum: 2x faster at these small sizes on CPU (measured)
            return ((xh * self.weight).sum(-1) + self.bias)[..., None]
        if self.gate_type == "linear":
            return self.proj(x)[..., None]  # (B, T, H, 1)
        if self.gate_type == "mlp":
            xh = x.view(B, T, H, D)
            h = torch.relu(torch.einsum("bthd,hde->bthe", xh, self.w1) + self.b1)  # (B, T, H, D/4)
            return ((h * self.w2).sum(-1) + self.bias)[..., None]
        if self.gate_type == "elementwise":
            return self.proj(x).view(B, T, H, D)
        return self.bias.view(1, 1, H, 1)  # scalar

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Gate probabilities to multiply the (B, T, H, D) head outputs with.

        Args:
            x: the attention layer's input, (B, T, d_model).
            token_mask: optional (B, T) bool, True for real tokens; used by ``gate_per='head'`` to average over
                real tokens only.
        """
        g = self.logits(x)
        if self.gate_per == "head" and self.gate_type != "scalar":
            if token_mask is None:
                g = g.mean(dim=1, keepdim=True)  # (B, 1, H, 1|D)
            else:
                w = token_mask.to(g.dtype)[:, :, None, None]  # (B, T, 1, 1)
                g = (g * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        p = torch.sigmoid(g)
        return p * self.scale if self.scale != 1.0 else p


@dataclass(frozen=True)
class Gated(Variant):
    """Gated attention.

    Attributes:
        gate_type: gate network, one of :data:`GATE_TYPES`.
        gate_per: ``token`` (a gate per token) or ``head`` (one per head and sequence: mean over tokens).
        gate_init: initial gate probability ``p`` in (0, 1): the gate bias starts at ``logit(p)``.
        gate_finetune: for patching a pretrained model: gate weights start at zero and the output is divided by
            ``p``, so the patched model computes exactly what it did before at initialisation.
    """

    gate_type: str = "head_linear"
    gate_per: str = "token"
    gate_init: float = 0.25
    gate_finetune: bool = False

    name: ClassVar[str] = "gated"
    summary: ClassVar[str] = "softmax, output times sigmoid(G(x)) (Bondarenko et al. 2023; Qwen3-Next)"
    flags: ClassVar[tuple[Flag, ...]] = (
        Flag("gate_type", f"gate network: {'|'.join(GATE_TYPES)}", str),
        Flag("gate_per", f"gate conditioning: {'|'.join(GATE_PER)}", str),
        Flag("gate_init", "initial gate probability in (0, 1)"),
        Flag("gate_finetune", "zero-init gate weights and rescale by 1/p: a patched pretrained model is unchanged",
             bool, default="off"),
    )
    kernels: ClassVar[tuple[str, ...]] = ("eager", "sdpa")
    modules: ClassVar[tuple[str, ...]] = (GATE,)
    needs_layer_input: ClassVar[bool] = True
    upcast: ClassVar[bool] = False

    def validate(self) -> None:
        require(self.gate_type in GATE_TYPES, f"unknown gate type {self.gate_type!r}",
                f"use one of {', '.join(GATE_TYPES)}")
        require(self.gate_per in GATE_PER, f"unknown gate conditioning {self.gate_per!r}",
                f"use one of {', '.join(GATE_PER)}")
        require(finite(self.gate_init) and 0 < self.gate_init < 1,
                f"gate init probability must be in (0, 1), got {self.gate_init}", "pass a value such as 0.25")

    @property
    def gate_bias_init(self) -> float:
        """``logit(gate_init)``: the bias that makes ``sigmoid(G(x)) = gate_init`` when the weights are zero."""
        return math.log(self.gate_init / (1 - self.gate_init))

    def submodules(self, d_model: int, n_heads: int, head_dim: int) -> dict[str, nn.Module]:
        return {GATE: AttentionGate(d_model, n_heads, head_dim, self)}

    def normalise(self, module: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None,
                  n: torch.Tensor | float, head_dim: int) -> torch.Tensor:
        return clipped_softmax(scores, 0.0, 1.0, mask)  # softmax bit for bit

    def after_attention(self, module: nn.Module, out: torch.Tensor, layer_input: torch.Tensor | None,
                        attention_mask: torch.Tensor | None, k_len: int, probe: Callable | None) -> torch.Tensor:
        """``out * sigmoid(G(x))``: out (B, Tq, H, D), x the layer input (B, Tq, d_model)."""
        Tq = out.shape[1]
        if layer_input is None or layer_input.shape[1] != Tq:
            raise RuntimeError(f"gated attention needs the layer input; was the model patched with outlierfree? (the "
                               f"{type(module).__name__} module must pass its keyword arguments, which carry "
                               f"{GATE_INPUT}, on to the attention function)")
        token_mask = None
        if self.gate_per == "head" and attention_mask is not None and k_len == Tq:
            token_mask = keep_mask(attention_mask, Tq, k_len, False)[:, 0].any(dim=-2)  # (B, Tk): real tokens
        gate = getattr(module, GATE)(layer_input, token_mask)  # (B, Tq|1, H, 1|D)
        if probe is not None:
            gate = probe(module, "gate", gate)
        return out * gate.to(out.dtype)

    def describe(self) -> str:
        return f"gated({self.gate_type}, per={self.gate_per}, init={self.gate_init:g}" \
               f"{', finetune' if self.gate_finetune else ''})"
