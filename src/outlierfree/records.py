"""One record layer: every JSON, text and PNG file the package writes, the run log, and progress bars.

- **Atomic**: a file is written to a per-process temporary name beside it and renamed, so a reader (or another
  process writing the same file) never sees half of it, and a killed writer leaves the old file or nothing.
- **One policy for non-finite numbers**: JSON has no NaN or infinity, so they are written as the strings ``"nan"``,
  ``"inf"`` and ``"-inf"`` (strict JSON any reader accepts, and an infinite SQNR stays distinguishable from a
  missing value), and :func:`read_json` turns those strings back into floats.
- **A full disk** is a one-line :class:`OutlierfreeError`, not a traceback.
- **The run log** (``log.jsonl``): one JSON event per line, appended; :func:`read_log` skips a line torn by a kill.
- **Progress**: :func:`track` (rich), one look for every long loop.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from .errors import OutlierfreeError

T = TypeVar("T")
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def json_safe(o: Any) -> Any:
    """A copy of ``o`` with non-finite floats as ``"nan"``/``"inf"``/``"-inf"``, tuples as lists, paths and other
    objects as their ``str``: what :func:`write_json` writes."""
    if isinstance(o, float):
        return o if math.isfinite(o) else ("nan" if o != o else ("inf" if o > 0 else "-inf"))
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if o is None or isinstance(o, (bool, int, str)):
        return o
    if hasattr(o, "to_dict"):
        return json_safe(o.to_dict())
    if hasattr(o, "item") and getattr(o, "ndim", None) == 0:  # a 0-d tensor or numpy scalar
        return json_safe(o.item())
    return str(o)


def _restore(o: Any) -> Any:
    if isinstance(o, str):
        return NONFINITE.get(o, o)
    if isinstance(o, dict):
        return {k: _restore(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_restore(v) for v in o]
    return o


def dumps(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON under the package's policy (see the module docstring)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


OUT_FIX = "pass a new directory path for --out (or move that file away)"


def check_dir_path(path: str | os.PathLike, what: str = "the output directory", fix: str = OUT_FIX) -> Path:
    """Refuse, as a one-line error, a directory path that cannot be created: ``path`` itself, or a folder above it,
    is an existing file (``--out README.md/x``). Cheap: commands call it before their work, and :func:`make_dir`
    calls it where the directory is made. ``what`` and ``fix`` word the message for other directories (a cache)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "is a file" if p == path else f"is under {str(p)!r}, which is a file"
                raise OutlierfreeError(f"{what} {str(path)!r} {where}, not a directory", fix)
            break
    return path


def make_dir(path: str | os.PathLike, what: str = "the output directory", fix: str = OUT_FIX) -> Path:
    """``mkdir -p path``; a file in the way, no permission or a full disk is a one-line error, never a traceback.
    Every directory the package writes into is made here (or by ``atomic_dir``, which calls it)."""
    path = check_dir_path(path, what, fix)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutlierfreeError(f"the disk is full while creating {str(path)!r}",
                                   "free some space and rerun the same command: finished work is kept") from e
        if isinstance(e, (FileExistsError, NotADirectoryError, PermissionError)) or e.errno == errno.EROFS:
            check_dir_path(path, what, fix)  # a file made in the way since the check: name it
            raise OutlierfreeError(f"cannot create {what} {str(path)!r} ({e.strerror})", fix) from e
        raise
    return path


def atomic_dir(target: str | os.PathLike) -> "_AtomicDir":
    """Context manager: yields a temporary directory that replaces ``target`` only if the block succeeds."""
    return _AtomicDir(Path(target))


