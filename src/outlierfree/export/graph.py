"""Read-only lookups on an ONNX graph that both the export rewrites (:mod:`.onnx`) and the runtime checks
(:mod:`.ort`) need: which nodes read a tensor, and the value of every constant."""

from __future__ import annotations

from typing import Any


def consumers(graph: Any) -> dict[str, list]:
    """Tensor name -> the nodes of ``graph`` that read it (in graph order)."""
    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


def const_values(graph: Any) -> dict[str, Any]:
    """name -> numpy value of every initializer and Constant node output of ``graph``."""
    from onnx import numpy_helper

    vals = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            vals[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return vals
