"""Named tensor sites: the activations that outlier analysis measures and the quantization simulator quantizes.

A *site* is one tensor a forward pass produces, named by the module that produces it and a point on it:

    bert.encoder.layer.3.output.LayerNorm:input      kind ln_input   (the residual sum entering a LayerNorm)
    bert.encoder.layer.3.attention.self:probs        kind attn_probs (inside the attention function)

Module-boundary sites are observed with forward hooks; attention internals (query, key, value, scores, probs,
context, gate) through the ``outlierfree_probe`` of :mod:`outlierfree.attention.interface`, which is why
:func:`observe` routes the model through the ``outlierfree`` attention implementation while it is active.
Known families (BERT, OPT, ViT) get precise names for attention output and FFN output; any other transformer gets
the generic rule: every norm's input and output, every linear's input and output, every activation function's
output, the embeddings, and every attention module's internals.

One mechanism serves both users: ``observe(model, fn)`` calls ``fn(site, tensor)`` at every site; if ``fn`` returns a
tensor, that tensor replaces the activation (the simulator's fake quantization); ``None`` leaves it unchanged.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ..models import hf_compat

# Every kind of site, in the order a block computes them.
SITE_KINDS = (
    "embedding",  # output of an embedding table (word, position, token type, patch projection)
    "ln_input",  # input of a LayerNorm / RMSNorm: the residual sum (or the embeddings' sum)
    "ln_output",  # output of a LayerNorm / RMSNorm
    "linear_input",  # input of any other nn.Linear
    "linear_output",  # output of any other nn.Linear
    "query", "key", "value",  # attention Q, K, V (B, H, T, D), inside the attention function
    "attn_scores",  # Q K^T * scale (B, H, Tq, Tk)
    "attn_probs",  # (clipped) softmax probabilities (B, H, Tq, Tk)
    "context",  # probabilities x V, before the gate (B, H, Tq, D)
    "gate",  # gated attention's gate probabilities
    "attn_output",  # output of the attention's output projection, before the residual add
    "ffn_hidden",  # output of the FFN activation function
    "ffn_output",  # output of the FFN's second linear, before the residual add
    "head_input",  # input of the task head (LM head / classifier)
)
ATTENTION_POINTS = {"query": "query", "key": "key", "value": "value", "scores": "attn_scores",
                     "probs": "attn_probs", "context": "context", "gate": "gate"}
NORM_NAMES = ("LayerNorm", "RMSNorm", "GroupNorm")  # class-name fragments of normalisation modules
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)(?:\.|$)")
# precise names of the known families: (module path suffix pattern, point) -> kind
_FAMILY_RULES: dict[str, list[tuple[str, str]]] = {
    "bert": [(r"\.attention\.output\.dense$", "attn_output"), (r"\.layer\.\d+\.output\.dense$", "ffn_output"),
             (r"\.intermediate\.intermediate_act_fn$", "ffn_hidden")],
    # transformers 5 names ViT's blocks like Llama's (attention.o_proj, mlp.fc2); older releases like BERT's
    "vit": [(r"\.attention\.(output\.dense|o_proj)$", "attn_output"),
            (r"\.(layer\.\d+\.output\.dense|mlp\.fc2)$", "ffn_output")],
    "opt": [(r"\.self_attn\.out_proj$", "attn_output"), (r"\.fc2$", "ffn_output"), (r"\.activation_fn$", "ffn_hidden")],
}
# generic names (Llama, Gemma, Mistral, GPT-2 style...) for attention and FFN outputs
_GENERIC_RULES = [(r"\.(o_proj|out_proj|c_proj)$", "attn_output", r"attn|attention"),
                  (r"\.(down_proj|fc2|dense_4h_to_h|c_proj|wo)$", "ffn_output", r"mlp|ffn|feed_forward|output")]
_HEAD_NAMES = ("lm_head", "classifier", "cls.predictions.decoder", "decoder")


@dataclass(frozen=True)
class Site:
    """One named activation tensor.

    Attributes:
        name: unique, ``"<module path>:<point>"``.
        kind: one of :data:`SITE_KINDS`.
        layer: transformer block index parsed from the module path, ``None`` outside the blocks.
        module: the module path (``""`` for the root).
        point: ``input``, ``output`` or an attention-internal point (``query`` ... ``gate``).
    """

    name: str
    kind: str
    layer: int | None
    module: str
    point: str


def layer_index(path: str) -> int | None:
    """Block index in a module path (``...layer.3...`` / ``...layers.3...`` / ``...h.3...``), or ``None``."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or any(n in type(m).__name__ for n in NORM_NAMES)