class _AtomicDir:
    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        check_dir_path(self.target)  # a file in the way is a one-line error, before anything is written
        make_dir(self.target.parent)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary name, then rename); a full disk is a one-line error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise OutlierfreeError(f"the disk is full while writing {str(path)!r}",
                                   "free some space and rerun the same command: finished work is kept") from e
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` to ``path`` as JSON, atomically, under the package's non-finite policy."""
    return write_text(path, dumps(obj) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file written by :func:`write_json` (``"nan"``/``"inf"``/``"-inf"`` back to floats); a corrupt
    one is a one-line error naming the file."""
    path = Path(path)
    try:
        return _restore(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OutlierfreeError(f"{str(path)!r} is corrupt ({e.__class__.__name__})",
                               "delete it and rerun: that stage is redone") from e


def save_png(fig: Any, path: str | os.PathLike | None, dpi: int = 110) -> bool:
    """Write a matplotlib figure to ``path`` atomically and close it (nothing written when ``path`` is None: the
    plot had no data); returns whether a file was written."""
    import matplotlib.pyplot as plt

    if path is not None:
        path = Path(path)
        if fig.get_layout_engine() is None:  # a figure made with layout="constrained" keeps its own
            fig.tight_layout()
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
        try:
            fig.savefig(tmp, dpi=dpi)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    plt.close(fig)
    return path is not None


def integer_ticks(axis: Any, at: Iterable[float] | None = None) -> None:
    """Integer tick labels on one matplotlib axis (``ax.xaxis``) that counts things (layers, steps): at ``at`` (the
    layers a plot has; grouped bars are centred on them), or, with many or none given, wherever matplotlib puts them
    but on integers only. Without it a 4-layer bar chart is labelled 0.0, 0.5, ... 3.5."""
    from matplotlib.ticker import MaxNLocator

    ticks = sorted({int(a) for a in at}) if at is not None else []
    if 0 < len(ticks) <= 24:
        axis.set_ticks(ticks, [str(t) for t in ticks])
    else:
        axis.set_major_locator(MaxNLocator(integer=True))


# ---- provenance: every record says where it was made ------------------------------------------------------------
def git_commit() -> str:
    """``$OUTLIERFREE_COMMIT`` if set (e.g. a copy of the tree on another machine), else the commit of the installed
    source tree, else ``unknown``."""
    if os.environ.get("OUTLIERFREE_COMMIT"):
        return os.environ["OUTLIERFREE_COMMIT"]
    try:
        here = Path(__file__).resolve().parent
        r = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                           timeout=10)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return r.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def cpu() -> tuple[str, list[str]]:
    """This CPU's model name and its feature flags, in /proc/cpuinfo's order (``("unknown", [])`` where there is
    none): the one reader of /proc/cpuinfo, for every timing's record of which instruction sets ran it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown", []
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return name, flags


def vnni() -> bool:
    """Whether this CPU multiplies int8 with VNNI or AMX: without them (AVX2 only) the runtimes' u8 x s8 kernels
    saturate 16-bit pair sums (see :func:`outlierfree.export.onnx.fold_weight_qdq`)."""
    return any(f in cpu()[1] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def machine() -> str:
    """A one-line description of this machine: processor, cores, torch and its threads, GPU."""
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s){gpu}")


# ---- the run log -------------------------------------------------------------------------------------------------
LOG_FILE = "log.jsonl"


def append_log(path: str | os.PathLike, event: dict[str, Any]) -> None:
    """Append one event (a dict with an ``"event"`` key) as a line of ``log.jsonl``, flushed to disk."""
    with open(path, "a") as f:
        f.write(dumps(event, indent=None) + "\n")
        f.flush()


def read_log(path: str | os.PathLike, events: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The events of a ``log.jsonl`` (those whose ``event`` is in ``events``, when given), in order; a line torn
    by a kill is skipped; a missing file gives no events."""
    path = Path(path)
    if not path.is_file():
        return []
    want = None if events is None else set(events)
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = _restore(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line of a killed run
        if isinstance(r, dict) and (want is None or r.get("event") in want):
            rows.append(r)
    return rows


# ---- progress ----------------------------------------------------------------------------------------------------
class Bar:
    """What :func:`progress` yields: ``bar()`` advances by one (``bar(n)`` by n), ``bar.show(**fields)`` updates the
    fields its columns display."""

    def __init__(self, prog: Any = None, task: Any = None):
        self.prog, self.task = prog, task

    def __call__(self, n: int = 1) -> None:
        if self.prog is not None:
            self.prog.advance(self.task, n)

    def show(self, **fields: Any) -> None:
        """Set the values of the bar's extra columns (``columns`` of :func:`progress`)."""
        if self.prog is not None:
            self.prog.update(self.task, **fields)


@contextmanager
def progress(label: str, total: int | None, enabled: bool = True, *, completed: int = 0,
             columns: Iterable[str] = (), fields: dict[str, Any] | None = None, keep: bool = False) -> Iterator[Bar]:
    """A rich progress bar labelled ``label`` on stderr (silent when disabled); yields a :class:`Bar`.

    Args:
        completed: where the bar starts (a resumed run).
        columns: extra rich text columns between the count and the times, e.g. ``"loss {task.fields[loss]:.4f}"``.
        fields: the initial values of those columns' fields.
        keep: leave the finished bar on screen (training) rather than clear it.
    """
    if not enabled:
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  *(TextColumn(c) for c in columns), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=not keep) as prog:
        task = prog.add_task(label, total=total, completed=completed, **(fields or {}))
        yield Bar(prog, task)


def track(items: Iterable[T], label: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Yield ``items`` while showing :func:`progress` labelled ``label`` (silent when disabled)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(label, total, enabled) as advance:
        for item in items:
            yield item
            advance()
