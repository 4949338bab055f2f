"""Which activations and weights a site set quantizes: ``paper``, ``full``, ``linear`` or a list of site kinds.

- ``paper`` (the default): exactly the quantizers of the paper's reference code (``Qualcomm-AI-research/
  outlier-free-transformers``, ``quantized_bert.py`` / ``quantized_opt.py``, default ``quant_setup="all"``), per
  family, written down with file and line in ``docs/quantization.md``. Quantized: the embeddings' sums, Q, K, V,
  the scaled scores (before the mask), the probabilities, the context (BERT: after the gate and the head reshape;
  OPT: before the gate), every linear output except the FFN's first (fused with its activation: only the
  activation's output is quantized), the residual sums, the norm outputs, OPT's logits; weights of every linear
  and embedding table and the norm gains (gamma). Float: the embedding lookups before their sum, the FFN's first
  linear output, the gate and its weights, biases and norm betas, and the whole masked-LM head (BERT's ``cls``:
  the reference leaves ``org_model.cls`` unquantized). ViT, which the reference does not cover, gets BERT's rules
  with its classifier quantized like OPT's LM head; other architectures get the same rules by analogy.
  Inputs of linears and norms are listed too: for BERT and OPT each is the output of a quantized site (so it is
  recorded as an alias and not rounded again); elsewhere (Llama's ``act(gate) * up`` before ``down_proj``, ViT's
  pixels before the patch projection) they are where an integer kernel would need its input quantized. An
  embedding lookup is a row of its quantized table, so it is never rounded again.
- ``full``: every activation site, each tensor rounded once, and every weight the model computes with (gates too).
- ``linear``: only linear inputs and linear weights (``nn.Linear``, GPT-2's ``Conv1D``): what the common
  libraries (torchao, llm-compressor, bitsandbytes) quantize.
- ``matmul``: every matmul's inputs: the ``linear`` set plus the attention's operands (queries, keys, values and
  probabilities, the inputs of ``Q K^T`` and ``P V``) and the embedding tables (a lookup is a one-hot row times the
  table), where OpenVINO's and NNCF's quantizers sit (residual sums, norms, scores and the context's own grid stay
  float); with ``symmetric_attention`` OpenVINO runs the attention as one int8 kernel.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import hf_compat
from ..sites import Site, in_head
from ..sites.observe import _is_norm
from ..sites.opmode import MATMUL_FUNCS

PAPER_KINDS = frozenset({"residual", "ln_input", "ln_output", "linear_input", "linear_output", "query", "key", "value",
                         "attn_scores", "attn_probs", "context", "attn_output", "ffn_hidden", "ffn_output",
                         "head_input", "logits"})
LINEAR_KINDS = frozenset({"linear_input", "head_input"})
MATMUL_KINDS = LINEAR_KINDS | {"query", "key", "value", "attn_probs"}  # the inputs of Q K^T and P V too
_CONV = frozenset({"conv1d", "conv2d", "conv3d"})


class SiteSet:
    """The activation and weight choices of one site set on one model.

    Attributes:
        name: ``paper``, ``full``, ``linear``, ``matmul`` or ``kinds``.
        float_head: the task head stays float (``fp32_head``, or ``paper`` on a masked LM as the reference does,
            unless ``int8_head`` asks for it in integers: then the set's rules apply to the head as to any block).
    """

    def __init__(self, model: nn.Module, sites: str | tuple[str, ...], fp32_head: bool = False, task: str = "",
                 int8_head: bool = False):
        self.name = sites if isinstance(sites, str) else "kinds"
        self.kinds = frozenset(sites) if not isinstance(sites, str) else None
        self.family = hf_compat.family_of(getattr(model, "config", None))
        self.heads = hf_compat.head_paths(model)
        self.gated = any(getattr(m, "outlierfree_gate", None) is not None for m in model.modules())
        self.fp32_head = fp32_head
        self.float_head = fp32_head or (self.name == "paper" and task == "mlm" and not int8_head)
        self.owners: dict[str, nn.Module] = dict(model.named_modules())
        self.convs = {n for n, m in self.owners.items() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))}

    # ---- activations ----------------------------------------------------------------------------------------
    def wants(self, site: Site) -> bool:
        """Whether the activation at ``site`` is quantized (before the at-most-once rule)."""
        if self.float_head and in_head(site.module, self.heads):
            return False
        if self.name == "full":
            return True
        if self.name in ("linear", "matmul"):
            kinds = LINEAR_KINDS if self.name == "linear" else MATMUL_KINDS
            return site.kind in kinds and site.module not in self.convs  # a conv (ViT patches) is no Linear
        if self.kinds is not None:
            return site.kind in self.kinds
        # paper
        if site.kind not in PAPER_KINDS:
            return False
        if self.gated and self.family != "opt" and site.kind == "context":
            return False  # BERT quantizes the context after the gate: the output projection's input
        if self.gated and self.family == "opt" and site.kind == "linear_input" and site.module.endswith("out_proj"):
            return False  # OPT quantizes the context before the gate; the gated product enters out_proj as is
        return True

    def wants_residual(self) -> bool:
        """Whether residual sums are quantized at all (so the op mode must look for them)."""
        return self.name in ("paper", "full") or (self.kinds is not None and "residual" in self.kinds)

    # ---- weights --------------------------------------------------------------------------------------------
    def weight_reason(self, path: str, func: str, pname: str, w: torch.Tensor) -> str | None:
        """``None`` when the parameter ``pname``, used by ``func`` in module ``path``, is quantized; otherwise
        why it stays float (the report lists every float weight with this reason)."""
        owner_path, _, leaf = pname.rpartition(".")
        owner = self.owners.get(owner_path)
        if leaf == "bias" or leaf.endswith("_bias") and w.dim() == 1:
            return "bias (kept in float, as int32 in integer runtimes)"
        if self.float_head and in_head(path, self.heads):
            return "task head kept in float" + (" (--fp32-head)" if self.fp32_head else
                                                " (paper: the reference leaves the masked-LM head float; "
                                                "--int8-head quantizes it)")
        if "outlierfree_gate" in pname:
            if self.name == "full" or self.kinds is not None:
                return None
            return "gate (the reference keeps the gate in float)"
        norm = owner is not None and _is_norm(owner)
        if self.name in ("linear", "matmul"):
            if func in MATMUL_FUNCS and func not in _CONV and not norm and w.dim() >= 2:
                return None
            if self.name == "matmul" and func == "embedding" and w.dim() == 2:
                return None  # a lookup is a one-hot row times the table: int8 tables, as OpenVINO/NNCF store them
            return f"{self.name} set: not a linear layer's weight"
        if norm:
            return None if leaf == "weight" else f"norm parameter {leaf}"
        if w.dim() < 2:
            return "1-D parameter (not a weight matrix or a norm gain)"
        return None


