"""Run every family x variant x seed of a preset: train, analyse, quantize; never lose work.

Layout of ``OUT``:

    OUT/runs/<family>-<variant>-s<seed>/spec.json       what the run is (refused if a rerun differs)
                                         train/          the training run (checkpoints, log.jsonl, model/)
                                         analysis.json   outlier analysis of the final model
                                         quant.json      float vs W8A8 (paper's site set) and W8A8 (linear only)
                                         result.json     the run's numbers: what the report is built from
    OUT/report.md, OUT/results.json, OUT/*.png           the table and plots (rebuilt from the result.json files)

Every stage writes its file atomically and is skipped when the file exists, so a rerun of the same command
continues where a killed one stopped (training itself resumes from its last checkpoint).

Several processes may work into one ``OUT`` (one per core, or a second sitting beside a first): each holds a lock on
``<run>/.lock`` while it trains, analyses and quantizes that run, and skips the runs another process holds, so no
run is ever trained twice. The lock is an ``fcntl.flock`` on an open file: the operating system drops it when the
process exits or dies (SIGKILL included), so a crashed process never leaves a run locked.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import IO, Any, Callable

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not locked (one process per --out there)
    fcntl = None  # type: ignore[assignment]

from ..errors import OutlierfreeError
from ..records import git_commit, machine, make_dir, read_json, read_log, write_json  # noqa: F401 (re-exported)
from .presets import METRIC, RunSpec


def refuse_other_config(run_dir: Path, spec: RunSpec, fix: str) -> bool:
    """Raise if ``run_dir`` holds a run of a config other than ``spec`` (naming what differs); returns whether it
    holds a run at all."""
    path = run_dir / "spec.json"
    if not path.exists():
        return False
    old = read_json(path)
    if old != spec.to_dict():
        diff = sorted(k for k in set(old.get("train", {})) | set(spec.train)
                      if old.get("train", {}).get(k) != spec.train.get(k))
        other = [k for k in ("analysis", "quant") if old.get(k) != getattr(spec, k)]
        raise OutlierfreeError(
            f"{str(run_dir)!r} holds a run of a different config (differs in {', '.join(diff + other) or 'spec'})", fix)
    return True


def check_spec(run_dir: Path, spec: RunSpec) -> None:
    """Record ``spec`` in ``run_dir``, or refuse if the directory holds a run of a different config."""
    if not refuse_other_config(run_dir, spec, "use another --out directory, or delete that run directory to redo it"):
        make_dir(run_dir)
        write_json(run_dir / "spec.json", spec.to_dict())


LOCK_FILE = ".lock"


class RunLock:
    """An exclusive, non-blocking lock on one run directory, held by this process while it works on the run.

    ``acquire()`` returns False when another process holds it. The holder's pid is written into the lock file so
    that others can say who trains the run; the file itself stays (deleting a lock file races with its next taker).
    The OS releases the lock when the file is closed, which happens at ``release()``, at exit, or when the process
    is killed."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> bool:
        """Take the lock if it is free; False if another process (or another RunLock of this one) holds it."""
        if fcntl is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        for attempt in range(3):  # a --report-only probe holds a shared lock for microseconds: look again
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 2:
                    f.close()
                    return False
                time.sleep(0.05)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return True

    def release(self) -> None:
        """Drop the lock (closing the file releases it)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_holder(run_dir: Path) -> int | None:
    """The pid of the process that holds ``run_dir``'s lock, 0 if held by a process that has not yet written its
    pid, or None if nobody holds it. Takes nothing: a shared probe, dropped at once."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not path.exists():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = f.read().strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def train_stage(spec: RunSpec, run_dir: Path, progress: bool) -> Path:
    """Train (or resume, or skip if finished) and return the final model directory."""
    from ..analysis.tracking import headline_metrics
    from ..train import TrainConfig, train

    cfg = TrainConfig.from_dict({**spec.train, "seed": spec.seed, "out": str(run_dir / "train"), "resume": True,
                                 "progress": progress})
    return train(cfg, outlier_metrics=headline_metrics).model_dir


def analysis_stage(spec: RunSpec, model_dir: Path, run_dir: Path, progress: bool) -> dict[str, Any]:
    """Outlier analysis of the trained model on validation data (cached in analysis.json)."""
    path = run_dir / "analysis.json"
    if path.exists():
        return read_json(path)
    from ..analysis.run import AnalyzeRequest, analyze_checkpoint

    seq_len = int(spec.train.get("seq_len", 128))
    report = analyze_checkpoint(AnalyzeRequest(str(model_dir), batches=int(spec.analysis["batches"]),
                                               batch_size=int(spec.analysis["batch_size"]), seq_len=seq_len, seed=0,
                                               progress=progress))
    report["name"] = f"{spec.family}-{spec.variant}"
    write_json(path, report)
    return report


