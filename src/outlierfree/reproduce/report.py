"""The paper's table and plots, built only from the runs' own ``result.json`` files.

Nothing here recomputes a number: change a run's result.json and the table changes with it (tested), so the
report is always a faithful view of what the runs measured.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..records import integer_ticks, write_text
from .presets import METRIC, PAPER, degradation
from .runner import machine, write_json

COLUMNS = ("fp", "max_inf_norm", "avg_kurtosis", "w8a8", "w8a8_ort", "w8a8_linear")


def _stats(values: list[float]) -> dict[str, Any]:
    v = [x for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v),
            "values": v}


def table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per family x variant: mean and spread over seeds of each column, and W8A8 degradation."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["family"], r["variant"]), []).append(r)
    rows = []
    for (fam, var), rs in groups.items():
        row: dict[str, Any] = {"family": fam, "variant": var, "metric": METRIC[fam],
                               "seeds": sorted(r["seed"] for r in rs)}
        for c in COLUMNS:
            row[c] = _stats([r.get(c) for r in rs])
        # degradation > 0 means worse after quantization
        row["w8a8_degradation"] = _stats([degradation(METRIC[fam], r.get("fp"), r.get("w8a8")) for r in rs])
        row["paper"] = PAPER.get(fam, {}).get(var, {})
        rows.append(row)
    return rows


def criteria(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cpu preset's acceptance checks per family: vs vanilla, FP no worse, max inf-norm >= 5x lower, W8A8
    degradation <= 1/5 of vanilla's."""
    out = []
    by = {(r["family"], r["variant"]): r for r in rows}
    for (fam, var), r in by.items():
        v = by.get((fam, "vanilla"))
        if var == "vanilla" or v is None:
            continue
        m = lambda row, c: row[c]["mean"]  # noqa: E731
        if None in (m(r, "fp"), m(v, "fp"), m(r, "max_inf_norm"), m(v, "max_inf_norm")):
            continue
        better = m(r, "fp") <= m(v, "fp") if METRIC[fam] == "perplexity" else m(r, "fp") >= m(v, "fp")
        ratio = m(v, "max_inf_norm") / max(m(r, "max_inf_norm"), 1e-12)
        dv, dr = v["w8a8_degradation"]["mean"], r["w8a8_degradation"]["mean"]
        deg_ok = dv is not None and dr is not None and dv > 0 and dr <= dv / 5
        out.append({"family": fam, "variant": var, "fp_no_worse": better, "inf_norm_ratio": ratio,
                    "inf_norm_5x_lower": ratio >= 5, "vanilla_degradation": dv, "degradation": dr,
                    "degradation_one_fifth": deg_ok})
    return out


def _fmt(s: dict[str, Any], digits: int = 4) -> str:
    if s.get("mean") is None:
        return "n/a"
    txt = f"{s['mean']:.{digits}g}"
    if s.get("n", 0) > 1:
        txt += f" ± {s['std']:.2g}"
    return txt


