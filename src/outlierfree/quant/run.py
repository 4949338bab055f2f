"""Quantize a model on disk: load it, build its calibration and evaluation batches from the shared data layer, apply
post-hoc transforms, and simulate each quantization config.

The library entry points that ``outlierfree quantize``, ``export``, ``doctor`` and ``reproduce`` call (the CLIs only
parse flags, print and write reports), as ``analysis/run.py::analyze_path`` is for analysis:

    from outlierfree.quant import paper_w8a8
    from outlierfree.quant.run import quantize_path
    report = quantize_path("runs/bert/model", [paper_w8a8()], transforms=[("smoothquant", 0.5)])
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch.nn as nn

from ..data import defaults
from ..data.evaluation import Batches
from ..errors import require
from .config import QuantConfig

if TYPE_CHECKING:
    from .evaluate import RealInt8


@dataclass
class QuantInputs:
    """A model loaded for quantization, with what every quantization command needs beside it."""

    model: nn.Module
    tokenizer: Any  # None for image models
    task: str  # mlm | clm | image | encoder
    batches: Batches  # calibration and evaluation batches, and where they came from (``batches.info``)


def load_for_quant(model_path: str | Path, *, tokenizer: str | None = None,
                   calib_batches: int = defaults.QUANT_CALIB_BATCHES, eval_batches: int | None = None,
                   batch_size: int = defaults.BATCH_SIZE, seq_len: int | None = None, seed: int = defaults.SEED,
                   data: str | None = None, max_sequences: int | None = None) -> QuantInputs:
    """Load the float model at ``model_path`` (non-finite weights are a one-line error), its tokenizer (from
    ``tokenizer`` or beside the model; none for images) and its batches (see ``quant/data.py`` for which data).

    Quantization ranges learned by ``outlierfree finetune`` (``quant_ranges.safetensors`` beside the weights) are
    attached to the model, so every simulator put on it uses them where the spec matches (``quant/learned.py``)."""
    from transformers.utils import logging as hf_logging

    from ..models.io import load_model, load_tokenizer
    from .data import make_batches, task_of
    from .learned import attach_ranges, load_ranges
    from .simulator import check_finite_weights

    hf_logging.disable_progress_bar()  # our own progress bars only; keeps errors on one line
    model = load_model(str(model_path))
    check_finite_weights(model)
    attach_ranges(model, load_ranges(model_path))
    tok = None
    if getattr(model, "main_input_name", "input_ids") != "pixel_values":
        tok = load_tokenizer(str(tokenizer or model_path))
    batches = make_batches(model, model_path, tok, calib_batches, eval_batches, batch_size, seq_len, seed, data,
                           max_sequences)
    return QuantInputs(model, tok, task_of(model), batches)


def apply_transforms(model: nn.Module, transforms: Sequence[tuple[str, float]], calib: list[dict[str, Any]],
                     task: str, echo: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Apply post-hoc transforms in place, in order, before any calibration; each is checked exact in float (a
    fold that would change the float output is undone). ``transforms`` as :func:`transforms.parse_transforms`
    gives them. Returns each transform's record (for the report)."""
    from .evaluate import model_output
    from .learned import attach_ranges, ranges_of
    from .transforms import rotate, smoothquant

    if transforms and ranges_of(model) is not None:  # ranges learned for the untransformed weights are wrong now
        attach_ranges(model, None)
        if echo:
            echo("the transforms change weights and activations: the learned quantization ranges beside the model "
                 "are not used, ranges are calibrated")

    def forward(m: nn.Module, b: dict[str, Any]) -> Any:
        return model_output(m, b, task)

    applied = []
    for name, arg in transforms:
        if name == "rotate":
            rot = rotate(model, calib[0], seed=int(arg), forward=forward)
            applied.append(rot.to_dict())
            if echo:
                echo(f"rotate (seed {rot.seed}): {rot.describe()}; float output unchanged")
            continue
        res = smoothquant(model, calib, arg, forward=forward)
        d = res.to_dict()
        applied.append(d)
        skipped = len(res.folds) - d["applied"]
        if echo:
            echo(f"{name} (alpha {arg}): {d['applied']} of {len(res.folds)} folds applied"
                 + (f"; {skipped} would change the float output and were undone (quant.json says why)"
                    if skipped else ""))
    return applied


