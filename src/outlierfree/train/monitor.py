"""What a run watches while it trains: the validation metric, and the outliers' growth (``--track-outliers``).

Neither may change the run: validation uses no global RNG state, tracking runs inside ``torch.random.fork_rng``, so
a run with and without them trains the same weights.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn

from ..data.training import TrainingBatches
from ..errors import require


@torch.no_grad()
def validate(task_model: nn.Module, batches: TrainingBatches, accelerator: Any, batch_size: int) -> dict[str, float]:
    """Validation loss and perplexity (text) or loss and top-1 accuracy (images) on the first ``val_size`` rows,
    shared out among the processes (``task_model`` is the prepared DDP/FSDP module: under FSDP the inner model
    cannot run on its own)."""
    n = batches.val_size()
    if n == 0:
        return {}
    was_training = task_model.training
    task_model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, terms, correct
    rows = torch.arange(n)[rank::world]
    images = batches.task == "image"
    for i in range(0, len(rows), batch_size):
        batch, _ = batches.val_batch(rows[i: i + batch_size])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            if images:
                ls, count, correct = task_model(return_correct=True, **batch)
                sums[2] += correct.double()
            else:
                ls, count = task_model(**batch)
        sums[0] += ls.double()
        sums[1] += count.double()
    sums = accelerator.reduce(sums, reduction="sum")
    task_model.train(was_training)
    loss = float(sums[0] / sums[1].clamp(min=1))
    if images:
        return {"val_loss": loss, "val_top1": float(sums[2] / sums[1].clamp(min=1))}
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}


def format_validation(r: dict[str, float]) -> str:
    """A validation result in words, for the console."""
    if "val_top1" in r:
        return f"val loss {r['val_loss']:.4f}, top-1 {100 * r['val_top1']:.2f}%"
    if "val_ppl" in r:
        return f"val loss {r['val_loss']:.4f}, perplexity {r['val_ppl']:.2f}"
    return "no validation data"


# what --track-outliers measures: (model, one batch of its inputs) -> metrics; the command layer passes
# outlierfree.analysis.tracking.headline_metrics (analysis sits above training, so training does not import it)
OutlierMetrics = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, Any]]


class OutlierTracker:
    """``--track-outliers N``: every N steps, ``metrics_fn`` (the outlier probe the caller of :func:`train` passes,
    e.g. ``analysis.tracking.headline_metrics``) on a fixed validation batch of 16 rows (main process only)."""

    ROWS = 16

    def __init__(self, batches: TrainingBatches, device: Any, metrics_fn: OutlierMetrics | None):
        require(metrics_fn is not None, "--track-outliers needs an outlier probe and none was given",
                "pass outlier_metrics=outlierfree.analysis.tracking.headline_metrics to train() (the train and "
                "reproduce commands do), or set track_outliers=0")
        require(batches.val_size() > 0, "--track-outliers needs validation data", "pass a --val-fraction above 0")
        self.fn = metrics_fn
        self.batch = {k: v.to(device) for k, v in batches.model_inputs(self.ROWS).items()}

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        """The metrics of ``model`` now: numbers as floats, site names (``max_inf_norm_site``...) as strings."""
        was = model.training
        model.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # tracking must not change the run
            metrics = self.fn(model, self.batch)
        model.train(was)
        return {str(k): (float(v) if isinstance(v, (int, float)) else v) for k, v in dict(metrics).items()}
