"""The numbers of the test-sized quick preset that must not change when code is moved (issue 18: "the quick
preset's results.json numbers are identical before and after").

    python tests/reproduce/golden.py OUT_DIR > tests/reproduce/golden_quick.json   # after a deliberate change

``OUT_DIR`` is a reproduce output made as ``tests/reproduce/test_reproduce.py::quick_run`` makes it (see
:data:`RUN`); only a change that is meant to move numbers regenerates the file, and its commit says why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# how the stored numbers were made: reproduce(PRESET, out, **RUN)
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


if __name__ == "__main__":
    json.dump(numbers(sys.argv[1]), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
