"""`TrainConfig`: every setting of a training run, as a plain dataclass (one field per CLI flag).

It is the request of ``outlierfree train``: read from YAML/JSON (``TrainConfig.from_file``), overridden by CLI flags
(``train/cli.py`` builds it by keywords), validated once by :meth:`TrainConfig.resolved` (which
:func:`outlierfree.train.loop.train` calls first, before any work), and saved with the checkpoints and the final
model (``train_config.json``); a resumed run must have the same config. It is frozen: a changed copy is
``cfg.replace(...)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..attention.config import AttentionConfig
from ..attention import variants
from ..data import defaults
from ..errors import OutlierfreeError, require

TASKS = ("mlm", "clm", "image")
TASK_FAMILY = {"mlm": "bert", "clm": "opt", "image": "vit"}
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "no", "fp16", "bf16")
# fields that may differ between a run and its resumption: they change logging and bookkeeping, not the weights
RUNTIME_FIELDS = ("resume", "progress", "log_every", "eval_every", "save_every", "track_outliers", "out")
# fields added with the zoo (issue 16), with their defaults: left out of identity() at these values, so checkpoints and
# finished runs made before they existed still resume and are still recognised
LATER_DEFAULTS = {"gamma_ramp_steps": 0, "optimizer": "adamw", "norm": "layernorm", "embed_proj": False}
_EXAMPLES = {"steps": 100, "batch_size": 32, "seq_len": 128, "vocab_size": 8192, "log_every": 10, "val_size": 256}
DEFAULT_STEPS = {"mlm": 100, "clm": 100, "image": 500}
DEFAULT_BATCH = {"mlm": 32, "clm": 16, "image": 64}
# the HF config keys that --hidden-dropout / --attention-dropout set, per family
DROPOUT_KEYS = {"bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                "opt": ("dropout", "attention_dropout"),
                "vit": ("hidden_dropout_prob", "attention_probs_dropout_prob")}


@dataclass(frozen=True)
class TrainConfig:
    """A training run. ``None`` fields take a task-dependent default in :meth:`resolved`.

    Model: ``task`` (mlm | clm | image), ``family`` (bert | opt | vit; default from the task), ``size``,
    ``attention`` (an :class:`AttentionConfig` dict), ``hf_config`` (Hugging Face config overrides, ``--set``),
    ``hidden_dropout`` / ``attention_dropout``.
    Data: ``data`` (None = offline Wikipedia corpus or Fashion-MNIST), ``text_column``, ``hf_split``,
    ``val_fraction``, ``tokenizer`` (existing directory) or ``vocab_size`` (trained), ``seq_len``, ``mlm_probability``.
    Optimisation: ``steps`` (default 100 mlm / 100 clm / 500 image), ``batch_size`` (default 32 / 16 / 64; global, per optimizer step, over all processes and accumulation),
    ``grad_accum``, ``lr``, ``warmup_steps``, ``schedule``, ``min_lr_ratio``, ``weight_decay``, ``decay_norm``
    (also decay LayerNorm weights, as the reference OPT script does), ``adam_beta1/2``, ``adam_eps``,
    ``grad_clip`` (0 = off), ``precision``, ``seed``.
    Run: ``out``, ``log_every``, ``eval_every``, ``val_size`` (validation sequences/images, default 256 / 2000), ``save_every``
    (0 = only at the end), ``resume``, ``track_outliers`` (every K steps, 0 = off), ``progress``.
    """

    task: str = "mlm"
    family: str | None = None
    size: str = "tiny"
    attention: dict[str, Any] = field(default_factory=dict)
    hf_config: dict[str, Any] = field(default_factory=dict)
    hidden_dropout: float | None = None
    attention_dropout: float | None = None
    data: str | None = None
    text_column: str = "text"
    hf_split: str = "train"
    val_fraction: float | None = None
    tokenizer: str | None = None
    vocab_size: int = 8192
    seq_len: int = 128
    mlm_probability: float = defaults.MLM_PROBABILITY
    steps: int | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int | None = None
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    decay_norm: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    grad_clip: float = 1.0
    gamma_ramp_steps: int = 0
    optimizer: str = "adamw"
    norm: str = "layernorm"
    embed_proj: bool = False
    precision: str = "auto"
    seed: int = 0
    out: str = "runs/train"
    log_every: int = 10
    eval_every: int = 50
    val_size: int | None = None
    save_every: int = 50
    resume: bool = False
    track_outliers: int = 0
    progress: bool = True

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        """A config from a dict; unknown keys are an error (a typo would otherwise be silently ignored)."""
        require(isinstance(d, dict), f"the {source} must be a mapping of settings, got {type(d).__name__}",
                "write `key: value` lines (YAML) or a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise OutlierfreeError(f"unknown setting(s) {unknown} in {source}",
                                   f"valid keys are: {', '.join(sorted(names))}")
        if isinstance(d.get("attention"), str):
            d["attention"] = {"variant": d["attention"]}
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """Read a YAML (``.yaml``/``.yml``) or JSON config file. A resolved ``train_config.json`` works too."""
        import yaml

        p = Path(path)
        require(p.is_file(), f"the config file {str(path)!r} does not exist", "pass an existing YAML or JSON file")
        try:
            text = p.read_text(encoding="utf-8")
            d = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
            raise OutlierfreeError(f"cannot parse the config file {str(path)!r}: {str(e).splitlines()[0]}",
                                   "fix its YAML/JSON syntax") from e
        return cls.from_dict(d or {}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ---- validation -----------------------------------------------------------------------------------
    def resolved(self) -> "TrainConfig":
        """A validated copy with every default filled in (family, attention dict, warm-up, val fraction)."""
        from ..models.sizes import SIZES

        c = self.replace(attention=dict(self.attention or {}), hf_config=dict(self.hf_config or {}))
        require(c.task in TASKS, f"unknown task {c.task!r}", f"use one of {', '.join(TASKS)}")
        c = c.replace(family=c.family or TASK_FAMILY[c.task])
        require(c.family in SIZES, f"unknown model family {c.family!r}", f"use one of {', '.join(SIZES)}")
        require(TASK_FAMILY[c.task] == c.family, f"task {c.task} does not go with family {c.family}",
                f"use --family {TASK_FAMILY[c.task]} for --task {c.task} (mlm: bert, clm: opt, image: vit)")
        require(c.size in SIZES[c.family], f"unknown size {c.size!r} for {c.family}",
                f"use one of {', '.join(SIZES[c.family])} (see `outlierfree models`)")
        # the attention dict is validated and filled; defaults sized to finish in a minute or two on a laptop CPU
        c = c.replace(attention=AttentionConfig.from_dict(c.attention).to_dict(),
                      steps=DEFAULT_STEPS[c.task] if c.steps is None else c.steps,
                      batch_size=DEFAULT_BATCH[c.task] if c.batch_size is None else c.batch_size,
                      val_size=(2000 if c.task == "image" else 256) if c.val_size is None else c.val_size)
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "vocab_size", "log_every", "val_size"):
            v = getattr(c, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                    f"--{name.replace('_', '-')} must be a positive integer, got {v!r}", f"pass e.g. "
                    f"--{name.replace('_', '-')} {_EXAMPLES.get(name, 1)}")
        for name in ("eval_every", "save_every", "track_outliers", "seed"):
            v = getattr(c, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                    f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}", "pass 0 to turn it off")
        for name in ("lr", "weight_decay", "grad_clip", "adam_eps", "min_lr_ratio"):
            v = getattr(c, name)
            require(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                    f"--{name.replace('_', '-')} must be a finite number >= 0, got {v!r}", "pass e.g. 1e-3")
        require(c.lr > 0, f"--lr must be positive, got {c.lr}", "pass e.g. --lr 1e-3")
        require(0 <= c.adam_beta1 < 1 and 0 <= c.adam_beta2 < 1, "Adam betas must be in [0, 1)", "pass e.g. 0.9, 0.999")
        require(c.schedule in SCHEDULES, f"unknown schedule {c.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        require(c.precision in PRECISIONS, f"unknown precision {c.precision!r}", f"use one of {', '.join(PRECISIONS)}")
        require(c.batch_size % c.grad_accum == 0, f"--batch-size {c.batch_size} is not a multiple of --grad-accum "
                f"{c.grad_accum}", "pass a batch size divisible by the accumulation steps")
        require(0 < c.mlm_probability < 1, f"--mlm-probability must be in (0, 1), got {c.mlm_probability}", "pass 0.15")
        if c.warmup_steps is None:
            c = c.replace(warmup_steps=max(1, c.steps // 10))
        require(isinstance(c.warmup_steps, int) and c.warmup_steps >= 0, f"--warmup-steps must be >= 0, got "
                f"{c.warmup_steps!r}", "pass e.g. --warmup-steps 100")
        if c.val_fraction is None:
            c = c.replace(val_fraction=defaults.val_fraction(images=c.task == "image"))  # the one place these live
        require(0 <= c.val_fraction < 1, f"--val-fraction must be in [0, 1), got {c.val_fraction}", "pass e.g. 0.02")
        from ..models.recipe import NORMS
        from .optim import OPTIMIZERS

        require(c.optimizer in OPTIMIZERS, f"unknown optimizer {c.optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
        require(c.norm in NORMS, f"unknown norm {c.norm!r}", f"use one of {', '.join(NORMS)}")
        require(isinstance(c.embed_proj, bool), f"--embed-proj must be true or false, got {c.embed_proj!r}",
                "pass --embed-proj or leave it out")
        r = c.gamma_ramp_steps
        require(isinstance(r, int) and not isinstance(r, bool) and r >= 0, f"--gamma-ramp-steps must be an "
                f"integer >= 0, got {r!r}", "pass e.g. --gamma-ramp-steps 1000 (0 = off)")
        if r:
            variant = AttentionConfig.from_dict(c.attention).params
            ramped = [n for n, cls in variants.REGISTRY.items() if cls.ramps]
            require(variant.ramps, f"--gamma-ramp-steps does not apply to --attention {variant.name}",
                    f"drop it, or use --attention {' or '.join(ramped)}")
            # the last step must train at the full gamma: the saved model runs with it
            require(r < c.steps, f"--gamma-ramp-steps {r} is not below --steps {c.steps}, so the model would be "
                    f"saved with a gamma it never trained at", f"pass at most --gamma-ramp-steps {c.steps - 1}")
        for name in ("hidden_dropout", "attention_dropout"):
            v = getattr(c, name)
            if v is not None:
                require(0 <= v < 1, f"--{name.replace('_', '-')} must be in [0, 1), got {v}", "pass e.g. 0.1")
        return c

    def model_overrides(self) -> dict[str, Any]:
        """Hugging Face config overrides: ``hf_config`` plus the dropout shortcuts."""
        fam = self.family or TASK_FAMILY.get(self.task, "bert")
        over = dict(self.hf_config)
        hidden_key, attn_key = DROPOUT_KEYS[fam]
        if self.hidden_dropout is not None:
            over[hidden_key] = self.hidden_dropout
        if self.attention_dropout is not None:
            over[attn_key] = self.attention_dropout
        return over

    def identity(self) -> dict[str, Any]:
        """The fields that determine the trained weights (everything but :data:`RUNTIME_FIELDS`)."""
        d = self.to_dict()
        for k in RUNTIME_FIELDS:
            d.pop(k, None)
        for k, default in LATER_DEFAULTS.items():
            if d.get(k) == default:
                d.pop(k)
        return d


def config_difference(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two config dicts (``identity()`` dicts), as ``key: a -> b`` strings.

    Attention configs are compared as configs, so one written before issue 25 (every variant's fields) equals the
    same config written now (the variant's own)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k == "attention" and _same_attention(a.get(k), b.get(k)):
            continue
        if a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def _same_attention(a: Any, b: Any) -> bool:
    """Whether two stored attention dicts describe the same config (False when either is not a valid one)."""
    try:
        return AttentionConfig.from_dict(a) == AttentionConfig.from_dict(b)
    except (OutlierfreeError, TypeError, AttributeError):
        return False


def parse_set(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict, values parsed as YAML scalars (``0.1`` -> float, ``true`` -> bool)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        require(bool(sep) and bool(key.strip()), f"--set {item!r} is not key=value",
                "pass e.g. --set hidden_dropout_prob=0.0")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            out[key.strip()] = value
    return out
