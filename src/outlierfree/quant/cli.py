"""``outlierfree quantize``: simulated full-activation quantization of a model, with diagnostics."""

from __future__ import annotations

from typing import Any

import click

from .config import ESTIMATORS, QuantConfig, configs_from_flags, pop_config_flags


def head_and_grid_options(command: Any) -> Any:
    """The flags that decide the head's and the attention's grids, shared by ``quantize`` and ``export`` (one help
    text each): --fp32-head, --int8-head, --symmetric-attention."""
    for option in reversed((
            click.option("--fp32-head", is_flag=True, help="keep the task head (LM head / classifier) in float"),
            click.option("--int8-head", is_flag=True,
                         help="quantize the task head too where the site set leaves it float (the paper set on "
                              "masked LMs): a float LM decoder is most of a small model's time and size"),
            click.option("--symmetric-attention", is_flag=True,
                         help="queries, keys and values on symmetric grids (zero point 0): OpenVINO then runs the "
                              "attention as one int8 kernel (the paper's grids are asymmetric)"))):
        command = option(command)
    return command


@click.command("quantize")
@click.argument("model_path", metavar="MODEL")
@click.option("--bits", default="w8a8", show_default=True,
              help="weight and activation bits as wNaM (2..16); several comma-separated, e.g. w8a8,w16a16")
@click.option("--sites", default="paper", show_default=True,
              help="paper (the reference code's quantizers) | full (every activation and weight) | linear (linear "
                   "inputs + linear weights, as common libraries) | matmul (linear + the attention's Q, K, V and probabilities, "
                   "as OpenVINO/NNCF) | site kinds joined by + (e.g. ln_input+residual); "
                   "several comma-separated")
@click.option("--estimator", default="running_minmax", show_default=True,
              help=f"activation range estimator: {'|'.join(ESTIMATORS)}")
@click.option("--weight-estimator", default="current_minmax", show_default=True,
              help=f"weight range estimator: {'|'.join(ESTIMATORS)}")
@click.option("--act-granularity", default="per_tensor", show_default=True, help="per_tensor | per_token (dynamic)")
@click.option("--weight-granularity", default="per_tensor", show_default=True, help="per_tensor | per_channel")
@click.option("--act-symmetric/--act-asymmetric", default=False, show_default=True)
@click.option("--weight-symmetric/--weight-asymmetric", default=True, show_default=True)
@click.option("--dynamic", is_flag=True, help="activation ranges from every tensor at run time (no calibration)")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="running_minmax momentum")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="percentile estimator's p")
@head_and_grid_options
@click.option("--calib-batches", type=int, default=16, show_default=True, help="calibration batches (training split)")
@click.option("--eval-batches", type=int, default=None, help="evaluation batches [default: 4 from the validation split; "
              "every sequence after the calibration ones of a whole --data text]")
