"""Self-distillation losses and the outlier penalty of ``outlierfree finetune``.

Distillation (student: the model being cured, possibly under fake quantization; teacher: the frozen original):

- encoders (no task head): ``1 - cos(h_s, h_t)`` per real token plus the squared error relative to the teacher's
  norm, ``|h_s - h_t|^2 / |h_t|^2``, averaged over real tokens (the measurement is token cosine; the relative error
  also pins the norm, which sentence embeddings and nearest neighbours depend on);
- language models and classifiers (a task head): ``KL(p_t || p_s)`` of the output distributions, per real token
  (per image), averaged.

Outlier penalty on the residual sums (the inputs of the LayerNorms, where post-norm BERT's outliers sit), averaged
over those tensors and the sequences of the batch:

- ``infnorm``: the largest magnitude in each sequence, ``max |x|``, in absolute units, so the weight reads "cost
  per unit of inf-norm" (1e-3 is a gentle push against MiniLM's residual outliers of a few hundred);
- ``kurtosis``: ``E[(x - mu)^4] / (var^2 + 1e-6)`` of all values of each sequence (as the paper's validate_mlm.py),
  on a log scale (``log1p``) so that kurtosis in the thousands does not swamp the distillation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, task: str,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean distillation loss over real positions; ``student``/``teacher`` are (B, T, D) states or (B, T, V) /
    (B, C) logits, ``mask`` (B, T) marks real tokens (None: all)."""
    s, t = student.float(), teacher.float()
    if task == "encoder":
        cos = F.cosine_similarity(s, t, dim=-1)  # (B, T)
        rel = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)  # (B, T)
        per = (1.0 - cos) + rel
    else:
        logp_s = F.log_softmax(s, dim=-1)
        logp_t = F.log_softmax(t, dim=-1)
        per = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # (B, T) or (B,)
    if mask is not None and per.dim() == 2 and mask.shape == per.shape:
        m = mask.to(per.dtype)
        return (per * m).sum() / m.sum().clamp_min(1.0)
    return per.mean()


def outlier_penalty(tensors: list[torch.Tensor], kind: str) -> torch.Tensor:
    """The penalty over captured residual sums (each (B, T, D)); 0 when none were captured."""
    if not tensors:
        return torch.zeros(())
    vals = []
    for x in tensors:
        flat = x.float().reshape(x.shape[0], -1)  # (B, T * D): per sequence, as the paper's metrics
        if kind == "infnorm":
            vals.append(flat.abs().amax(dim=1).mean())
        elif kind == "kurtosis":
            mu = flat.mean(dim=1, keepdim=True)
            var = (flat - mu).pow(2).mean(dim=1)
            kurt = (flat - mu).pow(4).mean(dim=1) / (var.pow(2) + 1e-6)
            vals.append(torch.log1p(kurt).mean())
        else:
            raise ValueError(kind)
    return torch.stack(vals).mean()


class ResidualTap:
    """Captures the input of every LayerNorm of a model (the residual sums of post-norm transformers) during a
    forward, for :func:`outlier_penalty`. ``with tap: model(...)``, then ``tap.tensors``."""

    def __init__(self, model: torch.nn.Module):
        from ..hf_compat import layer_norms

        self.norms = [m for _, _, m in layer_norms(model)]
        self.tensors: list[torch.Tensor] = []
        self.handles: list = []

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
            self.tensors.append(args[0])

    def __enter__(self) -> "ResidualTap":
        self.tensors = []
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.norms]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
