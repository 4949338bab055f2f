"""The attention kernels, in one static table, and the pure rule that picks one for a call.

    name      computes                   serves impl=         causal flag  probabilities  softcap / bias
    blocked   clipped, ncs               blocked, auto (long) yes          no             no
    sdpa      vanilla, gated             sdpa, auto, blocked  (its own)    no             no
    eager     every variant              every impl          no           yes            yes

:func:`choose_kernel` takes the first row, in this order, that computes the variant, serves the requested
``AttentionConfig.impl`` and can do what the call needs; eager, last, can do everything. Hence:

- a call that must show its probabilities (``output_attentions``, or a probe of analysis / the quantization
  simulator), has a softcap or a position bias runs on eager, whatever the impl;
- ``impl="blocked"`` exists for clipped softmax and NCS only. On the softmax variants (vanilla, gated) a blocked
  request is served by ``sdpa``, torch's fused kernel, which already keeps memory linear (configs in use rely on
  this); on the other variants config validation refuses it;
- ``impl="auto"`` on clipped / NCS picks blocked once the probability tensor eager would build, B*H*Tq*Tk, has
  ``AUTO_MIN_ELEMS`` elements, else eager; on the softmax variants sdpa; on the rest eager.

The "blocked" kernel is device-aware by itself: on CUDA with Triton (and no dropout) it runs FlexAttention's
two-call form (``blocked.flex_clipped_attention``), elsewhere the PyTorch two-pass kernel. That choice depends on the
machine, not on the call, so it stays inside the kernel and out of this (pure) table.

Nothing here changes after import: the table is a read-only mapping of frozen descriptors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

import torch

from .blocked import blocked_kernel
from .config import CLIP_VARIANTS, IMPLS, SOFTMAX_VARIANTS, VARIANTS, AttentionConfig
from .eager import eager_attention

# impl="auto" picks the blocked kernel once the eager probability tensor B*H*Tq*Tk has this many elements
# (2^23 floats = 32 MiB, the L3 cache of the dev machine). Measured on the CPU with benchmarks/attention.py
# (--crossover and the T sweep, docs/attention_kernels.md): below it eager is as fast or faster (its T x T
# tensors stay in cache), from it on blocked is faster (2x at 8.4M elements) and its memory stays linear.
AUTO_MIN_ELEMS = 1 << 23


class Shapes(NamedTuple):
    """The sizes of one attention call that the choice depends on (query heads, after grouped k/v are repeated)."""

    batch: int
    heads: int
    q_len: int
    k_len: int


@dataclass(frozen=True)
class Kernel:
    """One attention kernel and what it can do.

    ``fn`` is called by ``outlierfree_attention`` in one of two forms:

    - ``hf_call=False``: ``fn(module, q, k, v, keep, scaling, dropout, cfg, causal=, probe=, softcap=, bias=)`` with k
      and v repeated to the query heads and ``keep`` a boolean mask (see ``softmax.keep_mask``); returns context
      (B, H, Tq, D) and the probabilities (B, H, Tq, Tk), or None where it does not materialise them;
    - ``hf_call=True``: like a transformers attention function, ``fn(module, q, k, v, attention_mask, dropout=,
      scaling=, **kwargs)`` with the mask and keyword arguments as transformers gave them; returns (B, Tq, H, D).
    """

    name: str
    fn: Callable[..., Any]
    variants: tuple[str, ...]  # the variants it computes
    serves: tuple[str, ...]  # the AttentionConfig.impl values it answers
    auto_min_elems: int = 0  # impl="auto" takes it only from this many probabilities B*H*Tq*Tk on
    takes_causal: bool = False  # given causal=True instead of a T x T mask when the model passes no mask
    returns_probs: bool = False  # materialises the probabilities (output_attentions, probes)
    takes_softcap: bool = False  # applies a logit softcap (Gemma 2)
    takes_position_bias: bool = False  # adds a position bias (T5)
    hf_call: bool = False  # called as a transformers attention function (see above)


def _blocked(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             keep: torch.Tensor | None, scaling: float, dropout: float, cfg: AttentionConfig, *,
             causal: bool = False, **_: Any) -> tuple[torch.Tensor, None]:
    """The blocked kernel in the table's form. It is never chosen with a probe, softcap or position bias; dropout
    applies in training only, as in the eager path."""
    return blocked_kernel(module, query, key, value, keep, scaling, dropout if module.training else 0.0, cfg,
                          causal=causal), None


def _eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           keep: torch.Tensor | None, scaling: float, dropout: float, cfg: AttentionConfig, *,
           causal: bool = False, probe: Callable | None = None, softcap: float | None = None,
           bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager kernel in the table's form (it gets the causal mask in ``keep``, so ``causal`` is always False)."""
    return eager_attention(module, query, key, value, keep, scaling, dropout, cfg, probe, softcap, bias)


def _sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
          **kwargs: Any) -> torch.Tensor:
    """transformers' SDPA attention function (through hf_compat.py), (B, Tq, H, D)."""
    from ..hf_compat import sdpa_attention  # lazy: hf_compat imports the attention interface

    return sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


# In choice order: the first kernel that fits a call runs it (see the module docstring).
KERNELS: Mapping[str, Kernel] = MappingProxyType({
    # clipped softmax / NCS in linear memory; on CUDA with Triton it runs as FlexAttention (see the module docstring)
    "blocked": Kernel("blocked", _blocked, CLIP_VARIANTS, serves=("blocked", "auto"), auto_min_elems=AUTO_MIN_ELEMS,
                      takes_causal=True),
    # torch's fused kernel for the variants whose probabilities are softmax itself. It also serves "blocked":
    # the blocked kernel computes clipped softmax / NCS only, and sdpa is the linear-memory kernel of softmax
    "sdpa": Kernel("sdpa", _sdpa, SOFTMAX_VARIANTS, serves=("sdpa", "auto", "blocked"), hf_call=True),
    # materialised attention: every variant, every request, and whatever the faster kernels cannot do
    "eager": Kernel("eager", _eager, VARIANTS, serves=IMPLS, returns_probs=True, takes_softcap=True,
                    takes_position_bias=True),
})


def choose_kernel(config: AttentionConfig, shapes: Shapes | tuple[int, int, int, int], want_probs: bool, *,
                  softcap: bool = False, position_bias: bool = False) -> str:
    """The name of the kernel in :data:`KERNELS` that runs one attention call.

    Pure: the answer depends on the arguments only (and the read-only table).

    Args:
        config: the layer's variant; ``config.impl`` is the requested implementation.
        shapes: (batch, query heads, query length, key length) of the call.
        want_probs: the probabilities must be materialised (``output_attentions``, a probe).
        softcap: the call has a logit softcap. position_bias: the call has a position bias (T5).
    Returns:
        ``"blocked"``, ``"sdpa"`` or ``"eager"`` (see the module docstring for the rule).
    """
    n_probs = math.prod(shapes)
    for kernel in KERNELS.values():
        if config.variant not in kernel.variants or config.impl not in kernel.serves:
            continue
        if (want_probs and not kernel.returns_probs) or (softcap and not kernel.takes_softcap) \
                or (position_bias and not kernel.takes_position_bias):
            continue
        if config.impl == "auto" and n_probs < kernel.auto_min_elems:
            continue  # short enough that the materialised form is as fast
        return kernel.name
    raise AssertionError("eager serves every call")  # unreachable: the table's last row takes everything
