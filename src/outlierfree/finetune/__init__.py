"""``outlierfree finetune``: cure an already-trained checkpoint so full static W8A8 matches float, without labels.

    from outlierfree.finetune import FinetuneConfig, finetune
    model_dir = finetune(FinetuneConfig(model="path/to/model", out="runs/cured", method="retrofit+qat", steps=300))

Retrofit (gated attention patched in with outputs unchanged, or clipped softmax / NCS), self-distillation from the
frozen original, and quantization-aware training with learned (LSQ+-style) ranges; see docs/finetune.md.
"""

from .config import METHODS, PENALTIES, FinetuneConfig
from .loop import finetune

__all__ = ["FinetuneConfig", "finetune", "METHODS", "PENALTIES"]
