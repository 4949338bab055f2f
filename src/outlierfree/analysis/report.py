"""Write analysis reports: report.json (every number), report.md (the findings in words and tables), PNG plots.

Several reports are drawn side by side (one line, panel or bar per model), e.g. vanilla vs clipped vs gated.
Everything is written into a temporary directory that replaces ``out_dir`` only when complete.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..errors import require  # noqa: E402
from ..records import atomic_dir  # noqa: E402
from ..records import check_dir_path, dumps, integer_ticks, save_png  # noqa: E402

KIND_STYLE = {"ln_input": "-", "ffn_output": "--", "attn_output": ":", "ln_output": "-."}
KIND_LABEL = {"ln_input": "LN input (residual sum)", "ffn_output": "FFN output", "attn_output": "attention output",
              "ln_output": "LN output"}


def write_report(reports: list[dict[str, Any]], out_dir: str | os.PathLike,
                 tracks: dict[str, list[dict[str, Any]]] | None = None,
                 command: str | None = None) -> dict[str, Path]:
    """Write report.json, report.md and the plots for ``reports`` (one per model) into ``out_dir``, atomically.

    Args:
        tracks: run name -> ``outliers`` events of its log.jsonl (plotted over steps).
        command: the command line that produced the reports (recorded in both files).
    Returns:
        name -> path of every file written (as they will be after the rename).
    """
    tracks = tracks or {}
    out = Path(out_dir)
    check_out_dir(out)
    names = _unique_names(reports)
    files: dict[str, str] = {}
    with atomic_dir(out) as tmp:
        plots = [("per_layer", plot_per_layer), ("heatmap", plot_heatmap), ("histogram", plot_histogram),
                 ("noop_head", plot_noop_head)]
        for key, fn in plots:
            if reports and fn(reports, names, tmp / f"{key}.png"):
                files[key] = f"{key}.png"
        if tracks and plot_tracks(tracks, tmp / "tracking.png"):
            files["tracking"] = "tracking.png"
        doc = {"version": 1, "command": command, "reports": reports, "tracks": tracks, "plots": files,
               "definitions": "docs/metrics.md"}
        (tmp / "report.json").write_text(dumps(doc, indent=1))  # the package's one non-finite policy (records)
        (tmp / "report.md").write_text(markdown(reports, names, tracks, files, command))
    return {k: out / v for k, v in {**files, "json": "report.json", "markdown": "report.md"}.items()}


def check_out_dir(out: Path) -> None:
    """The output directory is replaced as a whole: refuse a file, or a directory holding anything but a report."""
    check_dir_path(out)  # a file at or above it
    require(not out.exists() or not any(out.iterdir()) or (out / "report.json").is_file(),
            f"--out {str(out)!r} exists and is not an analysis report directory (it would be replaced)",
            "pass a new or empty directory, or a previous report's directory")


def _unique_names(reports: list[dict[str, Any]]) -> list[str]:
    names, seen = [], {}
    for i, r in enumerate(reports):
        path = (r.get("model") or {}).get("path")
        n = r.get("name") or (Path(str(path)).name if path else f"model {i + 1}")
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return names


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def _site_label(s: dict[str, Any]) -> str:
    """Short label: ``L3 output.LayerNorm`` (layer + the module path after the block index)."""
    mod = s["module"]
    if s["layer"] is None:
        return mod.rsplit(".", 2)[-1] if "." in mod else mod
    tail = mod.split(f".{s['layer']}.", 1)[-1] if f".{s['layer']}." in mod else mod.rsplit(".", 1)[-1]
    return f"L{s['layer']} {tail}"


# ---- plots -----------------------------------------------------------------------------------------------
def plot_per_layer(reports: list[dict[str, Any]], names: list[str], path: Path) -> bool:
    """Per layer, the largest inf-norm (mean over sequences) and kurtosis among the layer's sites of each kind
    (LayerNorm inputs: the headline sites only): one colour per model, one line style per kind."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), layout="constrained")
    drawn = False
    layers_seen: set[int] = set()
    for i, (r, name) in enumerate(zip(reports, names)):
        headline_sites = set((r.get("headline") or {}).get("site_names") or [])
        for kind, style in KIND_STYLE.items():
            ss = [s for s in r["sites"] if s["kind"] == kind and s["layer"] is not None
                  and s["inf_norm_mean"] is not None and (kind != "ln_input" or s["name"] in headline_sites)]
            if not ss:
                continue
            layers = sorted({s["layer"] for s in ss})
            layers_seen.update(layers)
            inf = [max(s["inf_norm_mean"] for s in ss if s["layer"] == k) for k in layers]
            kur = [max((s["kurtosis_mean"] or 0) for s in ss if s["layer"] == k) for k in layers]
            axes[0].plot(layers, inf, style, color=f"C{i}", marker=".", label=f"{name}: {KIND_LABEL[kind]}")
            axes[1].plot(layers, kur, style, color=f"C{i}", marker=".")
            drawn = True
    if not drawn:
        return save_png(fig, None)
    axes[0].set(title="inf-norm per sequence, mean over sequences\n(max over the layer's sites of each kind)",
                xlabel="layer", ylabel="max |x|")
    axes[1].set(title="kurtosis per sequence, mean over sequences\n(max over the layer's sites of each kind)",
                xlabel="layer", ylabel="kurtosis (Gaussian = 3)")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        integer_ticks(ax.xaxis, layers_seen)
    n = len(axes[0].get_lines())
    fig.legend(loc="outside lower center", ncol=min(4, n), fontsize=7)  # below the plots: never over a line
    return save_png(fig, path)


