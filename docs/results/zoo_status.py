"""The zoo recipe's outlier track so far (docs/results.md, "zoo: status"): a markdown table and a plot of max
inf-norm and kurtosis per tracked step, for the released 16,000-step vanilla and for any run directories given.

    PYTHONPATH=src python3 docs/results/zoo_status.py /work/zoo-runs/recipe/runs/bert-vanilla-s0 \\
        --plot docs/results/zoo_recipe_track.png

Reads only ``train/log.jsonl`` (the trainer's own events), so it can run beside the training process.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from outlierfree.records import read_log
from outlierfree.reproduce.report import plot_growth

RELEASED = Path(__file__).resolve().parents[2] / "src" / "outlierfree" / "released" / "bert-mini-vanilla"


def track(log: Path, label: str) -> dict[str, Any]:
    """A run as report.plot_growth reads it: its outlier and eval events, under ``label``."""
    events = read_log(log, ("outliers", "eval", "checkpoint", "train"))
    return {"family": "bert", "variant": label, "seed": 0, "track": events}


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per run, one column per tracked step (max inf-norm / max kurtosis), and the last step."""
    steps = sorted({e["step"] for r in runs for e in r["track"] if e["event"] == "outliers"})
    head = "| run | " + " | ".join(f"{s:,}" for s in steps) + " | last logged step |"
    lines = [head, "|" + "---|" * (len(steps) + 2)]
    for r in runs:
        by = {e["step"]: e for e in r["track"] if e["event"] == "outliers"}
        last = max([e["step"] for e in r["track"] if e["event"] == "train"] or [0])
        cells = [f"{by[s]['max_inf_norm']:.1f} / {by[s]['max_kurtosis']:.0f}" if s in by else "" for s in steps]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {last:,} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="*", help="reproduce run directories (each holds train/log.jsonl)")
    ap.add_argument("--plot", default=None, help="write the max inf-norm plot here (.png)")
    a = ap.parse_args()
    runs = [track(RELEASED / "log.jsonl", "vanilla, released (16,000-step schedule)")]
    for d in a.run_dirs:
        runs.append(track(Path(d) / "train" / "log.jsonl", f"{Path(d).name} (zoo run)"))
    print("max inf-norm / max kurtosis (FFN LayerNorm inputs, the trainer's --track-outliers probe)\n")
    print(table(runs))
    if a.plot:
        plot_growth(runs, Path(a.plot))
        print(f"\nwrote {a.plot}")


if __name__ == "__main__":
    main()
