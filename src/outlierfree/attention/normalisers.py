"""Attention normalisers beside softmax: the variants that let a head put (near) zero weight on every key.

Each maps the scores s = scale * q k^T of one query row (its n visible keys; masked keys always get exactly 0) to
attention weights. n is counted per row, so padding and causal masks are accounted for (causal row i sees i + 1).

    ncs       Normalised clipped softmax (Liao & Monz 2024, "Is It a Free Lunch for Removing Outliers during
              Pretraining?", arXiv:2402.12102, and the authors' code BaohaoLiao/improved_transformer_v3,
              ``normalized_clipped_softmax``):
                  p = clip( (n eta - beta) / (n - 1) * softmax(s) + (beta - eta) / (n - 1), 0, 1 ),   n > 1
              and softmax itself for n = 1. It is clipped softmax with zeta = eta and gamma_n = -(eta - beta)/(n - 1):
              a probability of 1 maps to eta and a uniform row (1/n each) to beta/n each, so the row's unclipped sum
              is beta for every length. eta = beta = 1 is softmax exactly.
    softmax1  "Softmax plus one" (E. Miller, "Attention is off by one", 2023): p_j = exp(s_j) / (1 + sum_k exp(s_k)),
              i.e. an extra logit 0 in the denominator that takes the mass a head does not want to spend.
    sink      The same with a learned logit b_h per head (gpt-oss's attention sinks, OpenAI 2025):
              p_j = exp(s_j) / (exp(b_h) + sum_k exp(s_k)); b_h -> -inf is softmax. Stable form: with
              m = max(b_h, max_k s_k), p_j = exp(s_j - m) / (exp(b_h - m) + sum_k exp(s_k - m)).
    softpick  Rectified softmax (Zuhri et al. 2025, "Softpick: No Attention Sink, No Massive Activations with
              Rectified Softmax", arXiv:2504.20966): p_j = relu(exp(s_j) - 1) / (sum_k |exp(s_k) - 1| + eps).
              Stable form (the paper's): divide numerator and denominator by exp(m),
              p_j = relu(exp(s_j - m) - exp(-m)) / (sum_k |exp(s_k - m) - exp(-m)| + eps exp(-m)); we take
              m = max(0, max_k s_k) so that exp(-m) <= 1 never overflows. Rows need not sum to one; a row whose
              scores are all <= 0 is all zeros.
    sigmoid   Sigmoid attention (Ramapuram et al. 2024, Apple, "Theory, Analysis, and Best Practices for Sigmoid
              Self-Attention", arXiv:2409.04431): p_j = sigmoid(s_j + b) with b = -log n, so a uniform row of
              scores 0 sums to about 1 at any length. No normalisation over the row.
    softplus  Length-scaled softplus attention, LSSA (Gao, Spratling & Gionfrida, "Softplus Attention with
              Re-weighting Boosts Length Extrapolation in Large Language Models", arXiv:2501.13428, v4/v5 = ICML 2026):
              queries and keys are l2-normalised per row (so the scores are cosines in [-1, 1], no 1/sqrt(d_head)),
                  p_j = softplus(lambda c_j) / sum_k softplus(lambda c_k),   lambda = log d_head * log n,
              with n the keys the row sees (the paper's matrix N, row i = i under its causal mask). Re-weighting,
              LSSAR (``softplus_power`` p): r_j = relu(n p_j - 1) ** p,  p'_j = r_j / sum_k r_k  (weights above
              uniform amplified, the rest removed); a row with no weight above uniform (a uniform row, a causal row
              with one key) would be all zeros and keeps p instead (our guard; the paper does not say).
              ``softplus_scale``: ``paper`` (the above, default), ``entropy`` (this project's earlier reading of the
              abstract: lambda = log n / log d_head on the usual scaled dot products), ``none`` (lambda = 1).
Clipped softmax and NCS share :func:`clip_params` (gamma and zeta per row, times the training ramp factor), which
the eager path and the blocked kernel (attention/blocked.py) both use.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import AttentionConfig
from .softmax import clipped_softmax

# the attribute of an attention module that holds the gamma ramp factor in [0, 1] (absent: 1, the full gamma)
RAMP_ATTR = "outlierfree_ramp"


# ---- clipped softmax and NCS: gamma and zeta -----------------------------------------------------------------
def clip_params(cfg: AttentionConfig, n: torch.Tensor | float, ramp: float = 1.0
                ) -> tuple[torch.Tensor | float, float]:
    """(gamma, zeta) of a clipped or NCS config for rows that see ``n`` keys ((.., Tq, 1) tensor or a number).

    ``ramp`` in [0, 1] scales gamma (the gamma ramp of training: 0 -> no clipping below, 1 -> the target)."""
    if cfg.variant == "ncs":
        # gamma_n = -(eta - beta) / (n - 1), and 0 for a row with one key (softmax gives it 1; eta clips back to 1)
        if isinstance(n, torch.Tensor):
            gamma = -(cfg.eta - cfg.beta) / (n - 1).clamp_min(1) * (n > 1)
        else:
            gamma = -(cfg.eta - cfg.beta) / (n - 1) if n > 1 else 0.0
        zeta = cfg.eta
    else:
        g = cfg.fixed_gamma()
        gamma = g if g is not None else -cfg.alpha / n
        zeta = cfg.zeta
    if ramp != 1.0:
        gamma = gamma * ramp
    return gamma, zeta


def needs_rows(cfg: AttentionConfig) -> bool:
    """Whether a config's normaliser depends on the number of keys each row sees."""
    return cfg.variant in ("ncs", "sigmoid", "softplus") or (cfg.variant == "clipped" and cfg.fixed_gamma() is None)


