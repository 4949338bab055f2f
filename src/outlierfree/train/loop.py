"""The training loop: masked LM (BERT), causal LM (OPT) and image classification (ViT), on Accelerate.

    from outlierfree.train import TrainConfig, train
    result = train(TrainConfig(task="mlm", attention={"variant": "clipped"}, steps=600, out="runs/bert"))
    result.model_dir, result.metrics  # OUT/model, {"val_loss": ..., "val_ppl": ...}

The loop reads top to bottom; each concern lives in its own module:
    data/training.py   the global batch of a step, from (seed, step) alone (any number of processes, exact resume)
    losses.py          task losses as sums over predicted tokens / images (shared with quant's evaluation)
    model.py           the model for the run (size, vocabulary or classes, overrides, variant, recipe)
    optim.py           AdamW or Muon + AdamW, warm-up and decay
    rundir.py          OUT/: checkpoints, log.jsonl, tokenizer, DONE; resume and refusal rules
    monitor.py         validation and outlier tracking (neither changes the run)

Losses are sums divided by the global number of predicted tokens (or images), so 1 process, N processes and
gradient accumulation all compute the same gradient.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..attention.ramp import set_gamma_ramp
from ..data.training import TrainingBatches, load_training_data, split_rows
from ..errors import OutlierfreeError, require
from ..records import git_commit, machine, progress
from .config import TrainConfig
from .losses import TaskModel
from .model import build_for_run, describe, image_size
from .monitor import OutlierMetrics, OutlierTracker, format_validation, validate
from .optim import optimizer_and_schedule
from .result import TrainResult
from .rundir import DONE_FILE, RunDir

# seconds to sleep after each step; a testing aid that makes "kill it mid-run" deterministic on fast machines
STEP_DELAY_ENV = "OUTLIERFREE_TEST_STEP_DELAY"


def train(cfg: TrainConfig, *, outlier_metrics: OutlierMetrics | None = None) -> TrainResult:
    """Train a model as ``cfg`` says (the library call behind ``outlierfree train``); returns the
    :class:`TrainResult`: the final model directory ``OUT/model`` and the final validation metrics.

    ``outlier_metrics`` is the probe ``cfg.track_outliers`` calls every K steps (the commands pass
    :func:`outlierfree.analysis.tracking.headline_metrics`; analysis sits above training, which does not import it).

    ``cfg`` is validated once, here, before any work (:meth:`TrainConfig.resolved`). Resumes from
    ``OUT/checkpoint`` when ``cfg.resume`` (the checkpoint's config must match), returns at once when ``OUT/DONE``
    says the same run already finished, and refuses to overwrite another run.
    Works the same on one CPU, one GPU, or many processes under ``accelerate launch``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from rich.console import Console

    cfg = cfg.resolved()
    console = Console(stderr=True)
    run = RunDir(cfg.out, cfg.identity(), console=console)
    if run.finished():
        console.print(f"[green]{run.out}: this run already finished; the model is in {run.model_dir}[/green]")
        return TrainResult.from_summary(run.out, run.model_dir, _read_done(run.out), already_finished=True)
    resumed = run.resume_state(cfg.resume)  # (checkpoint, state) or None
    state = resumed[1] if resumed else None

    # cpu=True on a machine without CUDA: `accelerate launch --multi_gpu` / torchrun then run gloo DDP on CPU
    # (accelerate would otherwise start N unrelated single processes)
    accelerator = Accelerator(mixed_precision=_precision(cfg), step_scheduler_with_optimizer=False,
                              cpu=not torch.cuda.is_available())
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    run.main = main
    require(cfg.batch_size % (world * cfg.grad_accum) == 0, f"--batch-size {cfg.batch_size} is not divisible by "
            f"{world} processes x {cfg.grad_accum} accumulation steps", "pass a batch size that is")
    require(state is None or state.get("world_size", 1) == world, f"the checkpoint was written by "
            f"{(state or {}).get('world_size')} process(es), this run has {world}",
            "resume with the same number of processes")
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # the first process fills the tokenizer/data caches
        data = load_training_data(cfg, run.own_tokenizer() if state else None, image_size(cfg))
    batches = TrainingBatches(cfg.task, data, cfg.batch_size, cfg.seed, cfg.mlm_probability, cfg.val_size)
    model = build_for_run(cfg, data)
    tracker = OutlierTracker(batches, accelerator.device, outlier_metrics) if cfg.track_outliers and main else None
    optimizer, scheduler = optimizer_and_schedule(model, cfg)
    task_model, optimizer, scheduler = accelerator.prepare(TaskModel(model, cfg.task), optimizer, scheduler)
    run.begin(state, getattr(data, "tokenizer", None))  # only now: bad input leaves no directory behind

    start = run.restore(accelerator, resumed)
    if not resumed:
        _log_start(cfg, run, model, batches, accelerator)
    accelerator.wait_for_everyone()

    unit = "images" if cfg.task == "image" else "tokens"
    units_per_step = cfg.batch_size * (1 if cfg.task == "image" else cfg.seq_len)
    step_delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    last_good = start if state is not None else None
    window = Window()
    t_start = time.perf_counter()
    result: dict[str, float] = {}
    task_model.train()
    with progress("[bold]train", cfg.steps, main and cfg.progress, completed=start, keep=True,
                  columns=("loss {task.fields[loss]:.4f}", "{task.fields[speed]:,.0f} {task.fields[unit]}/s"),
                  fields={"loss": float("nan"), "speed": 0.0, "unit": "img" if cfg.task == "image" else "tok"}) as bar:
        for step in range(start, cfg.steps):
            if cfg.gamma_ramp_steps:  # clipped / NCS gamma grows linearly from 0 to its target
                set_gamma_ramp(model, step / cfg.gamma_ramp_steps)
            batch, terms = batches.train_batch(step)  # the whole global batch; this process takes its rows
            mine = split_rows(batch, world, rank)
            loss_sum = torch.zeros((), device=accelerator.device)
            for k in range(cfg.grad_accum):
                micro = {n: v.to(accelerator.device) for n, v in split_rows(mine, cfg.grad_accum, k).items()}
                with nullcontext() if k == cfg.grad_accum - 1 else accelerator.no_sync(task_model):
                    ls, _ = task_model(**micro)
                    # sum / global terms, times world because DDP averages the gradients of the processes
                    accelerator.backward(ls * (world / max(terms, 1)))
                loss_sum += ls.detach().float()
            total = float(accelerator.reduce(loss_sum, reduction="sum"))
            if not math.isfinite(total / max(terms, 1)):
                _stop_on_nonfinite(run, total / max(terms, 1), step + 1, last_good)
            grad_norm = float(accelerator.clip_grad_norm_(task_model.parameters(), cfg.grad_clip)) \
                if cfg.grad_clip > 0 else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            s = step + 1
            window.add(total, terms)
            if step_delay:
                time.sleep(step_delay)
            if s % cfg.log_every == 0 or s == cfg.steps:
                loss, speed = window.close(units_per_step)
                run.log({"event": "train", "step": s, "loss": loss, "lr": lr, f"{unit}_per_s": speed,
                         "elapsed_s": time.perf_counter() - t_start,
                         **({"grad_norm": grad_norm} if grad_norm is not None else {})})
                bar.show(loss=loss, speed=speed)
            bar()
            if cfg.eval_every and (s % cfg.eval_every == 0 or s == cfg.steps):
                result = validate(task_model, batches, accelerator, cfg.batch_size)
                run.log({"event": "eval", "step": s, **result}, f"step {s}: " + format_validation(result))
            if cfg.track_outliers and s % cfg.track_outliers == 0:
                if tracker is not None:
                    run.log({"event": "outliers", "step": s,
                             **tracker(accelerator.unwrap_model(task_model).model)})
                accelerator.wait_for_everyone()
            if (cfg.save_every and s % cfg.save_every == 0) or s == cfg.steps:
                run.save_checkpoint(accelerator, s)
                last_good = s
    if not result:
        result = validate(task_model, batches, accelerator, cfg.batch_size)
        run.log({"event": "eval", "step": cfg.steps, **result}, f"step {cfg.steps}: " + format_validation(result))

    done = TrainResult(out=run.out, model_dir=run.model_dir, steps=cfg.steps, metrics=result,
                       train_seconds=time.perf_counter() - t_start, world_size=accelerator.num_processes)
    _save_final(cfg, accelerator, task_model, run, data, done)
    accelerator.wait_for_everyone()
    return done


def _log_start(cfg: TrainConfig, run: RunDir, model: torch.nn.Module, batches: TrainingBatches,
               accelerator: Any) -> None:
    """The "start" event: the config, the model's size, the data's, and where this sitting runs."""
    n_params = sum(p.numel() for p in model.parameters())
    run.log({"event": "start", "config": cfg.to_dict(), "parameters": n_params, "commit": git_commit(),
             "machine": machine(), "world_size": accelerator.num_processes, "precision": accelerator.mixed_precision,
             "train_rows": batches.n, "val_rows": batches.val_size()},
            f"training {cfg.family}/{cfg.size} ({n_params:,} parameters, {describe(cfg)}) on {batches.n:,} "
            f"{'images' if cfg.task == 'image' else 'sequences'} for {cfg.steps} steps x {cfg.batch_size}; "
            f"{accelerator.num_processes} process(es), precision {accelerator.mixed_precision}")


def _save_final(cfg: TrainConfig, accelerator: Any, task_model: torch.nn.Module, run: RunDir, data: Any,
                result: TrainResult) -> None:
    """Gather the weights (FSDP: every process must call this) and save the final model, its config, result and
    image statistics, then DONE (main process)."""
    from accelerate.utils import DistributedType

    final = accelerator.unwrap_model(task_model).model
    if accelerator.distributed_type == DistributedType.FSDP:
        full = accelerator.get_state_dict(task_model)
        if accelerator.is_main_process:
            final = build_for_run(cfg, data)
            final.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, strict=False)
    if not accelerator.is_main_process:
        return
    summary = result.summary()
    extra = {"train_config.json": cfg.to_dict(), "train_result.json": summary}
    if cfg.task == "image":
        extra["image_normalisation.json"] = {"mean": list(data.mean), "std": list(data.std),
                                             "classes": data.classes, "source": data.source}
    run.finish(final, getattr(data, "tokenizer", None), extra, summary,
               {"event": "done", "step": cfg.steps, **result.metrics})


