"""Response bodies of the HTTP API as pydantic models, built from the engine's boundary types.

The handlers answer with these models (``model_dump_json``), and /openapi.json documents them from
the same models (in serialization mode), so an answer and its documentation cannot drift. Every
field is always present unless it says otherwise: ``null`` is sent as ``null``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from kvtier.engine import api
from kvtier.http.schemas import SessionId


def _absent(value: Any) -> bool:
    return value is None


class _Response(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True,
                              json_schema_serialization_defaults_required=True)


# -- completions ---------------------------------------------------------------------------------

class PromptTokensDetails(_Response):
    cached_tokens: int
    """Prompt tokens whose KV was reused or restored from the cache, not computed."""
    restored_tokens: int = 0
    """kvtier: of ``cached_tokens``, those restored from a storage tier."""
    prefill_tokens: int = 0
    """kvtier: prompt tokens computed for this request (recomputed, where the cache had
    nothing)."""
    working_set_tokens: int = 0
    """kvtier: tokens of the conversation hot when the reply ended (the working set of a
    conversation longer than a slot's share; else all of it)."""


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, usage: api.Usage) -> Usage:
        return cls(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   total_tokens=usage.prompt_tokens + usage.completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(
                       cached_tokens=usage.cached_tokens, restored_tokens=usage.restored_tokens,
                       prefill_tokens=usage.prefill_tokens,
                       working_set_tokens=usage.working_set_tokens))


FinishReason = Literal["stop", "length"]
_Session = Annotated[SessionId | None, Field(exclude_if=_absent)]
"""Present only when the request continued a session (also the X-Session-Id header)."""


def _usage_when_asked(schema: dict[str, Any]) -> None:
    """A chunk's ``usage`` is sent only with stream_options.include_usage."""
    schema["required"].remove("usage")


class _Answer(_Response):
    id: str
    object: str
    created: int
    """Unix time."""
    model: str


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: dict[str, Any] | None = None


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: Annotated[list[ChatChoice], Field(min_length=1, max_length=1)]
    usage: Usage
    session_id: _Session = None


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: dict[str, Any] | None = None


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: Annotated[list[CompletionChoice], Field(min_length=1, max_length=1)]
    usage: Usage
    session_id: _Session = None


class ChatDelta(_Response):
    role: Annotated[Literal["assistant"] | None, Field(exclude_if=_absent)] = None
    """Only in the first chunk."""
    content: Annotated[str | None, Field(exclude_if=_absent)] = None
    """Absent in the last chunk."""


class ChatChunkChoice(_Response):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    """Set in the last chunk."""
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(_Answer):
    model_config = ConfigDict(json_schema_extra=_usage_when_asked)
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: Annotated[list[ChatChunkChoice], Field(max_length=1)]
    """Empty in the usage chunk."""
    usage: Usage | None = None
    """Only with stream_options.include_usage: null, then the usage in a last chunk."""
    session_id: _Session = None


class CompletionChunkChoice(_Response):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    """Set in the last chunk."""
    logprobs: dict[str, Any] | None = None


class CompletionChunk(_Answer):
    model_config = ConfigDict(json_schema_extra=_usage_when_asked)
    object: Literal["text_completion"] = "text_completion"
    choices: Annotated[list[CompletionChunkChoice], Field(max_length=1)]
    """Empty in the usage chunk."""
    usage: Usage | None = None
    """Only with stream_options.include_usage: null, then the usage in a last chunk."""
    session_id: _Session = None


@dataclass(slots=True)
class Reply:
    """One generation's answer: a whole completion, or the server-sent events of a stream."""

    chat: bool
    id: str
    model: str
    session_id: str | None
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def full(self, finished: api.Finished) -> ChatCompletion | Completion:
        """The whole answer of a generation that finished (not one that was cancelled)."""
        head = self._head()
        usage = Usage.of(finished.usage)
        if self.chat:
            return ChatCompletion(**head, usage=usage, choices=[ChatChoice(
                message=AssistantMessage(content=finished.text),
                finish_reason=finished.finish_reason)])
        return Completion(**head, usage=usage, choices=[CompletionChoice(
            text=finished.text, finish_reason=finished.finish_reason)])

    def event(self, text: str | None, finish_reason: FinishReason | None = None,
              role: bool = False) -> bytes:
        """A chunk of text (the chat stream's first chunk carries the role; the last one, with
        ``finish_reason``, no text)."""
        if self.chat:
            delta = ChatDelta(role="assistant" if role else None, content=text)
            return self._chunk([ChatChunkChoice(delta=delta, finish_reason=finish_reason)])
        return self._chunk([CompletionChunkChoice(text=text or "", finish_reason=finish_reason)])

    def usage_event(self, usage: api.Usage) -> bytes:
        """The last chunk of a stream that asked for usage: no choices, the usage."""
        return self._chunk([], Usage.of(usage))

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model,
                "session_id": self.session_id}

    def _chunk(self, choices: list[Any], usage: Usage | None = None) -> bytes:
        cls = ChatCompletionChunk if self.chat else CompletionChunk
        chunk = cls(**self._head(), choices=choices, usage=usage)
        return sse(chunk, exclude=None if self.include_usage else {"usage"})


