import numpy as np

from kvtier.storage.summary import key_min_max


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
