"""Build models from scratch with any attention variant, and patch a variant into an existing HF model.

    model = build_model("bert", "tiny", AttentionConfig("clipped", gamma=-0.025))
    model = patch_model(AutoModel.from_pretrained(path), AttentionConfig("gated", gate_finetune=True))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..attention.config import AttentionConfig
from ..attention.gates import AttentionGate
from ..attention.interface import GATE_INPUT
from ..attention.normalisers import RAMP_ATTR, AttentionSink
from ..errors import OutlierfreeError, require
from . import hf_compat
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

    Every attention module then runs through the ``outlierfree`` attention function; gated variants get an
    :class:`AttentionGate` per layer (``<attention module>.outlierfree_gate``) and a forward pre-hook that hands the
    layer input to the attention function as a keyword argument (refused for a module whose forward takes no
    ``**kwargs``), the sink variant an
    :class:`AttentionSink` (``<attention module>.outlierfree_sink``). A clipped or NCS config that zeroes every
    near-uniform row of the model's maximum length at initialisation warns (:class:`DeadAttentionWarning`). The
    variant is recorded in ``model.config.outlierfree`` so that :func:`save_model` / :func:`load_model` round-trip
    it. Patching again replaces the previous variant.

    Args:
        strict: only BERT, OPT and ViT models are accepted (the families whose variants are tested); pass
            ``False`` to patch any transformers model whose attention uses the attention interface.
    """
    cfg = _attention_config(attention, **kw)
    config = getattr(model, "config", None)
    family = hf_compat.family_of(config) if config is not None else None
    if strict and family is None:
        mt = getattr(config, "model_type", type(model).__name__)
        raise OutlierfreeError(f"cannot patch a {mt!r} model: variants are supported for bert, opt and vit",
                               "pass a BERT, OPT or ViT checkpoint (or strict=False in Python, untested)")
    if cfg.alpha is not None and cfg.alpha_t == "fixed" and cfg.max_len is None:
        cfg = cfg.replace(max_len=hf_compat.max_length(config))
    modules = hf_compat.attention_modules(model)
    require(len(modules) > 0, f"found no attention modules in {type(model).__name__}",
            "pass a transformers model whose attention uses the attention interface")
    warn_if_dead(cfg, hf_compat.max_length(config))
    if cfg.variant == "gated":  # checked before any module changes, so a refused patch leaves the model as it was
        for path, module in modules:
            require(hf_compat.takes_keyword_arguments(module), f"gated attention cannot be patched into "
                    f"{path or type(model).__name__} ({type(module).__name__}): its forward takes no **kwargs to "
                    f"pass the gate its input through", "use another variant for this model")
    for _, module in modules:
        unpatch_module(module)
        module.outlierfree = cfg
        if cfg.variant == "sink":
            ref = next(module.parameters())
            module.outlierfree_sink = AttentionSink(hf_compat.attention_dims(module).n_heads, cfg.sink_init).to(
                device=ref.device, dtype=ref.dtype)
        if cfg.variant == "gated":
            dims = hf_compat.attention_dims(module)
            ref = next(module.parameters())
            module.outlierfree_gate = AttentionGate(dims.d_model, dims.n_heads, dims.head_dim, cfg).to(
                device=ref.device, dtype=ref.dtype)
            module._outlierfree_hook = module.register_forward_pre_hook(_pass_layer_input, with_kwargs=True)
    config.outlierfree = cfg.to_dict()
    hf_compat.set_attention_implementation(model, hf_compat.IMPL_NAME)
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
    fix = "pass beta = 1" if cfg.variant == "ncs" else \
        f"pass --alpha 1 --alpha-t row (alpha <= 1, i.e. gamma >= -1/T = {-1 / T:.4g}) or train with " \
        f"--gamma-ramp-steps N (gamma grows from 0)"
    warnings.warn(f"{why}, so attention gets no gradient; {fix}", DeadAttentionWarning, stacklevel=3)


def unpatch_module(module: nn.Module) -> None:
    """Remove a previous variant from one attention module (gate, hook, config)."""
    hook = getattr(module, "_outlierfree_hook", None)
    if hook is not None:
        hook.remove()
    for name in ("outlierfree_gate", "outlierfree_sink"):
        if name in module._modules:
            del module._modules[name]
    for name in ("outlierfree", "_outlierfree_hook", RAMP_ATTR):
        if name in module.__dict__:
            delattr(module, name)


def _pass_layer_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a gated attention module: adds its input x to its keyword arguments as ``GATE_INPUT``.

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
