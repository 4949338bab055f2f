"""Writing a quantization run: ``quant.json`` (everything), ``quant.md`` (tables) and ``sites.png`` (plot).

Everything goes into a temporary directory that replaces ``--out`` only when complete (nothing half-written).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..records import atomic_dir
from ..records import dumps
from .evaluate import task_metric


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.4e}"
    return str(v)


def _runtime_table(runs: list[dict[str, Any]], key: str, name: str, metric: str, size_header: str,
                   title: str) -> list[str]:
    """Markdown lines of one real-INT8 runtime's table (``key``: ``onnxruntime`` or ``openvino``): the simulated
    metric beside the runtime's INT8 and float metrics, its integer kernels and file size (INT8 / float where the
    float file was measured too)."""
    lines = ["", title, "", f"| config | simulated {metric} | {name} INT8 {metric} | {name} float {metric} | "
             f"integer kernels | {size_header} |", "|---|---|---|---|---|---|"]
    for r in runs:
        o = r[key]
        ops = ", ".join(f"{k} x{n}" for k, n in o["kernels"]["integer_ops"].items()) or "none"
        size = f"{o['bytes']['int8'] / 1e6:.2f}" + \
            (f" / {o['bytes']['float'] / 1e6:.2f}" if key == "onnxruntime" else "") + " MB"
        lines.append(f"| {r['config']['describe']} | {_fmt(r['quantized'].get(metric))} | "
                     f"{_fmt(o['int8'].get(metric))} | {_fmt((o['float'] or {}).get(metric))} | {ops} | {size} |")
    return lines


def _reference_table(runs: list[dict[str, Any]], reference: str | None, metric: str) -> list[str]:
    """Markdown lines of the ``--reference`` comparison: the reference's float metric on the same batches, and this
    model's float and quantized outputs against the reference's (output SQNR; cosines for encoders)."""
    lines = ["", f"Against the reference `{reference}` (its float model on the same batches):", "",
             f"| config | reference float {metric} | float {metric} | quantized {metric} | float SQNR vs reference "
             f"(dB) | quantized SQNR vs reference (dB) |", "|---|---|---|---|---|---|"]
    for r in runs:
        ref = r["reference"]
        own = ("float_vs_reference", "quantized_vs_reference") if metric == "cosine" else ("float", "quantized")
        src = ref if metric == "cosine" else r
        lines.append(f"| {r['config']['describe']} | {_fmt(ref['float'].get(metric))} | "
                     f"{_fmt(src[own[0]].get(metric))} | {_fmt(src[own[1]].get(metric))} | "
                     f"{_fmt(ref['float_vs_reference'].get('output_sqnr_db'), 3)} | "
                     f"{_fmt(ref['quantized_vs_reference'].get('output_sqnr_db'), 3)} |")
    if metric == "cosine":
        lines.append("Encoders: float and quantized cosines are token cosines to the reference's outputs.")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The Markdown summary of a run (one section per configuration)."""
    lines = [f"# outlierfree quantize: {report['model']}", "",
             f"task: {report['task']}; data: {report['data']}", "",
             f"command: `{report['command']}`", ""]
    metric, higher = task_metric(report["task"])
    lines += ["| config | float " + metric + " | quantized " + metric + " | output SQNR (dB) | calib batches | "
              "eval batches |", "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['config']['describe']} | {_fmt(r['float'].get(metric))} | "
                     f"{_fmt(r['quantized'].get(metric))} | {_fmt(r['quantized'].get('output_sqnr_db'), 3)} | "
                     f"{r['calib_batches']} | {r['eval_batches']} |")
    ref_runs = [r for r in report["runs"] if "reference" in r]
    if ref_runs:  # --reference: the same results against another checkpoint's float outputs
        lines += _reference_table(ref_runs, report.get("reference"), metric)
    ort_runs = [r for r in report["runs"] if "onnxruntime" in r]
    if ort_runs:  # --backend onnxruntime: the real INT8 model beside the simulation
        lines += _runtime_table(ort_runs, "onnxruntime", "ONNX Runtime", metric, "INT8 / float file size",
                                "Real INT8 in ONNX Runtime (static QDQ export of the same calibrated ranges, same "
                                "batches):")
        ov_runs = [r for r in ort_runs if "openvino" in r]
        if ov_runs:  # --backend openvino: the same INT8 model compiled by OpenVINO
            lines += _runtime_table(ov_runs, "openvino", "OpenVINO", metric, "IR size",
                                    "The same INT8 model in OpenVINO (IR converted from the QDQ ONNX model):")
    lines.append("")
    data = report.get("data") if isinstance(report.get("data"), dict) else {}
    lines.append(("Float and quantized are evaluated on the same batches of the text's later sequences; ranges are "
                  "calibrated on its first sequences (the whole text is used, no split)." if data.get("whole_text") else
                  "Float and quantized are evaluated on the same validation batches; ranges are calibrated on the "
                  "training split.") + " Output SQNR = 10 log10(sum y^2 / sum (y - y_q)^2) of the model output against "
                 "float. Site sets: `paper` = the reference code's quantizers (docs/quantization.md), `full` = every "
                 "activation and weight, `linear` = linear inputs and weights only.")
    for t in report.get("transforms") or []:
        if t["transform"] == "rotate":
            lines += ["", f"**Transform** rotate (seed {t['seed']}): {t.get('description')}; fused into the weights, "
                          f"float output unchanged."]
            continue
        lines += ["", f"**Transform** {t['transform']} (alpha {t['alpha']}), applied before calibration: "
                      f"{t['applied']} of {len(t['folds'])} folds (each checked to leave the float output unchanged; "
                      f"the float column above is after the transform)."]
    for r in report["runs"]:
        if r.get("keep_16bit"):
            k = r["keep_16bit"]
            lines += ["", f"**16-bit exceptions** ({r['config']['describe']}): the {k['k']} worst group(s) of the "
                          f"ablation ({', '.join(k['groups'])}) in 16 bits give {metric} "
                          f"{_fmt(k['quantized'].get(metric))}; {100 * k['sites_16bit_share']:.1f} % of the "
                          f"activation sites and {100 * (k['values_16bit_share'] or 0):.1f} % of the activation "
                          f"values are then not 8-bit."]
    for r in report["runs"]:
        if r.get("uninstrumented"):
            lines += ["", f"**Not instrumented** ({r['config']['describe']}): these modules compute a softmax "
                          f"outside transformers' attention interface, so their scores, probabilities and context "
                          f"stayed float: {', '.join('`%s`' % m for m in r['uninstrumented'])}."]
    for r in report["runs"]:
        if "sites" not in r:
            continue
        floats = [w for w in r.get("weights", []) if not w.get("quantized", True)]
        lines += ["", f"## Diagnostics: {r['config']['describe']}", "",
                  f"{sum(1 for w in r.get('weights', []) if w.get('quantized', True))} weights quantized, "
                  f"{len(floats)} used in float: "
                  + ("; ".join(f"`{w['weight']}` ({w['why']})" for w in floats[:12])
                     + (f"; ... ({len(floats) - 12} more in quant.json)" if len(floats) > 12 else "")
                     if floats else "none") + ".", "",
                  "### Sites with the lowest SQNR (each site's own quantization error on the evaluation batches)", "",
                  "| site | kind | range | SQNR (dB) | same tensor as |", "|---|---|---|---|---|"]
        sites = sorted((s for s in r["sites"] if s["sqnr_db"] is not None), key=lambda s: s["sqnr_db"])
        for s in sites[:15]:
            lines.append(f"| `{s['site']}` | {s['kind']} | [{_fmt(s['lo'])}, {_fmt(s['hi'])}] | "
                         f"{_fmt(s['sqnr_db'], 3)} | {', '.join('`%s`' % a for a in s['aliases']) or '-'} |")
        if r.get("ablation"):
            lines += ["", f"### Which sites hurt most: one group quantized at a time "
                          f"({r.get('ablation_batches')} evaluation batches)", "",
                      f"| group | {metric} | change vs float | output SQNR (dB) |", "|---|---|---|---|"]
            for a in r["ablation"][:15]:
                lines.append(f"| {a['group']} | {_fmt(a.get(metric))} | {_fmt(a.get(metric + '_change'))} | "
                             f"{_fmt(a['output_sqnr_db'], 3)} |")
    return "\n".join(lines) + "\n"


