"""Export a model on disk as a deployable static INT8 directory: calibrate it as ``quantize`` does, write the QDQ
INT8 ONNX model (and OpenVINO IR), tokenizer, config, ranges, a card and export.json (layout: :mod:`.bundle`).

``export_checkpoint(ExportRequest) -> ExportResult`` is the library call behind ``outlierfree export`` (the CLI
only turns flags into the request and prints). The directory is the product, so the call writes it itself, all at
once (a temporary directory renamed when complete: an interrupted export leaves nothing at ``out``):

    from outlierfree.quant import paper_w8a8
    from outlierfree.export.run import ExportRequest, export_checkpoint
    result = export_checkpoint(ExportRequest("runs/bert/model", "runs/bert/int8", (paper_w8a8(),)))
    print("\\n".join(result.lines()))  # runs/bert/int8: model.onnx, ..., export.json
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data import defaults
from ..errors import require
from ..quant.config import QuantConfig, paper_w8a8
from ..records import vnni
from .onnx import require_weight_dtype

RUNTIMES = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class ExportRequest:
    """What ``outlierfree export`` is asked to do, as data; every field is checked when it is made, with a one-line
    error naming the flag (the CLI builds it from its flags, library callers directly).

    Attributes:
        model: the model directory (ours or any Hugging Face checkpoint).
        out: the new directory to write (refused if it exists: nothing is overwritten).
        configs: exactly one W8A8 config with static per-tensor activation ranges and a named site set
            (:func:`outlierfree.quant.config.configs_from_flags` builds it from ``--bits``/``--sites``/...).
        eval_batches: validation batches scored in PyTorch float, the simulator and the runtime (0: none).
        threads: runtime threads (0: all cores).
        runtime: ``onnxruntime``; ``openvino`` also writes OpenVINO IR and scores it there.
        weight_dtype: ``int8`` (the default) or ``uint8``: the same weights around zero point 128, for CPUs
            without VNNI, where the runtimes' u8 x s8 kernels saturate (:func:`.onnx.fold_weight_qdq`).
    """

    model: str
    out: str
    configs: tuple[QuantConfig, ...] = field(default_factory=lambda: (paper_w8a8(),))
    tokenizer: str | None = None
    data: str | None = None
    calib_batches: int = defaults.QUANT_CALIB_BATCHES
    eval_batches: int = defaults.QUANT_EVAL_BATCHES
    batch_size: int = defaults.BATCH_SIZE
    seq_len: int | None = None
    seed: int = defaults.SEED
    threads: int = 0
    runtime: str = "onnxruntime"
    weight_dtype: str = "int8"
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", str(self.model))
        object.__setattr__(self, "out", str(self.out))
        object.__setattr__(self, "configs", tuple(self.configs))
        require(not Path(self.out).exists(), f"--out {self.out} already exists",
                "pass a new directory (nothing is overwritten)")
        require(len(self.configs) == 1, "export takes one --bits and one --sites",
                "pass e.g. --bits w8a8 --sites paper")
        cfg = self.configs[0]
        require(isinstance(cfg.sites, str), f"export maps the named site sets to QDQ nodes, not --sites "
                f"{'+'.join(cfg.sites)}", "use paper, full, linear or matmul")
        why = cfg.no_integer_form()
        require(why is None, f"export cannot write this config: {why}",
                "pass --bits w8a8 with static per-tensor activation ranges (the defaults of `outlierfree export`)")
        require(self.calib_batches >= 1, "--calib-batches must be >= 1 (static ranges)", "pass --calib-batches 16")
        require(self.eval_batches >= 0, "--eval-batches is negative", "pass 0 or more")
        require(self.batch_size >= 1, f"--batch-size {self.batch_size} is too small", "pass 1 or more")
        require(self.seq_len is None or self.seq_len >= 2, f"--seq-len {self.seq_len} is too short", "pass 2 or more")
        require(self.threads >= 0, f"--threads {self.threads} is negative", "pass 0 (all cores) or more")
        require(self.runtime in RUNTIMES, f"unknown --runtime {self.runtime!r}", f"use one of {', '.join(RUNTIMES)}")
        require_weight_dtype(self.weight_dtype)

    @property
    def config(self) -> QuantConfig:
        """The one quantization config exported."""
        return self.configs[0]


@dataclass
class ExportResult:
    """What ``outlierfree export`` wrote into ``out`` and measured: the fields of export.json (in its key order;
    the per-runtime metrics, kernels and agreement stay the dicts the export layer records) and the directory's
    files. The call has written everything already; ``to_dict`` is export.json, ``lines`` the CLI's summary."""

    out: Path
    model: str
    model_class: str
    task: str
    command: str | None
    config: dict[str, Any]
    ranges: dict[str, Any]
    data: dict[str, Any]
    commit: str
    versions: dict[str, Any]
    metric: str
    pytorch_float: dict[str, Any] | None
    simulated: dict[str, Any] | None
    onnxruntime_int8: dict[str, Any] | None
    onnxruntime_float: dict[str, Any] | None
    export: dict[str, Any]
    kernels: dict[str, Any]
    agreement: dict[str, Any] | None
    threads: int
    site_agreement: dict[str, Any] | None
    eval_batches: int
    batch_size: int
    openvino_int8: dict[str, Any] | None = None
    openvino_float: dict[str, Any] | None = None
    openvino: dict[str, Any] | None = None  # kernels, agreement, IR files: only with --runtime openvino
    deploy: dict[str, Any] = field(default_factory=dict)
    seconds_total: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The export.json dict (the field names are its keys; the OpenVINO ones only with --runtime openvino)."""
        d = asdict(self)
        del d["out"], d["batch_size"]
        if self.openvino is None:
            for k in ("openvino_int8", "openvino_float", "openvino"):
                del d[k]
        return d

    @property
    def files(self) -> list[Path]:
        """The files of the export directory."""
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def lines(self) -> list[str]:
        """The console summary: per-site parity, metrics, integer kernels per runtime, files written."""
        lines = []
        s = self.site_agreement
        if s:
            lines.append(f"per site: {s['within_one_step']} of {s['compared']} compared sites within one quantization "
                         f"step of the simulator (worst {s['max_steps']:.2f} steps; {s['not_compared']} not "
                         f"comparable" + (f"; from {s['first_beyond_one_step']} on, differences of one step upstream "
                                          f"are amplified by coarser grids" if s["first_beyond_one_step"] else "")
                         + ")")
        m, ov = self.metric, self.openvino
        # a cosine of 0.99998 must not print as 1 (4 significant digits suit perplexities and accuracies)
        f = ".6g" if "cosine" in m else ".4g"
        if self.simulated:
            lines.append(f"{self.config['describe']}: {m} float {self.pytorch_float[m]:{f}}, simulated "
                         f"{self.simulated[m]:{f}}, ONNX Runtime INT8 {self.onnxruntime_int8[m]:{f}}"
                         + (f", OpenVINO INT8 {self.openvino_int8[m]:{f}}" if ov else "")
                         + f" ({self.eval_batches} validation batches of {self.batch_size})")
        k = self.kernels
        lines.append(f"integer kernels: {_ops(k['integer_ops'])}; float compute ops left: "
                     f"{_ops(k['float_compute_ops'])}")
        if ov:
            lines.append(f"OpenVINO integer kernels: {_ops(ov['kernels']['integer_ops'])}; float compute ops left: "
                         f"{_ops(ov['kernels']['float_compute_ops'])}")
        b = self.export["bytes"]
        lines.append(f"wrote {self.out}/model.onnx ({b['int8'] / 1e6:.2f} MB)"
                     + (f", openvino_model.xml/.bin ({ov['ir']['bytes'] / 1e6:.2f} MB)" if ov else "")
                     + f", model_float.onnx ({b['float'] / 1e6:.2f} MB), config.json, tokenizer, ranges.json, "
                     f"README.md, export.json; run it with outlierfree.deploy.load({str(self.out)!r})")
        return lines


def _ops(counts: dict[str, int]) -> str:
    return ", ".join(f"{o} x{n}" for o, n in counts.items()) or "none"


def export_checkpoint(request: ExportRequest, *, command: str | None = None) -> ExportResult:
    """Calibrate the model at ``request.model`` as ``outlierfree quantize`` does, export it to static QDQ INT8
    (ONNX, and OpenVINO IR with ``runtime="openvino"``), score it in the runtime beside PyTorch float and the
    simulator, compare each site with the simulator's, and write the deployable directory ``request.out``
    atomically (:mod:`.bundle`). ``command``: the command line recorded in export.json and the card (the CLI
    passes :func:`outlierfree.cli.command_line`; default: this function's name)."""
    from ..quant.evaluate import evaluate_pair, model_output, task_metric
    from ..quant.run import load_for_quant
    from ..quant.simulator import quantize
    from ..records import atomic_dir, dumps
    from . import bundle
    from .onnx import input_names
    from .openvino import require_openvino
    from .ort import require_onnx, site_agreement
    from .realint8 import real_int8, versions

    require_onnx()
    if request.runtime == "openvino":
        require_openvino()
    r, cfg, out = request, request.config, Path(request.out)
    if r.weight_dtype == "int8" and not vnni() and r.progress:  # measured on an AVX2-only CPU: docs/export.md
        print("notice: this CPU has no VNNI: its int8 kernels saturate where large weights meet large activations "
              "(per-channel weights and int8 heads lose 1-7 dB of output SQNR); --weight-dtype uint8 stores the "
              "same weights in a form that does not (and that OpenVINO runs about 1.8x faster on such a CPU)",
              file=sys.stderr)
    t0 = time.perf_counter()
    q = load_for_quant(r.model, tokenizer=r.tokenizer, calib_batches=r.calib_batches,
                       eval_batches=max(r.eval_batches, 1), batch_size=r.batch_size, seq_len=r.seq_len, seed=r.seed,
                       data=r.data)
    model, task, batches = q.model.eval(), q.task, q.batches
    ev = batches.eval[:r.eval_batches]
    metric, _ = task_metric(task)
    with quantize(model, cfg, task) as qm:
        qm.calibrate(batches.calib, lambda m, b: model_output(m, b, task), progress=r.progress)
        sim = evaluate_pair(qm, ev, task, progress=r.progress) if ev else None
        with atomic_dir(out) as tmp:  # nothing half-written: a temporary directory, renamed when complete
            real = real_int8(qm, ev, task, batches.calib[0], out_dir=tmp, threads=r.threads,
                             runtimes=("onnxruntime", r.runtime), weight_dtype=r.weight_dtype)
            # per-site parity on one batch: each site's tensor in the runtime against the simulator's, in steps
            sites_cmp = site_agreement(qm, tmp / real["export"]["int8"], ev[0]) if ev else None
            ov = real.get("openvino")
            result = ExportResult(
                out=out, model=r.model, model_class=type(model).__name__, task=task,
                command=command or "outlierfree.export.run.export_checkpoint", config=cfg.to_dict(),
                ranges={"source": f"calibrated on {len(batches.calib)} training batches of {r.batch_size} "
                                  f"(as `outlierfree quantize`)", "activation_sites": len(qm.act),
                        "aliases": len(qm.aliases), "quantized_weights": len(qm.weights)},
                data=batches.info, commit=_commit(), versions=versions(), metric=metric,
                pytorch_float=sim["float"] if sim else None, simulated=sim["quantized"] if sim else None,
                onnxruntime_int8=real["int8"] if ev else None, onnxruntime_float=real["float"] if ev else None,
                export=real["export"], kernels=real["kernels"], agreement=real["agreement"], threads=real["threads"],
                site_agreement=sites_cmp, eval_batches=len(ev), batch_size=r.batch_size,
                openvino_int8=(ov["int8"] if ev else None) if ov else None,
                openvino_float=(ov["float"] if ev else None) if ov else None,
                openvino={k: ov[k] for k in ("kernels", "agreement", "ir")} if ov else None)
            c0 = batches.calib[0]  # texts are truncated to the length the ranges were calibrated at
            max_len = int(c0["input_ids"].shape[1]) if "input_ids" in c0 else None
            result.deploy = bundle.finish(tmp, qm, model, q.tokenizer, task, input_names(c0), max_len, r.runtime,
                                          result.to_dict())
            result.seconds_total = time.perf_counter() - t0
            (tmp / "export.json").write_text(dumps(result.to_dict()) + "\n")
    return result


def _commit() -> str:
    try:
        from ..records import git_commit

        return git_commit()
    except Exception:  # the commit is informative only
        return "unknown"
