"""The architecture half of the Outlier-Safe Pre-training recipe (OSP; Park et al. 2025, "Outlier-Safe Pre-Training
for Robust 4-Bit Quantization of Large Language Models", arXiv:2506.19697), put into a stock Hugging Face model.

    norm="single-scale"  every LayerNorm's per-channel gain g (d,) becomes one learned scalar s:
                             y = s * (x - mean(x)) / sqrt(var(x) + eps) + b
                         (OSP's Single-Scale RMSNorm, on the LayerNorms of BERT / OPT / ViT, whose bias is kept). A
                         per-channel gain can single out a few channels and grow them into outliers; a scalar cannot.
    embed_proj=True      a learned d x d projection after the input embedding (OSP's EmbProj), initialised to the
                         identity so the model starts as the stock one.

The recipe is recorded in ``config.outlierfree_recipe`` and re-applied by :func:`outlierfree.load_model`. A
single-scale norm saves its gain as a (d,) tensor filled with the scalar, so the checkpoint is also a valid stock
checkpoint (a LayerNorm with a constant gain computes the same thing); the projection is saved beside the stock
weights like the gates. The optimizer half of OSP (Muon) is in ``train/optim.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import require
from .. import hf_compat

NORMS = ("layernorm", "single-scale")


class SingleScaleLayerNorm(nn.LayerNorm):
    """LayerNorm with one learned scalar gain ``weight`` (1,) instead of a per-channel one; the bias stays."""

    def __init__(self, ln: nn.LayerNorm):
        nn.Module.__init__(self)
        self.normalized_shape, self.eps, self.elementwise_affine = ln.normalized_shape, ln.eps, True
        ref = ln.weight if ln.weight is not None else ln.bias
        gain = _scalar(ln.weight.detach()) if ln.weight is not None else torch.ones(1)
        self.weight = nn.Parameter(gain.to(device=ref.device, dtype=ref.dtype))  # (1,)
        self.bias = ln.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps) * self.weight
        return y + self.bias if self.bias is not None else y

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # saved as the (d,) gain of a stock LayerNorm: the checkpoint loads into the stock class unchanged
        destination[prefix + "weight"] = self.weight.detach().expand(self.normalized_shape).clone()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        w = state_dict.get(prefix + "weight")
        if w is not None and w.shape != self.weight.shape:
            state_dict[prefix + "weight"] = _scalar(w)  # a constant (d,) gain -> its scalar
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, eps={self.eps}, single scale"


def _scalar(w: torch.Tensor) -> torch.Tensor:
    """A per-channel gain as one scalar (1,): its value when constant (bit-exact, so a saved single-scale norm loads
    back exactly), else its mean (a pretrained per-channel gain being replaced)."""
    w = w.reshape(-1)
    return w[:1].clone() if torch.all(w == w[0]) else w.float().mean().reshape(1).to(w.dtype)


def _project(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.outlierfree_embed_proj(output)


def apply_recipe(model: nn.Module, recipe: dict[str, Any] | None) -> nn.Module:
    """Put the OSP architecture changes of ``recipe`` (``{"norm": ..., "embed_proj": ...}``) into ``model`` in place,
    once, and record them in ``model.config.outlierfree_recipe``; returns the model."""
    recipe = dict(recipe or {})
    norm, embed_proj = recipe.get("norm", "layernorm"), bool(recipe.get("embed_proj", False))
    require(norm in NORMS, f"unknown norm {norm!r}", f"use one of {', '.join(NORMS)}")
    if norm == "single-scale":
        for parent, name, ln in hf_compat.layer_norms(model):
            setattr(parent, name, SingleScaleLayerNorm(ln))
    if embed_proj:
        emb = hf_compat.input_embedding(model)
        if getattr(emb, "outlierfree_embed_proj", None) is None:
            d = int(getattr(emb, "embedding_dim", None) or model.config.hidden_size)
            ref = next(model.parameters())
            proj = nn.Linear(d, d, bias=False).to(device=ref.device, dtype=ref.dtype)  # (d, d)
            with torch.no_grad():
                proj.weight.copy_(torch.eye(d))  # identity: the model starts as the stock one
            emb.outlierfree_embed_proj = proj
            emb._outlierfree_embed_hook = emb.register_forward_hook(_project)
    if norm != "layernorm" or embed_proj:
        model.config.outlierfree_recipe = {"norm": norm, "embed_proj": embed_proj}
    return model
