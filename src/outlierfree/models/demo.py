"""``outlierfree demo`` as a library call: build a small model with an attention variant, run one forward and
backward pass on a random batch, and say what happened.

    from outlierfree.models.demo import DemoRequest, run_demo
    result = run_demo(DemoRequest(family="opt", attention={"variant": "gated", "gate_init": 0.5}))
    print("\\n".join(result.lines()))
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..attention.config import AttentionConfig
from ..errors import require


@dataclass(frozen=True)
class DemoRequest:
    """What ``outlierfree demo`` is asked to do; every field is checked when it is made (one-line errors).

    Attributes:
        family, size: the model (``outlierfree models`` lists them).
        attention: the variant (an :class:`AttentionConfig`, its dict or its name); default clipped softmax at
            gamma = -1/T per row.
        seed: seeds the weights and the random batch.
        batch_size, seq_len: the random batch (text models: ``batch_size`` x ``seq_len`` token ids; ViT:
            ``batch_size`` images of the model's size).
    """

    family: str = "bert"
    size: str = "tiny"
    attention: AttentionConfig = field(default_factory=lambda: AttentionConfig("clipped"))
    seed: int = 0
    batch_size: int = 4
    seq_len: int = 64

    def __post_init__(self) -> None:
        from .build import model_config

        att = self.attention
        att = AttentionConfig(att) if isinstance(att, str) else AttentionConfig.from_dict(att) \
            if isinstance(att, dict) else att
        require(isinstance(att, AttentionConfig), f"attention must be an AttentionConfig, got {type(att).__name__}",
                "pass AttentionConfig(...), its dict, or a variant name")
        object.__setattr__(self, "attention", att)
        model_config(self.family, self.size)  # the one check of --family and --size (one-line errors)
        require(self.batch_size >= 1, f"batch_size {self.batch_size} is too small", "pass 1 or more")
        require(self.seq_len >= 2, f"seq_len {self.seq_len} is too short", "pass 2 or more")


@dataclass
class DemoResult:
    """What the demo measured: the model, one forward + backward pass, and layer 0's attention probabilities."""

    family: str
    size: str
    attention: str  # AttentionConfig.describe()
    parameters: int
    batch_shape: tuple[int, ...]  # the first input's shape: (B, T) token ids or (B, C, H, W) pixels
    loss: float
    seconds: float  # forward + backward
    heads: int  # layer 0
    zero_fraction: float  # share of layer-0 attention probabilities that are exactly zero
    row_sum_min: float
    row_sum_max: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {**asdict(self), "batch_shape": list(self.batch_shape)}

    def lines(self) -> list[str]:
        """What ``outlierfree demo`` prints."""
        return [f"built {self.family}/{self.size} with {self.attention} attention: {self.parameters:,} parameters",
                f"forward+backward on a batch of {self.batch_shape}: loss {self.loss:.3f} in "
                f"{self.seconds * 1000:.0f} ms",
                f"layer-0 attention: {self.heads} heads, exact zeros {100 * self.zero_fraction:.1f}% of "
                f"probabilities, row sums in [{self.row_sum_min:.3f}, {self.row_sum_max:.3f}]"]


def run_demo(request: DemoRequest) -> DemoResult:
    """Build ``request``'s model (seeded), run one forward and backward pass on a seeded random batch with the
    task's labels, and measure layer 0's attention probabilities: the library call behind ``outlierfree demo``."""
    from .build import build_model, count_parameters

    model = build_model(request.family, request.size, request.attention, seed=request.seed)
    torch.manual_seed(request.seed)
    b = request.batch_size
    if request.family == "vit":
        c = model.config
        batch = dict(pixel_values=torch.randn(b, c.num_channels, c.image_size, c.image_size),  # (B, C, H, W)
                     labels=torch.randint(0, c.num_labels, (b,)))  # (B,)
    else:
        ids = torch.randint(5, model.config.vocab_size, (b, request.seq_len))  # (B, T)
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    t0 = time.perf_counter()
    out = model(**batch, output_attentions=True)
    out.loss.backward()
    seconds = time.perf_counter() - t0
    probs = out.attentions[0].detach()  # (B, heads, T, T)
    rows = probs.sum(-1)  # (B, heads, T)
    return DemoResult(family=request.family, size=request.size, attention=request.attention.describe(),
                      parameters=count_parameters(model), batch_shape=tuple(next(iter(batch.values())).shape),
                      loss=out.loss.item(), seconds=seconds, heads=probs.shape[1],
                      zero_fraction=float((probs == 0).float().mean()), row_sum_min=float(rows.min()),
                      row_sum_max=float(rows.max()))
