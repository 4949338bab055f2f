"""Forward+backward time and peak memory of attention kernels against sequence length, in one run.

    python benchmarks/attention.py                       # T = 512 .. 8192, B=1, H=4, D=64, 1 thread
    python benchmarks/attention.py --quick               # T = 512 .. 2048, 2 repeats
    python benchmarks/attention.py --max-t 4096 --causal
    python benchmarks/attention.py --crossover           # eager vs blocked at short T (sets impl="auto")

Cases (all on the same random q, k, v and output gradient, float32):
    sdpa           vanilla softmax, torch.nn.functional.scaled_dot_product_attention (the fused baseline)
    eager_clipped  clipped softmax the eager way (outlierfree's eager path: T x T probabilities)
    blocked        clipped softmax with outlierfree's blocked two-pass kernel (attention/blocked.py)

Time: for each T, one subprocess runs the cases round-robin (case 1, case 2, case 3, case 1, ...) after a warm-up
step each, ``--repeats`` rounds, and keeps each case's fastest step (the minimum, because the machine is shared
and noise only ever adds time; interleaving exposes every case to the same load). Memory: each (case, T) runs in
a fresh subprocess of its own, two measures:
    peak_mb   peak of the bytes held by torch's CPU allocator during one forward+backward step, above what was held
              before it (q, k, v and dO already exist), from torch.profiler's allocation events; exact, and
              counts outputs, gradients, saved tensors and temporaries;
    rss_mb    growth of the process's peak resident set (ru_maxrss) over the steps; coarser (allocator caching).
Ratios are against sdpa at the same T, measured in the same run. Writes a table, JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CASES = ("sdpa", "eager_clipped", "blocked")
GAMMA, ZETA = -0.025, 1.0


# ---- worker: one case, one T, in its own process ---------------------------------------------------------------
def _step_fn(case: str, q, k, v, causal: bool):
    import torch
    import torch.nn.functional as F

    from outlierfree.attention import AttentionConfig
    from outlierfree.attention.blocked import blocked_kernel
    from outlierfree.attention.eager import eager_attention
    from outlierfree.attention.softmax import keep_mask

    cfg = AttentionConfig("clipped", gamma=GAMMA, zeta=ZETA, impl="blocked")
    scale = q.shape[-1] ** -0.5
    module = torch.nn.Module()
    T = q.shape[-2]
    if case == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if case == "eager_clipped":
        keep = keep_mask(None, T, T, causal)  # what the eager path gets for a causal model
        return lambda: eager_attention(module, q, k, v, keep, scale, 0.0, cfg)[0]
    if case == "blocked":
        return lambda: blocked_kernel(module, q, k, v, None, scale, 0.0, cfg, causal=causal)
    raise ValueError(case)


def _profiled_peak(step) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    del torch
    return peak


def _steps(cases: list[str], T: int, B: int, H: int, D: int, causal: bool, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))  # (B, H, T, D)
    d_out = torch.randn(B, H, T, D)

    def make(case):
        fwd = _step_fn(case, q, k, v, causal)

        def step():
            for t in (q, k, v):
                t.grad = None
            fwd().backward(d_out)

        return step

    return {case: make(case) for case in cases}


def memory_worker(case: str, T: int, B: int, H: int, D: int, causal: bool, threads: int) -> dict:
    """Peak memory of one case at one T, alone in this process."""
    step = _steps([case], T, B, H, D, causal, threads)[case]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    step()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0  # KiB on Linux
    return dict(case=case, T=T, peak_mb=_profiled_peak(step) / 2**20, rss_mb=rss / 1024)


def time_worker(cases: list[str], T: int, B: int, H: int, D: int, repeats: int, causal: bool,
                threads: int) -> dict:
    """Forward+backward times of all cases at one T, round-robin; {case: [seconds, ...]}."""
    steps = _steps(cases, T, B, H, D, causal, threads)
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(repeats + 1):  # the first round is the warm-up
        for case, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[case].append(time.perf_counter() - t0)
    return {c: ts[1:] for c, ts in times.items()}


# ---- driver ------------------------------------------------------------------------------------------------------
def _sub(args: list[str], a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, *args, "--batch", str(a.batch), "--heads", str(a.heads), "--dim", str(a.dim),
           "--repeats", str(a.repeats), "--threads", str(a.threads)] + (["--causal"] if a.causal else [])
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return dict(error=f"exit {p.returncode}: {tail}")
    return json.loads(lines[-1])


def run_T(T: int, cases: list[str], a: argparse.Namespace, bar, task) -> list[dict]:
    """Memory of each case (own subprocess each), then the times of all cases (one subprocess, interleaved)."""
    rows = []
    for case in cases:
        bar.update(task, description=f"memory {case} T={T}")
        rows.append({"case": case, "T": T, **_sub(["--memory-worker", case, str(T)], a)})
        bar.advance(task)
    bar.update(task, description=f"time T={T}")
    times = _sub(["--time-worker", ",".join(cases), str(T)], a)
    bar.advance(task)
    for r in rows:
        ts = times.get(r["case"])
        if ts:
            r.update(time_s=min(ts), time_median_s=sorted(ts)[len(ts) // 2], times_s=ts)
        elif "error" in times:
            r.setdefault("error", times["error"])
    return rows


def crossover(a: argparse.Namespace) -> list[dict]:
    """eager vs blocked forward+backward at short T and a training-like batch (in-process, same inputs)."""
    import torch

    torch.set_num_threads(a.threads)
    rows = []
    for T in (64, 128, 256, 384, 512, 768, 1024):
        if T > a.max_t:
            break
        B = max(1, a.crossover_tokens // T)
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, a.heads, T, a.dim, requires_grad=True) for _ in range(3))
        d_out = torch.randn(B, a.heads, T, a.dim)
        row = dict(T=T, B=B)
        cases = ("eager_clipped", "blocked", "sdpa")
        fwds = {case: _step_fn(case, q, k, v, a.causal) for case in cases}
        ts: dict[str, list[float]] = {case: [] for case in cases}
        for i in range(a.repeats + 1):  # round-robin; the first round is the warm-up
            for case in cases:
                t0 = time.perf_counter()
                fwds[case]().backward(d_out)
                if i:
                    ts[case].append(time.perf_counter() - t0)
        for case in cases:
            row[case] = min(ts[case])
        row["blocked/eager"] = row["blocked"] / row["eager_clipped"]
        rows.append(row)
        print(f"T={T:5d} B={B:3d}  eager {row['eager_clipped'] * 1e3:8.1f} ms  blocked {row['blocked'] * 1e3:8.1f} ms"
              f"  sdpa {row['sdpa'] * 1e3:8.1f} ms  blocked/eager {row['blocked/eager']:.2f}", flush=True)
    return rows


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for case in CASES:
        rs = [r for r in results if r["case"] == case and "error" not in r]
        if not rs:
            continue
        Ts = [r["T"] for r in rs]
        axes[0].plot(Ts, [r["time_s"] for r in rs], "o-", label=case)
        axes[1].plot(Ts, [r["peak_mb"] for r in rs], "o-", label=case)
    for ax, lab in zip(axes, ("forward+backward time (s, fastest of repeats)", "peak memory (MiB, torch allocator)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(lab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the dev machine has 2 shared cores)")
    ap.add_argument("--max-t", type=int, default=8192)
    ap.add_argument("--quick", action="store_true", help="T = 512 .. 2048 and 2 repeats")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--crossover", action="store_true", help="eager vs blocked at short T (for impl=auto)")
    ap.add_argument("--crossover-tokens", type=int, default=4096, help="batch x T in --crossover")
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    ap.add_argument("--memory-worker", nargs=2, metavar=("CASE", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--time-worker", nargs=2, metavar=("CASES", "T"), help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.memory_worker:
        case, T = a.memory_worker
        print(json.dumps(memory_worker(case, int(T), a.batch, a.heads, a.dim, a.causal, a.threads)))
        return
    if a.time_worker:
        cases, T = a.time_worker
        print(json.dumps(time_worker(cases.split(","), int(T), a.batch, a.heads, a.dim, a.repeats, a.causal,
                                     a.threads)))
        return
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = dict(B=a.batch, H=a.heads, D=a.dim, threads=a.threads, causal=a.causal, gamma=GAMMA, zeta=ZETA,
                 repeats=a.repeats, dtype="float32")
    if a.crossover:
        rows = crossover(a)
        path = out.with_name(out.stem + "_crossover.json")
        _write_json(path, dict(setup=setup, crossover=rows))
        print(f"wrote {path}")
        return

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    if a.quick:
        a.repeats = min(a.repeats, 2)
        a.max_t = min(a.max_t, 2048)
    Ts = [T for T in (512, 1024, 2048, 4096, 8192) if T <= a.max_t]
    cases = [c for c in a.cases.split(",") if c]
    results = []
    with Progress() as bar:
        task = bar.add_task("attention benchmark", total=len(Ts) * (len(cases) + 1))
        for T in Ts:
            results += run_T(T, cases, a, bar, task)
    base = {r["T"]: r for r in results if r["case"] == "sdpa" and "error" not in r}
    for r in results:
        b = base.get(r["T"])
        if b and "error" not in r and "time_s" in r and "time_s" in b:
            r["time_vs_sdpa"] = r["time_s"] / b["time_s"]
            r["mem_vs_sdpa"] = r["peak_mb"] / b["peak_mb"]
    t = Table(title=f"forward+backward, B={a.batch} H={a.heads} D={a.dim}, float32, {a.threads} thread(s)"
                    f"{', causal' if a.causal else ''}")
    for col in ("T", "case", "time (s)", "x sdpa", "peak MiB", "x sdpa", "RSS growth MiB"):
        t.add_column(col, justify="right")
    for r in results:
        if "error" in r:
            t.add_row(str(r["T"]), r["case"], r["error"], "", "", "", "")
            continue
        t.add_row(str(r["T"]), r["case"], f"{r['time_s']:.3f}", f"{r.get('time_vs_sdpa', float('nan')):.2f}",
                  f"{r['peak_mb']:.1f}", f"{r.get('mem_vs_sdpa', float('nan')):.2f}", f"{r['rss_mb']:.0f}")
    Console().print(t)
    goal = next((r for r in results if r["case"] == "blocked" and r["T"] == 4096 and "time_vs_sdpa" in r), None)
    if goal:
        print(f"goal at T=4096: blocked memory {goal['mem_vs_sdpa']:.2f}x sdpa (<= 1.2), "
              f"time {goal['time_vs_sdpa']:.2f}x sdpa (<= 1.5)")
    _write_json(out, dict(setup=setup, results=results))
    png = out.with_suffix(".png")
    plot(results, png, f"attention fwd+bwd, B={a.batch} H={a.heads} D={a.dim}{' causal' if a.causal else ''}")
    print(f"wrote {out} and {png}")


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
