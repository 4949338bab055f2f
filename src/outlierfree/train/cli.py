"""``outlierfree train``: the command-line face of :func:`outlierfree.train.train`: flags -> :class:`TrainConfig`
(the request, validated once by the library call) -> ``train`` -> :class:`TrainResult` -> its lines printed.

Every flag is a :class:`TrainConfig` field. ``--config FILE`` (YAML/JSON) sets any of them; flags given on the
command line override the file. Flags left out keep the file's value or the dataclass default.
"""

from __future__ import annotations

from typing import Any

import click

from ..cli import attention_flag_names, attention_from_flags, attention_options
from .config import PRECISIONS, SCHEDULES, TASKS, TrainConfig, parse_set

_D = TrainConfig()


def _h(text: str, name: str | None = None) -> str:
    """Help text with the dataclass default."""
    if name is None:
        return text
    return f"{text} [default: {getattr(_D, name)}]"


@click.command("train", context_settings={"show_default": False})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML/JSON file with any of these settings (flags given here override it)")
@click.option("--task", default=None, help=_h(f"{'|'.join(TASKS)}", "task"))
@click.option("--family", default=None, help="bert|opt|vit [default: bert for mlm, opt for clm, vit for image]")
@click.option("--size", default=None, help=_h("model size (see `outlierfree models`)", "size"))
@attention_options
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
              help="override a Hugging Face config field, e.g. --set hidden_dropout_prob=0 (repeatable)")
@click.option("--hidden-dropout", type=float, default=None, help="dropout on hidden states [default: the size's]")
@click.option("--attention-dropout", type=float, default=None, help="dropout on attention probabilities")
@click.option("--data", default=None, help="text: file, folder of .txt, glob, saved dataset dir, hf:NAME[:CONFIG]; "
                                            "image: folder of class subfolders or of idx files [default: offline "
                                            "Wikipedia leads / Fashion-MNIST]")
@click.option("--text-column", default=None, help=_h("text column of a dataset", "text_column"))
@click.option("--hf-split", default=None, help=_h("split of a Hugging Face dataset", "hf_split"))
@click.option("--val-fraction", type=float, default=None, help="documents (images) held out for validation "
                                                                "[default: 0.02 text, 0.1 image folders]")
@click.option("--tokenizer", default=None, help="existing tokenizer directory [default: train one on the data]")
@click.option("--vocab-size", type=int, default=None, help=_h("vocabulary of a trained tokenizer", "vocab_size"))
@click.option("--seq-len", type=int, default=None, help=_h("tokens per sequence", "seq_len"))
@click.option("--mlm-probability", type=float, default=None, help=_h("masked fraction", "mlm_probability"))
@click.option("--steps", type=int, default=None, help="optimizer steps [default: 100 mlm, 100 clm, 500 image]")
@click.option("--batch-size", type=int, default=None, help="global batch per step, all processes together [default: 32 mlm, 16 clm, 64 image]")
@click.option("--grad-accum", type=int, default=None, help=_h("gradient accumulation steps", "grad_accum"))
@click.option("--lr", type=float, default=None, help=_h("peak learning rate (AdamW)", "lr"))
@click.option("--warmup-steps", type=int, default=None, help="linear warm-up steps [default: 10% of --steps]")
@click.option("--schedule", default=None, help=_h(f"after warm-up: {'|'.join(SCHEDULES)}", "schedule"))
@click.option("--min-lr-ratio", type=float, default=None, help=_h("final lr / peak lr", "min_lr_ratio"))
@click.option("--weight-decay", type=float, default=None, help=_h("AdamW weight decay", "weight_decay"))
@click.option("--decay-norm/--no-decay-norm", default=None,
              help="also decay LayerNorm weights (reference OPT script) [default: no, as the BERT script]")
