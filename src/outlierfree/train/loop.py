"""The training loop: masked LM (BERT), causal LM (OPT) and image classification (ViT), on Accelerate.

    from outlierfree.train import TrainConfig, train
    model_dir = train(TrainConfig(task="mlm", attention={"variant": "clipped"}, steps=600, out="runs/bert"))

Design (why it is written this way):
- ``batch_size`` is the *global* batch per optimizer step. Every process builds the whole global batch from
  (seed, step) alone (a permutation per epoch, a generator per step for masking and augmentation) and keeps its
  slice, so the data order does not depend on the number of processes, and resuming at step s re-creates
  exactly the batches an uninterrupted run would have seen. Losses are sums divided by the global number of
  predicted tokens (or images), so 1 process, N processes and gradient accumulation all compute the same gradient.
- The masked-LM head runs on the masked positions only (the vocabulary projection is most of the cost of a small
  BERT); :class:`TaskModel` wraps the Hugging Face model so that DDP sees one ``forward``.
- Checkpoints (weights in safetensors, optimizer, scheduler, every process's RNG states, step and log position)
  are written by ``accelerator.save_state`` into ``OUT/.checkpoint.tmp`` and renamed to ``OUT/checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import OutlierfreeError, require
from ..records import append_log
from ..attention.normalisers import set_gamma_ramp
from .config import TrainConfig, config_difference

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"
LOG_FILE = "log.jsonl"
DONE_FILE = "DONE"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
# seconds to sleep after each step; a testing aid that makes "kill it mid-run" deterministic on fast machines
STEP_DELAY_ENV = "OUTLIERFREE_TEST_STEP_DELAY"


# ---- losses ----------------------------------------------------------------------------------------------
class TaskModel(nn.Module):
    """Wraps a Hugging Face model; ``forward(**batch) -> (loss_sum, count)`` for the task.

    mlm:   batch = input_ids (B, T), labels (B, T) with -100 at unmasked positions; count = masked tokens.
    clm:   batch = input_ids (B, T); next-token loss over T-1 positions per sequence; count = B * (T - 1).
    image: batch = pixel_values (B, C, H, W), labels (B,); count = B (and ``correct`` via :meth:`logits`).
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
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            ids = batch["input_ids"]
            loss = F.cross_entropy(_upcast(logits[:, :-1].flatten(0, 1)), ids[:, 1:].flatten(), reduction="sum")
            return loss, torch.tensor(ids[:, 1:].numel(), device=ids.device)
        logits = self.model(pixel_values=batch["pixel_values"]).logits  # (B, classes)
        loss = F.cross_entropy(_upcast(logits), batch["labels"], reduction="sum")
        count = torch.tensor(batch["labels"].numel(), device=logits.device)
        if return_correct:
            return loss, count, (logits.argmax(-1) == batch["labels"]).sum()
        return loss, count


