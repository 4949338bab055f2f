"""The attention function that Hugging Face models call when ``attn_implementation == "outlierfree"``.

transformers' attention modules (BERT, OPT, ViT, Llama, Gemma, ...) project Q, K, V and then call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, scaling=..., dropout=...)``.
We register :func:`outlierfree_attention` under that interface (see ``models/hf_compat.py``), so every variant runs
inside the stock modeling code. Per-module state lives on the attention module itself:

    module.outlierfree        AttentionConfig of this layer (absent: vanilla)
    module.outlierfree_gate   AttentionGate (gated variant only)
    module.outlierfree_sink   AttentionSink (sink variant only): the learned per-head sink logits
    module.outlierfree_ramp   gamma ramp factor in [0, 1] set by training (clipped / NCS; absent: 1)
    module._outlierfree_x     the layer input x, stashed by a forward pre-hook, read once by the gate
    module.outlierfree_probe  optional callable ``probe(module, name, tensor) -> tensor`` used by analysis and the
                              quantization simulator to observe or replace q/k/v/scores/probs/context
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .config import CLIP_VARIANTS, SOFTMAX_VARIANTS, AttentionConfig
from .normalisers import normalise
from .softmax import keep_mask

VANILLA = AttentionConfig()

# Kernels for clipped softmax besides eager, by name: fn(query, key, value, keep, causal, scaling, gamma_cfg, ...)
# -> (B, H, Tq, D). The blocked two-pass kernel registers itself here (attention/blocked.py).
CLIPPED_KERNELS: dict[str, Callable[..., torch.Tensor]] = {}
# Chooses the clipped implementation for impl="auto" (the kernel module may replace it).
AUTO_CLIPPED: list[Callable[[torch.Tensor, torch.Tensor], str]] = [lambda q, k: "eager"]


def _attentions_requested() -> bool:
    from ..models.hf_compat import attentions_requested  # lazy: hf_compat imports this module

    return attentions_requested()


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hk, T, D) -> (B, Hk * n_rep, T, D) for grouped-query attention."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def eager_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    keep: torch.Tensor | None, scaling: float, dropout: float, cfg: AttentionConfig,
                    probe: Callable | None = None, softcap: float | None = None,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised attention: returns context (B, H, Tq, D) and probabilities (B, H, Tq, Tk).

    ``bias`` (an additive float mask, T5's position bias, ALiBi...) is added to the scores *after* the ``scores``
    probe, as the paper's reference code quantizes the scores before the mask: a bias is never a site."""
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


def outlierfree_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention-interface function for every outlierfree variant.

    Args:
        query: (B, H, Tq, D); key, value: (B, Hk, Tk, D) with H a multiple of Hk.
        attention_mask: boolean (True = attend) or additive float mask broadcastable to (B, H, Tq, Tk), or None.
    Returns:
        context (B, Tq, H, D) (gated if the variant is gated) and the probabilities (B, H, Tq, Tk) when they were
        materialised, else None.
    """
    cfg: AttentionConfig = getattr(module, "outlierfree", None) or VANILLA
    probe = getattr(module, "outlierfree_probe", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    B, H, Tq, D = query.shape
    Tk = key.shape[-2]
    causal = bool(getattr(module, "is_causal", False)) and kwargs.get("is_causal", True) is not False
    n_rep = H // key.shape[1]
    if probe is not None:
        query, key, value = (probe(module, n, t) for n, t in (("query", query), ("key", key), ("value", value)))
    softcap = kwargs.get("softcap")
    # additive terms of the scores: a float mask (0 / large negative, or a real bias) and T5's position bias
    bias = kwargs.get("position_bias")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        m = attention_mask[..., -Tk:]
        bias = m if bias is None else bias + m

    probs = None
    want_probs = probe is not None or bool(kwargs.get("output_attentions")) or _attentions_requested()
    impl = cfg.impl
    # three routes: clipped / NCS may take a registered kernel (blocked), softmax variants take SDPA, the rest (and
    # anything that must show its probabilities) the eager path
    if cfg.variant in CLIP_VARIANTS and not want_probs:
        if impl == "auto":
            impl = AUTO_CLIPPED[0](query, key)
        if impl in CLIPPED_KERNELS and softcap is None and kwargs.get("position_bias") is None:
            kernel = CLIPPED_KERNELS[impl]
            flag = causal and attention_mask is None and getattr(kernel, "takes_causal", False)  # no T x T mask
            keep = keep_mask(attention_mask, Tq, Tk, causal and attention_mask is None and not flag, query.device)
            context = kernel(module, query, _repeat_kv(key, n_rep), _repeat_kv(value, n_rep), keep, scaling,
                             dropout if module.training else 0.0, cfg, **({"causal": True} if flag else {}))
        else:
            impl = "eager"
    elif cfg.variant in SOFTMAX_VARIANTS and impl in ("auto", "sdpa", "blocked") and not want_probs \
            and softcap is None and kwargs.get("position_bias") is None:
        impl = "sdpa"
    else:
        impl = "eager"

    if impl == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # lazy: keeps import cheap

        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, **kwargs)  # (B, Tq, H, D)
    else:
        if impl == "eager":
            keep = keep_mask(attention_mask, Tq, Tk, causal and attention_mask is None, query.device)
            context, probs = eager_attention(module, query, _repeat_kv(key, n_rep), _repeat_kv(value, n_rep), keep,
                                             scaling, dropout, cfg, probe, softcap, bias)
        if probe is not None:
            context = probe(module, "context", context)
        out = context.transpose(1, 2)  # (B, Tq, H, D)

    if cfg.variant == "gated":
        x = getattr(module, "_outlierfree_x", None)
        module._outlierfree_x = None  # drop the reference: activations must not outlive the step
        if x is None or x.shape[1] != Tq:
            raise RuntimeError("gated attention needs the layer input; was the model patched with outlierfree?")
        token_mask = None
        if cfg.gate_per == "head" and attention_mask is not None and Tk == Tq:
            token_mask = keep_mask(attention_mask, Tq, Tk, False)[:, 0].any(dim=-2)  # (B, Tk): real tokens
        gate = module.outlierfree_gate(x, token_mask)  # (B, Tq|1, H, 1|D)
        if probe is not None:
            gate = probe(module, "gate", gate)
        out = out * gate.to(out.dtype)
    return out.contiguous(), probs
