"""Task losses, summed (not averaged), shared by training and by the quantization simulator's evaluation.

Sums over the predicted tokens (or images) and their count, never means: training divides by the *global* count so
that 1 process, N processes and gradient accumulation compute the same gradient; evaluation adds batches up
before it takes ``exp(sum / n)``. One definition, so the perplexity a run logs while training and the one
``quantize`` reports in float are computed by the same code.

- mlm:   cross-entropy over the masked positions (labels != -100);
- clm:   next-token cross-entropy, T - 1 predictions per sequence, padding excluded;
- image: cross-entropy over images, and the number of correct top-1 predictions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100  # the label of a position that is not predicted (transformers' convention)


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the loss (float64 stays float64, for tests against a reference)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def masked_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, count) over the masked positions.

    Args:
        logits: (B, T, V) over every position, or (M, V) already taken at the M masked positions.
        labels: (B, T), IGNORE at positions that are not predicted.
    """
    selected = labels != IGNORE  # (B, T)
    if logits.dim() == labels.dim() + 1:
        logits = logits[selected]  # (M, V)
    loss = F.cross_entropy(logits, labels[selected], reduction="sum")
    return loss, selected.sum()


def causal_lm_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, count) of next-token prediction: logits (B, T, V) at position t predict ``input_ids[:, t + 1]``.

    Padding (``attention_mask == 0``, e.g. the last batch of a whole text) is neither predicted nor scored. A mask
    of all ones takes the unmasked path, so packed batches keep bit-for-bit the numbers they always had."""
    if attention_mask is None or bool(attention_mask.all()):
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="sum")
        return loss, torch.tensor(input_ids[:, 1:].numel(), device=input_ids.device)
    real = attention_mask[:, 1:] != 0  # (B, T-1): predictions of real tokens
    loss = F.cross_entropy(logits[:, :-1][real], input_ids[:, 1:][real], reduction="sum")
    return loss, real.sum()


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum, count, correct top-1 predictions) of logits (B, classes) against labels (B,)."""
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return loss, torch.tensor(labels.numel(), device=logits.device), (logits.argmax(-1) == labels).sum()


def output_loss_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor], task: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss sum, count, correct top-1 or None) of a model's output ``logits`` on ``batch``'s own labels, by task:
    ``mlm`` the masked positions' ``labels``, ``clm`` the next tokens of ``input_ids`` (padding excluded), ``image``
    ``labels`` (the one that counts correct predictions). An ``encoder`` has no loss of its own (ValueError).
    For callers that already hold the logits: evaluation's scores and a fine-tune's task loss."""
    if task == "mlm":
        return (*masked_lm_loss_sum(logits, batch["labels"]), None)
    if task == "clm":
        return (*causal_lm_loss_sum(logits, batch["input_ids"], batch.get("attention_mask")), None)
    if task == "image":
        return classification_loss_sum(logits, batch["labels"])
    raise ValueError(f"task {task!r} has no loss of its own")


def mlm_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM loss sum with the LM head applied to the masked positions only (the vocabulary projection is
    most of a small BERT's cost). Equals ``BertForMaskedLM(input_ids, labels=labels).loss * count`` (tested)."""
    from ..hf_compat import mlm_parts

    encoder, head = mlm_parts(model)
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)
    logits = head(hidden[labels != IGNORE])  # (M, V): M masked positions
    return masked_lm_loss_sum(upcast(logits), labels)


class TaskModel(nn.Module):
    """Wraps a Hugging Face model; ``forward(**batch) -> (loss_sum, count)`` for the task, so that DDP sees one
    ``forward``.

    mlm:   batch = input_ids (B, T), labels (B, T) with -100 at unmasked positions; count = masked tokens.
    clm:   batch = input_ids (B, T); next-token loss over T-1 positions per sequence; count = B * (T - 1).
    image: batch = pixel_values (B, C, H, W), labels (B,); count = B (and ``correct`` with ``return_correct``).
    """

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, return_correct: bool = False, **batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Summed loss (float32 scalar) and the number of terms in it (int64 scalar); for images with
        ``return_correct`` also the number of correct top-1 predictions."""
        if self.task == "mlm":
            return mlm_loss_sum(self.model, batch["input_ids"], batch["labels"], batch.get("attention_mask"))
        if self.task == "clm":
            mask = batch.get("attention_mask")
            logits = self.model(input_ids=batch["input_ids"], attention_mask=mask).logits  # (B, T, V)
            return causal_lm_loss_sum(upcast(logits), batch["input_ids"], mask)
        logits = self.model(pixel_values=batch["pixel_values"]).logits  # (B, classes)
        loss, count, correct = classification_loss_sum(upcast(logits), batch["labels"])
        return (loss, count, correct) if return_correct else (loss, count)
