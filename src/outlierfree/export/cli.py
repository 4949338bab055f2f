"""``outlierfree export``: calibrate as ``quantize`` does, write a deployable directory with the static QDQ INT8
model for ONNX Runtime (and OpenVINO IR with ``--runtime openvino``), tokenizer, config, ranges and a card."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import click

from ..errors import require
from ..records import dumps


@click.command("export")
@click.argument("model_path", metavar="MODEL")
@click.option("--bits", default="w8a8", show_default=True, help="only w8a8 has an integer runtime form")
@click.option("--sites", default="paper", show_default=True, help="paper | full | linear (see docs/quantization.md)")
@click.option("--estimator", default="running_minmax", show_default=True, help="activation range estimator")
@click.option("--weight-estimator", default="current_minmax", show_default=True, help="weight range estimator")
@click.option("--weight-granularity", type=click.Choice(["per_tensor", "per_channel"]), default="per_tensor",
              show_default=True, help="per_channel: one weight grid per output channel (the paper's setting is "
              "per_tensor)")
@click.option("--fp32-head", is_flag=True, help="keep the task head (LM head / classifier) in float")
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
@click.option("--out", required=True, help="new output directory (model.onnx, [openvino_model.xml], config.json, "
              "tokenizer.json, ranges.json, README.md, export.json)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def export_cmd(model_path: str, bits: str, sites: str, estimator: str, weight_estimator: str,
               weight_granularity: str, fp32_head: bool,
               calib_batches: int, eval_batches: int, batch_size: int, seq_len: int | None, data: str | None,
               tokenizer: str | None, seed: int, threads: int, runtime: str, out: str, quiet: bool) -> None:
    """Export MODEL as a real INT8 model: QuantizeLinear/DequantizeLinear at the simulator's sites with its
    calibrated scales and zero points, int8 weights (ONNX for ONNX Runtime; with --runtime openvino also OpenVINO
    IR), plus the float ONNX model, config, tokenizer, ranges, a card and export.json (how it was made, simulated
    vs runtime metrics, which ops run as integer kernels). Load it with outlierfree.deploy.load(DIR).

    Example:

        outlierfree export runs/bert/model --sites paper --runtime openvino --out runs/bert/int8
    """
    from ..records import atomic_dir
    from ..quant.config import configs_from_flags
    from ..quant.evaluate import evaluate_pair, task_metric, model_output
    from ..quant.run import load_for_quant
    from ..quant.simulator import quantize
    from . import bundle
    from .onnx import input_names, require_onnx
    from .openvino import require_openvino
    from .ort import site_agreement
    from .realint8 import real_int8, versions

    out_path = Path(out)
    require(not out_path.exists(), f"--out {out} already exists", "pass a new directory (nothing is overwritten)")
    configs = configs_from_flags(bits=bits, sites=sites, estimator=estimator, weight_estimator=weight_estimator,
                                 weight_granularity=weight_granularity, fp32_head=fp32_head)
    require(len(configs) == 1, "export takes one --bits and one --sites", "pass e.g. --bits w8a8 --sites paper")
    cfg = configs[0]
    require(isinstance(cfg.sites, str), f"export maps the named site sets to QDQ nodes, not --sites {sites}",
            "use paper, full or linear")
    require(cfg.weight.bits == 8 and cfg.activation.bits == 8, f"--bits {bits} has no integer runtime form here",
            "pass --bits w8a8")
    require(calib_batches >= 1, "--calib-batches must be >= 1 (static ranges)", "pass --calib-batches 16")
    require(eval_batches >= 0, "--eval-batches is negative", "pass 0 or more")
    require_onnx()
    if runtime == "openvino":
        require_openvino()
    t0 = time.perf_counter()
    q = load_for_quant(model_path, tokenizer=tokenizer, calib_batches=calib_batches, eval_batches=max(eval_batches, 1),
                       batch_size=batch_size, seq_len=seq_len, seed=seed, data=data)
    model, task, batches = q.model.eval(), q.task, q.batches
    ev = batches.eval[:eval_batches]
    metric, _ = task_metric(task)
    with quantize(model, cfg, task) as qm:
        qm.calibrate(batches.calib, lambda m, b: model_output(m, b, task), progress=not quiet)
        sim = evaluate_pair(qm, ev, task, progress=not quiet) if ev else None
        with atomic_dir(out_path) as tmp:  # nothing half-written: a temporary directory, renamed when complete
            real = real_int8(qm, ev, task, batches.calib[0], out_dir=tmp, threads=threads,
                             runtimes=("onnxruntime", runtime))
            # per-site parity on one batch: each site's tensor in the runtime against the simulator's, in steps
            sites_cmp = site_agreement(qm, tmp / real["export"]["int8"], ev[0]) if ev else None
            report = {
                "model": model_path, "model_class": type(model).__name__, "task": task,
                "command": "outlierfree " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                "config": cfg.to_dict(),
                "ranges": {"source": f"calibrated on {len(batches.calib)} training batches of {batch_size} "
                                     f"(as `outlierfree quantize`)", "activation_sites": len(qm.act),
                           "aliases": len(qm.aliases), "quantized_weights": len(qm.weights)},
                "data": batches.info, "commit": _commit(), "versions": versions(),
                "metric": metric,
                "pytorch_float": sim["float"] if sim else None, "simulated": sim["quantized"] if sim else None,
                "onnxruntime_int8": real["int8"] if ev else None, "onnxruntime_float": real["float"] if ev else None,
                **{k: real[k] for k in ("export", "kernels", "agreement", "threads")}, "site_agreement": sites_cmp,
                "eval_batches": len(ev),
            }
            if "openvino" in real:
                ov = real["openvino"]
                report.update({"openvino_int8": ov["int8"] if ev else None, "openvino_float": ov["float"] if ev else None,
                               "openvino": {k: ov[k] for k in ("kernels", "agreement", "ir")}})
            c0 = batches.calib[0]  # texts are truncated to the length the ranges were calibrated at
            max_len = int(c0["input_ids"].shape[1]) if "input_ids" in c0 else None
            report["deploy"] = bundle.finish(tmp, qm, model, q.tokenizer, task, input_names(batches.calib[0]),
                                             max_len, runtime, report)
            report["seconds_total"] = time.perf_counter() - t0
            (tmp / "export.json").write_text(dumps(report) + "\n")
    k = real["kernels"]
    ov = real.get("openvino")
    if sites_cmp:
        click.echo(f"per site: {sites_cmp['within_one_step']} of {sites_cmp['compared']} compared sites within one "
                   f"quantization step of the simulator (worst {sites_cmp['max_steps']:.2f} steps; "
                   f"{sites_cmp['not_compared']} not comparable"
                   + (f"; from {sites_cmp['first_beyond_one_step']} on, differences of one step upstream are "
                      f"amplified by coarser grids" if sites_cmp["first_beyond_one_step"] else "") + ")")
    if sim:
        click.echo(f"{cfg.describe()}: {metric} float {sim['float'][metric]:.4g}, simulated "
                   f"{sim['quantized'][metric]:.4g}, ONNX Runtime INT8 {real['int8'][metric]:.4g}"
                   + (f", OpenVINO INT8 {ov['int8'][metric]:.4g}" if ov else "")
                   + f" ({len(ev)} validation batches of {batch_size})")
    click.echo(f"integer kernels: {', '.join(f'{o} x{n}' for o, n in k['integer_ops'].items()) or 'none'}; "
               f"float compute ops left: {', '.join(f'{o} x{n}' for o, n in k['float_compute_ops'].items()) or 'none'}")
    if ov:
        ints = ", ".join(f"{o} x{n}" for o, n in ov["kernels"]["integer_ops"].items()) or "none"
        flts = ", ".join(f"{o} x{n}" for o, n in ov["kernels"]["float_compute_ops"].items()) or "none"
        click.echo(f"OpenVINO integer kernels: {ints}; float compute ops left: {flts}")
    b = real["export"]["bytes"]
    click.echo(f"wrote {out_path}/model.onnx ({b['int8'] / 1e6:.2f} MB)"
               + (f", openvino_model.xml/.bin ({ov['ir']['bytes'] / 1e6:.2f} MB)" if ov else "")
               + f", model_float.onnx ({b['float'] / 1e6:.2f} MB), config.json, tokenizer, ranges.json, README.md, "
               f"export.json; run it with outlierfree.deploy.load({str(out_path)!r})")


def _commit() -> str:
    try:
        from ..records import git_commit

        return git_commit()
    except Exception:  # the commit is informative only
        return "unknown"
