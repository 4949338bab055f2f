"""Analyse models on disk: load each, build its evaluation batches from the shared data layer, and measure it.

``analyze_checkpoints(AnalyzeRequest) -> AnalysisResult`` is the library call behind ``outlierfree analyze``;
``analyze_checkpoint`` (one model, its report dict) is what ``doctor`` and ``reproduce`` call. The CLI only turns
flags into the request, writes the result and prints its lines:

    from outlierfree.analysis.run import AnalyzeRequest, analyze_checkpoints
    result = analyze_checkpoints(AnalyzeRequest(("runs/vanilla/model", "runs/gated/model"), batches=4))
    result.write("out/compare")  # report.json, report.md, PNG plots
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OutlierfreeError, require
from ..sites import parse_kinds
from .analyze import DEFAULT_KINDS, DEFAULT_NOOP_THRESHOLD
from .inputs import check_amounts
from .metrics import DEFAULT_ABS_THRESHOLD, DEFAULT_REL_THRESHOLD

# the site kinds inside attention: --no-attention drops them (the model keeps its own attention kernel)
ATTENTION_KINDS = ("query", "key", "value", "attn_scores", "attn_probs", "context", "gate")


def is_image_model(model: Any) -> bool:
    """Whether ``model`` takes pixel values (ViT and other vision transformers)."""
    from ..data.evaluation import takes_images

    return takes_images(model)


def model_name(path: str) -> str:
    """A short name for tables and plots: the directory (or .gguf file) name, with its parent's when the name
    alone says nothing (``.../all-MiniLM/model`` -> ``all-MiniLM/model``)."""
    generic = ("model", "models", "checkpoint", "final", "best", "last", "snapshot", "train", "runs", "out")
    p = Path(path).resolve()
    parts = [p.name.removesuffix(".gguf")]
    # climb while the names say nothing: runs/bert-vanilla-s0/train/model -> bert-vanilla-s0/train/model
    while parts[0] in generic and p.parent != p and p.parent.name:
        p = p.parent
        parts.insert(0, p.name)
    return "/".join(parts)


@dataclass(frozen=True)
class AnalyzeRequest:
    """What ``outlierfree analyze`` is asked to do, as data; every field is checked when it is made, with a
    one-line error naming the flag (the CLI builds it from its flags by the same names, library callers directly).

    Attributes:
        models: model directories (ours or any Hugging Face checkpoint) or ``.gguf`` files (one path is accepted).
        data: evaluation data [default: the model's own validation split, else the offline corpus's; Fashion-MNIST
            test images for ViT]; text given to a model not trained on it is used whole.
        batches: evaluation batches [default: 8 from a validation split; every sequence of a whole text, at most
            ``max_sequences``].
        sites: site kinds to measure: ``"ln_input,residual"``, ``"all"`` or a sequence of kinds; stored parsed
            (:func:`outlierfree.sites.parse_kinds`, the one validation of site kinds).
        no_attention: skip attention internals (:data:`ATTENTION_KINDS`; no no-op head statistics).
        threshold, rel_threshold: outlier dimension rules (absolute; times the median dimension's).
        noop_threshold: a head is no-op with at least this attention mass on first / delimiter / background keys.
        packing: text: ``packed`` (as in training) | ``documents`` | ``auto``.
        track: run directories whose ``log.jsonl`` outlier events are plotted over steps (a model's own
            ``log.jsonl`` is picked up without it).
        progress: show a progress bar per model.
    """

    models: tuple[str, ...] = ()
    data: str | None = None
    batches: int | None = None
    max_sequences: int | None = None
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    tokenizer: str | None = None
    sites: str | tuple[str, ...] = DEFAULT_KINDS  # stored parsed: a tuple of kinds
    no_attention: bool = False
    threshold: float = DEFAULT_ABS_THRESHOLD
    rel_threshold: float = DEFAULT_REL_THRESHOLD
    noop_threshold: float = DEFAULT_NOOP_THRESHOLD
    packing: str = "auto"
    track: tuple[str, ...] = ()
    progress: bool = True

    def __post_init__(self) -> None:
        models = (self.models,) if isinstance(self.models, (str, Path)) else self.models
        object.__setattr__(self, "models", tuple(str(m) for m in models))
        object.__setattr__(self, "track", tuple(str(t) for t in self.track))
        require(self.models or self.track, "no model given",
                "pass MODEL [MODEL ...] (a model directory or .gguf) or --track RUN_DIR")
        check_amounts(self.batches, self.batch_size, self.seq_len, self.packing, self.max_sequences)
        require(self.threshold > 0 and self.rel_threshold > 0, "--threshold and --rel-threshold must be positive",
                "pass e.g. --threshold 6")
        require(0 < self.noop_threshold <= 1, f"--noop-threshold must be in (0, 1], got {self.noop_threshold}",
                "pass e.g. 0.5")
        object.__setattr__(self, "sites", parse_kinds(self.sites, "--sites"))
        for m in self.models:  # fail on a bad path before spending minutes on the others
            require(Path(m).exists(), f"model path {m!r} does not exist", "pass a model directory or a .gguf file")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The site kinds measured: ``sites`` without the attention internals under ``no_attention``."""
        return tuple(k for k in self.sites if not (self.no_attention and k in ATTENTION_KINDS))


@dataclass
class AnalysisResult:
    """What ``outlierfree analyze`` measured: one report dict per model (every number, as
    :func:`.analyze.analyze_model` returns it, with the model's path, data and seed) and the outlier tracks of
    training runs (run name -> its ``outliers`` events). ``write`` puts it on disk as report.json, report.md and
    PNG plots."""

    reports: list[dict[str, Any]]
    tracks: dict[str, list[dict[str, Any]]]
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields of report.json this result holds (report.json adds the plots' names and a version)."""
        return {"command": self.command, "reports": self.reports, "tracks": self.tracks}

    def write(self, out: str | Path) -> list[Path]:
        """Write report.json, report.md and the plots atomically into ``out`` (replaced; a directory holding
        anything but a report is refused); the paths written: report.json, report.md, then the plots."""
        from .report import write_report

        files = write_report(self.reports, out, self.tracks, self.command)
        return [files["json"], files["markdown"], *(p for k, p in files.items() if k not in ("json", "markdown"))]

    def lines(self) -> list[str]:
        """One console line per model: its headline outlier numbers and no-op heads."""
        nan = float("nan")
        lines = []
        for r in self.reports:
            h = r["headline"]
            lines.append(f"{r['name']}: max inf-norm {h.get('max_inf_norm', nan):.4g} at "
                         f"{h.get('max_inf_norm_site')}; avg kurtosis {h.get('avg_kurtosis') or nan:.4g}, max "
                         f"{h.get('max_kurtosis') or nan:.4g} at {h.get('max_kurtosis_site')}; largest |x| "
                         f"{h.get('largest_activation', nan):.4g} at {h.get('largest_activation_site')}; "
                         f"no-op heads {r['noop'].get('flagged', 0)} of {r['noop'].get('heads', 0)}")
        return lines


def analyze_checkpoints(request: AnalyzeRequest) -> AnalysisResult:
    """Analyse every model of ``request`` in turn (freeing each before the next is loaded) and read the outlier
    tracks of ``request.track`` and of each model's own ``log.jsonl``: the library call behind
    ``outlierfree analyze``.

        from outlierfree.analysis.run import AnalyzeRequest, analyze_checkpoints
        result = analyze_checkpoints(AnalyzeRequest(("runs/bert/model",), sites="all"))
        result.write("out/analysis")
    """
    from .tracking import find_log, read_track

    explicit = {}  # the runs asked for: read first, so that a run without events fails before minutes of work
    for run in request.track:
        name = Path(run).resolve().name
        explicit[name] = read_track(run)
        require(explicit[name], f"{run!r} has no outlier events in its log.jsonl",
                "train with `outlierfree train --track-outliers K`")
    reports, tracks = [], {}
    for path in request.models:
        reports.append(_analyze_one(request, path))
        log = find_log(path) if Path(path).is_dir() else None
        events = read_track(log) if log is not None else []
        if events:
            tracks[reports[-1]["name"]] = events
        gc.collect()  # the model is gone: free its memory before loading the next
    tracks.update(explicit)  # a run asked for replaces a model's own track of the same name
    return AnalysisResult(reports, tracks)


def analyze_checkpoint(request: AnalyzeRequest) -> dict[str, Any]:
    """The report dict of the one model of ``request`` (no tracks read): what ``doctor`` and ``reproduce`` call.

        report = analyze_checkpoint(AnalyzeRequest("runs/bert/model", batches=2, progress=False))
        report["headline"]["max_inf_norm"]
    """
    require(len(request.models) == 1, f"analyze_checkpoint takes one model, got {len(request.models)}",
            "pass one model path, or call analyze_checkpoints for several")
    return _analyze_one(request, request.models[0])


def _analyze_one(request: AnalyzeRequest, path: str) -> dict[str, Any]:
    """Load the model at ``path``, build its evaluation batches and analyse it: the report dict of one model.

    The batches come from the shared evaluation-data layer (:mod:`outlierfree.data.evaluation`): a model trained
    here is analysed on its own validation split, any other text given with ``data`` is used whole."""
    from ..data.training_record import read_training_record
    from ..models.io import load_model, load_tokenizer
    from .analyze import analyze_model
    from .inputs import image_batches, text_batches

    r = request
    model = load_model(path)
    name = model_name(path)
    record = read_training_record(path) if Path(path).is_dir() else None
    trained_on = record.data if record is not None and record.trained_here else None
    if is_image_model(model):
        evals, desc = image_batches(model, r.data, r.batches, r.batch_size, r.seed, model_path=path)
        data_name = r.data or trained_on or "fashion-mnist test"
    else:
        if r.tokenizer is not None:
            from ..data.text import load_tokenizer_dir

            tok = load_tokenizer_dir(r.tokenizer)
        else:
            tok = load_tokenizer(path)
        # transformers builds an empty tokenizer (special tokens only) when the files are missing: every word
        # would become [UNK], which is no analysis of the model
        require(len(tok) > len(set(tok.all_special_ids)) + 1, f"the tokenizer of {path!r} has only {len(tok)} "
                f"tokens (its vocabulary files are missing)", "save the tokenizer beside the model or pass --tokenizer DIR")
        evals, desc = text_batches(model, tok, r.data, r.batches, r.batch_size, r.seq_len, r.seed, r.packing,
                                   model_path=path if Path(path).is_dir() else None, max_sequences=r.max_sequences)
        data_name = r.data or trained_on or "offline wiki (validation)"
    require(sum(int(b.mask.sum()) for b in evals) > 0, "the data yields no tokens", "pass other data with --data")
    meta = {"data": {"name": data_name, **desc}, "seed": r.seed, "batch_size": r.batch_size, "seq_len": r.seq_len}
    try:
        report = analyze_model(model, evals, kinds=r.kinds, attention=not r.no_attention, abs_threshold=r.threshold,
                               rel_threshold=r.rel_threshold, noop_threshold=r.noop_threshold, progress=r.progress,
                               name=name, meta=meta)
    except OutlierfreeError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # a forward that fails on this checkpoint
        # (inputs it needs, shapes, dtypes): one line, not a traceback
        raise OutlierfreeError(f"the forward pass of {path!r} failed: {str(e).splitlines()[0][:200]}",
                               "check that the model and its tokenizer/data match (or try --no-attention)") from e
    report["model"]["path"] = str(path)
    return report
