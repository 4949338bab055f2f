"""Pre-training BERT (masked LM), OPT (causal LM) and ViT (images) with any attention variant, on Accelerate.

    from outlierfree.train import TrainConfig, train
    result = train(TrainConfig(task="clm", attention={"variant": "gated"}, out="runs/opt-gated"))
    result.model_dir  # OUT/model; result.metrics: the final validation metrics
"""

from .config import TrainConfig
from .result import TrainResult


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume, or skip if finished) the training described by ``cfg``; returns its :class:`TrainResult`
    (the final model directory and validation metrics). The loop is imported lazily, which keeps
    ``import outlierfree.train`` light."""
    from .loop import train as _train

    return _train(cfg)


__all__ = ["TrainConfig", "TrainResult", "train"]
