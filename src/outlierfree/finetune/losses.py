"""Self-distillation losses and the outlier penalty of ``outlierfree finetune``.

Distillation (student: the model being cured, possibly under fake quantization; teacher: the frozen original):

- encoders (no task head): ``1 - cos(h_s, h_t)`` per real token plus the squared error relative to the teacher's
  norm, ``|h_s - h_t|^2 / |h_t|^2``, averaged over real tokens (the measurement is token cosine; the relative error
  also pins the norm, which sentence embeddings and nearest neighbours depend on);
- language models and classifiers (a task head): ``KL(p_t || p_s)`` of the output distributions, per real token
  (per image), averaged.

Layer-wise distillation (``--layer-weight``): the encoder loss above between every LayerNorm output of the
student and the teacher (the hidden states between and inside the blocks), averaged; it gives every layer its
own target, where the output loss reaches the early layers only through the whole network.

The task's own loss (``--task-weight``): the loss the model was trained with, on the labels the data carries for
free (a masked LM's masked tokens, a language model's next tokens, an image classifier's labels): train/losses.py's
definitions, averaged over the predicted positions. Distillation holds the cured model to the original; the task
loss lets it also improve where the original is undertrained.

Outlier penalty on the residual sums (the inputs of the LayerNorms, where post-norm BERT's outliers sit), averaged
over those tensors and the sequences of the batch:

- ``infnorm``: the largest magnitude in each sequence, ``max |x|``, in absolute units, so the weight reads "cost
  per unit of inf-norm" (1e-3 is a gentle push against MiniLM's residual outliers of a few hundred);
- ``crest``: the crest factor ``max |x| / RMS(x)`` of each sequence: what a per-tensor grid's resolution depends on,
  and scale-free, so the model cannot lower it by shrinking a whole residual sum that the LayerNorm after it
  rescales anyway (which ``infnorm`` read on the float forward rewards: on bert/mini it shrank the embedding sum
  until its learned grid was too coarse for it);
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


def task_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The task's own mean loss of ``logits`` on ``batch``'s labels (``mlm``: the masked positions' ``labels``;
    ``clm``: the next tokens of ``input_ids``, padding excluded; ``image``: ``labels``), the definitions training
    uses (train/losses.py); an ``encoder`` has none (ValueError)."""
    from ..train.losses import output_loss_sum

    total, n, _ = output_loss_sum(logits, batch, task)
    return total / n.clamp_min(1)


def outlier_penalty(tensors: list[torch.Tensor], kind: str, batch: int | None = None) -> torch.Tensor:
    """The penalty over captured residual sums (each (B, T, D), or (B * T, D) where a model flattens tokens, e.g.
    OPT's FFN; ``batch`` = B regroups those per sequence); 0 when none were captured."""
    if not tensors:
        return torch.zeros(())
    vals = []
    for x in tensors:
        x = x if x.dtype == torch.float64 else x.float()  # half precision up to float32; float64 kept (gradcheck)
        flat = x.reshape(batch or x.shape[0], -1)  # (B, T * D): per sequence, as the paper's metrics
        if kind == "infnorm":
            vals.append(flat.abs().amax(dim=1).mean())
        elif kind == "crest":  # max |x| / RMS: scale-free, so shrinking a whole tensor (LayerNorm undoes it) pays nothing
            rms = flat.pow(2).mean(dim=1).add(1e-12).sqrt()
            vals.append((flat.abs().amax(dim=1) / rms).mean())
        elif kind == "kurtosis":
            mu = flat.mean(dim=1, keepdim=True)
            var = (flat - mu).pow(2).mean(dim=1)
            kurt = (flat - mu).pow(4).mean(dim=1) / (var.pow(2) + 1e-6)
            vals.append(torch.log1p(kurt).mean())
        else:
            raise ValueError(kind)
    return torch.stack(vals).mean()


class NormTap:
    """Captures the input (``point="input"``: the residual sums of post-norm transformers, the residual stream of
    pre-norm ones, for :func:`outlier_penalty`) or the output (``point="output"``: the hidden states between and
    inside the blocks, for layer-wise distillation) of every normalisation layer of a model (LayerNorm, RMSNorm:
    :func:`outlierfree.sites.norm_modules`) during a forward. ``with tap: model(...)``, then
    ``tap.tensors`` (each (B, T, D), or (B * T, D) where the model flattens tokens, as OPT's FFN does; in the order
    the forward met them)."""

    def __init__(self, model: torch.nn.Module, point: str = "input"):
        from ..sites import norm_modules

        if point not in ("input", "output"):
            raise ValueError(point)
        self.point = point
        self.norms = norm_modules(model)  # LayerNorm and RMSNorm alike (the site mechanism's own list)
        self.tensors: list[torch.Tensor] = []
        self.handles: list = []

    def _pre_hook(self, module: torch.nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() in (2, 3):
            self.tensors.append(args[0])

    def _hook(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.dim() in (2, 3):
            self.tensors.append(output)

    def __enter__(self) -> "NormTap":
        self.tensors = []
        self.handles = [m.register_forward_pre_hook(self._pre_hook) if self.point == "input"
                        else m.register_forward_hook(self._hook) for m in self.norms]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def layer_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """Layer-wise distillation: the encoder loss of :func:`distill_loss` (``1 - cos`` plus relative squared error,
    per real token) between each pair of captured LayerNorm outputs, averaged over the pairs. A retrofit keeps
    every LayerNorm, so student and teacher capture the same list."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{len(student)} student against {len(teacher)} teacher LayerNorm outputs")

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B * T, D) -> (B, T, D), so that the mask applies
        return x.reshape(*mask.shape, -1) if x.dim() == 2 and mask is not None else x

    return torch.stack([distill_loss(tokens(s), tokens(t), "encoder", mask) for s, t in zip(student, teacher)]).mean()
