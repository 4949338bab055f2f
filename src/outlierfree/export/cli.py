"""``outlierfree export``: calibrate as ``quantize`` does, write a deployable directory with the static QDQ INT8
model for ONNX Runtime (and OpenVINO IR with ``--runtime openvino``), tokenizer, config, ranges and a card."""

from __future__ import annotations

from typing import Any

import click

from ..quant.cli import head_and_grid_options
from ..quant.config import configs_from_flags, pop_config_flags
from .onnx import WEIGHT_DTYPES


@click.command("export")
@click.argument("model_path", metavar="MODEL")
@click.option("--bits", default="w8a8", show_default=True, help="only w8a8 has an integer runtime form")
@click.option("--sites", default="paper", show_default=True, help="paper | full | linear | matmul (see docs/quantization.md)")
@click.option("--estimator", default="running_minmax", show_default=True, help="activation range estimator")
@click.option("--weight-estimator", default="current_minmax", show_default=True, help="weight range estimator")
@click.option("--weight-granularity", type=click.Choice(["per_tensor", "per_channel"]), default="per_tensor",
              show_default=True, help="per_channel: one weight grid per output channel (the paper's setting is "
              "per_tensor)")
@head_and_grid_options
@click.option("--calib-batches", type=int, default=16, show_default=True, help="calibration batches (training split)")
@click.option("--eval-batches", type=int, default=4, show_default=True,
              help="validation batches scored in PyTorch float, the simulator and ONNX Runtime (0: no evaluation)")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seq-len", type=int, default=None, help="text sequence length [default: training's, else 128]")
@click.option("--data", default=None, help="data source, as for `outlierfree quantize`")
@click.option("--tokenizer", default=None, help="tokenizer directory [default: beside the model]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=0, show_default=True, help="runtime threads (0: all cores)")
@click.option("--runtime", type=click.Choice(["onnxruntime", "openvino"]), default="onnxruntime", show_default=True,
              help="openvino: also write OpenVINO IR (openvino_model.xml/.bin) and score it there (outlierfree[openvino])")
@click.option("--weight-dtype", type=click.Choice(WEIGHT_DTYPES), default="int8", show_default=True,
              help="uint8: the same weights stored around zero point 128, for CPUs without VNNI (AVX2 only), whose "
              "int8 kernels saturate; int8 is faster where VNNI exists")
@click.option("--out", required=True, help="new output directory (model.onnx, [openvino_model.xml], config.json, "
              "tokenizer.json, ranges.json, README.md, export.json)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def export_cmd(model_path: str, out: str, quiet: bool, **flags: Any) -> None:
    """Export MODEL as a real INT8 model: QuantizeLinear/DequantizeLinear at the simulator's sites with its
    calibrated scales and zero points, int8 weights (ONNX for ONNX Runtime; with --runtime openvino also OpenVINO
    IR), plus the float ONNX model, config, tokenizer, ranges, a card and export.json (how it was made, simulated
    vs runtime metrics, which ops run as integer kernels). Load it with outlierfree.deploy.load(DIR).

    Example:

        outlierfree export runs/bert/model --sites paper --runtime openvino --out runs/bert/int8
    """
    from ..cli import command_line
    from .run import ExportRequest, export_checkpoint

    # flags -> one typed request, every flag checked before any expensive work
    configs = configs_from_flags(**pop_config_flags(flags))
    request = ExportRequest(model_path, out, configs, progress=not quiet, **flags)
    result = export_checkpoint(request, command=command_line())
    for line in result.lines():
        click.echo(line)
