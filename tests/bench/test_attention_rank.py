"""The importance behind bench_compression's mixed-precision rows (bench/attention_rank.py) and
its row-level mixed quantizer, on synthetic arrays."""

from __future__ import annotations

import numpy as np
import pytest

from bench import attention_rank as ar
from bench import bench_compression as bc


def _qk(n_q: int = 7, n_k: int = 7, heads: int = 6, kv_heads: int = 2, d: int = 8, seed: int = 0
        ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_q, heads, d)).astype(np.float32),
            rng.normal(size=(n_k, kv_heads * d)).astype(np.float32))


def test_attention_weights_match_a_plain_loop() -> None:
    q, k = _qk(n_q=3, n_k=7)
    w = ar.attention_weights(q, k, first=4)  # queries at positions 4, 5, 6
    d, group = 8, 3
    for i in range(3):
        for h in range(6):
            kv = k[:4 + i + 1, (h // group) * d:(h // group + 1) * d]
            s = kv @ q[i, h] / np.sqrt(d)
            expected = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(w[i, h, :4 + i + 1], expected, rtol=1e-5)
            assert not w[i, h, 4 + i + 1:].any()      # causal: later keys get nothing


def test_received_attention_sums_per_layer_and_ignores_chunking() -> None:
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(2, 10, 6, 8)).astype(np.float32)
    keys = rng.normal(size=(2, 10, 16)).astype(np.float32)
    got = ar.attention_received(queries, keys, chunk=3)
    np.testing.assert_allclose(got, ar.attention_received(queries, keys, chunk=64), rtol=1e-6)
    assert got.shape == (2, 2, 10)
    np.testing.assert_allclose(got.sum((1, 2)), [10 * 6, 10 * 6], rtol=1e-6)
    got = got.sum(1)
    # The last row is seen only by the last query: what it got is that query's weight on it.
    last = ar.attention_weights(queries[0, 9:], keys[0], 9)[0, :, 9].sum()
    assert got[0, 9] == pytest.approx(last, rel=1e-6)
    np.testing.assert_allclose(ar.mean_received(got, 6)[:, 9], got[:, 9] / 6)
    np.testing.assert_allclose(ar.mean_received(got, 6)[:, 0], got[:, 0] / 60)


def test_continuation_attention_sees_every_window_row() -> None:
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(1, 4, 6, 8)).astype(np.float32)
    keys = rng.normal(size=(1, 10, 16)).astype(np.float32)
    got = ar.attention_received_by(queries, keys, first=10)
    assert (got > 0).all()
    assert got.shape == (1, 2, 10)
    assert got.sum() == pytest.approx(4 * 6)


def test_top_rows_by_row_and_by_unit() -> None:
    scores = np.array([0.0, 5, 1, 9, 2, 2, 7, 3])
    assert ar.top_rows(scores, 0.25).nonzero()[0].tolist() == [3, 6]
    assert ar.top_rows(scores, 0.4).nonzero()[0].tolist() == [1, 3, 6]  # round(3.2)
    assert ar.top_rows(np.zeros(8), 0.25).nonzero()[0].tolist() == [0, 1]  # ties: earlier
    # Units of 4 rows; the record starts 2 rows into its first unit (rows 0-1 are unit 0).
    by_unit = ar.top_rows(scores, 0.34, unit=4, offset=2)
    assert by_unit.nonzero()[0].tolist() == [2, 3, 4, 5]                  # 1 + 9 + 2 + 2
    rng = np.random.default_rng(0)
    assert ar.random_rows(100, 20, rng).sum() == 20


def test_mixed_qdq_keeps_the_masked_rows_precise() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(252, 192)).astype(np.float32)
    mask = np.zeros(252, bool)
    mask[rng.choice(252, 50, replace=False)] = True
    hi, lo = bc.Quant(6, "channel", 256), bc.Quant(2, "channel", 128)
    positions = np.arange(4, 256)
    back, parts, nparams = bc.mixed_qdq(x, mask, hi, lo, positions)
    err = np.abs(back - x)
    span_hi = x[mask].max(0) - x[mask].min(0)
    span_lo = x[~mask].max(0) - x[~mask].min(0)
    assert (err[mask] <= span_hi / 63 / 2 * 1.01 + 1e-3).all()
    assert (err[~mask] <= span_lo / 3 / 2 * 1.01 + 1e-3).all()
    assert err[mask].mean() < err[~mask].mean() / 10
    # Each set is its own groups: one per channel over the 50 rows, two over the other 202.
    assert [(c.shape, b) for c, b in parts] == [((50, 192), 6), ((202, 192), 2)]
    assert nparams == 4 * 192 + 4 * 192 * 2
    np.testing.assert_array_equal(back[~mask], bc.qdq(x[~mask], lo, positions[~mask])[0])


def test_random_control_spends_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    scores = np.random.default_rng(4).random((30, 1024))
    monkeypatch.setitem(bc.IMPORTANCE, "sum", scores)
    for unit, frac in ((1, 0.2), (64, 0.25)):
        ranked = bc.Mixed(bc.Quant(6), bc.Quant(4), frac, "sum", unit)
        control = bc.Mixed(bc.Quant(6), bc.Quant(4), frac, "random", unit)
        for block, exact in ((0, 4), (2, 0)):
            top = bc.mixed_mask(ranked, block, 7, exact, 256)
            rand = bc.mixed_mask(control, block, 7, exact, 256)
            assert len(top) == len(rand) == 256 - exact
            if unit == 1:
                assert top.sum() == rand.sum() == round(frac * (256 - exact))
                best = scores[7, block * 256 + exact:(block + 1) * 256]
                assert best[top].min() >= best[~top].max()
            else:
                assert top.sum() in (64, 60) and rand.sum() in (64, 60)
    assert bc.Mixed(bc.Quant(6), bc.Quant(4), 0.2).mask_bytes(256) == 32


def test_masks_per_kv_head_rank_each_head_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    scores = np.zeros((30, 3, 1024))
    scores[5, 0, 256 + 10] = scores[5, 1, 256 + 20] = scores[5, 2, 256 + 30] = 1.0
    monkeypatch.setitem(bc.IMPORTANCE, "mean/head", scores)
    m = bc.Mixed(bc.Quant(6, "channel", 256), bc.Quant(4, "channel", 128), 1 / 256, "mean",
                 per_head=True)
    mask = bc.mixed_mask(m, 1, 5, 0, 256)
    assert mask.shape == (256, 3)
    assert [mask[:, h].nonzero()[0].tolist() for h in range(3)] == [[10], [20], [30]]
    assert m.mask_bytes(256) == 96


def test_mixed_qdq_third_level_takes_its_rows() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(256, 192)).astype(np.float32)
    top = np.zeros(256, bool)
    top[:50] = True
    low = np.zeros(256, bool)
    low[-100:] = True
    hi, mid, bottom = bc.Quant(6, "channel", 256), bc.Quant(4, "channel", 128), \
        bc.Quant(1, "token", 64, "sym", rotate=True)
    back, parts, _ = bc.mixed_qdq(x, top, hi, mid, np.arange(256), (low, bottom))
    assert [(c.shape, b) for c, b in parts] == [((50, 192), 6), ((106, 192), 4),
                                                ((100, 192), 1)]
    err = ((back - x) ** 2).mean(1)
    assert err[:50].max() < err[50:156].min() and err[50:156].max() < err[156:].min()
    m = bc.Mixed(hi, bc.Quant(4), 0.2, "mean", bottom_k=bottom, bottom_frac=0.3)
    assert m.mask_bytes(256) == 64