def sse(body: BaseModel, exclude: set[str] | None = None) -> bytes:
    """One server-sent event carrying ``body``."""
    return b"data: " + body.model_dump_json(exclude=exclude).encode() + b"\n\n"


# -- models, sessions, stats ---------------------------------------------------------------------

class Model(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvtier"
    loaded: bool = True
    """kvtier: whether the model is loaded now (else it is loaded by its next request)."""


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[Model]


class StoredMessage(_Response):
    role: str
    content: str


class SessionSummary(_Response):
    id: SessionId
    object: Literal["session"] = "session"
    created: float
    """Unix time."""
    last_used: float
    """Unix time."""
    model: str
    n_tokens: int
    n_messages: int
    blocks_per_tier: dict[str, int]
    """Stored KV blocks per tier name (warm, cool, cold)."""
    parent: SessionId | None = None
    """The session this one was forked from."""

    @classmethod
    def of(cls, info: api.SessionInfo) -> SessionSummary:
        return cls(**_session_fields(info))


class Session(SessionSummary):
    messages: list[StoredMessage]

    @classmethod
    def of(cls, info: api.SessionInfo) -> Session:
        return cls(**_session_fields(info), messages=info.messages)


def _session_fields(info: api.SessionInfo) -> dict[str, Any]:
    return {"id": info.session_id, "created": info.created, "last_used": info.last_used,
            "model": info.model, "n_tokens": info.n_tokens, "n_messages": len(info.messages),
            "blocks_per_tier": dict(info.blocks_per_tier), "parent": info.parent}


class SessionList(_Response):
    object: Literal["list"] = "list"
    data: list[SessionSummary]
    first_id: SessionId | None
    last_id: SessionId | None
    has_more: bool

    @classmethod
    def page(cls, infos: list[api.SessionInfo], limit: int) -> SessionList:
        """The first ``limit`` of ``infos`` (which holds one more when there are more)."""
        page = [SessionSummary.of(info) for info in infos[:limit]]
        return cls(data=page, first_id=page[0].id if page else None,
                   last_id=page[-1].id if page else None, has_more=len(infos) > limit)


class SessionDeleted(_Response):
    id: SessionId
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class TierStats(_Response):
    name: str
    """``hot`` (tier 0: llama.cpp's cache; it counts no hits, moves or drops), ``warm``,
    ``cool``, ``cold``."""
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
    """Blocks found unreadable (a failed checksum, a damaged file) and quarantined."""
    write_errors: int = 0
    """Writes the tier refused (a full disk, an I/O error)."""

    @classmethod
    def hot(cls, hot: api.HotStats) -> TierStats:
        """The hot tier as a row of the tiers list, first."""
        return cls(name="hot", blocks=hot.blocks, bytes=hot.bytes, budget=hot.budget,
                   compression_ratio=1.0 if hot.bytes else 0.0, hits=0, misses=0,
                   promotions=0, demotions=0, drops=0, corrupt=0)


class HotTier(_Response):
    """The hot tier (T0): llama.cpp's KV cache, shared by the slots."""

    slots: int
    tokens: int
    """Tokens whose KV the slots hold now (a long conversation's working set, not all of it)."""
    blocks: int
    """Blocks those tokens fill, partial ones included."""
    bytes: int
    """Bytes of KV those tokens take in llama.cpp's cache type."""
    budget: int
    """Bytes of KV the slots may hold together."""


class TokenCounts(_Response):
    """Tokens since start, by how the engine got their KV."""

    restored: int
    prefilled: int
    hot_reused: int
    generated: int


class SlotCounts(_Response):
    total: int
    busy: int
    queued: int


class Throughput(_Response):
    """Measured speeds that decide between restoring and recomputing a prompt's KV."""

    prefill_tokens_per_s: float
    restore_tokens_per_s: list[float]
    """Per storage tier, fastest first."""


class WorkingSetCounts(_Response):
    """What the working sets of conversations longer than a slot's share did since start."""

    selections: int
    loads: int
    drops: int
    moves: int
    stored: int
    prefetches: int
    prefetch_hits: int
    prefetch_misses: int


class StoreCounts(_Response):
    """The background store writer (finished requests' KV on its way into the tiers)."""

    queued_jobs: int
    queued_bytes: int
    jobs: int
    blocks_written: int
    failures: int
    """Stores that failed (logged; their replies had been sent)."""
    waits: int
    """Times the engine waited for the writer (back-pressure)."""
    wait_s: float
    read_s: float
    """Engine-thread seconds spent reading states out of llama.cpp."""
    write_s: float
    bytes_read: int
    pinned: bool
    """Whether the state buffers are pinned (registered with the GPU runtime)."""


class EngineCounts(_Response):
    """What a model's engine counts: its hot tier, tokens, slots, speed, working sets, store."""

    hot: HotTier
    tokens: TokenCounts
    slots: SlotCounts
    throughput: Throughput
    working_set: WorkingSetCounts
    store: StoreCounts


class ModelCounts(EngineCounts):
    """One served model's own counts (those of a model unloaded since start: as they were)."""

    name: str
    loaded: bool


class RemoteCounts(_Response):
    """The remote tier shared by several servers (docs/remote.md); ``enabled`` false without
    ``tiers.remote_url``."""

    enabled: bool
    available: bool
    """False while Redis fails (its circuit breaker is open)."""
    errors: int
    """Redis calls that failed (timeouts, nodes down, cluster down, full memory)."""
    conflicts: int
    """Session writes refused: another server held the lease or wrote a newer version."""
    blocks_sent: int
    blocks_fetched: int
    sessions_written: int
    queued: int
    dropped: int
    evictions: int


class CacheStats(EngineCounts):
    object: Literal["cache.stats"] = "cache.stats"
    tiers: list[TierStats]
    """Tier 0 is ``hot``, then the storage tiers, fastest first."""
    models: list[ModelCounts]
    """Per served model; the fields above sum them (``throughput``: the model used last)."""
    degraded: dict[str, str] = {}
    """Parts of the store that are damaged or refuse writes, with why (empty: none)."""
    remote: RemoteCounts
    remote_errors: int = 0
    """``remote.errors``: failed calls to the remote tier (0 without one)."""

    @classmethod
    def of(cls, stats: api.CacheStats) -> CacheStats:
        body = cls.model_validate(stats, from_attributes=True)
        body.tiers.insert(0, TierStats.hot(stats.hot))
        body.remote_errors = stats.remote.errors
        return body


class TierSummary(_Response):
    name: str
    blocks: int
    bytes: int


class Health(_Response):
    status: Literal["ok", "degraded", "shutting_down"]
    """``degraded``: serving, but part of the store was damaged (moved aside when it opened)
    or refuses writes; ``degraded`` says which and why."""
    model: str
    slots: SlotCounts
    hot: HotTier
    cache: list[TierSummary]
    """Tier 0 is ``hot``, then the storage tiers."""
    degraded: dict[str, str] = {}

    @classmethod
    def of(cls, stats: api.CacheStats, model: str, closing: bool) -> Health:
        status = "shutting_down" if closing else "degraded" if stats.degraded else "ok"
        hot = TierSummary(name="hot", blocks=stats.hot.blocks, bytes=stats.hot.bytes)
        return cls(status=status, model=model,
                   slots=SlotCounts.model_validate(stats.slots, from_attributes=True),
                   hot=HotTier.model_validate(stats.hot, from_attributes=True),
                   cache=[hot] + [TierSummary(name=t.name, blocks=t.blocks, bytes=t.bytes)
                                  for t in stats.tiers], degraded=dict(stats.degraded))


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(_Response):
    error: ErrorDetail


class OpenApiDocument(RootModel[dict[str, Any]]):
    """An OpenAPI 3.1 document."""
