"""Build models from scratch with any attention variant, and patch a variant into an existing HF model.

    model = build_model("bert", "tiny", AttentionConfig("clipped", gamma=-0.025))
    model = patch_model(AutoModel.from_pretrained(path), AttentionConfig("gated", gate_finetune=True))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..attention.config import AttentionConfig
from ..attention.interface import GATE_INPUT, outlierfree_attention
from ..attention.ramp import RAMP_ATTR
from ..attention.variants import module_names
from ..attention.variants.gated import SLICE_GATE_TYPES
from ..errors import OutlierfreeError, require
from .. import hf_compat
from .sizes import SIZES


def _attention_config(attention: AttentionConfig | dict | str | None, **kw: Any) -> AttentionConfig:
    if isinstance(attention, str):
        return AttentionConfig(variant=attention, **kw)
    cfg = AttentionConfig.from_dict(attention)
    return cfg.replace(**kw) if kw else cfg


def model_config(family: str, size: str = "tiny", **overrides: Any) -> Any:
    """The Hugging Face config of a named family/size, with ``overrides`` applied (e.g. ``vocab_size``)."""
    require(family in hf_compat.FAMILIES, f"unknown model family {family!r}",
            f"use one of {', '.join(hf_compat.FAMILIES)}")
    require(size in SIZES[family], f"unknown size {size!r} for {family}",
            f"use one of {', '.join(SIZES[family])} (see `outlierfree models`)")
    fam = hf_compat.FAMILIES[family]
    fields = {**SIZES[family][size], **overrides}
    config = hf_compat.transformers_class(fam.config_class)(**fields)
    config.architectures = [fam.task_class]
    return config


def build_model(family: str, size: str = "tiny", attention: AttentionConfig | dict | str | None = None,
                seed: int | None = None, **overrides: Any) -> nn.Module:
    """A freshly initialised ``BertForMaskedLM`` / ``OPTForCausalLM`` / ``ViTForImageClassification``.

    Args:
        family: ``bert``, ``opt`` or ``vit``.
        size: a name from ``outlierfree models`` (``tiny``, ``base``, ``125m``, ``s16``...).
        attention: the variant (an :class:`AttentionConfig`, its dict, or just the variant name).
        seed: seeds torch before initialising, for reproducible weights.
        overrides: Hugging Face config fields to change (``vocab_size``, ``num_labels``...).
    """
    config = model_config(family, size, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    cls = hf_compat.transformers_class(hf_compat.FAMILIES[family].task_class)
    model = cls(config)
    return patch_model(model, _attention_config(attention))


def patch_model(model: nn.Module, attention: AttentionConfig | dict | str | None = None, strict: bool = True,
                **kw: Any) -> nn.Module:
    """Put an attention variant into an existing Hugging Face model, in place; returns the model.

    Every attention module then runs through the ``outlierfree`` attention function and gets the submodules the
    variant declares (``Variant.submodules``: the gated variant's ``outlierfree_gate``, the sink variant's
    ``outlierfree_sink``); a variant that needs the layer input (gated) gets a forward pre-hook that hands it to the
    attention function as a keyword argument (refused for a module whose forward takes no ``**kwargs``), its handle
    kept in ``<attention module>._outlierfree_hooks``. A clipped or NCS config that zeroes every
    near-uniform row of the model's maximum length at initialisation warns (:class:`DeadAttentionWarning`). The
    variant is recorded in ``model.config.outlierfree`` so that :func:`save_model` / :func:`load_model` round-trip
    it. Patching again replaces the previous variant.

    Args:
        strict: only BERT, OPT and ViT models are accepted (the families the variants are trained and tested on
            from scratch); pass ``False`` to patch any transformers model whose attention uses the attention
            interface (``outlierfree finetune`` does: its retrofits start from the original outputs exactly, which
            tests/finetune checks on every family of tests/archs.py, Llama, Gemma-3, Qwen2, GPT-2 and T5 included).
    """
    cfg = _attention_config(attention, **kw)
    config = getattr(model, "config", None)
    family = hf_compat.family_of(config) if config is not None else None
    if strict and family is None:
        mt = getattr(config, "model_type", type(model).__name__)
        raise OutlierfreeError(f"cannot patch a {mt!r} model: variants are supported for bert, opt and vit",
                               "pass a BERT, OPT or ViT checkpoint (or strict=False in Python; `outlierfree "
                               "finetune` retrofits others)")
    cfg = cfg.for_model(hf_compat.max_length(config))  # clipped softmax's fixed T: the model's length
    modules = hf_compat.attention_modules(model)
    require(len(modules) > 0, f"found no attention modules in {type(model).__name__}",
            "pass a transformers model whose attention uses the attention interface")
    warn_if_dead(cfg, hf_compat.max_length(config))
    if cfg.params.needs_layer_input:  # checked before any module changes: a refused patch leaves the model as it was
        for path, module in modules:
            require(hf_compat.takes_keyword_arguments(module), f"{cfg.variant} attention cannot be patched into "
                    f"{path or type(model).__name__} ({type(module).__name__}): its forward takes no **kwargs to "
                    f"pass the layer input through", "use another variant for this model")
        gate_type = getattr(cfg.params, "gate_type", None)
        if gate_type in SLICE_GATE_TYPES:
            for path, module in modules:
                dims = hf_compat.attention_dims(module)
                require(dims.heads_slice_input, f"{cfg.variant} attention's {gate_type} gate "
                        f"reads each head's slice of the layer input, but {path or type(model).__name__} has "
                        f"{dims.n_heads} heads x {dims.head_dim} != d_model {dims.d_model}",
                        "use gate_type='linear' (each head's gate reads the whole layer input)")
    for _, module in modules:
        unpatch_module(module)
        module.outlierfree = cfg
        if cfg.params.modules:
            dims = hf_compat.attention_dims(module)
            ref = next(module.parameters())
            for name, sub in cfg.params.submodules(dims.d_model, dims.n_heads, dims.head_dim).items():
                module.add_module(name, sub.to(device=ref.device, dtype=ref.dtype))
        if cfg.params.needs_layer_input:
            module._outlierfree_hooks = [module.register_forward_pre_hook(_pass_layer_input, with_kwargs=True)]
    config.outlierfree = cfg.to_dict()
    hf_compat.set_attention_implementation(model, hf_compat.IMPL_NAME, outlierfree_attention)
    return model


class DeadAttentionWarning(UserWarning):
    """A clipped-softmax or NCS config that clips every near-uniform attention row to zero at initialisation."""


def warn_if_dead(cfg: AttentionConfig, T: int | None) -> None:
    """One-line warning when ``cfg`` zeroes every attention row of ``T`` keys at initialisation (see
    :meth:`AttentionConfig.dead_at_init`), naming the fix. Training silences it when its gamma ramp is on."""
    import warnings

    why = cfg.dead_at_init(int(T)) if T else None
    if why is None:
        return
    warnings.warn(f"{why}, so attention gets no gradient; {cfg.params.dead_fix(int(T))}", DeadAttentionWarning,
                  stacklevel=3)


def unpatch_module(module: nn.Module) -> None:
    """Remove a previous variant from one attention module (its submodules, hooks, config, ramp)."""
    for hook in module.__dict__.get("_outlierfree_hooks", ()):
        hook.remove()
    for name in module_names():
        if name in module._modules:
            del module._modules[name]
    for name in ("outlierfree", "_outlierfree_hooks", RAMP_ATTR):
        if name in module.__dict__:
            delattr(module, name)


def _pass_layer_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of an attention module whose variant needs the layer input (gated): adds its input x to its
    keyword arguments as ``GATE_INPUT``.

    The gate needs x, which transformers does not give the attention function; the attention module passes its
    ``**kwargs`` on to it, so x arrives there explicitly and nothing is kept on the module after the forward."""
    return args, {**kwargs, GATE_INPUT: hf_compat.layer_input(args, kwargs)}


def attention_config_of(model: nn.Module) -> AttentionConfig | None:
    """The variant a model was built or patched with (``None`` for a stock model)."""
    d = getattr(getattr(model, "config", None), "outlierfree", None)
    return AttentionConfig.from_dict(d) if d is not None else None


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def parameter_count(family: str, size: str, attention: AttentionConfig | None = None) -> int:
    """Parameters of a named size without allocating its weights (built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(build_model(family, size, attention))
