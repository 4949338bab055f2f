"""Evaluation batches for analysis: the model's inputs plus what the metrics need to name tokens and find no-op keys.

The sequences and images come from the shared evaluation-data layer (:mod:`outlierfree.data.evaluation`), the
same reading of a model's training record that ``quantize`` uses: a model trained here is analysed on the
validation split it held out (packed as in training, a seeded sample); text given with ``--data`` to a model that
never trained on it is used whole, cut into sequences of ``--seq-len`` tokens (``--max-sequences`` bounds it);
images are normalised with the model's ``image_normalisation.json``. This module adds what only analysis needs:
token labels and the no-op key sets (first token, delimiters, background patches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import defaults
from ..data.evaluation import PACKINGS, is_causal, is_ours, model_batches  # noqa: F401 (is_causal/is_ours: API)
from ..errors import require

VAL_FRACTION = defaults.VAL_FRACTION_TEXT  # training's default --val-fraction: the same documents are held out
# the paper's delimiter tokens are [SEP], [CLS], '.' and ','; other sentence punctuation and newlines behave alike
DELIMITER_TEXTS = {".", ",", ";", ":", "!", "?", "\n", "<0x0A>", "Ċ"}
BACKGROUND_MAX = 10  # an image patch is background when no pixel exceeds this (of 255)


@dataclass
class EvalBatch:
    """One batch: ``inputs`` for the model, plus per-token information (all (B, T) over the model's tokens).

    Attributes:
        inputs: keyword arguments of the model's forward (input_ids/attention_mask or pixel_values).
        mask: boolean (B, T), True for real tokens (False for padding).
        labels: B lists of T token labels (text: the tokenizer's tokens; images: ``[CLS]``, ``p<row>,<col>``).
        keys: boolean (B, T) tensors naming the no-op key sets: ``first`` (position 0), ``delimiter``
            (special tokens and punctuation) and, for images, ``background`` (all-black patches).
    """

    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor
    labels: list[list[str]]
    keys: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of sequences."""
        return int(self.mask.shape[0])


def from_inputs(inputs: dict[str, torch.Tensor], tokenizer: Any = None) -> EvalBatch:
    """An :class:`EvalBatch` from a plain input dict (``input_ids``/``attention_mask`` or ``pixel_values``)."""
    if "input_ids" in inputs:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        return text_batch(ids, mask, tokenizer, extra={k: v for k, v in inputs.items()
                                                       if k not in ("input_ids", "attention_mask", "labels")})
    require("pixel_values" in inputs, f"cannot analyse a batch with keys {sorted(inputs)}",
            "pass input_ids (and attention_mask) or pixel_values")
    return image_batch(inputs["pixel_values"], None, None)


def check_amounts(batches: int | None, batch_size: int, seq_len: int | None = None, packing: str | None = None,
                  max_sequences: int | None = None) -> None:
    """One-line errors for amounts of data that cannot work (checked before any model is loaded)."""
    require(batches is None or batches >= 1, f"--batches must be at least 1, got {batches}", "pass --batches 1 or more")
    require(max_sequences is None or max_sequences >= 1, f"--max-sequences must be at least 1, got {max_sequences}",
            "pass --max-sequences 1 or more")
    require(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}", "pass --batch-size 1 or more")
    require(seq_len is None or seq_len >= 8, f"--seq-len must be at least 8, got {seq_len}", "pass --seq-len 8 or more")
    require(packing is None or packing in PACKINGS, f"unknown --packing {packing!r}", f"use {'|'.join(PACKINGS)}")


# ---- text ------------------------------------------------------------------------------------------------
class TokenLabeler:
    """Token id -> printable label and delimiter flag, cached (a vocabulary can have 262k entries)."""

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer
        self.special = set(int(i) for i in getattr(tokenizer, "all_special_ids", None) or [])
        self._cache: dict[int, tuple[str, bool]] = {}

    def __call__(self, tid: int) -> tuple[str, bool]:
        hit = self._cache.get(tid)
        if hit is None:
            hit = self._cache[tid] = self._label(tid)
        return hit

    def _label(self, tid: int) -> tuple[str, bool]:
        if self.tokenizer is None:
            return f"#{tid}", False
        try:
            tok = self.tokenizer.convert_ids_to_tokens(int(tid))
        except Exception:  # ids beyond the vocabulary (a config larger than its tokenizer)
            tok = None
        tok = f"#{tid}" if tok is None else str(tok)
        # strip the word-boundary markers of WordPiece / byte-level BPE / SentencePiece for the delimiter test
        bare = tok.removeprefix("##").lstrip("Ġ▁ ")
        return tok, tid in self.special or bare in DELIMITER_TEXTS or tok in DELIMITER_TEXTS


def text_batch(ids: torch.Tensor, mask: torch.Tensor, tokenizer: Any = None, labeler: TokenLabeler | None = None,
               extra: dict[str, torch.Tensor] | None = None) -> EvalBatch:
    """Batch of token ids (B, T) with mask (B, T); delimiter and first-token key sets from the tokenizer."""
    labeler = labeler or TokenLabeler(tokenizer)
    B, T = ids.shape
    labels, delim = [], torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        row = []
        for t, tid in enumerate(ids[b].tolist()):
            lab, is_delim = labeler(tid)
            row.append(lab)
            delim[b, t] = is_delim and bool(mask[b, t])
        labels.append(row)
    first = torch.zeros(B, T, dtype=torch.bool)
    first[:, 0] = mask[:, 0]
    inputs = {"input_ids": ids, "attention_mask": mask.long(), **(extra or {})}
    return EvalBatch(inputs, mask.bool(), labels, {"first": first, "delimiter": delim})


def text_batches(model: Any, tokenizer: Any, data: str | None, batches: int | None, batch_size: int, seq_len: int,
                 seed: int = 0, packing: str = "auto", model_path: str | Path | None = None,
                 max_sequences: int | None = None) -> tuple[list[EvalBatch], dict[str, Any]]:
    """Evaluation batches of text and a description of them (for the report), from the shared layer
    (:func:`outlierfree.data.evaluation.model_batches`, purpose ``analyze``). ``batches`` None: 8 from a
    validation split, every sequence of a whole text."""
    check_amounts(batches, batch_size, seq_len, packing, max_sequences)
    got = model_batches(model, model_path, tokenizer, 0, batches, batch_size, seq_len, seed, data,
                        max_sequences=max_sequences, purpose="analyze", packing=packing)
    labeler = TokenLabeler(tokenizer)
    out = [text_batch(b["input_ids"], b["attention_mask"].bool(), tokenizer, labeler) for b in got.eval]
    return out, got.info


# ---- images ----------------------------------------------------------------------------------------------
def image_batch(pixel_values: torch.Tensor, raw: torch.Tensor | None, patch_size: int | None) -> EvalBatch:
    """Batch of images (B, C, H, W) normalised; ``raw`` uint8 images mark background patches (None: none)."""
    B = pixel_values.shape[0]
    labels, background = [], None
    if raw is not None and patch_size:
        P = patch_size
        patches = F.max_pool2d(raw.float().amax(dim=1, keepdim=True), P)  # (B, 1, H/P, W/P): brightest pixel
        n_rows, n_cols = patches.shape[-2:]
        bg = (patches <= BACKGROUND_MAX).flatten(1)  # (B, N) in ViT's row-major patch order
        background = torch.cat([torch.zeros(B, 1, dtype=torch.bool), bg], dim=1)  # (B, 1 + N): [CLS] first
        names = ["[CLS]"] + [f"p{r},{c}" for r in range(n_rows) for c in range(n_cols)]
        labels = [list(names) for _ in range(B)]
        T = 1 + n_rows * n_cols
    else:
        T = None
    keys: dict[str, torch.Tensor] = {}
    if T is not None:
        first = torch.zeros(B, T, dtype=torch.bool)
        first[:, 0] = True
        keys = {"first": first, "background": background}
        mask = torch.ones(B, T, dtype=torch.bool)
    else:
        mask = torch.ones(B, 1, dtype=torch.bool)  # unknown token count: sites are measured without a mask
    return EvalBatch({"pixel_values": pixel_values}, mask, labels, keys)


def image_batches(model: Any, data: str | None, batches: int | None, batch_size: int, seed: int = 0,
                  model_path: str | Path | None = None) -> tuple[list[EvalBatch], dict[str, Any]]:
    """A seeded sample of the validation images of the model's data (Fashion-MNIST test images by default, or
    ``data``: a folder of idx files or of class subfolders), resized to the model's image size and channels,
    normalised as in training (the model's image_normalisation.json, as ``quantize``)."""
    check_amounts(batches, batch_size)
    got = model_batches(model, model_path, None, 0, batches, batch_size, None, seed, data, purpose="analyze")
    P = int(model.config.patch_size)
    out = [image_batch(b["pixel_values"], raw, P) for b, raw in zip(got.eval, got.pixels)]
    return out, got.info
