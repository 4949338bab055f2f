"""Training batches: the data a run reads, in an order that depends on (seed, step) alone.

``batch_size`` is the *global* batch per optimizer step. Every process builds the whole global batch from
(seed, step) alone (a permutation per epoch, a generator per step for masking and augmentation) and keeps its
slice, so the data order does not depend on the number of processes, and resuming at step s re-creates exactly
the batches an uninterrupted run would have seen.

Masking (:func:`data.text.mask_tokens`) and image augmentation / normalisation (``data.images``) are the functions
every command uses; only the generators differ: training draws them from (seed, step), the measuring commands from
:func:`data.defaults.mask_seed` (``data/evaluation.py``), so neither depends on the other's history.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def step_generator(seed: int, step: int, salt: str) -> torch.Generator:
    """A CPU generator seeded from (seed, step, salt): the randomness of one batch, independent of history."""
    h = hashlib.blake2b(f"{seed}:{step}:{salt}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


class Order:
    """Global sample indices for a step: epoch e is a permutation seeded by (seed, e); step s takes positions
    ``s*G .. s*G+G-1`` of the concatenation of epochs."""

    def __init__(self, n: int, global_batch: int, seed: int):
        self.n, self.g, self.seed = n, global_batch, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # a step spans at most two epochs: keep a few, not all
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.n, generator=step_generator(self.seed, epoch, "epoch"))
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """(G,) sample indices of ``step`` (0-based)."""
        pos = torch.arange(step * self.g, (step + 1) * self.g)  # (G,) positions in the endless epoch stream
        epochs, within = pos // self.n, pos % self.n
        out = torch.empty(self.g, dtype=torch.long)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(int(e))[within[sel]]
        return out


class TrainingBatches:
    """Makes the global batch of a step (all processes compute the same one) and validation batches.

    ``task`` is mlm, clm or image; ``data`` the :class:`data.text.TextData` or :class:`data.images.ImageData` of
    the run (see :func:`load_training_data`)."""

    def __init__(self, task: str, data: Any, batch_size: int, seed: int, mlm_probability: float, val_size: int):
        self.task, self.data, self.seed = task, data, seed
        self.mlm_probability, self.max_val = mlm_probability, val_size
        if task == "image":
            self.n = len(data.train_y)
        else:
            self.n = len(data.train)
            self.special = data.special_ids
            self.mask_id = getattr(data.tokenizer, "mask_token_id", None)
            self.vocab = len(data.tokenizer)
        self.order = Order(self.n, batch_size, seed)

    def train_batch(self, step: int) -> tuple[dict[str, torch.Tensor], int]:
        """(batch dict of CPU tensors with G rows, number of loss terms in the whole global batch)."""
        idx = self.order.indices(step)
        g = step_generator(self.seed, step, "batch")
        return self._make(idx, g, augment=True)

    def _make(self, idx: torch.Tensor, g: torch.Generator, augment: bool,
              split: str = "train") -> tuple[dict[str, torch.Tensor], int]:
        from .images import augment as augment_images
        from .images import normalise
        from .text import mask_tokens

        d = self.data
        if self.task == "image":
            x = (d.train_x if split == "train" else d.val_x)[idx]  # (B, C, H, W) uint8
            y = (d.train_y if split == "train" else d.val_y)[idx]
            if augment:
                x = augment_images(x, g)
            return {"pixel_values": normalise(x, d.mean, d.std), "labels": y}, len(idx)
        ids = (d.train if split == "train" else d.val)[idx]  # (B, T)
        if self.task == "mlm":
            inputs, labels = mask_tokens(ids, self.special, self.mask_id, self.vocab, g, self.mlm_probability)
            return {"input_ids": inputs, "labels": labels}, int((labels != -100).sum())
        return {"input_ids": ids}, ids.shape[0] * (ids.shape[1] - 1)

    def val_size(self) -> int:
        """Validation rows used (``val_size`` at most)."""
        n = len(self.data.val_y) if self.task == "image" else len(self.data.val)
        return min(n, self.max_val)

    def val_batch(self, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        """Validation rows ``rows``: no augmentation; for masked LM one fixed masking of the whole validation set,
        so the metric does not depend on how rows are batched or shared among processes."""
        if self.task == "mlm":
            if not hasattr(self, "_val_masked"):
                n = self.val_size()
                self._val_masked, _ = self._make(torch.arange(n), step_generator(0, 0, "val"), False, "val")
            batch = {k: v[rows] for k, v in self._val_masked.items()}
            return batch, int((batch["labels"] != -100).sum())
        return self._make(rows, step_generator(0, 0, "val"), augment=False, split="val")

    def model_inputs(self, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` validation rows as model inputs only (no labels): a fixed batch for outlier tracking."""
        batch, _ = self.val_batch(torch.arange(min(n, self.val_size())))
        keep = ("pixel_values",) if self.task == "image" else ("input_ids",)
        return {k: batch[k] for k in keep}


def split_rows(batch: dict[str, torch.Tensor], parts: int, index: int) -> dict[str, torch.Tensor]:
    """Rows ``index``-th of ``parts`` equal contiguous slices of every tensor in ``batch``."""
    n = next(iter(batch.values())).shape[0]
    per = n // parts
    return {k: v[index * per: (index + 1) * per] for k, v in batch.items()}


def load_training_data(cfg: Any, tokenizer_dir: str | None = None, image_size: int | None = None) -> Any:
    """TextData or ImageData for a run described by a ``TrainConfig``; ``tokenizer_dir`` (a resumed run's own
    tokenizer) replaces training a new one; ``image_size`` is the model's (images only)."""
    if cfg.task == "image":
        from .images import load_images

        return load_images(cfg.data, int(image_size), cfg.val_fraction, cfg.hf_config.get("num_channels"))
    from .text import prepare_text

    tok = str(tokenizer_dir) if tokenizer_dir is not None else cfg.tokenizer
    return prepare_text(cfg.task, cfg.data, cfg.seq_len, cfg.vocab_size, cfg.val_fraction, tok,
                        cfg.text_column, cfg.hf_split)
