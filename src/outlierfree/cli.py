"""The ``outlierfree`` command line.

Subcommands live beside what they drive (``train/cli.py``, ``analysis/cli.py``...) and are imported lazily, so
``outlierfree --help`` stays fast and one broken optional dependency cannot take down every command. Every error a
user can cause is an :class:`OutlierfreeError` (or a click usage error) printed as one line, exit status 2.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from typing import Any, Callable

import click

from .attention.config import ALPHA_T, GATE_PER, GATE_TYPES, IMPLS, SOFTPLUS_SCALES, VARIANTS, AttentionConfig
from .errors import OutlierfreeError

# name -> "module:attribute" of a click command
LAZY_COMMANDS: dict[str, str] = {
    "models": "outlierfree.cli:models_cmd",
    "demo": "outlierfree.cli:demo_cmd",
    "train": "outlierfree.train.cli:train_cmd",
    "analyze": "outlierfree.analysis.cli:analyze_cmd",
    "quantize": "outlierfree.quant.cli:quantize_cmd",
    "doctor": "outlierfree.doctor.run:doctor_cmd",
    "export": "outlierfree.export.cli:export_cmd",
    "reproduce": "outlierfree.reproduce.cli:reproduce_cmd",
    "release": "outlierfree.reproduce.cli:release_cmd",
    "finetune": "outlierfree.finetune.cli:finetune_cmd",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n in LAZY_COMMANDS if self._load(n) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(name)
        if target is None:
            return None
        mod, attr = target.split(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ModuleNotFoundError, AttributeError) as e:
            if mod.split(".")[-2] in str(e) or mod in str(e) or attr in str(e):
                return None  # a command not built yet
            raise


# ---- the attention flags every model-building command shares ---------------------------------------------
def attention_options(f: Callable) -> Callable:
    """Decorator adding ``--attention`` and its parameters; read them back with :func:`attention_from_flags`."""
    opts = [
        click.option("--attention", "attention", default="vanilla", show_default=True,
                     help=f"attention variant: {'|'.join(VARIANTS)}"),
        click.option("--gamma", type=float, default=None, help="clipped softmax gamma (<= 0) [default: -0.025]"),
        click.option("--zeta", type=float, default=None, help="clipped softmax zeta (>= 1) [default: 1]"),
        click.option("--alpha", type=float, default=None, help="clipped softmax: gamma = -alpha / T"),
        click.option("--alpha-t", default=None, help=f"T for --alpha: {'|'.join(ALPHA_T)} [default: fixed]"),
        click.option("--max-len", type=int, default=None, help="T for --alpha-t fixed [default: model max length]"),
        click.option("--gate-type", default=None, help=f"gate network: {'|'.join(GATE_TYPES)} [default: head_linear]"),
        click.option("--gate-per", default=None, help=f"gate conditioning: {'|'.join(GATE_PER)} [default: token]"),
        click.option("--gate-init", type=float, default=None, help="initial gate probability in (0, 1) [default: 0.25]"),
        click.option("--gate-finetune", is_flag=True, default=False,
                     help="zero-init gate weights and rescale by 1/p: a patched pretrained model is unchanged"),
        click.option("--eta", type=float, default=None, help="ncs: a probability of 1 maps to eta (>= 1) "
                                                              "[default: 1.03]"),
        click.option("--beta", type=float, default=None, help="ncs: a uniform row sums to beta (0..eta) [default: 1]"),
        click.option("--sink-init", type=float, default=None, help="sink: initial per-head sink logit [default: 0]"),
        click.option("--softpick-eps", type=float, default=None, help="softpick: denominator epsilon [default: 1e-6]"),
        click.option("--softplus-scale", default=None, help=f"softplus: {'|'.join(SOFTPLUS_SCALES)} (lambda = log n / "
                                                             f"log d_head, or 1) [default: entropy]"),
        click.option("--softplus-power", type=float, default=None,
                     help="softplus: re-weighting power p >= 1 [default: off]"),
        click.option("--attention-impl", default=None, help=f"{'|'.join(IMPLS)} [default: auto]"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


ATTENTION_FLAG_NAMES = ("attention", "gamma", "zeta", "alpha", "alpha_t", "max_len", "gate_type", "gate_per",
                        "gate_init", "gate_finetune", "eta", "beta", "sink_init", "softpick_eps", "softplus_scale",
                        "softplus_power", "attention_impl")
# which variant each variant-specific flag belongs to (the AttentionConfig field names)
FLAG_VARIANTS = {**{k: ("clipped",) for k in ("gamma", "zeta", "alpha", "alpha_t", "max_len")},
                 **{k: ("gated",) for k in ("gate_type", "gate_per", "gate_init", "gate_finetune")},
                 "eta": ("ncs",), "beta": ("ncs",), "sink_init": ("sink",), "softpick_eps": ("softpick",),
                 "softplus_scale": ("softplus",), "softplus_power": ("softplus",)}
# --attention clipped without --gamma / --alpha: gamma = -1 / T with T the keys of each row, the strongest clip that
# still trains narrow models (the paper's gamma = -0.025 clips every near-uniform row of T >= 41 keys to zero)
CLIPPED_CLI_DEFAULT = {"alpha": 1.0, "alpha_t": "row"}


def attention_from_flags(kwargs: dict[str, Any]) -> AttentionConfig:
    """Pop the attention flags out of a command's kwargs and validate them into an :class:`AttentionConfig`."""
    flags = {k: kwargs.pop(k, None) for k in ATTENTION_FLAG_NAMES}
    fields = {k: flags[k] for k in ATTENTION_FLAG_NAMES if k not in ("attention", "attention_impl")}
    fields.update(variant=flags["attention"] or "vanilla", impl=flags["attention_impl"],
                  gate_finetune=flags["gate_finetune"] or None)
    variant = fields["variant"]
    given = {k for k, v in fields.items() if v is not None and k not in ("variant", "impl")}
    if variant in VARIANTS:
        stray = sorted(k for k in given if variant not in FLAG_VARIANTS[k])
        if stray:
            flag = "--" + stray[0].replace("_", "-")
            raise OutlierfreeError(f"{flag} does not apply to --attention {variant}",
                                   f"drop it, or pick the variant it belongs to ({FLAG_VARIANTS[stray[0]][0]})")
        if variant == "clipped" and not given & {"gamma", "alpha"}:
            fields.update({k: v for k, v in CLIPPED_CLI_DEFAULT.items() if fields.get(k) is None})
    return AttentionConfig(**{k: v for k, v in fields.items() if v is not None})


