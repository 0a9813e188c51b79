"""Boundary types between the HTTP layer and the engine.

The HTTP layer builds a :class:`GenerationRequest`, submits it with ``Engine.submit`` and reads
:class:`TokenEvent`s then one :class:`Finished` (or an exception) from the returned
:class:`GenerationHandle`; it reads the cache's state as a :class:`CacheStats`. It never touches
llama.cpp or the store directly. This module imports nothing of kvtier's: importing it (as the HTTP
schemas do) must not load llama.cpp, numba or the stores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from kvtier.errors import InvalidRequest

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
"""Session ids: safe in URLs and as catalog keys (no paths, no separators)."""
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


DEFAULT_TENANT = "default"
"""The tenant of ``server.api_key`` and of a server without keys; sessions stored before tenants
existed are its own."""


def check_session_id(session_id: str) -> str:
    """The id itself, or :class:`InvalidRequest` naming ``session_id``."""
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise InvalidRequest("session_id must be 1-128 letters, digits, '_' or '-'",
                             "session_id")
    return session_id


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.8
    """0 means greedy."""
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    max_tokens: int | None = None
    """None: until the end of the context or an end-of-generation token."""
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Exactly one of ``messages`` (chat) and ``prompt`` (plain completion) is set."""

    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    session_id: str | None = None
    """Continue (or create) this session: its stored messages come before ``messages``."""
    model: str | None = None
    request_id: str = ""
    tenant: str = DEFAULT_TENANT
    """Whose request: its sessions are the tenant's own, and KV that a hot slot or a partial
    block holds is reused only within a tenant (full blocks are shared by content)."""


@dataclass(frozen=True, slots=True)
class TokenEvent:
    text: str
    """Text completed by this token (UTF-8 safe: may be empty while a character is incomplete)."""
    token: int


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    """Prompt tokens whose KV came from the hot tier or the store instead of being computed."""
    restored_tokens: int = 0
    """Of ``cached_tokens``, those restored from a storage tier (the rest were still hot)."""
    prefill_tokens: int = 0
    working_set_tokens: int = 0
    """Tokens of the conversation hot when the reply ended: all of it, unless it is longer than
    a slot's share of the hot tier (then its working set; the rest is in the store)."""


@dataclass(frozen=True, slots=True)
class Finished:
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    created: float
    last_used: float
    n_tokens: int
    messages: list[dict[str, Any]]
    blocks_per_tier: dict[str, int]
    model: str
    parent: str | None = None


@dataclass(frozen=True, slots=True)
class TierStats:
    """One storage tier as /v1/cache/stats and /metrics show it."""

    name: str
    blocks: int
    bytes: int
    """Bytes counted against the budget."""
    budget: int
    compression_ratio: float
    """Bytes as llama.cpp holds them over bytes stored (0 when empty)."""
    hits: int
    misses: int
    promotions: int
    demotions: int
    drops: int
    corrupt: int
    write_errors: int = 0


@dataclass(frozen=True, slots=True)
class TokenStats:
    """Tokens since start, by how the engine got their KV."""

    restored: int = 0
    prefilled: int = 0
    hot_reused: int = 0
    generated: int = 0


@dataclass(frozen=True, slots=True)
class SlotStats:
    total: int
    busy: int
    queued: int


@dataclass(frozen=True, slots=True)
class ThroughputStats:
    """What the restore-or-recompute decision believes, measured on this machine."""

    prefill_tokens_per_s: float
    restore_tokens_per_s: tuple[float, ...]
    """Per storage tier, fastest first."""


