"""Export a calibrated simulator to ONNX and score the INT8 model in ONNX Runtime (and OpenVINO) beside the
simulation.

Shared by ``outlierfree export`` and ``outlierfree quantize --backend onnxruntime|openvino``: the same calibrated
ranges, the same evaluation batches, the same metric code (:class:`outlierfree.quant.evaluate.Scores`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .onnx import export_onnx, require_onnx
from .ort import default_threads, evaluate_onnx, kernel_report, run, session


def versions() -> dict[str, str]:
    """Versions of the libraries an exported model depends on."""
    import onnx
    import onnxruntime
    import transformers

    from .openvino import version

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__}
    if version() is not None:
        out["openvino"] = version()
    return out


def real_int8(qm: Any, eval_batches: list[dict[str, torch.Tensor]], task: str, example: dict[str, torch.Tensor],
              out_dir: str | Path | None = None, threads: int = 0, with_float: bool = True,
              runtimes: tuple[str, ...] = ("onnxruntime",), weight_dtype: str = "int8") -> dict[str, Any]:
    """Export ``qm`` (calibrated) to ``out_dir`` (a temporary directory when ``None``) and evaluate it.

    Returns ``{"export": {...files, sizes, QDQ counts}, "kernels": {...ops in ONNX Runtime's optimised graph},
    "int8": metrics of the INT8 model in ONNX Runtime, "float": metrics of the float ONNX model (``None`` without
    ``with_float``), "agreement": the INT8 model's outputs against the simulator's, "seconds": ...}``. Metrics
    compare against the PyTorch float outputs (output SQNR, cosine for encoders).

    ``weight_dtype``: how the weight integers are stored (``uint8`` for CPUs without VNNI, see
    :func:`outlierfree.export.onnx.fold_weight_qdq`).

    ``runtimes`` containing ``"openvino"``: the INT8 model is also converted to OpenVINO IR (``model_int8.xml`` /
    ``.bin`` beside the ONNX files) and scored there; the result gains ``"openvino": {"int8", "float", "kernels",
    "agreement", "bytes"}`` (the same metrics, from OpenVINO's compiled model). ONNX Runtime always runs: its
    optimised graph is the kernel report the export records.
    """
    from ..quant.evaluate import model_output

    require_onnx()
    threads = threads or default_threads()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(out_dir) if out_dir is not None else Path(tmp)
        info = export_onnx(qm, example, d, task, with_float=with_float, weight_dtype=weight_dtype)
        t_export = time.perf_counter() - t0
        was = qm.model.training
        qm.model.eval()
        refs, sims = [], []
        with torch.no_grad():
            for b in eval_batches:
                with qm.float_mode():
                    refs.append(model_output(qm.model, b, task).float())
                sims.append(model_output(qm.model, b, task).float())
        qm.model.train(was)
        t1 = time.perf_counter()
        # one session runs the scoring and writes the optimised graph the kernel report reads
        opt = Path(tmp) / "optimized.onnx"
        sess = session(d / info["int8"], threads, optimized=opt)
        kernels = kernel_report(d / info["int8"], optimized=opt)
        int8 = evaluate_onnx(sess, eval_batches, task, refs)
        flt = evaluate_onnx(d / info["float"], eval_batches, task, refs, threads) if with_float else None
        # how far the runtime's outputs are from the simulator's: one flipped rounding early in a deep model with
        # outliers moves later outputs a lot, so this is informative, and the metrics are what parity tests check
        diff = max((float((run(sess, b).float() - s).abs().max()) for b, s in zip(eval_batches, sims)), default=0.0)
        spread = max((float(s.abs().max()) for s in sims), default=1.0) or 1.0
        ov = _openvino(d, info, eval_batches, task, refs, sims, threads, with_float, spread) \
            if "openvino" in runtimes else None
    out = {"export": info, "kernels": kernels, "int8": int8, "float": flt, "threads": threads,
           "agreement": {"max_abs_diff_vs_simulated": diff, "relative_to_output_absmax": diff / spread},
           "seconds": {"export": t_export, "evaluate": time.perf_counter() - t1}}
    if ov is not None:
        out["openvino"] = ov
    return out


def scorer(backend: str = "onnxruntime",
           weight_dtype: str = "int8") -> Callable[[Any, list, str, dict], dict[str, Any]]:
    """The real-INT8 hook of :func:`outlierfree.quant.evaluate.evaluate_quantized` (``real=``): the calibrated
    model exported to static QDQ INT8 (weights stored as ``weight_dtype``) and scored in ONNX Runtime (and, with
    ``backend="openvino"``, in OpenVINO too) on the same evaluation batches as the simulator. A runtime that is
    not installed, or an unknown weight type, is a one-line error here, before any work."""
    from .onnx import require_weight_dtype
    from .openvino import require_openvino

    require_weight_dtype(weight_dtype)
    require_onnx()
    if backend == "openvino":
        require_openvino()

    def score(qm: Any, eval_batches: list[dict[str, torch.Tensor]], task: str,
              example: dict[str, torch.Tensor]) -> dict[str, Any]:
        real = real_int8(qm, eval_batches, task, example, runtimes=("onnxruntime", backend),
                         weight_dtype=weight_dtype)
        out: dict[str, Any] = {"onnxruntime": {k: real[k] for k in ("int8", "float", "kernels", "agreement",
                                                                    "threads")}}
        out["onnxruntime"]["bytes"] = real["export"]["bytes"]  # INT8 and float ONNX files
        out["onnxruntime"]["weight_dtype"] = weight_dtype
        if "openvino" in real:  # the same INT8 model compiled by OpenVINO
            out["openvino"] = {k: real["openvino"][k] for k in ("int8", "float", "kernels", "agreement", "bytes")}
        out["seconds"] = sum(real["seconds"].values())
        return out

    return score


def _openvino(d: Path, info: dict[str, Any], eval_batches: list[dict[str, torch.Tensor]], task: str,
              refs: list[torch.Tensor], sims: list[torch.Tensor], threads: int, with_float: bool,
              spread: float) -> dict[str, Any]:
    """The INT8 ONNX model as OpenVINO IR, compiled and scored (see :func:`real_int8`)."""
    from . import openvino as ovx

    ir = ovx.to_ir(d / info["int8"], d / "model_int8.xml")
    c = ovx.compile_model(d / ir["xml"], threads)
    int8 = ovx.evaluate_openvino(c, eval_batches, task, refs)
    diff = max((float((ovx.run(c, b).float() - s).abs().max()) for b, s in zip(eval_batches, sims)), default=0.0)
    flt = ovx.evaluate_openvino(ovx.compile_model(d / info["float"], threads), eval_batches, task, refs) \
        if with_float else None
    return {"int8": int8, "float": flt, "kernels": ovx.kernel_report(c), "ir": ir, "bytes": {"int8": ir["bytes"]},
            "agreement": {"max_abs_diff_vs_simulated": diff, "relative_to_output_absmax": diff / spread}}
