"""Everything that touches transformers internals lives here, so an upgrade is fixed in one place.

- registering :func:`outlierfree_attention` in transformers' ``AttentionInterface`` (and a mask function in
  ``AttentionMaskInterface``, without which transformers builds no mask for a custom implementation);
- switching a model's attention implementation;
- transformers' own SDPA attention function, which the ``sdpa`` kernel of attention/kernels.py calls;
- finding the modules that call the attention interface, their sizes, and whether they pass keyword arguments on;
- the family table: which transformers classes make BERT / OPT / ViT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

IMPL_NAME = "outlierfree"
_registered = False
# how transformers' models name their blocks: ``encoder.layer.3``, ``model.layers.3``, ``transformer.h.3``...
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block|albert_layers)\.(\d+)(?:\.|$)")


def layer_index(path: str) -> int | None:
    """Block index in a module path (``...layer.3...`` / ``...layers.3...`` / ``...h.3...``), or ``None``."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def register(attention_fn: Callable | None) -> None:
    """Register ``attention_fn`` (``attention.interface.outlierfree_attention``) as the ``outlierfree`` attention with
    transformers, with its boolean mask builder. Idempotent. This module imports nothing of outlierfree (it is the
    leaf that alone touches transformers internals), so the caller hands the function in; ``None`` only checks
    that it was registered."""
    global _registered
    if _registered:
        return
    if attention_fn is None:
        raise RuntimeError("the outlierfree attention is not registered yet: call hf_compat.register("
                           "outlierfree.attention.interface.outlierfree_attention) first")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL_NAME, attention_fn)
    # boolean "may attend" masks, skipped (None) where sdpa would skip them; our function handles both
    AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)
    _registered = True


def set_attention_implementation(model: nn.Module, name: str = IMPL_NAME, attention_fn: Callable | None = None
                                 ) -> None:
    """Route every attention module of ``model`` through implementation ``name`` (``outlierfree``, ``sdpa``...);
    ``outlierfree`` is registered first with ``attention_fn`` (see :func:`register`)."""
    if name == IMPL_NAME:
        register(attention_fn)
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


def sdpa_attention(module: nn.Module, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                   scaling: float | None = None, **kwargs: Any) -> Any:
    """transformers' SDPA attention function on (B, H, T, D) q, k, v (grouped k/v allowed); returns the context
    (B, Tq, H, D)."""
    # imported at each call: keeps `import outlierfree` cheap, and a test's spy on the function is seen
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    **kwargs)
    return out


def is_attention_module(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module that calls transformers' attention interface: found from its
    forward's source (:func:`calls_attention_interface`), whatever its children are named."""
    return calls_attention_interface(module)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All (path, module) pairs of attention modules, in forward order."""
    return [(n, m) for n, m in model.named_modules() if is_attention_module(m)]


@dataclass(frozen=True)
class AttentionDims:
    """Sizes of one attention module."""

    d_model: int
    n_heads: int
    head_dim: int

    @property
    def heads_slice_input(self) -> bool:
        """Whether the heads split the layer input into equal slices (n_heads x head_dim == d_model), which
        per-head gates reading their head's slice need (not Gemma-3-270m: 4 x 256 heads over 640)."""
        return self.n_heads * self.head_dim == self.d_model


def attention_dims(module: nn.Module) -> AttentionDims:
    """Read d_model, heads and head size from a transformers attention module."""
    cfg = module.config
    d_model = int(cfg.hidden_size)
    n_heads = int(getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
                  or cfg.num_attention_heads)
    head_dim = int(getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
                   or d_model // n_heads)
    return AttentionDims(d_model, n_heads, head_dim)


def takes_keyword_arguments(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes ``**kwargs``: transformers' attention modules pass them on to the attention
    function, which is how the gated variant's layer input reaches it (see ``models/build.py``)."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: let the forward itself tell
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


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


# ---- what the site mechanism needs to know about any transformers model --------------------------------------
_INTERFACE_CALLERS: dict[type, bool] = {}


def calls_attention_interface(module: nn.Module) -> bool:
    """Whether ``module``'s own forward calls transformers' attention interface (``ALL_ATTENTION_FUNCTIONS``).

    Read once per class from the forward's source: this finds every attention module of transformers 5 whatever
    its child names (``q_lin``, ``c_attn``, ``q``/``k``/``v``/``o``, fused ``qkv``...).
    """
    cls = type(module)
    hit = _INTERFACE_CALLERS.get(cls)
    if hit is None:
        import inspect

        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        hit = _INTERFACE_CALLERS[cls] = "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface(" in src
    return hit


def hidden_widths(config: Any) -> set[int]:
    """The widths of a model's residual stream (and of its embeddings, where they differ: ALBERT, OPT-350m)."""
    widths = set()
    for name in ("hidden_size", "d_model", "n_embd", "dim", "embedding_size", "word_embed_proj_dim"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            widths.add(v)
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        widths |= hidden_widths(text)
    return widths


_HEAD_CHILDREN = ("lm_head", "cls", "classifier", "score", "qa_outputs", "predictions", "generator_predictions",
                  "generator_lm_head", "vocab_transform", "vocab_layer_norm", "vocab_projector", "activation")


def head_paths(model: nn.Module) -> list[str]:
    """Top-level children of ``model`` that form its task head (everything outside the base model).

    ``BertForMaskedLM`` -> ``["cls"]``, ``OPTForCausalLM`` -> ``["lm_head"]``, ``ViTForImageClassification`` ->
    ``["classifier"]``, ``DistilBertForMaskedLM`` -> its ``vocab_*`` modules; a base model (``BertModel``) -> ``[]``.
    """
    children = dict(model.named_children())
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and prefix in children:
        return [n for n in children if n != prefix]
    return [n for n in children if n in _HEAD_CHILDREN and n != "activation"]


# ---- the OSP recipe (models/recipe.py) ---------------------------------------------------------------------------
def input_embedding(model: nn.Module) -> nn.Module:
    """The module that embeds the inputs (BERT ``word_embeddings``, OPT ``embed_tokens``, ViT ``patch_embeddings``):
    the embedding projection is applied to its output."""
    return model.get_input_embeddings()


def layer_norms(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, child name, module) of every ``nn.LayerNorm`` of the stock BERT / OPT / ViT modeling code."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.LayerNorm]
