"""Export a model under the W8A8 simulator to ONNX: a float model and a static QDQ INT8 model.

How the INT8 graph is made (no ONNX library knows our sites, so this mapping is ours):

1. The simulator's :meth:`~outlierfree.quant.simulator.QuantizedModel.exporting` mode makes every activation site
   and every quantized weight compute its fake quantization as ``torch.fake_quantize_per_tensor_affine`` with the
   calibrated scale and zero point, which torch's TorchScript-based ONNX exporter (``dynamo=False``) writes as a
   QuantizeLinear -> DequantizeLinear pair. The hooks, the attention probe and the op mode are all active while the
   model is traced, so the pairs sit exactly where the simulator rounds, and nowhere else (aliases stay aliases).
   (The dynamo exporter was tried: torch.export stops on the simulator's data-dependent Python checks.)
2. Weight pairs (a QuantizeLinear whose input is a float initializer) are folded here: the integers are computed
   once with numpy (round half to even, like QuantizeLinear) and stored as an int8 (uint8 for an all-positive
   LayerNorm gain) initializer feeding the DequantizeLinear. ONNX Runtime's QDQ fusions then replace
   DQ -> MatMul/Gemm/Conv -> Q patterns with integer kernels where it has them; elsewhere the pair stays and
   computes the same rounding as the simulator.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import OutlierfreeError, require
from .graph import const_values, consumers
from .ort import require_onnx  # noqa: F401  (re-exported: callers import it from here)

OPSET = 17


class _Scored(nn.Module):
    """Positional-input wrapper returning the tensor a task is scored on (what the exporter traces)."""

    def __init__(self, model: nn.Module, names: list[str], task: str):
        super().__init__()
        self.model = model
        self.names = names
        self.task = task

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, inputs)))
        if self.task == "encoder":
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return out.logits


def input_names(batch: dict[str, torch.Tensor]) -> list[str]:
    """The model inputs of a batch, in a fixed order (labels are scored outside the graph)."""
    return [k for k in batch if k != "labels"]


def _export(model: nn.Module, batch: dict[str, torch.Tensor], task: str, path: Path) -> None:
    names = input_names(batch)
    example = tuple(batch[n] for n in names)
    # batch (and sequence) sizes stay free: evaluation's last batch and the benchmark's shapes differ from tracing
    axes = {n: ({0: "batch"} if batch[n].dim() != 2 else {0: "batch", 1: "sequence"}) for n in names}
    axes["output"] = {0: "batch"} if task == "image" else {0: "batch", 1: "sequence"}
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # tracer warnings about Python values in the graph (checked by parity)
            torch.onnx.export(_Scored(model, names, task), example, str(path), dynamo=False, opset_version=OPSET,
                              input_names=names, output_names=["output"], dynamic_axes=axes,
                              do_constant_folding=True)
    except OutlierfreeError:
        raise
    except Exception as e:  # an op without an ONNX mapping, a shape the tracer rejects
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise OutlierfreeError(f"ONNX export of {type(model).__name__} failed: {msg}",
                               "export a BERT/OPT/ViT-style model whose ops torch.onnx supports at opset "
                               f"{OPSET}, or report the op") from None
    finally:
        model.train(was)


WEIGHT_DTYPES = ("int8", "uint8")


def require_weight_dtype(weight_dtype: str) -> None:
    """One-line error for a weight storage type the exporter does not write (the one check of ``--weight-dtype``,
    for the export request, the quantize scorer and the exporter itself)."""
    require(weight_dtype in WEIGHT_DTYPES, f"unknown --weight-dtype {weight_dtype!r}",
            f"use one of {', '.join(WEIGHT_DTYPES)}")


def fold_weight_qdq(path: Path, weight_dtype: str = "int8") -> dict[str, int]:
    """Replace every weight QuantizeLinear (input: a float initializer) by an int8/uint8 initializer, in place.

    ``weight_dtype="uint8"`` stores the signed (symmetric, zero point 0) weights as uint8 around zero point 128:
    the same dequantized values, (q + 128 - 128) * scale. Why: without VNNI (AVX2-only CPUs) ONNX Runtime's u8 x s8
    kernels multiply with vpmaddubsw, whose 16-bit pair sums saturate where a weight near the grid's end meets a
    large activation (the output SQNR of per-channel weights fell 1-7 dB below the simulator's on such a CPU);
    its u8 x u8 kernels do not saturate (ONNX Runtime's quantization guide gives the same remedy). Where VNNI exists
    int8 is as exact and faster.

    Returns counts: ``weights`` folded, ``activation_qdq`` pairs left (the activation sites)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    require_weight_dtype(weight_dtype)
    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name for i in g.initializer}
    vals = const_values(g)
    # the exporter deduplicates equal initializers (LayerNorm gains at init) into Identity nodes of one of them
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.input[0] in inits}
    keep, new_inits, folded = [], [], 0
    rename: dict[str, str] = {}
    new_zp: dict[str, str] = {}  # uint8 storage: the folded QuantizeLinear's output -> its new zero point
    for n in g.node:
        src = alias.get(n.input[0], n.input[0]) if n.input else ""
        if n.op_type == "QuantizeLinear" and src in inits and n.input[1] in vals and n.input[2] in vals:
            w = vals[src].astype(np.float64)
            scale, zp_arr = vals[n.input[1]].astype(np.float32), vals[n.input[2]]
            if scale.size > 1:  # per-channel: scales and zero points broadcast along the QDQ pair's axis
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % w.ndim
                shape = [1] * w.ndim
                shape[axis] = -1
                scale, zp_b = scale.reshape(shape), zp_arr.astype(np.int64).reshape(shape)
            else:
                scale, zp_b = scale.reshape(()), int(zp_arr.reshape(()))
            info = np.iinfo(zp_arr.dtype)  # int8 or uint8: the grid the exporter chose from (qmin, qmax)
            # QuantizeLinear's own arithmetic: saturate(round_half_even(x / scale) + zero_point)
            q = np.clip(np.rint(w / scale) + zp_b, info.min, info.max).astype(zp_arr.dtype)
            name = n.output[0] + "_int"
            if weight_dtype == "uint8" and zp_arr.dtype == np.int8:  # the same values around zero point 128
                q = (q.astype(np.int16) + 128).astype(np.uint8)
                zp_u8 = (zp_arr.astype(np.int16) + 128).astype(np.uint8)
                new_zp[n.output[0]] = name + "_zero_point"
                new_inits.append(numpy_helper.from_array(zp_u8, new_zp[n.output[0]]))
            new_inits.append(numpy_helper.from_array(q, name))
            rename[n.output[0]] = name
            folded += 1
            continue
        keep.append(n)
    for n in keep:
        if n.op_type == "DequantizeLinear" and n.input[0] in new_zp:  # its zero point moves with the integers
            while len(n.input) < 3:
                n.input.append("")
            n.input[2] = new_zp[n.input[0]]
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    # float weights that only fed a folded QuantizeLinear are dead now
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    dead = [i for i in g.initializer if i.name not in used]
    for i in dead:
        g.initializer.remove(i)
    lookups = _gather_before_dequantize(g, {i.name for i in new_inits})
    transposed = _transpose_into_weights(g, {i.name for i in new_inits})
    onnx.save(model, str(path))
    pairs = sum(1 for n in g.node if n.op_type == "QuantizeLinear")
    return {"weights": folded, "activation_qdq": pairs, "dropped_float_initializers": len(dead),
            "integer_lookups": lookups, "transposes_folded": transposed}


