"""What a site is: one named activation tensor of a forward pass, and the kinds of sites there are (the one list
that analysis and quantization share). :mod:`.observe` finds sites on a model and observes them; :mod:`.opmode` finds the
ones that only exist as operations (residual sums)."""

from __future__ import annotations

from dataclasses import dataclass

# Every kind of site, in the order a block computes them: the one list that analysis and quantization share.
SITE_KINDS = (
    "embedding",  # output of an embedding table (word, position, token type, patch projection)
    "residual",  # a residual sum or an embeddings' sum, found as a `tensor + tensor` add (see .ops)
    "ln_input",  # input of a LayerNorm / RMSNorm: the residual sum (or the embeddings' sum)
    "ln_output",  # output of a LayerNorm / RMSNorm
    "linear_input",  # input of any other nn.Linear
    "linear_output",  # output of any other nn.Linear (Q, K, V projections included)
    "query", "key", "value",  # attention Q, K, V (B, H, T, D), inside the attention function
    "attn_scores",  # Q K^T * scale (B, H, Tq, Tk), before masks and position biases are added
    "attn_probs",  # (clipped) softmax probabilities (B, H, Tq, Tk)
    "context",  # probabilities x V, before the gate (B, H, Tq, D)
    "gate",  # gated attention's gate probabilities
    "attn_output",  # output of the attention's output projection, before the residual add
    "ffn_up",  # output of the FFN's first linear(s), before the activation (fc1, intermediate.dense, gate_proj)
    "ffn_hidden",  # output of the FFN activation function
    "ffn_output",  # output of the FFN's second linear, before the residual add
    "head_input",  # input of the task head's final linear (LM head / classifier)
    "logits",  # output of the task head's final linear
)

@dataclass(frozen=True)
class Site:
    """One named activation tensor.

    Attributes:
        name: unique, ``"<module path>:<point>"``.
        kind: one of :data:`SITE_KINDS`.
        layer: transformer block index parsed from the module path, ``None`` outside the blocks.
        module: the module path (``""`` for the root).
        point: ``input``, ``output`` or an attention-internal point (``query`` ... ``gate``).
    """

    name: str
    kind: str
    layer: int | None
    module: str
    point: str