def quantize_path(model_path: str | Path, configs: Sequence[QuantConfig], *, tokenizer: str | None = None,
                  data: str | None = None, calib_batches: int = defaults.QUANT_CALIB_BATCHES,
                  eval_batches: int | None = None, batch_size: int = defaults.BATCH_SIZE, seq_len: int | None = None,
                  seed: int = defaults.SEED, max_sequences: int | None = None,
                  transforms: Sequence[tuple[str, float]] = (), diag_batches: int = 2, ablation: bool = False,
                  keep_16bit: int = 0, real: RealInt8 | None = None, progress: bool = True,
                  echo: Callable[[str], None] | None = None,
                  on_run: Callable[[QuantConfig, dict[str, Any], dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Simulate each config on the model at ``model_path``: the report dict ``outlierfree quantize`` writes as
    quant.json (without its ``command``).

    Args:
        configs: quantization configs, each evaluated on the same calibration and evaluation batches.
        transforms: post-hoc transforms applied once before calibration, e.g. ``[("smoothquant", 0.5)]``.
        diag_batches: evaluation batches for per-site diagnostics and the ablation (0: none).
        ablation: rank site groups by harm (implied by ``keep_16bit``).
        keep_16bit: keep the K worst site groups of the ablation in 16 bits and evaluate again.
        real: the export layer's real-INT8 scorer (:func:`outlierfree.export.realint8.scorer`), or None.
        echo: where one-line notes go (transforms applied, modules outside the attention interface).
        on_run: called with each config, its result and the data's description as soon as it is measured
            (the CLI prints it).
    """
    from .evaluate import evaluate_quantized

    require(len(configs) > 0, "no quantization config given", "pass at least one QuantConfig")
    require(keep_16bit >= 0, f"--keep-16bit {keep_16bit} is negative", "pass 0 or more")
    require(keep_16bit == 0 or diag_batches > 0, "--keep-16bit needs the ablation's diagnostics",
            "pass --diag-batches >= 1")
    t0 = time.perf_counter()
    q = load_for_quant(model_path, tokenizer=tokenizer, calib_batches=calib_batches, eval_batches=eval_batches,
                       batch_size=batch_size, seq_len=seq_len, seed=seed, data=data, max_sequences=max_sequences)
    applied = apply_transforms(q.model, transforms, q.batches.calib, q.task, echo)
    runs = []
    for cfg in configs:
        if progress and echo:
            echo(cfg.describe())
        r = evaluate_quantized(q.model, q.tokenizer, q.batches.calib, q.batches.eval, cfg, q.task,
                               diagnostics=diag_batches > 0, diag_batches=diag_batches, progress=progress,
                               ablate=(ablation or keep_16bit > 0) and diag_batches > 0, real=real,
                               keep_16bit=keep_16bit)
        if r.get("uninstrumented") and cfg is configs[0] and echo:
            echo(f"notice: {len(r['uninstrumented'])} module(s) compute attention outside transformers' attention "
                 f"interface, so their scores, probabilities and context stay float: "
                 f"{', '.join(r['uninstrumented'][:3])}" + (" ..." if len(r["uninstrumented"]) > 3 else ""))
        runs.append(r)
        if on_run:
            on_run(cfg, r, q.batches.info)
    return {"model": str(model_path), "model_class": type(q.model).__name__, "task": q.task,
            "data": q.batches.info, "seconds_total": time.perf_counter() - t0, "runs": runs, "transforms": applied}
