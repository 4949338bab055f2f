"""Plain configuration dataclasses of the quantization simulator, and the presets.

    QuantConfig(weight=QuantSpec(bits=8, symmetric=True, granularity="per_tensor", estimator="current_minmax"),
                activation=QuantSpec(bits=8, symmetric=False, estimator="running_minmax", static=True),
                sites="paper", fp32_head=False)

``paper_w8a8()`` is the setting of the paper's reference code (W8 per-tensor symmetric, current min-max; A8
per-tensor asymmetric, static, running min-max with momentum 0.9 over 16 batches; the reference's site set);
``linear_w8a8()`` is what the common libraries quantize (only the inputs and weights of ``nn.Linear``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import OutlierfreeError, require

GRANULARITIES = ("per_tensor", "per_channel", "per_token")
ESTIMATORS = ("current_minmax", "minmax", "running_minmax", "mse", "percentile", "histogram")
SITE_PRESETS = ("paper", "full", "linear", "matmul")
MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class QuantSpec:
    """How one class of tensors (weights or activations) is fake-quantized.

    Attributes:
        bits: 2..16.
        symmetric: symmetric grid (zero point 0; unsigned when the range has no negative values, as the reference
            code does) or asymmetric (affine, zero point in the grid).
        granularity: ``per_tensor``; ``per_channel`` (weights: one range per output channel, dim 0);
            ``per_token`` (activations: one range per vector along the last dimension; always dynamic).
        estimator: range estimator, one of :data:`ESTIMATORS` (see :mod:`.estimators`).
        static: ranges fixed after calibration (``True``) or recomputed from every tensor (``False``, dynamic:
            the current tensor's min-max). Weights are always "static" (their range is computed once).
        momentum: running min-max: ``range = momentum * range + (1 - momentum) * batch range``.
        percentile: percentile estimator: the ``percentile`` and ``100 - percentile`` quantiles.
        candidates: grid size of the MSE search (then refined by golden-section search).
        bins: histogram estimator: number of bins.
    """

    bits: int = 8
    symmetric: bool = False
    granularity: str = "per_tensor"
    estimator: str = "running_minmax"
    static: bool = True
    momentum: float = 0.9
    percentile: float = 99.99
    candidates: int = 50
    bins: int = 2048

    def __post_init__(self) -> None:
        require(isinstance(self.bits, int) and MIN_BITS <= self.bits <= MAX_BITS,
                f"{self.bits!r} bits is outside {MIN_BITS}..{MAX_BITS}", "pick a bit width from 2 to 16")
        require(self.granularity in GRANULARITIES, f"unknown granularity {self.granularity!r}",
                f"use one of {', '.join(GRANULARITIES)}")
        require(self.estimator in ESTIMATORS, f"unknown range estimator {self.estimator!r}",
                f"use one of {', '.join(ESTIMATORS)}")
        require(0.0 <= self.momentum < 1.0, f"momentum {self.momentum} is outside [0, 1)", "use e.g. 0.9")
        require(50.0 < self.percentile <= 100.0, f"percentile {self.percentile} is outside (50, 100]",
                "use e.g. 99.99")
        require(self.candidates >= 2, f"{self.candidates} MSE candidates are too few", "use e.g. 100")
        require(self.bins >= 16, f"{self.bins} histogram bins are too few", "use e.g. 2048")

    @property
    def dynamic(self) -> bool:
        """Whether ranges are recomputed from every tensor (per-token is always dynamic)."""
        return not self.static or self.granularity == "per_token"

    def describe(self) -> str:
        """Short human-readable form, e.g. ``8b per_tensor asym static running_minmax(m=0.9)``."""
        est = self.estimator
        if est == "running_minmax":
            est += f"(m={self.momentum})"
        elif est == "percentile":
            est += f"({self.percentile})"
        mode = "dynamic" if self.dynamic else "static"
        return f"{self.bits}b {self.granularity} {'sym' if self.symmetric else 'asym'} {mode} {est}"


@dataclass(frozen=True)
class QuantConfig:
    """What the simulator quantizes, and how.

    Attributes:
        weight: spec for weights (``None``: weights stay float).
        activation: spec for activations (``None``: activations stay float).
        sites: ``paper`` (the reference code's quantizers, per family: see :mod:`.sitesets`), ``full`` (every
            activation site and every weight, each tensor rounded once), ``linear`` (only linear inputs and
            linear weights: what torchao / llm-compressor / bitsandbytes quantize), or a tuple of site kinds.
        fp32_head: keep the task head (LM head / classifier: its input and weight) in float (reference code's
            ``fp32_head``).
        int8_head: quantize the task head where the site set would leave it float (the paper set on a masked LM,
            as the reference code does): the set's rules then apply to the head as to any block. What a deployment
            that runs the head wants: a float 30k-word decoder is most of a small model's time and size.
        symmetric_attention: put the attention's matmul operands (the grids of the queries, keys and values) on
            symmetric grids (zero point 0) whatever ``activation.symmetric`` says. OpenVINO runs the whole
            attention (Q K^T, softmax, P V) as one int8 kernel only when those have zero point 0 (as NNCF makes
            them); with the paper's asymmetric grids it falls back to float attention and int8 transposes
            (docs/export.md). Costs at most one bit on those three tensors, none when their ranges are symmetric.
    """

    weight: QuantSpec | None = field(default_factory=lambda: QuantSpec(8, True, "per_tensor", "current_minmax"))
    activation: QuantSpec | None = field(default_factory=QuantSpec)
    sites: str | tuple[str, ...] = "paper"
    fp32_head: bool = False
    int8_head: bool = False
    symmetric_attention: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", parse_site_set(self.sites, "sites"))
        require(not (self.fp32_head and self.int8_head), "--fp32-head and --int8-head contradict each other",
                "pass one of them")
        if self.weight is not None:
            require(self.weight.granularity != "per_token", "per_token granularity is for activations",
                    "use per_tensor or per_channel for weights")
        if self.activation is not None:
            require(self.activation.granularity != "per_channel",
                    "per_channel granularity is for weights (activation channels would need per-channel "
                    "requantization of every op)", "use per_tensor or per_token for activations")

    def no_integer_form(self) -> str | None:
        """Why this config has no integer runtime form (the static QDQ export), or None when it has one: 8-bit
        weights and activations, activations static and per-tensor (weights per-tensor or per-channel). The one
        check ``quantize --backend``, ``export`` and ``finetune``'s real-INT8 measurement share."""
        if self.weight is None or self.activation is None or self.weight.bits != 8 or self.activation.bits != 8:
            w = self.weight.bits if self.weight else "float"
            a = self.activation.bits if self.activation else "float"
            return f"--bits w{w}a{a} has no integer runtime form (8-bit weights and activations only)"
        if self.activation.dynamic or self.activation.granularity != "per_tensor":
            return f"activations {self.activation.describe()} have no integer runtime form (static per-tensor only)"
        return None

    def replace(self, **kw: Any) -> "QuantConfig":
        """A copy with some fields changed."""
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: attached to every reported number."""
        return {"weight": asdict(self.weight) if self.weight else None,
                "activation": asdict(self.activation) if self.activation else None,
                "sites": self.sites if isinstance(self.sites, str) else list(self.sites),
                "fp32_head": self.fp32_head, "int8_head": self.int8_head,
                "symmetric_attention": self.symmetric_attention,
                "describe": self.describe()}

    def describe(self) -> str:
        """One line: ``W8b per_tensor sym ...; A8b ...; sites=full; fp32_head=False`` (no pipes: it goes in tables)."""
        w = f"W{self.weight.describe()}" if self.weight else "W float"
        a = f"A{self.activation.describe()}" if self.activation else "A float"
        s = self.sites if isinstance(self.sites, str) else ",".join(self.sites)
        sym = ("; int8_head" if self.int8_head else "") + ("; symmetric_attention" if self.symmetric_attention else "")
        return f"{w}; {a}; sites={s}; fp32_head={self.fp32_head}{sym}"


def parse_bits(text: str) -> tuple[int, int]:
    """``"w8a8"`` -> (8, 8). Raises a one-line error for malformed text or bits outside 2..16."""
    m = re.fullmatch(r"\s*[wW](\d+)[aA](\d+)\s*", str(text))
    require(m is not None, f"malformed --bits {text!r}", "write weight and activation bits as wNaM, e.g. w8a8")
    w, a = int(m.group(1)), int(m.group(2))
    for name, b in (("weight", w), ("activation", a)):
        if not MIN_BITS <= b <= MAX_BITS:
            raise OutlierfreeError(f"{name} bits {b} in --bits {text!r} are outside {MIN_BITS}..{MAX_BITS}",
                                   "pick bit widths from 2 to 16, e.g. w8a8")
    return w, a


def paper_w8a8(weight_bits: int = 8, act_bits: int = 8, fp32_head: bool = False) -> QuantConfig:
    """The paper's setting: W per-tensor symmetric current min-max; A per-tensor asymmetric static running
    min-max (momentum 0.9, 16 calibration batches); the reference code's site set (``sites="paper"``)."""
    return QuantConfig(weight=QuantSpec(weight_bits, True, "per_tensor", "current_minmax"),
                       activation=QuantSpec(act_bits, False, "per_tensor", "running_minmax", static=True,
                                            momentum=0.9),
                       sites="paper", fp32_head=fp32_head)


def linear_w8a8(weight_bits: int = 8, act_bits: int = 8, fp32_head: bool = False) -> QuantConfig:
    """What the common libraries quantize: only Linear weights and Linear inputs (same grids as the paper's)."""
    return paper_w8a8(weight_bits, act_bits, fp32_head).replace(sites="linear")


def matmul_w8a8(weight_bits: int = 8, act_bits: int = 8, fp32_head: bool = False) -> QuantConfig:
    """Every matmul's inputs: the linear set plus the attention's operands (queries, keys, values, probabilities)
    and the embedding tables, where OpenVINO and NNCF put their quantizers (residual sums and norms stay float), on
    the paper's grids."""
    return paper_w8a8(weight_bits, act_bits, fp32_head).replace(sites="matmul")


def full_w8a8(weight_bits: int = 8, act_bits: int = 8, fp32_head: bool = False) -> QuantConfig:
    """Every activation and every weight (each tensor rounded once), on the paper's grids."""
    return paper_w8a8(weight_bits, act_bits, fp32_head).replace(sites="full")


PRESETS = {"paper": paper_w8a8, "full": full_w8a8, "linear": linear_w8a8, "matmul": matmul_w8a8}


def parse_site_set(sites: str | tuple[str, ...] | list[str], flag: str = "--sites") -> str | tuple[str, ...]:
    """One site set: a preset name (``paper``, ``full``, ``linear``, ``matmul``) or site kinds joined by ``+``
    (``ln_input+residual``) or given as a sequence; the one validation of a quantized site set, with a one-line
    error naming the unknown word (``flag`` names where it came from)."""
    from ..sites import SITE_KINDS, parse_kinds

    if isinstance(sites, str) and sites.strip() in SITE_PRESETS:
        return sites.strip()
    words = [w.strip() for w in (sites.replace(",", "+").split("+") if isinstance(sites, str) else sites)]
    bad = [w for w in words if w not in SITE_KINDS]
    require(bool(words) and not bad, f"unknown {flag} value {bad[0] if bad else sites!r}",
            f"use {', '.join(SITE_PRESETS)}, or site kinds joined by + (e.g. ln_input+residual; kinds: "
            f"{', '.join(SITE_KINDS)})")
    return parse_kinds(tuple(words), flag)


def pop_config_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Take out of a command's ``flags`` the ones :func:`configs_from_flags` reads (the rest are the request's
    fields): the signature is the one list of them, so a command cannot forget one."""
    import inspect

    names = inspect.signature(configs_from_flags).parameters
    return {k: flags.pop(k) for k in list(flags) if k in names}


def configs_from_flags(*, bits: str = "w8a8", sites: str = "paper", estimator: str = "running_minmax",
                       weight_estimator: str = "current_minmax", act_granularity: str = "per_tensor",
                       weight_granularity: str = "per_tensor", act_symmetric: bool = False,
                       weight_symmetric: bool = True, dynamic: bool = False, momentum: float = 0.9,
                       percentile: float = 99.99, fp32_head: bool = False, int8_head: bool = False,
                       symmetric_attention: bool = False) -> tuple[QuantConfig, ...]:
    """One :class:`QuantConfig` per (bits, sites) pair of the comma-separated ``--bits`` and ``--sites`` values
    (``w8a8,w16a16`` x ``paper,linear``), the other flags shared; every flag is checked here, once, with a
    one-line error naming it."""
    def split(text: str) -> list[str]:
        return [t.strip() for t in str(text).split(",") if t.strip()]

    for flag, value, allowed in (("--estimator", estimator, ESTIMATORS), ("--weight-estimator", weight_estimator,
                                                                          ESTIMATORS),
                                 ("--act-granularity", act_granularity, ("per_tensor", "per_token")),
                                 ("--weight-granularity", weight_granularity, ("per_tensor", "per_channel"))):
        require(value in allowed, f"unknown {flag} {value!r}", f"use one of {', '.join(allowed)}")
    bit_list = [parse_bits(b) for b in split(bits)]
    require(bool(bit_list), "empty --bits", "pass e.g. --bits w8a8")
    site_sets = [parse_site_set(s) for s in split(sites) or ["paper"]]
    configs = []
    for wb, ab in bit_list:
        for s in site_sets:
            w = QuantSpec(wb, weight_symmetric, weight_granularity, weight_estimator, momentum=momentum,
                          percentile=percentile)
            a = QuantSpec(ab, act_symmetric, act_granularity, estimator, static=not dynamic, momentum=momentum,
                          percentile=percentile)
            configs.append(QuantConfig(weight=w, activation=a, sites=s, fp32_head=fp32_head, int8_head=int8_head,
                                       symmetric_attention=symmetric_attention))
    return tuple(configs)
