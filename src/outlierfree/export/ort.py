"""Run and score exported models in ONNX Runtime, and list which ops ran as integer kernels.

The optimised graph (``SessionOptions.optimized_model_filepath``, written by ONNX Runtime after its graph
transformations, QDQ fusions included) is what runs, so the integer-kernel list is read from it, not guessed.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import torch

from .onnx import require_onnx

# ONNX Runtime CPU ops that compute in integers (the fused forms of DQ -> op -> Q patterns)
INTEGER_OPS = frozenset({
    "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QLinearConv", "ConvInteger",
    "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat",
    "QLinearWhere", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearReduceMean", "QAttention",
    "QEmbedLayerNormalization", "DynamicQuantizeMatMul", "QOrderedMatMul", "QLinearGelu",
})
# float ops that do the heavy lifting: where they remain, the work ran in float
FLOAT_COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv", "Attention"})


def session(path: str | Path, threads: int = 0, optimized: str | Path | None = None, level: str = "all") -> Any:
    """An ONNX Runtime CPU session; ``threads`` 0 = all cores; ``optimized``: where to write the optimised graph."""
    require_onnx()
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def kernel_report(path: str | Path, level: str = "all", optimized: str | Path | None = None) -> dict[str, Any]:
    """Op counts of the optimised graph ONNX Runtime runs: integer kernels, float compute ops, QDQ pairs left.

    ``optimized``: an optimised graph a session already wrote (else a session is made here to write one)."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = Path(optimized) if optimized is not None else Path(d) / "optimized.onnx"
        if optimized is None:
            session(path, threads=1, optimized=opt, level=level)
        ops = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    return {"integer_ops": {k: v for k, v in sorted(ops.items()) if k in INTEGER_OPS},
            "float_compute_ops": {k: v for k, v in sorted(ops.items()) if k in FLOAT_COMPUTE_OPS},
            "quantize_linear": ops.get("QuantizeLinear", 0), "dequantize_linear": ops.get("DequantizeLinear", 0),
            "optimization_level": level}


def run(sess: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The scored output of one batch (the exported graph's only output) as a torch tensor."""
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, {n: batch[n].numpy() for n in names})[0]
    return torch.from_numpy(out)


def evaluate_onnx(path: Any, batches: Iterable[dict[str, torch.Tensor]], task: str,
                  refs: list[torch.Tensor] | None = None, threads: int = 0) -> dict[str, Any]:
    """Task metric of an ONNX model on ``batches`` (the simulator's :class:`~outlierfree.quant.evaluate.Scores`),
    compared with the float outputs ``refs`` when given (output SQNR, and cosine for encoders)."""
    from ..quant.evaluate import Scores

    sess = path if not isinstance(path, (str, Path)) else session(path, threads=threads)  # a path or a session
    s = Scores(task)
    for i, b in enumerate(batches):
        s.add(run(sess, b), b, refs[i] if refs is not None else None)
    return s.result()


def default_threads() -> int:
    """All cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