def _transpose_into_weights(g: Any, int_weights: set[str]) -> int:
    """``DQ(W_int) -> Transpose -> MatMul`` (torch's linear layers export as ``x @ W.T``) becomes
    ``DQ(W_int.T) -> MatMul``: the integers are stored transposed (a per-channel axis moves with them).

    Exact (transposing commutes with an elementwise dequantization), and it leaves the pattern both runtimes fuse
    into integer MatMuls without relying on their transpose-pushing passes. Returns the number folded."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in g.initializer}
    vals = const_values(g)
    users = consumers(g)
    graph_outputs = {o.name for o in g.output}
    done = 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in int_weights]:
        tr = users.get(dq.output[0], [])
        if len(tr) != 1 or tr[0].op_type != "Transpose" or dq.output[0] in graph_outputs \
                or len(users.get(dq.input[0], [])) != 1:
            continue
        tr = tr[0]
        w = numpy_helper.to_array(inits[dq.input[0]])
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), list(range(w.ndim))[::-1])
        scale = vals.get(dq.input[1])
        if scale is None:
            continue
        new = numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), dq.input[0])
        inits[dq.input[0]].CopyFrom(new)
        if scale.size > 1:  # the per-channel axis is where that dim went
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % w.ndim
            for a in list(dq.attribute):
                if a.name == "axis":
                    dq.attribute.remove(a)
            dq.attribute.append(helper.make_attribute("axis", perm.index(axis)))
        dq.output[0] = tr.output[0]  # the DQ now produces what the Transpose did
        g.node.remove(tr)
        done += 1
    return done


def _gather_before_dequantize(g: Any, int_weights: set[str]) -> int:
    """Embedding lookups in the integer table: ``DQ(table) -> Gather(ids)`` becomes ``Gather(table, ids) -> DQ``.

    Exact (a per-tensor DequantizeLinear commutes with picking rows), and it matters: ONNX Runtime keeps a DQ of an
    initializer as a node, so the first form dequantizes the whole table on every run (36 ms of 210 for
    all-MiniLM-L6-v2's 30522 x 384 table at batch 8 x 128). A per-row (per-channel) table picks each row's scale
    and zero point with the row. Returns the number of lookups rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    vals = const_values(g)
    users = consumers(g)
    graph_outputs = {o.name for o in g.output}
    nodes = list(g.node)
    done = 0
    for dq in [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in int_weights]:
        out = dq.output[0]
        # row lookups; a tied table's other users (an LM head's MatMul) keep the dequantized table
        gathers = [u for u in users.get(out, []) if u.op_type == "Gather" and u.input[0] == out]
        others = len(users.get(out, [])) - len(gathers) + (out in graph_outputs)
        if not gathers:
            continue
        scale = vals.get(dq.input[1])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        ga_axis = [next((a.i for a in ga.attribute if a.name == "axis"), 0) for ga in gathers]
        if scale is None or (scale.size > 1 and any(a != 0 for a in ga_axis)):
            continue  # a per-channel table is rewritten for row lookups (Gather on axis 0) only
        for k, ga in enumerate(gathers):
            rows = f"{ga.output[0]}_int"
            new_ga = helper.make_node("Gather", [dq.input[0], ga.input[1]], [rows], name=f"{ga.name}_int",
                                      **{a.name: helper.get_attribute_value(a) for a in ga.attribute})
            i = nodes.index(ga)
            if scale.size == 1:  # one grid: dequantize the picked rows
                nodes[i:i + 1] = [new_ga, helper.make_node("DequantizeLinear", [rows, *dq.input[1:]], [ga.output[0]],
                                                           name=f"{dq.name}_rows{k}")]
            elif axis % 2 == 1:  # one grid per column: the columns are the rows' last dim
                nodes[i:i + 1] = [new_ga, helper.make_node("DequantizeLinear", [rows, *dq.input[1:]], [ga.output[0]],
                                                           name=f"{dq.name}_rows{k}", axis=-1)]
            else:  # one grid per row (per output channel of the table): pick each row's scale and zero point too
                # (q - zp) * scale in float32, what DequantizeLinear computes; (..., H) rows times (..., 1) scales
                p = f"{dq.name}_rows{k}"
                zp = dq.input[2] if len(dq.input) > 2 else None
                if zp is not None and zp in vals and not np.any(vals[zp]):
                    zp = None  # symmetric rows (zero point 0): (q - 0) * scale, no subtraction to run
                sc = dq.input[1]
                if others:  # a tied head keeps the DQ: the lookup reads its own copies of the scales and zero
                    # points (OpenVINO decompresses a weight to float when its grid also feeds other ops: a float
                    # head, 12 of 20 ms for bert/mini at batch 8 x 128)
                    sc, zp = f"{p}_scale", (f"{p}_zero_point" if zp else None)
                    g.initializer.append(numpy_helper.from_array(vals[dq.input[1]].copy(), sc))
                    if zp:
                        g.initializer.append(numpy_helper.from_array(vals[dq.input[2]].copy(), zp))
                nodes[i:i + 1] = [
                    new_ga,
                    helper.make_node("Cast", [rows], [f"{p}_f"], to=onnx.TensorProto.FLOAT),
                    helper.make_node("Gather", [sc, ga.input[1]], [f"{p}_s"], axis=0),
                    helper.make_node("Unsqueeze", [f"{p}_s", f"{p}_axes"], [f"{p}_s1"]),
                    *([helper.make_node("Cast", [zp], [f"{p}_zf"], to=onnx.TensorProto.FLOAT),
                       helper.make_node("Gather", [f"{p}_zf", ga.input[1]], [f"{p}_z"], axis=0),
                       helper.make_node("Unsqueeze", [f"{p}_z", f"{p}_axes"], [f"{p}_z1"]),
                       helper.make_node("Sub", [f"{p}_f", f"{p}_z1"], [f"{p}_c"])] if zp else []),
                    helper.make_node("Mul", [f"{p}_c" if zp else f"{p}_f", f"{p}_s1"], [ga.output[0]]),
                ]
                g.initializer.append(onnx.helper.make_tensor(f"{p}_axes", onnx.TensorProto.INT64, [1], [-1]))
        if not others:
            nodes.remove(dq)
        done += len(gathers)
    del g.node[:]
    g.node.extend(nodes)
    return done


def additive_masks(path: Path) -> int:
    """Rewrite the attention's two masked fills as arithmetic on a mask-sized tensor, in place; returns the number
    of nodes rewritten.

    - ``Where(mask, -big, scores)`` (the masked fill before the softmax; ``-big`` is -inf or the dtype's minimum)
      becomes ``scores + Where(mask, -big, 0)``.
    - ``Where(mask, 0, probs)`` (masked keys' probabilities set to exactly zero) becomes
      ``probs * Where(mask, 0, 1)``.

    Both are exact for finite inputs (x + 0 = x, x * 1 = x, x * 0 = 0), which the attention guarantees: it fills
    with the dtype's minimum, not -inf, so even a fully masked row has a finite softmax. They are faster because
    the Where then runs on the (B|1, 1, Tq, Tk) condition, H times smaller than the scores, and ONNX Runtime's
    broadcasting Add and Mul are vectorised where its broadcasting Where is not (about 7 ms per Where per layer for
    all-MiniLM-L6-v2 at batch 8 x 128, 2 threads). Applied to the float and the INT8 model alike, so comparisons
    stay fair.
    """
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    g = model.graph
    vals = const_values(g)

    def scalar(name: str) -> float | None:
        v = vals.get(name)
        return float(v.reshape(())) if v is not None and v.size == 1 and v.dtype == np.float32 else None

    def const(name: str, value: float) -> Any:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.FLOAT, [],
                                                                                   [value]))

    prod = {o: n for n in g.node for o in n.output}

    def after_softmax(name: str, hops: int = 6) -> bool:
        # the zeroing fill is rewritten only on a softmax's (clipped, cast, quantized) output: finite by construction
        n = prod.get(name)
        while n is not None and hops > 0:
            if n.op_type == "Softmax":
                return True
            if n.op_type not in ("Cast", "Clip", "Mul", "Add", "Sub", "QuantizeLinear", "DequantizeLinear",
                                 "Max", "Min"):
                return False
            n, hops = prod.get(n.input[0]), hops - 1
        return False

    def small_then(n: Any, other: float, op: str) -> list[Any]:
        # Where(mask, fill, other) on the mask's shape, then op(data, that): the rewrite of one masked fill
        c, small = f"{n.name}_{op.lower()}_const", f"{n.name}_{op.lower()}_small"
        return [const(c, other), helper.make_node("Where", [n.input[0], n.input[1], c], [small], name=small),
                helper.make_node(op, [n.input[2], small], list(n.output), name=f"{n.name}_{op.lower()}")]

    nodes, k = [], 0
    for n in g.node:
        fill = scalar(n.input[1]) if n.op_type == "Where" and len(n.input) == 3 and n.input[2] not in vals else None
        if fill is not None and fill < -1e30:  # masked fill of the scores: scores + Where(mask, -big, 0)
            k += 1
            nodes += small_then(n, 0.0, "Add")
            continue
        if fill == 0.0 and after_softmax(n.input[2]):  # masked probabilities set to zero: probs * Where(mask, 0, 1)
            k += 1
            nodes += small_then(n, 1.0, "Mul")
            continue
        nodes.append(n)
    if k:
        del g.node[:]
        g.node.extend(nodes)
        onnx.save(model, str(path))
    return k


LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")
PROJECTION_OPS = ("MatMul", "Gemm", "Conv", "Add", "Mul")  # a weight's product, a bias or a scale applied to it


def hoist_quantizers(path: Path, out: Path | None = None) -> dict[str, int]:
    """Move activation quantizers above the layout ops that feed them; writes ``out`` (default: ``path`` in place)
    and returns what was rewritten. Used for the OpenVINO IR (:func:`outlierfree.export.openvino.to_ir`).

    - ``x -> Reshape/Transpose... -> Q -> DQ -> consumers`` becomes ``x -> Q -> DQ -> Reshape/Transpose... ->
      consumers`` for a per-tensor (one scale, one zero point) pair: exact, because a layout op moves values without
      changing them and a per-tensor grid rounds every value alike. The attention's Q, K and V sites (rounded after
      the head split, where the attention reads them) land on the projection's output, where OpenVINO fuses the
      quantizer into the projection's integer kernel instead of running it standalone (all-MiniLM-L6-v2 under
      ``--sites matmul``, batch 8 x 128: the attention Subgraph 10.5 -> 6.4 ms, 3.3 -> 1.7 ms of standalone
      FakeQuantize). ONNX Runtime's QDQ fusions prefer the pairs where they are (the same rewrite made its
      batch-8 run 6-8 % slower), so its graph keeps them.
    - a ``Cast`` to float of a DequantizeLinear's (already float) output is dropped: the simulator casts its
      rounded value back to the input's dtype, a no-op in a float32 graph that only separates patterns.

    Only chains that start at a projection's output (an op reading a weight or a bias) are moved, only when their
    intermediate tensors have no other value reader (another reader would see the rounded values; a ``Shape``
    reader is fine), and never past a graph output."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    vals = const_values(g)
    outputs = {o.name for o in g.output}
    prod = {o: n for n in g.node for o in n.output}
    rename: dict[str, str] = {}
    casts = []
    for n in g.node:  # no-op casts after a dequantization
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        src = prod.get(n.input[0]) if n.op_type == "Cast" else None
        if src is not None and src.op_type == "DequantizeLinear" and to == onnx.TensorProto.FLOAT \
                and n.output[0] not in outputs and vals.get(src.input[1]) is not None \
                and vals[src.input[1]].dtype.name == "float32":
            rename[n.output[0]] = n.input[0]
            casts.append(n)
    for n in casts:
        g.node.remove(n)
    for n in g.node:
        for k, i in enumerate(n.input):
            while i in rename:
                i = rename[i]
            n.input[k] = i
    users = consumers(g)  # after the casts are gone: the pairs' readers as the hoist sees them
    hoisted = 0
    for q in [n for n in g.node if n.op_type == "QuantizeLinear"]:
        scale = vals.get(q.input[1])
        dqs = users.get(q.output[0], [])
        if scale is None or scale.size != 1 or len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear" \
                or q.output[0] in outputs:
            continue
        chain = []  # layout ops between x and the quantizer, nearest first
        t = q.input[0]
        # a Shape reader of an intermediate tensor keeps reading it (same shape); any other reader stops the chain
        while t in prod and prod[t].op_type in LAYOUT_OPS and t not in outputs \
                and sum(u.op_type != "Shape" for u in users.get(t, [])) == 1:
            chain.append(prod[t])
            t = prod[t].input[0]
        source = prod.get(t)
        if not chain or source is None or source.op_type not in PROJECTION_OPS \
                or not any(_is_constant(i, vals, prod) for i in source.input):
            continue  # only onto a projection's output (an op with a weight or bias): OpenVINO fuses the pair there,
            # while an attention matmul's output hoisted makes its head transpose int8, which OpenVINO runs on a
            # slower path than float (0.23 against 0.09 ms per layer of MiniLM at batch 8)
        dq = dqs[0]
        first, last = chain[-1], chain[0]
        dq_out = dq.output[0]
        q.input[0] = first.input[0]              # round x itself
        dq.output[0] = f"{dq_out}_hoisted"       # the rounded x enters the layout chain
        first.input[0] = dq.output[0]
        for u in users.get(last.output[0], []):  # Shape readers follow the chain's end to its new name
            u.input[:] = [dq_out if i == last.output[0] else i for i in u.input]
        last.output[0] = dq_out                  # and leaves it where the dequantized tensor did
        hoisted += 1
    if hoisted or casts or out is not None:
        _toposort(g)
        onnx.save(model, str(out or path))
    return {"quantizers_hoisted": hoisted, "casts_dropped": len(casts)}


def _is_constant(name: str, vals: dict[str, Any], prod: dict[str, Any]) -> bool:
    """Whether tensor ``name`` is a constant, an alias of one (the exporter writes equal initializers as Identity
    nodes of one of them) or the dequantization of one (a folded int8 weight)."""
    n = prod.get(name)
    return name in vals or (n is not None and n.op_type in ("Identity", "DequantizeLinear")
                            and _is_constant(n.input[0], vals, prod))


def _toposort(g: Any) -> None:
    """Reorder ``g.node`` so every node follows the producers of its inputs (stable: keeps the order otherwise)."""
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending, order = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise OutlierfreeError("the exported graph cannot be ordered after the quantizer rewrite (a cycle or a "
                                   "tensor nothing produces)",
                                   "report this model; export with an older outlierfree meanwhile")
        pending = rest
    del g.node[:]
    g.node.extend(order)


def export_onnx(qm: Any, batch: dict[str, torch.Tensor], out_dir: str | Path, task: str,
                with_float: bool = True, weight_dtype: str = "int8") -> dict[str, Any]:
    """Write ``model_int8.onnx`` (and ``model_float.onnx`` when ``with_float``) for a calibrated
    :class:`QuantizedModel` into ``out_dir``.

    ``batch`` is one example batch (traced; its batch and sequence sizes stay dynamic); ``weight_dtype``: how the
    weight integers are stored (:func:`fold_weight_qdq`; ``uint8`` for CPUs without VNNI). Returns what was done:
    files, sizes in bytes, QDQ counts.
    """
    require_onnx()
    require_weight_dtype(weight_dtype)  # before the (slow) tracing
    out = Path(out_dir)
    f_path, q_path = out / "model_float.onnx", out / "model_int8.onnx"
    if with_float:
        with qm.float_mode():
            _export(qm.model, batch, task, f_path)
        additive_masks(f_path)
    with qm.exporting():
        _export(qm.model, batch, task, q_path)
    counts = fold_weight_qdq(q_path, weight_dtype)
    counts["additive_masks"] = additive_masks(q_path)
    return {"float": f_path.name if with_float else None, "int8": q_path.name, "opset": OPSET,
            "weight_dtype": weight_dtype,
            "exporter": "torch.onnx (TorchScript)", "inputs": input_names(batch), **counts,
            "bytes": {"float": f_path.stat().st_size if with_float else None, "int8": q_path.stat().st_size}}