def markdown(rows: list[dict[str, Any]], checks: list[dict[str, Any]], meta: dict[str, Any],
             plots: list[str], released: list[str] | None = None) -> str:
    """report.md: the released checkpoints' section when given, then how this preset's runs were made, their table
    (ours, then the paper's), the acceptance checks, the plots."""
    lines = [f"# outlierfree reproduce: preset `{meta['preset']}`", "", *(released or []),
             *(["## This invocation's runs", ""] if released else []),
             f"- command: `{meta['command']}`", f"- commit: `{meta['commit']}`",
             f"- machine of this report: {meta['machine']}", *_where_runs_ran(meta),
             f"- wall time of this invocation: {meta['wall_s']:.0f} s "
             f"(runs' own times: {meta['runs_s']:.0f} s in total)",
             "- data: offline Wikipedia leads (validation split held out by document) for BERT / OPT, "
             "Fashion-MNIST for ViT; FP and W8A8 on the same validation batches",
             "- FP: perplexity (BERT: masked positions only; OPT: next token) or top-1 % (ViT). W8A8 (paper set): "
             "the tensors the paper's reference code quantizes (docs/quantization.md), weights per-tensor symmetric "
             "min-max, activations per-tensor asymmetric, static, running min-max over the calibration batches. "
             "W8A8 real (ORT): the same calibrated model exported to static QDQ ONNX and run in integers by ONNX "
             "Runtime on the same batches (n/a without the deploy extra). W8A8 (linear only): only linear layers' "
             "inputs and weights, as common libraries do.",
             *_stale_note(meta),
             "- max inf-norm, avg kurtosis: over the LayerNorm inputs (residual sums) of the validation batches, "
             "as defined in docs/metrics.md. Mean ± standard deviation over seeds.", "",
             "| family | variant | seeds | FP | max inf-norm | avg kurtosis | W8A8 (paper set) | W8A8 real (ORT) | "
             "W8A8 (linear only) | W8A8 degradation | paper FP / inf-norm / kurtosis / W8A8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["paper"]
        paper = " / ".join(str(p.get(k, "–")) for k in ("fp", "max_inf_norm", "avg_kurtosis", "w8a8")) if p else "–"
        unit = " %" if r["metric"] == "top1" else ""
        lines.append(f"| {r['family']} | {r['variant']} | {len(r['seeds'])} | {_fmt(r['fp'])}{unit} {r['metric']} | "
                     f"{_fmt(r['max_inf_norm'])} | {_fmt(r['avg_kurtosis'])} | {_fmt(r['w8a8'])} | "
                     f"{_fmt(r['w8a8_ort'])} | {_fmt(r['w8a8_linear'])} | {_fmt(r['w8a8_degradation'], 3)} | {paper} |")
    if meta.get("missing"):
        lines += ["", "Not in this table (unfinished when the report was written): " +
                  "; ".join(f"{k} ({v})" for k, v in meta["missing"].items()) + "."]
    if checks:
        lines += ["", "## Against vanilla (the paper's effect)", "",
                  "| family | variant | FP no worse | max inf-norm ratio (vanilla / this) | >= 5x lower | "
                  "W8A8 degradation (vanilla -> this) | <= 1/5 of vanilla's |", "|---|---|---|---|---|---|---|"]
        for c in checks:
            dv = "n/a" if c["vanilla_degradation"] is None else f"{c['vanilla_degradation']:.3g}"
            dr = "n/a" if c["degradation"] is None else f"{c['degradation']:.3g}"
            lines.append(f"| {c['family']} | {c['variant']} | {'yes' if c['fp_no_worse'] else 'no'} | "
                         f"{c['inf_norm_ratio']:.2f} | {'yes' if c['inf_norm_5x_lower'] else 'no'} | {dv} -> {dr} | "
                         f"{'yes' if c['degradation_one_fifth'] else 'no'} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _family_panels(fams: list[str], path: Path, draw: Callable[[Any, str], None]) -> bool:
    """One panel per family, drawn by ``draw(ax, family)``, saved as a PNG at ``path``."""
    if not fams:
        return False
    from ..analysis.report import plt  # lazy: matplotlib only when a plot is drawn
    from ..records import save_png

    from matplotlib.ticker import LogFormatterSciNotation

    class Plain(LogFormatterSciNotation):
        """Matplotlib's choice of which log ticks to label, written as plain numbers (40, 0.74; not 4 x 10^1)."""

        def __call__(self, x: float, pos: Any = None) -> str:
            return f"{x:.3g}" if super().__call__(x, pos) else ""

    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.6), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        draw(ax, fam)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(Plain())
        ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False))
        ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_per_layer(results: list[dict[str, Any]], path: Path) -> bool:
    """Per-layer max inf-norm of each variant, side by side, one panel per family (seed-averaged)."""

    def draw(ax: Any, fam: str) -> None:
        # vanilla first, so each variant has the same colour here, in the growth plot and in the analysis plots
        variants = sorted({r["variant"] for r in results if r["family"] == fam}, key=lambda v: (v != "vanilla", v))
        width = 0.8 / max(1, len(variants))
        all_layers: set[int] = set()
        for j, var in enumerate(variants):
            per: dict[int, list[float]] = {}
            for r in results:
                if r["family"] == fam and r["variant"] == var:
                    for row in r.get("per_layer_inf_norm", []):
                        per.setdefault(row["layer"], []).append(row["inf_norm"])
            layers = sorted(per)
            all_layers.update(layers)
            offset = (j - (len(variants) - 1) / 2) * width  # the group of bars centred on its layer
            ax.bar([l + offset for l in layers], [statistics.fmean(per[l]) for l in layers], width, label=var)
        integer_ticks(ax.xaxis, all_layers)
        ax.set_title(f"{fam}: max inf-norm of LayerNorm inputs")
        ax.set_xlabel("layer")

    return _family_panels(sorted({r["family"] for r in results}), path, draw)


