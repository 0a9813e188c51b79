"""The working-set policy with plain numbers: which blocks are held, where, and how to get there."""

import pytest

from kvtier.engine.working_set import Move, Shape, next_position, place, plan, select

SHAPE = Shape(sink=1, recent=2, budget=4)


def test_a_short_sequence_is_held_whole() -> None:
    assert select(4, {}, SHAPE) == [0, 1, 2, 3]
    assert select(1, {}, SHAPE) == [0]


def test_sinks_recent_and_the_best_scored_block() -> None:
    scores = {1: 0.1, 2: 0.05, 3: 0.5, 4: 0.2, 9: 0.9}   # 9 is recent: no room is spent on it
    assert select(10, scores, SHAPE) == [0, 3, 8, 9]


def test_unscored_blocks_rank_last_and_later_blocks_win_ties() -> None:
    assert select(10, {}, SHAPE) == [0, 7, 8, 9]
    assert select(10, {2: 0.3, 5: 0.3}, SHAPE) == [0, 5, 8, 9]
    assert select(10, {2: 0.3, 5: 0.3}, Shape(1, 2, 5)) == [0, 2, 5, 8, 9]


def test_no_sink() -> None:
    assert select(6, {0: 1.0}, Shape(sink=0, recent=1, budget=2)) == [0, 5]


@pytest.mark.parametrize("sink, recent, budget", [(1, 0, 4), (2, 2, 3), (-1, 1, 2)])
def test_impossible_shapes_are_refused(sink: int, recent: int, budget: int) -> None:
    with pytest.raises(ValueError):
        Shape(sink, recent, budget)


def test_blocks_keep_their_positions_inside_the_trained_context() -> None:
    assert place([0, 3, 8, 9], 256, 2400, 8192) == {0: 0, 3: 768, 8: 2048, 9: 2304}


def test_blocks_are_packed_beyond_the_trained_context() -> None:
    assert place([0, 30, 62, 63], 256, 16300, 8192) == {0: 0, 30: 256, 62: 512, 63: 768}


def test_next_position_follows_the_last_held_token() -> None:
    assert next_position({0: 0, 30: 256, 63: 512}, {0: 256, 30: 256, 63: 100}) == 612
    assert next_position({}, {}) == 0


def test_plan_drops_moves_and_loads() -> None:
    current = {0: 0, 5: 256, 8: 512, 9: 768}
    wanted = {0: 0, 3: 256, 8: 512, 9: 768, 10: 1024}
    p = plan(current, wanted)
    assert p.drop == [Move(5, 256, -1)]
    assert p.move == []
    assert p.load == [Move(3, -1, 256), Move(10, -1, 1024)]
    shifted = plan({0: 0, 9: 2304}, {0: 0, 9: 256})
    assert shifted.move == [Move(9, 2304, 256)] and not shifted.drop and not shifted.load
    assert plan(current, current).empty


def test_a_held_block_keeps_its_place_against_a_candidate_within_the_keep_margin():
    scores = {1: 1.0, 2: 1.2, 3: 0.5}
    assert select(8, scores, Shape(1, 2, 4)) == [0, 2, 6, 7]
    assert select(8, scores, Shape(1, 2, 4), held={1: 256}) == [0, 2, 6, 7]    # no margin
    assert select(8, scores, Shape(1, 2, 4, keep=0.25), held={1: 256}) == [0, 1, 6, 7]
    assert select(8, scores, Shape(1, 2, 4, keep=0.1), held={1: 256}) == [0, 2, 6, 7]
    assert select(8, scores, Shape(1, 2, 4, keep=0.25), held={3: 256}) == [0, 2, 6, 7]


def test_a_negative_keep_margin_is_refused():
    with pytest.raises(ValueError, match="keep"):
        Shape(1, 2, 4, keep=-0.1)
