"""Outlier tracking during training: the headline metrics on one fixed batch, and reading them back from a run.

Training (``outlierfree train --track-outliers K``) calls :func:`headline_metrics` every K steps and appends
``{"event": "outliers", "step": s, **metrics}`` to ``RUN_DIR/log.jsonl``; ``outlierfree analyze --track RUN_DIR``
(or analyze on a model with a ``log.jsonl`` beside it) plots them over steps with :func:`read_track`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import OutlierfreeError
from ..records import read_log
from .analyze import HEADLINE_KIND, analyze_model

TRACK_KEYS = ("max_inf_norm", "avg_kurtosis", "max_kurtosis", "largest_activation")


def headline_metrics(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Headline outlier metrics of ``model`` on one batch, in one forward pass (eval mode, no grad; the model's
    mode is restored).

    Args:
        batch: the model's inputs (``input_ids``/``attention_mask``/... or ``pixel_values``); ``labels`` is
            ignored.
    Returns:
        ``max_inf_norm`` (+ ``max_inf_norm_site``), ``avg_kurtosis``, ``max_kurtosis`` (+ ``max_kurtosis_site``),
        ``largest_activation`` (+ site), over the block LayerNorm inputs (see docs/metrics.md).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
    rep = analyze_model(model, [inputs], kinds=(HEADLINE_KIND,), attention=False)
    h = rep["headline"]
    return {k: h.get(k) for k in ("max_inf_norm", "max_inf_norm_site", "avg_kurtosis", "max_kurtosis",
                                  "max_kurtosis_site", "largest_activation", "largest_activation_site")}


def find_log(path: str | Path) -> Path | None:
    """``log.jsonl`` of a run: ``path`` itself, inside it, or beside it (a model saved inside a run directory)."""
    p = Path(path)
    for cand in (p, p / "log.jsonl", p.parent / "log.jsonl"):
        if cand.is_file() and cand.name == "log.jsonl":
            return cand
    return None


def read_track(path: str | Path) -> list[dict[str, Any]]:
    """The ``outliers`` events of a run's ``log.jsonl``, sorted by step (a torn last line is skipped)."""
    log = find_log(path)
    if log is None:
        raise OutlierfreeError(f"no log.jsonl in or beside {str(path)!r}",
                               "pass a run directory written by `outlierfree train --track-outliers K`")
    events = [e for e in read_log(log, ("outliers",))  # the one log reader: skips a line torn by a kill
              if isinstance(e.get("step"), (int, float))
              and any(isinstance(e.get(k), (int, float)) and math.isfinite(e[k]) for k in TRACK_KEYS)]
    return sorted(events, key=lambda e: e["step"])
