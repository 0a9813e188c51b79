"""The hot tier's slots as plain data: whose conversation a slot holds, and which slot a request
gets. Pure rules, testable without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kvtier.engine.api import DEFAULT_TENANT


@dataclass(frozen=True, slots=True)
class SessionOwner:
    """A named session: its KV is stored as the session's own sequence."""

    session_id: str


@dataclass(frozen=True, slots=True)
class SequenceOwner:
    """An anonymous conversation of stateless requests, stored as sequence ``seq_id``."""

    seq_id: int


SlotOwner = SessionOwner | SequenceOwner


def may_extend(request: SessionOwner | None, resident: SlotOwner | None) -> bool:
    """Whether a request (``None``: a stateless one) may extend the stored sequence of the
    conversation resident in its slot.

    A stateless request may extend the anonymous conversation resident in its slot, never a
    session's: that would rewrite the session's stored sequence under it. A session request
    continues its own stored sequence, found through the session rather than the slot.
    """
    return request is None and isinstance(resident, SequenceOwner)


@dataclass(slots=True)
class Slot:
    """One sequence of the llama.cpp context and what it holds."""

    index: int
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    """Tokens whose KV is in the context, at positions 0..len-1."""
    busy: bool = False
    last_used: float = 0.0
    owner: SlotOwner | None = None
    """Whose conversation is resident here (None: nothing, or KV that nobody owns yet)."""
    tenant: str = DEFAULT_TENANT
    """The tenant whose KV the slot holds: another tenant's request reuses none of it."""


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def reuse_gain(slot: Slot, prompt: np.ndarray, stored: int = 0,
               tenant: str = DEFAULT_TENANT) -> int:
    """Tokens a request of ``tenant`` for ``prompt`` keeps by taking ``slot``, less the tokens it
    throws away (all of them, if the slot holds another tenant's KV).

    The slot keeps its common prefix with the prompt, unless the store holds a longer one
    (``stored``), which is restored over the slot's whole sequence; everything else it holds is
    thrown away. Thrown-away KV is in the store, but its conversation pays a restore to come back.
    """
    prefix = common_prefix(slot.tokens, prompt) if slot.tenant == tenant else 0
    kept = prefix if prefix >= stored else 0
    return kept - (len(slot.tokens) - kept)


def choose_slot(slots: Sequence[Slot], prompt: np.ndarray, stored: int = 0,
                tenant: str = DEFAULT_TENANT) -> Slot | None:
    """The idle slot for a request whose ``prompt`` has a prefix of ``stored`` tokens in the
    store; None when every slot is busy.

    Like llama-server, a request continues the idle slot that shares the most of its prompt at
    token granularity, but only where that keeps at least as much as it throws away
    (:func:`reuse_gain` >= 0; an empty slot keeps and throws away nothing): a conversation that
    merely shares a system prompt with a slot's conversation must not evict it while another
    slot is free, or two interleaved clients would push each other out of one slot and restore
    every turn. Among equals, and when every choice throws more away than it keeps, the least
    recently used slot.
    """
    idle = [s for s in slots if not s.busy]
    if not idle:
        return None
    gains = {s.index: reuse_gain(s, prompt, stored, tenant) for s in idle}
    keeping = [s for s in idle if gains[s.index] >= 0]
    if keeping:
        return max(keeping, key=lambda s: (gains[s.index], -s.last_used))
    return min(idle, key=lambda s: s.last_used)
