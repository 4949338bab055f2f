"""Quantize a model on disk: load it, build its calibration and evaluation batches from the shared data layer, apply
post-hoc transforms, and simulate each quantization config.

``quantize_checkpoint(QuantizeRequest) -> QuantizeResult`` is the library call that ``outlierfree quantize``,
``export``, ``doctor`` and ``reproduce`` make (the CLI only turns flags into the request and prints):

    from outlierfree.quant import paper_w8a8
    from outlierfree.quant.run import QuantizeRequest, quantize_checkpoint
    result = quantize_checkpoint(QuantizeRequest("runs/bert/model", (paper_w8a8(),),
                                                 transforms=(("smoothquant", 0.5),)))
    result.write("runs/bert/quant")  # quant.json, quant.md, sites.png
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
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
                   data: str | None = None, max_sequences: int | None = None,
                   eval_seed: int | None = None, mask_draws: int = 1) -> QuantInputs:
    """Load the float model at ``model_path`` (non-finite weights are a one-line error), its tokenizer (from
    ``tokenizer`` or beside the model; none for images) and its batches (:func:`outlierfree.data.evaluation.model_batches` says which data: a model trained here is calibrated on its
    training split and evaluated on its validation split; other text is used whole; ``eval_seed``: the
    evaluation masks' seed when it should not follow ``seed``; ``mask_draws``: a masked LM's evaluation sequences
    under that many draws of masks).

    Quantization ranges learned by ``outlierfree finetune`` (``quant_ranges.safetensors`` beside the weights) are
    attached to the model, so every simulator put on it uses them where the spec matches (``quant/learned.py``)."""
    from transformers.utils import logging as hf_logging

    from ..models.io import load_model, load_tokenizer
    from ..data.evaluation import model_batches, task_of
    from .learned import attach_ranges, load_ranges
    from .simulator import check_finite_weights

    hf_logging.disable_progress_bar()  # our own progress bars only; keeps errors on one line
    model = load_model(str(model_path))
    check_finite_weights(model)
    attach_ranges(model, load_ranges(model_path))
    tok = None
    if getattr(model, "main_input_name", "input_ids") != "pixel_values":
        tok = load_tokenizer(str(tokenizer or model_path))
    batches = model_batches(model, model_path, tok, calib_batches, eval_batches, batch_size, seq_len, seed, data,
                            max_sequences=max_sequences, purpose="quantize", eval_seed=eval_seed,
                            mask_draws=mask_draws)
    return QuantInputs(model, tok, task_of(model), batches)


def load_reference(path: str | Path, q: QuantInputs) -> nn.Module:
    """The float model at ``path`` to compare ``q.model`` against (``quantize --reference``), in eval mode; a
    model of another task, or whose output on the first evaluation batch has another shape, is a one-line error."""
    import torch

    from ..data.evaluation import task_of
    from ..models.io import load_model
    from .evaluate import model_output
    from .simulator import check_finite_weights

    ref = load_model(str(path)).eval()
    check_finite_weights(ref)
    require(task_of(ref) == q.task, f"--reference {path} is a {type(ref).__name__} (task {task_of(ref)}), the "
            f"model a {type(q.model).__name__} (task {q.task})", "pass the checkpoint the model was made from")
    with torch.no_grad():
        b = q.batches.eval[0]
        a, r = model_output(q.model.eval(), b, q.task), model_output(ref, b, q.task)
    require(a.shape == r.shape, f"--reference {path} gives outputs of shape {tuple(r.shape)}, the model "
            f"{tuple(a.shape)}", "pass a checkpoint with the same vocabulary or hidden size (the original the "
            "model was made from)")
    return ref


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


BACKENDS = ("simulator", "onnxruntime", "openvino")


@dataclass(frozen=True)
class QuantizeRequest:
    """What ``outlierfree quantize`` is asked to do, as data; every field is checked when it is made, with a
    one-line error naming the flag (the CLI builds it from its flags, library callers directly).

    Attributes:
        model: the model directory (ours or any Hugging Face checkpoint) or ``.gguf`` file.
        configs: the quantization configs (:func:`.config.configs_from_flags` builds them from flags), each
            evaluated on the same calibration and evaluation batches.
        transforms: post-hoc transforms applied once before calibration, e.g. ``(("smoothquant", 0.5),)``.
        mask_draws: masked LMs: the evaluation sequences scored under this many draws of masks, pooled.
        diag_batches: evaluation batches for per-site diagnostics and the ablation (0: none).
        ablation: rank site groups by harm (implied by ``keep_16bit``).
        keep_16bit: keep the K worst site groups of the ablation in 16 bits and evaluate again.
        backend: ``simulator``; ``onnxruntime`` / ``openvino`` also export each config to static INT8 and score
            it in that runtime on the same batches.
        reference: another checkpoint of the same task and outputs (the original a fine-tune started from), run
            in float on the same evaluation batches: every result then also reads against its float outputs.
    """

    model: str
    configs: tuple[QuantConfig, ...]
    tokenizer: str | None = None
    data: str | None = None
    calib_batches: int = defaults.QUANT_CALIB_BATCHES
    eval_batches: int | None = None
    batch_size: int = defaults.BATCH_SIZE
    seq_len: int | None = None
    seed: int = defaults.SEED
    max_sequences: int | None = None
    mask_draws: int = 1
    transforms: tuple[tuple[str, float], ...] = ()
    diag_batches: int = 2
    ablation: bool = False
    keep_16bit: int = 0
    backend: str = "simulator"
    reference: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", str(self.model))
        object.__setattr__(self, "configs", tuple(self.configs))
        object.__setattr__(self, "transforms", tuple(tuple(t) for t in self.transforms))
        require(len(self.configs) > 0, "no quantization config given", "pass at least one QuantConfig (--bits)")
        dynamic = all(c.activation is None or c.activation.dynamic for c in self.configs)
        require(self.calib_batches >= 1 or dynamic, f"--calib-batches {self.calib_batches} is too few for static "
                f"ranges", "pass --calib-batches >= 1, or --dynamic")
        require(self.eval_batches is None or self.eval_batches >= 1, f"--eval-batches {self.eval_batches} is too "
                f"few", "pass 1 or more")
        require(self.batch_size >= 1, f"--batch-size {self.batch_size} is too small", "pass 1 or more")
        require(self.seq_len is None or self.seq_len >= 2, f"--seq-len {self.seq_len} is too short", "pass 2 or more")
        require(self.max_sequences is None or self.max_sequences >= 1,
                f"--max-sequences must be at least 1, got {self.max_sequences}", "pass --max-sequences 1 or more")
        require(self.mask_draws >= 1, f"--mask-draws must be at least 1, got {self.mask_draws}",
                "pass --mask-draws 1 or more")
        require(self.diag_batches >= 0, f"--diag-batches {self.diag_batches} is negative", "pass 0 or more")
        require(self.keep_16bit >= 0, f"--keep-16bit {self.keep_16bit} is negative", "pass 0 or more")
        require(self.keep_16bit == 0 or self.diag_batches > 0, "--keep-16bit needs the ablation's diagnostics",
                "pass --diag-batches >= 1")
        require(self.reference is None or Path(self.reference).exists(), f"--reference {self.reference} does not "
                "exist", "pass the directory (or .gguf file) of the checkpoint to compare against")
        require(self.backend in BACKENDS, f"unknown --backend {self.backend!r}", f"use one of {', '.join(BACKENDS)}")
        if self.backend != "simulator":
            for c in self.configs:
                why = c.no_integer_form()
                require(why is None, f"--backend {self.backend} cannot run {c.describe()} in integers: {why}",
                        "use --bits w8a8 with per-tensor static activation ranges (the defaults)")

    @property
    def ablate(self) -> bool:
        """Whether the site groups are ranked by harm (asked, or needed by ``keep_16bit``)."""
        return (self.ablation or self.keep_16bit > 0) and self.diag_batches > 0


@dataclass
class QuantizeResult:
    """What ``outlierfree quantize`` measured: one record per config (float and quantized metrics, per-site
    SQNR, ablation, real-INT8 numbers: the dicts :func:`.evaluate.evaluate_quantized` returns), the data and the
    transforms applied. ``write`` puts it on disk as quant.json, quant.md and sites.png."""

    model: str
    model_class: str
    task: str
    data: dict[str, Any]
    runs: list[dict[str, Any]]
    transforms: list[dict[str, Any]]
    seconds_total: float
    command: str | None = None
    reference: str | None = None  # the checkpoint compared against (--reference)

    def to_dict(self) -> dict[str, Any]:
        """The quant.json dict (the field names are its keys)."""
        return asdict(self)

    def write(self, out: str | Path) -> list[Path]:
        """Write quant.json, quant.md and sites.png (when there are per-site diagnostics to plot) atomically into
        ``out`` (replaced); the paths written."""
        from .report import write_report

        out = write_report(self.to_dict(), out)
        return [p for p in (out / "quant.json", out / "quant.md", out / "sites.png") if p.exists()]


def quantize_checkpoint(request: QuantizeRequest, *, real: RealInt8 | None = None,
                        echo: Callable[[str], None] | None = None,
                        on_run: Callable[[QuantConfig, dict[str, Any], dict[str, Any]], None] | None = None
                        ) -> QuantizeResult:
    """Simulate each of ``request.configs`` on the model at ``request.model`` (and run it in the real runtime of
    ``request.backend``): the library call behind ``outlierfree quantize``, ``export``, ``doctor`` and
    ``reproduce``.

    ``real`` is the real-INT8 scorer of ``request.backend``, which the export layer makes
    (:func:`outlierfree.export.realint8.scorer`; quant sits below export and does not import it); ``echo``
    receives one-line notes (transforms applied, modules outside the attention interface); ``on_run`` is
    called with each config, its record and the data's description as soon as it is measured (the CLI prints it).

        from outlierfree.quant import paper_w8a8
        from outlierfree.quant.run import QuantizeRequest, quantize_checkpoint
        result = quantize_checkpoint(QuantizeRequest("runs/bert/model", (paper_w8a8(),)))
        result.write("runs/bert/quant")
    """
    from .evaluate import evaluate_quantized

    require((real is None) == (request.backend == "simulator"), f"--backend {request.backend} needs its scorer",
            "pass real=outlierfree.export.realint8.scorer(request.backend)")
    t0 = time.perf_counter()
    q = load_for_quant(request.model, tokenizer=request.tokenizer, calib_batches=request.calib_batches,
                       eval_batches=request.eval_batches, batch_size=request.batch_size, seq_len=request.seq_len,
                       seed=request.seed, data=request.data, max_sequences=request.max_sequences,
                       mask_draws=request.mask_draws)
    reference = load_reference(request.reference, q) if request.reference else None
    applied = apply_transforms(q.model, request.transforms, q.batches.calib, q.task, echo)
    runs = []
    for cfg in request.configs:
        if request.progress and echo:
            echo(cfg.describe())
        r = evaluate_quantized(q.model, q.tokenizer, q.batches.calib, q.batches.eval, cfg, q.task,
                               diagnostics=request.diag_batches > 0, diag_batches=request.diag_batches,
                               progress=request.progress, ablate=request.ablate, real=real,
                               keep_16bit=request.keep_16bit, reference=reference)
        if r.get("uninstrumented") and cfg is request.configs[0] and echo:
            echo(f"notice: {len(r['uninstrumented'])} module(s) compute attention outside transformers' attention "
                 f"interface, so their scores, probabilities and context stay float: "
                 f"{', '.join(r['uninstrumented'][:3])}" + (" ..." if len(r["uninstrumented"]) > 3 else ""))
        runs.append(r)
        if on_run:
            on_run(cfg, r, q.batches.info)
    return QuantizeResult(model=request.model, model_class=type(q.model).__name__, task=q.task, data=q.batches.info,
                          runs=runs, transforms=applied, seconds_total=time.perf_counter() - t0,
                          reference=request.reference)