def plot_growth(results: list[dict[str, Any]], path: Path) -> bool:
    """Max inf-norm over training steps (train --track-outliers), one panel per family, one line per run."""

    def draw(ax: Any, fam: str) -> None:
        runs = sorted((r for r in results if r["family"] == fam), key=lambda r: (r["variant"] != "vanilla",
                                                                                r["variant"], r["seed"]))
        for r in runs:  # vanilla first: the same colour per variant as the per-layer plot
            pts = [(t["step"], t.get("max_inf_norm")) for t in r.get("track", [])
                   if t.get("event") == "outliers" and t.get("max_inf_norm") is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=f"{r['variant']} s{r['seed']}")
        integer_ticks(ax.xaxis)
        ax.set_title(f"{fam}: outlier growth")
        ax.set_xlabel("training step")
        ax.set_ylabel("max inf-norm")

    fams = sorted({r["family"] for r in results if any(t.get("event") == "outliers" for t in r.get("track", []))})
    return _family_panels(fams, path, draw)


def _stale_note(meta: dict[str, Any]) -> list[str]:
    """A line naming the runs whose W8A8 was simulated with the old ``full`` site set (their models were not at
    hand to simulate again), so their numbers are not read as the paper's set."""
    old = meta.get("old_site_set") or []
    return [f"- **W8A8 of {len(old)} run(s) used the old `full` site set** (every activation, harsher than the "
            f"paper's in places, softer in others): {', '.join(old)}. Rerun with their models present to update."] \
        if old else []


def _where_runs_ran(meta: dict[str, Any]) -> list[str]:
    """Lines naming the machines and commits the runs themselves were made on, where they differ from this
    report's (runs trained elsewhere, e.g. on a GPU machine, and reported here)."""
    lines = []
    for key, own, what in (("run_machines", "machine", "runs trained on"),
                           ("run_commits", "commit", "runs' commits")):
        seen = meta.get(key) or {}
        if seen and list(seen) != [meta.get(own)]:
            lines.append(f"- {what}: " + "; ".join(f"{k} ({n} run{'s' * (n > 1)})" for k, n in seen.items()))
    return lines


