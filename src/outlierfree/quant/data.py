"""Calibration and evaluation batches for ``quantize``, ``export``, ``doctor`` and ``reproduce``: the shared
evaluation-data layer (:mod:`outlierfree.data.evaluation`) with the quantization commands' sampling.

A model trained here (``train_config.json`` beside the weights) is calibrated on a seeded sample of its own
training split and evaluated on its own validation split, packed as in training; text given with ``--data`` to
any other model (or one that never trained on it) is used whole: calibration on its first sequences, evaluation
on the ones after them. MLM masks are drawn from a generator seeded per batch, so float and quantized runs see
the same masked positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..data.evaluation import Batches, model_batches, task_of

__all__ = ["Batches", "make_batches", "task_of"]


def make_batches(model: nn.Module, model_dir: str | Path | None, tokenizer: Any, calib_batches: int,
                 eval_batches: int | None, batch_size: int = 8, seq_len: int | None = None, seed: int = 0,
                 data: str | None = None, max_sequences: int | None = None) -> Batches:
    """Calibration and evaluation batches for ``model`` (see the module docstring for which data).

    ``eval_batches`` None: 4 from a validation split, every remaining sequence of a whole text (at most
    ``max_sequences`` sequences are read from it). Raises a one-line error when the data is smaller than asked.
    """
    return model_batches(model, model_dir, tokenizer, calib_batches, eval_batches, batch_size, seq_len, seed, data,
                         max_sequences=max_sequences, purpose="quantize")
