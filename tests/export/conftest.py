"""Fixtures shared by the export tests."""

import pytest
import torch

from outlierfree.models.build import build_model


@pytest.fixture(scope="session")
def tiny_gated_bert(tmp_path_factory):
    """A saved tiny gated BERT with its own word-piece tokenizer and a small text file (as tests/quant/test_cli)."""
    from outlierfree.data.text import train_tokenizer
    from outlierfree.models.io import save_model

    root = tmp_path_factory.mktemp("export")
    words = "the cat sat on a mat while a dog ran in the park and birds sang in the tall green trees".split()
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(words[j] for j in torch.randint(len(words), (40,), generator=g).tolist()).capitalize() + "."
             for _ in range(500)]
    (root / "text.txt").write_text("\n\n".join(paras))
    tok = train_tokenizer(paras, "wordpiece", 300)
    save_model(build_model("bert", "tiny", "gated", seed=0, vocab_size=len(tok)), root / "model", tok)
    return root
