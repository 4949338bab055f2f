"""Reproduce the paper's table: expand a preset, train / analyse / quantize every run (skipping finished runs,
resuming killed ones; :mod:`.runner`), measure the released checkpoints, and report.

``reproduce(ReproduceRequest) -> ReproduceResult`` is the library call behind ``outlierfree reproduce`` (the CLI
only turns flags into the request and prints); the result's ``write`` puts report.md, results.json and the plots
into the output directory (:mod:`.report`):

    from outlierfree.reproduce import ReproduceRequest, reproduce
    result = reproduce(ReproduceRequest("quick", "runs/quick"))
    result.write("runs/quick")  # report.md, results.json, *.png
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import OutlierfreeError, require
from ..records import check_dir_path, make_dir
from .presets import FAMILIES, RunSpec, get_preset


def _csv(text: str, what: str, valid: tuple[str, ...] | None = None,
         singular: str | None = None) -> tuple[str, ...]:
    """The items of a comma-separated flag value, each checked against ``valid`` (one-line errors naming ``--what``)."""
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    require(len(items) > 0, f"--{what} is empty", f"pass e.g. --{what} {','.join((valid or ('0',))[:2])}")
    if valid is not None:
        for x in items:
            require(x in valid, f"unknown {singular or what} {x!r}", f"use some of {', '.join(valid)}")
    return items


@dataclass(frozen=True)
class ReproduceRequest:
    """What ``outlierfree reproduce`` is asked to do, as data; every field is checked when it is made, with a
    one-line error naming the flag (the CLI passes its flags by these names; library callers may pass sequences
    where the CLI passes comma-separated text).

    Attributes:
        preset: a name of :data:`.presets.PRESETS`.
        out: the output directory (default ``runs/reproduce-<preset>``); runs live under ``out/runs``.
        families, variants, seeds: narrow (seeds: also widen) the preset's selection; None: the preset's.
        max_steps: cap every run's training steps.
        released: also analyse and quantize the released checkpoints (None: the preset's choice, on for ``quick``).
        report_only: train nothing; report the finished runs and list where the others stand.
    """

    preset: str = "quick"
    out: str | None = None
    families: tuple[str, ...] | str | None = None
    variants: tuple[str, ...] | str | None = None
    seeds: tuple[int, ...] | str | None = None
    max_steps: int | None = None
    progress: bool = True
    released: bool | None = None
    report_only: bool = False

    def __post_init__(self) -> None:
        p = get_preset(self.preset)
        if isinstance(self.families, str):
            object.__setattr__(self, "families", _csv(self.families, "families", FAMILIES, "family"))
        if isinstance(self.variants, str):
            object.__setattr__(self, "variants", _csv(self.variants, "variants", p.variant_names, "variant"))
        if isinstance(self.seeds, str):
            try:
                object.__setattr__(self, "seeds", tuple(int(s) for s in _csv(self.seeds, "seeds")))
            except ValueError:
                raise OutlierfreeError(f"--seeds {self.seeds!r} is not a list of integers",
                                       "pass e.g. --seeds 0,1") from None
        for name in ("families", "variants", "seeds"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(v))
        object.__setattr__(self, "out", str(self.out or f"runs/reproduce-{self.preset}"))
        if self.max_steps is not None:
            require(self.max_steps > 0, f"--max-steps must be positive, got {self.max_steps}",
                    "pass e.g. --max-steps 100")
        self.specs()  # the runs themselves: unknown families / variants of the preset, or no runs, refused here
        check_dir_path(self.out)  # a file at or above it: one line now, not after the training
        if self.report_only:
            require(Path(self.out).is_dir(), f"--out {self.out!r} does not exist",
                    "pass the --out of an earlier reproduce run")

    def specs(self) -> list[RunSpec]:
        """The selected runs of the preset, in order (its families x variants x seeds, narrowed as asked)."""
        return get_preset(self.preset).runs(self.families, self.variants, self.seeds, self.max_steps)


@dataclass
class ReproduceResult:
    """What ``outlierfree reproduce`` measured: every finished run's result dict (its ``result.json``), the
    released checkpoints' (None when not measured), and the selected runs not in the report with where they stand.
    ``write`` builds report.md, results.json and the plots from them (:func:`.report.write`)."""

    preset: str
    out: str
    runs: list[str]  # the selected runs in the report, in order
    results: list[dict[str, Any]]
    released: list[dict[str, Any]] | None
    missing: dict[str, str]  # run name -> where it stands (not started, checkpoint at step k, training by pid N)
    max_steps: int | None
    commit: str
    wall_s: float
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (results.json itself is :func:`.report.write`'s: meta, table, criteria, runs)."""
        return asdict(self)

    def meta(self) -> dict[str, Any]:
        """results.json's ``meta``: how the report was made."""
        return {"preset": self.preset,
                "command": self.command or f"outlierfree reproduce --preset {self.preset} --out {self.out}",
                "commit": self.commit, "wall_s": self.wall_s, "max_steps": self.max_steps, "runs": self.runs,
                "missing": self.missing}

    def write(self, out: str | Path) -> list[Path]:
        """Write report.md, results.json and the plots into ``out`` (each file atomically); the paths written."""
        from . import report

        files = report.write(self.results, Path(out), self.meta(), released=self.released)
        return [files["markdown"], files["json"], *(Path(out) / p for p in files["plots"])]


def reproduce(request: ReproduceRequest, *, echo: Callable[[str], None] | None = None) -> ReproduceResult:
    """Run every run of ``request`` in order (skipping finished runs, resuming killed ones, leaving those another
    process holds), then measure the released checkpoints; the library call behind ``outlierfree reproduce``.

    With ``request.report_only``, train nothing: collect the runs that have finished (refused if none has) and
    where the others stand. ``echo`` receives the one-line progress notes (a run starting, done, skipped)."""
    from .release import available, evaluate_releases
    from .runner import collect, git_commit, run_all

    echo = echo or (lambda line: None)
    p, specs, out_path = get_preset(request.preset), request.specs(), Path(request.out)
    t0 = time.perf_counter()
    missing: dict[str, str] = {}
    if request.report_only:
        echo(f"reproduce preset {p.name}: report of the finished runs among {len(specs)} -> {out_path}")
        results, missing = collect(specs, out_path, echo)
        require(len(results) > 0, f"none of the {len(specs)} selected runs in {request.out!r} has finished",
                "run the same command without --report-only first")
    else:
        make_dir(out_path)
        echo(f"reproduce preset {p.name}: {len(specs)} runs ({p.description}) -> {out_path}")
        results = run_all(specs, out_path, p.name, progress=request.progress, echo=echo, held=missing)
    rel_results = None
    if p.released if request.released is None else request.released:
        releases = available()
        if releases:
            rel_results = evaluate_releases(releases, out_path, progress=request.progress, echo=echo)
        else:
            echo("no released checkpoints in this installation (outlierfree/released/): the report has none")
    return ReproduceResult(preset=p.name, out=request.out, runs=[s.name for s in specs if s.name not in missing],
                           results=results, released=rel_results, missing=missing, max_steps=request.max_steps,
                           commit=git_commit(), wall_s=time.perf_counter() - t0)
