"""The settings of one ``outlierfree finetune`` run (its request), validated once, when made, before anything is
loaded or written; and the command line that reproduces it (:meth:`FinetuneConfig.flags`)."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..attention.config import AttentionConfig
from ..errors import OutlierfreeError, require

METHODS = ("retrofit", "qat", "retrofit+qat")
PENALTIES = ("none", "kurtosis", "infnorm", "crest")
DISTILL_POSITIONS = ("all", "masked")
LAYER_TOKENS = ("all", "ordinary")
PENALTY_ON = ("quantized", "float")
RETROFIT_VARIANTS = ("gated", "clipped", "ncs")
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
# fields that do not change what a run computes: a resumed run may change them
NOT_IDENTITY = ("out", "resume", "progress", "measure", "real_int8", "save_every", "measure_batches")
# the retrofit flags of the CLI (--gate-init, --alpha, --eta, --beta) and the variant each belongs to
RETROFIT_FLAGS = {"gate_init": "gated", "alpha": "clipped", "eta": "ncs", "beta": "ncs"}
# fields that no flag of ``outlierfree finetune`` sets (the card names them when they differ from the default)
PYTHON_ONLY = ("grad_clip", "measure_batches")
# fields that are flags of their (dashed) name, except as _FLAG_NAMES says; the attention and the --no-* flags are
# written by FinetuneConfig.flags() itself
_FLAG_FIELDS = ("method", "steps", "lr", "range_lr", "gate_lr", "data", "sites", "weight_granularity",
                "float_weight", "task_weight", "layer_weight", "layer_tokens", "distill_positions", "penalty", "penalty_weight", "penalty_on", "batch_size", "seq_len", "seed", "calib_batches",
                "train_batches", "eval_batches", "mask_draws", "warmup_steps", "save_every")
_FLAG_NAMES = {"penalty": "--outlier-penalty"}
# on/off flags of the quantization grids (quantize's and export's flags of the same names)
GRID_FLAGS = ("fp32_head", "int8_head", "symmetric_attention")
# fields added after runs existed: left out of the identity at their default, so those runs still resume
LATER_FIELDS = {**{k: False for k in GRID_FLAGS}, "distill_positions": "all", "layer_tokens": "all",
                "mask_draws": 1, "penalty_on": "quantized", "task_weight": 0.0}


def retrofit_attention(attention: str = "gated", *, gate_init: float | None = None, alpha: float | None = None,
                       eta: float | None = None, beta: float | None = None) -> dict[str, Any]:
    """The ``attention`` dict of the CLI's ``--attention`` and its retrofit flags; a flag of another variant is a
    one-line error. Clipped softmax gets ``gamma = -alpha / T`` with T per row (alpha 1 unless given)."""
    att: dict[str, Any] = {"variant": attention}
    for name, value in (("gate_init", gate_init), ("alpha", alpha), ("eta", eta), ("beta", beta)):
        if value is not None:
            variant = RETROFIT_FLAGS[name]
            require(attention == variant, f"--{name.replace('_', '-')} applies to --attention {variant}",
                    f"drop it, or pass --attention {variant}")
            att[name] = value
    if attention == "clipped":
        att.setdefault("alpha", 1.0)
        att.setdefault("alpha_t", "row")
    return att


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tune: the request of ``outlierfree finetune`` (every field is checked when it is made, with a
    one-line error naming the flag; :func:`outlierfree.finetune.finetune` takes it).

    Attributes:
        model: the checkpoint to cure (a model directory).
        out: the run directory; the cured model is written to ``out/model``.
        method: ``retrofit`` (attention variant + self-distillation in float), ``qat`` (quantization-aware
            self-distillation with learned ranges) or ``retrofit+qat`` (both).
        steps, lr: optimizer steps and peak AdamW learning rate of the model's weights.
        range_lr: learning rate of the range factors (relative changes; see quant/learned.py).
        gate_lr: learning rate of retrofitted gates (they start at zero).
        data: a text file (or anything ``--data`` takes) to fine-tune and evaluate on; None: the model's own
            training data if it was trained here, else the offline corpus.
        sites: site set quantized during QAT and measured: ``paper``, ``full``, ``linear``, or site kinds joined
            by ``+`` (``ln_input+residual``); validated by :func:`outlierfree.quant.config.parse_site_set` and
            kept as that text (kinds joined by ``+``).
        weight_granularity: ``per_tensor`` or ``per_channel`` weight ranges.
        fp32_head, int8_head, symmetric_attention: the grids of the head and the attention, as the flags of
            ``quantize`` and ``export`` of the same names: QAT learns the ranges of the grids the model will be
            exported with (``--symmetric-attention`` for OpenVINO's int8 attention kernel, ``--int8-head`` for a
            masked LM whose head the paper set leaves float).
        attention: the retrofitted variant (``AttentionConfig`` dict); gated gets ``gate_finetune``.
        float_weight: QAT only: also distil the student's float forward (same weights, no quantization) with this
            weight, so that the cured model's float quality is kept while its W8A8 quality improves (0: off).
        task_weight: also train on the task's own loss with the labels the data carries for free (a masked LM's
            masked tokens, a language model's next tokens, an image classifier's labels), on the student's output
            (the quantized forward under QAT), with this weight (0: off; pure self-distillation). Encoders without
            a task head have no such loss.
        distill_positions: where the output is distilled: ``all`` real tokens, or ``masked``: a masked LM's masked
            positions only (those its perplexity scores; the others only echo their input).
        layer_weight: also distil every LayerNorm output (the hidden states between and inside the blocks) of the
            original, with this weight (0: only the model's output; see losses.py).
        layer_tokens: where the layer loss is scored: ``all`` real tokens, or ``ordinary``: every real token but
            the tokenizer's special ones ([CLS], [SEP], </s>...), whose hidden states carry the outliers of heads
            that "do nothing" (matching them there keeps the outliers the cure is meant to remove).
        penalty, penalty_weight: outlier penalty on the residual sums (LayerNorm inputs): ``kurtosis`` or
            ``infnorm`` (see losses.py).
        penalty_on: which forward the penalty reads under QAT: ``quantized`` (the fake-quantized one, where a
            learned range has already clipped the outliers, so the penalty mostly shrinks ranges) or ``float`` (the
            weights' own float forward, so the penalty shrinks the outliers themselves; it needs ``float_weight``
            > 0, the distillation that keeps that forward close to the original). Without QAT there is only the
            float forward.
        batch_size, seq_len, seed: batches of the run; ``seq_len`` None: the model's training length, else 128.
        calib_batches: batches that initialise the ranges (calibrate()).
        train_batches: the pool of distinct training batches (cycled in a seeded order).
        eval_batches: held-out batches of the before/after measurement (disjoint from the training text).
        mask_draws: masked LMs: the held-out sequences scored under this many draws of masks (pooled; one draw of
            a small split moves a perplexity difference by about +-0.5).
        warmup_steps: linear warm-up; then cosine decay to 0.
        save_every: checkpoint every N steps (0: only at the end).
        measure, real_int8: measure before/after (simulated W8A8, and ONNX Runtime INT8) for the card.
    """

    model: str = ""
    out: str = ""
    method: str = "retrofit+qat"
    steps: int = 300
    lr: float = 2e-5
    range_lr: float = 2e-3
    gate_lr: float = 1e-3
    data: str | None = None
    sites: str = "paper"
    weight_granularity: str = "per_tensor"
    fp32_head: bool = False
    int8_head: bool = False
    symmetric_attention: bool = False
    attention: dict[str, Any] = field(default_factory=lambda: {"variant": "gated"})
    float_weight: float = 0.0
    task_weight: float = 0.0
    layer_weight: float = 0.0
    layer_tokens: str = "all"
    distill_positions: str = "all"
    penalty: str = "none"
    penalty_weight: float = 0.0
    penalty_on: str = "quantized"
    batch_size: int = 8
    seq_len: int | None = None
    seed: int = 0
    calib_batches: int = 8
    train_batches: int = 64
    eval_batches: int = 32
    mask_draws: int = 1
    warmup_steps: int | None = None
    grad_clip: float = 1.0
    save_every: int = 50
    resume: bool = False
    progress: bool = True
    measure: bool = True
    real_int8: bool = True
    measure_batches: int | None = None

    def __post_init__(self) -> None:
        require(bool(self.model), "no model given", "pass the checkpoint directory to fine-tune")
        require(bool(self.out), "no --out given", "pass --out DIR for the run and the cured model")
        require(self.method in METHODS, f"unknown --method {self.method!r}", f"use one of {'|'.join(METHODS)}")
        require(isinstance(self.steps, int) and self.steps >= 1, f"--steps {self.steps} is not a positive number "
                "of steps", "pass --steps 1 or more (e.g. 300)")
        require(self.lr >= 0 and self.range_lr >= 0 and self.gate_lr >= 0, "a learning rate is negative",
                "pass --lr, --range-lr and --gate-lr >= 0")
        from ..quant.config import SITE_PRESETS, parse_site_set

        # what a fine-tune supports: one site set (quantize's comma list of several sets has no meaning here)
        parts = [p.strip() for p in self.sites.split(",")] if isinstance(self.sites, str) else []
        require(len(parts) < 2 or not any(p in SITE_PRESETS for p in parts), f"--sites {self.sites!r} names "
                "several site sets", "pass one: a fine-tune learns the ranges of one set (outlierfree quantize "
                "compares several)")
        sites = parse_site_set(self.sites)  # the one validation of a quantized site set
        object.__setattr__(self, "sites", sites if isinstance(sites, str) else "+".join(sites))
        require(self.weight_granularity in WEIGHT_GRANULARITIES, f"unknown --weight-granularity "
                f"{self.weight_granularity!r}", f"use {' or '.join(WEIGHT_GRANULARITIES)}")
        require(not (self.fp32_head and self.int8_head), "--fp32-head and --int8-head contradict each other",
                "pass one of them")
        require(self.distill_positions in DISTILL_POSITIONS, f"unknown --distill-positions "
                f"{self.distill_positions!r}", f"use {' or '.join(DISTILL_POSITIONS)}")
        require(self.layer_tokens in LAYER_TOKENS, f"unknown --layer-tokens {self.layer_tokens!r}",
                f"use {' or '.join(LAYER_TOKENS)}")
        require(self.layer_tokens == "all" or self.layer_weight > 0, f"--layer-tokens {self.layer_tokens} "
                "applies to the layer loss, which is off", "pass --layer-weight w > 0 too, or drop --layer-tokens")
        require(self.penalty in PENALTIES, f"unknown --outlier-penalty {self.penalty!r}",
                f"use one of {'|'.join(PENALTIES)}")
        require(self.float_weight >= 0, f"--float-weight {self.float_weight} is negative", "pass 0 or more")
        require(self.task_weight >= 0, f"--task-weight {self.task_weight} is negative", "pass 0 or more")
        require(self.layer_weight >= 0, f"--layer-weight {self.layer_weight} is negative", "pass 0 or more")
        require(self.penalty_weight >= 0, f"--penalty-weight {self.penalty_weight} is negative", "pass 0 or more")
        require(self.penalty == "none" or self.penalty_weight > 0, f"--outlier-penalty {self.penalty} needs a weight",
                "pass --penalty-weight w > 0 (e.g. 1e-3 for infnorm)")
        require(self.penalty_on in PENALTY_ON, f"unknown --penalty-on {self.penalty_on!r}",
                f"use {' or '.join(PENALTY_ON)}")
        require(self.penalty_on == "quantized" or self.penalty != "none", f"--penalty-on {self.penalty_on} "
                "applies to the outlier penalty, which is off", "pass --outlier-penalty too, or drop --penalty-on")
        # measured on MiniLM: the float forward penalised and not distilled drifts (token cosine 0.26 to the original)
        require(self.penalty_on == "quantized" or not self.qat or self.float_weight > 0, "--penalty-on float under "
                "QAT needs --float-weight: without it nothing keeps the float forward it reshapes close to the "
                "original", "pass --float-weight w > 0 too (e.g. 1 to 3)")
        for name in ("batch_size", "calib_batches", "train_batches", "eval_batches", "mask_draws"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1",
                    f"pass --{name.replace('_', '-')} 1 or more")
        require(self.calib_batches <= self.train_batches, f"--calib-batches {self.calib_batches} exceeds "
                f"--train-batches {self.train_batches}", "calibrate on at most the training batches")
        require(self.seq_len is None or self.seq_len >= 2, f"--seq-len {self.seq_len} is too short", "pass 2 or more")
        require(self.warmup_steps is None or self.warmup_steps >= 0, f"--warmup-steps {self.warmup_steps} is "
                "negative", "pass 0 or more (default: 10 % of --steps)")
        require(self.grad_clip >= 0, f"grad_clip {self.grad_clip} is negative", "pass 0 (off) or more")
        require(self.measure_batches is None or self.measure_batches >= 1, f"measure_batches "
                f"{self.measure_batches} is too few", "pass 1 or more, or None for every --eval-batches batch")
        require(self.save_every >= 0, "--save-every is negative", "pass 0 (only at the end) or more")
        if self.retrofit:
            att = self.attention_config()
            require(att.variant in RETROFIT_VARIANTS, f"--attention {att.variant} cannot be retrofitted",
                    f"use one of {'|'.join(RETROFIT_VARIANTS)} with --method retrofit")

    @property
    def retrofit(self) -> bool:
        """Whether an attention variant is patched in."""
        return self.method in ("retrofit", "retrofit+qat")

    @property
    def qat(self) -> bool:
        """Whether the student trains under fake quantization."""
        return self.method in ("qat", "retrofit+qat")

    def attention_config(self) -> AttentionConfig:
        """The retrofitted variant; gated attention always starts from the unchanged model (``gate_finetune``)."""
        return _retrofitted(self.attention)

    def warmup(self) -> int:
        """Warm-up steps (10 % of the run by default)."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (finetune_config.json)."""
        d = asdict(self)
        d["attention"] = self.attention_config().to_dict() if self.retrofit else None
        return d

    def identity(self) -> dict[str, Any]:
        """What must match for a run to resume or be recognised as finished."""
        d = self.to_dict()
        for k in NOT_IDENTITY:
            d.pop(k, None)
        for k, default in LATER_FIELDS.items():  # at the default: absent, so a run begun before still resumes
            if d.get(k) == default:
                d.pop(k, None)
        return d

    # ---- the command line of this run ----------------------------------------------------------------------
    def flags(self, out: str | None = None) -> list[str]:
        """The arguments of ``outlierfree finetune`` that make this same run: the model, ``--out`` (``out`` in place
        of ``self.out`` when given, e.g. a placeholder) and every flag whose value differs from its default, so the
        run is reproduced exactly; settings no flag sets are in :meth:`python_only` instead."""
        default = {f.name: f.default for f in fields(self)}
        args = [self.model, "--out", self.out if out is None else out]
        for name in _FLAG_FIELDS:
            value = getattr(self, name)
            if value != default[name]:
                args += [_FLAG_NAMES.get(name, "--" + name.replace("_", "-")), str(value)]
        args += self._grid_args()
        if self.retrofit:
            variant = self.attention.get("variant", "gated")
            args += ["--attention", variant] if variant != "gated" else []
            for name, owner in RETROFIT_FLAGS.items():
                value = self.attention.get(name)
                if owner == variant and value is not None and not (name == "alpha" and value == 1.0):
                    args += ["--" + name.replace("_", "-"), str(value)]
        args += ["--no-measure"] if not self.measure else []
        args += ["--no-real-int8"] if not self.real_int8 else []
        return args

    def quant_flags(self) -> list[str]:
        """The flags that make ``outlierfree quantize`` and ``export`` quantize the cured model on the grids its
        ranges were learned on (site set, weight granularity, head and attention grids); empty for the defaults."""
        args = ["--sites", self.sites] if self.sites != "paper" else []
        args += ["--weight-granularity", self.weight_granularity] if self.weight_granularity != "per_tensor" else []
        return args + self._grid_args()

    def _grid_args(self) -> list[str]:
        """The on/off grid flags that are on (``--int8-head``, ``--symmetric-attention``...), in GRID_FLAGS order."""
        return ["--" + name.replace("_", "-") for name in GRID_FLAGS if getattr(self, name)]

    def python_only(self) -> dict[str, Any]:
        """The settings of this run that no ``outlierfree finetune`` flag sets (``grad_clip``, ``measure_batches``,
        attention fields beyond the retrofit flags), where they differ from what the flags give."""
        default = {f.name: f.default for f in fields(self)}
        extra = {k: getattr(self, k) for k in PYTHON_ONLY if getattr(self, k) != default[k]}
        if self.retrofit:
            variant = self.attention.get("variant", "gated")
            given = {k: self.attention[k] for k in RETROFIT_FLAGS if self.attention.get(k) is not None}
            try:
                by_flags = retrofit_attention(variant, **given)
            except OutlierfreeError:  # a value the flags cannot carry
                by_flags = None
            if by_flags is None or _retrofitted(by_flags) != self.attention_config():
                extra["attention"] = self.attention_config().to_dict()
        return extra

    def command(self, out: str | None = None) -> str:
        """:meth:`flags` as one shell line, ``outlierfree finetune ...``."""
        return " ".join(["outlierfree", "finetune", *(shlex.quote(a) for a in self.flags(out))])


def _retrofitted(attention: dict[str, Any]) -> AttentionConfig:
    """The variant an ``attention`` dict retrofits: gated attention always starts from the unchanged model."""
    att = AttentionConfig.from_dict(attention)
    return att.replace(gate_finetune=True) if att.variant == "gated" else att
