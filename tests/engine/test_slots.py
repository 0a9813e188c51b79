"""Slot ownership and slot choice as plain data, without a model."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.engine.slots import (SequenceOwner, SessionOwner, Slot, choose_slot, common_prefix,
                                 may_extend)


def tokens(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int32)


@pytest.mark.parametrize("request_owner, resident, extends", [
    (None, SequenceOwner(7), True),            # a stateless follow-up of an anonymous chat
    (None, SessionOwner("s"), False),          # never a session's stored sequence
    (None, None, False),                       # nothing resident
    (SessionOwner("s"), SequenceOwner(7), False),   # sessions go through their own sequence
    (SessionOwner("s"), SessionOwner("s"), False),
    (SessionOwner("s"), SessionOwner("t"), False),
])
def test_only_a_stateless_request_extends_a_resident_anonymous_conversation(
        request_owner, resident, extends):
    assert may_extend(request_owner, resident) is extends


def test_owners_are_values():
    assert SessionOwner("s") == SessionOwner("s") != SessionOwner("t")
    assert SequenceOwner(1) != SessionOwner("1")
    assert len({SequenceOwner(1), SequenceOwner(1)}) == 1


def test_common_prefix():
    assert common_prefix(tokens(1, 2, 3), tokens(1, 2, 4, 5)) == 2
    assert common_prefix(tokens(1, 2), tokens(1, 2, 3)) == 2
    assert common_prefix(tokens(1, 2, 3), tokens(1, 2, 3)) == 3
    assert common_prefix(tokens(9), tokens(1)) == 0
    assert common_prefix(tokens(), tokens(1)) == 0


def test_the_slot_holding_the_longest_prefix_wins():
    slots = [Slot(0, tokens(1, 2), last_used=3.0), Slot(1, tokens(1, 2, 3, 4), last_used=1.0),
             Slot(2, tokens(5), last_used=0.0)]
    assert choose_slot(slots, tokens(1, 2, 3, 9)).index == 1


def test_among_equal_prefixes_the_least_recently_used_wins():
    slots = [Slot(0, tokens(1, 2), last_used=3.0), Slot(1, tokens(1, 2), last_used=2.0)]
    assert choose_slot(slots, tokens(1, 2, 3)).index == 1


def test_without_a_prefix_the_least_recently_used_idle_slot_wins():
    slots = [Slot(0, tokens(7), last_used=1.0), Slot(1, tokens(8), last_used=0.5, busy=True),
             Slot(2, tokens(9), last_used=2.0), Slot(3, last_used=1.5)]
    assert choose_slot(slots, tokens(1, 2)).index == 0


def test_busy_slots_are_never_chosen():
    slots = [Slot(0, tokens(1, 2, 3), busy=True), Slot(1, tokens(4))]
    assert choose_slot(slots, tokens(1, 2, 3)).index == 1
    assert choose_slot([Slot(0, busy=True)], tokens(1)) is None
