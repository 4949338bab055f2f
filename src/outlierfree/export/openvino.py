"""Run and score exported models in OpenVINO, the second real INT8 runtime.

The INT8 model is the same static QDQ ONNX graph ONNX Runtime runs (same calibrated scales and zero points):
``openvino.convert_model`` reads its QuantizeLinear/DequantizeLinear pairs as FakeQuantize / dequantizing
Convert-Subtract-Multiply chains, and OpenVINO's low-precision transformations turn ``FakeQuantize -> MatMul <-
dequantized int8 weight`` into integer FullyConnected / MatMul kernels at compile time. Which ops ran in integers is
read from the compiled model's runtime graph (each node's ``runtimePrecision``), not guessed.

Float parts of the graph run in float32 (``INFERENCE_PRECISION_HINT=f32``): OpenVINO's default on CPUs with bf16
(AVX512-BF16, AMX) is bf16, which would round differently from the simulator.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import OutlierfreeError

# runtime layer types that do the heavy lifting (their precision says whether the work ran in integers)
COMPUTE_LAYERS = frozenset({"FullyConnected", "MatMul", "Convolution", "GroupConvolution", "ScaledDotProductAttention"})
INTEGER_PRECISIONS = frozenset({"i8", "u8", "i4", "u4"})


def require_openvino() -> None:
    """One-line error when the openvino extra is not installed."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise OutlierfreeError("openvino is not installed (needed for --runtime openvino)",
                               "pip install 'outlierfree[openvino]' (or bash setup.sh)") from None


def to_ir(onnx_path: str | Path, xml_path: str | Path) -> dict[str, Any]:
    """Convert an ONNX model to OpenVINO IR (``.xml`` + ``.bin`` beside it), weights kept as stored (int8 stays
    int8, float32 stays float32: no fp16 compression). Returns file names, bytes and the exact rewrites made.

    The IR is made from a copy whose activation quantizers sit above layout ops
    (:func:`outlierfree.export.onnx.hoist_quantizers`: same values, where OpenVINO fuses them)."""
    require_openvino()
    import tempfile

    import openvino as ov

    from .onnx import hoist_quantizers

    xml_path = Path(xml_path)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hoisted.onnx"
        try:
            rewrites = hoist_quantizers(Path(onnx_path), src)
            m = ov.convert_model(str(src))
        except OutlierfreeError:
            raise
        except Exception as e:  # OpenVINO's frontend errors are long C++ traces: keep the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OutlierfreeError(f"OpenVINO cannot convert {Path(onnx_path).name}: {first[:300]}",
                                   "export with --runtime onnxruntime, or update openvino (pip install -U openvino)"
                                   ) from None
        ov.save_model(m, str(xml_path), compress_to_fp16=False)  # while the copy it may map still exists
    bin_path = xml_path.with_suffix(".bin")
    return {"xml": xml_path.name, "bin": bin_path.name,
            "bytes": xml_path.stat().st_size + bin_path.stat().st_size, **rewrites}


def compile_model(path: str | Path, threads: int = 0, precision: str = "f32") -> Any:
    """An OpenVINO CPU compiled model of an IR ``.xml`` (or ``.onnx``) file; ``threads`` 0 = OpenVINO's choice;
    ``precision``: the inference precision hint for float ops (``f32`` for parity, ``default``: the CPU's own,
    bf16 where it has bf16 instructions). Compilation errors become a one-line :class:`OutlierfreeError`."""
    require_openvino()
    import openvino as ov

    cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if precision != "default":
        cfg["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        return ov.Core().compile_model(str(path), "CPU", cfg)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OutlierfreeError(f"OpenVINO cannot compile {Path(path).name}: {first[:300]}",
                               "use --runtime onnxruntime for this model, or update openvino") from None


def run(compiled: Any, batch: dict[str, Any]) -> Any:
    """The scored output of one batch (the graph's only output) as a torch tensor (numpy arrays accepted too)."""
    import torch

    names = [i.get_any_name() for i in compiled.inputs]
    feed = {n: (batch[n].numpy() if hasattr(batch[n], "numpy") else np.asarray(batch[n])) for n in names}
    return torch.from_numpy(np.array(compiled(feed)[0]))


def evaluate_openvino(compiled: Any, batches: Iterable[dict[str, Any]], task: str,
                      refs: list[Any] | None = None) -> dict[str, Any]:
    """Task metric of a compiled model on ``batches`` (the simulator's :class:`~outlierfree.quant.evaluate.Scores`),
    compared with the float outputs ``refs`` when given."""
    from ..quant.evaluate import Scores

    s = Scores(task)
    for i, b in enumerate(batches):
        s.add(run(compiled, b), b, refs[i] if refs is not None else None)
    return s.result()


def kernel_report(compiled: Any) -> dict[str, Any]:
    """Compute layers of the compiled runtime graph by precision: ``integer_ops`` (FullyConnected / MatMul /
    Convolution running in i8/u8), ``float_compute_ops`` (the same layer types in a float precision), and the
    FakeQuantize nodes left as standalone (un-fused) quantizers."""
    ints: Counter = Counter()
    flts: Counter = Counter()
    fq = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        prec = info["runtimePrecision"].astype(str)
        if kind in COMPUTE_LAYERS:
            (ints if prec in INTEGER_PRECISIONS else flts)[kind] += 1
        elif kind == "FakeQuantize":
            fq += 1
    return {"integer_ops": dict(sorted(ints.items())), "float_compute_ops": dict(sorted(flts.items())),
            "standalone_fake_quantize": fq}


def version() -> str:
    """The installed OpenVINO version (``None`` when absent)."""
    try:
        import openvino as ov

        return ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
    except ImportError:
        return None