def _is_activation(path: str, m: nn.Module) -> bool:
    # transformers wraps activations in modules (GELUActivation, ReLU, SiLU...), named act/activation_fn/act_fn
    leaf = path.rsplit(".", 1)[-1]
    return len(list(m.children())) == 0 and not list(m.parameters(recurse=False)) and \
        (leaf in ("act", "act_fn", "activation_fn", "intermediate_act_fn", "activation") or
         type(m).__module__.startswith("transformers.activations"))


def _linear_kind(path: str, family: str | None) -> str | None:
    """attn_output / ffn_output for the Linear at ``path``, or None for an ordinary linear."""
    for pat, kind in _FAMILY_RULES.get(family or "", []):
        if re.search(pat, path) and kind != "ffn_hidden":
            return kind
    if family in _FAMILY_RULES:
        return None
    for pat, kind, parent in _GENERIC_RULES:
        if re.search(pat, path) and re.search(parent, path):
            return kind
    return None


def _is_head(path: str, model: nn.Module) -> bool:
    return path in _HEAD_NAMES or path.endswith(".decoder") and "predictions" in path


def discover(model: nn.Module, attention: bool = True) -> list[Site]:
    """Every site of ``model``, in module order.

    Args:
        attention: include the attention internals (query ... gate). They are observed through the
            ``outlierfree`` attention function, which :func:`observe` switches on while it runs.
    """
    family = hf_compat.family_of(getattr(model, "config", None))
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
        elif isinstance(m, nn.Conv2d) and "embed" in path:  # ViT patch projection
            add(path, "embedding", "output")
        elif isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":  # GPT-2 style linears (transposed weight)
            if _is_head(path, model):
                add(path, "head_input", "input")
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


@contextlib.contextmanager
def observe(model: nn.Module, fn: SiteFn, sites: list[Site] | None = None) -> Iterator[list[Site]]:
    """Call ``fn(site, tensor)`` for every site during forward passes inside the ``with`` block.

    If ``fn`` returns a tensor, it replaces the activation (inputs and outputs of modules and attention internals
    alike), so the same mechanism measures (analysis) and fake-quantizes (simulator). Hooks, probes and the
    attention implementation are restored on exit, also after an exception.

    Yields the list of sites being observed (``discover(model)`` when ``sites`` is None).
    """
    sites = discover(model) if sites is None else sites
    modules = dict(model.named_modules())
    by_module: dict[str, dict[str, Site]] = {}
    for s in sites:
        if s.module not in modules:
            raise KeyError(f"site {s.name} names a module that {type(model).__name__} does not have")
        by_module.setdefault(s.module, {})[s.point] = s

    handles = []
    probed: list[nn.Module] = []
    previous_impl = hf_compat.attention_implementation(model)
    needs_probe = any(p in ATTENTION_POINTS for pts in by_module.values() for p in pts)
    try:
        if needs_probe and previous_impl != hf_compat.IMPL_NAME:
            hf_compat.set_attention_implementation(model, hf_compat.IMPL_NAME)
        for path, points in by_module.items():
            m = modules[path]
            if "input" in points:
                handles.append(m.register_forward_pre_hook(_pre_hook(points["input"], fn), with_kwargs=True))
            if "output" in points:
                handles.append(m.register_forward_hook(_post_hook(points["output"], fn)))
            internal = {p: s for p, s in points.items() if p in ATTENTION_POINTS}
            if internal:
                m.outlierfree_probe = _probe(internal, fn)
                probed.append(m)
        yield sites
    finally:
        for h in handles:
            h.remove()
        for m in probed:
            m.__dict__.pop("outlierfree_probe", None)
        if needs_probe and previous_impl not in (None, hf_compat.IMPL_NAME):
            hf_compat.set_attention_implementation(model, previous_impl)


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
