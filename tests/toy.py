"""A toy corpus and a saved tiny BERT for the tests that need a model directory on disk (not a test module).

The paragraphs are drawn from a 20-word vocabulary with a seeded generator, so every caller that asks for the same
``n``, ``words`` and ``tail`` gets the same text on every machine; the tokenizer is a word-piece one trained on it.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "the cat sat on a mat while a dog ran in the park and birds sang in the tall green trees".split()


def paragraphs(n: int, words: int = 40, seed: int = 0, tail: bool = False) -> list[str]:
    """``n`` paragraphs of ``words`` random words each (one sentence; with ``tail`` a second, fixed sentence)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(len(WORDS), (words,), generator=g).tolist()
        text = " ".join(WORDS[j] for j in idx).capitalize() + "."
        out.append(text + " " + " ".join(WORDS[:8]).capitalize() + "." if tail else text)
    return out


def save_tiny_bert(root: Path, variant: str | dict, paras: list[str]) -> Path:
    """``root/text.txt`` (the paragraphs, blank-line separated) and ``root/model``: a tiny masked-LM BERT with the
    ``variant`` attention and a word-piece tokenizer trained on the paragraphs. Returns ``root``."""
    from outlierfree.data.text import train_tokenizer
    from outlierfree.models.build import build_model
    from outlierfree.models.io import save_model

    (root / "text.txt").write_text("\n\n".join(paras))
    tok = train_tokenizer(paras, "wordpiece", 300)
    save_model(build_model("bert", "tiny", variant, seed=0, vocab_size=len(tok)), root / "model", tok)
    return root