@click.option("--max-sequences", type=int, default=None, help="read at most N sequences of a whole --data text "
              "(a model not trained on it), calibration included [default: all]")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seq-len", type=int, default=None, help="text sequence length [default: training's, else 128]")
@click.option("--diag-batches", type=int, default=2, show_default=True,
              help="evaluation batches for the ablation (0: no per-site diagnostics at all)")
@click.option("--ablation", is_flag=True,
              help="also quantize one site group at a time and rank the groups by harm (one quantized pass per "
                   "group over --diag-batches batches: minutes on a 12-layer model)")
@click.option("--transform", default=None,
              help="post-hoc transforms applied before calibration, exact in float, in the given order: "
                   "smoothquant[:ALPHA] (default alpha 0.5), rotate[:SEED] (the residual stream of pre-norm RMSNorm "
                   "decoders, and per head wherever exact), e.g. "
                   "rotate,smoothquant:0.5")
@click.option("--keep-16bit", "keep_16bit", type=int, default=0, show_default=True,
              help="keep the K site groups the ablation ranks worst in 16 bits and evaluate again (implies "
                   "--ablation)")
@click.option("--data", default=None, help="data source (as for `outlierfree train`). A model trained here on it: its "
              "training/validation split; any other model: the whole text, cut into --seq-len sequences, calibration "
              "on the first ones, evaluation on the rest [default: the model's training data, else the offline "
              "corpus / Fashion-MNIST]")
@click.option("--tokenizer", default=None, help="tokenizer directory [default: beside the model]")
@click.option("--seed", type=int, default=0, show_default=True, help="seeds the calibration sample and MLM masks")
@click.option("--mask-draws", type=int, default=1, show_default=True,
              help="masked LMs: score the evaluation sequences under N draws of masks (seeds SEED..SEED+N-1), "
                   "pooled: one draw of a small validation split moves a perplexity difference by about +-0.5")
@click.option("--backend", type=click.Choice(["simulator", "onnxruntime", "openvino"]), default="simulator",
              show_default=True,
              help="onnxruntime: also export the calibrated model to static QDQ INT8 ONNX and score it in ONNX "
                   "Runtime on the same validation batches (needs outlierfree[deploy]; w8a8 static only); openvino: "
                   "also in OpenVINO (needs outlierfree[openvino])")
@click.option("--weight-dtype", type=click.Choice(["int8", "uint8"]), default="int8", show_default=True,
              help="with --backend: how the exported weights are stored (uint8 for CPUs without VNNI, whose int8 "
                   "kernels saturate; as `outlierfree export`)")
@click.option("--reference", default=None, help="a checkpoint to compare against as well (e.g. the original a "
              "fine-tune started from): its float model runs on the same evaluation batches, and every result also "
              "reads against its float outputs")
@click.option("--out", required=True, help="output directory (quant.json, quant.md, sites.png)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def quantize_cmd(model_path: str, out: str, quiet: bool, transform: str | None, weight_dtype: str,
                 **flags: Any) -> None:
    """Simulate full W/A quantization of MODEL (every weight and activation, including residual sums and
    LayerNorm inputs) and report float vs quantized metrics, per-site SQNR and which sites hurt most.

    Examples:

        outlierfree quantize runs/bert/model --bits w8a8 --sites full,linear --out runs/bert/quant

        outlierfree quantize MINILM_DIR --bits w8a8,w16a16 --out runs/minilm-quant
    """
    from ..cli import command_line
    from .run import QuantizeRequest, quantize_checkpoint
    from .transforms import parse_transforms

    # flags -> one typed request, every flag checked before any expensive work
    configs = configs_from_flags(**pop_config_flags(flags))
    request = QuantizeRequest(model_path, configs, transforms=parse_transforms(transform), progress=not quiet,
                              **flags)
    real = None
    if request.backend != "simulator":  # the export layer scores the real runtime (quant sits below it)
        from ..export.realint8 import scorer

        real = scorer(request.backend, weight_dtype)
    result = quantize_checkpoint(request, real=real, echo=lambda line: click.echo(line, err=True),
                                 on_run=lambda cfg, r, info: click.echo(line_of(cfg, r, info, request.batch_size)))
    result.command = command_line()
    click.echo(f"wrote {', '.join(str(p) for p in result.write(out))}")


def draws_note(data_info: dict[str, Any]) -> str:
    """``": N mask draws of the same sequences"`` when a masked LM was scored under several draws of masks (data
    info's ``mask_draws``), else ``""``: appended where quantize's console line and finetune's card name the
    evaluation data."""
    k = int(data_info.get("mask_draws") or 1)
    return f": {k} mask draws of the same sequences" if k > 1 else ""


def reference_line(r: dict[str, Any], metric: str) -> str:
    """The console line of a ``--reference`` comparison: the reference's float metric and this model's float and
    quantized (and real INT8, for perplexity) metrics against it."""
    ref = r["reference"]
    if metric == "cosine":  # encoders: token and sentence-embedding cosine to the reference's outputs
        f, q = ref["float_vs_reference"], ref["quantized_vs_reference"]
        return (f"  against the reference's float outputs: token cosine float {f.get('cosine'):.5f}, quantized "
                f"{q.get('cosine'):.5f}; sentence-embedding cosine float {f.get('pooled_cosine'):.5f}, quantized "
                f"{q.get('pooled_cosine'):.5f}")
    base = ref["float"].get(metric)

    def d(v: float) -> str:  # perplexity differences to 2 decimals, accuracies (fractions) to 4
        return f"{v - base:+.2f}" if metric == "perplexity" else f"{v - base:+.4f}"

    parts = [f"float {r['float'].get(metric):.4g} ({d(r['float'].get(metric))})",
             f"quantized {r['quantized'].get(metric):.4g} ({d(r['quantized'].get(metric))})"]
    ort = (r.get("onnxruntime") or {}).get("int8") or {}
    if ort.get(metric) is not None:
        parts.append(f"ONNX Runtime INT8 {ort[metric]:.4g} ({d(ort[metric])})")
    return f"  against the reference's float {metric} {base:.4g} on the same batches: " + ", ".join(parts)


def line_of(cfg: QuantConfig, r: dict[str, Any], data_info: dict[str, Any], batch_size: int) -> str:
    """The console lines of one config's result: float vs quantized metric, and the 16-bit and ONNX Runtime
    numbers when present."""
    from .evaluate import task_metric

    metric, _ = task_metric(r["task"])
    whole = bool(data_info.get("whole_text"))
    lines = [f"{cfg.describe()}: float {metric} {r['float'].get(metric):.4g}, quantized "
             f"{r['quantized'].get(metric):.4g}, output SQNR {r['quantized'].get('output_sqnr_db', 0):.1f} dB "
             f"(calibrated on {r['calib_batches']} {'text' if whole else 'training'} batches, evaluated on "
             f"{r['eval_batches']} {'later text' if whole else 'validation'} batches of {batch_size}"
             f"{draws_note(data_info)})"]
    if "reference" in r:
        lines.append(reference_line(r, metric))
    if "keep_16bit" in r:
        k16 = r["keep_16bit"]
        lines.append(f"  with the {k16['k']} worst site group(s) in 16 bits ({', '.join(k16['groups'])}): "
                     f"{metric} {k16['quantized'].get(metric):.4g}; {100 * k16['values_16bit_share']:.1f} % of "
                     f"the activation values are no longer 8-bit")
    if "onnxruntime" in r:
        ort_r = r["onnxruntime"]
        ops = ", ".join(f"{o} x{n}" for o, n in ort_r["kernels"]["integer_ops"].items()) or "none"
        lines.append(f"  ONNX Runtime INT8 {metric} {ort_r['int8'].get(metric):.4g} (simulated "
                     f"{r['quantized'].get(metric):.4g}); integer kernels: {ops}")
    if "openvino" in r:
        ov = r["openvino"]
        ops = ", ".join(f"{o} x{n}" for o, n in ov["kernels"]["integer_ops"].items()) or "none"
        lines.append(f"  OpenVINO INT8 {metric} {ov['int8'].get(metric):.4g}; integer kernels: {ops}")
    return "\n".join(lines)
