"""Shared test setup: small thread counts (CI has 2 cores) and deterministic seeds."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # shared helpers beside the tests (toy.py) import by name
torch.set_num_threads(max(1, min(2, int(os.environ.get("OMP_NUM_THREADS", "2")))))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one torch thread: the thread pool only adds overhead (2x the CPU time on 2 shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