@dataclass(frozen=True, slots=True)
class WorkingSetStats:
    """What the working sets of long conversations did since start."""

    selections: int = 0
    """Times queries scored a conversation's stored blocks."""
    loads: int = 0
    """Blocks brought from the store into the hot tier."""
    drops: int = 0
    """Blocks taken out of the hot tier (they stay in the store)."""
    moves: int = 0
    """Blocks moved to other positions (packed)."""
    stored: int = 0
    """Blocks stored as they filled up."""
    prefetches: int = 0
    """Blocks asked to be promoted to warm ahead of their use."""
    prefetch_hits: int = 0
    """Loads that found a prefetched block in warm."""
    prefetch_misses: int = 0
    """Loads that read cool or cold."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    """The background store writer: what the engine thread handed it and how it kept up."""

    queued_jobs: int = 0
    """Finished requests (or blocks) read out of llama.cpp and not yet stored, the running one
    included."""
    queued_bytes: int = 0
    """Bytes of state those jobs hold in host buffers (bounded by ``tiers.store_queue_budget``)."""
    jobs: int = 0
    """Jobs done since start, failed ones included."""
    blocks_written: int = 0
    failures: int = 0
    """Jobs that failed (logged; their requests had been answered already)."""
    waits: int = 0
    """Times the engine thread waited for room in the queue (back-pressure)."""
    wait_s: float = 0.0
    read_s: float = 0.0
    """Engine-thread seconds spent reading states out of llama.cpp: a store's only cost there."""
    write_s: float = 0.0
    """Writer-thread seconds: parsing, encoding, checksums, writes, sequence and session updates."""
    bytes_read: int = 0
    pinned: bool = False
    """Whether the state buffers are registered with the GPU runtime (pinned)."""


@dataclass(frozen=True, slots=True)
class HotStats:
    """The hot tier (T0): llama.cpp's KV cache, shared by the slots."""

    slots: int = 0
    tokens: int = 0
    """Tokens whose KV the slots hold now (a long conversation's working set, not all of it)."""
    blocks: int = 0
    """Blocks those tokens fill, partial ones included."""
    bytes: int = 0
    """Bytes of KV those tokens take in llama.cpp's cache type."""
    budget: int = 0
    """Bytes of KV the slots may hold together (``tiers.gpu_vram_budget``, or its default)."""


@dataclass(frozen=True, slots=True)
class RemoteStats:
    """The remote tier (``tiers.remote_url``): what this server sent, read, and what failed."""

    enabled: bool = False
    available: bool = False
    """False while Redis fails (the circuit breaker is open) or when there is no remote tier."""
    errors: int = 0
    """Redis calls that failed: timeouts, nodes down, cluster down, full memory."""
    conflicts: int = 0
    """Session writes refused: another server held the lease or wrote a newer version."""
    blocks_sent: int = 0
    blocks_fetched: int = 0
    sessions_written: int = 0
    queued: int = 0
    """Blocks and sessions waiting to be sent (they wait while Redis is down)."""
    dropped: int = 0
    """Blocks given up from a full send queue (sent again with their sequence's next save)."""
    evictions: int = 0


@dataclass(frozen=True, slots=True)
class CacheStats:
    tiers: tuple[TierStats, ...]
    """The storage tiers (warm, cool, cold); the hot tier is ``hot``."""
    tokens: TokenStats
    slots: SlotStats
    throughput: ThroughputStats
    working_set: WorkingSetStats = field(default_factory=WorkingSetStats)
    store: StoreStats = field(default_factory=StoreStats)
    degraded: dict[str, str] = field(default_factory=dict)
    """Parts of the store that are damaged or refuse writes, with why (empty: none)."""
    hot: HotStats = field(default_factory=HotStats)
    models: tuple[ModelStats, ...] = ()
    """Per served model (the fields above sum them); empty from a single engine."""
    remote: RemoteStats = field(default_factory=RemoteStats)


@dataclass(frozen=True, slots=True)
class ModelStats:
    """One served model's share of :class:`CacheStats` (zeros for one never loaded; the counts
    of one unloaded since start are those it had then)."""

    name: str
    loaded: bool
    hot: HotStats = field(default_factory=HotStats)
    tokens: TokenStats = field(default_factory=TokenStats)
    slots: SlotStats = field(default_factory=lambda: SlotStats(0, 0, 0))
    throughput: ThroughputStats = field(default_factory=lambda: ThroughputStats(0.0, ()))
    working_set: WorkingSetStats = field(default_factory=WorkingSetStats)
    store: StoreStats = field(default_factory=StoreStats)
