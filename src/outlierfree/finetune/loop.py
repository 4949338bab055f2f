"""The fine-tuning loop of ``outlierfree finetune``: retrofit, self-distillation and QAT, on Accelerate.

    from outlierfree.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="minilm/", out="runs/cured", method="retrofit+qat", steps=300))
    result.model_dir, result.after  # OUT/model, the cured model's numbers against the original float model

Top to bottom:
    1. load the checkpoint and its batches through quant.run.load_for_quant (the data layer's split: fine-tuning
       text from the training side, the before/after measurement on held-out text);
    2. the teacher: a frozen copy of the original; the student: the same weights, retrofitted with an attention
       variant (gated attention starts with the outputs unchanged) and/or put under the simulator with its
       calibrated ranges made trainable (quant/learned.py);
    3. AdamW on distill_loss (+ the outlier penalty), warm-up then cosine decay; the batch of a step comes from
       (seed, step) alone, the student runs without dropout, so a killed run resumes exactly
       (train/rundir.py's protocol: OUT/checkpoint, log.jsonl, OUT/model, DONE);
    4. the cured model in OUT/model (save_model), with quant_ranges.safetensors/.json, finetune_config.json,
       finetune_result.json and a card (README.md) holding the before/after numbers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from typing import Any

import torch
import torch.nn as nn

from ..errors import OutlierfreeError, require
from ..quant.config import QuantConfig
from ..records import git_commit, machine, progress, write_json, write_text
from ..train.config import config_difference
from ..train.rundir import CHECKPOINT, DONE_FILE, RunDir
from .config import FinetuneConfig
from .losses import NormTap, distill_loss, layer_loss, outlier_penalty, task_loss
from .result import CARD_FILE, RESULT_FILE, FinetuneResult

STEP_DELAY_ENV = "OUTLIERFREE_TEST_STEP_DELAY"  # the same testing aid as train/loop.py
CONFIG_FILE = "finetune_config.json"
RUN_FILES = ("log.jsonl", CHECKPOINT, f".{CHECKPOINT}.old", f".{CHECKPOINT}.tmp", DONE_FILE, "model")


class FinetuneRunDir(RunDir):
    """``OUT/`` of a fine-tune: train/rundir.py's protocol; a finished run is recognised by its finetune_config."""

    def finished(self) -> bool:
        """True when ``OUT/DONE`` says this same fine-tune finished; anything else finished there is an error."""
        if not (self.out / DONE_FILE).is_file():
            return False
        try:
            prev = json.loads((self.model_dir / CONFIG_FILE).read_text()).get("identity")
        except (OSError, json.JSONDecodeError, AttributeError):
            prev = None
        diff = config_difference(prev, self.identity) if isinstance(prev, dict) else ["(not a fine-tune)"]
        require(not diff, f"{str(self.out)!r} holds a finished run with other settings ({'; '.join(diff[:3])})",
                "pass another --out, or delete the directory to fine-tune again")
        return True

    def check_foreign(self) -> None:
        """A one-line error when OUT holds files that are no part of a run (another tool's output)."""
        if self.out.is_file():
            raise OutlierfreeError(f"--out {str(self.out)!r} is a file", "pass a directory path")
        if self.out.is_dir() and any(self.out.iterdir()) and not any((self.out / n).exists() for n in RUN_FILES):
            raise OutlierfreeError(f"--out {str(self.out)!r} already holds other files",
                                   "pass a new or empty directory")


