"""kvtier: a tiered, persistent KV cache for local LLM inference with llama.cpp."""

from kvtier._preload import preload_llvmlite

# Before anything imports llama_cpp or numba: see kvtier._preload.
preload_llvmlite()