def quant_stage(spec: RunSpec, model_dir: Path, run_dir: Path, progress: bool) -> dict[str, Any]:
    """Float vs W8A8 in the paper's setting (the reference's site set) and in the linear-only setting (cached in
    quant.json; a cache made with another site set is simulated again)."""
    path = run_dir / "quant.json"
    if path.exists():
        cached = read_json(path)
        if not stale_quant(cached["w8a8"]["config"]):
            return cached
    from ..quant.config import linear_w8a8, paper_w8a8
    from ..export.realint8 import scorer
    from ..quant.evaluate import evaluate_quantized

    model, tok, task, batches = quant_inputs(spec, model_dir)
    out: dict[str, Any] = {"data": batches.info}
    for name, cfg in (("w8a8", paper_w8a8()), ("w8a8_linear", linear_w8a8())):
        backend = ("openvino" if _has("openvino") else "onnxruntime") if name == "w8a8" and _has_onnxruntime() \
            else None
        try:  # the paper set also runs in real integers (ONNX Runtime) when the deploy extra is installed
            out[name] = evaluate_quantized(model, tok, batches.calib, batches.eval, cfg, task, diagnostics=False,
                                           progress=progress, real=scorer(backend) if backend else None)
        except OutlierfreeError as e:
            if backend is None:
                raise
            out[name] = evaluate_quantized(model, tok, batches.calib, batches.eval, cfg, task, diagnostics=False,
                                           progress=progress)
            out[name]["onnxruntime_error"] = str(e)
    write_json(path, out)
    return out


def quant_inputs(spec: RunSpec, model_dir: Path) -> tuple[Any, Any, str, Any]:
    """The model (float32), its tokenizer (None for images), task and calibration/evaluation batches, as a run's
    quant stage measures it: the spec's batch counts and sizes, its sequence length, seed 0."""
    from ..quant.run import load_for_quant

    qs = spec.quant
    q = load_for_quant(model_dir, calib_batches=int(qs["calib_batches"]), eval_batches=int(qs["eval_batches"]),
                       batch_size=int(qs["batch_size"]), seq_len=spec.train.get("seq_len"), seed=0)
    return q.model, q.tokenizer, q.task, q.batches


def _has(module: str) -> bool:
    """Whether an optional runtime is installed (its module can be found)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _has_onnxruntime() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def stale_quant(config: dict[str, Any] | None) -> bool:
    """Whether a recorded W8A8 config predates the ``paper`` site set (made with the old ``full`` default)."""
    return (config or {}).get("sites") != "paper"


def _per_layer(analysis: dict[str, Any], kind: str = "ln_input") -> list[dict[str, Any]]:
    rows = [s for s in analysis.get("sites", []) if s.get("kind") == kind and s.get("layer") is not None]
    by_layer: dict[int, dict[str, float]] = {}
    for s in rows:
        d = by_layer.setdefault(s["layer"], {"inf_norm": 0.0, "kurtosis": 0.0})
        # the same statistics as the headline: per-sequence values averaged over sequences, max over the layer's sites
        d["inf_norm"] = max(d["inf_norm"], float(s.get("inf_norm_mean") or 0.0))
        d["kurtosis"] = max(d["kurtosis"], float(s.get("kurtosis_mean") or 0.0))
    return [{"layer": k, **v} for k, v in sorted(by_layer.items())]


def _track_events(train_dir: Path, events: tuple[str, ...]) -> list[dict[str, Any]]:
    """The events of a training run's log.jsonl whose ``event`` is in ``events``."""
    return read_log(train_dir / "log.jsonl", events)


