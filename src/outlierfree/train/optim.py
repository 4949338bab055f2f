"""Optimizers and the learning-rate schedule of ``outlierfree train``: AdamW (default) or OSP's Muon + AdamW
(``--optimizer muon``), with linear warm-up and linear / cosine / constant decay.

Muon (Jordan et al. 2024; torch.optim.Muon) orthogonalises the momentum of each 2-D weight matrix by Newton-Schulz
iterations, so no single direction of a matrix's update dominates; Outlier-Safe Pre-training (Park et al. 2025)
found it a main reason its models grow no outliers. As OSP does, Muon gets the hidden weight matrices (attention
and FFN projections, the embedding projection) and AdamW everything else: embeddings, the task head, norms, biases,
gates, sink logits and non-2-D weights (ViT's patch convolution). Muon runs with ``adjust_lr_fn="match_rms_adamw"``
(its update scaled to AdamW's RMS, Moonlight), so one ``--lr`` and schedule serve both.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import OutlierfreeError

OPTIMIZERS = ("adamw", "muon")


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm: bool) -> list[dict[str, Any]]:
    """AdamW groups: biases never decayed; LayerNorm weights decayed only with ``decay_norm`` (the reference
    OPT script decays them, its BERT script does not)."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("bias") or (id(p) in norm_params and not decay_norm):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: Any) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``i`` optimizer steps: linear warm-up to 1 over ``warmup_steps``, then
    linear or cosine decay to ``min_lr_ratio`` at ``steps`` (or constant)."""
    warm, total, floor = cfg.warmup_steps or 0, cfg.steps, cfg.min_lr_ratio

    def f(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (i - warm) / max(1, total - warm))
        shape = 1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * shape

    return f


def optimizer_and_schedule(model: nn.Module, cfg: Any) -> tuple[torch.optim.Optimizer, Any]:
    """The run's optimizer (:func:`build_optimizer` over :func:`parameter_groups`) and its LambdaLR schedule."""
    optimizer = build_optimizer(model, cfg, parameter_groups(model, cfg.weight_decay, cfg.decay_norm))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def muon_matrices(model: nn.Module) -> tuple[list[nn.Parameter], set[int]]:
    """The parameters Muon takes: 2-D hidden weight matrices (not embeddings, the head, gates or sinks)."""
    from .. import hf_compat

    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for head in hf_compat.head_paths(model):
        skip |= {id(p) for p in model.get_submodule(head).parameters()}
    out = [p for n, p in model.named_parameters()
           if p.requires_grad and p.dim() == 2 and id(p) not in skip
           and "outlierfree_gate" not in n and "outlierfree_sink" not in n]
    return out, {id(p) for p in out}


class MuonAdamW(torch.optim.Optimizer):
    """Muon on some parameters and AdamW on the rest, as one optimizer (one scheduler, one checkpoint).

    ``param_groups`` are the inner optimizers' own group dicts, so a scheduler that sets ``group["lr"]`` drives both.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, {})  # the same dicts, not copies
        self._sync()

    def _sync(self) -> None:
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.state = self.muon.state  # read by nothing that matters; kept for the Optimizer interface

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self.muon.step(closure)
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._sync()  # load_state_dict replaces the inner group dicts


def build_optimizer(model: nn.Module, cfg: Any, adamw_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW over ``adamw_groups`` (:func:`parameter_groups`), or, with ``cfg.optimizer == "muon"``, Muon on the
    hidden matrices and AdamW on the rest of those groups. Muon with no matrix to take is a one-line error."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps)
    mats, ids = muon_matrices(model)
    if not mats:
        raise OutlierfreeError(f"--optimizer muon found no 2-D hidden weight matrix in {type(model).__name__} to "
                               f"give it", "use --optimizer adamw")
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in adamw_groups]
    rest = [g for g in rest if g["params"]]
    muon = torch.optim.Muon(mats, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.95, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=cfg.lr, betas=betas, eps=cfg.adam_eps)
    return MuonAdamW(muon, adamw)
