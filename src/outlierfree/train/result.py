"""`TrainResult`: what one ``outlierfree train`` run produced, as :func:`outlierfree.train.loop.train` returns it.

The run directory is written by the loop as it goes (checkpoints, log, final model, ``DONE``: the resume protocol
of ``train/rundir.py``), so the result does not write files of its own: it says where they are and carries the
headline numbers that ``OUT/DONE`` and ``OUT/model/train_result.json`` hold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the keys of train_result.json / DONE beside the final validation metrics
_BOOKKEEPING = ("steps", "train_seconds_this_process", "world_size")


@dataclass
class TrainResult:
    """A finished training run.

    Attributes:
        out: the run directory (``OUT/``: log.jsonl, checkpoint/, tokenizer/, DONE).
        model_dir: the final model, ``OUT/model`` (``load_model`` reads it; the result is also a path-like object
            standing for it, so ``load_model(train(cfg))`` works).
        steps: optimizer steps of the run.
        metrics: the final validation metrics (``val_loss`` and ``val_ppl`` or ``val_top1``).
        train_seconds: seconds this process spent in the training loop (of the sitting that finished the run).
        world_size: processes that trained.
        already_finished: True when the run had finished before this call (nothing was trained again).
    """

    out: Path
    model_dir: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float | None = None
    world_size: int = 1
    already_finished: bool = False

    @classmethod
    def from_summary(cls, out: str | os.PathLike, model_dir: str | os.PathLike, summary: dict[str, Any],
                     already_finished: bool = False) -> "TrainResult":
        """The result of the summary the loop writes to ``OUT/DONE`` and ``train_result.json``."""
        return cls(out=Path(out), model_dir=Path(model_dir), steps=int(summary.get("steps", 0)),
                   metrics={k: v for k, v in summary.items() if k not in _BOOKKEEPING},
                   train_seconds=summary.get("train_seconds_this_process"),
                   world_size=int(summary.get("world_size", 1)), already_finished=already_finished)

    def summary(self) -> dict[str, Any]:
        """The dict written to ``OUT/DONE`` and ``OUT/model/train_result.json`` (its keys unchanged)."""
        return {"steps": self.steps, **self.metrics, "train_seconds_this_process": self.train_seconds,
                "world_size": self.world_size}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (paths as strings)."""
        return {"out": str(self.out), "model_dir": str(self.model_dir), "steps": self.steps,
                "metrics": dict(self.metrics), "train_seconds": self.train_seconds, "world_size": self.world_size,
                "already_finished": self.already_finished}

    def lines(self) -> list[str]:
        """What ``outlierfree train`` prints on stdout: the final model's directory."""
        return [str(self.model_dir)]

    def __fspath__(self) -> str:
        return str(self.model_dir)
