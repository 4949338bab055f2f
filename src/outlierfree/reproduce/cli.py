"""The ``outlierfree reproduce`` command."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from ..errors import OutlierfreeError, require
from ..records import check_dir_path, make_dir
from .presets import FAMILIES, PRESETS, VARIANT_NAMES, get_preset


def _csv(text: str | None, what: str, valid: tuple[str, ...] | None = None,
         singular: str | None = None) -> tuple[str, ...] | None:
    if text is None:
        return None
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    require(len(items) > 0, f"--{what} is empty", f"pass e.g. --{what} {','.join((valid or ('0',))[:2])}")
    if valid is not None:
        for x in items:
            require(x in valid, f"unknown {singular or what} {x!r}",
                    f"use some of {', '.join(valid)}")
    return items


def run_reproduce(preset: str, out: str, families: Any = None, variants: Any = None, seeds: Any = None,
                  max_steps: int | None = None, progress: bool = True, command: str | None = None,
                  echo: Callable[[str], None] = print, report_only: bool = False,
                  released: bool | None = None) -> dict[str, Path]:
    """Expand the preset, run every run (skip / resume), and write the report. Returns the report's paths.

    With ``report_only``, train nothing: write the report from the runs that have finished and list the others
    with where they stand (for a preset split across processes or sittings). ``released`` (default: the preset's
    choice, on for ``quick``): also analyse and quantize the released checkpoints, and open the report with them."""
    from . import report
    from .release import available, evaluate_releases
    from .runner import collect, git_commit, run_all

    p = get_preset(preset)
    if max_steps is not None:
        require(max_steps > 0, f"--max-steps must be positive, got {max_steps}", "pass e.g. --max-steps 100")
    specs = p.runs(families, variants, seeds, max_steps)
    out_path = Path(out)
    check_dir_path(out_path)  # a file at or above it: one line now, not after the training
    t0 = time.perf_counter()
    missing: dict[str, str] = {}
    if report_only:
        require(out_path.is_dir(), f"--out {out!r} does not exist", "pass the --out of an earlier reproduce run")
        echo(f"reproduce preset {p.name}: report of the finished runs among {len(specs)} -> {out_path}")
        results, missing = collect(specs, out_path, echo)
        require(len(results) > 0, f"none of the {len(specs)} selected runs in {out!r} has finished",
                "run the same command without --report-only first")
    else:
        make_dir(out_path)
        echo(f"reproduce preset {p.name}: {len(specs)} runs ({p.description}) -> {out_path}")
        results = run_all(specs, out_path, p.name, progress=progress, echo=echo, held=missing)
    rel_results = None
    if p.released if released is None else released:
        releases = available()
        if releases:
            rel_results = evaluate_releases(releases, out_path, progress=progress, echo=echo)
        else:
            echo("no released checkpoints in this installation (outlierfree/released/): the report has none")
    meta = {"preset": p.name, "command": command or f"outlierfree reproduce --preset {p.name} --out {out}",
            "commit": git_commit(), "wall_s": time.perf_counter() - t0, "max_steps": max_steps,
            "runs": [s.name for s in specs if s.name not in missing], "missing": missing}
    files = report.write(results, out_path, meta, released=rel_results)
    echo(f"wrote {files['markdown']} and {files['json']}")
    return files


@click.command("reproduce")
@click.option("--preset", default="quick", show_default=True, help=f"{'|'.join(PRESETS)}")
@click.option("--out", default=None, help="output directory [default: runs/reproduce-<preset>]")
@click.option("--families", default=None, help=f"comma-separated subset of {','.join(FAMILIES)}")
@click.option("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANT_NAMES)} "
                                               "(clipped_row: OPT's clipped softmax with per-row T; the zoo preset adds "
                                               "gated_elementwise, osp_<variant> and its vanilla_lr*/vanilla_wu* "
                                               "sweep)")
@click.option("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 [default: the preset's]")
@click.option("--max-steps", type=int, default=None, help="cap every run's training steps (e.g. to try `paper`)")
@click.option("--quiet", is_flag=True, help="no progress bars, only the run lines")
@click.option("--released/--no-released", default=None,
              help="also analyse and quantize the released checkpoints (outlierfree/released/) and open the report "
                   "with them [default: on for the quick preset]")
@click.option("--report-only", is_flag=True,
              help="train nothing: write the report from the selected runs that have finished, and list where "
                   "the others stand (training by pid N, checkpoint at step k, not started); safe beside processes "
                   "training into the same --out")
def reproduce_cmd(preset: str, out: str | None, families: str | None, variants: str | None, seeds: str | None,
                  max_steps: int | None, quiet: bool, released: bool | None, report_only: bool) -> None:
    """Train vanilla, clipped and gated models, measure their outliers, quantize them (paper's W8A8 and
    linear-only), and write the paper's table (report.md, results.json, plots) into --out.

    Rerunning the same command skips finished runs and resumes killed ones from their checkpoints. Several
    processes may share one --out (e.g. one per core): each locks the run it works on and skips the runs that
    another process holds, so no run is trained twice.

        outlierfree reproduce --preset quick

        outlierfree reproduce --preset cpu --out runs/cpu --seeds 0,1

        outlierfree reproduce --preset cpu --out runs/cpu --seeds 0,1 --report-only
    """
    get_preset(preset)
    fams = _csv(families, "families", FAMILIES, "family")
    vars_ = _csv(variants, "variants", get_preset(preset).variant_names, "variant")
    seed_list = None
    if seeds is not None:
        try:
            seed_list = tuple(int(s) for s in _csv(seeds, "seeds"))
        except ValueError:
            raise OutlierfreeError(f"--seeds {seeds!r} is not a list of integers", "pass e.g. --seeds 0,1") from None
    command = "outlierfree " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_reproduce(preset, out or f"runs/reproduce-{preset}", fams, vars_, seed_list, max_steps, not quiet, command,
                  click.echo, report_only, released)


@click.command("release")
@click.argument("run_dir")
@click.option("--out", required=True, help="the release directory to write (must not exist), e.g. "
                                            "src/outlierfree/released/bert-mini-vanilla")
@click.option("--dtype", default="float16", show_default=True, help="float16|float32 weights")
@click.option("--note", default=None, help="a line for the card, e.g. where and how it was trained")
def release_cmd(run_dir: str, out: str, dtype: str, note: str | None) -> None:
    """Pack a finished reproduce run as a released checkpoint: weights (float16, re-measured and refused if that
    moves its numbers), tokenizer, train_config.json, spec.json, training log with the outlier track, its
    result.json and a card (README.md). Written to a temporary directory, then renamed.

        outlierfree release runs/gpu/runs/bert-vanilla-s0 --out src/outlierfree/released/bert-mini-vanilla
    """
    from .release import make_release

    make_release(run_dir, out, dtype, note, click.echo)
