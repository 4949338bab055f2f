"""Intercepting the tensor operations of a Hugging Face forward pass, named by module path.

Two things the module-boundary sites of :mod:`outlierfree.sites` cannot do are done here with a
``TorchFunctionMode`` that is active only while the model's own forward runs:

1. **weights**: every ``F.linear`` / ``F.embedding`` / ``F.conv*`` call gets a fake-quantized copy of its weight
   (cached per parameter and version), so the model's parameters are never modified and a tied LM head can stay
   in float while the tied embedding table is quantized;
2. **residual sums**: every ``tensor + tensor`` add (``+``, ``torch.add``, ``+=``, ``add_``) of two floating tensors
   of 2+ dimensions that runs *directly* in the forward of a container module (a block, an embeddings module, a
   decoder) and not inside an attention module or a leaf module is a site of kind ``residual``, named
   ``<module path>:add<k>`` (``k`` counts such adds within one call of that module). These are the residual sums
   and the embeddings' sums: in a pre-norm model (OPT, ViT, Llama) the residual stream is not the input of any
   norm module, so quantizing the norm's input alone would leave the residual branch in float.

A stack of running module paths is kept with forward pre-hooks and (always-called) forward hooks on every module.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..models import hf_compat
from ..sites.core import Site, layer_index

RESIDUAL_KIND = "residual"
ADD_NAMES = frozenset({"add", "__add__", "__radd__", "__iadd__", "add_"})
WEIGHT_FUNCS = frozenset({"linear", "embedding", "conv1d", "conv2d", "conv3d"})

# weight_fn(module_path, func_name, weight) -> replacement or None
WeightFn = Callable[[str, str, torch.Tensor], "torch.Tensor | None"]
# add_fn(site, tensor) -> replacement or None
AddFn = Callable[[Site, torch.Tensor], "torch.Tensor | None"]


class ModuleStack:
    """Which module's forward is running, maintained by hooks on every module of a model."""

    def __init__(self, model: nn.Module):
        self.frames: list[list] = []  # [path, eligible_for_adds, add counter]
        self.handles = []
        for path, m in model.named_modules():
            eligible = bool(path) and len(m._modules) > 0 and not hf_compat.is_attention_module(m)
            eligible = eligible or (path == "" and len(m._modules) > 0)
            self.handles.append(m.register_forward_pre_hook(self._push(path, eligible)))
            self.handles.append(m.register_forward_hook(self._pop, always_call=True))

    def _push(self, path: str, eligible: bool) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.frames.append([path, eligible, 0])

        return hook

    def _pop(self, module: nn.Module, args: tuple, output) -> None:
        if self.frames:
            self.frames.pop()

    def top(self) -> str:
        """Path of the innermost running module (``""`` outside any)."""
        return self.frames[-1][0] if self.frames else ""

    def remove(self) -> None:
        """Remove every hook."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.frames.clear()


def _is_residual_add(args: tuple, out) -> bool:
    if len(args) < 2 or not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return False
    a, b = args[0], args[1]
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 2 and b.dim() >= 2
            and a.is_floating_point() and b.is_floating_point())


class OpInterceptor(TorchFunctionMode):
    """The mode: swaps weights and hands residual adds to ``add_fn``. ``busy`` turns it off (re-entrancy)."""

    def __init__(self, stack: ModuleStack, weight_fn: WeightFn | None, add_fn: AddFn | None):
        super().__init__()
        self.stack = stack
        self.weight_fn = weight_fn
        self.add_fn = add_fn
        self.busy = False
        self.sites: dict[str, Site] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.busy:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if self.weight_fn is not None and name in WEIGHT_FUNCS:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(w, nn.Parameter):
                new = self.weight_fn(self.stack.top(), name, w)
                if new is not None:
                    if len(args) > 1:
                        args = (args[0], new, *args[2:])
                    else:
                        kwargs = {**kwargs, "weight": new}
        out = func(*args, **kwargs)
        if self.add_fn is not None and name in ADD_NAMES and self.stack.frames and self.stack.frames[-1][1] \
                and _is_residual_add(args, out):
            frame = self.stack.frames[-1]
            path, k = frame[0], frame[2]
            frame[2] += 1
            site_name = f"{path}:add{k}"
            site = self.sites.get(site_name)
            if site is None:
                site = self.sites[site_name] = Site(site_name, RESIDUAL_KIND, layer_index(path), path, f"add{k}")
            new = self.add_fn(site, out)
            if new is not None:
                if name == "add_" and not out.requires_grad:
                    with torch.no_grad():
                        out.copy_(new)  # a statement `x.add_(y)` ignores the return value
                    return out
                return new
        return out


@contextlib.contextmanager
def intercept(model: nn.Module, weight_fn: WeightFn | None = None, add_fn: AddFn | None = None
              ) -> Iterator[OpInterceptor]:
    """Route ``model``'s forward passes through an :class:`OpInterceptor` inside the ``with`` block.

    The mode is pushed by a forward pre-hook of the root module and popped by its always-called forward hook, so
    it sees only this model's operations, and it is gone after an exception too.
    """
    stack = ModuleStack(model)
    mode = OpInterceptor(stack, weight_fn, add_fn)
    depth = [0]

    def enter(module: nn.Module, args: tuple) -> None:
        depth[0] += 1
        if depth[0] == 1:
            mode.__enter__()

    def leave(module: nn.Module, args: tuple, output) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            mode.__exit__(None, None, None)

    # prepend: the mode must be active before the module stack hooks of the root run
    h1 = model.register_forward_pre_hook(enter, prepend=True)
    h2 = model.register_forward_hook(leave, always_call=True)
    try:
        yield mode
    finally:
        h1.remove()
        h2.remove()
        stack.remove()
