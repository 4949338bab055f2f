"""Attention variants as transformers attention functions: one class per variant in attention/variants/ (vanilla
softmax, clipped softmax, gated attention, NCS, softmax1, sink, softpick, sigmoid, softplus), the kernels that compute
them (kernels.py), and :class:`AttentionConfig`, the variant a model runs."""

from .config import CLIP_VARIANTS, IMPLS, VARIANTS, AttentionConfig
from .ramp import set_gamma_ramp
from .softmax import clipped_softmax, keep_mask, visible_keys
from .variants import REGISTRY, Variant
from .variants.gated import GATE_PER, GATE_TYPES, AttentionGate
from .variants.sink import AttentionSink

__all__ = ["AttentionConfig", "AttentionGate", "AttentionSink", "REGISTRY", "Variant", "set_gamma_ramp",
           "clipped_softmax", "keep_mask", "visible_keys", "VARIANTS", "CLIP_VARIANTS", "GATE_TYPES", "GATE_PER",
           "IMPLS"]