@click.option("--adam-beta1", type=float, default=None, help=_h("", "adam_beta1"))
@click.option("--adam-beta2", type=float, default=None, help=_h("", "adam_beta2"))
@click.option("--adam-eps", type=float, default=None, help=_h("", "adam_eps"))
@click.option("--grad-clip", type=float, default=None, help=_h("max gradient norm, 0 = off", "grad_clip"))
@click.option("--gamma-ramp-steps", type=int, default=None,
              help="clipped/ncs: gamma grows linearly from 0 to its target over these steps [default: 0 = off]")
@click.option("--optimizer", default=None, help="adamw, or muon (OSP: Muon on the hidden matrices, AdamW on the rest) "
                                                "[default: adamw]")
@click.option("--norm", default=None, help="layernorm, or single-scale (OSP: one learned scalar gain per norm) "
                                           "[default: layernorm]")
@click.option("--embed-proj/--no-embed-proj", default=None,
              help="OSP: a learned projection after the input embedding [default: off]")
@click.option("--precision", default=None, help=_h(f"{'|'.join(PRECISIONS)} (auto: bf16/fp16 on GPU, fp32 on CPU)",
                                                   "precision"))
@click.option("--seed", type=int, default=None, help=_h("seed for weights, data order, masking, dropout", "seed"))
@click.option("--out", default=None, help=_h("run directory", "out"))
@click.option("--log-every", type=int, default=None, help=_h("steps between train log lines", "log_every"))
@click.option("--eval-every", type=int, default=None, help=_h("steps between validations, 0 = end only",
                                                              "eval_every"))
@click.option("--val-size", type=int, default=None, help="validation sequences (images) [default: 256 (2000)]")
@click.option("--save-every", type=int, default=None, help=_h("steps between checkpoints, 0 = end only",
                                                              "save_every"))
@click.option("--resume/--no-resume", default=None, help="continue from OUT/checkpoint")
@click.option("--track-outliers", type=int, default=None, metavar="K",
              help="log outlier metrics on a fixed validation batch every K steps [default: off]")
@click.option("--progress/--no-progress", default=None, help="show the progress bar [default: on]")
@click.option("--print-config", is_flag=True, default=False, help="print the resolved config as YAML and exit")
def train_cmd(config_file: str | None, set_items: tuple[str, ...], print_config: bool, **kw: Any) -> None:
    """Pre-train BERT (masked LM), OPT (causal LM) or ViT (images) with any attention variant.

    \b
    Examples:
      outlierfree train --task mlm                                 # tiny BERT on the offline Wikipedia leads
      outlierfree train --task clm --attention gated --out runs/opt-gated
      outlierfree train --task image --attention clipped --gamma -0.003 --out runs/vit-clipped
      outlierfree train --config run.yaml --resume
      accelerate launch --multi_gpu --num_processes 2 -m outlierfree train --task mlm --out runs/ddp
    """
    ctx = click.get_current_context()
    cfg = build_config(ctx, config_file, set_items, kw)
    if print_config:
        import yaml

        click.echo(yaml.safe_dump(cfg.resolved().to_dict(), sort_keys=False))
        return
    from ..analysis.tracking import headline_metrics  # the command layer composes analysis into training
    from .loop import train

    for line in train(cfg, outlier_metrics=headline_metrics).lines():
        click.echo(line)


def build_config(ctx: click.Context, config_file: str | None, set_items: tuple[str, ...],
                 kw: dict[str, Any]) -> TrainConfig:
    """File settings, then the flags given on the command line, into a :class:`TrainConfig`."""
    from click.core import ParameterSource

    cfg = TrainConfig.from_file(config_file) if config_file else TrainConfig()
    given = {k for k in kw if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    names = attention_flag_names()
    attention_given = bool(given & set(names))
    att_kw = {k: kw.pop(k) for k in names if k in kw}
    changes: dict[str, Any] = {k: v for k, v in kw.items() if k in given and v is not None}
    if attention_given:  # the flags describe the whole variant; unset parameters take their defaults
        changes["attention"] = attention_from_flags(att_kw).to_dict()
    if set_items:
        changes["hf_config"] = {**cfg.hf_config, **parse_set(set_items)}
    return cfg.replace(**changes)
