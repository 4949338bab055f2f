"""`FinetuneResult`: what one ``outlierfree finetune`` run produced, as :func:`outlierfree.finetune.finetune`
returns it.

The run directory is written by the loop as it goes (checkpoints, log, the cured model with its card,
``finetune_result.json`` and learned ranges, then ``DONE``: train/rundir.py's resume protocol), so the result does
not write files of its own: it says where they are and carries the before/after numbers of
``OUT/model/finetune_result.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_FILE = "finetune_result.json"
CARD_FILE = "README.md"


@dataclass
class FinetuneResult:
    """A finished fine-tune.

    Attributes:
        out: the run directory (``OUT/``: log.jsonl, checkpoint/, DONE).
        model_dir: the cured model, ``OUT/model`` (every command reads it; the result is also a path-like object
            standing for it).
        card: the model card, ``OUT/model/README.md``.
        record: ``finetune_result.json`` as a dict: ``steps``, ``train_seconds``, ``world_size``, ``data``,
            ``quant`` and, when measured, ``before`` / ``after`` (``{"float", "simulated", "int8"}`` metrics against
            the original float model). Empty on the non-main processes of a multi-process run.
        already_finished: True when the run had finished before this call (nothing was fine-tuned again).
    """

    out: Path
    model_dir: Path
    record: dict[str, Any]
    already_finished: bool = False

    @classmethod
    def read(cls, out: str | os.PathLike, already_finished: bool = False) -> "FinetuneResult":
        """The result of the finished run in ``out`` (its ``finetune_result.json``; empty when unreadable)."""
        model_dir = Path(out) / "model"
        try:
            record = json.loads((model_dir / RESULT_FILE).read_text())
        except (OSError, ValueError):
            record = {}
        return cls(Path(out), model_dir, record if isinstance(record, dict) else {}, already_finished)

    @property
    def card(self) -> Path:
        """The model card (README.md beside the cured weights)."""
        return self.model_dir / CARD_FILE

    @property
    def before(self) -> dict[str, Any] | None:
        """The original model's metrics against itself in float (None when not measured)."""
        return self.record.get("before")

    @property
    def after(self) -> dict[str, Any] | None:
        """The cured model's metrics against the original float model (None when not measured)."""
        return self.record.get("after")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (paths as strings)."""
        return {"out": str(self.out), "model_dir": str(self.model_dir), "card": str(self.card),
                "record": self.record, "already_finished": self.already_finished}

    def lines(self) -> list[str]:
        """What ``outlierfree finetune`` prints on stdout."""
        return [f"cured model: {self.model_dir}"]

    def __fspath__(self) -> str:
        return str(self.model_dir)
