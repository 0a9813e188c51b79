"""Eviction policy: pure functions of plain numbers, apart from the mechanism that moves blocks.

    priority(block) = α·(1/attention_score) + β·age + γ·tier_preference

A *higher* priority means *evicted sooner*. ``attention_score`` is the importance the engine reports
for a block; until measured attention exists it is a decayed hit count (see
:func:`importance`). ``age`` is in hours since the last access. ``tier_preference`` is the block's
tier index over the number of tiers below hot (0 warm … 2/3 cold), so that among otherwise equal
blocks the one already furthest down goes first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MIN_SCORE = 0.01
"""Scores are floored here so that a never-hit block has a large but finite priority."""


@dataclass(frozen=True, slots=True)
class Weights:
    alpha: float = 0.6
    beta: float = 0.3
    gamma: float = 0.1


def eviction_priority(attention_score: float, age_s: float, tier: int, weights: Weights,
                      n_tiers: int = 3) -> float:
    """The block's eviction priority; larger is evicted first."""
    score = max(attention_score, MIN_SCORE)
    return (weights.alpha / score + weights.beta * max(age_s, 0.0) / 3600.0
            + weights.gamma * tier / n_tiers)


def importance(measured_attention: float, decayed_hits: float, last_access: float, now: float,
               half_life_s: float) -> float:
    """Measured attention when the engine reported one (non-negative), else hits decayed to now."""
    if measured_attention >= 0.0:
        return measured_attention
    elapsed = max(0.0, now - last_access)
    return decayed_hits * 0.5 ** (elapsed / half_life_s)


def choose_victims(candidates: Iterable[tuple[object, float, int]], need_bytes: int) -> list[object]:
    """Blocks to move out, most evictable first, until ``need_bytes`` are freed.

    ``candidates`` are ``(block, priority, bytes)``; returns fewer bytes only if all candidates
    together free less than ``need_bytes``.
    """
    chosen: list[object] = []
    freed = 0
    for block, _, size in sorted(candidates, key=lambda c: c[1], reverse=True):
        if freed >= need_bytes:
            break
        chosen.append(block)
        freed += size
    return chosen
