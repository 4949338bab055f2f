"""Training throughput: stock transformers (SDPA attention) against outlierfree's vanilla, clipped and gated.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py                  # bert, opt, vit at size tiny
    python benchmarks/train_throughput.py --families bert --size mini --batch 32 --seq-len 128 --device cuda

For each family, the four models (same size, same batch, same loss: the Hugging Face model's own ``labels`` loss)
run full training steps (forward, backward, AdamW) in an interleaved round-robin, so that a load spike on a shared
machine hits every model alike; each model's throughput is the median over rounds. Prints a table and writes JSON
with tokens/s (images/s for ViT) and the ratio of each variant to stock. Goals: vanilla >= 0.95x, gated >= 0.9x,
clipped >= 0.8x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from outlierfree import hf_compat
from outlierfree.models.build import build_model, model_config

GOALS = {"vanilla": 0.95, "gated": 0.90, "clipped": 0.80}
VARIANTS = ("stock", "vanilla", "clipped", "gated")


def make_model(family: str, size: str, variant: str, device: str) -> torch.nn.Module:
    """Stock HF model on SDPA, or an outlierfree build of the same config."""
    over = {"hidden_dropout_prob": 0.0} if family != "opt" else {"dropout": 0.0}
    if variant == "stock":
        torch.manual_seed(0)
        cls = hf_compat.transformers_class(hf_compat.FAMILIES[family].task_class)
        model = cls(model_config(family, size, **over))
        hf_compat.set_attention_implementation(model, "sdpa")
    else:
        model = build_model(family, size, variant, seed=0, **over)
    return model.to(device).train()


def make_batch(family: str, model: torch.nn.Module, batch: int, seq_len: int, device: str) -> tuple[dict, int]:
    """A random batch and the number of tokens (images) in it."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    if family == "vit":
        x = torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=g)
        y = torch.randint(0, c.num_labels, (batch,), generator=g)
        return {"pixel_values": x.to(device), "labels": y.to(device)}, batch
    ids = torch.randint(5, c.vocab_size, (batch, seq_len), generator=g)
    labels = ids.clone()
    if family == "bert":  # masked LM: 15% of positions carry a label
        labels[torch.rand(batch, seq_len, generator=g) > 0.15] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device)}, batch * seq_len


def step_fn(model: torch.nn.Module, batch: dict, device: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    """Run the benchmark, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="bert,opt,vit")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()

    results = []
    for family in args.families.split(","):
        models, steps, units = {}, {}, {}
        for v in VARIANTS:
            models[v] = make_model(family, args.size, v, args.device)
            batch, units[v] = make_batch(family, models[v], args.batch, args.seq_len, args.device)
            steps[v] = step_fn(models[v], batch, args.device)
            for _ in range(args.warmup):
                steps[v]()
        rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v in VARIANTS:  # interleaved: a load spike hits every model alike
                sync(args.device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[v]()
                sync(args.device)
                rates[v].append(units[v] * args.steps / (time.perf_counter() - t0))
        med = {v: statistics.median(r) for v, r in rates.items()}
        for v in VARIANTS:
            ratio = med[v] / med["stock"]
            results.append({"family": family, "size": args.size, "variant": v, "batch": args.batch,
                            "seq_len": None if family == "vit" else args.seq_len,
                            "unit": "images/s" if family == "vit" else "tokens/s", "throughput": med[v],
                            "throughput_rounds": rates[v], "ratio_to_stock": ratio, "goal": GOALS.get(v),
                            "meets_goal": None if v == "stock" else ratio >= GOALS[v]})
        del models, steps

    head = f"{'family':7} {'variant':8} {'throughput':>14} {'unit':9} {'x stock':>8} {'goal':>6}  ok"
    print(f"training throughput, {args.device}, size {args.size}, batch {args.batch}, seq {args.seq_len}, "
          f"median of {args.rounds} rounds x {args.steps} steps, threads {torch.get_num_threads()}")
    print(head)
    print("-" * len(head))
    for r in results:
        goal = f"{r['goal']:.2f}" if r["goal"] else ""
        ok = "" if r["meets_goal"] is None else ("yes" if r["meets_goal"] else "NO")
        print(f"{r['family']:7} {r['variant']:8} {r['throughput']:14,.0f} {r['unit']:9} {r['ratio_to_stock']:8.3f} "
              f"{goal:>6}  {ok}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, **vars(args)}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
