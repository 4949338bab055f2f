"""Named tensor sites: the activations that outlier analysis measures and the quantization simulator quantizes.

A *site* is one tensor a forward pass produces, named by the module that produces it and a point on it:

    bert.encoder.layer.3.output.LayerNorm:input      kind ln_input   (the residual sum entering a LayerNorm)
    bert.encoder.layer.3.attention.self:probs        kind attn_probs (inside the attention function)

Module-boundary sites are observed with forward hooks; attention internals (query, key, value, scores, probs,
context, gate) through the ``outlierfree_probe`` of :mod:`outlierfree.attention.interface`, which is why
:func:`observe` routes the model through the ``outlierfree`` attention implementation while it is active.
Residual and embedding sums, the weights every operation uses, and the grids of quantized tensors come from the
op mode of :mod:`.opmode`. Known families (BERT, OPT, ViT) get precise names for attention output and FFN output; any
other transformer gets the generic rule: every norm's input and output, every linear's input and output, every
activation function's output, the embeddings, the task head's input and logits, and the internals of every module
that calls transformers' attention interface.

One mechanism serves both users: ``observe(model, fn)`` calls ``fn(site, tensor)`` at every site; if ``fn`` returns a
tensor, that tensor replaces the activation (the simulator's fake quantization); ``None`` leaves it unchanged.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..errors import require
from .. import hf_compat
from ..hf_compat import layer_index
from ..attention.interface import outlierfree_attention
from . import opmode
from .site import SITE_KINDS, Site

ATTENTION_POINTS = {"query": "query", "key": "key", "value": "value", "scores": "attn_scores",
                     "probs": "attn_probs", "context": "context", "gate": "gate"}
NORM_NAMES = ("LayerNorm", "RMSNorm", "GroupNorm", "LayerNorm2d")  # class-name fragments of normalisation modules
# precise names of the known families: module path suffix pattern -> kind of the Linear's output
_FAMILY_RULES: dict[str, list[tuple[str, str]]] = {
    "bert": [(r"\.attention\.output\.dense$", "attn_output"), (r"\.layer\.\d+\.output\.dense$", "ffn_output"),
             (r"\.intermediate\.dense$", "ffn_up")],
    # transformers 5 names ViT's blocks like Llama's (attention.o_proj, mlp.fc2); older releases like BERT's
    "vit": [(r"\.attention\.(output\.dense|o_proj)$", "attn_output"),
            (r"\.(layer\.\d+\.output\.dense|mlp\.fc2)$", "ffn_output"), (r"\.(intermediate\.dense|mlp\.fc1)$", "ffn_up")],
    "opt": [(r"\.self_attn\.out_proj$", "attn_output"), (r"\.fc2$", "ffn_output"), (r"\.fc1$", "ffn_up")],
}
# generic names (Llama, Gemma, Mistral, GPT-2, DistilBERT, T5, ALBERT...): (leaf pattern, kind, parent pattern)
_GENERIC_RULES = [
    (r"\.(o_proj|out_proj|c_proj|out_lin|o|dense)$", "attn_output", r"attn|attention"),
    (r"\.(down_proj|fc2|dense_4h_to_h|c_proj|wo|lin2|w2|ffn_output|output\.dense)$", "ffn_output",
     r"mlp|ffn|feed_forward|DenseReluDense|layer\.\d+$|albert_layers\.\d+$"),
    (r"\.(fc1|gate_proj|up_proj|c_fc|wi|wi_0|wi_1|lin1|w1|w3|dense_h_to_4h|ffn|intermediate\.dense)$", "ffn_up",
     r"mlp|ffn|feed_forward|DenseReluDense|intermediate|layer\.\d+$|albert_layers\.\d+$"),
]


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or any(n in type(m).__name__ for n in NORM_NAMES)


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """Every normalisation module of ``model`` in module order (LayerNorm, RMSNorm of Llama / Gemma / Qwen / T5 ...):
    the ones whose inputs and outputs are the ``ln_input`` / ``ln_output`` sites."""
    return [m for m in model.modules() if _is_norm(m)]


def _is_activation(path: str, m: nn.Module) -> bool:
    # transformers wraps activations in modules (GELUActivation, ReLU, SiLU...), named act/activation_fn/act_fn
    leaf = path.rsplit(".", 1)[-1]
    return len(list(m.children())) == 0 and not list(m.parameters(recurse=False)) and \
        (leaf in ("act", "act_fn", "activation_fn", "intermediate_act_fn", "activation") or
         type(m).__module__.startswith("transformers.activations"))


def _linear_kind(path: str, family: str | None) -> str | None:
    """attn_output / ffn_up / ffn_output for the Linear at ``path``, or None for an ordinary linear."""
    for pat, kind in _FAMILY_RULES.get(family or "", []):
        if re.search(pat, path):
            return kind
    if family in _FAMILY_RULES:
        return None
    for pat, kind, parent in _GENERIC_RULES:
        m = re.search(pat, path)
        if m and re.search(parent, path[:m.start()], re.IGNORECASE):
            return kind
    return None


def _final_head_linear(model: nn.Module) -> str | None:
    """Path of the last linear of the task head (the LM head / classifier whose output is the logits)."""
    last = None
    for head in hf_compat.head_paths(model):
        mod = model.get_submodule(head)
        for sub, m in mod.named_modules():
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
                last = f"{head}.{sub}" if sub else head
    return last


def in_head(path: str, heads: list[str]) -> bool:
    """Whether a module path lies in the task head (one of ``hf_compat.head_paths``)."""
    return any(path == h or path.startswith(h + ".") for h in heads)


def discover(model: nn.Module, attention: bool = True) -> list[Site]:
    """Every site of ``model``, in module order.

    Args:
        attention: include the attention internals (query ... gate). They are observed through the
            ``outlierfree`` attention function, which :func:`observe` switches on while it runs.
    """
    family = hf_compat.family_of(getattr(model, "config", None))
    head = _final_head_linear(model)
    sites: list[Site] = []

    def add(path: str, kind: str, point: str) -> None:
        sites.append(Site(f"{path}:{point}", kind, layer_index(path), path, point))

    for path, m in model.named_modules():
        if path == "":
            continue
        if _is_norm(m):
            add(path, "ln_input", "input")
            add(path, "ln_output", "output")
        elif isinstance(m, nn.Embedding):
            add(path, "embedding", "output")
        elif isinstance(m, nn.Conv2d) and "embed" in path:  # ViT patch projection: a linear map of the pixels
            add(path, "linear_input", "input")
            add(path, "linear_output", "output")
        elif isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":  # GPT-2 style linears (transposed weight)
            if path == head:
                add(path, "head_input", "input")
                add(path, "logits", "output")
                continue
            kind = _linear_kind(path, family)
            add(path, "linear_input", "input")
            add(path, kind or "linear_output", "output")
        elif _is_activation(path, m):
            add(path, "ffn_hidden", "output")
        elif attention and hf_compat.is_attention_module(m):
            for point, kind in ATTENTION_POINTS.items():
                if point == "gate" and getattr(m, "outlierfree_gate", None) is None:
                    continue
                add(path, kind, point)
    return sites


def select(sites: list[Site], kinds: str | tuple[str, ...] | None = None, layer: int | None = None) -> list[Site]:
    """The sites of some kinds (and optionally one layer)."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    return [s for s in sites if (kinds is None or s.kind in kinds) and (layer is None or s.layer == layer)]


