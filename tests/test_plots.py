"""What the plots show a person: layers and steps are counted in integers on every plot that has such an axis, and
grouped bars sit centred on their layer. The figures are caught just before they are saved and drawn, so the test
reads the tick labels matplotlib really prints."""

import re

import pytest

from outlierfree import records
from outlierfree.analysis import report as analysis_report
from outlierfree.reproduce import report as reproduce_report

INTEGER = re.compile(r"[\u2212-]?\d+")  # matplotlib prints a minus sign as U+2212


@pytest.fixture
def figures(monkeypatch):
    """Every figure handed to records.save_png, drawn (so its tick labels exist) instead of written."""
    caught = []

    def catch(fig, path, dpi=110):
        fig.canvas.draw()
        caught.append(fig)
        return path is not None

    monkeypatch.setattr(records, "save_png", catch)
    monkeypatch.setattr(analysis_report, "save_png", catch)
    return caught


def x_labels(ax):
    return [t.get_text() for t in ax.get_xticklabels() if t.get_text()]


def run(family, variant, layers, seed=0):
    """A reproduce result with what the plots read: per-layer inf-norms and an outlier track."""
    return {"family": family, "variant": variant, "seed": seed, "name": f"{family}-{variant}-s{seed}",
            "per_layer_inf_norm": [{"layer": k, "inf_norm": 2.0 + k + len(variant)} for k in range(layers)],
            "track": [{"event": "outliers", "step": s, "max_inf_norm": 3.0 + s / 7} for s in (0, 5, 10, 15)]}


RESULTS = [run("bert", v, 4) for v in ("gated", "vanilla", "clipped")] + [run("vit", v, 2) for v in ("vanilla", "gated")]


def test_per_layer_bars_have_integer_layer_ticks_centred_on_each_group(figures, tmp_path):
    assert reproduce_report.plot_per_layer(RESULTS, tmp_path / "p.png")
    (fig,) = figures
    for ax, layers, variants in zip(fig.axes, (4, 2), (3, 2)):
        labels = x_labels(ax)
        assert labels == [str(k) for k in range(layers)], labels  # not 0.0, 0.5, ... 3.5
        ticks = list(ax.get_xticks())
        # the bars of one layer, one per variant, are centred on that layer's tick
        centres: dict[int, list[float]] = {}
        for bar in ax.patches:
            x = bar.get_x() + bar.get_width() / 2
            centres.setdefault(round(x), []).append(x)
        assert sorted(centres) == ticks
        for k, xs in centres.items():
            assert len(xs) == variants and abs(sum(xs) / len(xs) - k) < 1e-9
        # vanilla first: the same colour (C0) for vanilla here as in the growth and analysis plots
        assert ax.get_legend_handles_labels()[1][0] == "vanilla"


def test_growth_plot_has_integer_step_ticks(figures, tmp_path):
    assert reproduce_report.plot_growth(RESULTS, tmp_path / "g.png")
    for ax in figures[0].axes:
        labels = x_labels(ax)
        assert labels and all(INTEGER.fullmatch(t) for t in labels), labels


def site(layer, kind="ln_input", inf=3.0):
    return {"name": f"layer.{layer}.{kind}", "kind": kind, "layer": layer, "inf_norm_mean": inf + layer,
            "kurtosis_mean": 3.0 + layer}


def test_analysis_per_layer_and_tracks_have_integer_ticks(figures, tmp_path):
    reports = [{"sites": [site(k) for k in range(3)] + [site(k, "ffn_output") for k in range(3)],
                "headline": {"site_names": [f"layer.{k}.ln_input" for k in range(3)]}}]
    assert analysis_report.plot_per_layer(reports, ["m"], tmp_path / "l.png")
    assert analysis_report.plot_tracks({"run": [{"step": s, "max_inf_norm": 1.0 + s, "max_kurtosis": 3.0 + s}
                                                for s in (0, 3, 6, 9)]}, tmp_path / "t.png")
    per_layer, tracks = figures
    for ax in per_layer.axes:
        assert x_labels(ax) == ["0", "1", "2"]
    for ax in tracks.axes:
        labels = x_labels(ax)
        assert labels and all(INTEGER.fullmatch(t) for t in labels), labels


def test_integer_ticks_fall_back_to_integer_positions_for_many_layers(figures, tmp_path):
    assert reproduce_report.plot_per_layer([run("bert", "vanilla", 48)], tmp_path / "p.png")
    labels = x_labels(figures[0].axes[0])
    assert 2 <= len(labels) <= 24 and all(INTEGER.fullmatch(t) for t in labels), labels
