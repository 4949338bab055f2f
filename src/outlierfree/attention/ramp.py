"""The gamma ramp of training: a factor in [0, 1] that moves clipped softmax and NCS from softmax (gamma 0, zeta 1)
to their target (gamma times the factor, zeta - 1 times the factor).

The training loop calls :func:`set_gamma_ramp` once per step (``--gamma-ramp-steps N``: factor = step / N); the
variants whose ``ramps`` is true read it with :func:`ramp_of`. It is training's state, not the variant's, so it is
not saved: a loaded model has no factor and runs with the full gamma (factor 1).
"""

from __future__ import annotations

import torch.nn as nn

# the attribute of an attention module that holds the gamma ramp factor in [0, 1] (absent: 1, the full gamma)
RAMP_ATTR = "outlierfree_ramp"


def ramp_of(module: nn.Module) -> float:
    """The gamma ramp factor an attention module runs with now (1 unless training set it)."""
    return float(getattr(module, RAMP_ATTR, 1.0))


def set_gamma_ramp(model: nn.Module, factor: float) -> None:
    """Set the gamma ramp factor (clamped to [0, 1]) of every attention module: the training loop's one call per
    step. Clipped softmax and NCS then use ``factor * gamma``; other variants ignore it."""
    f = min(1.0, max(0.0, float(factor)))
    for m in model.modules():
        if getattr(m, "outlierfree", None) is not None:
            setattr(m, RAMP_ATTR, f)
