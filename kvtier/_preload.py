"""Load llvmlite's LLVM into the process before llama.cpp or numba can.

On CUDA builds of llama.cpp, its CUDA libraries and numba's LLVM (``libllvmlite.so``) break each
other in either import order: with llama_cpp first, numba's first JIT compile jumps to address 0;
with numba first, loading a model segfaults in a libstdc++ symbol resolved from
``libggml-cuda.so``. Loading ``libllvmlite.so`` first with ``RTLD_GLOBAL`` fixed both orders on an
H200 (DESIGN.md, "GPU facts"); it costs nothing on CPU builds. :mod:`kvtier` runs this on import,
so anything that imports kvtier before llama_cpp and numba is safe.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

_loaded: ctypes.CDLL | None = None


def llvmlite_library() -> Path | None:
    """Where llvmlite's shared library is, found without importing llvmlite's binding (which
    would load it the ordinary way)."""
    spec = importlib.util.find_spec("llvmlite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        for name in ("libllvmlite.so", "libllvmlite.dylib"):
            path = Path(base, "binding", name)
            if path.is_file():
                return path
    return None


def preload_llvmlite() -> bool:
    """Load ``libllvmlite.so`` with ``RTLD_GLOBAL`` once; False where there is none to load."""
    global _loaded
    if _loaded is not None:
        return True
    path = llvmlite_library()
    if path is None or os.name != "posix":
        return False
    _loaded = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return True
