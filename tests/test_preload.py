"""kvtier loads llvmlite's LLVM before llama.cpp (a crash fix for CUDA builds; DESIGN.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvtier import _preload

_USE_BOTH = """
import numpy as np, numba
from kvtier.engine.model import Model, default_model_path
numba.njit(lambda x: x * 2)(np.ones(4))
model = Model(default_model_path())
print(len(model.tokenize("hello")), numba.njit(lambda x: x + 1)(np.ones(2)).sum())
"""


@pytest.mark.parametrize("first", ["import kvtier\nimport llama_cpp\n",
                                   "import llama_cpp\nimport kvtier\n",
                                   "import numba\nimport kvtier\nimport llama_cpp\n"])
def test_any_import_order_works_on_this_build(first: str) -> None:
    done = subprocess.run([sys.executable, "-c", first + _USE_BOTH], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "4.0"


def test_llvmlite_is_in_the_process_with_global_symbols() -> None:
    import kvtier  # noqa: F401  (runs the preload)
    assert _preload.preload_llvmlite()
    assert "libllvmlite.so" in _preload.loaded_libraries()


def test_a_cuda_llama_loaded_first_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_preload, "_loaded", None)
    monkeypatch.setattr(_preload, "loaded_libraries",
                        lambda: {"libggml-cuda.so.0", "libllama.so.0"})
    with pytest.raises(_preload.ImportOrderError, match="Import kvtier"):
        _preload.preload_llvmlite()
