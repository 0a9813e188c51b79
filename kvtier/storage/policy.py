"""Eviction policy: pure functions of plain numbers, apart from the mechanism that moves blocks.

    priority(block) = α·(1/attention_score) + β·age + γ·tier_preference

A *higher* priority means *evicted sooner*. ``attention_score`` is the attention the engine measured
for a block (each working-set selection adds the block's share of the queries' attention, about 1
for an average block; earlier measurements decay with the hits' half-life); a block never measured
uses its decayed hit count instead (see :func:`importance`). Either is multiplied by the number of
sequences sharing the block. ``age`` is in hours since
the last access. ``tier_preference`` is the block's tier index over the number of tiers below hot
(0 warm … 2/3 cold), so that among otherwise equal blocks the one already furthest down goes first.

:func:`rank_victims` is the one ranking: the tier manager's balancer and ``kvtier compact`` both
choose what to demote (or drop) with it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

MIN_SCORE = 0.01
"""Scores are floored here so that a never-hit block has a large but finite priority."""
N_TIERS = 3
"""Tiers below hot (warm, cool, cold): the scale of ``tier_preference``."""

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Weights:
    alpha: float = 0.6
    beta: float = 0.3
    gamma: float = 0.1
    hit_half_life_s: float = 3600.0
    """A hit counts half as much this many seconds later."""


@dataclass(frozen=True, slots=True)
class Candidate(Generic[K]):
    """What the policy knows of one block: plain numbers, and the key it hands back."""

    key: K
    stored_bytes: int
    tier: int
    position: int
    """The block's index in its sequence: among equal priorities later blocks go first, so a
    sequence loses its tail before the prefix that the tail needs."""
    refs: int = 1
    pinned: bool = False
    """In use (a restore reads it, or it is being moved already): never chosen."""
    attention: float = -1.0
    """Measured attention as of ``last_access``; negative until the engine reports one."""
    hits: float = 0.0
    """Hit count decayed as of ``last_access``."""
    last_access: float = 0.0


def decayed_hits(hits: float, last_access: float, now: float, half_life_s: float) -> float:
    """A hit count as of ``last_access``, decayed to ``now``."""
    return hits * 0.5 ** (max(0.0, now - last_access) / half_life_s)


def importance(measured_attention: float, hits: float, last_access: float, now: float,
               half_life_s: float) -> float:
    """Measured attention when the engine reported one (non-negative), else hits; either as of
    ``last_access``, decayed to now."""
    value = measured_attention if measured_attention >= 0.0 else hits
    return decayed_hits(value, last_access, now, half_life_s)


def eviction_priority(attention_score: float, age_s: float, tier: int, weights: Weights) -> float:
    """The block's eviction priority; larger is evicted first."""
    score = max(attention_score, MIN_SCORE)
    return (weights.alpha / score + weights.beta * max(age_s, 0.0) / 3600.0
            + weights.gamma * tier / N_TIERS)


def priority(candidate: Candidate[K], now: float, weights: Weights) -> float:
    """A block's eviction priority now. A block shared by n sequences is worth n of them:
    dropping a common prefix would cut every conversation that starts with it."""
    c = candidate
    score = importance(c.attention, c.hits, c.last_access, now, weights.hit_half_life_s)
    return eviction_priority(score * max(c.refs, 1), now - c.last_access, c.tier, weights)


def rank_victims(candidates: Iterable[Candidate[K]], need_bytes: int, now: float,
                 weights: Weights) -> list[K]:
    """The keys of the blocks to move out, most evictable first, until ``need_bytes`` are freed
    (fewer only if all unpinned candidates together hold less). Ties go later block first, then
    in the order given."""
    ranked = sorted((c for c in candidates if not c.pinned),
                    key=lambda c: (-priority(c, now, weights), -c.position))
    chosen: list[K] = []
    freed = 0
    for c in ranked:
        if freed >= need_bytes:
            break
        chosen.append(c.key)
        freed += c.stored_bytes
    return chosen
