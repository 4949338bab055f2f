"""Run and score exported models in ONNX Runtime, and list which ops ran as integer kernels.

The optimised graph (``SessionOptions.optimized_model_filepath``, written by ONNX Runtime after its graph
transformations, QDQ fusions included) is what runs, so the integer-kernel list is read from it, not guessed.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import OutlierfreeError
from .graph import const_values

if TYPE_CHECKING:  # torch is imported where tensors are made: sessions alone (outlierfree.deploy) run without it
    import torch


def require_onnx() -> None:
    """One-line error when the deploy extra (onnx, onnxruntime) is not installed."""
    import importlib

    missing = []
    for mod in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise OutlierfreeError(f"{' and '.join(missing)} not installed (needed for ONNX export and ONNX Runtime)",
                               "pip install 'outlierfree[deploy]' (or bash setup.sh)")

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
    so.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
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
    import torch

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


def site_agreement(qm: Any, path: str | Path, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-site parity: each activation site's dequantized tensor in ONNX Runtime against the simulator's, in units
    of the site's quantization step.

    The INT8 graph's activation DequantizeLinear outputs are made graph outputs and run without graph optimisation
    (so no fusion removes them); each is matched to the simulator site with the same scale and zero point (and shape).
    Sites whose grid another site shares, or whose exported layout differs, are counted as not compared. Returns
    ``{"compared": n, "not_compared": n, "max_steps": worst |difference| / scale, "within_one_step": n,
    "first_beyond_one_step": the first site in forward order past one step (None: none), "sites": {site: steps}}``.
    """
    import numpy as np
    import onnx
    import torch

    from ..quant.quantizer import qparams
    from ..quant.evaluate import model_output

    m = onnx.load(str(path))
    g = m.graph
    vals = const_values(g)
    inits = {i.name for i in g.initializer}
    by_grid: dict[tuple, list[str]] = {}
    for n in g.node:  # activation pairs: QuantizeLinear of a computed tensor -> DequantizeLinear
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits and n.input[1] in vals:
            key = (float(np.float32(vals[n.input[1]])), int(vals[n.input[2]]) if len(n.input) > 2 else 0)
            by_grid.setdefault(key, []).append(n.output[0])
    wanted = sorted({o for outs in by_grid.values() for o in outs})
    g.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in wanted)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "taps.onnx"
        onnx.save(m, str(p))
        sess = session(p, threads=1, level="disable")
        names = [i.name for i in sess.get_inputs()]
        outs = dict(zip([o.name for o in sess.get_outputs()],
                        sess.run(None, {n: batch[n].numpy() for n in names})))
    seen: dict[str, torch.Tensor] = {}
    for name, q in qm.act.items():
        q.tap = (lambda name: lambda t: seen.setdefault(name, t.detach().float().clone()))(name)
    try:
        with torch.no_grad():
            model_output(qm.model, batch, qm.task)
    finally:
        for q in qm.act.values():
            q.tap = None
    steps, skipped = {}, 0
    for name, t in seen.items():
        q = qm.act[name]
        scale, zp, _, _ = qparams(q.lo.float(), q.hi.float(), q.spec.bits, q.spec.symmetric)
        cands = [o for o in by_grid.get((float(np.float32(float(scale))), int(zp)), [])
                 if tuple(outs[o].shape) == tuple(t.shape)]
        if len(cands) != 1:
            skipped += 1
            continue
        steps[name] = float(np.abs(outs[cands[0]] - t.numpy()).max() / float(scale))
    # sites in forward order: where a model has outliers, one tie rounded the other way on a coarse grid (a
    # residual sum stretched by an outlier) is many steps of the next, finer grid, so name where it starts
    first = next((n for n, v in steps.items() if v > 1.0 + 1e-3), None)
    return {"compared": len(steps), "not_compared": skipped, "max_steps": max(steps.values(), default=0.0),
            "within_one_step": sum(v <= 1.0 + 1e-3 for v in steps.values()), "first_beyond_one_step": first,
            "sites": steps}
