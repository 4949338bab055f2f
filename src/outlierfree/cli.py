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

from .attention.config import IMPLS, AttentionConfig
from .attention import variants
from .attention.variants import all_flags, variant_class
from .errors import OutlierfreeError
from .records import check_dir_path

# name -> "module:attribute" of a click command
LAZY_COMMANDS: dict[str, str] = {
    "models": "outlierfree.cli:models_cmd",
    "demo": "outlierfree.cli:demo_cmd",
    "train": "outlierfree.train.cli:train_cmd",
    "analyze": "outlierfree.analysis.cli:analyze_cmd",
    "quantize": "outlierfree.quant.cli:quantize_cmd",
    "doctor": "outlierfree.doctor.cli:doctor_cmd",
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
        """The command ``name``, or None when its module is not in this installation. Any other import error
        (a typo, a missing dependency inside the module) propagates: it must not silently remove a command."""
        target = LAZY_COMMANDS.get(name)
        if target is None:
            return None
        mod, attr = target.split(":")
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is not None and (mod == e.name or mod.startswith(e.name + ".")):  # the command's own module (or package) is absent
                return None
            raise
        return _check_out_when_parsed(getattr(module, attr))


def _check_out_when_parsed(cmd: click.Command) -> click.Command:
    """Give the command's ``--out`` a check when it is parsed: a file in the way (``--out README.md/x``) is then a
    one-line error before any work, not after it (``records.make_dir`` refuses it again where the directory is
    made, for library callers)."""
    for param in cmd.params:
        if param.name == "out" and not getattr(param, "_out_checked", False):
            inner = param.callback

            def check(ctx: click.Context, p: click.Parameter, value: Any, inner: Callable | None = inner) -> Any:
                if value is not None:
                    check_dir_path(value)
                return inner(ctx, p, value) if inner is not None else value

            param.callback, param._out_checked = check, True
    return cmd


def command_line(ctx: click.Context | None = None) -> str:
    """The running command as a user would retype it: its arguments and every option that differs from its default
    (what reports and cards record as "command")."""
    import shlex

    ctx = ctx or click.get_current_context()
    parts = ["outlierfree", *(ctx.command_path.split()[1:] if ctx.parent else [ctx.command.name])]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if isinstance(p, click.Argument):
            parts += [shlex.quote(str(x)) for x in (v if isinstance(v, (tuple, list)) else [v]) if x is not None]
        elif getattr(p, "multiple", False):
            for x in v or ():
                parts += [p.opts[0], shlex.quote(str(x))]
        elif getattr(p, "is_flag", False) and not getattr(p, "secondary_opts", None):
            parts += [p.opts[0]] if v else []
        elif v != p.default and v is not None:
            if getattr(p, "is_flag", False):  # --x/--no-x pairs
                parts += [p.opts[0] if v else p.secondary_opts[0]]
            else:
                parts += [p.opts[0], shlex.quote(str(v))]
    return " ".join(parts)


# ---- the attention flags every model-building command shares ---------------------------------------------
def attention_flag_names() -> tuple[str, ...]:
    """The keyword names of the attention flags: ``attention``, every variant's flags, ``attention_impl``."""
    return ("attention", *(f.name for _, f in all_flags()), "attention_impl")


def attention_options(f: Callable) -> Callable:
    """Decorator adding ``--attention`` and the flags every variant declares (attention/variants/<name>.py); read
    them back with :func:`attention_from_flags`."""
    opts = [click.option("--attention", "attention", default="vanilla", show_default=True,
                         help=f"attention variant: {'|'.join(variants.REGISTRY)}")]
    for variant, flag in all_flags():
        default = flag.default if flag.default is not None else _field_default(variant, flag.name)
        if flag.type is bool:
            opts.append(click.option(flag.option, flag.name, is_flag=True, default=False, help=flag.help))
        else:
            opts.append(click.option(flag.option, flag.name, type=flag.type, default=None,
                                     help=f"{flag.help} [default: {default}]"))
    opts.append(click.option("--attention-impl", default=None, help=f"{'|'.join(IMPLS)} [default: auto]"))
    for opt in reversed(opts):
        f = opt(f)
    return f


def _field_default(variant: str, name: str) -> Any:
    return variant_class(variant).__dataclass_fields__[name].default


def attention_from_flags(kwargs: dict[str, Any]) -> AttentionConfig:
    """Pop the attention flags out of a command's kwargs and validate them into an :class:`AttentionConfig`.

    A flag left out takes the variant's default (the Python default: one default per parameter); a flag of another
    variant is a one-line error."""
    flags = {k: kwargs.pop(k, None) for k in attention_flag_names()}
    variant = flags.pop("attention") or "vanilla"
    impl = flags.pop("attention_impl") or "auto"
    given = {k: v for k, v in flags.items() if v is not None and v is not False}
    owners = {f.name: n for n, f in all_flags()}
    params = variant_class(variant).__dataclass_fields__
    stray = sorted(k for k in given if k not in params)
    if stray:
        flag = "--" + stray[0].replace("_", "-")
        raise OutlierfreeError(f"{flag} does not apply to --attention {variant}",
                               f"drop it, or pick the variant it belongs to ({owners[stray[0]]})")
    return AttentionConfig(variant, impl=impl, **given)


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
    from .hf_compat import FAMILIES
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
    v = Table(title="attention variants (--attention)")
    for col in ("variant", "computes", "flags (default)", "kernels"):
        v.add_column(col)
    for name, cls in variants.REGISTRY.items():
        flags = ", ".join(f"{f.option} ({f.default if f.default is not None else _field_default(name, f.name)})"
                          for f in cls.flags)
        v.add_row(name, cls.summary, flags or "(none)", ", ".join(cls.kernels))
    v.add_row("(all)", "", f"--attention-impl {'|'.join(IMPLS)} (auto)", "")
    ramped = ", ".join(n for n, cls in variants.REGISTRY.items() if cls.ramps)
    v.add_row("(train)", "", f"--gamma-ramp-steps N ({ramped}: gamma from 0 to its target over N steps); OSP: "
                             "--optimizer adamw|muon (adamw), --norm layernorm|single-scale (layernorm), "
                             "--embed-proj", "")
    console.print(v)


@cli.command("demo")
@click.option("--family", default="bert", show_default=True, help="bert|opt|vit")
@click.option("--size", default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@attention_options
def demo_cmd(family: str, size: str, seed: int, **kw: Any) -> None:
    """Build a small model with a variant (default: clipped softmax BERT, gamma = -1/T), run it, say what happened."""
    from .models.demo import DemoRequest, run_demo

    if kw.get("attention") == "vanilla" and all(kw.get(k) in (None, False) for k in attention_flag_names()[1:]):
        kw["attention"] = "clipped"  # no attention flag given: the demo shows clipped softmax
    request = DemoRequest(family=family, size=size, attention=attention_from_flags(kw), seed=seed)
    for line in run_demo(request).lines():
        click.echo(line)


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
