"""Outlier analysis: where outliers live (layer, tensor, hidden dimension, token, head) and how large they are.

    from outlierfree.analysis import analyze_model, write_report, headline_metrics
    report = analyze_model(model, batches)          # one model -> report dict (every number)
    write_report([report], "out/analysis")          # report.json, report.md, PNG plots (atomically)

Metrics are defined in docs/metrics.md.
"""

from .analyze import DEFAULT_KINDS, analyze_model
from .inputs import EvalBatch
from .tracking import headline_metrics, read_track


def write_report(*args, **kwargs):
    """Write report.json, report.md and the plots of one or more reports (see :mod:`.report`)."""
    from .report import write_report as _write  # lazy: keeps matplotlib out of training's import

    return _write(*args, **kwargs)


__all__ = ["analyze_model", "write_report", "headline_metrics", "read_track", "EvalBatch", "DEFAULT_KINDS"]