def _read_done(out: Path) -> dict[str, Any]:
    """The summary a finished run left in ``OUT/DONE`` (empty when unreadable: the run is finished regardless)."""
    try:
        d = json.loads((out / DONE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


class Window:
    """Loss and speed over the steps since the last log line."""

    def __init__(self) -> None:
        self.t, self.steps, self.loss, self.terms = time.perf_counter(), 0, 0.0, 0

    def add(self, loss_sum: float, terms: int) -> None:
        """One optimizer step's summed loss and its number of terms."""
        self.steps, self.loss, self.terms = self.steps + 1, self.loss + loss_sum, self.terms + terms

    def close(self, units_per_step: int) -> tuple[float, float]:
        """(mean loss, tokens or images per second) of the window; starts the next one."""
        dt = time.perf_counter() - self.t
        out = self.loss / max(self.terms, 1), self.steps * units_per_step / max(dt, 1e-9)
        self.__init__()
        return out


def _stop_on_nonfinite(run: RunDir, loss: float, step: int, last_good: int | None) -> None:
    """Log the error and stop with a one-line message saying what was kept."""
    where = f"the last good checkpoint (step {last_good}) is kept in {run.checkpoint()}" \
        if last_good is not None else "no checkpoint was written yet"
    run.log({"event": "error", "step": step, "loss": str(loss), "message": "non-finite loss"})
    raise OutlierfreeError(f"the training loss became {loss} at step {step}, so training stopped ({where})",
                           "lower --lr, raise --warmup-steps or keep --grad-clip on, then train again with another "
                           "--out")


def _precision(cfg: TrainConfig) -> str:
    """Accelerate's mixed precision for the run: ``--precision``, or on auto bf16/fp16 on a GPU and none on CPU."""
    if cfg.precision != "auto":
        if cfg.precision != "no":
            require(torch.cuda.is_available() or cfg.precision == "bf16", f"--precision {cfg.precision} needs a GPU",
                    "use --precision no (or bf16) on a CPU")
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"  # CPU autocast is slower than float32 on most CPUs
