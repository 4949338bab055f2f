"""Attention variants: vanilla softmax, clipped softmax, gated attention and the zoo of attention/normalisers.py (NCS,
softmax1, sink, softpick, sigmoid, softplus), as transformers attention functions."""

from .config import AttentionConfig, CLIP_VARIANTS, GATE_PER, GATE_TYPES, IMPLS, VARIANTS
from .gates import AttentionGate
from .normalisers import AttentionSink, set_gamma_ramp
from .softmax import clipped_softmax, gamma_for, keep_mask, visible_keys

__all__ = ["AttentionConfig", "AttentionGate", "AttentionSink", "set_gamma_ramp", "clipped_softmax", "gamma_for",
           "keep_mask", "visible_keys", "VARIANTS", "CLIP_VARIANTS", "GATE_TYPES", "GATE_PER", "IMPLS"]
