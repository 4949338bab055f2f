"""Forward+backward time of each attention variant against stock transformers (SDPA), one model, one run.

    python benchmarks/variants.py [--family bert] [--size small] [--batch 16] [--seq 128] [--repeats 10]

Prints a table and writes benchmarks/results/variants.json with each variant's median time and its ratio to stock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

import outlierfree as of
from outlierfree import AttentionConfig
from outlierfree import hf_compat
from outlierfree.models.build import model_config


def time_fwd_bwd(model, batch, repeats):
    model.train()
    for _ in range(2):  # warm-up
        model(**batch).loss.backward()
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", default="bert")
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/variants.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = model_config(a.family, a.size)
    if a.family == "vit":
        batch = dict(pixel_values=torch.randn(a.batch, cfg.num_channels, cfg.image_size, cfg.image_size),
                     labels=torch.randint(0, cfg.num_labels, (a.batch,)))
    else:
        ids = torch.randint(5, cfg.vocab_size, (a.batch, a.seq))
        batch = dict(input_ids=ids, labels=ids)
    cls = getattr(transformers, hf_compat.FAMILIES[a.family].task_class)
    rows = {"stock (sdpa)": time_fwd_bwd(cls._from_config(cfg, attn_implementation="sdpa"), batch, a.repeats),
            "stock (eager)": time_fwd_bwd(cls._from_config(cfg, attn_implementation="eager"), batch, a.repeats)}
    for name, ac in [("vanilla", AttentionConfig("vanilla")), ("clipped", AttentionConfig("clipped")),
                     ("gated", AttentionConfig("gated"))]:
        rows[name] = time_fwd_bwd(of.build_model(a.family, a.size, ac), batch, a.repeats)
    base = rows["stock (sdpa)"]
    print(f"{a.family}/{a.size}, batch {a.batch}, seq {a.seq}, {torch.get_num_threads()} threads, "
          f"median of {a.repeats} forward+backward steps")
    print(f"{'variant':<16}{'ms':>10}{'x stock sdpa':>14}")
    for k, v in rows.items():
        print(f"{k:<16}{v * 1000:>10.1f}{v / base:>14.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "transformers": transformers.__version__,
                               "seconds": rows, "ratio_to_stock_sdpa": {k: v / base for k, v in rows.items()}},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