MAX_PLOTTED = 60


def plot(report: dict[str, Any], path: Path) -> bool:
    """Per-site SQNR (left) and the ablation's output SQNR per group (right) of the first run with diagnostics."""
    run = next((r for r in report["runs"] if r.get("sites")), None)
    if run is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [s for s in run["sites"] if s["sqnr_db"] is not None and not math.isinf(s["sqnr_db"])]
    if len(sites) > MAX_PLOTTED:  # a 12-layer model has ~200 sites: draw the worst, in module order
        worst = {s["site"] for s in sorted(sites, key=lambda s: s["sqnr_db"])[:MAX_PLOTTED]}
        sites = [s for s in sites if s["site"] in worst]
    kinds = sorted({s["kind"] for s in sites})
    cmap = plt.get_cmap("tab20")
    colour = {k: cmap(i % 20) for i, k in enumerate(kinds)}
    fig, axes = plt.subplots(1, 2, figsize=(16, max(4, 0.18 * max(len(sites), 1))), squeeze=False)
    ax = axes[0][0]
    ax.barh(range(len(sites)), [s["sqnr_db"] for s in sites], color=[colour[s["kind"]] for s in sites])
    ax.set_yticks(range(len(sites)))
    ax.set_yticklabels([s["site"] for s in sites], fontsize=5)
    ax.invert_yaxis()
    ax.set_xlabel("site SQNR (dB)")
    ax.set_title(f"per-site SQNR, {run['config']['describe']}", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[k]) for k in kinds]
    ax.legend(handles, kinds, fontsize=6, loc="lower right")
    ax = axes[0][1]
    abl = [a for a in run.get("ablation", []) if a["output_sqnr_db"] is not None
           and not math.isinf(a["output_sqnr_db"])]
    abl = sorted(abl, key=lambda a: a["output_sqnr_db"])
    ax.barh(range(len(abl)), [a["output_sqnr_db"] for a in abl], color="tab:red")
    ax.set_yticks(range(len(abl)))
    ax.set_yticklabels([a["group"] for a in abl], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("output SQNR (dB) with only this group quantized")
    ax.set_title("which groups hurt most (lower = worse)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """Write ``quant.json``, ``quant.md`` and ``sites.png`` atomically into ``out``."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "quant.json").write_text(dumps(report))
        (tmp / "quant.md").write_text(markdown(report))
        plot(report, tmp / "sites.png")
    return out
