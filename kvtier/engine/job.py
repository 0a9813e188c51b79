"""A request on its way through the engine thread, and the engine's token counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvtier.engine.api import GenerationRequest, TokenStats
from kvtier.engine.handle import GenerationHandle
from kvtier.engine.sampling import Sampler
from kvtier.engine.slots import SessionOwner, Slot
from kvtier.engine.snapshot import RestorePlan, StoredSequence
from kvtier.engine.text import TextStream
from kvtier.engine.windows import WindowedTurn
from kvtier.storage.catalog import SessionEntry


@dataclass(slots=True)
class Job:
    """One request on its way through the engine thread."""

    request: GenerationRequest
    handle: GenerationHandle
    prompt: np.ndarray
    owner: SessionOwner | None
    """The session the KV belongs to; None for a stateless request."""
    session: SessionEntry | None
    """The stored session the request continues (None: stateless, or a new session)."""
    session_text: str
    """The rendered text that the prompt tokens stand for (sessions extend it exactly)."""
    max_new: int
    plan: RestorePlan | None = None
    """The longest prefix of the prompt that the store holds, found when the job is admitted."""
    slot: Slot | None = None
    seq: StoredSequence | None = None
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    sampler: Sampler | None = None
    stream: TextStream | None = None
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None
    cached: int = 0
    restored: int = 0
    prefill_started: float = 0.0
    finish_reason: str | None = None
    turn: WindowedTurn | None = None
    """Set when the job's conversation runs on a working set (longer than a slot's share)."""


@dataclass(slots=True)
class TokenCounts:
    """Tokens since start, by how the engine got their KV (written by the engine thread)."""

    restored: int = 0
    prefilled: int = 0
    hot_reused: int = 0
    generated: int = 0

    def stats(self) -> TokenStats:
        return TokenStats(self.restored, self.prefilled, self.hot_reused, self.generated)