def effect_sentence(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    """One sentence saying what the released checkpoints show, computed from their numbers (never assumed): for
    each family, vanilla's W8A8 degradation and max inf-norm against each fix's, and whether the paper's effect (a
    degradation at least 5x smaller than vanilla's) holds."""
    parts = []
    by = {(r["family"], r["variant"]): r for r in rows}
    for family in dict.fromkeys(c["family"] for c in checks):  # one clause per family, vanilla named once
        mine = [c for c in checks if c["family"] == family and c["vanilla_degradation"] is not None
                and c["degradation"] is not None]
        if not mine:
            continue
        v, dv = by[(family, "vanilla")], mine[0]["vanilla_degradation"]
        unit = " points of top-1" if v["metric"] == "top1" else " perplexity"
        fixes = []
        for c in mine:
            dr = c["degradation"]
            times = f"{dv / dr:.0f}x less" if dr > 0 else "nothing"
            inf = _fmt(by[(family, c["variant"])]["max_inf_norm"], 3)
            fixes.append(f"{c['variant']} {dr:+.3g} ({times}; max inf-norm {inf})")
        good = [c["variant"] for c in mine if c["degradation_one_fifth"]]
        bad = [c["variant"] for c in mine if not c["degradation_one_fifth"]]
        verdict = ", and ".join(x for x in (
            f"{_and(good)} remove{'s' if len(good) == 1 else ''} the outliers that break 8 bits" if good else "",
            f"{_and(bad)} do{'es' if len(bad) == 1 else ''} not" if bad else "") if x)
        parts.append(f"per-tensor W8A8 costs {family} vanilla {dv:+.3g}{unit} (max inf-norm "
                     f"{_fmt(v['max_inf_norm'], 3)}), {_and(fixes)}: {verdict}")
    return ("On the released checkpoints, " + "; ".join(parts) + ".") if parts else \
        "The released checkpoints hold no vanilla and fix pair to compare."


def _and(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _table_order(r: dict[str, Any]) -> tuple:
    """Family, then vanilla first, then the fixes by name, then seed: the order of the report's tables."""
    return r["family"], r["variant"] != "vanilla", r["variant"], r["seed"]


def provenance_line(r: dict[str, Any]) -> str:
    """One markdown bullet: a release's name, its recipe and training time, and its card's note on where and how it
    was trained (one line per release, not the notes run together)."""
    rel = r.get("released", {})
    t = rel.get("train_seconds")
    recipe = [f"{rel['preset']} preset"] if rel.get("preset") else []
    recipe += [f"{t / 3600:.1f} h of training"] if t else []
    note = " ".join(str(rel.get("note") or "no note in its card").split()).rstrip(".")  # one line, whatever it held
    return f"- `{rel.get('name', r['name'])}`" + (f" ({', '.join(recipe)})" if recipe else "") + \
        f": {note[:1].upper() + note[1:]}."


def released_section(results: list[dict[str, Any]], out: Path) -> tuple[list[str], dict[str, Any]]:
    """The report's opening section on the released checkpoints (markdown lines) and its JSON: the table, the
    checks against vanilla, the plots (per-layer inf-norm, outlier growth while they trained, vanilla's no-op head
    next to the same head in the others)."""
    rows = table(results)
    checks = criteria(rows)
    plots = []
    if plot_per_layer(results, out / "released_per_layer_inf_norm.png"):
        plots.append("released_per_layer_inf_norm.png")
    if plot_growth(results, out / "released_outlier_growth.png"):
        plots.append("released_outlier_growth.png")
    plots += _noop_plots(results, out, prefix="released-analysis")
    lines = ["## The paper's effect on released checkpoints", "", effect_sentence(rows, checks), "",
             "| checkpoint | FP | W8A8 (paper set) | W8A8 real (ORT) | W8A8 degradation | max inf-norm | "
             "avg kurtosis | no-op heads | trained |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=_table_order):
        rel = r.get("released", {})
        deg = degradation(r["metric"], r.get("fp"), r.get("w8a8"))
        t = rel.get("train_seconds")
        trained = f"{rel.get('preset')} preset, {t / 3600:.1f} h of training" if t else f"{rel.get('preset')} preset"
        lines.append(f"| {rel.get('name', r['name'])} | {_fmt({'mean': r.get('fp')})} {r['metric']} | "
                     f"{_fmt({'mean': r.get('w8a8')})} | {_fmt({'mean': r.get('w8a8_ort')})} | "
                     f"{_fmt({'mean': deg}, 3)} | {_fmt({'mean': r.get('max_inf_norm')}, 3)} | "
                     f"{_fmt({'mean': r.get('avg_kurtosis')}, 3)} | {r.get('noop_heads')} | {trained} |")
    lines += ["", "How: each checkpoint (package `outlierfree/released/`; its `README.md` is the card) analysed and "
              "quantized just now, by this command, exactly as its own reproduce run was: its validation split, "
              "the paper's W8A8 site set calibrated on its training split, ONNX Runtime's integers on the same "
              "batches. Where and how each was trained, as its card says:", ""]
    lines += [provenance_line(r) for r in sorted(results, key=_table_order)] + [""]
    if checks:
        lines += ["| family | fix | max inf-norm ratio (vanilla / fix) | W8A8 degradation (vanilla -> fix) | "
                  "<= 1/5 of vanilla's |", "|---|---|---|---|---|"]
        for c in checks:
            dv = "n/a" if c["vanilla_degradation"] is None else f"{c['vanilla_degradation']:.3g}"
            dr = "n/a" if c["degradation"] is None else f"{c['degradation']:.3g}"
            lines.append(f"| {c['family']} | {c['variant']} | {c['inf_norm_ratio']:.2f} | {dv} -> {dr} | "
                         f"{'yes' if c['degradation_one_fifth'] else 'no'} |")
        lines.append("")
    lines += [f"![{p}]({p})" for p in plots] + [""]
    return lines, {"table": rows, "criteria": checks, "headline": effect_sentence(rows, checks), "plots": plots,
                   "runs": results}


def write(results: list[dict[str, Any]], out: Path, meta: dict[str, Any],
          released: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write report.md, results.json and the plots into ``out``; returns their paths (``plots``: the plots' paths
    relative to ``out``). ``released``: the released checkpoints' results
    (:func:`outlierfree.reproduce.release.evaluate_releases`), shown first."""
    rows = table(results)
    checks = criteria(rows)
    rel_lines, rel_json = released_section(released, out) if released else (None, None)
    plots = []
    if plot_per_layer(results, out / "per_layer_inf_norm.png"):
        plots.append("per_layer_inf_norm.png")
    if plot_growth(results, out / "outlier_growth.png"):
        plots.append("outlier_growth.png")
    noop = _noop_plots(results, out)
    plots += noop
    meta = {**meta, "machine": meta.get("machine") or machine(),
            "run_machines": dict(Counter(r.get("how", {}).get("machine") or "not recorded" for r in results)),
            "run_commits": dict(Counter(r.get("how", {}).get("commit") or "not recorded" for r in results)),
            "runs_s": sum(float(r.get("seconds") or 0) for r in results),
            "old_site_set": sorted(r["name"] for r in results
                                   if (r.get("how", {}).get("quant", {}).get("w8a8") or {}).get("sites") != "paper")}
    write_json(out / "results.json", {"meta": meta, "released": rel_json, "table": rows, "criteria": checks,
                                      "runs": results})
    md = write_text(out / "report.md", markdown(rows, checks, meta, plots, rel_lines))  # atomic, per process
    return {"markdown": md, "json": out / "results.json", "plots": plots}


def _noop_plots(results: list[dict[str, Any]], out: Path, prefix: str = "analysis") -> list[str]:
    """Per family (first seed): the analysis report's side-by-side plots, including the attention map of
    vanilla's strongest no-op head next to the same layer and head in the other variants."""
    from ..analysis import write_report
    from ..records import read_json

    made = []
    for fam in sorted({r["family"] for r in results}):
        # vanilla first: the no-op plot shows vanilla's strongest no-op head and the same head in the others
        runs = sorted((r for r in results if r["family"] == fam),
                      key=lambda r: (r["seed"], r["variant"] != "vanilla", r["variant"]))
        if not runs:
            continue
        seed = runs[0]["seed"]
        reports = []
        for r in runs:
            if r["seed"] != seed:
                continue
            how = r["how"]
            p = Path(how["run_dir"] if how.get("run_dir") else Path(how["model_dir"]).parent.parent) / "analysis.json"
            if p.exists():
                rep = read_json(p)
                rep["name"] = r["variant"]
                reports.append(rep)
        if reports:
            d = out / f"{prefix}-{fam}"
            write_report(reports, d, None, f"outlierfree reproduce ({fam}, seed {seed})")
            for png in sorted(d.glob("*.png")):
                made.append(f"{prefix}-{fam}/{png.name}")
    return made
