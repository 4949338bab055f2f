"""The one reader of what ``outlierfree train`` records beside a model: ``train_config.json`` (data, split,
sequence length, masking) and, for images, ``image_normalisation.json`` (the mean and std the model was trained
with). Every command that evaluates a model reads them here, so all of them see the same data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutlierfreeError
from . import defaults

TRAIN_CONFIG = "train_config.json"
IMAGE_NORMALISATION = "image_normalisation.json"


def model_dir(model_path: str | Path | None) -> Path | None:
    """The directory holding a model's files: ``model_path`` itself, or its parent for a file (a .gguf)."""
    if model_path is None:
        return None
    p = Path(model_path)
    return p if p.is_dir() else p.parent


@dataclass(frozen=True)
class TrainingRecord:
    """What training recorded beside a model. ``config`` is train_config.json as written; ``mean``/``std`` come
    from image_normalisation.json (None when absent)."""

    directory: Path
    config: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def trained_here(self) -> bool:
        """Whether train_config.json was read (the model was trained by ``outlierfree train``)."""
        return bool(self.config)

    @property
    def data(self) -> str | None:
        """The ``--data`` the model was trained on (None: the default corpus / Fashion-MNIST)."""
        return self.config.get("data")

    def val_fraction(self, images: bool = False) -> float:
        """The validation fraction training held out (a recorded 0 or nonsense: training's default)."""
        f = self.config.get("val_fraction")
        return float(f) if isinstance(f, (int, float)) and 0 < f < 1 else defaults.val_fraction(images)

    @property
    def seq_len(self) -> int | None:
        """Training's sequence length (None when not recorded)."""
        s = self.config.get("seq_len")
        return int(s) if isinstance(s, int) and s > 0 else None

    @property
    def mlm_probability(self) -> float:
        """Training's masked fraction."""
        return float(self.config.get("mlm_probability") or defaults.MLM_PROBABILITY)

    @property
    def text_column(self) -> str:
        """The dataset column training read."""
        return str(self.config.get("text_column") or defaults.TEXT_COLUMN)

    @property
    def hf_split(self) -> str:
        """The Hugging Face split training read."""
        return str(self.config.get("hf_split") or defaults.HF_SPLIT)


def read_training_record(model_path: str | Path | None) -> TrainingRecord | None:
    """The record beside ``model_path``, or None when there is none. A train_config.json that cannot be read
    counts as absent (nothing is known about the training: the model is treated as any other checkpoint); an
    image_normalisation.json alone (a released ViT) still gives the statistics.

    A present but malformed image_normalisation.json is a one-line error: evaluating a ViT with other statistics
    than it trained with would silently measure a different model.
    """
    d = model_dir(model_path)
    if d is None:
        return None
    config: Any = {}
    if (d / TRAIN_CONFIG).is_file():
        try:
            config = json.loads((d / TRAIN_CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            config = {}
    config = config if isinstance(config, dict) else {}
    mean = std = None
    norm = d / IMAGE_NORMALISATION
    if norm.is_file():
        try:
            n = json.loads(norm.read_text(encoding="utf-8"))
            mean, std = tuple(float(v) for v in n["mean"]), tuple(float(v) for v in n["std"])
            if not mean or len(mean) != len(std) or min(std) <= 0:
                raise ValueError("mean and std must be equally long, std positive")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise OutlierfreeError(f"{str(norm)!r} is malformed ({e})",
                                   'write {"mean": [...], "std": [...]} as training does, or delete it') from e
    if not config and mean is None:
        return None
    return TrainingRecord(d, config, mean, std)