def mlm_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM cross-entropy summed over masked positions, with the LM head applied to those positions only.

    Equals ``BertForMaskedLM(input_ids, labels=labels).loss * count`` (tested), at a fraction of the head's cost.
    """
    from ..models.hf_compat import mlm_parts

    encoder, head = mlm_parts(model)
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)
    selected = labels != -100  # (B, T)
    logits = head(hidden[selected])  # (M, V): M masked positions
    loss = F.cross_entropy(_upcast(logits), labels[selected], reduction="sum")
    return loss, selected.sum()


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the loss (float64 stays float64, for tests against a reference)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


# ---- deterministic data order ----------------------------------------------------------------------------
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
            if len(self._perms) > 2:
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


class Batches:
    """Makes the global batch of a step (all processes compute the same one) and validation batches."""

    def __init__(self, cfg: TrainConfig, data: Any):
        self.cfg, self.data = cfg, data
        if cfg.task == "image":
            self.n = len(data.train_y)
        else:
            self.n = len(data.train)
            self.special = data.special_ids
            self.mask_id = getattr(data.tokenizer, "mask_token_id", None)
            self.vocab = len(data.tokenizer)
        self.order = Order(self.n, cfg.batch_size, cfg.seed)

    def train_batch(self, step: int) -> tuple[dict[str, torch.Tensor], int]:
        """(batch dict of CPU tensors with G rows, number of loss terms in the whole global batch)."""
        idx = self.order.indices(step)
        g = step_generator(self.cfg.seed, step, "batch")
        return self._make(idx, g, augment=True)

    def _make(self, idx: torch.Tensor, g: torch.Generator, augment: bool,
              split: str = "train") -> tuple[dict[str, torch.Tensor], int]:
        from ..data.images import augment as augment_images
        from ..data.images import normalise
        from ..data.text import mask_tokens

        d = self.data
        if self.cfg.task == "image":
            x = (d.train_x if split == "train" else d.val_x)[idx]  # (B, C, H, W) uint8
            y = (d.train_y if split == "train" else d.val_y)[idx]
            if augment:
                x = augment_images(x, g)
            return {"pixel_values": normalise(x, d.mean, d.std), "labels": y}, len(idx)
        ids = (d.train if split == "train" else d.val)[idx]  # (B, T)
        if self.cfg.task == "mlm":
            inputs, labels = mask_tokens(ids, self.special, self.mask_id, self.vocab, g, self.cfg.mlm_probability)
            return {"input_ids": inputs, "labels": labels}, int((labels != -100).sum())
        return {"input_ids": ids}, ids.shape[0] * (ids.shape[1] - 1)

    def val_size(self) -> int:
        """Validation rows used (``cfg.val_size`` at most)."""
        n = len(self.data.val_y) if self.cfg.task == "image" else len(self.data.val)
        return min(n, self.cfg.val_size)

    def val_batch(self, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        """Validation rows ``rows``: no augmentation; for masked LM one fixed masking of the whole validation set,
        so the metric does not depend on how rows are batched or shared among processes."""
        if self.cfg.task == "mlm":
            if not hasattr(self, "_val_masked"):
                n = self.val_size()
                self._val_masked, _ = self._make(torch.arange(n), step_generator(0, 0, "val"), False, "val")
            batch = {k: v[rows] for k, v in self._val_masked.items()}
            return batch, int((batch["labels"] != -100).sum())
        return self._make(rows, step_generator(0, 0, "val"), augment=False, split="val")


def split_rows(batch: dict[str, torch.Tensor], parts: int, index: int) -> dict[str, torch.Tensor]:
    """Rows ``index``-th of ``parts`` equal contiguous slices of every tensor in ``batch``."""
    n = next(iter(batch.values())).shape[0]
    per = n // parts
    return {k: v[index * per: (index + 1) * per] for k, v in batch.items()}


# ---- optimizer and schedule ------------------------------------------------------------------------------
def parameter_groups(model: nn.Module, weight_decay: float, decay_norm: bool) -> list[dict[str, Any]]:
    """AdamW groups: biases never decayed; LayerNorm weights decayed only with ``decay_norm`` (the reference
    OPT script decays them, its BERT script does not)."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("bias") or (id(p) in norm_params and not decay_norm):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``i`` optimizer steps: linear warm-up to 1 over ``warmup_steps``, then
    linear or cosine decay to ``min_lr_ratio`` at ``steps`` (or constant)."""
    warm, total, floor = cfg.warmup_steps or 0, cfg.steps, cfg.min_lr_ratio

    def f(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (i - warm) / max(1, total - warm))
        shape = 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * shape

    return f


# ---- data and model --------------------------------------------------------------------------------------
def load_data(cfg: TrainConfig, tokenizer_dir: Path | None = None) -> Any:
    """TextData or ImageData for the run; ``tokenizer_dir`` (a resumed run's own tokenizer) replaces training one."""
    if cfg.task == "image":
        from ..data.images import load_images
        from ..models.sizes import SIZES

        fields = {**SIZES[cfg.family][cfg.size], **cfg.hf_config}
        return load_images(cfg.data, int(fields["image_size"]), cfg.val_fraction,
                           cfg.hf_config.get("num_channels"))
    from ..data.text import prepare_text

    tok = str(tokenizer_dir) if tokenizer_dir is not None else cfg.tokenizer
    return prepare_text(cfg.task, cfg.data, cfg.seq_len, cfg.vocab_size, cfg.val_fraction, tok,
                        cfg.text_column, cfg.hf_split)


def build(cfg: TrainConfig, data: Any) -> nn.Module:
    """The model for the run: the named size, the data's vocabulary / classes, and the user's overrides."""
    from ..models.build import build_model
    from ..models.hf_compat import max_length
    from ..models.build import model_config

    over = cfg.model_overrides()
    if cfg.task == "image":
        over.setdefault("num_labels", len(data.classes))
        over.setdefault("num_channels", data.channels)
        over.setdefault("image_size", data.image_size)
        over.setdefault("id2label", {i: c for i, c in enumerate(data.classes)})
        over.setdefault("label2id", {c: i for i, c in enumerate(data.classes)})
    else:
        tok = data.tokenizer
        over.setdefault("vocab_size", len(tok))
        over.setdefault("pad_token_id", tok.pad_token_id)
        if cfg.task == "clm":
            over.setdefault("bos_token_id", tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
            over.setdefault("eos_token_id", tok.eos_token_id)
        n_pos = max_length(model_config(cfg.family, cfg.size, **over))
        require(n_pos is None or cfg.seq_len <= n_pos, f"--seq-len {cfg.seq_len} exceeds the {n_pos} positions of "
                f"{cfg.family}/{cfg.size}", f"lower --seq-len or pass --set max_position_embeddings={cfg.seq_len}")
    try:
        import warnings

        from ..attention.config import AttentionConfig
        from ..models.build import DeadAttentionWarning, warn_if_dead
        from ..models.recipe import apply_recipe

        with warnings.catch_warnings():  # judged below at the training length, not the model's maximum
            warnings.simplefilter("ignore", DeadAttentionWarning)
            model = build_model(cfg.family, cfg.size, cfg.attention, seed=cfg.seed, **over)
        if not cfg.gamma_ramp_steps:  # the ramp starts from gamma = 0, which never clips a row away
            warn_if_dead(AttentionConfig.from_dict(cfg.attention),
                         max_length(model.config) if cfg.task == "image" else cfg.seq_len)
        return apply_recipe(model, {"norm": cfg.norm, "embed_proj": cfg.embed_proj})
    except OutlierfreeError:
        raise
    except (TypeError, ValueError) as e:
        raise OutlierfreeError(f"cannot build {cfg.family}/{cfg.size} with the config overrides {over}: "
                               f"{str(e).splitlines()[0][:200]}", "check the --set keys and values") from e


# ---- run directory ---------------------------------------------------------------------------------------
def find_checkpoint(out: Path) -> Path | None:
    """The last complete checkpoint of a run directory (also the one left by a kill between two renames)."""
    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
        p = out / name
        if (p / STATE_FILE).is_file():
            return p
    return None


def read_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state saved in a checkpoint."""
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OutlierfreeError(f"the checkpoint {str(ckpt)!r} is unreadable ({e})",
                               "delete it to start over, or pass another --out") from e


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        if cfg.precision != "no":
            require(torch.cuda.is_available() or cfg.precision == "bf16", f"--precision {cfg.precision} needs a GPU",
                    "use --precision no (or bf16) on a CPU")
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"  # CPU autocast is slower than float32 on most CPUs


class RunLog:
    """``OUT/log.jsonl`` (main process only) plus console lines."""

    def __init__(self, path: Path, enabled: bool, console: Any):
        self.path, self.enabled, self.console = path, enabled, console

    def write(self, event: dict[str, Any], show: str | None = None) -> None:
        """Append one JSON object (one line) and optionally print ``show``."""
        if not self.enabled:
            return
        append_log(self.path, event)  # the package's one log writer (records): one policy for NaN and inf
        if show:
            self.console.print(show)

    def size(self) -> int:
        """Bytes written so far (saved in checkpoints, to cut the log back on resume)."""
        return self.path.stat().st_size if self.path.exists() else 0


# ---- the loop --------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Path:
    """Train a model as ``cfg`` says; returns the final model directory ``OUT/model``.

    Resumes from ``OUT/checkpoint`` when ``cfg.resume`` (the checkpoint's config must match), returns at once when
    ``OUT/DONE`` says the same run already finished, and refuses to overwrite another run.
    Works the same on one CPU, one GPU, or many processes under ``accelerate launch``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from rich.console import Console

    cfg = cfg.resolved()
    out = Path(cfg.out).expanduser()
    console = Console(stderr=True)
    identity = cfg.identity()
    done = out / DONE_FILE
    if done.is_file():
        prev = _saved_identity(out / MODEL_DIR / "train_config.json")
        diff = config_difference(prev, identity) if prev is not None else ["(no train_config.json)"]
        require(not diff, f"{str(out)!r} holds a finished run with other settings ({'; '.join(diff[:3])})",
                "pass another --out, or delete the directory to train again")
        console.print(f"[green]{out}: this run already finished; the model is in {out / MODEL_DIR}[/green]")
        return out / MODEL_DIR
    ckpt = find_checkpoint(out)
    state: dict[str, Any] | None = None
    if ckpt is not None:
        require(cfg.resume, f"{str(out)!r} already holds a checkpoint of an unfinished run",
                "pass --resume to continue it, or another --out")
        state = read_state(ckpt)
        diff = config_difference(state.get("config", {}), identity)
        require(not diff, f"the checkpoint in {str(out)!r} was made with other settings ({'; '.join(diff[:3])}"
                f"{'; ...' if len(diff) > 3 else ''})", "resume with the same settings (see "
                f"{ckpt / STATE_FILE}), or pass another --out")
    if cfg.track_outliers:
        tracker = _outlier_tracker()

    # cpu=True on a machine without CUDA: `accelerate launch --multi_gpu` / torchrun then run gloo DDP on CPU
    # (accelerate would otherwise start N unrelated single processes)
    accelerator = Accelerator(mixed_precision=_precision(cfg), step_scheduler_with_optimizer=False,
                              cpu=not torch.cuda.is_available())
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    require(cfg.batch_size % (world * cfg.grad_accum) == 0, f"--batch-size {cfg.batch_size} is not divisible by "
            f"{world} processes x {cfg.grad_accum} accumulation steps", "pass a batch size that is")
    if state is not None:
        require(state.get("world_size", 1) == world, f"the checkpoint was written by {state.get('world_size')} "
                f"process(es), this run has {world}", "resume with the same number of processes")
    log = RunLog(out / LOG_FILE, main, console)
    set_seed(cfg.seed)
    # a resumed run uses its own saved tokenizer: trained again, the tokenizer could differ (see data.text)
    own_tokenizer = out / TOKENIZER_DIR if state is not None and (out / TOKENIZER_DIR).is_dir() else None
    with accelerator.main_process_first():  # the first process fills the tokenizer/data caches
        data = load_data(cfg, own_tokenizer)
    batches = Batches(cfg, data)
    model = build(cfg, data)
    task_model = TaskModel(model, cfg.task)
    from .optim import build_optimizer

    optimizer = build_optimizer(model, cfg, parameter_groups(model, cfg.weight_decay, cfg.decay_norm))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    task_model, optimizer, scheduler = accelerator.prepare(task_model, optimizer, scheduler)
    if main:  # only now: bad data or settings must not leave a run directory behind
        out.mkdir(parents=True, exist_ok=True)

    start = 0
    if state is not None:
        accelerator.load_state(str(ckpt))
        start = int(state["step"])
        if main:  # drop what a killed run logged after its last checkpoint
            with open(out / LOG_FILE, "a+b") as f:
                f.truncate(int(state.get("log_bytes", 0)))
        log.write({"event": "resume", "step": start}, f"resumed from {ckpt} at step {start}")
    else:
        if main:
            (out / LOG_FILE).write_text("")
            for stale in (out / f".{CHECKPOINT}.tmp", out / MODEL_DIR, out / TOKENIZER_DIR):
                shutil.rmtree(stale, ignore_errors=True)
            if getattr(data, "tokenizer", None) is not None:
                from ..models.io import atomic_dir

                with atomic_dir(out / TOKENIZER_DIR) as tmp:
                    data.tokenizer.save_pretrained(str(tmp))
        from ..models.build import count_parameters

        from ..records import git_commit, machine

        log.write({"event": "start", "config": cfg.to_dict(), "parameters": count_parameters(model),
                   "commit": git_commit(), "machine": machine(),  # where this sitting of training ran
                   "world_size": world, "precision": accelerator.mixed_precision,
                   "train_rows": batches.n, "val_rows": batches.val_size()},
                  f"training {cfg.family}/{cfg.size} ({count_parameters(model):,} parameters, "
                  f"{AttentionConfigDescribe(cfg)}) on {batches.n:,} {'images' if cfg.task == 'image' else 'sequences'}"
                  f" for {cfg.steps} steps x {cfg.batch_size}; {world} process(es), precision "
                  f"{accelerator.mixed_precision}")
    accelerator.wait_for_everyone()

    unit = "img" if cfg.task == "image" else "tok"
    per_step_units = cfg.batch_size * (1 if cfg.task == "image" else cfg.seq_len)
    per_proc = cfg.batch_size // world
    step_delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    last_good = start if state is not None else None
    track_batch = _tracking_batch(batches, accelerator.device) if cfg.track_outliers and main else None
    progress = _progress(console, enabled=main and cfg.progress)
    task_id = progress.add_task("train", total=cfg.steps, completed=start, loss=float("nan"), speed=0.0, unit=unit)
    t_window, n_window, loss_window, terms_window = time.perf_counter(), 0, 0.0, 0
    t_start = time.perf_counter()
    eval_result: dict[str, float] = {}
    task_model.train()
    with progress:
        for step in range(start, cfg.steps):
            if cfg.gamma_ramp_steps:  # clipped / NCS gamma grows linearly from 0 to its target
                set_gamma_ramp(model, step / cfg.gamma_ramp_steps)
            batch, terms = batches.train_batch(step)
            mine = split_rows(batch, world, rank)
            loss_sum = torch.zeros((), device=accelerator.device)
            for k in range(cfg.grad_accum):
                mb = {n: v.to(accelerator.device) for n, v in split_rows(mine, cfg.grad_accum, k).items()}
                sync = k == cfg.grad_accum - 1
                with nullcontext() if sync else accelerator.no_sync(task_model):
                    ls, _ = task_model(**mb)
                    # sum / global terms, times world because DDP averages the gradients of the processes
                    accelerator.backward(ls * (world / max(terms, 1)))
                loss_sum += ls.detach().float()
            total = accelerator.reduce(loss_sum, reduction="sum")
            loss = float(total) / max(terms, 1)
            if not math.isfinite(loss):
                where = f"the last good checkpoint (step {last_good}) is kept in {out / CHECKPOINT}" \
                    if last_good is not None else "no checkpoint was written yet"
                log.write({"event": "error", "step": step + 1, "loss": str(loss), "message": "non-finite loss"})
                raise OutlierfreeError(f"the training loss became {loss} at step {step + 1}, so training stopped "
                                       f"({where})", "lower --lr, raise --warmup-steps or keep --grad-clip on, "
                                                     "then train again with another --out")
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(accelerator.clip_grad_norm_(task_model.parameters(), cfg.grad_clip))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            s = step + 1
            n_window += 1
            loss_window += float(total)
            terms_window += terms
            if step_delay:
                time.sleep(step_delay)
            if s % cfg.log_every == 0 or s == cfg.steps:
                dt = time.perf_counter() - t_window
                speed = n_window * per_step_units / max(dt, 1e-9)
                avg = loss_window / max(terms_window, 1)
                ev = {"event": "train", "step": s, "loss": avg, "lr": lr, f"{'images' if unit == 'img' else 'tokens'}"
                      f"_per_s": speed, "elapsed_s": time.perf_counter() - t_start}
                if grad_norm is not None:
                    ev["grad_norm"] = grad_norm
                log.write(ev)
                progress.update(task_id, loss=avg, speed=speed)
                t_window, n_window, loss_window, terms_window = time.perf_counter(), 0, 0.0, 0
            progress.update(task_id, completed=s)
            if cfg.eval_every and (s % cfg.eval_every == 0 or s == cfg.steps):
                eval_result = evaluate(task_model, batches, accelerator, cfg)
                log.write({"event": "eval", "step": s, **eval_result}, f"step {s}: " + _format_eval(eval_result))
            if cfg.track_outliers and s % cfg.track_outliers == 0:
                if main:
                    metrics = _track(tracker, accelerator.unwrap_model(task_model).model, track_batch)
                    log.write({"event": "outliers", "step": s, **metrics})
                accelerator.wait_for_everyone()
            if (cfg.save_every and s % cfg.save_every == 0) or s == cfg.steps:
                save_checkpoint(accelerator, out, s, identity, log)
                last_good = s
    if not eval_result:
        eval_result = evaluate(task_model, batches, accelerator, cfg)
        log.write({"event": "eval", "step": cfg.steps, **eval_result}, f"step {cfg.steps}: " + _format_eval(eval_result))
    model_dir = out / MODEL_DIR
    final = accelerator.unwrap_model(task_model).model
    if accelerator.distributed_type == DistributedType.FSDP:  # gather the shards (every process must call this)
        full = accelerator.get_state_dict(task_model)
        if main:
            final = build(cfg, data)
            final.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, strict=False)
    if main:
        from transformers.utils import logging as hf_logging

        from ..models.io import save_model

        hf_logging.disable_progress_bar()  # one shard: a bar would only add noise to the log
        summary = {"steps": cfg.steps, **eval_result, "train_seconds_this_process": time.perf_counter() - t_start,
                   "world_size": world}
        extra = {"train_config.json": cfg.to_dict(), "train_result.json": summary}
        if cfg.task == "image":
            extra["image_normalisation.json"] = {"mean": list(data.mean), "std": list(data.std),
                                                 "classes": data.classes, "source": data.source}
        save_model(final, model_dir, getattr(data, "tokenizer", None), extra_json=extra)
        log.write({"event": "done", "step": cfg.steps, **eval_result}, f"[green]done: model saved to {model_dir}[/green]")
        tmp = out / f".{DONE_FILE}.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, done)
    accelerator.wait_for_everyone()
    return model_dir


def AttentionConfigDescribe(cfg: TrainConfig) -> str:  # noqa: N802 - tiny helper for the start line
    """The attention variant of ``cfg`` in words."""
    from ..attention.config import AttentionConfig

    return AttentionConfig.from_dict(cfg.attention).describe() + " attention"


def _saved_identity(path: Path) -> dict[str, Any] | None:
    try:
        return TrainConfig.from_dict(json.loads(path.read_text())).identity()
    except (OSError, json.JSONDecodeError, OutlierfreeError):
        return None


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Raise logger ``name`` to ERROR inside the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def save_checkpoint(accelerator: Any, out: Path, step: int, identity: dict[str, Any], log: RunLog) -> Path:
    """Write weights (safetensors), optimizer, scheduler and RNG states of every process, plus step and log
    position, into ``OUT/.checkpoint.tmp``; then rename it to ``OUT/checkpoint`` (the old one is removed only
    after the new one is in place)."""
    tmp, final, old = out / f".{CHECKPOINT}.tmp", out / CHECKPOINT, out / f".{CHECKPOINT}.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _quiet("accelerate"):  # it warns that tied weights are stored once, which is what we want
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        log.write({"event": "checkpoint", "step": step})
        state = {"step": step, "config": identity, "log_bytes": log.size(), "world_size": accelerator.num_processes,
                 "time": time.time()}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@torch.no_grad()
def evaluate(task_model: nn.Module, batches: Batches, accelerator: Any, cfg: TrainConfig) -> dict[str, float]:
    """Validation loss and perplexity (text) or loss and top-1 accuracy (images) on the first ``val_size`` rows,
    shared out among the processes. Uses no global RNG state, so it does not change the training run."""
    n = batches.val_size()
    if n == 0:
        return {}
    # the prepared (DDP/FSDP) module: under FSDP the inner model cannot run on its own
    was_training = task_model.training
    task_model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, terms, correct
    rows = torch.arange(n)[rank::world]
    for i in range(0, len(rows), cfg.batch_size):
        batch, _ = batches.val_batch(rows[i: i + cfg.batch_size])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            if cfg.task == "image":
                ls, count, correct = task_model(return_correct=True, **batch)
                sums[2] += correct.double()
            else:
                ls, count = task_model(**batch)
        sums[0] += ls.double()
        sums[1] += count.double()
    sums = accelerator.reduce(sums, reduction="sum")
    task_model.train(was_training)
    loss = float(sums[0] / sums[1].clamp(min=1))
    if cfg.task == "image":
        return {"val_loss": loss, "val_top1": float(sums[2] / sums[1].clamp(min=1))}
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}


def _format_eval(r: dict[str, float]) -> str:
    if "val_top1" in r:
        return f"val loss {r['val_loss']:.4f}, top-1 {100 * r['val_top1']:.2f}%"
    if "val_ppl" in r:
        return f"val loss {r['val_loss']:.4f}, perplexity {r['val_ppl']:.2f}"
    return "no validation data"


def _outlier_tracker() -> Callable[..., dict[str, float]]:
    try:
        from ..analysis import tracking
    except ImportError as e:
        raise OutlierfreeError(f"--track-outliers needs outlierfree.analysis.tracking, which is not available ({e})",
                               "install the analysis module, or drop --track-outliers") from e
    fn = getattr(tracking, "headline_metrics", None)
    require(callable(fn), "--track-outliers needs outlierfree.analysis.tracking.headline_metrics, which is missing",
            "update outlierfree, or drop --track-outliers")
    return fn


def _tracking_batch(batches: Batches, device: Any) -> dict[str, torch.Tensor]:
    """A fixed validation batch (16 rows) for outlier tracking: model inputs only."""
    n = min(16, batches.val_size())
    require(n > 0, "--track-outliers needs validation data", "pass a --val-fraction above 0")
    batch, _ = batches.val_batch(torch.arange(n))
    keep = ("pixel_values",) if batches.cfg.task == "image" else ("input_ids",)
    return {k: batch[k].to(device) for k in keep}


def _track(fn: Callable[..., dict[str, float]], model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    was = model.training
    model.eval()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():  # tracking must not change the run
        metrics = fn(model, batch)
    model.train(was)
    # numbers become floats; site names (max_inf_norm_site...) stay strings
    return {str(k): (float(v) if isinstance(v, (int, float)) else v) for k, v in dict(metrics).items()}


def _progress(console: Any, enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"),
                    TextColumn("{task.fields[speed]:,.0f} {task.fields[unit]}/s"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, disable=not enabled, transient=False)