# ---- commands ------------------------------------------------------------------------------------------------
@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="outlierfree")
def cli() -> None:
    """outlierfree: train transformers that quantize well; find and measure activation outliers."""


@cli.command("models")
def models_cmd() -> None:
    """List model families, sizes (with parameter counts) and attention variants with their defaults."""
    from rich.console import Console
    from rich.table import Table

    from .models.build import parameter_count
    from .models.hf_compat import FAMILIES
    from .models.sizes import DESCRIPTIONS, SIZES

    console = Console()
    t = Table(title="families and sizes (vanilla attention)")
    for col in ("family", "task", "size", "parameters", "description"):
        t.add_column(col)
    for fam, sizes in SIZES.items():
        for size in sizes:
            n = parameter_count(fam, size)
            t.add_row(fam, FAMILIES[fam].task, size, f"{n / 1e6:.2f} M", DESCRIPTIONS.get(f"{fam}/{size}", ""))
    console.print(t)
    d = AttentionConfig()
    v = Table(title="attention variants (--attention)")
    for col in ("variant", "flags (default)"):
        v.add_column(col)
    v.add_row("vanilla", "softmax; same outputs as stock transformers")
    v.add_row("clipped", f"--gamma or --alpha with --alpha-t fixed|row (default: --alpha 1 --alpha-t row, gamma = "
                         f"-1/T_row; Python's AttentionConfig default gamma = {d.gamma}), --zeta ({d.zeta}); "
                         f"gamma = -alpha/T, fixed T = --max-len (default the model's max length)")
    v.add_row("gated", f"--gate-type {'|'.join(GATE_TYPES)} ({d.gate_type}), --gate-per {'|'.join(GATE_PER)} "
                       f"({d.gate_per}), --gate-init ({d.gate_init}), --gate-finetune")
    v.add_row("ncs", f"normalised clipped softmax (Liao & Monz 2024): --eta ({d.eta}) --beta ({d.beta}); per-row "
                     f"stretch, any length, causal too")
    v.add_row("softmax1", "softmax with an extra logit 0 in the denominator (no flags)")
    v.add_row("sink", f"softmax with a learned logit per head in the denominator (gpt-oss): --sink-init ({d.sink_init})")
    v.add_row("softpick", f"relu(exp(x) - 1) / sum |exp(x) - 1| (2025): --softpick-eps ({d.softpick_eps:g})")
    v.add_row("sigmoid", "sigmoid(x - log n), n = keys the row sees (Apple 2024; no flags; eager only)")
    v.add_row("softplus", f"softplus(lambda x) / l1, lambda = log n / log d_head (2025): --softplus-scale "
                          f"{'|'.join(SOFTPLUS_SCALES)} ({d.softplus_scale}), --softplus-power (off)")
    v.add_row("(all)", f"--attention-impl {'|'.join(IMPLS)} ({d.impl}); eager for all; sdpa: vanilla, gated; "
                       f"blocked: clipped, ncs")
    v.add_row("(train)", "--gamma-ramp-steps N (clipped, ncs: gamma from 0 to its target over N steps); OSP: "
                         "--optimizer adamw|muon (adamw), --norm layernorm|single-scale (layernorm), --embed-proj")
    console.print(v)


