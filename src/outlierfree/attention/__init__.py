"""Attention variants: vanilla softmax, clipped softmax and gated attention, as transformers attention functions."""

from .config import AttentionConfig, GATE_PER, GATE_TYPES, IMPLS, VARIANTS
from .gates import AttentionGate
from .softmax import clipped_softmax, gamma_for, keep_mask, visible_keys
from . import blocked  # noqa: F401,E402  (registers CLIPPED_KERNELS["blocked"] and the impl="auto" chooser)

__all__ = ["AttentionConfig", "AttentionGate", "clipped_softmax", "gamma_for", "keep_mask", "visible_keys",
           "VARIANTS", "GATE_TYPES", "GATE_PER", "IMPLS"]
