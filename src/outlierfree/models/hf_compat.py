"""Everything that touches transformers internals lives here, so an upgrade is fixed in one place.

- registering :func:`outlierfree_attention` in transformers' ``AttentionInterface`` (and a mask function in
  ``AttentionMaskInterface``, without which transformers builds no mask for a custom implementation);
- switching a model's attention implementation;
- finding the modules that call the attention interface, and their sizes;
- the family table: which transformers classes make BERT / OPT / ViT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..attention.interface import outlierfree_attention

IMPL_NAME = "outlierfree"
_registered = False


def register() -> None:
    """Register the ``outlierfree`` attention (and its boolean mask builder) with transformers. Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL_NAME, outlierfree_attention)
    # boolean "may attend" masks, skipped (None) where sdpa would skip them; our function handles both
    AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)
    _registered = True


def set_attention_implementation(model: nn.Module, name: str = IMPL_NAME) -> None:
    """Route every attention module of ``model`` through implementation ``name`` (``outlierfree``, ``sdpa``...)."""
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # a bare module: set it on every config we can reach
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None:
                cfg._attn_implementation = name


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation ``model`` runs now."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None)


def attentions_requested() -> bool:
    """Whether the running forward was asked for ``output_attentions`` (transformers 5 records them with hooks
    and no longer passes the flag down to the attention function)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older transformers pass output_attentions as a kwarg instead
        return False
    collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


def is_attention_module(module: nn.Module) -> bool:
    """Generic rule for a transformers self-attention module that calls the attention interface:
    it holds a config and its own Q, K, V projections (``query/key/value`` or ``q_proj/k_proj/v_proj``)."""
    if getattr(module, "config", None) is None:
        return False
    names = set(dict(module.named_children()))
    return {"query", "key", "value"} <= names or {"q_proj", "k_proj", "v_proj"} <= names


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All (path, module) pairs of attention modules, in forward order."""
    return [(n, m) for n, m in model.named_modules() if is_attention_module(m)]


@dataclass(frozen=True)
class AttentionDims:
    """Sizes of one attention module."""

    d_model: int
    n_heads: int
    head_dim: int


def attention_dims(module: nn.Module) -> AttentionDims:
    """Read d_model, heads and head size from a transformers attention module."""
    cfg = module.config
    d_model = int(cfg.hidden_size)
    n_heads = int(getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
                  or cfg.num_attention_heads)
    head_dim = int(getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
                   or d_model // n_heads)
    return AttentionDims(d_model, n_heads, head_dim)


def layer_input(args: tuple, kwargs: dict) -> Any:
    """The hidden-states argument of an attention module's forward (positional or keyword)."""
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return args[0] if args else None


def max_length(config: Any) -> int | None:
    """The longest sequence a model config allows (positions, or patches + 1 for ViT)."""
    if getattr(config, "model_type", None) == "vit":
        return (int(config.image_size) // int(config.patch_size)) ** 2 + 1
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(config, name, None)
        if v:
            return int(v)
    return None


# ---- families ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A model family we build from scratch and patch: its transformers config and task classes."""

    name: str
    model_type: str
    task: str  # default pre-training task: mlm | clm | image
    config_class: str
    task_class: str  # the class trained by `outlierfree train`
    base_class: str


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", "bert", "mlm", "BertConfig", "BertForMaskedLM", "BertModel"),
    "opt": Family("opt", "opt", "clm", "OPTConfig", "OPTForCausalLM", "OPTModel"),
    "vit": Family("vit", "vit", "image", "ViTConfig", "ViTForImageClassification", "ViTModel"),
}


def transformers_class(name: str) -> Any:
    """A transformers class by name (``BertForMaskedLM``...)."""
    import transformers

    return getattr(transformers, name)


def family_of(config: Any) -> str | None:
    """Our family name for a transformers config (``None`` when it is not BERT, OPT or ViT)."""
    mt = getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if fam.model_type == mt:
            return fam.name
    return None


def model_class_for(config: Any) -> Any:
    """The transformers class named in ``config.architectures`` (falls back to the auto classes)."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    fam = family_of(config)
    if fam is not None:
        return transformers_class(FAMILIES[fam].base_class)
    return transformers.AutoModel


# ---- training (outlierfree.train) ----------------------------------------------------------------------------
def mlm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(encoder, head) of a ``BertForMaskedLM``: ``model.bert`` (returns ``last_hidden_state``) and ``model.cls``
    (hidden (M, d) -> logits (M, V)). Training applies the head to the masked positions only."""
    enc, head = getattr(model, "bert", None), getattr(model, "cls", None)
    if enc is None or head is None:
        raise TypeError(f"{type(model).__name__} is not a BertForMaskedLM (no .bert / .cls)")
    return enc, head
