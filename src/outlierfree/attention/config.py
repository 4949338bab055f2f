"""`AttentionConfig`: which attention variant a model runs, its parameters, and the kernel choice.

    AttentionConfig("clipped", gamma=-0.025)                  the variant's name and its parameters as keywords
    AttentionConfig(Clipped(alpha=1.0, alpha_t="row"))         or its parameters as the variant's own dataclass
    cfg.variant, cfg.params, cfg.impl                          "clipped", Clipped(...), "auto"

The parameters are the variant's dataclass (attention/variants/<name>.py), typed and validated there. The config is a
dict only on disk: :meth:`AttentionConfig.to_dict` is stored under ``config.outlierfree`` inside the Hugging Face
model config, so that ``save_pretrained`` / :func:`outlierfree.load_model` round-trip it, and under ``attention`` in
``train_config.json``. It holds the variant's name, its parameters, ``impl``, ``block_size`` and ``extra``.
Configs written before issue 25 held every variant's parameters (18 flat fields): :meth:`AttentionConfig.from_dict`
reads them, keeping the variant's own and dropping the others, which never had an effect.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import OutlierfreeError, require
from .variants import VARIANTS, Variant, computed_by, owner_of, variant_class

# How attention is computed: eager materialises probabilities; sdpa is torch's fused kernel (the softmax variants);
# blocked is the two-pass linear-memory clipped-softmax kernel; auto picks the fastest valid one (attention/kernels.py).
IMPLS = ("auto", "eager", "sdpa", "blocked")
# Variants the blocked kernel computes (clipped softmax with some gamma), and those whose probabilities are softmax
# itself, so torch's fused SDPA kernel computes them: views of the variant table (each variant declares its kernels).
CLIP_VARIANTS = computed_by("blocked")
SOFTMAX_VARIANTS = computed_by("sdpa")
# The fields every config has beside the variant's parameters.
COMMON_FIELDS = ("impl", "block_size", "extra")
# The parameter fields of configs written before issue 25 (each variant's, all stored in every config).
LEGACY_FIELDS = frozenset({"gamma", "zeta", "alpha", "alpha_t", "max_len", "gate_type", "gate_per", "gate_init",
                           "gate_finetune", "eta", "beta", "sink_init", "softpick_eps", "softplus_scale",
                           "softplus_power"})


@dataclass(frozen=True, init=False)
class AttentionConfig:
    """Which attention variant a model runs, with its parameters and the kernel choice.

    Attributes:
        variant: the variant's name, one of :data:`VARIANTS` (``vanilla``, ``clipped``, ``gated``, ``ncs``...).
        params: its parameters, the variant's dataclass (``Clipped(gamma=-0.025, zeta=1.0)``...); it also knows
            how the variant computes (see attention/variants/base.py).
        impl: ``auto``, ``eager``, ``sdpa`` or ``blocked`` (attention/kernels.py).
        block_size: query block of the ``blocked`` kernel.
        extra: rarely used settings (``key_block`` of the blocked kernel).

    ``AttentionConfig(name, **parameters)`` builds the variant's parameters from keywords; a keyword that is not
    one of them is a one-line error naming the variant it belongs to.
    """

    variant: str
    params: Variant
    impl: str
    block_size: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, variant: str | Variant = "vanilla", *, params: Variant | None = None, impl: str = "auto",
                 block_size: int = 128, extra: Mapping[str, Any] | None = None, **parameters: Any):
        if isinstance(variant, Variant):
            variant, params = variant.name, variant
        cls = variant_class(variant)
        if params is None:
            for k in parameters:
                if k not in cls.__dataclass_fields__:
                    owner = owner_of(k)
                    raise OutlierfreeError(f"{k} is not a parameter of {variant} attention",
                                           f"drop it, or use the variant it belongs to ({owner})" if owner else
                                           f"valid parameters are {sorted(cls.__dataclass_fields__) or 'none'}")
            params = cls(**parameters)
        else:
            require(type(params) is cls and not parameters, f"params of {variant} attention must be one "
                    f"{cls.__name__} and no other parameters", f"pass AttentionConfig({variant!r}, **parameters)")
        object.__setattr__(self, "variant", variant)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "impl", impl)
        object.__setattr__(self, "block_size", block_size)
        object.__setattr__(self, "extra", dict(extra or {}))
        self.validate()

    def validate(self) -> "AttentionConfig":
        """Check the kernel choice (the parameters were checked by the variant); raise :class:`OutlierfreeError`
        naming the bad value and the fix."""
        kernels = self.params.kernels
        require(self.impl in IMPLS, f"unknown attention implementation {self.impl!r}", f"use one of {', '.join(IMPLS)}")
        if self.impl == "sdpa":
            require("sdpa" in kernels, f"{self.variant} attention cannot run on the fused SDPA kernel",
                    "use --attention-impl eager or auto" + (" (or blocked)" if "blocked" in kernels else ""))
        if self.impl == "blocked":  # on a softmax variant, sdpa serves it (attention/kernels.py)
            require("blocked" in kernels or "sdpa" in kernels, f"the blocked kernel does not compute "
                    f"{self.variant} attention", "use --attention-impl eager or auto (docs/variants.md says why)")
        require(int(self.block_size) > 0, f"block size must be positive, got {self.block_size}", "pass e.g. 128")
        return self

    # ---- what the variant says ------------------------------------------------------------------------------
    def describe(self) -> str:
        """A short human-readable summary, e.g. ``clipped(gamma=-0.025, zeta=1)``."""
        return self.params.describe()

    def dead_at_init(self, T: int) -> str | None:
        """Why this config zeroes every attention row of T keys at initialisation, or ``None``."""
        return self.params.dead_at_init(T)

    # ---- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what is stored under ``config.outlierfree``): the variant's name, its set
        parameters, and the kernel fields."""
        return {"variant": self.variant, **self.params.to_fields(), "impl": self.impl, "block_size": self.block_size,
                "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "AttentionConfig" | None) -> "AttentionConfig":
        """Inverse of :meth:`to_dict`, also for configs written before issue 25 (see the module docstring). A key
        that is neither the variant's nor an old config's is an error (it would be silently ignored otherwise)."""
        if d is None:
            return cls()
        if isinstance(d, AttentionConfig):
            return d
        d = dict(d)
        vcls = variant_class(d.pop("variant", "vanilla"))
        common = {k: d.pop(k) for k in COMMON_FIELDS if k in d}
        own = set(vcls.__dataclass_fields__)
        unknown = sorted(set(d) - own - LEGACY_FIELDS)
        if unknown:
            raise OutlierfreeError(f"unknown attention config keys {unknown}",
                                   f"valid keys are {sorted({'variant', *COMMON_FIELDS, *own})}")
        if vcls.name == "softplus" and set(d) & (LEGACY_FIELDS - own):
            # a config written before issue 25 left softplus_scale out at its then default, the earlier reading
            d.setdefault("softplus_scale", "entropy")
        return cls(vcls.name, params=vcls.from_fields({k: v for k, v in d.items() if k in own}), **common)

    def replace(self, **changes: Any) -> "AttentionConfig":
        """A validated copy with some fields changed: ``impl``, ``block_size``, ``extra`` or the variant's
        parameters (``replace(variant=...)`` starts from that variant's defaults)."""
        if "variant" in changes:
            return AttentionConfig(changes.pop("variant"), **{k: getattr(self, k) for k in COMMON_FIELDS}, **changes)
        common = {k: changes.pop(k) for k in COMMON_FIELDS if k in changes}
        params = self.params.replace(**changes) if changes else self.params
        return dataclasses.replace(self, params=params, **common)

    def for_model(self, max_len: int | None) -> "AttentionConfig":
        """The config with what the model decides filled in (clipped softmax's fixed T = the model's length)."""
        params = self.params.for_model(max_len)
        return self if params is self.params else dataclasses.replace(self, params=params)


__all__ = ["AttentionConfig", "CLIP_VARIANTS", "COMMON_FIELDS", "IMPLS", "LEGACY_FIELDS", "SOFTMAX_VARIANTS",
           "VARIANTS"]