SiteFn = Callable[[Site, torch.Tensor], "torch.Tensor | None"]


class Observed(list):
    """The static sites being observed, and the op mode (:class:`.opmode.OpMode`, or None) that traces the forward."""

    def __init__(self, sites: list[Site], mode: Any):
        super().__init__(sites)
        self.mode = mode


def parse_kinds(text: str | tuple[str, ...] | list[str], flag: str = "--sites") -> tuple[str, ...]:
    """Site kinds from ``"ln_input,residual"`` / ``"ln_input+residual"`` / ``"all"`` / a sequence, validated with
    a one-line error naming the unknown kind (the one validation analysis and quantization share)."""
    if isinstance(text, str):
        if text.strip() == "all":
            return SITE_KINDS
        kinds = tuple(k.strip() for k in re.split(r"[,+]", text) if k.strip())
    else:
        kinds = tuple(text)
    bad = [k for k in kinds if k not in SITE_KINDS]
    require(bool(kinds) and not bad, f"unknown site kind {bad[0] if bad else text!r} in {flag}",
            f"use kinds from {', '.join(SITE_KINDS)} (or all)")
    return kinds


@contextlib.contextmanager
def observe(model: nn.Module, fn: SiteFn, sites: list[Site] | None = None, *, residual: bool = False,
            weight_fn: Callable[[str, str, str, torch.Tensor], "torch.Tensor | None"] | None = None, grids: bool = False) -> Iterator[list[Site]]:
    """Call ``fn(site, tensor)`` for every site during forward passes inside the ``with`` block.

    If ``fn`` returns a tensor, it replaces the activation (inputs and outputs of modules, attention internals and
    residual sums alike) and is marked as lying on that site's grid (:func:`.opmode.grid_of`), so the same mechanism
    measures (analysis) and fake-quantizes (simulator). Hooks, probes, the op mode and the attention implementation
    are restored on exit, also after an exception.

    Args:
        sites: the static sites to observe (``discover(model)`` when None).
        residual: also call ``fn`` at every residual / embedding sum (kind ``residual``, found by :mod:`.opmode`).
        weight_fn: offered every parameter the model computes with (see :mod:`.opmode`), may return a replacement.
        grids: run the op mode even without residual sums or weights, so that grids propagate.
    Yields the list of static sites being observed (an :class:`Observed`, whose ``mode`` is the op mode or None).
    """
    sites = discover(model) if sites is None else sites
    modules = dict(model.named_modules())
    by_module: dict[str, dict[str, Site]] = {}
    for s in sites:
        if s.module not in modules:
            raise KeyError(f"site {s.name} names a module that {type(model).__name__} does not have")
        by_module.setdefault(s.module, {})[s.point] = s

    state: dict[str, Any] = {"mode": None}
    calls: dict[str, int] = {}  # module path -> calls in the running forward (ALBERT runs one layer many times)
    repeats: dict[tuple[str, int], Site] = {}

    def call(site: Site, t: torch.Tensor) -> torch.Tensor | None:
        k = calls.get(site.module, 1) - 1
        if k > 0 and "#" not in site.name:  # a module's k-th call in one forward is a site of its own
            site = repeats.get((site.name, k)) or repeats.setdefault(
                (site.name, k), Site(f"{site.name}#{k}", site.kind, (site.layer or 0) + k if site.layer is not None
                                     else None, site.module, site.point))
        mode = state["mode"]
        if mode is not None:
            mode.busy = True  # the site function's own operations are not traced
        try:
            new = fn(site, t)
        finally:
            if mode is not None:
                mode.busy = False
        if new is not None and new is not t:
            opmode.mark(new, site.name)
        return new

    handles = []
    probed: list[nn.Module] = []
    previous_impl = hf_compat.attention_implementation(model)
    needs_probe = any(p in ATTENTION_POINTS for pts in by_module.values() for p in pts)
    with contextlib.ExitStack() as stack:
        try:
            if needs_probe and previous_impl != hf_compat.IMPL_NAME:
                hf_compat.set_attention_implementation(model, hf_compat.IMPL_NAME, outlierfree_attention)
            handles.append(model.register_forward_pre_hook(_reset(calls), prepend=True))
            for path, points in by_module.items():
                m = modules[path]
                handles.append(m.register_forward_pre_hook(_count(calls, path), prepend=True))
                if "input" in points:
                    handles.append(m.register_forward_pre_hook(_pre_hook(points["input"], call), with_kwargs=True))
                if "output" in points:
                    handles.append(m.register_forward_hook(_post_hook(points["output"], call)))
                internal = {p: s for p, s in points.items() if p in ATTENTION_POINTS}
                if internal:
                    m.outlierfree_probe = _probe(internal, call)
                    probed.append(m)
            if residual or weight_fn is not None or grids:
                state["mode"] = stack.enter_context(opmode.trace(model, weight_fn, call if residual else None))
            yield Observed(sites, state["mode"])
        finally:
            for h in handles:
                h.remove()
            for m in probed:
                m.__dict__.pop("outlierfree_probe", None)
            if needs_probe and previous_impl not in (None, hf_compat.IMPL_NAME):
                hf_compat.set_attention_implementation(model, previous_impl)


def _reset(calls: dict[str, int]) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        calls.clear()

    return hook


def _count(calls: dict[str, int], path: str) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        calls[path] = calls.get(path, 0) + 1

    return hook


def _pre_hook(site: Site, fn: SiteFn) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if args and isinstance(args[0], torch.Tensor):
            new = fn(site, args[0])
            if new is not None:
                return (new, *args[1:]), kwargs
        elif "hidden_states" in kwargs and isinstance(kwargs["hidden_states"], torch.Tensor):
            new = fn(site, kwargs["hidden_states"])
            if new is not None:
                return args, {**kwargs, "hidden_states": new}
        return None

    return hook


def _post_hook(site: Site, fn: SiteFn) -> Callable:
    def hook(module: nn.Module, args: tuple, output):
        if isinstance(output, torch.Tensor):
            return fn(site, output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            new = fn(site, output[0])
            return None if new is None else (new, *output[1:])
        return None

    return hook


def _probe(points: dict[str, Site], fn: SiteFn) -> Callable:
    def probe(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        site = points.get(name)
        if site is None:
            return tensor
        new = fn(site, tensor)
        return tensor if new is None else new

    return probe