@cli.command("demo")
@click.option("--family", default="bert", show_default=True, help="bert|opt|vit")
@click.option("--size", default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@attention_options
def demo_cmd(family: str, size: str, seed: int, **kw: Any) -> None:
    """Build a small model with a variant (default: clipped softmax BERT, gamma = -1/T), run it, say what happened."""
    import time

    import torch

    from .models.build import build_model, count_parameters

    if kw.get("attention") == "vanilla" and all(kw.get(k) in (None, False) for k in ATTENTION_FLAG_NAMES[1:]):
        kw["attention"] = "clipped"
    cfg = attention_from_flags(kw)
    model = build_model(family, size, cfg, seed=seed)
    torch.manual_seed(seed)
    if family == "vit":
        c = model.config
        batch = dict(pixel_values=torch.randn(4, c.num_channels, c.image_size, c.image_size),
                     labels=torch.randint(0, c.num_labels, (4,)))
    else:
        ids = torch.randint(5, model.config.vocab_size, (4, 64))
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    t0 = time.perf_counter()
    out = model(**batch, output_attentions=True)
    out.loss.backward()
    dt = time.perf_counter() - t0
    probs = out.attentions[0]
    click.echo(f"built {family}/{size} with {cfg.describe()} attention: {count_parameters(model):,} parameters")
    click.echo(f"forward+backward on a batch of {tuple(next(iter(batch.values())).shape)}: loss {out.loss.item():.3f} "
               f"in {dt * 1000:.0f} ms")
    click.echo(f"layer-0 attention: {probs.shape[1]} heads, exact zeros {100 * (probs == 0).float().mean():.1f}% "
               f"of probabilities, row sums in [{probs.sum(-1).min():.3f}, {probs.sum(-1).max():.3f}]")


def _disk_full(e: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is a full disk: torch and safetensors wrap ENOSPC."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "file write failed" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _one_line_warnings() -> None:
    """Print outlierfree's own warnings (a config that kills attention at initialisation) as one line."""
    import warnings

    from .models.build import DeadAttentionWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        if issubclass(category, DeadAttentionWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns user errors into one line and exit status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _one_line_warnings()
    try:
        rv = cli.main(args=argv, prog_name="outlierfree", standalone_mode=False)
    except OutlierfreeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        click.echo(f"error: {e.format_message()}{hint}".replace("\n", " "), err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug, not a user error: one line unless the traceback is asked for
        if os.environ.get("OUTLIERFREE_DEBUG"):
            raise
        if _disk_full(e):  # checkpoints and reports are written atomically, so nothing half-written is left
            click.echo("error: the disk is full (no space left on the device); free some space and rerun the same "
                       "command: finished work is kept and a killed run resumes from its last checkpoint", err=True)
            sys.exit(2)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"error: internal error {type(e).__name__}: {msg} (rerun with OUTLIERFREE_DEBUG=1 for the "
                   f"traceback, and please report it)", err=True)
        sys.exit(1)
    if isinstance(rv, int) and rv:
        sys.exit(rv)


if __name__ == "__main__":
    main()