def summarise(spec: RunSpec, model_dir: Path, run_dir: Path, analysis: dict[str, Any], quant: dict[str, Any],
              seconds: float, commit: str, preset: str, train_dir: Path | None = None) -> dict[str, Any]:
    """The run's result.json: every number the report shows, with how it was obtained. ``train_dir``: where the
    training log is (default ``run_dir/train``; a release keeps it beside its weights)."""
    from ..analysis.analyze import Headline
    from ..quant.evaluate import Measured

    metric = METRIC[spec.family]
    events = _track_events(train_dir or run_dir / "train", ("outliers", "eval", "train", "resume"))  # read once
    pct = 100.0 if metric == "top1" else 1.0  # top-1 in percent, as the paper reports it
    paper, linear = Measured.of(quant["w8a8"], metric, pct), Measured.of(quant["w8a8_linear"], metric, pct)
    head = Headline.of(analysis)
    res = {
        "name": spec.name, "family": spec.family, "variant": spec.variant, "seed": spec.seed, "preset": preset,
        "metric": metric,
        "fp": paper.float,
        "w8a8": paper.quantized,
        "w8a8_ort": paper.int8_ort,
        # the same INT8 model in OpenVINO (recorded when the openvino extra is installed; None in older caches)
        "w8a8_ov": (lambda v: None if v is None else float(v) * pct)(
            ((quant["w8a8"].get("openvino") or {}).get("int8") or {}).get(metric)),
        "w8a8_linear": linear.quantized,
        "max_inf_norm": head.max_inf_norm,
        "max_inf_norm_site": head.max_inf_norm_site,
        "avg_kurtosis": head.avg_kurtosis,
        "max_kurtosis": head.max_kurtosis,
        "noop_heads": head.noop_heads,
        "per_layer_inf_norm": _per_layer(analysis),
        "track": [e for e in events if e["event"] in ("outliers", "eval")],
        "how": {"spec": spec.to_dict(), "commit": commit, "machine": machine(), "model_dir": str(model_dir),
                "run_dir": str(run_dir),
                "analysis": {"data": analysis.get("data"), "sequences": analysis.get("sequences"), "seed": 0},
                "quant": {"w8a8": quant["w8a8"]["config"], "w8a8_linear": quant["w8a8_linear"]["config"],
                          "data": quant.get("data"), "calib_batches": quant["w8a8"].get("calib_batches"),
                          "eval_batches": quant["w8a8"].get("eval_batches")}},
        "seconds": round(seconds, 1),  # this invocation's time for the run (stages done earlier are not counted)
        "stage_seconds": _stage_seconds(events, analysis, quant),
    }
    return res


def _stage_seconds(events: list[dict[str, Any]], analysis: dict[str, Any],
                   quant: dict[str, Any]) -> dict[str, float | None]:
    """Wall time of each stage as the stage itself recorded it, whenever it ran. Training: each process's elapsed
    time at its last logged step, summed over the processes of a resumed run (every process restarts its clock,
    and a ``resume`` event marks where the next one began)."""
    train_s, segment = None, None
    for event in events:
        if event["event"] == "resume" and segment is not None:
            train_s, segment = (train_s or 0.0) + segment, None
        elif event["event"] == "train" and event.get("elapsed_s") is not None:
            segment = float(event["elapsed_s"])
    if segment is not None:
        train_s = (train_s or 0.0) + segment
    quant_s = sum(sum(v for v in q.get("seconds", {}).values() if isinstance(v, (int, float)))
                  for k, q in quant.items() if isinstance(q, dict) and "seconds" in q)
    return {"train": None if train_s is None else round(float(train_s), 1),
            # not rounded: a fast quant stage must not record 0 (the report rounds when it prints)
            "analysis": (analysis.get("timing") or {}).get("seconds"), "quant": float(quant_s)}


def _has_model(run_dir: Path) -> bool:
    return any(p.name == "config.json" for p in run_dir.glob("**/model/config.json"))


def run_status(spec: RunSpec, run_dir: Path) -> str:
    """Where an unfinished run stands, in words: not started, its last checkpoint's step, or trained; prefixed by
    "training by pid N" while a process holds its lock."""
    holder = lock_holder(run_dir)
    who = "" if holder is None else f"training by pid {holder}" if holder else "training by another process"
    if not (run_dir / "spec.json").exists():
        return who or "not started"
    train_dir = run_dir / "train"
    if (train_dir / "model").exists():
        where = "trained, analysis or quantization not done"
    else:
        steps = [e["step"] for e in _track_events(train_dir, ("checkpoint",)) if isinstance(e.get("step"), int)]
        total = spec.train.get("steps")
        where = (f"checkpoint at step {max(steps)} of {total}" if steps
                 else f"started, no checkpoint yet (of {total} steps)")
    return f"{who}, {where}" if who else where


