"""Plot of the bert/mini cures measured over 4 mask draws (docs/results.md, fifth and sixth sittings).

Reads the `quantize --mask-draws 4` outputs (one directory each, named RECIPE-sSEED, plus `original`) and writes
bert-mini/mask_draws.json (W8A8 and float minus the original's float, per recipe and seed, with how each was made)
and bert-mini/mask_draws.png beside it:

    python docs/results/finetune/mask_draws_plot.py /work/ft-runs/md4
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RECIPES = {  # directory prefix -> the finetune flags beyond the common ones
    "s": "none",
    "pen": "infnorm 1e-4 (--outlier-penalty infnorm --penalty-weight 1e-4)",
    "lt-pen4": "--layer-tokens ordinary + infnorm 1e-4",
    "lt-pen3": "--layer-tokens ordinary + infnorm 1e-3",
    "lt-nopen": "--layer-tokens ordinary alone",
    # sixth sitting: --layer-tokens ordinary and the penalty read on the float forward (--penalty-on float)
    "pf-1e-3": "ordinary + infnorm 1e-3 on float (--penalty-on float)",
    "pf-1e-2": "ordinary + infnorm 1e-2 on float (--penalty-on float)",
    "pf-crest-1e-2": "ordinary + crest 1e-2 on float (--outlier-penalty crest --penalty-on float)",
    "pf-kurtosis-1e-2": "ordinary + kurtosis 1e-2 on float (--outlier-penalty kurtosis --penalty-on float)",
}
COMMON = ("outlierfree finetune src/outlierfree/released/bert-mini-vanilla --method retrofit+qat --steps 600 --lr 5e-5 "
          "--range-lr 5e-3 --calib-batches 16 --eval-batches 22 --layer-weight 1 --float-weight 3 "
          "--train-batches 512 --distill-positions masked --seed S")
MEASURE = "outlierfree quantize MODEL --calib-batches 16 --eval-batches 22 --mask-draws 4 --diag-batches 0"


def recipe_and_seed(name: str) -> tuple[str, int] | None:
    """(recipe prefix, seed) of a measurement directory: s1-600, pen-s0, lt-pen4-s2 ..."""
    if name.startswith("s") and name.endswith("-600"):
        return "s", int(name[1:-4])
    head, _, seed = name.rpartition("-s")
    return (head, int(seed)) if head in RECIPES and seed.isdigit() else None


def main(root: Path) -> None:
    """Write the JSON and the plot from the measurement directories under ``root``."""
    run = lambda d: json.loads((d / "quant.json").read_text())["runs"][0]  # noqa: E731
    ref = run(root / "original")["float"]["perplexity"]
    rows = []
    for d in sorted(p for p in root.iterdir() if (p / "quant.json").exists()):
        rs = recipe_and_seed(d.name)
        if rs is None:
            continue
        r = run(d)
        rows.append({"recipe": RECIPES[rs[0]], "seed": rs[1], "w8a8_minus_original_float":
                     r["quantized"]["perplexity"] - ref, "float_minus_original_float": r["float"]["perplexity"] - ref})
    out = Path(__file__).parent / "bert-mini"
    out.mkdir(exist_ok=True)
    orig = run(root / "original")
    (out / "mask_draws.json").write_text(json.dumps({
        "model": "released vanilla bert/mini", "fine-tune": COMMON, "measurement": MEASURE,
        "original": {"float": ref, "w8a8": orig["quantized"]["perplexity"]}, "rows": rows,
        "machine": "2 cores AMD EPYC (avx2, avx512f, avx512_vnni, avx512_bf16; no AMX)"}, indent=1))
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, (key, label) in enumerate(RECIPES.items()):
        ys = [r["w8a8_minus_original_float"] for r in rows if r["recipe"] == label]
        if ys:
            ax.scatter([i] * len(ys), ys, color="C%d" % i, zorder=3)
            ax.hlines(sum(ys) / len(ys), i - 0.25, i + 0.25, color="C%d" % i)
    ax.axhline(0.5, color="k", ls=":", lw=1, label="goal (+0.5)")
    ax.set_xticks(range(len(RECIPES)), [v.split(" (")[0].replace("--layer-tokens ordinary", "ordinary").replace(" alone", "\nalone")
                                          .replace(" + ", "\n+ ").replace(" on float", "\non float")
                                          for v in RECIPES.values()], fontsize=6)
    ax.set_ylabel("W8A8 - original float (perplexity)")
    ax.set_title(f"bert/mini cures, 600 steps, 4 mask draws (original: +{orig['quantized']['perplexity'] - ref:.1f})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mask_draws.png", dpi=120)
    print(f"wrote {out / 'mask_draws.json'}, {out / 'mask_draws.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
