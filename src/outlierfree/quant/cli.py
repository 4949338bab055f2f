"""``outlierfree quantize``: simulated full-activation quantization of a model, with diagnostics."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import OutlierfreeError, require
from .config import ESTIMATORS, SITE_PRESETS, QuantConfig, QuantSpec, parse_bits


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def build_configs(bits: str, sites: str, estimator: str, weight_estimator: str, act_granularity: str,
                  weight_granularity: str, act_symmetric: bool, weight_symmetric: bool, dynamic: bool,
                  momentum: float, percentile: float, fp32_head: bool) -> list[QuantConfig]:
    """One :class:`QuantConfig` per (bits, sites) pair of the comma-separated flags (errors are one line)."""
    from ..sites import parse_kinds

    require(estimator in ESTIMATORS, f"unknown --estimator {estimator!r}", f"use one of {', '.join(ESTIMATORS)}")
    require(weight_estimator in ESTIMATORS, f"unknown --weight-estimator {weight_estimator!r}",
            f"use one of {', '.join(ESTIMATORS)}")
    require(act_granularity in ("per_tensor", "per_token"), f"unknown --act-granularity {act_granularity!r}",
            "use per_tensor or per_token")
    require(weight_granularity in ("per_tensor", "per_channel"),
            f"unknown --weight-granularity {weight_granularity!r}", "use per_tensor or per_channel")
    bit_list = [parse_bits(b) for b in _split(bits)]
    require(bool(bit_list), "empty --bits", "pass e.g. --bits w8a8")
    site_sets: list[Any] = []
    for s in _split(sites) or ["paper"]:
        if s in SITE_PRESETS:
            site_sets.append(s)
        elif "+" not in s and s not in __import__("outlierfree.sites", fromlist=["SITE_KINDS"]).SITE_KINDS:
            raise OutlierfreeError(f"unknown --sites value {s!r}",
                                   f"use {', '.join(SITE_PRESETS)}, or site kinds joined by + (e.g. ln_input+residual)")
        else:
            site_sets.append(parse_kinds(s))
    configs = []
    for wb, ab in bit_list:
        for s in site_sets:
            w = QuantSpec(wb, weight_symmetric, weight_granularity, weight_estimator, momentum=momentum,
                          percentile=percentile)
            a = QuantSpec(ab, act_symmetric, act_granularity, estimator, static=not dynamic, momentum=momentum,
                          percentile=percentile)
            configs.append(QuantConfig(weight=w, activation=a, sites=s, fp32_head=fp32_head))
    return configs


@click.command("quantize")
@click.argument("model_path", metavar="MODEL")
@click.option("--bits", default="w8a8", show_default=True,
              help="weight and activation bits as wNaM (2..16); several comma-separated, e.g. w8a8,w16a16")
@click.option("--sites", default="paper", show_default=True,
              help="paper (the reference code's quantizers) | full (every activation and weight) | linear (linear "
                   "inputs + linear weights, as common libraries) | site kinds joined by + (e.g. ln_input+residual); "
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
@click.option("--fp32-head", is_flag=True, help="keep the task head (LM head / classifier) in float")
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
@click.option("--backend", type=click.Choice(["simulator", "onnxruntime", "openvino"]), default="simulator",
              show_default=True,
              help="onnxruntime: also export the calibrated model to static QDQ INT8 ONNX and score it in ONNX "
                   "Runtime on the same validation batches (needs outlierfree[deploy]; w8a8 static only); openvino: "
                   "also in OpenVINO (needs outlierfree[openvino])")
@click.option("--out", required=True, help="output directory (quant.json, quant.md, sites.png)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def quantize_cmd(model_path: str, bits: str, sites: str, estimator: str, weight_estimator: str,
                 act_granularity: str, weight_granularity: str, act_symmetric: bool, weight_symmetric: bool,
                 dynamic: bool, momentum: float, percentile: float, fp32_head: bool, calib_batches: int,
                 eval_batches: int | None, max_sequences: int | None, batch_size: int, seq_len: int | None,
                 diag_batches: int, ablation: bool,
                 transform: str | None, keep_16bit: int,
                 data: str | None,
                 tokenizer: str | None, seed: int, backend: str, out: str, quiet: bool) -> None:
    """Simulate full W/A quantization of MODEL (every weight and activation, including residual sums and
    LayerNorm inputs) and report float vs quantized metrics, per-site SQNR and which sites hurt most.

    Examples:

        outlierfree quantize runs/bert/model --bits w8a8 --sites full,linear --out runs/bert/quant

        outlierfree quantize MINILM_DIR --bits w8a8,w16a16 --out runs/minilm-quant
    """
    from .report import write_report
    from .run import quantize_path
    from .transforms import parse_transforms

    # validate every flag before any expensive work
    configs = build_configs(bits, sites, estimator, weight_estimator, act_granularity, weight_granularity,
                            act_symmetric, weight_symmetric, dynamic, momentum, percentile, fp32_head)
    require(calib_batches >= 1 or dynamic, f"--calib-batches {calib_batches} is too few for static ranges",
            "pass --calib-batches >= 1, or --dynamic")
    require(diag_batches >= 0, f"--diag-batches {diag_batches} is negative", "pass 0 or more")
    require(eval_batches is None or eval_batches >= 1, f"--eval-batches {eval_batches} is too few", "pass 1 or more")
    require(max_sequences is None or max_sequences >= 1, f"--max-sequences must be at least 1, got {max_sequences}",
            "pass --max-sequences 1 or more")
    transforms = parse_transforms(transform)
    out_path = Path(out)
    require(not out_path.exists() or out_path.is_dir(), f"--out {out!r} is a file", "pass a directory path")
    if backend in ("onnxruntime", "openvino"):
        from ..export.onnx import require_onnx
        from ..export.openvino import require_openvino
        from ..export.realint8 import scorer

        require_onnx()
        if backend == "openvino":
            require_openvino()
        for c in configs:
            require(c.weight.bits == 8 and c.activation.bits == 8 and not c.activation.dynamic
                    and c.activation.granularity == "per_tensor",
                    f"--backend {backend} cannot run {c.describe()} in integers",
                    "use --bits w8a8 with per-tensor static activation ranges (the defaults)")

    def echo(line: str) -> None:
        click.echo(line, err=True)

    report = quantize_path(model_path, configs, tokenizer=tokenizer, data=data, calib_batches=calib_batches,
                           eval_batches=eval_batches, batch_size=batch_size, seq_len=seq_len, seed=seed,
                           max_sequences=max_sequences, transforms=transforms, diag_batches=diag_batches,
                           ablation=ablation, keep_16bit=keep_16bit,
                           real=None if backend == "simulator" else scorer(backend), progress=not quiet,
                           echo=echo, on_run=lambda cfg, r, info: click.echo(line_of(cfg, r, info, batch_size)))
    report = {**report, "command": "outlierfree " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    write_report(report, out_path)
    click.echo(f"wrote {out_path / 'quant.json'}, {out_path / 'quant.md'}, {out_path / 'sites.png'}")


def line_of(cfg: QuantConfig, r: dict[str, Any], data_info: dict[str, Any], batch_size: int) -> str:
    """The console lines of one config's result: float vs quantized metric, and the 16-bit and ONNX Runtime
    numbers when present."""
    from .evaluate import task_metric

    metric, _ = task_metric(r["task"])
    whole = bool(data_info.get("whole_text"))
    lines = [f"{cfg.describe()}: float {metric} {r['float'].get(metric):.4g}, quantized "
             f"{r['quantized'].get(metric):.4g}, output SQNR {r['quantized'].get('output_sqnr_db', 0):.1f} dB "
             f"(calibrated on {r['calib_batches']} {'text' if whole else 'training'} batches, evaluated on "
             f"{r['eval_batches']} {'later text' if whole else 'validation'} batches of {batch_size})"]
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
