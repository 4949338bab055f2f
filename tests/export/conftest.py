"""Fixtures shared by the export tests."""

import pytest


@pytest.fixture(scope="session")
def tiny_gated_bert(tmp_path_factory):
    """A saved tiny gated BERT with its own word-piece tokenizer and a small text file (as tests/quant/test_cli)."""
    from toy import paragraphs, save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("export"), "gated", paragraphs(500))
