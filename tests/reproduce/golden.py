"""The numbers of the test-sized quick preset that must not change when code is moved (issue 18: "the quick
preset's results.json numbers are identical before and after").

    python tests/reproduce/golden.py OUT_DIR > tests/reproduce/golden_quick.json   # after a deliberate change
    python tests/reproduce/golden.py OUT_DIR --other-cpu "NAME"   # add another CPU's numbers to the stored file

``OUT_DIR`` is a reproduce output made as ``tests/reproduce/test_reproduce.py::quick_run`` makes it (see
:data:`RUN`); only a change that is meant to move numbers regenerates the file, and its commit says why.

Training numerics differ between CPUs (BLAS paths, vector widths), and a 3-step run amplifies them: Adam's first
updates are about ``lr * sign(grad)``, so a gradient entry near zero that rounds to the other sign moves its weight
by ``2 lr``. Measured: the BERT runs' numbers moved 1.2 % between an Intel Sapphire Rapids (AVX512-VNNI, AMX) and
an AMD EPYC (AVX512-VNNI, BF16) while OPT and ViT moved < 1e-4. So the stored file also keeps the numbers of every
other CPU it was checked on (``other_cpus``), and :func:`tolerance` is measured from them: three times the largest
relative difference seen between CPUs for that number, and never below the floor of float rounding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# how the stored numbers were made: reproduce(ReproduceRequest(PRESET, out, **RUN)).write(out)
PRESET = "quick"
RUN = {"families": ("bert", "opt", "vit"), "variants": ("vanilla", "clipped"), "max_steps": 3}
KEYS = ("fp", "w8a8", "w8a8_linear", "w8a8_ort", "max_inf_norm", "avg_kurtosis")


def numbers(out: str | Path) -> dict[str, Any]:
    """Per run (and per released checkpoint) the metric, FP, W8A8 numbers and outlier statistics of
    ``OUT/results.json``."""
    res = json.loads((Path(out) / "results.json").read_text())
    runs = {r["name"]: {k: r.get(k) for k in ("metric", *KEYS)} for r in res["runs"]}
    released = {f"{r['family']}-{r['variant']}": {k: (r.get(k) or {}).get("mean") for k in KEYS if k in r}
                for r in (res.get("released") or {}).get("table", [])}
    return {"runs": runs, "released": released}


# relative tolerance where no CPU difference was measured: float rounding of another CPU's kernels; ONNX Runtime's
# int8 kernels differ between CPUs (VNNI or not) by more
FLOOR = {"w8a8_ort": 1e-2}
FLOOR_DEFAULT = 1e-3
MARGIN = 3.0  # times the largest difference measured between CPUs


def tolerance(stored: dict[str, Any], group: str, name: str, key: str) -> float:
    """Relative tolerance of one stored number: ``MARGIN`` times the largest relative difference between the CPUs
    in ``stored["other_cpus"]`` and the stored value, or the float-rounding floor, whichever is larger."""
    want = stored[group][name][key]
    spread = 0.0
    for other in stored.get("other_cpus", {}).values():
        got = other.get(group, {}).get(name, {}).get(key)
        if isinstance(got, (int, float)) and want:
            spread = max(spread, abs(got - want) / abs(want))
    return max(FLOOR.get(key, FLOOR_DEFAULT), MARGIN * spread)


def _cpu() -> str:
    """The CPU's model name and the instruction sets that change float and int8 kernels."""
    from outlierfree.records import cpu

    name, flags = cpu()
    name = "unknown CPU" if name == "unknown" else name
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{name} ({', '.join(isa)})"


if __name__ == "__main__":
    now = numbers(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "--other-cpu":
        path = Path(__file__).with_name("golden_quick.json")
        stored = json.loads(path.read_text())
        label = sys.argv[3] if len(sys.argv) > 3 else _cpu()
        stored.setdefault("other_cpus", {})[label] = now
        path.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    else:
        json.dump(now, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
