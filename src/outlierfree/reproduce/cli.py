"""The ``outlierfree reproduce`` and ``outlierfree release`` commands: flags -> request -> library call -> print."""

from __future__ import annotations

from typing import Any

import click

from .presets import FAMILIES, PRESETS, VARIANT_NAMES


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
def reproduce_cmd(quiet: bool, **flags: Any) -> None:
    """Train vanilla, clipped and gated models, measure their outliers, quantize them (paper's W8A8 and
    linear-only), and write the paper's table (report.md, results.json, plots) into --out.

    Rerunning the same command skips finished runs and resumes killed ones from their checkpoints. Several
    processes may share one --out (e.g. one per core): each locks the run it works on and skips the runs that
    another process holds, so no run is trained twice.

        outlierfree reproduce --preset quick

        outlierfree reproduce --preset cpu --out runs/cpu --seeds 0,1

        outlierfree reproduce --preset cpu --out runs/cpu --seeds 0,1 --report-only
    """
    from ..cli import command_line
    from .run import ReproduceRequest, reproduce

    request = ReproduceRequest(progress=not quiet, **flags)  # every flag checked before any training
    result = reproduce(request, echo=click.echo)
    result.command = command_line()
    files = result.write(request.out)
    click.echo(f"wrote {files[0]} and {files[1]}")


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
    from .release import ReleaseRequest, make_release

    result = make_release(ReleaseRequest(run_dir, out, dtype=dtype, note=note), echo=click.echo)
    for line in result.lines():
        click.echo(line)
