import numpy as np

from kvtier.ggml import F16
from kvtier.storage.catalog import KeySummary
from kvtier.storage.records import LayerKV, TensorRows
from kvtier.storage.summary import key_mean, key_min_max, key_summary


def test_matches_numpy_including_signed_zero_inf_and_nan():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((100, 24)) * 10).astype(np.float16)
    x[3, 0], x[4, 1], x[5, 2], x[6, 3] = np.inf, -np.inf, np.nan, -0.0
    x[:, 5] = np.nan
    lo, hi = key_min_max(x.view(np.uint16))
    lo, hi = lo.view(np.float16), hi.view(np.float16)
    ref_lo, ref_hi = np.nanmin(x[:, :5], axis=0), np.nanmax(x[:, :5], axis=0)
    assert np.array_equal(lo[:5], ref_lo) and np.array_equal(hi[:5], ref_hi)
    assert np.array_equal(lo[6:], x[:, 6:].min(axis=0))
    assert np.isnan(lo[5]) and np.isnan(hi[5])


def test_the_mean_key_matches_numpy_and_skips_non_finite_values():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 24)) * 3).astype(np.float16)
    x[0, 0] = np.float16(6e-8)                 # a subnormal
    x[1, 1], x[2, 2] = np.inf, np.nan
    mean = key_mean(x.view(np.uint16))
    finite = np.where(np.isfinite(x), x.astype(np.float64), np.nan)
    assert np.allclose(mean, np.nanmean(finite, axis=0), rtol=1e-6, atol=1e-7)


def test_a_summary_round_trips_with_its_mean_keys_and_an_older_one_without_them():
    rng = np.random.default_rng(2)
    layers = [LayerKV(TensorRows(F16.id, rng.standard_normal((16, 12)).astype(np.float16)
                                 .view(np.uint8)),
                      TensorRows(F16.id, rng.standard_normal((16, 12)).astype(np.float16)
                                 .view(np.uint8))) for _ in range(3)]
    summary = key_summary(layers)
    assert summary.representatives.shape == (3, 1, 12)
    again = KeySummary.unpack(summary.pack())
    assert np.array_equal(again.bounds, summary.bounds)
    assert np.array_equal(again.representatives, summary.representatives)
    older = KeySummary(summary.bounds).pack()          # what a store written before holds
    read = KeySummary.unpack(older)
    assert read.representatives is None and np.array_equal(read.bounds, summary.bounds)
