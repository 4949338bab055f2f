"""A saved tiny vanilla BERT (masked LM) with its own word-piece tokenizer and a small text file."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: torch's thread pool only adds overhead on 2 shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OUTLIERFREE_CACHE", str(tmp_path_factory.getbasetemp() / "outlierfree-cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    from outlierfree.data.text import train_tokenizer
    from outlierfree.models.build import build_model
    from outlierfree.models.io import save_model

    root = tmp_path_factory.mktemp("ft")
    words = "the cat sat on a mat while a dog ran in the park and birds sang in the tall green trees".split()
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(words[j] for j in torch.randint(len(words), (40,), generator=g).tolist()).capitalize() + "."
             for _ in range(200)]
    (root / "text.txt").write_text("\n\n".join(paras))
    (root / "short.txt").write_text("\n\n".join(paras[:2]))
    tok = train_tokenizer(paras, "wordpiece", 300)
    save_model(build_model("bert", "tiny", "vanilla", seed=0, vocab_size=len(tok)), root / "model", tok)
    return root

