"""The card (README.md) of a cured model: method, data, steps, time, and the before/after numbers."""

from __future__ import annotations

from typing import Any

from ..quant.cli import draws_note
from ..records import git_commit, machine
from .config import FinetuneConfig


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):  # cosines and agreements: 5 decimals, so 0.99998 does not print as 1.0000
        return f"{v:.5f}" if abs(v) <= 1 else f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _rows(result: dict[str, Any]) -> list[str]:
    before, after = result.get("before"), result.get("after")
    if not before or not after:
        return ["(not measured: --no-measure)"]
    keys = [k for k in before["float"] if k != "output_sqnr_db"]
    head = "| model | " + " | ".join(f"{where} {k}" for where in ("float", "W8A8 sim", "INT8 ORT") for k in keys) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(keys))]
    for name, r in (("original", before), ("fine-tuned", after)):
        cells = [_fmt(r["float"].get(k)) for k in keys] + [_fmt(r["simulated"].get(k)) for k in keys]
        cells += [_fmt((r.get("int8") or {}).get(k)) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def card(cfg: FinetuneConfig, result: dict[str, Any]) -> str:
    """Markdown text of the card; its "Reproduce" command is :meth:`FinetuneConfig.command`, every flag of the run."""
    if result.get("attention"):  # the variant as patched (finetune.loop.retrofit_for)
        from ..attention import AttentionConfig

        att = AttentionConfig.from_dict(result["attention"]).describe()
    else:
        att = cfg.attention_config().describe() if cfg.retrofit else "unchanged"
    data = result.get("data", {})
    q = result.get("quant", {})
    lines = [
        f"# {cfg.model}, cured for W8A8 by `outlierfree finetune`", "",
        f"- method: **{cfg.method}** (attention: {att}; quantization-aware: {'yes' if cfg.qat else 'no'})",
        f"- source checkpoint: `{cfg.model}`",
        f"- data: {data.get('data') or 'offline Wikipedia corpus'} (fine-tuning: {data.get('calib_split')}; "
        f"measurement: {data.get('eval_split')}, disjoint{draws_note(data)}), "
        f"{cfg.batch_size} x {data.get('seq_len')} tokens a step",
        f"- steps: {cfg.steps}, lr {cfg.lr} (gates {cfg.gate_lr}, ranges {cfg.range_lr}), seed {cfg.seed}, "
        f"outlier penalty: {cfg.penalty}" + (f" x {cfg.penalty_weight}" if cfg.penalty != "none" else "")
        + (" (on the float forward)" if cfg.penalty_on == "float" else "")
        + (f", layer-wise distillation x {cfg.layer_weight}" if cfg.layer_weight else "")
        + (f", the task's own loss x {cfg.task_weight}" if cfg.task_weight else "")
        + (", output distilled at the masked positions only" if cfg.distill_positions == "masked" else ""),
        f"- quantization: {q.get('describe', '')}",
        f"- time: {result.get('train_seconds', 0) / 60:.1f} min of fine-tuning on {result.get('world_size', 1)} "
        f"process(es) ({machine()}), commit {git_commit()}", "",
        "## Before and after, against the ORIGINAL float model on held-out text", "",
        *_rows(result), "",
        "Encoders: token cosine, sentence-embedding cosine (mean pooling) and nearest-neighbour agreement against "
        "the original float model; language models: perplexity. `INT8 ORT`: the static QDQ export run in ONNX "
        "Runtime. The learned quantization ranges (`quant_ranges.safetensors`) are used by `outlierfree quantize`, "
        "`export` and `doctor` automatically.", "",
        *_use(cfg),
        "Reproduce (every setting that differs from its default; OUT: any new directory):", "",
        "```",
        cfg.command(out="OUT"),
        "```", "", *_python_only(cfg)]
    return "\n".join(lines)


def _use(cfg: FinetuneConfig) -> list[str]:
    """How to quantize and export the cured model on the grids its ranges were learned on (DIR: the model
    directory, OUT/model)."""
    flags = " ".join(cfg.quant_flags())
    sep = " " if flags else ""
    return ["Use it on the grids its ranges were learned on (DIR: this directory):", "", "```",
            f"outlierfree quantize DIR{sep}{flags}",
            f"outlierfree export DIR --out INT8_DIR{sep}{flags}  # add --runtime openvino for OpenVINO IR",
            "```", ""]


def _python_only(cfg: FinetuneConfig) -> list[str]:
    """A note naming the run's settings that no flag sets (it was made from Python), else nothing."""
    extra = cfg.python_only()
    if not extra:
        return []
    return ["Settings no flag sets (this run was made from Python; pass them to `FinetuneConfig`): "
            + ", ".join(f"`{k}={v!r}`" for k, v in extra.items()), ""]
