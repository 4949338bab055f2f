"""Float and quantized evaluation of the same batches, per-site diagnostics and the leave-one-group-in ablation.

Metrics (every result dict carries the full quantization config under ``"config"``):

- ``mlm``: perplexity ``exp(sum NLL / n)`` over the masked positions only;
- ``clm``: perplexity over next-token predictions (T - 1 per sequence);
- ``image``: top-1 accuracy;
- ``encoder`` (no task head, e.g. all-MiniLM-L6-v2): the mean cosine similarity of the quantized final hidden states
  to the float ones over real tokens (and of the mean-pooled sentence embeddings), and their SQNR;
- always: ``output_sqnr_db`` = ``10 log10(sum y^2 / sum (y - y_q)^2)`` of the model's output (logits or hidden
  states) against float, over the evaluation batches.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..records import track
from ..train.losses import output_loss_sum
from .config import QuantConfig
from ..data.evaluation import task_of
from .simulator import QuantizedModel, default_forward, quantize


def model_output(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The tensor a task is scored on: logits, or the final hidden states (B, T, D) for encoders."""
    out = default_forward(model, batch)
    if task == "encoder":
        for name in ("last_hidden_state", "logits"):  # a base model's states, or a seq2seq model's logits
            if getattr(out, name, None) is not None:
                return getattr(out, name)
        return out[0]
    return out.logits


