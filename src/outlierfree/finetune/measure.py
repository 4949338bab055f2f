"""Before/after measurement of a fine-tune against the ORIGINAL float model, on held-out text.

Every number compares a model's outputs with the original checkpoint's float outputs on the same evaluation batches
(disjoint from the fine-tuning text):

- encoders: mean token cosine over real tokens, mean sentence-embedding cosine (mean pooling over real tokens),
  and nearest-neighbour agreement: for each sentence embedding, is its nearest other embedding (cosine) the same
  one as with the original float model;
- language models: perplexity (masked positions for MLM, next tokens for CLM), and the output SQNR;
- classifiers: top-1 accuracy.

Each in float, in the simulator (the given quantization config; a model with learned ranges uses them), and in
real INT8: the calibrated simulator exported to static QDQ ONNX by :func:`outlierfree.export.onnx.export_onnx` and
run in ONNX Runtime.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.config import QuantConfig
from ..quant.evaluate import Scores, model_output


def outputs(model: nn.Module, batches: list[dict[str, torch.Tensor]], task: str) -> list[torch.Tensor]:
    """The scored outputs of ``model`` (float32, no gradient) on each batch."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = [model_output(model, b, task).float() for b in batches]
    model.train(was)
    return out


def _pooled(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(y.dtype)  # (B, T, 1)
    return (y * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)


def nn_agreement(ys: list[torch.Tensor], refs: list[torch.Tensor], batches: list[dict[str, torch.Tensor]]) -> float:
    """Share of sentence embeddings whose nearest other embedding (cosine) is the same as in ``refs``."""
    def embed(outs: list[torch.Tensor]) -> torch.Tensor:
        rows = []
        for y, b in zip(outs, batches):
            mask = b.get("attention_mask")
            mask = torch.ones(y.shape[:2]) if mask is None else mask
            rows.append(_pooled(y.float(), mask))
        e = F.normalize(torch.cat(rows), dim=-1)  # (N, D)
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)  # never one's own neighbour
        return sim.argmax(dim=1)  # (N,)

    a, b = embed(ys), embed(refs)
    return float((a == b).float().mean()) if len(a) > 1 else 1.0


def metrics(ys: list[torch.Tensor], refs: list[torch.Tensor], batches: list[dict[str, torch.Tensor]],
            task: str) -> dict[str, Any]:
    """The task metric of ``ys`` and their agreement with the original float outputs ``refs``."""
    s = Scores(task)
    for y, b, r in zip(ys, batches, refs):
        s.add(y, b, r)
    r = s.result()
    out: dict[str, Any] = {}
    if task == "encoder":
        out = {"token_cosine": r.get("cosine"), "sentence_cosine": r.get("pooled_cosine"),
               "nn_agreement": nn_agreement(ys, refs, batches)}
    elif "perplexity" in r:
        out = {"perplexity": r["perplexity"]}
    elif "top1" in r:
        out = {"top1": r["top1"]}
    out["output_sqnr_db"] = r.get("output_sqnr_db")
    return out


def measure(model: nn.Module, calib: list[dict[str, torch.Tensor]], batches: list[dict[str, torch.Tensor]],
            refs: list[torch.Tensor], config: QuantConfig, task: str, real_int8: bool = True,
            progress: bool = False) -> dict[str, Any]:
    """``{"float", "simulated", "int8"}`` metrics of ``model`` against the original float outputs ``refs``.

    ``int8`` is None when not asked or when the config has no integer form (dynamic activations: the exporter
    writes static QDQ only, per-tensor activations with per-tensor or per-channel weights); ``int8_note`` then says
    why."""
    from ..quant.simulator import quantize

    t0 = time.perf_counter()
    res: dict[str, Any] = {"float": metrics(outputs(model, batches, task), refs, batches, task)}
    qm = quantize(model, config, task)
    try:
        if config.activation is not None and not config.activation.dynamic:
            qm.calibrate(calib, lambda m, b: model_output(m, b, task), progress=progress)
        res["simulated"] = metrics(outputs(model, batches, task), refs, batches, task)
        res["learned_ranges_used"] = len(qm.learned_used)
        res["int8"] = None
        why = config.no_integer_form()
        if real_int8 and why is None:
            res["int8"] = _onnxruntime(qm, calib[0], batches, refs, task)
        elif real_int8:
            res["int8_note"] = f"no integer form: {why}"
    finally:
        qm.remove()
    res["seconds"] = time.perf_counter() - t0
    return res


def _onnxruntime(qm: Any, example: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]],
                 refs: list[torch.Tensor], task: str) -> dict[str, Any]:
    from ..export.onnx import export_onnx, require_onnx
    from ..export.ort import default_threads, run, session

    require_onnx()
    with tempfile.TemporaryDirectory() as tmp:
        info = export_onnx(qm, example, tmp, task, with_float=False)
        sess = session(Path(tmp) / info["int8"], default_threads())
        ys = [run(sess, b).float() for b in batches]
    return metrics(ys, refs, batches, task)


def dynamic_config(config: QuantConfig) -> QuantConfig:
    """The same site set with dynamic per-token activations (the 'dynamic per-token' row of the tables)."""
    from dataclasses import replace

    return config.replace(activation=replace(config.activation, granularity="per_token", static=False,
                                             estimator="current_minmax"))
