"""Tiny models for the evaluation-data tests: one "trained here" BERT and ViT (a train_config.json beside the
weights, as `outlierfree train` writes) and one external BERT (a plain save_pretrained directory).

The tokenizer is a stored fixture (tests/data/fixtures/wordpiece): training one again can give another vocabulary
(the tokenizers library breaks ties between equally frequent merges in a process-random order), and the golden
token ids in fixtures/golden.json must belong to one exact tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).parent / "fixtures"
WORDS = ("the cat sat on a mat while a dog ran in the park and birds sang in the tall green trees, "
         "then rain fell; people ran home").split()


def paragraphs(n: int = 120, words: int = 30, seed: int = 0) -> list[str]:
    """``n`` deterministic paragraphs of two sentences each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(len(WORDS), (words,), generator=g).tolist()
        out.append(" ".join(WORDS[j] for j in idx).capitalize() + ". " + " ".join(WORDS[:8]).capitalize() + ".")
    return out


def tokenizer():
    """The stored WordPiece tokenizer (about 300 tokens)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(FIXTURES / "wordpiece"), local_files_only=True)


def write_corpus(path: Path, n: int = 120) -> Path:
    """The corpus as blank-line separated paragraphs."""
    path.write_text("\n\n".join(paragraphs(n)))
    return path


def trained_bert(root: Path, corpus: Path, seq_len: int = 32, val_fraction: float = 0.1) -> Path:
    """A BERT "trained here" on ``corpus``: its weights, tokenizer and a train_config.json."""
    from outlierfree.models.build import build_model
    from outlierfree.models.io import save_model

    tok = tokenizer()
    model = build_model("bert", "tiny", "vanilla", seed=0, vocab_size=len(tok))
    record = {"task": "mlm", "family": "bert", "data": str(corpus), "seq_len": seq_len,
              "val_fraction": val_fraction, "mlm_probability": 0.15}
    return save_model(model, root / "bert", tok, extra_json={"train_config.json": record})


def external_bert(root: Path, max_positions: int = 64) -> Path:
    """A BERT not trained here: random weights, its tokenizer beside it, no train_config.json."""
    from transformers import BertConfig, BertForMaskedLM

    tok = tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=max_positions)
    model = BertForMaskedLM(cfg)
    d = root / "external"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def image_folder(root: Path) -> Path:
    """28 x 28 grey PNGs in train/ and val/ class subfolders (two classes)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in ("a", "b"):
            d = root / "images" / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 256, (28, 28), dtype=np.uint8)
                a[:7, :7] = 0  # one black patch: a background key
                Image.fromarray(a, mode="L").save(d / f"{i}.png")
    return root / "images"


def trained_vit(root: Path, images: Path, mean: float = 0.5, std: float = 0.25) -> Path:
    """A ViT "trained here" on ``images`` with normalisation statistics that differ from the folder's own."""
    from outlierfree.models.build import build_model
    from outlierfree.models.io import save_model

    model = build_model("vit", "tiny", "vanilla", seed=0, num_labels=2)
    extra = {"train_config.json": {"task": "image", "family": "vit", "data": str(images), "val_fraction": 0.1},
             "image_normalisation.json": {"mean": [mean], "std": [std]}}
    return save_model(model, root / "vit", None, extra_json=extra)


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's shape and values (golden comparisons)."""
    import hashlib

    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(json.dumps([list(t.shape), str(t.dtype)]).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]
