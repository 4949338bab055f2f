"""``outlierfree finetune``: the command-line face of :func:`outlierfree.finetune.finetune`: flags ->
:class:`FinetuneConfig` (the request, validated when made) -> ``finetune`` -> :class:`FinetuneResult` -> its lines."""

from __future__ import annotations

from typing import Any

import click

from ..quant.cli import head_and_grid_options
from .config import (DISTILL_POSITIONS, LAYER_TOKENS, METHODS, PENALTIES, PENALTY_ON, FinetuneConfig,
                     retrofit_attention)

_D = FinetuneConfig.__dataclass_fields__


def _d(name: str) -> Any:
    f = _D[name]
    return f.default


@click.command("finetune")
@click.argument("model", type=click.Path())
@click.option("--out", required=True, help="run directory; the cured model goes to OUT/model")
@click.option("--method", default=_d("method"), show_default=True, help="|".join(METHODS))
@click.option("--steps", type=int, default=_d("steps"), show_default=True, help="optimizer steps")
@click.option("--lr", type=float, default=_d("lr"), show_default=True, help="peak AdamW learning rate of the weights")
@click.option("--range-lr", type=float, default=_d("range_lr"), show_default=True,
              help="learning rate of the learned ranges (relative changes)")
@click.option("--gate-lr", type=float, default=_d("gate_lr"), show_default=True,
              help="learning rate of retrofitted gates")
@click.option("--data", default=None, help="text to fine-tune on (file, folder, glob); the measurement uses text after "
                                           "it [default: the model's training data, else the offline corpus]")
@click.option("--sites", default=_d("sites"), show_default=True,
              help="quantized site set: paper|full|linear|matmul, or site kinds joined by + (e.g. ln_input+residual)")
@click.option("--weight-granularity", default=_d("weight_granularity"), show_default=True,
              help="per_tensor|per_channel weight ranges (both are learned, simulated and exported to real INT8)")
@head_and_grid_options
@click.option("--attention", "attention", default="gated", show_default=True,
              help="retrofitted variant: gated|clipped|ncs")
@click.option("--gate-init", type=float, default=None, help="gated: initial gate probability [default: 0.25]")
@click.option("--alpha", type=float, default=None, help="clipped: gamma = -alpha / T [default: 1, T per row]")
@click.option("--eta", type=float, default=None, help="ncs: eta [default: 1.03]")
@click.option("--beta", type=float, default=None, help="ncs: beta [default: 1]")
@click.option("--float-weight", type=float, default=0.0, show_default=True,
              help="QAT: also distil the float forward with this weight (keeps float quality)")
@click.option("--task-weight", type=float, default=0.0, show_default=True,
              help="also train on the task's own loss (masked / next tokens, image labels) with this weight")
@click.option("--layer-weight", type=float, default=0.0, show_default=True,
              help="also distil every LayerNorm output (hidden states) of the original with this weight")
@click.option("--layer-tokens", default=_d("layer_tokens"), show_default=True,
              help=f"{'|'.join(LAYER_TOKENS)}: score the layer loss at every real token, or at all but the "
                   "special ones ([CLS], [SEP], </s>), whose hidden states carry the outliers")
@click.option("--distill-positions", default=_d("distill_positions"), show_default=True,
              help=f"{'|'.join(DISTILL_POSITIONS)}: distil the output at every real token, or (masked LMs) at the "
                   "masked positions only, the ones perplexity scores")
@click.option("--outlier-penalty", "penalty", default="none", show_default=True, help="|".join(PENALTIES))
@click.option("--penalty-weight", type=float, default=0.0, show_default=True, help="weight of the outlier penalty")
@click.option("--penalty-on", default=_d("penalty_on"), show_default=True,
              help=f"{'|'.join(PENALTY_ON)}: under QAT, penalise the fake-quantized forward's residual sums (whose "
                   "outliers the learned ranges already clip) or the float forward's (the outliers themselves)")
@click.option("--batch-size", type=int, default=_d("batch_size"), show_default=True)
@click.option("--seq-len", type=int, default=None, help="tokens per sequence [default: training's, else 128]")
@click.option("--seed", type=int, default=_d("seed"), show_default=True)
@click.option("--calib-batches", type=int, default=_d("calib_batches"), show_default=True,
              help="batches that initialise the ranges")
@click.option("--train-batches", type=int, default=_d("train_batches"), show_default=True,
              help="distinct training batches (cycled)")
@click.option("--eval-batches", type=int, default=_d("eval_batches"), show_default=True,
              help="held-out batches of the before/after measurement")
@click.option("--mask-draws", type=int, default=_d("mask_draws"), show_default=True,
              help="masked LMs: score the held-out sequences under N draws of masks, pooled")
@click.option("--warmup-steps", type=int, default=None, help="[default: 10%% of --steps]")
@click.option("--save-every", type=int, default=_d("save_every"), show_default=True, help="checkpoint every N steps")
@click.option("--resume", is_flag=True, help="continue the unfinished run in --out")
@click.option("--no-measure", is_flag=True, help="skip the before/after measurement")
@click.option("--no-real-int8", is_flag=True, help="measure in simulation only (no ONNX Runtime)")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def finetune_cmd(model: str, out: str, attention: str, gate_init: float | None, alpha: float | None,
                 eta: float | None, beta: float | None, no_measure: bool, no_real_int8: bool, no_progress: bool,
                 **kw: Any) -> None:
    """Cure a trained checkpoint so full static W8A8 matches float: retrofit gated attention / clipped softmax / NCS
    and/or quantization-aware training with learned ranges, by self-distillation from the original (no labels)."""
    from .loop import finetune

    # flags -> one typed request, every flag checked before any work
    cfg = FinetuneConfig(model=model, out=out,
                         attention=retrofit_attention(attention, gate_init=gate_init, alpha=alpha, eta=eta, beta=beta),
                         measure=not no_measure, real_int8=not no_real_int8, progress=not no_progress, **kw)
    for line in finetune(cfg).lines():
        click.echo(line)
