"""Quest-bound block scores on synthetic arrays."""

import numpy as np
import pytest

from kvtier.engine.block_scores import SummaryStack, block_scores, representative_scores


def _reference(q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    layers, rows, heads, dim = q.shape
    group = heads // lo.shape[2]
    total = np.zeros(lo.shape[0])
    for s in range(layers):
        for r in range(rows):
            for h in range(heads):
                bound = np.array([np.sum(np.maximum(q[s, r, h] * hi[b, s, h // group],
                                                    q[s, r, h] * lo[b, s, h // group]))
                                  for b in range(lo.shape[0])]) / np.sqrt(dim)
                e = np.exp(bound - bound.max())
                total += e / e.sum()
    return total / (layers * rows * heads)


def test_matches_the_definition_under_grouped_query_attention() -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 2, 6, 8)).astype(np.float32)
    lo = rng.standard_normal((5, 3, 2, 8)).astype(np.float32)
    hi = lo + rng.random((5, 3, 2, 8)).astype(np.float32)
    scores = block_scores(q, lo, hi)
    np.testing.assert_allclose(scores, _reference(q, lo, hi), rtol=1e-5)
    assert scores.sum() == pytest.approx(1.0)


def test_the_block_holding_a_matching_key_scores_highest() -> None:
    rng = np.random.default_rng(2)
    dim = 16
    keys = rng.standard_normal((6, 32, dim)).astype(np.float32) * 0.1
    needle = rng.standard_normal(dim).astype(np.float32)
    keys[4, 7] = needle * 3
    lo, hi = keys.min(axis=1)[:, None, None], keys.max(axis=1)[:, None, None]
    q = np.broadcast_to(needle, (1, 1, 2, dim)).copy()
    assert int(np.argmax(block_scores(q, lo, hi))) == 4


def test_no_blocks_and_bad_shapes() -> None:
    q = np.zeros((2, 1, 4, 8), np.float32)
    assert block_scores(q, np.zeros((0, 2, 2, 8)), np.zeros((0, 2, 2, 8))).shape == (0,)
    with pytest.raises(ValueError):
        block_scores(q, np.zeros((3, 2, 3, 8)), np.zeros((3, 2, 3, 8)))  # 4 heads, 3 KV heads
    with pytest.raises(ValueError):
        block_scores(q, np.zeros((3, 1, 2, 8)), np.zeros((3, 1, 2, 8)))  # layers differ


def _representative_reference(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    layers, rows, heads, dim = q.shape
    group = heads // keys.shape[3]
    total = np.zeros(keys.shape[0])
    for s in range(layers):
        for r in range(rows):
            for h in range(heads):
                best = np.array([max(float(q[s, r, h] @ k) for k in keys[b, s, :, h // group])
                                 for b in range(keys.shape[0])]) / np.sqrt(dim)
                e = np.exp(best - best.max())
                total += e / e.sum()
    return total / (layers * rows * heads)


def test_representative_scores_match_the_definition_under_grouped_query_attention() -> None:
    rng = np.random.default_rng(3)
    q = rng.standard_normal((3, 2, 6, 8)).astype(np.float32)
    keys = rng.standard_normal((5, 3, 2, 2, 8)).astype(np.float32)    # two per block
    scores = representative_scores(q, keys)
    np.testing.assert_allclose(scores, _representative_reference(q, keys), rtol=1e-5)
    assert scores.sum() == pytest.approx(1.0)


def test_a_block_whose_keys_spread_wide_outscores_by_bound_but_not_by_its_mean_key() -> None:
    # The bound cannot tell a block of keys pointing along the query from one whose keys spread
    # over every direction; the mean key can.
    dim = 8
    q = np.ones((1, 1, 1, dim), np.float32)
    aligned = np.full((16, dim), 0.5, np.float32)
    spread = np.concatenate([np.eye(dim), -np.eye(dim)]).astype(np.float32) * 2
    keys = np.stack([aligned, spread])
    lo, hi = keys.min(axis=1)[:, None, None], keys.max(axis=1)[:, None, None]
    assert np.argmax(block_scores(q, lo, hi)) == 1
    means = keys.mean(axis=1)[:, None, None, None]
    assert np.argmax(representative_scores(q, means)) == 0


def test_a_summary_stack_grown_block_by_block_scores_as_the_stacked_arrays_do() -> None:
    # 40 blocks added out of order (as the store writer reports them), past two growths.
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, 2, 6, 8)).astype(np.float32)
    lo = rng.standard_normal((40, 3, 2, 8)).astype(np.float32)
    hi = lo + rng.random((40, 3, 2, 8)).astype(np.float32)
    reps = rng.standard_normal((40, 3, 1, 2, 8)).astype(np.float32)
    order = rng.permutation(40)
    stack = SummaryStack(3, 2, 8)
    for b in order:
        stack.add(int(b), lo[b], hi[b], reps[b])
    assert stack.blocks == order.tolist() and 7 in stack and len(stack) == 40
    np.testing.assert_allclose(stack.shares(q), block_scores(q, lo[order], hi[order]), rtol=1e-6)
    np.testing.assert_allclose(stack.shares(q, "keys"), representative_scores(q, reps[order]),
                               rtol=1e-6)
    # One block without representatives: every block is scored by the bound.
    stack.add(40, lo[0], hi[0], None)
    both = np.concatenate([order, [0]])
    np.testing.assert_allclose(stack.shares(q, "keys"), block_scores(q, lo[both], hi[both]),
                               rtol=1e-6)
    assert SummaryStack(3, 2, 8).shares(q).shape == (0,)
