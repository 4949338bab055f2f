"""``outlierfree analyze``: where the outliers of one or more models live, as report.json, report.md and PNG plots."""

from __future__ import annotations

import gc
import shlex
from pathlib import Path

import click

from ..errors import require
from ..sites import parse_kinds as _parse_kinds
from .analyze import DEFAULT_KINDS, DEFAULT_NOOP_THRESHOLD
from .metrics import DEFAULT_ABS_THRESHOLD, DEFAULT_REL_THRESHOLD


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--sites`` value: comma-separated site kinds, or ``all`` (the one validation of :mod:`outlierfree.sites`)."""
    return _parse_kinds(text, "--sites")


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
@click.option("--out", "out", default="out/analysis", show_default=True, help="output directory (replaced)")
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
def analyze_cmd(models: tuple[str, ...], data: str | None, batches: int | None, max_sequences: int | None,
                batch_size: int, seq_len: int, seed: int,
                out: str, tokenizer: str | None, sites: str, no_attention: bool, threshold: float,
                rel_threshold: float, noop_threshold: float, packing: str, track: tuple[str, ...]) -> None:
    """Measure activation outliers of MODEL(s): a model directory (ours or any Hugging Face checkpoint) or a
    .gguf file. Several models are compared side by side. Writes report.json, report.md and PNG plots to --out."""
    from .inputs import check_amounts
    from .report import check_out_dir, write_report
    from .tracking import find_log, read_track

    require(models or track, "no model given", "pass MODEL [MODEL ...] (a model directory or .gguf) or --track RUN_DIR")
    check_amounts(batches, batch_size, seq_len, packing, max_sequences)
    require(threshold > 0 and rel_threshold > 0, "--threshold and --rel-threshold must be positive",
            "pass e.g. --threshold 6")
    require(0 < noop_threshold <= 1, f"--noop-threshold must be in (0, 1], got {noop_threshold}", "pass e.g. 0.5")
    kinds = parse_kinds(sites)
    if no_attention:
        kinds = tuple(k for k in kinds if k not in ("query", "key", "value", "attn_scores", "attn_probs", "context",
                                                    "gate"))
    out_path = Path(out)
    check_out_dir(out_path)  # before minutes of analysis, not after
    for m in models:  # fail on a bad path before spending minutes on the others
        require(Path(m).exists(), f"model path {m!r} does not exist", "pass a model directory or a .gguf file")

    from .run import analyze_path

    reports, tracks = [], {}
    for path in models:
        reports.append(analyze_path(path, data=data, batches=batches, batch_size=batch_size, seq_len=seq_len,
                                    seed=seed, max_sequences=max_sequences, tokenizer=tokenizer, kinds=kinds, attention=not no_attention,
                                    threshold=threshold, rel_threshold=rel_threshold, noop_threshold=noop_threshold,
                                    packing=packing))
        log = find_log(path) if Path(path).is_dir() else None
        if log is not None and read_track(log):
            tracks[reports[-1]["name"]] = read_track(log)
        gc.collect()  # the model is gone: free its memory before loading the next
    for run in track:
        tracks[Path(run).resolve().name] = read_track(run)
        require(tracks[Path(run).resolve().name], f"{run!r} has no outlier events in its log.jsonl",
                "train with `outlierfree train --track-outliers K`")
    command = _command_line(click.get_current_context())
    files = write_report(reports, out_path, tracks, command)
    for r in reports:
        h = r["headline"]
        click.echo(f"{r['name']}: max inf-norm {h.get('max_inf_norm', float('nan')):.4g} at "
                   f"{h.get('max_inf_norm_site')}; avg kurtosis {h.get('avg_kurtosis') or float('nan'):.4g}, max "
                   f"{h.get('max_kurtosis') or float('nan'):.4g} at {h.get('max_kurtosis_site')}; largest |x| "
                   f"{h.get('largest_activation', float('nan')):.4g} at {h.get('largest_activation_site')}; "
                   f"no-op heads {r['noop'].get('flagged', 0)} of {r['noop'].get('heads', 0)}")
    click.echo(f"wrote {files['json']}, {files['markdown']} and {len(files) - 2} plots")


def _command_line(ctx: click.Context) -> str:
    """The command as a user would retype it: the models and every option that differs from its default."""
    parts = ["outlierfree", "analyze"]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if isinstance(p, click.Argument):
            parts += [shlex.quote(str(x)) for x in v or ()]
        elif p.multiple:
            for x in v or ():
                parts += [p.opts[0], shlex.quote(str(x))]
        elif p.is_flag:
            parts += [p.opts[0]] if v else []
        elif v != p.default:
            parts += [p.opts[0], shlex.quote(str(v))]
    return " ".join(parts)
