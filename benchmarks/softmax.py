"""Softmax by the Two-Pass algorithm against the three-pass and online forms and torch.softmax, in one run; and the
blocked clipped-attention kernel with each first pass.

    python benchmarks/softmax.py                 # rows of 1K .. 64M float32 elements, 1 thread and all threads
    python benchmarks/softmax.py --quick         # 1K .. 4M, 2 repeats
    python benchmarks/softmax.py --max-n 16M --repeats 5

Softmax cases (float32, softmax over rows of N elements; shape (R, N) with R = max(1, 2^18 / N) rows so that
short rows still make 1 MiB of work):
    two_pass     outlierfree.attention.two_pass, compiled: (mantissa, exponent) sum, then the outputs (2 reads, 1 write)
    three_pass   the same compiled exp, three passes: max; exp(x - max) stored and summed; scaled (3 reads, 2 writes)
    online       the same compiled exp, running max and rescaled sum, then the outputs (2 reads, 1 write)
    torch        torch.softmax (aten::_softmax.out)
    copy         out.copy_(x): the machine's copy bandwidth (1 read, 1 write) at the same size, measured in this run
Every case writes into a preallocated output (no allocation, no page faults in the timed call). Time: the cases run
round-robin after a warm-up call each, ``--repeats`` rounds, and each keeps its fastest call (the machine is shared;
noise only adds time). ``x bound`` is the time over the copy-bandwidth bound of two reads and one write,
1.5 x the copy time at the same size (copy moves 2 x N x 4 bytes, softmax at least 3 x N x 4). ``GB/s`` counts
3 x N x 4 bytes (the two-pass / online traffic) for every case, so the columns compare at equal work. Out of cache:
input + output larger than the last-level cache.

Blocked clipped attention (outlierfree.attention.blocked.blocked_clipped_attention, forward only, since the first
pass is a forward thing): B=1, H=4, D=64, gamma=-0.025, T in {1024, 4096}, the key range in one tile and streamed in
key blocks of 512, first_pass "online" (today's default) and "two_pass"; same round-robin timing.

Writes benchmarks/results/softmax.json, softmax.png and prints the tables; the machine, its ISA (instruction-set
flags), the commit and the command are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

CASES = ("two_pass", "three_pass", "online", "torch")
SIZES = [1 << k for k in range(10, 27, 2)]  # 1K, 4K, ..., 64M
MIN_ELEMS = 1 << 18


def _parse_n(s: str) -> int:
    s = s.upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
    return int(s[:-1] if s[-1] in "KM" else s) * mult


def llc_bytes() -> int:
    """The last-level cache in bytes (Linux sysfs), or 32 MiB when it cannot be read."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    best = 0
    for d in base.glob("index*"):
        try:
            size = (d / "size").read_text().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
            best = max(best, int(size.rstrip("KM")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def timed(fns: dict, repeats: int) -> dict:
    """Fastest time of each callable, round-robin (one warm-up round)."""
    times: dict = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def softmax_rows(sizes: list[int], threads: list[int], repeats: int, bar) -> list[dict]:
    from outlierfree.attention.two_pass import softmax_into

    rows, llc = [], llc_bytes()
    for n in sizes:
        r = max(1, MIN_ELEMS // n)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(r, n, generator=g) * 4  # (R, N) float32: logits of a typical spread
        outs = {c: torch.zeros_like(x) for c in (*CASES, "copy")}  # touched once: no page faults when timed
        fns = {c: (lambda c=c: softmax_into(x, outs[c], c)) for c in ("two_pass", "three_pass", "online")}
        fns["torch"] = lambda: torch.ops.aten._softmax.out(x, -1, False, out=outs["torch"])
        fns["copy"] = lambda: outs["copy"].copy_(x)
        for nt in threads:
            torch.set_num_threads(nt)
            t = timed(fns, repeats)
            bound = 1.5 * t["copy"]
            for c in CASES:
                rows.append(dict(n=n, rows=r, threads=nt, case=c, time_s=t[c], copy_s=t["copy"],
                                 x_bound=t[c] / bound, gbps=3 * x.numel() * 4 / t[c] / 1e9,
                                 copy_gbps=2 * x.numel() * 4 / t["copy"] / 1e9,
                                 working_set_mib=2 * x.numel() * 4 / 2**20,
                                 in_cache=2 * x.numel() * 4 <= llc, vs_three_pass=t[c] / t["three_pass"]))
            bar()
        del x, outs
    return rows


def blocked_rows(threads: list[int], repeats: int, bar, quick: bool) -> list[dict]:
    from outlierfree.attention.blocked import blocked_clipped_attention

    rows = []
    for T in ((1024,) if quick else (1024, 4096)):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4, T, 64, generator=g) for _ in range(3))  # (B, H, T, D)
        for kb in (None, 512):
            fns = {fp: (lambda fp=fp: blocked_clipped_attention(q, k, v, -0.025, 1.0, k_block=kb, first_pass=fp))
                   for fp in ("online", "two_pass")}
            for nt in threads:
                torch.set_num_threads(nt)
                with torch.no_grad():
                    t = timed(fns, repeats)
                for fp in fns:
                    rows.append(dict(T=T, key_block=kb or T, threads=nt, first_pass=fp, time_s=t[fp],
                                     vs_online=t[fp] / t["online"]))
                bar()
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from outlierfree.records import save_png

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    threads = sorted({r["threads"] for r in rows})
    for nt, style in zip(threads, ("-", "--")):
        for c in CASES:
            rs = [r for r in rows if r["case"] == c and r["threads"] == nt]
            axes[0].plot([r["n"] for r in rs], [r["x_bound"] for r in rs], style, marker="o", ms=3,
                         label=f"{c}, {nt} thr")
        rs = [r for r in rows if r["case"] == "two_pass" and r["threads"] == nt]
        axes[1].plot([r["n"] for r in rs], [r["vs_three_pass"] for r in rs], style, marker="o",
                     label=f"two-pass / three-pass, {nt} thr")
    axes[0].axhline(1.1, color="grey", lw=0.8, ls=":", label="goal: 1.1x bound")
    axes[1].axhline(0.85, color="grey", lw=0.8, ls=":", label="goal out of cache: 0.85")
    axes[1].axhline(1.0, color="black", lw=0.5)
    for ax, lab in zip(axes, ("time / copy-bandwidth bound (2 reads + 1 write)", "time ratio")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("row length N (float32 elements)")
        ax.set_ylabel(lab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.suptitle(title, fontsize=9)
    save_png(fig, path)


def fmt_n(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-n", default="64M", help="largest row length (e.g. 16M)")
    ap.add_argument("--threads", default=None, help="comma list of thread counts (default: 1 and all cores)")
    ap.add_argument("--quick", action="store_true", help="rows up to 4M elements, 2 repeats, T=1024 only")
    ap.add_argument("--out", default="benchmarks/results/softmax.json")
    a = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from outlierfree.attention import native
    from outlierfree.attention.two_pass import compiled_available
    from outlierfree.records import cpu, git_commit, machine, progress, write_json

    if not compiled_available():
        sys.exit("benchmarks/softmax.py: the compiled kernels are not available (no g++?); nothing to measure")
    if a.quick:
        a.repeats = min(a.repeats, 2)
        a.max_n = "4M"
    sizes = [n for n in SIZES if n <= _parse_n(a.max_n)]
    threads = [int(t) for t in a.threads.split(",")] if a.threads else sorted({1, os.cpu_count() or 1})
    with progress("softmax benchmark", len(sizes) * len(threads) + len(threads) * (2 if a.quick else 4)) as bar:
        rows = softmax_rows(sizes, threads, a.repeats, bar)
        brows = blocked_rows(threads, a.repeats, bar, a.quick)

    setup = dict(command=" ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), cpu=cpu()[0], isa=native.isa(),
                 compiled_with=" ".join(native.FLAGS), machine=machine(), commit=git_commit(),
                 llc_mib=llc_bytes() / 2**20, repeats=a.repeats, dtype="float32", min_elems=MIN_ELEMS)
    con = Console(width=200)
    for nt in threads:
        t = Table(title=f"softmax, float32, {nt} thread(s): fastest of {a.repeats}; x bound = time / (1.5 x copy time)")
        for col in ("N", "rows", "MiB", "cache", "copy GB/s", *(f"{c} ms" for c in CASES), "two/three",
                    "two x bound", "three x bound", "torch x bound"):
            t.add_column(col, justify="right")
        for n in sizes:
            rs = {r["case"]: r for r in rows if r["n"] == n and r["threads"] == nt}
            r0 = rs["two_pass"]
            t.add_row(fmt_n(n), str(r0["rows"]), f"{r0['working_set_mib']:.0f}", "in" if r0["in_cache"] else "out",
                      f"{r0['copy_gbps']:.1f}", *(f"{rs[c]['time_s'] * 1e3:.3f}" for c in CASES),
                      f"{r0['vs_three_pass']:.2f}", f"{r0['x_bound']:.2f}", f"{rs['three_pass']['x_bound']:.2f}",
                      f"{rs['torch']['x_bound']:.2f}")
        con.print(t)
    t = Table(title="blocked clipped attention forward, B=1 H=4 D=64, float32: first pass online vs two_pass")
    for col in ("T", "key block", "threads", "online ms", "two_pass ms", "two_pass / online"):
        t.add_column(col, justify="right")
    for r in brows:
        if r["first_pass"] == "two_pass":
            on = next(x for x in brows if x["first_pass"] == "online" and x["T"] == r["T"]
                      and x["key_block"] == r["key_block"] and x["threads"] == r["threads"])
            t.add_row(str(r["T"]), str(r["key_block"]), str(r["threads"]), f"{on['time_s'] * 1e3:.1f}",
                      f"{r['time_s'] * 1e3:.1f}", f"{r['vs_online']:.2f}")
    con.print(t)
    out_cache = [r for r in rows if r["case"] == "two_pass" and not r["in_cache"]]
    for nt in threads:
        oc = [r for r in out_cache if r["threads"] == nt]
        if oc:
            worst = max(oc, key=lambda r: r["vs_three_pass"])
            print(f"goal, {nt} thread(s), out of cache: two-pass/three-pass <= 0.85: worst {worst['vs_three_pass']:.2f} "
                  f"(N={fmt_n(worst['n'])}); two-pass within 1.1x of the copy bound: worst "
                  f"{max(r['x_bound'] for r in oc):.2f}x")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, dict(setup=setup, softmax=rows, blocked=brows))
    png = out.with_suffix(".png")
    plot(rows, png, f"softmax float32 on {cpu} ({setup['isa']}), fastest of {a.repeats}; commit {setup['commit']}")
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
