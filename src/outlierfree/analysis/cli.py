"""``outlierfree analyze``: where the outliers of one or more models live, as report.json, report.md and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .analyze import DEFAULT_KINDS, DEFAULT_NOOP_THRESHOLD
from .metrics import DEFAULT_ABS_THRESHOLD, DEFAULT_REL_THRESHOLD


def _report_dir(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--out`` is replaced as a whole: refuse a directory holding anything but a report when the flag is parsed,
    before minutes of analysis (the report writer refuses it again, for library callers)."""
    from .report import check_out_dir

    check_out_dir(Path(value))
    return value


@click.command("analyze")
@click.argument("models", nargs=-1)
@click.option("--data", default=None, help="evaluation data: text (.txt/.jsonl/.json/folder/glob/saved dataset) or "
              "images (folder of idx files or class subfolders). A model trained here on this data: its validation "
              "split; any other model: the whole text, cut into --seq-len sequences [default: the model's own "
              "validation split, else the offline corpus's; Fashion-MNIST test images for ViT]")
@click.option("--batches", type=int, default=None, help="number of evaluation batches [default: 8 from a validation "
              "split; every sequence of a whole text]")
@click.option("--max-sequences", type=int, default=None, help="read at most N sequences of a whole --data text "
              "(a model not trained on it) [default: all]")
@click.option("--batch-size", type=int, default=8, show_default=True, help="sequences (or images) per batch")
@click.option("--seq-len", type=int, default=128, show_default=True, help="tokens per sequence (text)")
@click.option("--seed", type=int, default=0, show_default=True, help="which validation sequences are drawn")
@click.option("--out", "out", default="out/analysis", show_default=True, callback=_report_dir,
              help="output directory (replaced)")
@click.option("--tokenizer", default=None, help="tokenizer directory [default: the one saved with the model]")
@click.option("--sites", "sites", default=",".join(DEFAULT_KINDS), show_default=True,
              help="site kinds to measure (comma-separated, or all)")
@click.option("--no-attention", is_flag=True, default=False,
              help="skip attention internals (no-op heads): keeps the model's own attention kernel")
@click.option("--threshold", type=float, default=DEFAULT_ABS_THRESHOLD, show_default=True,
              help="outlier dimension: max |x| at least this")
@click.option("--rel-threshold", type=float, default=DEFAULT_REL_THRESHOLD, show_default=True,
              help="relative outlier dimension: max |x| at least this times the median dimension's")
@click.option("--noop-threshold", type=float, default=DEFAULT_NOOP_THRESHOLD, show_default=True,
              help="no-op head: at least this attention mass on first/delimiter/background keys")
@click.option("--packing", default="auto", show_default=True,
              help="text: packed (as in training) | documents (one per sequence) | auto (packed for our models)")
@click.option("--track", "track", multiple=True, help="run directory whose log.jsonl outlier events to plot "
              "over steps (repeatable); a model's own log.jsonl is picked up automatically")
def analyze_cmd(out: str, **flags: Any) -> None:
    """Measure activation outliers of MODEL(s): a model directory (ours or any Hugging Face checkpoint) or a
    .gguf file. Several models are compared side by side. Writes report.json, report.md and PNG plots to --out."""
    from ..cli import command_line
    from .run import AnalyzeRequest, analyze_checkpoints

    request = AnalyzeRequest(**flags)  # every flag checked before any model is loaded
    result = analyze_checkpoints(request)
    result.command = command_line()
    files = result.write(out)
    for line in result.lines():
        click.echo(line)
    click.echo(f"wrote {files[0]}, {files[1]} and {len(files) - 2} plots")
