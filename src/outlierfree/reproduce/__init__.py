"""``outlierfree reproduce``: train vanilla, clipped and gated models, measure outliers, quantize, write the table.

    from outlierfree.reproduce import reproduce
    reproduce("quick", "runs/quick")
"""

from .presets import PAPER, PRESETS, Preset, RunSpec, get_preset

__all__ = ["reproduce", "PRESETS", "PAPER", "Preset", "RunSpec", "get_preset"]


def reproduce(preset: str, out: str, families=None, variants=None, seeds=None, max_steps=None, progress=True,
              command=None, echo=print, report_only=False, released=None):
    """Run (skipping finished, resuming killed runs) and write ``report.md`` / ``results.json`` / plots to ``out``.
    With ``report_only``, train nothing and report the finished runs (the others are listed with where they stand)."""
    from .cli import run_reproduce

    return run_reproduce(preset, out, families, variants, seeds, max_steps, progress, command, echo, report_only,
                         released)