def plot_heatmap(reports: list[dict[str, Any]], names: list[str], path: Path) -> bool:
    """Layer x hidden-dimension heat map of max |x| at the headline sites (LayerNorm inputs), one panel per model."""
    import numpy as np

    panels = []
    for r, name in zip(reports, names):
        names_ = set((r.get("headline") or {}).get("site_names") or [])
        rows = [s for s in r["sites"] if s["name"] in names_ and s["dim"] > 0]  # one width: the residual stream
        if rows:
            panels.append((name, rows, np.array([s["dim_max"] for s in rows])))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    vmax = max(float(m.max()) for _, _, m in panels)
    for ax, (name, rows, m) in zip(axes[0], panels):
        im = ax.imshow(np.log10(np.maximum(m, 1e-3)), aspect="auto", cmap="magma", interpolation="nearest",
                       vmin=-1, vmax=math.log10(max(vmax, 1e-3)))
        step = max(1, len(rows) // 24)  # at most ~24 labels: a 72-row Gemma map stays readable
        ax.set_yticks(range(0, len(rows), step), [_site_label(s) for s in rows[::step]], fontsize=6)
        ax.set(title=f"{name}: max |x| per hidden dimension", xlabel="hidden dimension")
        fig.colorbar(im, ax=ax, label="log10 max |x|")
    return save_png(fig, path)


def plot_histogram(reports: list[dict[str, Any]], names: list[str], path: Path) -> bool:
    """Histogram of |x| (log bins) at each model's worst site (the one with the largest activation)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for i, (r, name) in enumerate(zip(reports, names)):
        site = (r.get("headline") or {}).get("largest_activation_site")
        s = next((t for t in r["sites"] if t["name"] == site), None)
        if s is None:
            continue
        h = s["log10_hist"]
        width = (h["hi"] - h["lo"]) / h["bins"]
        centres = [10 ** (h["lo"] + (k + 0.5) * width) for k in range(h["bins"])]
        ax.step(centres, [max(c, 0.5) for c in h["counts"]], where="mid", color=f"C{i}",
                label=f"{name}: {site} ({s['values']:,} values)")
        drawn = True
    if not drawn:
        return save_png(fig, None)
    ax.set(xscale="log", yscale="log", xlabel="|x|", ylabel="count", ylim=(0.7, None),
           title="magnitudes at the site of the largest activation")
    ax.axvline(6, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def noop_panels(reports: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """What the no-op plot shows: the first model's strongest no-op head, then for every other model the *same*
    layer and head where it has that site (the paper's comparison: the head vanilla uses to do nothing, and what
    the same head does in a variant), else that model's own strongest no-op head."""
    panels = []
    ref = None
    for r, n in zip(reports, names):
        nz = r.get("noop") or {}
        if not nz.get("example", {}).get("probs"):
            continue
        site, head, mass, probs = (nz["strongest"]["site"], nz["strongest"]["head"], nz["strongest"]["noop"],
                                   nz["example"]["probs"])
        how = "strongest no-op head"
        if ref is None:
            ref = (site, head)
        elif ref[0] in (nz.get("maps") or {}) and ref[1] < len(nz["maps"][ref[0]]):
            site, head = ref
            probs = nz["maps"][site][head]
            row = next((h for h in r.get("heads") or [] if h["site"] == site and h["head"] == head), None)
            mass = row["noop"] if row else float("nan")
            how = "same head as " + names[0]
        panels.append({"name": n, "site": site, "head": head, "noop": mass, "probs": probs,
                       "tokens": nz["example"]["tokens"], "how": how})
    return panels


def plot_noop_head(reports: list[dict[str, Any]], names: list[str], path: Path) -> bool:
    """Attention map (first evaluation sequence) of the first model's strongest no-op head and of the same head in
    the other models (see :func:`noop_panels`), tokens on both axes."""
    panels = noop_panels(reports, names)
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6.5), squeeze=False)
    for ax, p in zip(axes[0], panels):
        im = ax.imshow(p["probs"], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        t = len(p["tokens"])
        fs = 6 if t <= 32 else 4
        ax.set_xticks(range(t), p["tokens"], rotation=90, fontsize=fs)
        ax.set_yticks(range(t), p["tokens"], fontsize=fs)
        ax.set(xlabel="key", ylabel="query",
               title=f"{p['name']} ({p['how']}): {p['site']} head {p['head']}\nmass on no-op keys {p['noop']:.2f}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return save_png(fig, path)


def plot_tracks(tracks: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Headline metrics over training steps, one line per run."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    drawn = False
    for i, (name, ev) in enumerate(tracks.items()):
        steps = [e["step"] for e in ev]
        for ax, key in zip(axes, ("max_inf_norm", "max_kurtosis")):
            ys = [e.get(key) for e in ev]
            pts = [(s, y) for s, y in zip(steps, ys) if isinstance(y, (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker=".", color=f"C{i}", label=name)
                drawn = True
    if not drawn:
        return save_png(fig, None)
    axes[0].set(title="max inf-norm (LN inputs) during training", xlabel="step", ylabel="max |x|")
    axes[1].set(title="max kurtosis (LN inputs) during training", xlabel="step", ylabel="kurtosis")
    for ax in axes:
        integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path)


# ---- markdown --------------------------------------------------------------------------------------------
def markdown(reports: list[dict[str, Any]], names: list[str], tracks: dict[str, list[dict[str, Any]]],
             plots: dict[str, str], command: str | None) -> str:
    """report.md: headline table, then per model its sites, outlier dimensions, tokens and no-op heads."""
    L = ["# Outlier analysis", ""]
    if command:
        L += [f"Command: `{command}`", ""]
    L += ["Definitions of every metric: docs/metrics.md. Inf-norm and kurtosis are per sequence (real tokens, all "
          "hidden dimensions), averaged over sequences; the headline takes them over the block LayerNorm inputs "
          "(the residual sums).", ""]
    if reports:
        L += ["| model | variant | data | sequences | max inf-norm (site) | avg kurtosis | max kurtosis (site) | "
              "largest |x| (site) | no-op heads |", "|---|---|---|---|---|---|---|---|---|"]
        for r, n in zip(reports, names):
            h = r.get("headline") or {}
            nz = r.get("noop") or {}
            L.append(f"| {n} | {r['model']['variant']} | {(r.get('data') or {}).get('name', '-')} | {r['sequences']} | "
                     f"{_fmt(h.get('max_inf_norm'))} (`{h.get('max_inf_norm_site')}`) | {_fmt(h.get('avg_kurtosis'))} | "
                     f"{_fmt(h.get('max_kurtosis'))} (`{h.get('max_kurtosis_site')}`) | "
                     f"{_fmt(h.get('largest_activation'))} (`{h.get('largest_activation_site')}`) | "
                     f"{nz.get('flagged', 0)} of {nz.get('heads', 0)} |")
        L.append("")
    for key, title in (("per_layer", "Per-layer inf-norm and kurtosis"), ("heatmap", "Layer x hidden dimension"),
                       ("histogram", "Magnitudes at the worst site"), ("noop_head", "Strongest no-op head"),
                       ("tracking", "During training")):
        if key in plots:
            L += [f"![{title}]({plots[key]})", ""]
    for r, n in zip(reports, names):
        L += _model_section(r, n)
    for name, ev in tracks.items():
        L += [f"## Training track: {name}", "", "| step | max inf-norm | avg kurtosis | max kurtosis |", "|---|---|---|---|"]
        for e in ev:
            L.append(f"| {e['step']} | {_fmt(e.get('max_inf_norm'))} | {_fmt(e.get('avg_kurtosis'))} | "
                     f"{_fmt(e.get('max_kurtosis'))} |")
        L.append("")
    return "\n".join(L) + "\n"


def _model_section(r: dict[str, Any], name: str) -> list[str]:
    m, d = r["model"], r.get("data") or {}
    L = [f"## {name}", "",
         f"{m['class']} ({m['model_type']}), {m['parameters']:,} parameters, {m['layers']} layers, hidden size "
         f"{m['hidden_size']}, variant: {m['variant']}, loaded from `{m.get('path')}`.", ""]
    if d:
        L += [f"Data: {d.get('source')}; {d.get('tokenization')}; {r['sequences']} sequences in {r['batches']} "
              f"batches, {d.get('tokens')} tokens, seed {r.get('seed')}.", ""]
    t = r.get("timing") or {}
    L += [f"Time: {t.get('seconds')} s for the forward passes; peak RSS {t.get('peak_rss_mb')} MB (whole process).", ""]
    ref = r.get("reference_style") or {}
    if ref:
        L += ["The reference code's figures on the same statistics (max over layers of the mean per-sequence "
              f"inf-norm): FFN output {_fmt(ref.get('max_ffn_out_inf_norm'))}, LayerNorm output "
              f"{_fmt(ref.get('max_LN_out_inf_norm'))}, LayerNorm input {_fmt(ref.get('max_LN_inp_inf_norm'))}; "
              f"kurtosis over FFN and LayerNorm outputs: average {_fmt(ref.get('avg_kurtosis'))}, "
              f"max {_fmt(ref.get('max_kurtosis'))}.", ""]
    L += ["| site | kind | inf-norm mean | inf-norm max | kurtosis mean | outlier dims (>= "
          f"{_fmt(r['settings']['abs_threshold'])}) | top dims (max abs) | token holding the max |",
          "|---|---|---|---|---|---|---|---|"]
    for s in r["sites"]:
        dims = s["outlier_dims_abs"]
        dims_txt = f"{len(dims)}: {dims[:6]}" if dims else "0"
        top = ", ".join(f"{j} ({_fmt(v)})" for j, v in s["top_dims"][:3])
        tok = ", ".join(f"`{k}` x{c}" for k, c in s["argmax_tokens"][:3]) or "-"
        L.append(f"| `{s['name']}` | {s['kind']} | {_fmt(s['inf_norm_mean'])} | {_fmt(s['inf_norm_max'])} | "
                 f"{_fmt(s['kurtosis_mean'])} | {dims_txt} | {top} | {tok} |")
    L.append("")
    od = r.get("outlier_dims") or {}
    if od.get("recurring"):
        L += [f"Recurring outlier dimensions (|x| >= {_fmt(r['settings']['abs_threshold'])} at >= {od['min_sites']} "
              f"of {od['over_sites']} LayerNorm inputs): " +
              ", ".join(f"dim {x['dim']} ({x['sites']} sites, max {_fmt(x['max'])})" for x in od["recurring"][:10]),
              ""]
    else:
        L += [f"No hidden dimension reaches {_fmt(r['settings']['abs_threshold'])} at {od.get('min_sites', '-')} or "
              f"more of the {od.get('over_sites', 0)} LayerNorm inputs.", ""]
    if r.get("top_activations"):
        L += ["Largest single activations: " + "; ".join(
            f"{_fmt(a['value'])} at `{a['site']}` (sequence {a['sequence']}, position {a['position']}, token "
            f"`{a['token']}`)" for a in r["top_activations"][:5]), ""]
    heads = r.get("heads") or []
    if heads:
        sets = [k for k in ("first", "delimiter", "background") if k in heads[0]]
        L += [f"Attention heads by mass on no-op keys (flagged: mass >= {r['settings']['noop_threshold']} and at least "
              "twice the keys' share of the tokens):", "",
              "| site | head | " + " | ".join(f"mass on {k}" for k in sets) + " | no-op mass | no-op share | flagged |",
              "|---|---|" + "---|" * (len(sets) + 3)]
        for h in sorted(heads, key=lambda h: -h["noop"])[:12]:
            L.append(f"| `{h['site']}` | {h['head']} | " + " | ".join(_fmt(h[k]) for k in sets) +
                     f" | {_fmt(h['noop'])} | {_fmt(h['noop_share'])} | {'yes' if h['noop_head'] else ''} |")
        L.append("")
    return L
