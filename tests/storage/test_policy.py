"""The eviction ranking with plain numbers: which block goes first, and why."""

import pytest

from kvtier.storage.policy import (MIN_SCORE, Candidate, Weights, decayed_hits, importance,
                                   priority, rank_victims)

NOW = 100_000.0
W = Weights(alpha=0.6, beta=0.3, gamma=0.1, hit_half_life_s=3600.0)


def block(key: str, *, tier: int = 0, position: int = 0, refs: int = 1, pinned: bool = False,
          attention: float = -1.0, hits: float = 0.0, age_s: float = 0.0) -> Candidate[str]:
    return Candidate(key, 10, tier, position, refs, pinned, attention, hits, NOW - age_s)


TABLE = [
    block("never-read", position=0),                      # 60 = α / MIN_SCORE
    block("read-4x", hits=4.0),                           # 0.6 / 4 = 0.15
    block("shared-by-3", refs=3, hits=1.0),               # 0.6 / (1 × 3) = 0.2
    block("attended", attention=50.0, hits=0.0),          # 0.6 / 50 = 0.012
    block("two-hours-old", age_s=7200.0),                 # 60 + 0.3 × 2 = 60.6
    block("pinned", pinned=True, age_s=99_999.0),         # never chosen
    block("in-cold", tier=2),                             # 60 + 0.1 × 2/3
    block("tail-of-a-sequence", position=5),              # 60, later than never-read
    block("middle-of-a-sequence", position=1),            # 60
    block("read-2x-an-hour-ago", hits=2.0, age_s=3600.0),  # 0.6 / 1 + 0.3 = 0.9
]


def test_the_victim_order_of_a_small_table():
    assert rank_victims(TABLE, 10**9, NOW, W) == [
        "two-hours-old", "in-cold", "tail-of-a-sequence", "middle-of-a-sequence", "never-read",
        "read-2x-an-hour-ago", "shared-by-3", "read-4x", "attended"]


def test_victims_stop_once_enough_bytes_are_freed():
    assert rank_victims(TABLE, 25, NOW, W) == ["two-hours-old", "in-cold", "tail-of-a-sequence"]
    assert rank_victims(TABLE, 30, NOW, W) == ["two-hours-old", "in-cold", "tail-of-a-sequence"]
    assert rank_victims(TABLE, 0, NOW, W) == []
    assert rank_victims([block("pinned", pinned=True)], 10, NOW, W) == []


def test_exact_priorities():
    by_key = {c.key: priority(c, NOW, W) for c in TABLE}
    assert by_key["never-read"] == pytest.approx(0.6 / MIN_SCORE)
    assert by_key["read-4x"] == pytest.approx(0.15)
    assert by_key["shared-by-3"] == pytest.approx(0.2)
    assert by_key["attended"] == pytest.approx(0.012)
    assert by_key["two-hours-old"] == pytest.approx(60.6)
    assert by_key["in-cold"] == pytest.approx(60 + 0.1 * 2 / 3)
    assert by_key["read-2x-an-hour-ago"] == pytest.approx(0.9)


def test_one_decay_formula():
    assert decayed_hits(4.0, 0.0, 3600.0, 3600.0) == pytest.approx(2.0)
    assert decayed_hits(4.0, 100.0, 50.0, 3600.0) == 4.0    # never grows backwards in time
    assert importance(-1.0, 4.0, 0.0, 7200.0, 3600.0) == pytest.approx(1.0)
    assert importance(0.0, 4.0, 0.0, 7200.0, 3600.0) == 0.0    # measured attention wins
    assert importance(8.0, 4.0, 0.0, 7200.0, 3600.0) == pytest.approx(2.0)  # and decays alike
