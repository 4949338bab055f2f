"""The fine-tuning table: what each cure buys under full static W8A8, against the ORIGINAL float model.

    # first the fine-tunes (each one command; see docs/finetune.md), then:
    python benchmarks/finetune.py --run runs/minilm-qat --run runs/minilm-rq [--out docs/results/finetune-minilm]

Rows, all on the held-out evaluation batches the runs used (the runs must share the source model and data):
    nothing            the original checkpoint, ranges calibrated (the runs' "before")
    dynamic per-token  the original checkpoint, activations quantized per token at run time (simulation only: the
                       exporter writes static QDQ), same site set and weights
    <method>           each run's cured model with its learned ranges (its "after"), and its CPU minutes
Each in float (the model's own float output), simulated W8A8 and real INT8 in ONNX Runtime where the run measured
it. Writes finetune.md (table), finetune.json and finetune.png into --out; records the machine and its ISA flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def isa() -> str:
    """CPU model and the ISA flags that decide INT8 speed."""
    from outlierfree.records import cpu

    name, flags = cpu()
    name = "?" if name == "unknown" else name
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{name}; {' '.join(have) or 'no avx2'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="a finished `outlierfree finetune` run directory")
    ap.add_argument("--out", default="finetune-table", help="where the table, JSON and plot go")
    ap.add_argument("--no-dynamic", action="store_true", help="skip the dynamic per-token row")
    args = ap.parse_args()

    import torch

    from outlierfree.finetune.config import FinetuneConfig
    from outlierfree.finetune.loop import qat_config
    from outlierfree.finetune.measure import dynamic_config, measure, outputs
    from outlierfree.quant.run import load_for_quant
    from outlierfree.records import git_commit, machine, save_png, write_json, write_text

    runs = []
    for r in args.run:
        d = Path(r) / "model"
        res = json.loads((d / "finetune_result.json").read_text())
        cfg = json.loads((d / "finetune_config.json").read_text())
        if "after" not in res:
            sys.exit(f"{r} was run with --no-measure; fine-tune it with the measurement")
        runs.append((r, cfg, res))
    first_cfg = runs[0][1]
    rows = [{"row": "nothing", **_cells(runs[0][2]["before"]), "cpu_min": 0.0}]
    if not args.no_dynamic:  # the original under dynamic per-token activations, on the same held-out batches
        c = FinetuneConfig(**{k: v for k, v in first_cfg.items() if k in FinetuneConfig.__dataclass_fields__
                              and k != "attention"})
        q = load_for_quant(c.model, calib_batches=c.train_batches, eval_batches=c.eval_batches,
                           batch_size=c.batch_size, seq_len=c.seq_len, seed=c.seed, data=c.data)
        ev = q.batches.eval[:c.measure_batches] if c.measure_batches else q.batches.eval
        with torch.no_grad():
            refs = outputs(q.model, ev, q.task)
        dyn = measure(q.model, q.batches.calib[:c.calib_batches], ev, refs, dynamic_config(qat_config(c)), q.task,
                      real_int8=False)
        rows.append({"row": "dynamic per-token", **_cells(dyn), "cpu_min": 0.0})
    for r, cfg, res in runs:
        label = cfg["method"] + (f" ({cfg['attention']['variant']})" if cfg.get("attention") else "") + \
            (f", {cfg['penalty']} x {cfg['penalty_weight']}" if cfg.get("penalty", "none") != "none" else "") + \
            (f", float distillation x {cfg['float_weight']}" if cfg.get("float_weight") else "") + \
            f", {cfg['steps']} steps"
        rows.append({"row": label, **_cells(res["after"]), "cpu_min": res["train_seconds"] / 60, "run": r})
    keys = [k for k in rows[0] if k not in ("row", "cpu_min", "run")]
    lines = [f"Model `{first_cfg['model']}`, sites `{first_cfg['sites']}`, held-out data: "
             f"{runs[0][2]['data'].get('eval_split')} of {runs[0][2]['data'].get('data')}; machine: {machine()}; "
             f"{isa()}; commit {git_commit()}", "",
             "| row | " + " | ".join(keys) + " | fine-tuning minutes |", "|" + "---|" * (len(keys) + 2)]
    for row in rows:
        lines.append(f"| {row['row']} | " + " | ".join(_f(row.get(k)) for k in keys) + f" | {row['cpu_min']:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "finetune.md", "\n".join(lines) + "\n")
    write_json(out / "finetune.json", {"rows": rows, "machine": machine(), "isa": isa(), "commit": git_commit()})
    _plot(rows, keys, out / "finetune.png", save_png)
    print("\n".join(lines))


def _cells(m: dict) -> dict:
    out = {}
    for where, key in (("float", "float"), ("sim", "simulated"), ("int8", "int8")):
        for k, v in (m.get(key) or {}).items():
            if k != "output_sqnr_db":
                out[f"{where} {k}"] = v
    return out


def _f(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


def _plot(rows, keys, path, save_png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next((k for k in keys if k.startswith("sim ")), None)
    if metric is None:
        return
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
    names = [r["row"] for r in rows]
    for i, where in enumerate(("sim", "int8")):
        k = metric.replace("sim ", f"{where} ")
        vals = [r.get(k) or 0 for r in rows]
        ax.barh([j + 0.4 * i for j in range(len(rows))], vals, height=0.4, label=k)
    ax.set_yticks([j + 0.2 for j in range(len(rows))], names, fontsize=7)
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    ax.set_title("W8A8 after fine-tuning, against the original float model", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
