"""The directory ``outlierfree export`` writes: what a user ships and :func:`outlierfree.deploy.load` reads.

Layout (names chosen so the ecosystem's loaders find the files where they look for them: ``model.onnx`` is the
default file of Optimum's ORTModel classes, ``openvino_model.xml`` / ``.bin`` that of optimum-intel's OVModel
classes, ``config.json`` and ``tokenizer.json`` those of transformers):

- ``model.onnx``: the static QDQ INT8 model (ONNX Runtime);
- ``openvino_model.xml`` / ``.bin``: the same model as OpenVINO IR (``--runtime openvino``);
- ``model_float.onnx``: the float model, for comparison;
- ``config.json``, ``tokenizer.json`` (+ ``tokenizer_config.json``): the model's configuration and tokenizer;
- ``ranges.json``: every activation site's calibrated range, scale and zero point, and the weights' grids;
- ``README.md``: the card (what it is, how it was made, how well it agrees with float, how to run it);
- ``export.json``: the full record; its ``deploy`` entry is what :func:`outlierfree.deploy.load` needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# file names inside an export directory: real_int8 writes the left ones, the bundle renames them
RENAMES = {"model_int8.onnx": "model.onnx", "model_int8.xml": "openvino_model.xml",
           "model_int8.bin": "openvino_model.bin"}


def ranges(qm: Any) -> dict[str, Any]:
    """Every activation site's grid (range, scale, zero point, bits) and the quantized weights' grids, JSON-ready."""
    from ..quant.quantizer import qparams

    acts = {}
    for name, q in qm.act.items():
        scale, zp, qmin, qmax = qparams(q.lo.float(), q.hi.float(), q.spec.bits, q.spec.symmetric)
        acts[name] = {"kind": qm.site_of[name].kind, "lo": float(q.lo), "hi": float(q.hi), "scale": float(scale),
                      "zero_point": int(zp), "qmin": qmin, "qmax": qmax}
    return {"config": qm.config.to_dict(), "activations": acts, "aliases": dict(qm.aliases),
            "weights": qm.weight_table()}


def finish(d: Path, qm: Any, model: Any, tokenizer: Any, task: str, inputs: list[str], max_length: int | None,
           runtime: str, report: dict[str, Any]) -> dict[str, Any]:
    """Turn ``d`` (where :func:`~.realint8.real_int8` wrote its files) into the shippable layout: rename the model
    files, write config, tokenizer, ranges and the card. Returns the ``deploy`` entry of export.json."""
    from ..records import dumps

    for old, new in RENAMES.items():
        if (d / old).exists():
            os.replace(d / old, d / new)
    model.config.save_pretrained(d)  # config.json
    meta: dict[str, Any] = {"runtime": runtime, "task": task, "inputs": inputs,
                            "files": {"onnxruntime": "model.onnx"}, "max_length": max_length}
    if (d / "openvino_model.xml").exists():
        meta["files"]["openvino"] = "openvino_model.xml"
    if tokenizer is not None:
        tokenizer.save_pretrained(d)  # tokenizer.json (+ tokenizer_config.json, special tokens)
        meta["pad_token_id"] = tokenizer.pad_token_id
        meta["pad_token"] = tokenizer.pad_token
        meta["padding_side"] = getattr(tokenizer, "padding_side", "right")
    (d / "ranges.json").write_text(dumps(ranges(qm)) + "\n")
    (d / "README.md").write_text(card(report, meta))
    return meta


def card(report: dict[str, Any], meta: dict[str, Any]) -> str:
    """The model card (README.md of the export directory)."""
    m = report.get("metric")
    rows = [("PyTorch float", report.get("pytorch_float")), ("simulated W8A8", report.get("simulated")),
            ("ONNX Runtime INT8", report.get("onnxruntime_int8")), ("OpenVINO INT8", report.get("openvino_int8"))]
    table = ["| model | " + str(m) + " | output SQNR vs float (dB) |", "|---|---|---|"]
    for name, r in rows:
        if r:
            sq = r.get("output_sqnr_db")
            table.append(f"| {name} | {r.get(m, float('nan')):.4g} | {'(reference)' if sq is None else f'{sq:.1f}'} |")
    files = ", ".join(f"`{f}`" for f in meta["files"].values())
    wdt = (report.get("export") or {}).get("weight_dtype", "int8")
    usage = ('model(["A sentence."])  # ' + ("last hidden state (B, T, H); model.embed(texts): sentence embeddings"
                                            if meta["task"] == "encoder" else "logits")
             if "input_ids" in meta["inputs"] else "model(pixels)  # float32 (B, C, H, W) -> logits (B, classes)")
    return "\n".join([
        f"# {Path(str(report.get('model'))).name}: static INT8 (W8A8, {report['config']['describe']})", "",
        f"Exported by outlierfree from `{report.get('model')}` ({report.get('model_class')}, task {meta['task']}) "
        f"with `{report.get('command')}` at commit {report.get('commit')}.",
        f"Ranges: {report['ranges']['source']}; {report['ranges']['activation_sites']} activation sites, "
        f"{report['ranges']['quantized_weights']} quantized weights (grids in `ranges.json`), stored as {wdt}"
        + (" around zero point 128 (for CPUs without VNNI)." if wdt == "uint8" else "."), "",
        *(table if len(table) > 2 else ["(not evaluated: exported with --eval-batches 0)"]), "",
        f"Evaluated on {report.get('eval_batches')} validation batches; data: "
        + ", ".join(f"{k} {v}" for k, v in (report.get("data") or {}).items() if v is not None) + ".", "",
        f"Files: {files} (INT8), `model_float.onnx` (float), `config.json`, `tokenizer.json`, `ranges.json`, "
        f"`export.json`.", "",
        "Run it (numpy, tokenizers and onnxruntime or openvino; torch not needed):", "",
        "```python", "from outlierfree.deploy import load", "model = load(\"THIS_DIRECTORY\")", usage, "```", "",
        "Or directly: `onnxruntime.InferenceSession(\"model.onnx\")` / `openvino.Core().compile_model("
        "\"openvino_model.xml\")` with inputs " + ", ".join(f"`{i}`" for i in meta["inputs"]) + ".", ""])