def collect(specs: list[RunSpec], out: Path, echo: Callable[[str], None] = print
            ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The finished runs among ``specs`` (their result.json) and, for the others, where they stand. Trains
    nothing and writes nothing, so it can run beside the processes that are training into the same ``out``."""
    runs_dir = out / "runs"
    results: list[dict[str, Any]] = []
    missing: dict[str, str] = {}
    for i, spec in enumerate(specs, 1):
        run_dir = runs_dir / spec.name
        refuse_other_config(run_dir, spec, "pass the --preset and --max-steps that the run was made with")
        if (run_dir / "result.json").exists():
            results.append(read_json(run_dir / "result.json"))
            echo(f"[{i}/{len(specs)}] {spec.name}: done")
        else:
            missing[spec.name] = run_status(spec, run_dir)
            echo(f"[{i}/{len(specs)}] {spec.name}: not in the report ({missing[spec.name]})")
    return results, missing


def run_all(specs: list[RunSpec], out: Path, preset: str, progress: bool = True,
            echo: Callable[[str], None] = print, held: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run (or skip, or resume) every spec in order; returns their result dicts. A run whose lock another process
    holds is skipped; those still unfinished at the end are put in ``held`` (name -> where it stands)."""
    runs_dir = out / "runs"
    commit = git_commit()
    results: list[dict[str, Any]] = []
    # refuse mixed configs before any work, so nothing is half-done when the check fails
    for spec in specs:
        check_spec(runs_dir / spec.name, spec)
    spent: list[float] = []
    skipped: list[tuple[int, RunSpec]] = []
    for i, spec in enumerate(specs, 1):
        run_dir = runs_dir / spec.name
        lock = RunLock(run_dir)
        if not lock.acquire():  # another process works on it: leave it alone, look again at the end
            skipped.append((i, spec))
            echo(f"[{i}/{len(specs)}] {spec.name}: {run_status(spec, run_dir)}; skipped here")
            continue
        with lock:
            results.append(_run_one(i, spec, specs, run_dir, preset, progress, echo, spent, commit))
    for i, spec in skipped:  # the other process may have finished them meanwhile
        run_dir = runs_dir / spec.name
        if (run_dir / "result.json").exists() and lock_holder(run_dir) is None:
            results.append(read_json(run_dir / "result.json"))
            echo(f"[{i}/{len(specs)}] {spec.name}: done by another process")
        else:
            status = run_status(spec, run_dir)
            if held is not None:
                held[spec.name] = status
            echo(f"[{i}/{len(specs)}] {spec.name}: left to another process ({status})")
    if skipped:
        echo(f"{sum(1 for _, s in skipped if s.name in (held or {}))} of {len(specs)} runs were held by other "
             f"processes; rerun this command (or --report-only) once they finish")
    return results


def _run_one(i: int, spec: RunSpec, specs: list[RunSpec], run_dir: Path, preset: str, progress: bool,
             echo: Callable[[str], None], spent: list[float], commit: str) -> dict[str, Any]:
    """One run, its lock held: skip it if finished, else train / analyse / quantize it; its result dict."""
    result_path = run_dir / "result.json"
    if result_path.exists():
        res = read_json(result_path)
        if not (stale_quant(res.get("how", {}).get("quant", {}).get("w8a8")) and _has_model(run_dir)):
            echo(f"[{i}/{len(specs)}] {spec.name}: done earlier, skipped")
            return res
        echo(f"[{i}/{len(specs)}] {spec.name}: W8A8 was simulated with the old site set; simulating it again "
             f"with the paper's")
    left = len(specs) - i + 1
    eta = f", ETA {fmt_duration(sum(spent) / len(spent) * left)} for the {left} left" if spent else ""
    echo(f"[{i}/{len(specs)}] {spec.name}: training {spec.train.get('size')} for {spec.train.get('steps')} "
         f"steps{eta}")
    t0 = time.perf_counter()
    model_dir = train_stage(spec, run_dir, progress)
    echo(f"[{i}/{len(specs)}] {spec.name}: analysing outliers")
    analysis = analysis_stage(spec, model_dir, run_dir, progress)
    echo(f"[{i}/{len(specs)}] {spec.name}: W8A8 (paper set, simulated and in ONNX Runtime's integers, and "
         f"linear only)")
    quant = quant_stage(spec, model_dir, run_dir, progress)
    dt = time.perf_counter() - t0
    spent.append(dt)
    res = summarise(spec, model_dir, run_dir, analysis, quant, dt, commit, preset)
    write_json(result_path, res)
    echo(f"[{i}/{len(specs)}] {spec.name}: FP {res['metric']} {fmt_number(res['fp'])}, W8A8 "
         f"{fmt_number(res['w8a8'])}, max inf-norm {fmt_number(res['max_inf_norm'])} ({fmt_duration(dt)})")
    return res


def fmt_number(v: Any, digits: int = 4) -> str:
    """``v`` to ``digits`` significant digits, or ``n/a`` when it is not a number (a run that recorded none)."""
    return f"{v:.{digits}g}" if isinstance(v, (int, float)) else "n/a"


def fmt_duration(s: float) -> str:
    """Seconds as ``1h02m`` or ``3m05s``."""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
