"""The eager attention kernel: materialises the scores and probabilities (B, H, Tq, Tk) of any variant.

It is the one kernel that computes every variant, shows its probabilities (``output_attentions``, the probes of
analysis and the quantization simulator) and takes a softcap or an additive bias; see attention/kernels.py for when
the others run instead.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .config import AttentionConfig
from .normalisers import normalise, softplus_qk


def eager_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    keep: torch.Tensor | None, scaling: float, dropout: float, cfg: AttentionConfig,
                    probe: Callable | None = None, softcap: float | None = None,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised attention: returns context (B, H, Tq, D) and probabilities (B, H, Tq, Tk).

    ``bias`` (an additive float mask, T5's position bias, ALiBi...) is added to the scores *after* the ``scores``
    probe, as the paper's reference code quantizes the scores before the mask: a bias is never a site."""
    query, key, scaling = softplus_qk(cfg, query, key, scaling)  # the paper's softplus scores are cosines
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, Tq, Tk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if probe is not None:
        scores = probe(module, "scores", scores)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    probs = normalise(module, scores, keep, cfg, query.shape[-1])  # every variant: attention/normalisers.py
    if probe is not None:
        probs = probe(module, "probs", probs)
    if dropout > 0.0 and module.training:
        probs_d = F.dropout(probs, p=dropout, training=True)
    else:
        probs_d = probs
    context = torch.matmul(probs_d, value)  # (B, H, Tq, D)
    return context, probs
