"""Load llvmlite's LLVM into the process before llama.cpp or numba can.

On CUDA builds of llama.cpp, its CUDA libraries and numba's LLVM (``libllvmlite.so``) break each
other in either import order: with llama_cpp first, numba's first JIT compile jumps to address 0;
with numba first, loading a model segfaults in a libstdc++ symbol resolved from
``libggml-cuda.so``. Loading ``libllvmlite.so`` with ``RTLD_GLOBAL`` before llama.cpp's libraries
fixes both (measured on an H200: kvtier first, or numba's JIT then kvtier, then llama_cpp all ran;
``RTLD_DEEPBIND`` instead did not help). It cannot be done after llama.cpp's CUDA library is in the
process, so :func:`preload_llvmlite` refuses that case with a message, rather than letting the
process crash later. It costs nothing on CPU builds. :mod:`kvtier` runs this on import.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

_loaded: ctypes.CDLL | None = None


class ImportOrderError(ImportError):
    """llama.cpp's CUDA backend was loaded before kvtier could preload llvmlite."""


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


def loaded_libraries() -> set[str]:
    """File names of the shared libraries mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            return {os.path.basename(line.split()[-1]) for line in maps if "/" in line}
    except OSError:
        return set()


def preload_llvmlite() -> bool:
    """Load ``libllvmlite.so`` with ``RTLD_GLOBAL`` once; False where there is none to load.

    Raises :class:`ImportOrderError` when llama.cpp's CUDA library is loaded already (llama_cpp was
    imported before kvtier) and llvmlite is not: that process would crash at its first JIT.
    """
    global _loaded
    if _loaded is not None:
        return True
    path = llvmlite_library()
    if path is None or os.name != "posix":
        return False
    libraries = loaded_libraries()
    if path.name not in libraries and any(name.startswith("libggml-cuda") for name in libraries):
        raise ImportOrderError(
            "llama_cpp (a CUDA build) was imported before kvtier: its CUDA libraries and numba's "
            "LLVM then crash each other. Import kvtier (or numba) before llama_cpp.")
    _loaded = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return True
