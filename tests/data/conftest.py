"""Fixtures for the data tests: a private cache directory and a small text corpus."""

import os

import pytest


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # tokenizers and packed arrays go to a per-session cache, never the user's ~/.cache
    root = tmp_path_factory.getbasetemp() / "outlierfree-cache"
    monkeypatch.setenv("OUTLIERFREE_CACHE", str(root))
    yield
