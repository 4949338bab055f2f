"""A saved tiny vanilla BERT (masked LM) with its own word-piece tokenizer and a small text file."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread_everywhere(one_thread):
    """Every fine-tune test module runs on one torch thread (tests/conftest.py::one_thread)."""


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OUTLIERFREE_CACHE", str(tmp_path_factory.getbasetemp() / "outlierfree-cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    from toy import paragraphs, save_tiny_bert

    paras = paragraphs(200)
    root = save_tiny_bert(tmp_path_factory.mktemp("ft"), "vanilla", paras)
    (root / "short.txt").write_text("\n\n".join(paras[:2]))
    return root

