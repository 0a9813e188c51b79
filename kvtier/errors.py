"""Typed errors. The HTTP edge maps each to an OpenAI-style error once; nothing matches messages."""

from __future__ import annotations


class KvtierError(Exception):
    """Base of every error kvtier raises on purpose."""


class ConfigError(KvtierError):
    """A configuration key has an unknown name or an impossible value."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class BlockCorrupt(KvtierError):
    """A stored record failed its checksum or could not be decoded; it is never returned as data."""


class BlockMissing(KvtierError):
    """A block the catalog lists is in no tier."""


class TierFull(KvtierError):
    """A tier cannot take a record even after demoting everything it may demote."""


class TierDamaged(KvtierError):
    """A tier's files cannot be read as a whole (a damaged SST, a missing blob or MANIFEST, a
    truncated or overwritten LMDB file): its blocks are misses until it is rebuilt."""


class WriteFailed(KvtierError):
    """A tier or the catalog refused a write (a full disk, an I/O error): nothing was stored,
    and what was computed is still served."""


STORAGE_FAULTS = (BlockCorrupt, BlockMissing, TierDamaged, TierFull, WriteFailed)
"""What the store may meet that costs the cache, never a request: what was computed is served."""


class ModelMismatch(KvtierError):
    """KV computed by one model (or cache type) was about to be used with another."""


class UnsupportedLayout(KvtierError):
    """A llama.cpp state blob has a layout kvtier does not know; it never guesses."""


class StateRejected(KvtierError):
    """llama.cpp refused to read or write a sequence's state (``set_data``/``get_data`` failed)."""


class StoreLocked(KvtierError):
    """Another process holds the data directory."""


class SessionNotFound(KvtierError):
    """No session has the given id."""


class SessionBusy(KvtierError):
    """The session is generating a reply already; a session takes one request at a time."""


class InvalidRequest(KvtierError):
    """A request's content is impossible (bad parameter, bad session id, ...)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextOverflow(KvtierError):
    """The prompt plus the requested tokens do not fit the model's context."""


class Overloaded(KvtierError):
    """More requests are waiting for a slot than the queue holds."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelNotFound(KvtierError):
    """The request names a model this server does not serve."""


class RemoteUnavailable(KvtierError):
    """The remote tier (Redis Cluster) did not answer, refused a write, or its circuit breaker
    is open: callers carry on with the local tiers and recomputation."""
