"""One library call that analyses, quantizes and ablates a model, tries each fix under one definition of W8A8, and
says what to do: ``diagnose(DoctorRequest) -> DoctorResult`` (``outlierfree doctor`` only turns its flags into the
request, writes the result and prints it).

    from outlierfree.doctor.run import DoctorRequest, diagnose
    result = diagnose(DoctorRequest("path/to/model"))
    result.write("out/doctor")   # doctor.json, doctor.md, doctor.png
    result.verdict["summary"]

The fixes, each measured on the same calibration and evaluation batches as the plain W8A8 (the paper's site set,
per-tensor static 8 bits):

- per-channel weights; per-token dynamic activations (the granularities the simulator has);
- SmoothQuant (:mod:`outlierfree.quant.transforms`, exact in float, alpha 0.5);
- rotation: of the residual stream (pre-norm RMSNorm decoders) and per head wherever exact (:func:`rotate`);
- 16-bit exceptions: the K site groups the ablation ranks worst kept in 16 bits;
- the stack of SmoothQuant, per-channel weights and the 16-bit exceptions.

For the families this project trains (BERT, OPT, ViT) it also names the training-time fix.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..analysis.run import AnalyzeRequest
from ..data import defaults
from ..errors import require
from ..quant.config import QuantSpec, full_w8a8, paper_w8a8

TRAINABLE = ("bert", "opt", "vit")
# what doctor's analysis measures: the residual sums quantize sees, besides the default kinds
ANALYSIS_KINDS = ("ln_input", "residual", "attn_output", "ffn_output", "attn_probs")


@dataclass(frozen=True)
class DoctorRequest:
    """What ``outlierfree doctor`` is asked to do, as data; every field is checked when it is made, with a one-line
    error naming the flag (the CLI builds it from its flags by the same names, library callers directly).

    Attributes:
        model: the model directory (ours or any Hugging Face checkpoint) or ``.gguf`` file.
        data: data source [default: the model's training data, else the offline corpus / Fashion-MNIST].
        calib_batches, eval_batches: calibration (training split) and evaluation (validation split) batches; the
            analysis reads ``eval_batches`` batches too.
        seq_len: text sequence length [default: training's, else 128 (the analysis: 128)].
        keep_16bit: site groups the 16-bit-exceptions fix keeps in 16 bits.
        max_sequences: read at most this many sequences of a whole ``data`` text (quantization's batches).
        progress: progress bars.
    """

    model: str
    data: str | None = None
    tokenizer: str | None = None
    calib_batches: int = 8
    eval_batches: int = 2
    batch_size: int = defaults.BATCH_SIZE
    seq_len: int | None = None
    keep_16bit: int = 3
    seed: int = defaults.SEED
    max_sequences: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", str(self.model))
        require(self.calib_batches >= 1 and self.eval_batches >= 1, "doctor needs calibration and evaluation "
                "batches", "pass --calib-batches >= 1 and --eval-batches >= 1")
        require(self.keep_16bit >= 0, f"--keep-16bit {self.keep_16bit} is negative", "pass 0 or more")
        require(self.max_sequences is None or self.max_sequences >= 1,
                f"--max-sequences must be at least 1, got {self.max_sequences}", "pass --max-sequences 1 or more")
        self.analysis_request()  # the analysis's checks (amounts, the model path), before any work

    def analysis_request(self) -> AnalyzeRequest:
        """The analysis doctor runs first (where the outliers sit), on ``eval_batches`` batches."""
        return AnalyzeRequest((self.model,), data=self.data, batches=self.eval_batches, batch_size=self.batch_size,
                              seq_len=self.seq_len or 128, seed=self.seed, tokenizer=self.tokenizer,
                              sites=ANALYSIS_KINDS, progress=self.progress)


@dataclass
class DoctorResult:
    """What ``outlierfree doctor`` measured and concluded (the field names are doctor.json's keys): the float
    metric, every configuration's metric and its harm, the ranking of site groups, where the outliers sit, and the
    verdict. ``write`` puts it on disk as doctor.json, doctor.md and doctor.png."""

    model: str
    model_class: str
    task: str
    metric: str
    higher_is_better: bool
    data: dict[str, Any]
    float: dict[str, Any]  # the float model's metrics (doctor.json's key; shadows the builtin in this class only)
    outliers: dict[str, Any]
    ablation: list[dict[str, Any]]
    smoothquant: dict[str, Any]
    not_applicable: dict[str, str]
    configs: list[dict[str, Any]]
    verdict: dict[str, Any]
    seconds: float  # wall seconds of the whole diagnosis, rounded to 0.1
    stage_seconds: dict[str, float]
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The doctor.json dict."""
        return asdict(self)

    def write(self, out: str | Path) -> list[Path]:
        """doctor.json, doctor.md and doctor.png, written to a temporary directory that replaces ``out``; the paths
        written."""
        from ..records import atomic_dir, dumps, save_png

        report, out = self.to_dict(), Path(out)
        with atomic_dir(out) as tmp:
            (tmp / "doctor.json").write_text(dumps(report))
            (tmp / "doctor.md").write_text(_markdown(report))
            _plot(report, tmp / "doctor.png", save_png)
        return [out / "doctor.md", out / "doctor.json", out / "doctor.png"]

    def lines(self) -> list[str]:
        """What the console says when the diagnosis ends: the verdict."""
        return [self.verdict["summary"]]


def _harm(r: dict[str, Any], metric: str, higher: bool) -> float | None:
    from ..quant.evaluate import Measured

    return Measured.of(r, metric).harm(higher)


def diagnose(request: DoctorRequest, *, echo: Callable[[str], None] | None = None) -> DoctorResult:
    """Diagnose the model of ``request``: analysis, simulated W8A8 (the paper's set and every activation), an
    ablation of the site groups, then each fix on the same batches, and the verdict. The library call behind
    ``outlierfree doctor``; ``echo`` receives the stage lines and each configuration's metric as it is measured.

        result = diagnose(DoctorRequest("path/to/model", eval_batches=1))
        result.write("out/doctor")
    """
    from transformers.utils import logging as hf_logging

    from ..analysis.run import analyze_checkpoint
    from ..errors import OutlierfreeError
    from .. import hf_compat
    from ..quant.evaluate import evaluate_quantized, task_metric
    from ..quant.run import apply_transforms, load_for_quant

    hf_logging.disable_progress_bar()  # our own progress bars only
    say = echo or (lambda line: None)
    t0 = time.perf_counter()
    stages: dict[str, float] = {}  # wall seconds per stage, in doctor.json: where a slow doctor spends its time
    say("[1/4] where the outliers are (analyze)")
    analysis = analyze_checkpoint(request.analysis_request())
    stages["analysis"] = time.perf_counter() - t0
    q = load_for_quant(request.model, tokenizer=request.tokenizer, calib_batches=request.calib_batches,
                       eval_batches=request.eval_batches, batch_size=request.batch_size, seq_len=request.seq_len,
                       seed=request.seed, data=request.data, max_sequences=request.max_sequences)
    model, tok, task, batches = q.model, q.tokenizer, q.task, q.batches
    metric, higher = task_metric(task)
    progress, keep_16bit = request.progress, request.keep_16bit

    def run(label: str, m: Any, cfg: Any, **kw: Any) -> dict[str, Any]:
        t = time.perf_counter()
        r = evaluate_quantized(m, tok, batches.calib, batches.eval, cfg, task, progress=progress, **kw)
        stages[label] = time.perf_counter() - t
        r["label"] = label
        r["harm"] = _harm(r, metric, higher)
        say(f"    {label}: {metric} {r['quantized'].get(metric):.4g} (float {r['float'].get(metric):.4g})")
        return r

    say("[2/4] W8A8 as the paper defines it, every activation, and which site groups hurt (ablation)")
    paper = paper_w8a8()
    runs = [run("W8A8 paper", model, paper, diagnostics=True, ablate=True, diag_batches=1, keep_16bit=keep_16bit)]
    runs.append(run("W8A8 full", model, full_w8a8()))
    say("[3/4] the fixes")
    w_pc = QuantSpec(8, True, "per_channel", "current_minmax")
    runs.append(run("per-channel weights", model, paper.replace(weight=w_pc)))
    runs.append(run("per-token activations (dynamic)", model,
                    paper.replace(activation=QuantSpec(8, False, "per_token", "current_minmax", static=False))))
    smoothed = copy.deepcopy(model)
    [sq] = apply_transforms(smoothed, [("smoothquant", 0.5)], batches.calib, task)  # as quantize --transform does
    runs.append(run(f"SmoothQuant 0.5 ({sq['applied']} folds)", smoothed, paper))
    rotated, not_applicable = copy.deepcopy(model), {}
    try:
        [rot] = apply_transforms(rotated, [("rotate", 0)], batches.calib, task)
        runs.append(run("rotation (" + (f"residual {rot['rotation']} + " if rot["layers"] else "") +
                        f"heads: Q/K {rot['heads_qk']}, V/O {rot['heads_vo']})", rotated, paper))
    except OutlierfreeError as e:  # the architecture's norms break the invariance: say so, measure nothing
        not_applicable["rotation"] = e.problem
        say(f"    rotation: not applicable ({e.problem})")
    k16 = runs[0].get("keep_16bit")
    if k16:
        runs.append({"label": f"{k16['k']} worst site groups in 16 bits", "float": runs[0]["float"],
                     "quantized": k16["quantized"], "harm": _harm({"float": runs[0]["float"],
                                                                   "quantized": k16["quantized"]}, metric, higher),
                     "config": runs[0]["config"], "keep_16bit": k16})
    # the stack keeps the same site groups in 16 bits as the plain model's ablation chose (same site names)
    runs.append(run("stacked: SmoothQuant + per-channel weights" + (f" + {k16['k']} groups in 16 bits"
                                                                      if k16 else ""),
                    smoothed, paper.replace(weight=w_pc), sixteen_bit_sites=(k16 or {}).get("sites")))
    say("[4/4] verdict")
    family = hf_compat.family_of(getattr(model, "config", None))
    verdict = _verdict(runs, analysis, metric, higher, family)
    return DoctorResult(
        model=request.model, model_class=type(model).__name__, task=task, metric=metric, higher_is_better=higher,
        data=batches.info, float=runs[0]["float"],
        outliers={"headline": analysis.get("headline"), "outlier_dims": analysis.get("outlier_dims"),
                  "top_activations": (analysis.get("top_activations") or [])[:5], "noop": analysis.get("noop")},
        ablation=(runs[0].get("ablation") or [])[:10], smoothquant=sq, not_applicable=not_applicable,
        configs=[{k: v for k, v in c.items() if k in ("label", "quantized", "harm", "config", "seconds")}
                 for c in runs],
        verdict=verdict, seconds=round(time.perf_counter() - t0, 1),
        stage_seconds={k: round(v, 2) for k, v in stages.items()})


def _verdict(runs: list[dict[str, Any]], analysis: dict[str, Any], metric: str, higher: bool,
             family: str | None) -> dict[str, Any]:
    base = runs[0]
    fl = base["float"].get(metric)
    tol = 0.01 * abs(fl) if fl else 0.01  # within 1 % of float counts as "survives"
    ok = [r for r in runs if r.get("harm") is not None and r["harm"] <= tol]
    best = min((r for r in runs[2:] if r.get("harm") is not None), key=lambda r: r["harm"], default=None)
    from ..analysis.analyze import Headline

    head = Headline.of(analysis)
    where = (f"The largest activations sit at {head.max_inf_norm_site} (max inf-norm {head.max_inf_norm:.3g})"
             if head.max_inf_norm is not None else "No headline sites were found")
    if base.get("harm") is not None and base["harm"] <= tol:
        summary = (f"W8A8 (the paper's set) changes {metric} by {base['harm']:+.3g}, within 1 % of float: this model "
                   f"ships in 8 bits as it is.")
    elif best is not None:
        summary = (f"W8A8 (the paper's set) costs {base['harm']:.3g} {metric}; the best fix measured is "
                   f"'{best['label']}' ({best['harm']:.3g}); " + ("it brings the model within 1 % of float."
                                                                  if best in ok else "no fix measured here "
                                                                  "brings it within 1 % of float."))
    else:
        summary = "no configuration could be scored"
    train = None
    if family in TRAINABLE and base.get("harm") is not None and base["harm"] > tol:
        train = (f"for {family}, retrain with `--attention gated` (gated attention: 16x lower inf-norm and 1/65 of "
                 f"vanilla's W8A8 loss in docs/results.md) or `--attention clipped`")
    keep = base.get("keep_16bit") or {}
    return {"summary": summary + " " + where + ".", "survives_within_1pct": [r["label"] for r in ok],
            "best_fix": best["label"] if best else None, "keep_in_16bit": keep.get("groups"),
            "training_fix": train}


def _markdown(r: dict[str, Any]) -> str:
    m = r["metric"]
    lines = [f"# outlierfree doctor: {r['model']}", "", f"**{r['verdict']['summary']}**", "",
             f"task {r['task']}, metric {m} ({'higher' if r['higher_is_better'] else 'lower'} is better), float "
             f"{r['float'].get(m):.4g}; data: {r['data'].get('data')}, calibrated on the training split, evaluated "
             f"on the validation split (W8A8: the paper's site set, per-tensor, static 8 bits unless a row says "
             f"otherwise)", "",
             "| configuration | quantized " + m + " | loss vs float |", "|---|---|---|"]
    for c in r["configs"]:
        lines.append(f"| {c['label']} | {c['quantized'].get(m):.4g} | "
                     f"{'' if c['harm'] is None else format(c['harm'], '.3g')} |")
    v = r["verdict"]
    lines += ["", f"- keep in 16 bits (the ablation's worst groups): {', '.join(v['keep_in_16bit'] or []) or '-'}",
              f"- training-time fix: {v['training_fix'] or 'not needed or not a family outlierfree trains'}",
              "- outlier dimensions (recurring across sites): " + (", ".join(
                  f"dim {d['dim']} ({d['sites']} sites, layers {d['layers'][0]}-{d['layers'][-1]}, max {d['max']:.3g})"
                  for d in ((r["outliers"].get("outlier_dims") or {}).get("recurring") or [])[:6]) or "none"),
              f"- SmoothQuant: {r['smoothquant']['applied']} of {len(r['smoothquant']['folds'])} folds applied "
              f"(the others would change the float output)",
              *[f"- {k}: not applicable ({v})" for k, v in (r.get("not_applicable") or {}).items()],
              "", f"Took {r['seconds']} s."]
    return "\n".join(lines) + "\n"


def _plot(r: dict[str, Any], path: Path, save_png: Callable) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = r["metric"]
    labels = [c["label"] for c in r["configs"]]
    vals = [c["quantized"].get(m) for c in r["configs"]]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.5))
    ax.barh(range(len(labels)), vals, color="tab:blue")
    ax.axvline(r["float"].get(m), color="k", linestyle="--", label="float")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(m)
    ax.set_title(f"doctor: W8A8 and fixes ({Path(str(r['model'])).name})")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)  # frees the figure