def _padding(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(B, T) True at padding, or None when the batch has none (the usual case: packed sequences). Only then do
    the scores change their sums, so the numbers of unpadded batches stay bit-for-bit what they were."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or bool(mask.all()):
        return None
    return mask == 0


class Scores:
    """Accumulates one model's task metric, and the agreement of its outputs with a float reference."""

    def __init__(self, task: str):
        self.task = task
        self.nll = 0.0
        self.n = 0
        self.correct = 0
        self.sig = 0.0  # sum y_float^2
        self.err = 0.0  # sum (y_float - y)^2
        self.cos_sum = 0.0
        self.cos_n = 0
        self.pooled_cos_sum = 0.0
        self.pooled_n = 0

    def add(self, y: torch.Tensor, batch: dict[str, torch.Tensor], ref: torch.Tensor | None) -> None:
        """Score output ``y`` of one batch (and compare it with the float output ``ref`` when given)."""
        y = y.float()
        if self.task in ("mlm", "clm", "image"):  # the task losses training uses (train/losses.py), summed
            nll, n, correct = output_loss_sum(y, batch, self.task)
            self.n += int(n)
            if correct is None:
                self.nll += float(nll)
            else:  # images are scored by top-1
                self.correct += int(correct)
        if ref is not None:
            ref = ref.float()
            pad = _padding(batch)
            rs, ys = ref, y
            if pad is not None and ref.shape[:2] == pad.shape:  # padding positions are no part of the output
                rs, ys = ref[~pad], y[~pad]
            # squares summed per row in float32, rows in float64: no float64 copy of (B, T, vocab) logits, which
            # cost a third of doctor's time on a masked-LM head (the totals agree with float64 to ~1e-9)
            d = rs - ys
            self.sig += float(rs.pow(2).sum(-1).double().sum())
            self.err += float(d.pow(2).sum(-1).double().sum())
            if self.task == "encoder":
                mask = batch.get("attention_mask")
                mask = torch.ones(ref.shape[:2], dtype=torch.bool) if mask is None else mask.bool()  # (B, T)
                cos = F.cosine_similarity(ref, y, dim=-1)  # (B, T)
                self.cos_sum += float(cos[mask].sum())
                self.cos_n += int(mask.sum())
                m = mask[..., None].float()
                pr = (ref * m).sum(1) / m.sum(1)  # (B, D) mean-pooled sentence embeddings
                py = (y * m).sum(1) / m.sum(1)
                self.pooled_cos_sum += float(F.cosine_similarity(pr, py, dim=-1).sum())
                self.pooled_n += pr.shape[0]

    def result(self) -> dict[str, Any]:
        """The metric dict."""
        r: dict[str, Any] = {}
        if self.task in ("mlm", "clm"):
            r["perplexity"] = math.exp(self.nll / max(self.n, 1))
            r["tokens"] = self.n
        elif self.task == "image":
            r["top1"] = self.correct / max(self.n, 1)
            r["images"] = self.n
        if self.sig > 0:
            r["output_sqnr_db"] = 10 * math.log10(self.sig / self.err) if self.err > 0 else float("inf")
        if self.cos_n:
            r["cosine"] = self.cos_sum / self.cos_n
            r["pooled_cosine"] = self.pooled_cos_sum / self.pooled_n
        return r


@dataclass(frozen=True)
class Measured:
    """The headline numbers of one :func:`evaluate_quantized` result, typed: what ``reproduce``, ``release`` and
    ``doctor`` read, so that no other package indexes the result dict by string keys.

    ``scale`` multiplies every metric value (100 for top-1 in percent, as the paper reports it)."""

    metric: str
    float: float | None  # the float model's metric
    quantized: float | None  # the simulated quantized model's metric
    int8_ort: float | None = None  # the same model in real INT8 (ONNX Runtime), when it ran
    output_sqnr_db: float | None = None

    @classmethod
    def of(cls, result: dict[str, Any], metric: str | None = None, scale: float = 1.0) -> "Measured":
        """The record of ``result`` (a dict of :func:`evaluate_quantized`, or as read back from JSON)."""
        metric = metric or task_metric(result["task"])[0]

        def value(d: dict[str, Any] | None) -> float | None:
            v = (d or {}).get(metric)
            return None if v is None else float(v) * scale

        ort = (result.get("onnxruntime") or {}).get("int8")
        return cls(metric, value(result.get("float")), value(result.get("quantized")), value(ort),
                   (result.get("quantized") or {}).get("output_sqnr_db"))

    def harm(self, higher_is_better: bool) -> float | None:
        """How much quantization costs (positive = worse): quantized - float, or float - quantized when higher is
        better; None when either is missing."""
        if self.float is None or self.quantized is None:
            return None
        return self.float - self.quantized if higher_is_better else self.quantized - self.float

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dataclasses.asdict(self)


def task_metric(task: str) -> tuple[str, bool]:
    """(metric name, higher is better) of a task."""
    return {"mlm": ("perplexity", False), "clm": ("perplexity", False), "image": ("top1", True),
            "encoder": ("cosine", True)}[task]


def evaluate_pair(qm: QuantizedModel, batches: Iterable[dict[str, torch.Tensor]], task: str,
                  progress: bool = True, label: str = "evaluating", record: bool = False,
                  refs: list[torch.Tensor] | None = None, reference: nn.Module | None = None) -> dict[str, Any]:
    """Float and quantized metrics on the same batches (float pass then quantized pass per batch).

    ``refs``: the float outputs of these batches when already computed (the ablation reuses them; the float
    pass is then skipped and its seconds are 0). Returns ``{"float": {...}, "quantized": {...}, "seconds":
    {"float": s, "quantized": s}}``. ``reference``: another float model on the same batches (e.g. the original a
    fine-tune started from), scored beside them: ``"reference": {"float": its metric, "float_vs_reference":
    {...}, "quantized_vs_reference": {...}}`` (output SQNR, and cosines for encoders, against its outputs).
    """
    fs, qs = Scores(task), Scores(task)
    rs, fvr, qvr = Scores(task), Scores(task), Scores(task)
    tf = tq = 0.0
    model = qm.model
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(track(batches, label, enabled=progress)):
                t0 = time.perf_counter()
                if refs is not None:
                    ref = refs[i]
                else:
                    with qm.float_mode():
                        ref = model_output(model, batch, task)
                t1 = time.perf_counter()
                if record:
                    with qm.recording():
                        y = model_output(model, batch, task)
                else:
                    y = model_output(model, batch, task)
                t2 = time.perf_counter()
                tf, tq = tf + t1 - t0, tq + t2 - t1
                fs.add(ref, batch, None)
                qs.add(y, batch, ref)
                if reference is not None:
                    r = model_output(reference, batch, task)  # (the reference's own float outputs)
                    rs.add(r, batch, None)
                    fvr.add(ref, batch, r)
                    qvr.add(y, batch, r)
    finally:
        model.train(was)
    def own(s: Scores) -> dict[str, Any]:  # a float model against itself: an encoder's cosines are 1 by definition
        r = s.result()
        if task == "encoder":
            r.update(cosine=1.0, pooled_cosine=1.0)
        return r

    out = {"float": own(fs), "quantized": qs.result(), "seconds": {"float": tf, "quantized": tq}}
    if reference is not None:
        out["reference"] = {"float": own(rs), "float_vs_reference": fvr.result(),
                            "quantized_vs_reference": qvr.result()}
    return out


def site_groups(qm: QuantizedModel) -> dict[str, list[str]]:
    """Activation sites grouped by (layer, kind): ``"layer 3 / ln_input" -> [site names]``."""
    groups: dict[str, list[str]] = {}
    for name in qm.act:
        s = qm.site_of[name]
        where = f"layer {s.layer}" if s.layer is not None else "outside blocks"
        groups.setdefault(f"{where} / {s.kind}", []).append(name)
    return groups


def ablation(qm: QuantizedModel, batches: list[dict[str, torch.Tensor]], task: str,
             float_result: dict[str, Any] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Leave-one-group-in: quantize only one site group (or only the weights) at a time; worst first.

    Each row: group, sites, the quantized metric, its change against float, and the output SQNR. Rows are sorted by
    harm to the task metric, ties broken by output SQNR. The float outputs are computed once and reused for every
    group (the numbers are those of a float pass beside each group's quantized pass).
    """
    metric, higher = task_metric(task)
    groups = site_groups(qm)
    rows = []
    items = [("weights only", [], True)] if qm.config.weight is not None else []
    items += [(g, names, False) for g, names in sorted(groups.items())]
    with torch.no_grad(), qm.float_mode():  # the float outputs once, not once per group
        was = qm.model.training
        qm.model.eval()
        refs = [model_output(qm.model, b, task) for b in batches]
        qm.model.train(was)
    if float_result is None:
        fs = Scores(task)
        for y, b in zip(refs, batches):
            fs.add(y, b, None)
        float_result = fs.result()
    for group, names, weights in track(items, "ablation (one group at a time)", enabled=progress):
        with qm.only_sites(names, weights=weights):
            r = evaluate_pair(qm, batches, task, progress=False, refs=refs)["quantized"]
        val = r.get(metric)
        ref = float_result.get(metric)
        delta = None if val is None or ref is None else val - ref
        harm = None if delta is None else (-delta if higher else delta)
        rows.append({"group": group, "sites": names, metric: val, f"{metric}_change": delta, "harm": harm,
                     "output_sqnr_db": r.get("output_sqnr_db")})
    rows.sort(key=lambda r: (-(r["harm"] or 0.0), r["output_sqnr_db"] if r["output_sqnr_db"] is not None else 1e9))
    return rows


def keep_worst_16bit(qm: QuantizedModel, rows: list[dict[str, Any]], k: int,
                     batches: list[dict[str, torch.Tensor]], task: str, progress: bool = True) -> dict[str, Any]:
    """Mixed precision from the diagnostics: the ``k`` site groups the ablation ranks worst (by harm to the metric,
    ties by output SQNR) go to 16 bits on their calibrated ranges, then the model is evaluated again.

    Returns the groups, the metrics, and the cost: the share of the activation sites, and of the activation values
    of one evaluation batch, that are no longer 8-bit.
    """
    from ..errors import require

    groups = [r for r in rows if r["sites"]]  # "weights only" has no activation sites to widen
    require(k <= len(groups), f"--keep-16bit {k} is more than the {len(groups)} site groups",
            f"pass --keep-16bit <= {len(groups)}")
    chosen = groups[:k]
    names = {n for r in chosen for n in r["sites"]}
    saved = qm.set_bits(names, 16)
    try:
        res = evaluate_pair(qm, batches, task, progress=progress, label="evaluating with 16-bit exceptions")
        before = {n: q.values for n, q in qm.act.items()}
        was = qm.model.training
        qm.model.eval()
        with torch.no_grad():  # one batch: how many values each site quantizes (the integer share)
            model_output(qm.model, batches[0], task)
        qm.model.train(was)
        sizes = {n: q.values - before[n] for n, q in qm.act.items()}
    finally:
        qm.restore_specs(saved)
    total = sum(sizes.values())
    values_16 = sum(sizes.get(n, 0) for n in names)
    return {"k": k, "groups": [r["group"] for r in chosen], "sites": sorted(names), **res,
            "sites_16bit_share": len(names) / max(len(qm.act), 1),
            "values_16bit_share": values_16 / total if total else None}


# (calibrated model, evaluation batches, task, an example batch) -> {"onnxruntime": {...}, ["openvino": {...},]
# "seconds": float}: how the export layer scores the simulator's model in real integers
RealInt8 = Callable[[QuantizedModel, list, str, dict], dict]


def evaluate_quantized(model: nn.Module, tokenizer_or_none: Any, calib_batches: list[dict[str, torch.Tensor]],
                       eval_batches: list[dict[str, torch.Tensor]], config: QuantConfig, task: str | None = None,
                       diagnostics: bool = False, diag_batches: int = 2, progress: bool = True,
                       ablate: bool = False, real: RealInt8 | None = None, keep_16bit: int = 0,
                       sixteen_bit_sites: Iterable[str] | None = None,
                       reference: nn.Module | None = None) -> dict[str, Any]:
    """Calibrate ``config`` on ``calib_batches``, evaluate float and quantized on ``eval_batches``.

    The Python API used by ``outlierfree reproduce``. The model is left as it was (hooks removed).

    Returns ``{"config": ..., "task": ..., "float": {...}, "quantized": {...}, "seconds": {...},
    "calib_batches": n, "eval_batches": n, "uninstrumented": [...]}`` plus, with ``diagnostics``, ``"sites"``
    (per-site range and SQNR), ``"aliases"`` and ``"weights"`` (quantized and float weights); with ``ablate`` also
    ``"ablation"`` (leave-one-group-in on the first ``diag_batches`` evaluation batches); with
    ``real`` (the export layer's :func:`outlierfree.export.realint8.scorer`) scores the calibrated model in real
    integers on the same evaluation batches; what it returns is added (``"onnxruntime"``, and ``"openvino"`` when it
    ran there too). The simulator never imports the exporter: export composes on top of quant. ``reference``:
    another float model scored on the same batches (:func:`evaluate_pair`'s ``"reference"`` record).
    """
    task = task or task_of(model)
    qm = quantize(model, config, task)
    try:
        t0 = time.perf_counter()
        n_cal = qm.calibrate(calib_batches, lambda m, b: model_output(m, b, task), progress=progress) \
            if not (config.activation is None or config.activation.dynamic) else 0
        t_cal = time.perf_counter() - t0
        if sixteen_bit_sites:  # 16-bit exceptions chosen elsewhere (e.g. by an earlier ablation), on their ranges
            qm.set_bits(sixteen_bit_sites, 16)
        res = evaluate_pair(qm, eval_batches, task, progress=progress, record=diagnostics, reference=reference)
        out: dict[str, Any] = {"config": config.to_dict(), "task": task, **res,
                               "calib_batches": n_cal, "eval_batches": len(eval_batches),
                               "uninstrumented": qm.uninstrumented}
        out["seconds"]["calibration"] = t_cal
        if qm.learned_used:  # sites and weights quantized on ranges learned by `outlierfree finetune`
            out["learned_ranges"] = len(qm.learned_used)
        if diagnostics:
            out["sites"] = qm.sites_table()
            out["aliases"] = dict(qm.aliases)
            out["weights"] = qm.weight_table()
        if real is not None:  # the calibrated model in real integers (export/realint8.py: ONNX Runtime, OpenVINO)
            scored = dict(real(qm, eval_batches, task, (calib_batches or eval_batches)[0]))
            out["seconds"]["onnxruntime"] = scored.pop("seconds")
            out.update(scored)
        if ablate:
            t0 = time.perf_counter()
            if config.activation is not None or config.weight is not None:
                out["ablation"] = ablation(qm, eval_batches[:max(1, diag_batches)], task, progress=progress)
                out["ablation_batches"] = min(len(eval_batches), max(1, diag_batches))
            out["seconds"]["ablation"] = time.perf_counter() - t0
            if keep_16bit > 0 and out.get("ablation"):
                out["keep_16bit"] = keep_worst_16bit(qm, out["ablation"], keep_16bit, eval_batches, task, progress)
        return out
    finally:
        qm.remove()
