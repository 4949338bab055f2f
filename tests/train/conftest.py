"""Fixtures for the training tests: a private cache, a small corpus, tiny synthetic images, tiny-run flags."""

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from outlierfree.data.text import load_wiki_documents


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "outlierfree-cache"
    monkeypatch.setenv("OUTLIERFREE_CACHE", str(root))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """300 documents of the offline corpus as one text file (blank-line separated)."""
    p = tmp_path_factory.mktemp("corpus") / "small.txt"
    p.write_text("\n\n".join(load_wiki_documents()[:300]), encoding="utf-8")
    return p


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file (gzip) holding a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """A Fashion-MNIST-shaped folder of idx files: 256 train and 64 test 28x28 images whose class is learnable
    and survives crop and flip (class k has brightness about 20 + 22 k)."""
    d = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("t10k", 64)):
        y = rng.integers(0, 10, n)
        x = 20 + 22 * y[:, None, None] + rng.integers(-8, 9, (n, 28, 28))
        write_idx(d / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", y)
    return d


def _tiny_args(task: str, data: Path, out: Path) -> list[str]:
    base = ["--task", task, "--data", str(data), "--out", str(out), "--no-progress", "--log-every", "1"]
    if task == "image":
        return base + ["--batch-size", "16", "--val-size", "64"]
    return base + ["--vocab-size", "400", "--seq-len", "32", "--batch-size", "8", "--val-size", "32"]


@pytest.fixture
def tiny_args():
    """f(task, data, out) -> CLI flags of a run that takes seconds: tiny model, short sequences, small vocabulary."""
    return _tiny_args


@pytest.fixture
def cli_cmd():
    """The command that runs the CLI with the interpreter running the tests."""
    return [sys.executable, "-m", "outlierfree"]
