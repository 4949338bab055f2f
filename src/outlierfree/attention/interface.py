"""The attention function that Hugging Face models call when ``attn_implementation == "outlierfree"``.

transformers' attention modules (BERT, OPT, ViT, Llama, Gemma, ...) project Q, K, V and then call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, scaling=..., dropout=..., **kwargs)``.
We register :func:`outlierfree_attention` under that interface (see ``hf_compat.py``), so every variant runs
inside the stock modeling code. It picks a kernel from attention/kernels.py's table (eager, blocked, sdpa) and
dispatches. Per-module state lives on the attention module itself:

    module.outlierfree        AttentionConfig of this layer (absent: vanilla)
    module.outlierfree_gate   the submodules the variant declares (``Variant.modules``, made by its
    module.outlierfree_sink   ``submodules()``): the gated variant's AttentionGate, the sink variant's AttentionSink
    module.outlierfree_ramp   gamma ramp factor in [0, 1] set by training (attention/ramp.py; absent: 1)
    module.outlierfree_probe  optional callable ``probe(module, name, tensor) -> tensor`` used by analysis and the
                              quantization simulator to observe or replace q/k/v/scores/probs/context

A variant's layer input x (``Variant.needs_layer_input``: the gate's) is not state: a forward pre-hook of the
attention module (``models/build.py``) adds it to the module's keyword arguments as ``outlierfree_gate_input``, which
transformers' attention modules pass on to the attention function with their other ``**kwargs``. What a variant does
after attention (the gate) is its ``after_attention``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import kernels
from .config import AttentionConfig
from .softmax import keep_mask
from .variants.gated import GATE_INPUT

VANILLA = AttentionConfig()


def _attentions_requested() -> bool:
    from ..hf_compat import attentions_requested  # lazy: hf_compat imports this module

    return attentions_requested()


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hk, T, D) -> (B, Hk * n_rep, T, D) for grouped-query attention."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def outlierfree_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention-interface function for every outlierfree variant.

    Args:
        query: (B, H, Tq, D); key, value: (B, Hk, Tk, D) with H a multiple of Hk.
        attention_mask: boolean (True = attend) or additive float mask broadcastable to (B, H, Tq, Tk), or None.
        kwargs: transformers' (``is_causal``, ``softcap``, ``position_bias``, ``output_attentions``...), and for the
            gated variant ``outlierfree_gate_input``, the layer input x (B, Tq, d_model).
    Returns:
        context (B, Tq, H, D) (after the variant's ``after_attention``: gated if it is gated) and the probabilities
        (B, H, Tq, Tk) when they were materialised, else None.
    """
    cfg: AttentionConfig = getattr(module, "outlierfree", None) or VANILLA
    x = kwargs.pop(GATE_INPUT, None)  # the gate's input; popped so that the sdpa kernel gets transformers' kwargs
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

    want_probs = probe is not None or bool(kwargs.get("output_attentions")) or _attentions_requested()
    kernel = kernels.KERNELS[kernels.choose_kernel(cfg, (B, H, Tq, Tk), want_probs, softcap=softcap is not None,
                                                   position_bias=kwargs.get("position_bias") is not None)]
    probs = None
    if kernel.hf_call:  # transformers' own function: the mask and kwargs as transformers gave them
        out = kernel.fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        **kwargs)  # (B, Tq, H, D)
    else:
        # a kernel that masks causally by itself gets a flag instead of a T x T mask
        flag = kernel.takes_causal and causal and attention_mask is None
        keep = keep_mask(attention_mask, Tq, Tk, causal and attention_mask is None and not flag, query.device)
        context, probs = kernel.fn(module, query, _repeat_kv(key, n_rep), _repeat_kv(value, n_rep), keep, scaling,
                                   dropout, cfg, causal=flag, probe=probe, softcap=softcap, bias=bias)
        if probe is not None:
            context = probe(module, "context", context)
        out = context.transpose(1, 2)  # (B, Tq, H, D)

    out = cfg.params.after_attention(module, out, x, attention_mask, Tk, probe)  # e.g. the gate
    return out.contiguous(), probs
