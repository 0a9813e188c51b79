"""Slot ownership and slot choice as plain data, without a model."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.engine.slots import (SequenceOwner, SessionOwner, Slot, choose_slot, common_prefix,
                                 may_extend, reuse_gain)


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


def test_the_slot_that_keeps_the_most_of_the_prompt_wins():
    slots = [Slot(0, tokens(1, 2), last_used=3.0), Slot(1, tokens(1, 2, 3), last_used=1.0),
             Slot(2, tokens(5), last_used=0.0)]
    assert choose_slot(slots, tokens(1, 2, 3, 9)).index == 1


def test_a_continuation_is_found_at_token_granularity():
    # A full-history follow-up: the slot holds the previous turn, the prompt extends it.
    turn = np.arange(300, dtype=np.int32)
    slots = [Slot(0, turn, last_used=2.0), Slot(1, last_used=1.0)]
    assert choose_slot(slots, np.concatenate([turn, tokens(7, 8)])).index == 0


def test_among_equal_prefixes_the_least_recently_used_wins():
    slots = [Slot(0, tokens(1, 2), last_used=3.0), Slot(1, tokens(1, 2), last_used=2.0)]
    assert choose_slot(slots, tokens(1, 2, 3)).index == 1


def test_a_shared_start_does_not_evict_another_conversation_while_a_slot_is_free():
    # Regression (issue 9, item 7): two interleaved clients whose prompts share the chat
    # template's first tokens pushed each other out of one slot.
    other = np.concatenate([tokens(1, 2, 3), np.arange(100, 400, dtype=np.int32)])
    slots = [Slot(0, other, last_used=2.0), Slot(1, last_used=1.0)]
    assert reuse_gain(slots[0], tokens(1, 2, 3, 4, 5)) == 3 - 300 < 0
    assert choose_slot(slots, tokens(1, 2, 3, 4, 5)).index == 1


def test_a_slot_that_keeps_as_much_as_it_throws_away_is_reused():
    slots = [Slot(0, tokens(1, 2, 3, 4), last_used=2.0), Slot(1, last_used=1.0)]
    assert reuse_gain(slots[0], tokens(1, 2, 9)) == 0
    assert choose_slot(slots, tokens(1, 2, 9)).index == 1  # an empty slot is as good: LRU
    slots[1].last_used = 3.0
    assert choose_slot(slots, tokens(1, 2, 9)).index == 0


def test_a_hot_prefix_shorter_than_the_stored_one_counts_for_nothing():
    # A restore replaces the slot's whole sequence: its hot prefix would be thrown away too.
    slots = [Slot(0, tokens(1, 2, 3), last_used=2.0), Slot(1, last_used=1.0)]
    prompt = tokens(1, 2, 3, 4, 5, 6)
    assert choose_slot(slots, prompt, stored=0).index == 0
    assert reuse_gain(slots[0], prompt, stored=5) == -3
    assert choose_slot(slots, prompt, stored=5).index == 1


def test_without_a_prefix_an_empty_slot_wins_then_the_least_recently_used():
    slots = [Slot(0, tokens(7), last_used=1.0), Slot(1, tokens(8), last_used=0.5, busy=True),
             Slot(2, tokens(9), last_used=2.0), Slot(3, last_used=1.5)]
    assert choose_slot(slots, tokens(1, 2)).index == 3
    slots[3].busy = True
    assert choose_slot(slots, tokens(1, 2)).index == 0


def test_busy_slots_are_never_chosen():
    slots = [Slot(0, tokens(1, 2, 3), busy=True), Slot(1, tokens(4))]
    assert choose_slot(slots, tokens(1, 2, 3)).index == 1
    assert choose_slot([Slot(0, busy=True)], tokens(1)) is None


def test_another_tenants_slot_keeps_nothing():
    """Issue 12: a prefix another tenant's slot holds is never reused (it would be a
    token-granular oracle of that tenant's prompt); the request takes the empty slot."""
    turn = np.arange(300, dtype=np.int32)
    prompt = np.concatenate([turn, tokens(7, 8)])
    slots = [Slot(0, turn, last_used=2.0, tenant="alice"), Slot(1, last_used=1.0)]
    assert reuse_gain(slots[0], prompt, tenant="bob") == -300
    assert choose_slot(slots, prompt, tenant="bob").index == 1
    assert choose_slot(slots, prompt, tenant="alice").index == 0