class Student(nn.Module):
    """The model being cured and its trainable quantization ranges: one module for Accelerate, the optimizer and
    the checkpoint."""

    def __init__(self, model: nn.Module, ranges: nn.ModuleDict, task: str):
        super().__init__()
        self.model = model
        self.ranges = ranges
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scored output (hidden states or logits) of the batch."""
        from ..quant.evaluate import model_output

        return model_output(self.model, batch, self.task)


def qat_config(cfg: FinetuneConfig) -> QuantConfig:
    """The quantization config of the run: ``outlierfree quantize``'s default W8A8 (the paper's grids) on the run's
    site set, with its weight granularity and head / attention grid flags."""
    from ..quant.config import configs_from_flags

    (qc,) = configs_from_flags(bits="w8a8", sites=cfg.sites, weight_granularity=cfg.weight_granularity,
                               fp32_head=cfg.fp32_head, int8_head=cfg.int8_head,
                               symmetric_attention=cfg.symmetric_attention)
    return qc


def batch_order(step: int, n: int, seed: int) -> int:
    """Index into the pool of ``n`` training batches for ``step``: a seeded permutation per pass over the pool, so
    the batch of a step depends on (seed, step) alone."""
    epoch, k = divmod(step, n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=g)[k])


def schedule(cfg: FinetuneConfig) -> Any:
    """lr factor of a step: linear warm-up, then cosine decay to 0."""
    warm = min(cfg.warmup(), cfg.steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    return factor


def _load(cfg: FinetuneConfig) -> Any:
    """The checkpoint and its batches; data that is too short becomes a one-line error with finetune's flags."""
    from ..data import defaults
    from ..quant.run import load_for_quant

    try:
        # --seed varies the training, never the held-out measurement (its masks follow the default seed), so runs
        # of different seeds are measured on the same batches
        return load_for_quant(cfg.model, calib_batches=cfg.train_batches, eval_batches=cfg.eval_batches,
                              batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, data=cfg.data,
                              eval_seed=defaults.SEED, mask_draws=cfg.mask_draws)
    except OutlierfreeError as e:
        if "need" in e.problem or "too few" in e.problem:
            raise OutlierfreeError(f"not enough text for the fine-tune: {e.problem}",
                                   "pass more text with --data, or lower --train-batches, --eval-batches or "
                                   "--batch-size") from None
        raise


def _framing_ids(cfg: FinetuneConfig, tokenizer: Any, model: nn.Module) -> torch.Tensor:
    """The ids ``--layer-tokens ordinary`` leaves out of the layer loss: the special tokens the tokenizer frames a
    sequence with (``[CLS]`` / ``[SEP]`` for BERT, ``</s>`` for OPT), where heads that do nothing park their
    attention and the outliers live. One-line error for a model without a tokenizer or a tokenizer that frames
    nothing (the flag would change nothing)."""
    from ..data.evaluation import special_frame

    require(tokenizer is not None, f"--layer-tokens {cfg.layer_tokens} needs a text model ({type(model).__name__} "
            "takes no tokens)", "drop --layer-tokens")
    prefix, suffix = special_frame(tokenizer)
    require(bool(prefix or suffix), f"--layer-tokens {cfg.layer_tokens}: the tokenizer adds no special tokens "
            "around a sequence, so every token is ordinary", "drop --layer-tokens")
    return torch.tensor(sorted(set(prefix) | set(suffix)), dtype=torch.long)


