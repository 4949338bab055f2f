"""Pre-training BERT (masked LM), OPT (causal LM) and ViT (images) with any attention variant, on Accelerate.

    from outlierfree.train import TrainConfig, train
    result = train(TrainConfig(task="clm", attention={"variant": "gated"}, out="runs/opt-gated"))
    # with --track-outliers K: train(cfg, outlier_metrics=outlierfree.analysis.tracking.headline_metrics)
    result.model_dir  # OUT/model; result.metrics: the final validation metrics
"""

from typing import Any, Callable

from .config import TrainConfig
from .result import TrainResult


def train(cfg: TrainConfig, *, outlier_metrics: Callable[..., dict[str, Any]] | None = None) -> TrainResult:
    """Run (or resume, or skip if finished) the training described by ``cfg``; returns its :class:`TrainResult`
    (the final model directory and validation metrics). ``outlier_metrics``: the probe ``cfg.track_outliers``
    calls (``outlierfree.analysis.tracking.headline_metrics``). The loop is imported lazily, which keeps
    ``import outlierfree.train`` light."""
    from .loop import train as _train

    return _train(cfg, outlier_metrics=outlier_metrics)


__all__ = ["TrainConfig", "TrainResult", "train"]
