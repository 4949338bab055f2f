"""The settings of one ``outlierfree finetune`` run, validated before anything is loaded or written."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..attention.config import AttentionConfig
from ..errors import require

METHODS = ("retrofit", "qat", "retrofit+qat")
PENALTIES = ("none", "kurtosis", "infnorm")
RETROFIT_VARIANTS = ("gated", "clipped", "ncs")
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
# fields that do not change what a run computes: a resumed run may change them
NOT_IDENTITY = ("out", "resume", "progress", "measure", "real_int8", "save_every", "measure_batches")


@dataclass
class FinetuneConfig:
    """One fine-tune.

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
        sites: site set quantized during QAT and measured: ``paper``, ``full``, ``linear``.
        weight_granularity: ``per_tensor`` or ``per_channel`` weight ranges.
        attention: the retrofitted variant (``AttentionConfig`` dict); gated gets ``gate_finetune``.
        float_weight: QAT only: also distil the student's float forward (same weights, no quantization) with this
            weight, so that the cured model's float quality is kept while its W8A8 quality improves (0: off).
        penalty, penalty_weight: outlier penalty on the residual sums (LayerNorm inputs): ``kurtosis`` or
            ``infnorm`` (see losses.py).
        batch_size, seq_len, seed: batches of the run; ``seq_len`` None: the model's training length, else 128.
        calib_batches: batches that initialise the ranges (calibrate()).
        train_batches: the pool of distinct training batches (cycled in a seeded order).
        eval_batches: held-out batches of the before/after measurement (disjoint from the training text).
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
    attention: dict[str, Any] = field(default_factory=lambda: {"variant": "gated"})
    float_weight: float = 0.0
    penalty: str = "none"
    penalty_weight: float = 0.0
    batch_size: int = 8
    seq_len: int | None = None
    seed: int = 0
    calib_batches: int = 8
    train_batches: int = 64
    eval_batches: int = 32
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
        require(self.sites in ("paper", "full", "linear"), f"unknown --sites {self.sites!r}",
                "use paper, full or linear")
        require(self.weight_granularity in WEIGHT_GRANULARITIES, f"unknown --weight-granularity "
                f"{self.weight_granularity!r}", f"use {' or '.join(WEIGHT_GRANULARITIES)}")
        require(self.penalty in PENALTIES, f"unknown --outlier-penalty {self.penalty!r}",
                f"use one of {'|'.join(PENALTIES)}")
        require(self.float_weight >= 0, f"--float-weight {self.float_weight} is negative", "pass 0 or more")
        require(self.penalty_weight >= 0, f"--penalty-weight {self.penalty_weight} is negative", "pass 0 or more")
        require(self.penalty == "none" or self.penalty_weight > 0, f"--outlier-penalty {self.penalty} needs a weight",
                "pass --penalty-weight w > 0 (e.g. 1e-3 for infnorm)")
        for name in ("batch_size", "calib_batches", "train_batches", "eval_batches"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1",
                    f"pass --{name.replace('_', '-')} 1 or more")
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
        att = AttentionConfig.from_dict(self.attention)
        if att.variant == "gated":
            att = att.replace(gate_finetune=True)
        return att

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
        return d