def _check_output(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> None:
    """One-line error when the model gives no floating tensor to distil."""
    from ..quant.evaluate import model_output

    try:
        with torch.no_grad():
            y = model_output(model, batch, task)
    except Exception as e:  # a model class whose output has no states or logits
        raise OutlierfreeError(f"{type(model).__name__} gives no output to distil ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:120] if str(e) else ''})",
                               "pass a checkpoint whose forward returns hidden states or logits (a base model or "
                               "one with a task head)") from None
    require(isinstance(y, torch.Tensor) and y.is_floating_point() and y.dim() >= 2,
            f"{type(model).__name__} gives no output to distil (its output is not hidden states or logits)",
            "pass a checkpoint whose forward returns hidden states or logits")


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Run the fine-tune ``cfg`` describes (the library call behind ``outlierfree finetune``; ``cfg`` was validated
    when it was made); returns its :class:`FinetuneResult`: the cured model's directory ``OUT/model``, its card and
    the before/after numbers.

    Resumes from ``OUT/checkpoint`` with ``cfg.resume`` (same settings), returns at once when ``OUT/DONE`` says this
    same run finished, and refuses an OUT holding another run or other files. One process or many (``accelerate
    launch``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from rich.console import Console

    from ..models.build import DeadAttentionWarning, patch_model
    from ..quant.evaluate import model_output
    from ..quant.learned import attach_ranges, collect, make_trainable
    from ..quant.simulator import quantize

    console = Console(stderr=True)
    run = FinetuneRunDir(cfg.out, cfg.identity(), console=console)
    run.check_foreign()
    if run.finished():
        console.print(f"[green]{run.out}: this fine-tune already finished; the model is in {run.model_dir}[/green]")
        return FinetuneResult.read(run.out, already_finished=True)
    resumed = run.resume_state(cfg.resume)
    state = resumed[1] if resumed else None
    accelerator = Accelerator(step_scheduler_with_optimizer=False, cpu=not torch.cuda.is_available())
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    run.main = main
    require(cfg.batch_size % world == 0, f"--batch-size {cfg.batch_size} is not divisible by {world} processes",
            "pass a batch size that is")
    require(state is None or state.get("world_size", 1) == world, f"the checkpoint was written by "
            f"{(state or {}).get('world_size')} process(es), this run has {world}",
            "resume with the same number of processes")
    set_seed(cfg.seed)
    t_start = time.perf_counter()

    # ---- models and data: every check before OUT is made ----
    with accelerator.main_process_first():
        q = _load(cfg)
    model, task = q.model, q.task
    pool = q.batches.calib  # the fine-tuning batches (training side); q.batches.eval is held out for _finish
    _check_output(model, pool[0], task)
    require(cfg.distill_positions == "all" or (task == "mlm" and "labels" in pool[0]),
            f"--distill-positions {cfg.distill_positions} needs a masked language model ({type(model).__name__}'s "
            f"task is {task})", "drop the flag (every real token is distilled)")
    from ..sites import norm_modules

    for flag, on in (("--outlier-penalty", cfg.penalty != "none"), ("--layer-weight", cfg.layer_weight > 0)):
        require(not on or bool(norm_modules(model)), f"{type(model).__name__} has no normalisation layers for {flag} "
                f"to read (it taps their inputs or outputs)", f"drop {flag}")
    require(cfg.task_weight == 0 or task != "encoder", f"--task-weight: {type(model).__name__} has no task head, so "
            "there is no task loss to train on (its hidden states are distilled)", "drop --task-weight, or pass a "
            "checkpoint with its head (masked LM, causal LM, image classifier)")
    framing = _framing_ids(cfg, q.tokenizer, model) if cfg.layer_tokens == "ordinary" else None
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.retrofit:
        from .. import hf_compat

        # any architecture whose attention goes through transformers' attention interface: the retrofit starts
        # from the original's outputs exactly (gated: gate_finetune; clipped / NCS: gamma ramps up from 0), which
        # tests/finetune checks on every family of tests/archs.py, so the training-time family list does not apply
        require(bool(hf_compat.attention_modules(model)),
                f"cannot patch {type(model).__name__} for --method {cfg.method}: its attention does not go through "
                f"transformers' attention interface", "use --method qat (quantization-aware training needs no patch)")
        with warnings.catch_warnings():
            # "rows dead at initialisation" is about training from scratch: a retrofit ramps gamma up from 0 (the
            # original softmax) over the first half, so every row starts alive whatever --alpha asks for at the end
            warnings.simplefilter("ignore", DeadAttentionWarning)
            patch_model(model, retrofit_for(model, cfg, console), strict=False)  # one-line error for what it cannot
        _set_ramp(model, cfg, 0)
    qcfg = qat_config(cfg)
    qm, ranges, names = None, nn.ModuleDict(), {}
    if cfg.qat:
        qm = quantize(model, qcfg, task)
        qm.calibrate(pool[:cfg.calib_batches], lambda m, b: model_output(m, b, task), progress=cfg.progress and main)
        ranges, names = make_trainable(qm)
    student = Student(model, ranges, task)
    model.eval()  # no dropout: the student matches the teacher's deterministic outputs (and resumes exactly)

    optimizer = torch.optim.AdamW(param_groups(model, ranges, cfg), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg))
    task_student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    teacher.to(accelerator.device)
    run.begin(state, None)  # only now: bad input leaves no directory behind

    start = run.restore(accelerator, resumed)
    if not resumed:
        n_params = sum(p.numel() for p in model.parameters())
        run.log({"event": "start", "config": cfg.to_dict(), "parameters": n_params, "commit": git_commit(),
                 "machine": machine(), "world_size": world, "data": q.batches.info,
                 "learned_ranges": len(ranges), "quant": qcfg.to_dict() if cfg.qat else None},
                f"fine-tuning {type(model).__name__} ({n_params:,} parameters) with {cfg.method} for {cfg.steps} "
                f"steps x {cfg.batch_size}; {len(ranges)} learned ranges; {world} process(es)")
    accelerator.wait_for_everyone()

    losses = StepLoss(cfg, task, task_student, model, teacher, qm, framing)
    step_delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    log_every = max(1, min(10, cfg.steps // 10 or 1))
    sums = dict.fromkeys(("loss", *StepLoss.PARTS), 0.0) | {"n": 0}
    task_student.train()
    model.eval()
    with progress("[bold]finetune", cfg.steps, main and cfg.progress, completed=start, keep=True,
                  columns=("loss {task.fields[loss]:.5f}",), fields={"loss": float("nan")}) as bar:
        for step in range(start, cfg.steps):
            _set_ramp(model, cfg, step)
            batch = pool[batch_order(step, len(pool), cfg.seed)]
            mine = {k: v.to(accelerator.device) for k, v in _rows(batch, world, rank).items()}
            loss, parts = losses(mine)
            accelerator.backward(loss)
            require(math.isfinite(float(loss.detach())), f"the fine-tuning loss became {float(loss.detach())} at step {step + 1}",
                    "lower --lr or --range-lr and fine-tune again with another --out")
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(task_student.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            s = step + 1
            for k, v in (("loss", loss), *parts.items()):
                sums[k] += float(v.detach())
            sums["n"] += 1
            if step_delay:
                time.sleep(step_delay)
            if s % log_every == 0 or s == cfg.steps:
                n = sums.pop("n")
                avg = {k: v / n for k, v in sums.items()}
                run.log({"event": "train", "step": s, **avg, "lr": scheduler.get_last_lr()[0],
                         "elapsed_s": time.perf_counter() - t_start})
                bar.show(loss=avg["loss"])
                sums = dict.fromkeys(("loss", *StepLoss.PARTS), 0.0) | {"n": 0}
            bar()
            if (cfg.save_every and s % cfg.save_every == 0) or s == cfg.steps:
                run.save_checkpoint(accelerator, s)

    # ---- the cured model: ranges frozen, hooks off, measured, saved ----
    _set_ramp(model, cfg, cfg.steps)
    learned = collect(ranges, names, qcfg, {"method": cfg.method, "steps": cfg.steps}) if cfg.qat else None
    if qm is not None:
        qm.remove()
    final = accelerator.unwrap_model(task_student).model
    accelerator.wait_for_everyone()
    record: dict[str, Any] = {}
    if main:
        attach_ranges(final, learned)
        record = _finish(cfg, run, final, teacher, q, qcfg, learned, time.perf_counter() - t_start, world)
    accelerator.wait_for_everyone()
    return FinetuneResult(run.out, run.model_dir, record)


def retrofit_for(model: nn.Module, cfg: FinetuneConfig, console: Any = None) -> Any:
    """The variant the retrofit patches into ``model``: ``cfg.attention_config()``, except that gated attention's
    head-linear gate (one linear per head on the head's slice of the layer input, the paper's) becomes the
    ``linear`` gate (each head's gate reads the whole layer input) where the heads are not slices of the layer
    input (Gemma-3-270m: d_model 640, 4 heads x 256), with a notice. Same model, same choice: resume and the saved
    config (``config.outlierfree``) agree."""
    from .. import hf_compat

    from ..attention.variants.gated import SLICE_GATE_TYPES

    att = cfg.attention_config()
    if att.variant != "gated" or getattr(att.params, "gate_type", None) not in SLICE_GATE_TYPES:
        return att
    dims = hf_compat.attention_dims(hf_compat.attention_modules(model)[0][1])
    if dims.heads_slice_input:
        return att
    if console is not None:
        console.print(f"notice: {type(model).__name__}'s heads are not slices of its layer input ({dims.n_heads} "
                      f"heads x {dims.head_dim} != d_model {dims.d_model}): the gates read the whole layer input "
                      f"(gate_type linear)", highlight=False)
    return att.replace(gate_type="linear")


def param_groups(model: nn.Module, ranges: nn.ModuleDict, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW's parameter groups: the model's weights at ``--lr``, retrofitted gates (and sinks) at ``--gate-lr``
    (they start at zero and must move faster than the weights), the learned ranges at ``--range-lr``."""
    gates = [p for n, p in model.named_parameters() if "outlierfree_gate" in n or "outlierfree_sink" in n]
    gate_ids = {id(p) for p in gates}
    groups = [{"params": [p for p in model.parameters() if id(p) not in gate_ids], "lr": cfg.lr}]
    if gates:
        groups.append({"params": gates, "lr": cfg.gate_lr})
    if len(ranges):
        groups.append({"params": list(ranges.parameters()), "lr": cfg.range_lr})
    return groups


class StepLoss:
    """The loss of one fine-tuning step: ``losses(batch) -> (loss, parts)``, ``parts`` = ``{"distill", "penalty",
    "layers", "task"}`` (each a scalar tensor, 0 when off).

        loss = distill(student, teacher; positions) + penalty_weight * penalty(residual sums)
               + layer_weight * layer_loss(LayerNorm outputs) + task_weight * task_loss(student, labels)
               [+ float_weight * distill(float student, teacher)]

    Under QAT the penalty reads the residual sums of the quantized forward, or with ``--penalty-on float`` those of
    the float forward that ``float_weight`` runs.
    """

    PARTS = ("distill", "penalty", "layers", "task")

    def __init__(self, cfg: FinetuneConfig, task: str, student: nn.Module, model: nn.Module, teacher: nn.Module,
                 qm: Any, framing: torch.Tensor | None = None):
        """``student``: the (prepared) :class:`Student` called for the output; ``model``: the model inside it, whose
        LayerNorms the penalty and the layer loss tap; ``qm``: its simulator (None without QAT); ``framing``: token
        ids the layer loss leaves out (``--layer-tokens ordinary``; None: it scores every real token)."""
        self.cfg, self.task, self.student, self.teacher, self.qm = cfg, task, student, teacher, qm
        self.framing = framing
        self.tap = NormTap(model, "input") if cfg.penalty != "none" else None  # residual sums, for the penalty
        self.layers = (NormTap(model, "output"), NormTap(teacher, "output")) if cfg.layer_weight > 0 else None

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ..quant.evaluate import model_output

        cfg, layers, none = self.cfg, self.layers, contextlib.nullcontext()
        # the penalty reads the quantized forward, or (--penalty-on float under QAT) the float forward of the weights,
        # which --float-weight runs (FinetuneConfig requires it with --penalty-on float under QAT)
        on_float = self.qm is not None and cfg.penalty_on == "float"
        tap_q, tap_f = (None, self.tap) if on_float else (self.tap, None)
        mask = batch.get("attention_mask")  # (B, T) real tokens, or None (images)
        # the positions whose output is distilled: every real token, or a masked LM's scored (masked) ones
        out_mask = (batch["labels"] != -100).long() if cfg.distill_positions == "masked" else mask
        with torch.no_grad(), (layers[1] if layers else none):
            target = model_output(self.teacher, batch, self.task)
        with (tap_q if tap_q is not None else none), (layers[0] if layers else none):
            out = self.student(batch)
        rows = next(iter(batch.values())).shape[0]  # sequences (or images) of this process's batch
        lay_mask = mask
        if self.framing is not None and mask is not None:  # hidden states of [CLS] / [SEP] / </s> are free to change
            lay_mask = mask * ~torch.isin(batch["input_ids"], self.framing.to(mask.device))
        lay = layer_loss(layers[0].tensors, layers[1].tensors, lay_mask) if layers else torch.zeros(())
        dist = distill_loss(out, target, self.task, out_mask)
        pen = outlier_penalty(tap_q.tensors, cfg.penalty, rows) if tap_q is not None else torch.zeros(())
        own = task_loss(out, batch, self.task) if cfg.task_weight > 0 else torch.zeros(())
        loss = dist + cfg.penalty_weight * pen + cfg.layer_weight * lay + cfg.task_weight * own
        if self.qm is not None and cfg.float_weight > 0:  # keep the float model close to the original too
            with self.qm.float_mode(), (tap_f if tap_f is not None else none):
                fout = self.student(batch)
            loss = loss + cfg.float_weight * distill_loss(fout, target, self.task, out_mask)
            if tap_f is not None:
                pen = outlier_penalty(tap_f.tensors, cfg.penalty, rows)
                loss = loss + cfg.penalty_weight * pen
        for t in (self.tap, *(layers or ())):
            if t is not None:
                t.tensors = []
        return loss, {"distill": dist, "penalty": pen, "layers": lay, "task": own}


def _rows(batch: dict[str, torch.Tensor], parts: int, index: int) -> dict[str, torch.Tensor]:
    from ..data.training import split_rows

    return split_rows(batch, parts, index) if parts > 1 else batch


def _set_ramp(model: nn.Module, cfg: FinetuneConfig, step: int) -> None:
    """Clipped softmax / NCS: gamma and zeta grow from softmax's (0 and 1: the original model) to their target over the
    first half."""
    if cfg.retrofit and cfg.attention_config().variant in ("clipped", "ncs"):
        from ..attention import set_gamma_ramp

        set_gamma_ramp(model, step / max(1, cfg.steps // 2))


def _finish(cfg: FinetuneConfig, run: FinetuneRunDir, model: nn.Module, teacher: nn.Module, q: Any, qcfg: Any,
            learned: Any, seconds: float, world: int) -> dict[str, Any]:
    """Measure before/after, save the model with its ranges, config, result and card, log "done", write DONE;
    returns the result record (finetune_result.json)."""
    from ..data.training_record import IMAGE_NORMALISATION, TRAIN_CONFIG, model_dir
    from ..models.io import save_model
    from ..quant.learned import save_ranges
    from .card import card
    from .measure import measure, outputs

    held_out, calib = q.batches.eval, q.batches.calib[:cfg.calib_batches]
    if cfg.measure_batches:
        held_out = held_out[:cfg.measure_batches]
    result: dict[str, Any] = {"steps": cfg.steps, "train_seconds": seconds, "world_size": world,
                              "data": q.batches.info, "quant": qcfg.to_dict()}
    if cfg.retrofit:  # the variant as patched (retrofit_for may have chosen another gate network)
        result["attention"] = dict(getattr(model.config, "outlierfree", None) or {})
    if cfg.measure:
        refs = outputs(teacher, held_out, q.task)
        t0 = time.perf_counter()
        result["before"] = measure(teacher, calib, held_out, refs, qcfg, q.task, cfg.real_int8)
        result["after"] = measure(model, calib, held_out, refs, qcfg, q.task, cfg.real_int8)
        result["measure_seconds"] = time.perf_counter() - t0
        result["eval_sequences"] = sum(int(b["input_ids"].shape[0]) for b in held_out if "input_ids" in b)
    extra = {CONFIG_FILE: {**cfg.to_dict(), "identity": cfg.identity()}, RESULT_FILE: result}
    src = model_dir(cfg.model)
    for name in (TRAIN_CONFIG, IMAGE_NORMALISATION):  # same data selection as the original in every command
        if src is not None and (src / name).is_file():
            extra[name] = json.loads((src / name).read_text())
    save_model(model, run.model_dir, q.tokenizer, extra_json=extra)
    if learned is not None:
        save_ranges(run.model_dir, learned)
    write_text(run.model_dir / CARD_FILE, card(cfg, result))
    run.log({"event": "done", "step": cfg.steps, **{k: result[k] for k in ("before", "after") if k in result}},
            f"[green]done: model saved to {run.model_dir}[/green]")
    write_json(run.out / DONE_FILE, {"steps": cfg.steps, "train_seconds": seconds})
    return result