def ramp_of(module: nn.Module) -> float:
    """The gamma ramp factor an attention module runs with now (1 unless training set it)."""
    return float(getattr(module, RAMP_ATTR, 1.0))


def set_gamma_ramp(model: nn.Module, factor: float) -> None:
    """Set the gamma ramp factor (clamped to [0, 1]) of every attention module: the training loop's one call per
    step. Clipped softmax and NCS then use ``factor * gamma``; other variants ignore it."""
    f = min(1.0, max(0.0, float(factor)))
    for m in model.modules():
        if getattr(m, "outlierfree", None) is not None:
            setattr(m, RAMP_ATTR, f)


# ---- the normalisers -------------------------------------------------------------------------------------------
def _masked_max(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Row max over visible keys, (.., Tq, 1); -inf for a row that sees nothing."""
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return scores.amax(dim=-1, keepdim=True)


def softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor | float = 0.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(s_j) / (exp(b) + sum_k exp(s_k))`` over the last dim: softmax1 (b = 0) or a learned sink.

    Args:
        scores: (B, H, Tq, Tk).
        sink: the extra logit b: a number, or a tensor broadcastable to (B, H, Tq, 1) (a (H,) logit as (1, H, 1, 1)).
        mask: boolean "may attend", broadcastable to ``scores``, or None.
    """
    m = _masked_max(scores, mask)  # (B, H, Tq, 1)
    b = sink if isinstance(sink, torch.Tensor) else torch.tensor(float(sink), dtype=scores.dtype,
                                                                 device=scores.device)
    m = torch.maximum(m, b.to(scores.dtype)).detach()  # any m gives the same value; detach keeps autograd small
    e = torch.exp(scores - m)  # (B, H, Tq, Tk), each <= 1
    if mask is not None:
        e = e.masked_fill(~mask, 0.0)
    return e / (e.sum(dim=-1, keepdim=True) + torch.exp(b - m))


def softpick(scores: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``relu(exp(s) - 1) / (sum |exp(s) - 1| + eps)`` over the last dim, masked keys excluded (stable form)."""
    m = _masked_max(scores, mask).clamp_min(0.0).detach()  # (B, H, Tq, 1); >= 0 so exp(-m) <= 1
    em = torch.exp(-m)
    d = torch.exp(scores - m) - em  # (B, H, Tq, Tk): (exp(s) - 1) / exp(m)
    if mask is not None:
        d = d.masked_fill(~mask, 0.0)  # a masked key would otherwise add |0 - 1| to the denominator
    return F.relu(d) / (d.abs().sum(dim=-1, keepdim=True) + eps * em)


def sigmoid_attention(scores: torch.Tensor, n: torch.Tensor | float, mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """``sigmoid(s - log n)`` elementwise; ``n`` is the keys each row sees ((.., Tq, 1) tensor or a number)."""
    logn = torch.log(n) if isinstance(n, torch.Tensor) else math.log(n)
    p = torch.sigmoid(scores - logn)
    return p.masked_fill(~mask, 0.0) if mask is not None else p


def softplus_qk(cfg: AttentionConfig, query: torch.Tensor, key: torch.Tensor, scaling: float
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The query, key and score scaling a variant's scores are made from: for the paper's softplus attention
    (``softplus_scale='paper'``), l2-normalised query and key rows with scaling 1, so that the scores are cosines;
    for every other variant ``(query, key, scaling)`` unchanged."""
    if cfg.variant == "softplus" and cfg.softplus_scale == "paper":
        return F.normalize(query, dim=-1), F.normalize(key, dim=-1), 1.0  # (B, H, T, D), rows of norm 1
    return query, key, scaling


def softplus_attention(scores: torch.Tensor, n: torch.Tensor | float, head_dim: int, scale: str = "paper",
                       power: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softplus attention with l1 normalisation, a length scale and optional re-weighting (see the module
    docstring). With ``scale='paper'`` the scores must be the cosines of :func:`softplus_qk`."""
    logn = torch.log(n) if isinstance(n, torch.Tensor) else math.log(n)
    if scale == "paper":
        scores = scores * (math.log(head_dim) * logn)  # lambda (.., Tq, 1) or a number; 0 for a row of one key
    elif scale == "entropy":
        scores = scores * (logn / math.log(max(head_dim, 2)))
    a = F.softplus(scores)  # (B, H, Tq, Tk), > 0
    if mask is not None:
        a = a.masked_fill(~mask, 0.0)
    p = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    if power is not None:
        r = F.relu(n * p - 1.0) ** power  # above-uniform weights amplified, the rest removed
        total = r.sum(dim=-1, keepdim=True)  # (.., Tq, 1)
        # a row with nothing above uniform keeps its LSSA weights rather than becoming all zeros
        p = torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)
    return p


def normalise(module: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None, cfg: AttentionConfig,
              head_dim: int) -> torch.Tensor:
    """The attention weights of any variant from the (masked, biased) scores (B, H, Tq, Tk): the eager path."""
    from .softmax import visible_keys

    Tk = scores.shape[-1]
    n = visible_keys(mask, Tk) if needs_rows(cfg) else float(Tk)
    if cfg.variant in ("clipped", "ncs"):
        gamma, zeta = clip_params(cfg, n, ramp_of(module))
        return clipped_softmax(scores, gamma, zeta, mask)
    if cfg.variant in ("vanilla", "gated"):
        return clipped_softmax(scores, 0.0, 1.0, mask)
    low = scores.dtype in (torch.float16, torch.bfloat16)
    x = scores.float() if low else scores  # half precision is normalised in float32, as softmax is
    if isinstance(n, torch.Tensor):
        n = n.to(x.dtype)
    if cfg.variant == "softmax1":
        p = softmax_with_sink(x, 0.0, mask)
    elif cfg.variant == "sink":
        p = softmax_with_sink(x, module.outlierfree_sink.logits(x.dtype), mask)
    elif cfg.variant == "softpick":
        p = softpick(x, mask, cfg.softpick_eps)
    elif cfg.variant == "sigmoid":
        p = sigmoid_attention(x, n, mask)
    elif cfg.variant == "softplus":
        p = softplus_attention(x, n, head_dim, cfg.softplus_scale, cfg.softplus_power, mask)
    else:
        raise ValueError(f"no normaliser for attention variant {cfg.variant!r}")
    return p.to(scores.dtype)


class AttentionSink(nn.Module):
    """The learned sink logits b_h of one attention layer (``variant='sink'``), one per head.

    They start at ``sink_init`` (default 0: softmax1 at initialisation, so an untrained sink takes 1/(n+1) of a
    uniform row and the layer starts close to softmax)."""

    def __init__(self, n_heads: int, init: float = 0.0):
        super().__init__()
        self.sink = nn.Parameter(torch.full((n_heads,), float(init)))  # (H,)

    def logits(self, dtype: torch.dtype) -> torch.Tensor:
        """(1, H, 1, 1): broadcastable to the scores."""
        return self.sink.to(dtype).view(1, -1, 1, 1)
