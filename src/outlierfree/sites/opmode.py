"""The op-level half of the site mechanism: a ``TorchFunctionMode`` active only while the model's own forward runs.

Module hooks and the attention probe (:mod:`.observe`) see tensors at module boundaries; some things are only visible
as tensor operations, named here by the path of the module whose forward runs them:

1. **residual sums** (kind ``residual``, named ``<module path>:add<k>``): every ``tensor + tensor`` (``+``,
   ``torch.add``, ``+=``, ``add_``) run *directly* in the forward of a container module that is not an attention
   module, whose result is a (B, T, D) or (N, D) hidden state of the model's width. These are the residual sums
   and the embeddings' sums: in a pre-norm model (OPT, ViT, Llama) the residual stream is not the input of any norm
   module. Anything added to attention scores (padding and causal masks, position biases, ALiBi) is 4-D, or runs
   inside an attention module, so it is never taken for a residual sum.
2. **weights**: every parameter the model passes to any tensor function (``F.linear``, ``torch.addmm`` of GPT-2's
   ``Conv1D``, ``matmul``/``einsum`` with a parameter or its ``.T`` (Falcon's ``x @ W.T``), ``F.embedding``,
   ``F.conv*``, a norm's ``weight * x``, a position-embedding parameter added to the patches...) is offered to
   ``weight_fn``, which may return a replacement (the simulator's fake-quantized copy). The parameters themselves
   are never modified.
3. **grids**: a tensor that a site function replaced (a quantized tensor) carries the name of its site, and so do
   the tensors derived from it by operations that keep every value on the same grid (views, transposes, copies,
   ``contiguous``, dtype casts, splits, concatenations of such tensors, multiplication by a Python number, dropout
   in eval mode, an embedding lookup in a quantized table...). :func:`grid_of` tells the simulator that such a tensor is already quantized, so no tensor is
   rounded twice: not the attention context copied by ``transpose().contiguous()`` before the output projection,
   not OPT's query scaled by ``head_dim ** -0.5``, not a key repeated for grouped-query attention.
4. **attention computed by hand**: a ``softmax`` (or a direct ``scaled_dot_product_attention``) run outside every
   attention module that calls transformers' attention interface is recorded (``uninstrumented``), so the report
   can name the modules whose attention internals it could not see (MPNet, DeBERTa-v2 and BLOOM in transformers
   5.25; Falcon, which called SDPA directly, until 5.24).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .. import hf_compat
from ..hf_compat import layer_index
from .site import Site

RESIDUAL_KIND = "residual"
GRID_ATTR = "_outlierfree_grid"
ADD_NAMES = frozenset({"add", "__add__", "__radd__", "__iadd__", "add_"})
# operations whose output holds only values of their (first) input: a quantized input stays on its grid
PRESERVING = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "transpose_", "permute", "contiguous", "flatten",
    "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "repeat_interleave", "clone", "detach",
    "to", "float", "double", "half", "bfloat16", "type", "type_as", "narrow", "select", "split", "chunk", "unbind",
    "__getitem__", "dropout", "movedim", "swapaxes", "index_select", "gather", "masked_fill", "tensor_split",
    "split_with_sizes", "__get__",
})
JOINS = frozenset({"cat", "concat", "concatenate", "stack"})  # on a grid when every input is
SCALAR_OPS = frozenset({"mul", "__mul__", "__rmul__", "div", "__truediv__", "neg", "__neg__"})
# attention computed by hand (MPNet, DeBERTa, BLOOM) or by a direct SDPA call (Falcon)
ATTENTION_OPS = frozenset({"softmax", "_softmax", "scaled_dot_product_attention"})
MATMUL_FUNCS = frozenset({"linear", "addmm", "matmul", "mm", "bmm", "baddbmm", "einsum", "__matmul__",
                          "__rmatmul__", "conv1d", "conv2d", "conv3d"})
# properties that transpose a tensor: a parameter read through them is offered to weight_fn as a matmul's weight
TRANSPOSING = (torch.Tensor.T, torch.Tensor.mT)
# tensor functions that only read metadata: never offered to weight_fn
_METADATA = frozenset({"size", "dim", "numel", "data_ptr", "stride", "is_contiguous", "element_size",
                       "is_floating_point", "requires_grad_", "untyped_storage", "__len__", "__format__", "__repr__",
                       "__hash__", "__eq__"})

# weight_fn(module_path, func_name, parameter_name, parameter) -> replacement or None
WeightFn = Callable[[str, str, str, torch.Tensor], "torch.Tensor | None"]
AddFn = Callable[[object, torch.Tensor], "torch.Tensor | None"]


def grid_of(t: object) -> str | None:
    """The site whose quantization grid ``t`` already lies on (``None``: not quantized, or modified in place
    since it was marked)."""
    tag = getattr(t, GRID_ATTR, None) if isinstance(t, torch.Tensor) else None
    if tag is None or tag[1] != t._version:
        return None
    return tag[0]


def mark(t: torch.Tensor, site_name: str) -> torch.Tensor:
    """Record that ``t`` lies on the grid of ``site_name`` (called on every tensor a site function returns)."""
    try:
        setattr(t, GRID_ATTR, (site_name, t._version))
    except (AttributeError, RuntimeError):  # exotic tensor subclasses without a __dict__
        pass
    return t


def _mark_all(out: object, name: str) -> None:
    if isinstance(out, torch.Tensor):
        mark(out, name)
    elif isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                mark(o, name)


class ModuleStack:
    """Which module's forward is running, maintained by hooks on every module of a model."""

    def __init__(self, model: nn.Module):
        self.frames: list[list] = []  # [path, eligible_for_residual_adds, add counter, is_attention, call index]
        self.calls: dict[str, int] = {}  # calls of each module in the running forward
        self.handles = []
        for path, m in model.named_modules():
            attn = hf_compat.is_attention_module(m)
            eligible = len(m._modules) > 0 and not attn
            self.handles.append(m.register_forward_pre_hook(self._push(path, eligible, attn)))
            self.handles.append(m.register_forward_hook(self._pop, always_call=True))

    def _push(self, path: str, eligible: bool, attn: bool) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.frames:
                self.calls.clear()  # a new forward of the root
            k = self.calls[path] = self.calls.get(path, 0) + 1
            self.frames.append([path, eligible, 0, attn, k - 1])

        return hook

    def _pop(self, module: nn.Module, args: tuple, output) -> None:
        if self.frames:
            self.frames.pop()

    def top(self) -> str:
        """Path of the innermost running module (``""`` outside any)."""
        return self.frames[-1][0] if self.frames else ""

    def in_attention(self) -> bool:
        """Whether an attention module that calls the attention interface is running."""
        return any(f[3] for f in self.frames)

    def remove(self) -> None:
        """Remove every hook."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.frames.clear()


class OpMode(TorchFunctionMode):
    """The mode (see the module docstring). ``busy`` is set by site and weight functions while they compute, so
    their own operations are not traced."""

    def __init__(self, model: nn.Module, stack: ModuleStack, weight_fn: WeightFn | None, add_fn: AddFn | None):
        super().__init__()
        self.stack = stack
        self.weight_fn = weight_fn
        self.add_fn = add_fn
        self.busy = False
        self.widths = hf_compat.hidden_widths(getattr(model, "config", None))
        self.param_names: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.param_names.setdefault(id(p), n)  # a tied weight keeps its first (owning) name
        self.sites: dict[str, object] = {}
        self.uninstrumented: set[str] = set()  # modules that ran softmax outside the attention interface

    def _weights(self, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        path = self.stack.top()

        def swap(a: object) -> object:
            if isinstance(a, nn.Parameter) and id(a) in self.param_names:
                new = self.weight_fn(path, name, self.param_names[id(a)], a)
                return a if new is None else new
            if isinstance(a, (list, tuple)) and a and any(isinstance(x, nn.Parameter) for x in a):
                return type(a)(swap(x) for x in a)
            return a

        args = tuple(swap(a) for a in args)
        if kwargs:
            kwargs = {k: swap(v) for k, v in kwargs.items()}
        return args, kwargs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.busy:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _METADATA:
            return func(*args, **kwargs)
        if self.weight_fn is not None and name != "__get__":
            args, kwargs = self._weights(name, args, kwargs)
        elif self.weight_fn is not None and getattr(func, "__self__", None) in TRANSPOSING:
            # ``x @ self.weight.T`` (Falcon's FalconLinear): the property reads the parameter, and the matmul only
            # sees its transposed copy, so the weight is offered here, as a matmul's
            args, kwargs = self._weights("matmul", args, kwargs)
        out = func(*args, **kwargs)
        self._propagate(name, args, out)
        if name in ATTENTION_OPS and self.stack.frames and not self.stack.in_attention():
            self.uninstrumented.add(self.stack.top())
        if self.add_fn is not None and name in ADD_NAMES:
            return self._residual(name, args, out)
        return out

    def _propagate(self, name: str, args: tuple, out: object) -> None:
        if not args:
            return
        if name == "embedding" and len(args) > 1:  # a lookup holds values of its (quantized) table
            g = grid_of(args[1])
            if g is not None:
                _mark_all(out, g)
        elif name in PRESERVING:
            g = grid_of(args[0])
            if g is not None:
                _mark_all(out, g)
        elif name in SCALAR_OPS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if len(tensors) == 1 and grid_of(tensors[0]) is not None and \
                    all(isinstance(a, (int, float)) for a in args if a is not tensors[0]):
                _mark_all(out, grid_of(tensors[0]))
        elif name in JOINS and isinstance(args[0], (list, tuple)) and args[0]:
            # an empty tensor (a KV cache's initial state) holds no values, so it takes no part
            grids = [grid_of(t) for t in args[0] if not (isinstance(t, torch.Tensor) and t.numel() == 0)]
            if grids and grids[0] is not None and all(g == grids[0] for g in grids):  # one grid (a KV cache)
                _mark_all(out, grids[0])

    def _is_residual_add(self, args: tuple, out: object) -> bool:
        if len(args) < 2 or not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return False
        a, b = args[0], args[1]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        # a hidden state of the model's width: (B, T, D) or (N, D); masks and biases of scores are 4-D. Sizes are
        # compared as ints: under the ONNX exporter's tracing they are tensors, which a set lookup would never match
        width = int(out.shape[-1])
        if not 2 <= out.dim() <= 3 or (self.widths and width not in self.widths):
            return False
        return a.dim() >= 2 and b.dim() >= 2 and int(a.shape[-1]) == int(b.shape[-1]) == width

    def _residual(self, name: str, args: tuple, out: object) -> object:
        frames = self.stack.frames
        if not frames or not frames[-1][1] or self.stack.in_attention() or not self._is_residual_add(args, out):
            return out
        frame = frames[-1]
        path, k, c = frame[0], frame[2], frame[4]
        frame[2] += 1
        site_name = f"{path}:add{k}" + (f"#{c}" if c else "")
        site = self.sites.get(site_name)
        if site is None:
            layer = layer_index(path)
            layer = layer + c if layer is not None else None
            site = self.sites[site_name] = Site(site_name, RESIDUAL_KIND, layer, path, f"add{k}")
        new = self.add_fn(site, out)
        if new is None:
            return out
        mark(new, site_name)
        if name in ("add_", "__iadd__") and not out.requires_grad:
            with torch.no_grad():
                out.copy_(new)  # a statement `x += y` keeps using `out`
            return mark(out, site_name)
        return new


@contextlib.contextmanager
def trace(model: nn.Module, weight_fn: WeightFn | None = None, add_fn: AddFn | None = None) -> Iterator[OpMode]:
    """Route ``model``'s forward passes through an :class:`OpMode` inside the ``with`` block.

    The mode is pushed by a forward pre-hook of the root module and popped by its always-called forward hook, so
    it sees only this model's operations, and it is gone after an exception too.
    """
    stack = ModuleStack(model)
    mode = OpMode(model, stack, weight_fn, add_fn)
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
