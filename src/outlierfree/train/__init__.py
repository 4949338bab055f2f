"""Pre-training BERT (masked LM), OPT (causal LM) and ViT (images) with any attention variant, on Accelerate.

    from outlierfree.train import TrainConfig, train
    model_dir = train(TrainConfig(task="clm", attention={"variant": "gated"}, out="runs/opt-gated"))
"""

from .config import TrainConfig


def train(cfg: "TrainConfig"):  # noqa: ANN201 - lazy import keeps `import outlierfree.train` light
    """Run (or resume, or skip if finished) the training described by ``cfg``; returns the final model dir."""
    from .loop import train as _train

    return _train(cfg)


__all__ = ["TrainConfig", "train"]
