"""A small on-disk cache for trained tokenizers and tokenised corpora, keyed by content hashes.

Location: ``$OUTLIERFREE_CACHE`` or ``~/.cache/outlierfree``. Entries are written to a temporary name and renamed,
so a killed process never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..records import make_dir

CACHE_FIX = "point $OUTLIERFREE_CACHE at a directory (or move that file away)"


def cache_dir(*parts: str) -> Path:
    """``$OUTLIERFREE_CACHE`` (default ``~/.cache/outlierfree``) joined with ``parts``, created."""
    root = Path(os.environ.get("OUTLIERFREE_CACHE") or Path.home() / ".cache" / "outlierfree")
    d = root.joinpath(*parts)
    make_dir(d, "the cache directory", CACHE_FIX)
    return d


def hash_texts(texts: Iterable[str], *extra: Any) -> str:
    """SHA-256 (hex, 24 chars) of a sequence of texts plus extra JSON-able keys; order matters."""
    h = hashlib.sha256()
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))  # length prefix: ["ab", "c"] != ["a", "bc"]
        h.update(b)
    return h.hexdigest()[:24]


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary sibling, then rename over ``path``."""
    make_dir(path.parent, "the cache directory", CACHE_FIX)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npy", dir=path.parent)
    os.close(fd)
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_array(path: Path) -> np.ndarray | None:
    """The cached array at ``path``, or ``None`` if it is absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
