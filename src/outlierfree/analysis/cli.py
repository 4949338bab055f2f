"""``outlierfree analyze``: where the outliers of one or more models live, as report.json, report.md and PNG plots."""

from __future__ import annotations

import gc
import shlex
from pathlib import Path
from typing import Any

import click

from ..errors import OutlierfreeError, require
from ..sites import parse_kinds as _parse_kinds
from .analyze import DEFAULT_KINDS, DEFAULT_NOOP_THRESHOLD
from .metrics import DEFAULT_ABS_THRESHOLD, DEFAULT_REL_THRESHOLD


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--sites`` value: comma-separated site kinds, or ``all`` (the one validation of :mod:`outlierfree.sites`)."""
    return _parse_kinds(text, "--sites")


def is_image_model(model: Any) -> bool:
    """Whether ``model`` takes pixel values (ViT and other vision transformers)."""
    from ..data.evaluation import takes_images

    return takes_images(model)


def model_name(path: str) -> str:
    """A short name for tables and plots: the directory (or .gguf file) name, with its parent's when the name
    alone says nothing (``.../all-MiniLM/model`` -> ``all-MiniLM/model``)."""
    generic = ("model", "models", "checkpoint", "final", "best", "last", "snapshot", "train", "runs", "out")
    p = Path(path).resolve()
    parts = [p.name.removesuffix(".gguf")]
    # climb while the names say nothing: runs/bert-vanilla-s0/train/model -> bert-vanilla-s0/train/model
    while parts[0] in generic and p.parent != p and p.parent.name:
        p = p.parent
        parts.insert(0, p.name)
    return "/".join(parts)


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


def analyze_path(path: str, *, data: str | None = None, batches: int | None = None, batch_size: int = 8,
                 seq_len: int = 128, seed: int = 0, max_sequences: int | None = None, tokenizer: str | None = None, kinds: tuple[str, ...] = DEFAULT_KINDS,
                 attention: bool = True, threshold: float = DEFAULT_ABS_THRESHOLD,
                 rel_threshold: float = DEFAULT_REL_THRESHOLD, noop_threshold: float = DEFAULT_NOOP_THRESHOLD,
                 packing: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Load the model at ``path``, build its evaluation batches and analyse it: the report dict of one model.

    The batches come from the shared evaluation-data layer (:mod:`outlierfree.data.evaluation`): a model trained
    here is analysed on its own validation split, any other text given with ``data`` is used whole.
    ``batches`` None: 8 from a validation split, every sequence of a whole text (at most ``max_sequences``)."""
    from ..data.record import read_training_record
    from ..models.io import load_model, load_tokenizer
    from .analyze import analyze_model
    from .inputs import image_batches, text_batches

    model = load_model(path)
    name = model_name(path)
    record = read_training_record(path) if Path(path).is_dir() else None
    trained_on = record.data if record is not None and record.trained_here else None
    if is_image_model(model):
        evals, desc = image_batches(model, data, batches, batch_size, seed, model_path=path)
        tok = None
        data_name = data or trained_on or "fashion-mnist test"
    else:
        if tokenizer is not None:
            from ..data.text import load_tokenizer_dir

            tok = load_tokenizer_dir(tokenizer)
        else:
            tok = load_tokenizer(path)
        # transformers builds an empty tokenizer (special tokens only) when the files are missing: every word
        # would become [UNK], which is no analysis of the model
        require(len(tok) > len(set(tok.all_special_ids)) + 1, f"the tokenizer of {path!r} has only {len(tok)} "
                f"tokens (its vocabulary files are missing)", "save the tokenizer beside the model or pass --tokenizer DIR")
        evals, desc = text_batches(model, tok, data, batches, batch_size, seq_len, seed, packing,
                                   model_path=path if Path(path).is_dir() else None, max_sequences=max_sequences)
        data_name = data or trained_on or "offline wiki (validation)"
    require(sum(int(b.mask.sum()) for b in evals) > 0, "the data yields no tokens", "pass other data with --data")
    meta = {"data": {"name": data_name, **desc}, "seed": seed, "batch_size": batch_size, "seq_len": seq_len}
    try:
        report = analyze_model(model, evals, kinds=kinds, attention=attention, abs_threshold=threshold,
                               rel_threshold=rel_threshold, noop_threshold=noop_threshold, progress=progress,
                               name=name, meta=meta)
    except OutlierfreeError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # a forward that fails on this checkpoint
        # (inputs it needs, shapes, dtypes): one line, not a traceback
        raise OutlierfreeError(f"the forward pass of {path!r} failed: {str(e).splitlines()[0][:200]}",
                               "check that the model and its tokenizer/data match (or try --no-attention)") from e
    report["model"]["path"] = str(path)
    return report
