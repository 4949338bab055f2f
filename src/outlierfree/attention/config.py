"""`AttentionConfig`: the one serialisable description of an attention variant.

It is stored as a plain dict under ``config.outlierfree`` inside the Hugging Face model config, so that
``save_pretrained`` / :func:`outlierfree.load_model` round-trip the variant and all its parameters.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import OutlierfreeError, require

VARIANTS = ("vanilla", "clipped", "gated", "ncs", "softmax1", "sink", "softpick", "sigmoid", "softplus")
# The normalisers of attention/normalisers.py, beside softmax (vanilla, gated) and clipped softmax:
#   ncs       normalised clipped softmax (Liao & Monz 2024): clipped softmax whose stretch follows each row's keys
#   softmax1  softmax with an extra logit 0 in the denominator ("softmax plus one")
#   sink      softmax with a learned logit per head in the denominator (gpt-oss's attention sink)
#   softpick  relu(exp(x) - 1) / sum |exp(x) - 1| (rectified softmax, 2025)
#   sigmoid   sigmoid(x - log n) per entry, no normalisation (Apple 2024)
#   softplus  softplus(lambda cos(q, k)) / l1, lambda = log d_head * log n (Gao et al. 2025, arXiv:2501.13428)
# Variants that clip probabilities to exact zeros (share gamma machinery, the ramp and the blocked kernel).
CLIP_VARIANTS = ("clipped", "ncs")
# Variants whose probabilities are softmax itself, so torch's fused SDPA kernel computes them.
SOFTMAX_VARIANTS = ("vanilla", "gated")
# Scale of the softplus variant: the paper's (l2-normalised q and k, lambda = log d_head * log n), this project's
# earlier reading of the abstract (lambda = log n / log d_head on q k / sqrt(d_head)), or none (lambda = 1).
SOFTPLUS_SCALES = ("paper", "entropy", "none")
# Gate networks G(x) (see attention/gates.py for the maths):
#   head_linear  per-head linear on that head's own slice of x (d_head -> 1)          [paper default]
#   linear       linear on all features (d_model -> n_heads); Qwen's "head-wise" gate
#   mlp          small MLP per head on its slice (d_head -> d_head/4 -> 1)
#   elementwise  linear on all features to one gate per output element (d_model -> n_heads*d_head); Qwen's
#                "element-wise" gate
#   scalar       unconditional: one learned scalar per head
GATE_TYPES = ("head_linear", "linear", "mlp", "elementwise", "scalar")
# Conditioning of the conditional gates: one gate per token, or per head and sequence (mean over tokens).
GATE_PER = ("token", "head")
# Where T in gamma = -alpha / T comes from: a fixed length (the paper), or the keys each row can see.
ALPHA_T = ("fixed", "row")
# How attention is computed: eager materialises probabilities; sdpa is torch's fused kernel (vanilla / gated
# only); blocked is the two-pass linear-memory clipped-softmax kernel; auto picks the fastest valid one.
IMPLS = ("auto", "eager", "sdpa", "blocked")


# fields added with the zoo (issue 16), with their defaults: omitted from to_dict() at these values
LATER_DEFAULTS: dict[str, Any] = {"eta": 1.03, "beta": 1.0, "sink_init": 0.0, "softpick_eps": 1e-6,
                                  "softplus_scale": "paper", "softplus_power": None}


@dataclass
class AttentionConfig:
    """Which attention variant a model runs, with its parameters.

    Attributes:
        variant: ``vanilla`` (softmax), ``clipped`` (clipped softmax) or ``gated`` (gated attention).
        gamma: clipped softmax lower stretch, ``<= 0``. Ignored when ``alpha`` is set.
        zeta: clipped softmax upper stretch, ``>= 1``.
        alpha: if set, ``gamma = -alpha / T`` with T from ``alpha_t``.
        alpha_t: ``fixed`` (T = ``max_len``, the paper) or ``row`` (T = keys each query row can see, so padding
            and causal masks are accounted for: causal row i sees i + 1 keys).
        max_len: T for ``alpha_t="fixed"``; filled from the model's maximum length when a model is patched.
        gate_type: gate network, one of :data:`GATE_TYPES`.
        gate_per: ``token`` (a gate per token) or ``head`` (one per head and sequence: mean over tokens).
        gate_init: initial gate probability ``p`` in (0, 1): the gate bias starts at ``logit(p)``.
        gate_finetune: for patching a pretrained model: gate weights start at zero and the output is divided by
            ``p``, so the patched model computes exactly what it did before at initialisation.
        eta, beta: NCS (``variant="ncs"``): a probability of 1 maps to ``eta`` (>= 1) and a uniform row to rows
            summing to ``beta`` (0 <= beta <= eta), whatever the number of keys; eta = beta = 1 is softmax.
        sink_init: initial value of the learned per-head sink logit (``variant="sink"``).
        softpick_eps: the epsilon of softpick's denominator (> 0).
        softplus_scale: ``paper`` (cosine scores, lambda = log d_head * log n), ``entropy`` (lambda = log n /
            log d_head on the scaled dot products) or ``none`` (``variant="softplus"``).
        softplus_power: re-weighting power p >= 1 of softplus attention (None: off).
        impl: ``auto``, ``eager``, ``sdpa`` or ``blocked``.
        block_size: key/query block for ``blocked``.
    """

    variant: str = "vanilla"
    gamma: float = -0.025
    zeta: float = 1.0
    alpha: float | None = None
    alpha_t: str = "fixed"
    max_len: int | None = None
    gate_type: str = "head_linear"
    gate_per: str = "token"
    gate_init: float = 0.25
    gate_finetune: bool = False
    eta: float = 1.03
    beta: float = 1.0
    sink_init: float = 0.0
    softpick_eps: float = 1e-6
    softplus_scale: str = "paper"
    softplus_power: float | None = None
    impl: str = "auto"
    block_size: int = 128
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "AttentionConfig":
        """Check every field; raise :class:`OutlierfreeError` naming the bad value and the fix."""
        require(self.variant in VARIANTS, f"unknown attention variant {self.variant!r}",
                f"use one of {', '.join(VARIANTS)}")
        require(_finite(self.gamma) and self.gamma <= 0, f"gamma must be <= 0, got {self.gamma}",
                "pass a gamma such as -0.025 (gamma = 0 with zeta = 1 is plain softmax)")
        require(_finite(self.zeta) and self.zeta >= 1, f"zeta must be >= 1, got {self.zeta}", "pass a zeta such as 1.0")
        if self.alpha is not None:
            require(_finite(self.alpha) and self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}",
                    "pass an alpha such as 12 (gamma = -alpha / T)")
        require(self.alpha_t in ALPHA_T, f"unknown alpha T mode {self.alpha_t!r}", f"use one of {', '.join(ALPHA_T)}")
        if self.max_len is not None:
            require(int(self.max_len) > 0, f"max_len must be positive, got {self.max_len}", "pass the training length")
        require(self.gate_type in GATE_TYPES, f"unknown gate type {self.gate_type!r}",
                f"use one of {', '.join(GATE_TYPES)}")
        require(self.gate_per in GATE_PER, f"unknown gate conditioning {self.gate_per!r}",
                f"use one of {', '.join(GATE_PER)}")
        require(_finite(self.gate_init) and 0 < self.gate_init < 1,
                f"gate init probability must be in (0, 1), got {self.gate_init}", "pass a value such as 0.25")
        require(_finite(self.eta) and self.eta >= 1, f"eta must be >= 1, got {self.eta}",
                "pass an eta such as 1.03 (eta = beta = 1 is plain softmax)")
        require(_finite(self.beta) and 0 <= self.beta <= self.eta, f"beta must be in [0, eta = {self.eta}], got "
                f"{self.beta}", "pass beta = 1 (a uniform row keeps summing to 1, so attention trains)")
        require(_finite(self.sink_init), f"sink init must be a finite logit, got {self.sink_init}", "pass e.g. 0")
        require(_finite(self.softpick_eps) and self.softpick_eps > 0, f"softpick eps must be > 0, got "
                f"{self.softpick_eps}", "pass e.g. 1e-6")
        require(self.softplus_scale in SOFTPLUS_SCALES, f"unknown softplus scale {self.softplus_scale!r}",
                f"use one of {', '.join(SOFTPLUS_SCALES)}")
        if self.softplus_power is not None:
            require(_finite(self.softplus_power) and self.softplus_power >= 1, f"softplus re-weighting power must "
                    f"be >= 1, got {self.softplus_power}", "pass e.g. 2 (or leave it out: no re-weighting)")
        require(self.impl in IMPLS, f"unknown attention implementation {self.impl!r}", f"use one of {', '.join(IMPLS)}")
        if self.impl == "sdpa":
            require(self.variant in SOFTMAX_VARIANTS, f"{self.variant} attention cannot run on the fused SDPA kernel",
                    "use --attention-impl eager or auto" + (" (or blocked)" if self.variant in CLIP_VARIANTS else ""))
        if self.impl == "blocked":
            require(self.variant in SOFTMAX_VARIANTS + CLIP_VARIANTS, f"the blocked kernel does not compute "
                    f"{self.variant} attention", "use --attention-impl eager or auto (docs/variants.md says why)")
        require(int(self.block_size) > 0, f"block size must be positive, got {self.block_size}", "pass e.g. 128")
        return self

    # ---- derived values -------------------------------------------------------------------------------
    @property
    def gate_bias_init(self) -> float:
        """``logit(gate_init)``: the bias that makes ``sigmoid(G(x)) = gate_init`` when the weights are zero."""
        return math.log(self.gate_init / (1 - self.gate_init))

    def fixed_gamma(self) -> float | None:
        """Gamma as a number when it does not depend on the row (``None`` in ``alpha_t='row'`` mode)."""
        if self.alpha is None:
            return self.gamma
        if self.alpha_t == "row":
            return None
        require(self.max_len is not None, "alpha with a fixed T needs max_len",
                "pass --max-len (the training sequence length) or use --alpha-t row")
        return -self.alpha / float(self.max_len)

    def dead_at_init(self, T: int) -> str | None:
        """Why this config zeroes every attention row of T keys at initialisation, or ``None``.

        A near-uniform row has p = 1/T on each key; clipped softmax maps it to (zeta - gamma) / T + gamma, which is
        <= 0 (every entry clipped, the row sums to 0 and gets no gradient) exactly when -gamma >= zeta / (T - 1),
        i.e. alpha >= zeta * T / (T - 1) with gamma = -alpha / T. NCS maps a uniform row to beta / T per key: dead
        only when beta = 0. Rows of 1 key (T = 1) never die.
        """
        if T <= 1:
            return None
        if self.variant == "ncs":
            return "beta = 0 maps a uniform row to all zeros" if self.beta <= 0 else None
        if self.variant != "clipped":
            return None
        if self.alpha is not None:
            g = -self.alpha / (T if self.alpha_t == "row" else float(self.max_len or T))
        else:
            g = self.gamma
        if (self.zeta - g) / T + g > 0:
            return None
        return f"clipped softmax with gamma = {g:.4g} zeroes every near-uniform row of {T} keys at initialisation " \
               f"((zeta - gamma) / T + gamma <= 0)"

    def describe(self) -> str:
        """A short human-readable summary, e.g. ``clipped(gamma=-0.025, zeta=1)``."""
        if self.variant == "vanilla":
            return "vanilla"
        if self.variant == "clipped":
            g = f"alpha={self.alpha:g}/T[{self.alpha_t}{'=' + str(self.max_len) if self.alpha_t == 'fixed' else ''}]" \
                if self.alpha is not None else f"gamma={self.gamma:g}"
            return f"clipped({g}, zeta={self.zeta:g})"
        if self.variant == "ncs":
            return f"ncs(eta={self.eta:g}, beta={self.beta:g})"
        if self.variant == "sink":
            return f"sink(init={self.sink_init:g})"
        if self.variant == "softpick":
            return f"softpick(eps={self.softpick_eps:g})"
        if self.variant == "sigmoid":
            return "sigmoid(bias=-log n)"
        if self.variant == "softplus":
            p = f", power={self.softplus_power:g}" if self.softplus_power is not None else ""
            return f"softplus(scale={self.softplus_scale}{p})"
        if self.variant == "softmax1":
            return "softmax1"
        return f"gated({self.gate_type}, per={self.gate_per}, init={self.gate_init:g}" \
               f"{', finetune' if self.gate_finetune else ''})"

    # ---- (de)serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what is stored under ``config.outlierfree``). The zoo's fields are left out at
        their defaults, so configs saved before they existed (checkpoints, finished runs) compare equal."""
        d = dataclasses.asdict(self)
        for k, default in LATER_DEFAULTS.items():
            if d.get(k) == default:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | "AttentionConfig" | None) -> "AttentionConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (they would be silently ignored otherwise)."""
        if d is None:
            return cls()
        if isinstance(d, AttentionConfig):
            return d
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise OutlierfreeError(f"unknown attention config keys {unknown}", f"valid keys are {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "AttentionConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
