"""``outlierfree finetune``: cure an already-trained checkpoint so full static W8A8 matches float, without labels.

    from outlierfree.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="path/to/model", out="runs/cured", method="retrofit+qat", steps=300))
    result.model_dir, result.after  # the cured model, its numbers against the original float model

Retrofit (gated attention patched in with outputs unchanged, or clipped softmax / NCS), self-distillation from the
frozen original, and quantization-aware training with learned (LSQ+-style) ranges; see docs/finetune.md.
"""

from .config import METHODS, PENALTIES, FinetuneConfig
from .loop import finetune
from .result import FinetuneResult

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "METHODS", "PENALTIES"]
