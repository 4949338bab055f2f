"""Tiny, random-initialised Hugging Face models and padded batches for architecture-coverage tests.

Not a test module: tests import it (``from archs import ...`` / ``tests.archs``) to run the same check over
many model families without downloading anything. Every model is built from a config alone (no weights on
disk), in float32, eval mode, with ``attn_implementation="eager"``; it takes well under a second.

* :data:`ARCH_NAMES` -- the covered architectures.
* :func:`build` -- the model for one of them; the same ``seed`` gives identical weights, and the global torch RNG
  is left untouched.
* :func:`batch` -- a batch for that model: token ids with *real* padding (row 0 full length, row 1 about 2/3, row 2
  about 1/3, repeating), right-padded for encoders and T5, left-padded for decoder-only causal LMs (with the
  ``position_ids`` generation would derive from the mask); ViT gets standard-normal ``pixel_values``.
* :func:`real_token_mask` -- ``(B, T)`` bool of the positions whose outputs mean something (``None`` for ViT).

Sizes: hidden 64 (ALBERT/ELECTRA embeddings 32), 2 layers, 4 heads (Llama, Qwen2 and Gemma-3 use 2 key/value
heads: grouped-query attention), intermediate 128, vocabulary 128, 64+ positions. Gemma-3 has one sliding-window
layer (window 4) and one full-attention layer. ``initializer_range`` is 0.1 (5x the default) so activations are not
all tiny, and parameters that initialise to an identity (norm weights, norm/linear biases, Gemma's zero-centred norm
weights) get a small seeded perturbation so that code which mishandles them (e.g. folds ``weight`` where the model
uses ``1 + weight``) cannot pass by accident; ``build(..., perturb=False)`` skips that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

__all__ = ["ARCH_NAMES", "DECODER_ONLY", "build", "batch", "config", "real_token_mask"]

ARCH_NAMES: tuple[str, ...] = (
    "bert",
    "roberta",
    "distilbert",
    "albert",
    "electra",
    "gpt2",
    "opt",
    "llama",
    "gemma3",
    "qwen2",
    "t5",
    "vit",
)

#: causal LMs without an encoder: their batches are left-padded, as for generation
DECODER_ONLY: frozenset[str] = frozenset({"gpt2", "opt", "llama", "gemma3", "qwen2"})

VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
POSITIONS = 64
INIT = 0.1
IMAGE = 32
PATCH = 8
LABELS = 10
#: ids below this are left to special tokens (pad/bos/eos/cls/...); real tokens come from [FIRST_TOKEN, vocab)
FIRST_TOKEN = 4

_BERTLIKE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=INTERMEDIATE,
    max_position_embeddings=POSITIONS,
    initializer_range=INIT,
)

_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=POSITIONS,
    initializer_range=INIT,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    use_cache=False,
)


def _bert():
    return tf.BertForMaskedLM, tf.BertConfig(**_BERTLIKE, pad_token_id=0)


def _roberta():
    # RoBERTa numbers positions from padding_idx + 1 (= 2), so it needs 2 extra position rows
    cfg = {**_BERTLIKE, "max_position_embeddings": POSITIONS + 2}
    return tf.RobertaForMaskedLM, tf.RobertaConfig(**cfg, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def _distilbert():
    return tf.DistilBertForMaskedLM, tf.DistilBertConfig(
        vocab_size=VOCAB,
        dim=HIDDEN,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=INTERMEDIATE,
        max_position_embeddings=POSITIONS,
        initializer_range=INIT,
        pad_token_id=0,
    )


def _albert():
    # both layers share one layer group (ALBERT's cross-layer parameter sharing): the same modules run twice
    return tf.AlbertForMaskedLM, tf.AlbertConfig(
        **_BERTLIKE,
        embedding_size=32,
        num_hidden_groups=1,
        inner_group_num=1,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def _electra():
    return tf.ElectraForMaskedLM, tf.ElectraConfig(**_BERTLIKE, embedding_size=32, pad_token_id=0)


def _gpt2():
    return tf.GPT2LMHeadModel, tf.GPT2Config(
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        initializer_range=INIT,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
    )


def _opt():
    return tf.OPTForCausalLM, tf.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        word_embed_proj_dim=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_dim=INTERMEDIATE,
        max_position_embeddings=POSITIONS,
        init_std=INIT,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        use_cache=False,
    )


def _llama():
    return tf.LlamaForCausalLM, tf.LlamaConfig(**_DECODER)


def _gemma3():
    head_dim = HIDDEN // HEADS
    return tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(
        **{**_DECODER, "eos_token_id": 1, "bos_token_id": 2},
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )


def _qwen2():
    return tf.Qwen2ForCausalLM, tf.Qwen2Config(**_DECODER)


def _t5():
    return tf.T5ForConditionalGeneration, tf.T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=HIDDEN // HEADS,
        d_ff=INTERMEDIATE,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=HEADS,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=POSITIONS,
        feed_forward_proj="relu",
        initializer_factor=1.0,  # T5 scales its own init by d_model**-0.5; 1.0 is its default
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        use_cache=False,
    )


def _vit():
    return tf.ViTForImageClassification, tf.ViTConfig(
        image_size=IMAGE,
        patch_size=PATCH,
        num_channels=3,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        initializer_range=INIT,
        num_labels=LABELS,
    )


_FACTORIES: dict[str, Callable[[], tuple[type, object]]] = {
    "bert": _bert,
    "roberta": _roberta,
    "distilbert": _distilbert,
    "albert": _albert,
    "electra": _electra,
    "gpt2": _gpt2,
    "opt": _opt,
    "llama": _llama,
    "gemma3": _gemma3,
    "qwen2": _qwen2,
    "t5": _t5,
    "vit": _vit,
}
assert tuple(_FACTORIES) == ARCH_NAMES


def _check(name: str) -> None:
    if name not in _FACTORIES:
        raise KeyError(f"unknown architecture {name!r}; expected one of {ARCH_NAMES}")


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


@torch.no_grad()
def _perturb(model: torch.nn.Module, generator: torch.Generator, std: float = 0.1) -> None:
    """Nudge parameters that initialise to an identity (norm weights, all biases) by seeded N(0, std) noise."""
    seen: set[int] = set()
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied parameters are nudged once
                continue
            if pname == "bias" or (_is_norm(module) and pname == "weight"):
                seen.add(id(param))
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)


def config(name: str):
    """The (fresh) config :func:`build` uses for ``name``, eager attention."""
    _check(name)
    _, cfg = _FACTORIES[name]()
    cfg._attn_implementation = "eager"
    return cfg


def build(name: str, seed: int = 0, *, perturb: bool = True) -> torch.nn.Module:
    """A tiny random ``name`` model: float32, eval mode, eager attention; same ``seed`` -> identical weights."""
    _check(name)
    cls, cfg = _FACTORIES[name]()
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    if perturb:
        _perturb(model, torch.Generator().manual_seed(seed + 1_000_003))
    return model.float().eval()


def _lengths(batch_size: int, seq_len: int) -> list[int]:
    """Row i keeps 3/3, 2/3, 1/3 of seq_len (cycling), at least one token."""
    return [max(1, round(seq_len * (3 - i % 3) / 3)) for i in range(batch_size)]


def _padded(
    lengths: list[int], seq_len: int, vocab: int, pad: int, left: bool, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(lengths), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), seq_len), dtype=torch.long)
    for row, n in enumerate(lengths):
        span = slice(seq_len - n, seq_len) if left else slice(0, n)
        ids[row, span] = torch.randint(FIRST_TOKEN, vocab, (n,), generator=gen)
        mask[row, span] = 1
    return ids, mask


def batch(name: str, model, batch_size: int = 3, seq_len: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for ``model`` (built by :func:`build(name)`): padded token ids, or images for ViT.

    Text: ``input_ids`` + ``attention_mask`` (int64, 1 = real token). Encoders and T5 are right-padded; decoder-only
    models are left-padded and also get ``position_ids`` counted from the first real token (padding at 1), as
    ``generate`` does, so a padded row computes the same real-token outputs as the row alone. T5 additionally gets
    ``decoder_input_ids`` (start token, then random tokens) + ``decoder_attention_mask`` with the *same* per-row
    lengths as the encoder side, so :func:`real_token_mask` serves both stacks. ViT: ``pixel_values`` (B, 3, 32, 32).
    """
    _check(name)
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    if name == "vit":
        size = cfg.image_size
        return {"pixel_values": torch.randn((batch_size, cfg.num_channels, size, size), generator=gen)}
    if seq_len > POSITIONS:
        raise ValueError(f"seq_len {seq_len} exceeds the {POSITIONS} positions the tiny models have")
    pad = cfg.pad_token_id
    lengths = _lengths(batch_size, seq_len)
    left = name in DECODER_ONLY
    ids, mask = _padded(lengths, seq_len, cfg.vocab_size, pad, left, gen)
    out = {"input_ids": ids, "attention_mask": mask}
    if left:
        position_ids = mask.cumsum(-1) - 1
        out["position_ids"] = position_ids.masked_fill(mask == 0, 1)
    if name == "t5":
        dec_ids, dec_mask = _padded(lengths, seq_len, cfg.vocab_size, pad, False, gen)
        dec_ids[:, 0] = cfg.decoder_start_token_id
        out["decoder_input_ids"] = dec_ids
        out["decoder_attention_mask"] = dec_mask
    return out


def real_token_mask(name: str, batch) -> torch.Tensor | None:
    """``(B, T)`` bool: positions holding real tokens (for T5 the same for encoder and decoder); None for ViT."""
    _check(name)
    if name == "vit":
        return None
    return batch["attention_mask"].bool()
