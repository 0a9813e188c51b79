"""The hot tier's slots as plain data: whose conversation a slot holds, and which slot a request
gets. Pure rules, testable without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


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


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def choose_slot(slots: Sequence[Slot], prompt: np.ndarray) -> Slot | None:
    """The idle slot that holds the longest prefix of ``prompt``, the least recently used one
    among equals (so with no prefix anywhere, the least recently used idle slot); None when every
    slot is busy."""
    idle = [s for s in slots if not s.busy]
    if not idle:
        return None
    return max(idle, key=lambda s: (common_prefix(s.tokens, prompt), -s.last_used))
