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
from .softmax import visible_keys


def eager_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    keep: torch.Tensor | None, scaling: float, dropout: float, cfg: AttentionConfig,
                    probe: Callable | None = None, softcap: float | None = None,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised attention: returns context (B, H, Tq, D) and probabilities (B, H, Tq, Tk).

    ``bias`` (an additive float mask, T5's position bias, ALiBi...) is added to the scores *after* the ``scores``
    probe, as the paper's reference code quantizes the scores before the mask: a bias is never a site."""
    query, key, scaling = cfg.params.query_key(query, key, scaling)  # softplus (paper): cosine scores
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, Tq, Tk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if probe is not None:
        scores = probe(module, "scores", scores)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    probs = normalise(module, scores, keep, cfg, query.shape[-1])  # every variant: its normalise()
    if probe is not None:
        probs = probe(module, "probs", probs)
    if dropout > 0.0 and module.training:
        probs_d = F.dropout(probs, p=dropout, training=True)
    else:
        probs_d = probs
    context = torch.matmul(probs_d, value)  # (B, H, Tq, D)
    return context, probs


def normalise(module: torch.nn.Module, scores: torch.Tensor, mask: torch.Tensor | None, cfg: AttentionConfig,
              head_dim: int) -> torch.Tensor:
    """The attention weights of any variant from the (masked, biased) scores (B, H, Tq, Tk): the variant's
    ``normalise`` with the keys each row sees (when it needs them), half precision normalised in float32."""
    variant = cfg.params
    Tk = scores.shape[-1]
    n = visible_keys(mask, Tk) if variant.needs_rows() else float(Tk)
    if not variant.upcast:
        return variant.normalise(module, scores, mask, n, head_dim)
    low = scores.dtype in (torch.float16, torch.bfloat16)
    x = scores.float() if low else scores  # half precision is normalised in float32, as softmax is
    if isinstance(n, torch.Tensor):
        n = n.to(x.dtype)
    return variant.normalise(module, x, mask, n, head_dim).to(scores.dtype)
