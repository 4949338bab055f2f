"""Named model sizes for each family: tiny ones that train on a CPU in minutes up to the paper's models.

Each size is a dict of Hugging Face config fields. ``vocab_size`` of the text sizes is a default: training
replaces it with the trained tokenizer's size.
"""

from __future__ import annotations

from typing import Any

_BERT = dict(hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, type_vocab_size=2)
_OPT = dict(do_layer_norm_before=True, dropout=0.1, attention_dropout=0.0, activation_function="relu",
            pad_token_id=1, bos_token_id=2, eos_token_id=2)
# Fashion-MNIST: 28 x 28 grey images, 10 classes
_VIT_FMNIST = dict(image_size=28, num_channels=1, num_labels=10, hidden_act="gelu", hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, qkv_bias=True)


def _text(n_layers: int, d: int, heads: int, ffn: int, max_len: int, vocab: int) -> dict[str, Any]:
    return dict(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=heads, intermediate_size=ffn,
                max_position_embeddings=max_len, vocab_size=vocab)


SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "bert": {
        "tiny": {**_BERT, **_text(2, 64, 2, 256, 128, 8192)},
        "mini": {**_BERT, **_text(4, 128, 2, 512, 128, 8192)},
        "small": {**_BERT, **_text(4, 256, 4, 1024, 128, 8192)},
        "6l": {**_BERT, **_text(6, 768, 12, 3072, 256, 30522)},  # the reference code's smaller BERT
        "base": {**_BERT, **_text(12, 768, 12, 3072, 512, 30522)},  # BERT-base
    },
    "opt": {
        "tiny": {**_OPT, "num_hidden_layers": 2, "hidden_size": 64, "word_embed_proj_dim": 64,
                 "num_attention_heads": 2, "ffn_dim": 256, "max_position_embeddings": 128, "vocab_size": 8192},
        "mini": {**_OPT, "num_hidden_layers": 4, "hidden_size": 128, "word_embed_proj_dim": 128,
                 "num_attention_heads": 2, "ffn_dim": 512, "max_position_embeddings": 256, "vocab_size": 8192},
        "small": {**_OPT, "num_hidden_layers": 4, "hidden_size": 256, "word_embed_proj_dim": 256,
                  "num_attention_heads": 4, "ffn_dim": 1024, "max_position_embeddings": 256, "vocab_size": 8192},
        "6l": {**_OPT, "num_hidden_layers": 6, "hidden_size": 768, "word_embed_proj_dim": 768,
               "num_attention_heads": 12, "ffn_dim": 3072, "max_position_embeddings": 2048, "vocab_size": 50272,
               "init_std": 0.006},
        "125m": {**_OPT, "num_hidden_layers": 12, "hidden_size": 768, "word_embed_proj_dim": 768,
                 "num_attention_heads": 12, "ffn_dim": 3072, "max_position_embeddings": 2048, "vocab_size": 50272,
                 "init_std": 0.006},  # OPT-125m with the paper's init std
    },
    "vit": {
        "tiny": {**_VIT_FMNIST, "patch_size": 7, "num_hidden_layers": 2, "hidden_size": 64,
                 "num_attention_heads": 2, "intermediate_size": 256},
        "mini": {**_VIT_FMNIST, "patch_size": 4, "num_hidden_layers": 4, "hidden_size": 128,
                 "num_attention_heads": 2, "intermediate_size": 512},
        "small": {**_VIT_FMNIST, "patch_size": 4, "num_hidden_layers": 6, "hidden_size": 192,
                  "num_attention_heads": 3, "intermediate_size": 768},
        "s16": dict(image_size=224, patch_size=16, num_channels=3, num_labels=1000, num_hidden_layers=12,
                    hidden_size=384, num_attention_heads=6, intermediate_size=1536, hidden_act="gelu",
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True),  # ViT-S/16
    },
}

DESCRIPTIONS: dict[str, str] = {
    "bert/tiny": "2 layers, 64 wide: seconds per step on a CPU (tests, quick preset)",
    "bert/mini": "4 layers, 128 wide, 2 heads (the developers' reference probe)",
    "bert/small": "4 layers, 256 wide, 4 heads",
    "bert/6l": "the reference code's 6-layer BERT (768 wide, 12 heads, 256 positions)",
    "bert/base": "BERT-base (12 layers, 768 wide)",
    "opt/tiny": "2 layers, 64 wide",
    "opt/mini": "4 layers, 128 wide, 2 heads",
    "opt/small": "4 layers, 256 wide, 4 heads",
    "opt/6l": "the reference code's 6-layer OPT",
    "opt/125m": "OPT-125m (12 layers, 768 wide, init std 0.006)",
    "vit/tiny": "Fashion-MNIST, patch 7, 2 layers, 64 wide",
    "vit/mini": "Fashion-MNIST, patch 4, 4 layers, 128 wide",
    "vit/small": "Fashion-MNIST, patch 4, 6 layers, 192 wide",
    "vit/s16": "ViT-S/16 (224 px, 12 layers, 384 wide, 1000 classes)",
}
