"""kvtier.storage.quant: exact sizes and layout, bit-exact f16 paths, per-group error bounds."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvtier.errors import BlockCorrupt
from kvtier.storage import quant
from kvtier.storage.quant import (Encoding, Grouping, decode, decode_into, encode, encoded_nbytes,
                                  float16_bits_to_float32, float32_to_float16_bits)

QUANTIZED = [Encoding.Q8, Encoding.Q4, Encoding.Q6]
LEVELS = {Encoding.Q8: 255, Encoding.Q4: 15, Encoding.Q6: 63}
ALL_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
F16_TABLE = ALL_BITS.view(np.float16).astype(np.float32)  # numpy's own f16 -> f32, every pattern
IS_NAN = np.isnan(F16_TABLE)
# (n_tokens, width, group_size): the product's block, partial groups both ways, tiny and odd.
SHAPES = [(256, 192, 32), (1, 192, 32), (37, 50, 16), (5, 7, 4), (33, 64, 32), (3, 5, 1),
          (300, 16, 64)]


def f16_bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float32).astype(np.float16).view(np.uint16)


def as_f32(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.float16).astype(np.float32)


def keys_like(rng: np.random.Generator, n_tokens: int, width: int) -> np.ndarray:
    """Mostly N(0, 1), a few channels 30x larger and offset, like real keys."""
    x = rng.standard_normal((n_tokens, width)).astype(np.float32)
    cols = rng.choice(width, size=min(3, width), replace=False)
    x[:, cols] = x[:, cols] * 30 + 40
    return f16_bits(x)


def n_groups(n_tokens: int, width: int, grouping: Grouping, gs: int) -> int:
    if grouping == Grouping.PER_TOKEN:
        return n_tokens * -(-width // gs)
    return -(-n_tokens // gs) * width


def element_params(payload: np.ndarray, n_tokens: int, width: int, grouping: Grouping,
                   gs: int) -> tuple[np.ndarray, np.ndarray]:
    """Each element's (group min, group scale), read from the payload's documented layout."""
    ng = n_groups(n_tokens, width, grouping, gs)
    head = np.frombuffer(payload[:4 * ng].tobytes(), dtype="<f2").astype(np.float32)
    mins, scales = head[:ng], head[ng:]
    if grouping == Grouping.PER_TOKEN:
        expand = lambda a: np.repeat(a.reshape(n_tokens, -1), gs, axis=1)[:, :width]  # noqa: E731
    else:
        expand = lambda a: np.repeat(a.reshape(-1, width), gs, axis=0)[:n_tokens]  # noqa: E731
    return expand(mins), expand(scales)


def group_slices(n_tokens: int, width: int, grouping: Grouping, gs: int):
    if grouping == Grouping.PER_TOKEN:
        for t in range(n_tokens):
            for c0 in range(0, width, gs):
                yield slice(t, t + 1), slice(c0, c0 + gs)
    else:
        for t0 in range(0, n_tokens, gs):
            for c in range(width):
                yield slice(t0, t0 + gs), slice(c, c + 1)


def assert_within_bound(x: np.ndarray, xhat: np.ndarray, scale: np.ndarray) -> None:
    """|x - x_hat| <= scale / 2, plus f32 arithmetic slack and the final rounding to f16."""
    x64, xhat64 = x.astype(np.float64), xhat.astype(np.float64)
    bound = scale * (0.5 + 1e-4) + np.abs(xhat64) * 2.0**-11 + 2.0**-25
    err = np.abs(x64 - xhat64)
    bad = err > bound
    assert not bad.any(), (f"{bad.sum()} values out of bound, worst err {err[bad].max()} "
                           f"at {np.argwhere(bad)[0]}")


def reference_encode(bits: np.ndarray, encoding: Encoding, grouping: Grouping,
                     gs: int) -> bytes:
    """The documented layout, group by group, in plain numpy (slow; small shapes only)."""
    n_tokens, width = bits.shape
    levels = np.float32(LEVELS[encoding])
    x = as_f32(bits)
    mins, scales = [], []
    codes = np.zeros((n_tokens, width), np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        for rows, cols in group_slices(n_tokens, width, grouping, gs):
            v = x[rows, cols]
            finite = v[np.isfinite(v)]
            lo = np.float32(finite.min()) if finite.size else np.float32(0)
            hi = np.float32(finite.max()) if finite.size else np.float32(0)
            step = (hi - lo) / levels
            scale_bits = int(np.float16(step).view(np.uint16))
            if np.float32(np.uint16(scale_bits).view(np.float16)) < step:
                scale_bits += 1
            scale = np.float32(np.uint16(scale_bits).view(np.float16))
            inv = np.float32(1) / scale if scale > 0 else np.float32(0)
            q = (v - lo) * inv + np.float32(0.5)
            q = np.where(q > 0, q, np.float32(0))
            codes[rows, cols] = np.minimum(q, levels).astype(np.uint8)
            mins.append(np.float16(lo).view(np.uint16))
            scales.append(scale_bits)
    if encoding == Encoding.Q4:  # column j in the low nibble, column j + ceil(width/2) high
        half = (width + 1) // 2
        padded = np.zeros((n_tokens, 2 * half), np.uint8)
        padded[:, :width] = codes
        codes = padded[:, :half] | (padded[:, half:] << 4)
    if encoding == Encoding.Q6:  # quarters k = 0..3 of q = ceil(width/4) columns
        q = (width + 3) // 4
        padded = np.zeros((n_tokens, 4 * q), np.uint8)
        padded[:, :width] = codes
        k = [padded[:, i * q:(i + 1) * q] for i in range(4)]
        codes = np.concatenate([(k[0] & 15) | ((k[2] & 15) << 4), (k[1] & 15) | ((k[3] & 15) << 4),
                                (k[0] >> 4) | ((k[1] >> 4) << 2) | ((k[2] >> 4) << 4)
                                | ((k[3] >> 4) << 6)], axis=1)
    return (np.array(mins, "<u2").tobytes() + np.array(scales, "<u2").tobytes()
            + codes.tobytes())


@pytest.fixture
def threads():
    """Restore quant's thread setting after a test changes it."""
    before = quant._threads
    yield
    quant.set_threads(before)


# --- f16 conversions ------------------------------------------------------------------------


def test_f16_to_f32_is_exact_for_every_pattern():
    got = float16_bits_to_float32(ALL_BITS)
    np.testing.assert_array_equal(got[~IS_NAN].view(np.uint32), F16_TABLE[~IS_NAN].view(np.uint32))
    assert np.isnan(got[IS_NAN]).all()


def test_f32_to_f16_round_trips_every_pattern():
    back = float32_to_float16_bits(F16_TABLE)
    np.testing.assert_array_equal(back[~IS_NAN], ALL_BITS[~IS_NAN])
    assert np.isnan(back[IS_NAN].view(np.float16)).all()
    np.testing.assert_array_equal(back[IS_NAN] & 0x8000, ALL_BITS[IS_NAN] & 0x8000)


def test_finite_f32_to_f16_used_by_decode_matches_numpy():
    rng = np.random.default_rng(14)
    finite = F16_TABLE[np.isfinite(F16_TABLE)]
    ranged = (rng.uniform(-1, 1, 4000) * 2.0 ** rng.uniform(-30, 16, 4000)).astype(np.float32)
    values = np.concatenate([finite, ranged, np.float32([65504, -65504, 65519.99, 2.0**-25])])
    got = np.array([quant._f32_to_f16_finite(v) for v in values], np.uint16)
    np.testing.assert_array_equal(got, values.astype(np.float16).view(np.uint16))


def test_f32_to_f16_matches_numpy_on_random_and_tie_values():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    raw = raw.view(np.float32)
    ranged = (rng.uniform(-1, 1, 1 << 20) * 2.0 ** rng.uniform(-30, 17, 1 << 20)).astype(
        np.float32)
    finite = F16_TABLE[np.isfinite(F16_TABLE)]
    ordered = np.unique(finite.astype(np.float64))
    ties = ((ordered[1:] + ordered[:-1]) / 2).astype(np.float32)  # exact in f32: 12 bits
    assert (ties.astype(np.float64) == (ordered[1:] + ordered[:-1]) / 2).all()
    edges = np.array([65504, 65519.99, 65520, 65536, 1e30, -65520, 2.0**-24, 2.0**-25,
                      2.0**-25 * 1.0001, 2.0**-14 * 0.99999, np.inf, -np.inf, 0.0, -0.0],
                     np.float32)
    for x in (raw[np.isfinite(raw)], ranged, ties, edges):
        with np.errstate(over="ignore"):
            expected = x.astype(np.float16).view(np.uint16)
        np.testing.assert_array_equal(float32_to_float16_bits(x), expected)


def test_order_keys_sort_like_the_values_and_invert():
    finite = ALL_BITS[np.isfinite(F16_TABLE)]
    keys = np.array([quant._order_key(b) for b in finite], np.int64)
    assert (np.array([quant._key_bits(k) for k in keys], np.uint16) == finite).all()
    order = np.argsort(keys, kind="stable")
    values = F16_TABLE[finite][order]
    assert (np.diff(values) >= 0).all()  # -0.0 sorts just below +0.0
    non_finite = ALL_BITS[~np.isfinite(F16_TABLE)]
    for b in non_finite:  # every inf/NaN key lands where _range_has_non_finite looks
        k = quant._order_key(b)
        assert quant._range_has_non_finite(k, k)
    assert not any(quant._range_has_non_finite(k, k) for k in keys)


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, nbytes", [
    ((256, 192, Encoding.F16, Grouping.PER_TOKEN, 32), 98304),
    ((256, 192, Encoding.Q8, Grouping.PER_TOKEN, 32), 4 * 1536 + 49152),
    ((256, 192, Encoding.Q8, Grouping.PER_CHANNEL, 32), 4 * 1536 + 49152),
    ((256, 192, Encoding.Q4, Grouping.PER_TOKEN, 32), 4 * 1536 + 24576),
    ((256, 192, Encoding.Q4, Grouping.PER_CHANNEL, 32), 4 * 1536 + 24576),
    ((5, 7, Encoding.Q4, Grouping.PER_TOKEN, 4), 4 * 10 + 5 * 4),
    ((5, 7, Encoding.Q4, Grouping.PER_CHANNEL, 4), 4 * 14 + 5 * 4),
    ((5, 7, Encoding.Q8, Grouping.PER_CHANNEL, 4), 4 * 14 + 35),
    ((1, 1, Encoding.Q4, Grouping.PER_TOKEN, 32), 4 + 1),
    ((256, 192, Encoding.Q6, Grouping.PER_CHANNEL, 256), 4 * 192 + 256 * 144),
    ((5, 7, Encoding.Q6, Grouping.PER_TOKEN, 4), 4 * 10 + 5 * 6),
    ((1, 1, Encoding.Q6, Grouping.PER_CHANNEL, 32), 4 + 3),
    ((5, 7, Encoding.F16, Grouping.PER_CHANNEL, 0), 70),
])
def test_encoded_nbytes_exact(args, nbytes):
    assert encoded_nbytes(*args) == nbytes


@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize("grouping", list(Grouping))
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_length_is_encoded_nbytes(encoding, grouping, shape):
    n_tokens, width, gs = shape
    bits = keys_like(np.random.default_rng(1), n_tokens, width)
    payload = encode(bits, encoding, grouping, gs)
    assert payload.dtype == np.uint8 and payload.ndim == 1
    assert payload.size == encoded_nbytes(n_tokens, width, encoding, grouping, gs)


# --- F16 ------------------------------------------------------------------------------------


def test_f16_round_trip_is_bit_exact_for_every_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    payload = encode(bits, Encoding.F16, Grouping.PER_TOKEN, 32)
    assert payload.tobytes() == bits.astype("<u2").tobytes()
    np.testing.assert_array_equal(decode(payload, 256, 256, Encoding.F16, Grouping.PER_TOKEN, 32),
                                  bits)


def test_f16_encode_does_not_alias_its_input():
    bits = keys_like(np.random.default_rng(2), 4, 16)
    payload = encode(bits, Encoding.F16, Grouping.PER_TOKEN, 32)
    bits[:] = 0
    assert payload.any()


# --- Q8 / Q4 --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", QUANTIZED)
@pytest.mark.parametrize("grouping", list(Grouping))
@pytest.mark.parametrize("shape", SHAPES)
def test_error_within_half_scale_and_params_exact(encoding, grouping, shape):
    n_tokens, width, gs = shape
    bits = keys_like(np.random.default_rng(3), n_tokens, width)
    payload = encode(bits, encoding, grouping, gs)
    decoded = decode(payload, n_tokens, width, encoding, grouping, gs)
    x, xhat = as_f32(bits), as_f32(decoded)
    mins, scales = element_params(payload, n_tokens, width, grouping, gs)
    assert_within_bound(x, xhat, scales)
    # The stored min is the group's min; the scale is (max - min) / levels, rounded up to f16.
    for rows, cols in group_slices(n_tokens, width, grouping, gs):
        v = x[rows, cols].astype(np.float64)
        assert mins[rows, cols].flat[0] == v.min()
        step = (v.max() - v.min()) / LEVELS[encoding]
        scale = float(scales[rows, cols].flat[0])
        assert step * (1 - 2.0**-22) <= scale <= step * (1 + 2.0**-10 + 2.0**-20) + 2.0**-24


@pytest.mark.parametrize("encoding", QUANTIZED)
@pytest.mark.parametrize("grouping", list(Grouping))
@pytest.mark.parametrize("shape", [(5, 7, 4), (3, 5, 1), (37, 50, 16), (9, 33, 32)])
def test_payload_matches_reference_layout(encoding, grouping, shape):
    n_tokens, width, gs = shape
    bits = keys_like(np.random.default_rng(4), n_tokens, width)
    assert encode(bits, encoding, grouping, gs).tobytes() == reference_encode(
        bits, encoding, grouping, gs)


def test_q4_pads_odd_rows_with_a_zero_nibble():
    bits = keys_like(np.random.default_rng(5), 3, 5)
    payload = encode(bits, Encoding.Q4, Grouping.PER_TOKEN, 32)
    codes = payload[4 * 3:].reshape(3, 3)
    assert (codes[:, 2] >> 4 == 0).all()
    decoded = decode(payload, 3, 5, Encoding.Q4, Grouping.PER_TOKEN, 32)
    _, scales = element_params(payload, 3, 5, Grouping.PER_TOKEN, 32)
    assert_within_bound(as_f32(bits), as_f32(decoded), scales)


@pytest.mark.parametrize("encoding", QUANTIZED)
@pytest.mark.parametrize("grouping", list(Grouping))
def test_constant_groups_decode_exactly_with_zero_scale(encoding, grouping):
    x = np.repeat(np.array([[1.5, -3.25, 0.0, 65504.0, -65504.0, 6e-8, 7.0, -0.0]], np.float32),
                  64, axis=0)
    if grouping == Grouping.PER_TOKEN:
        x = x.T.copy()  # each row constant
    bits = f16_bits(x)
    payload = encode(bits, encoding, grouping, 8)
    decoded = as_f32(decode(payload, *bits.shape, encoding, grouping, 8))
    _, scales = element_params(payload, *bits.shape, grouping, 8)
    assert (scales == 0).all()
    np.testing.assert_array_equal(decoded, as_f32(bits))


@pytest.mark.parametrize("encoding", QUANTIZED)
@pytest.mark.parametrize("grouping", list(Grouping))
def test_non_finite_inputs_are_clamped_into_the_finite_range(encoding, grouping):
    x = np.random.default_rng(6).standard_normal((32, 32)).astype(np.float32)
    x[:, 3], x[:, 7], x[:, 11] = np.inf, -np.inf, np.nan  # in every row (= group per token)
    axis = 1
    if grouping == Grouping.PER_CHANNEL:
        x, axis = x.T.copy(), 0  # in every column (= group per channel)
    bits = f16_bits(x)
    payload = encode(bits, encoding, grouping, 32)
    decoded = as_f32(decode(payload, 32, 32, encoding, grouping, 32))
    assert np.isfinite(decoded).all()
    mins, scales = element_params(payload, 32, 32, grouping, 32)
    at = lambda a, i: np.take(a, i, axis=axis)  # noqa: E731
    group_max = np.nanmax(np.where(np.isfinite(x), x, np.nan), axis=axis)
    np.testing.assert_array_equal(at(decoded, 7), at(mins, 7))  # -inf -> min
    np.testing.assert_array_equal(at(decoded, 11), at(mins, 11))  # NaN -> min
    assert_within_bound(group_max, at(decoded, 3), at(scales, 3))  # +inf -> max
    ok = np.isfinite(x)
    assert_within_bound(x[ok], decoded[ok], scales[ok])


@pytest.mark.parametrize("encoding", QUANTIZED)
@pytest.mark.parametrize("grouping", list(Grouping))
def test_group_without_finite_values_decodes_to_zero(encoding, grouping):
    x = np.ones((4, 4), np.float32)
    x[0] = [np.inf, -np.inf, np.nan, np.inf]
    if grouping == Grouping.PER_CHANNEL:
        x = x.T.copy()
    payload = encode(f16_bits(x), encoding, grouping, 4)
    decoded = as_f32(decode(payload, 4, 4, encoding, grouping, 4))
    expected = np.ones((4, 4), np.float32)
    expected[0] = 0
    np.testing.assert_array_equal(decoded, expected if grouping == Grouping.PER_TOKEN
                                  else expected.T)


@pytest.mark.parametrize("encoding", QUANTIZED)
@pytest.mark.parametrize("grouping", list(Grouping))
def test_full_f16_range_in_one_group_stays_finite(encoding, grouping):
    x = np.tile(np.array([-65504.0, 65504.0, 65472.0, -1.0, 0.0, 1.0, 30000.0, -30000.0],
                         np.float32), (8, 1))
    if grouping == Grouping.PER_CHANNEL:
        x = x.T.copy()
    bits = f16_bits(x)
    payload = encode(bits, encoding, grouping, 8)
    decoded = as_f32(decode(payload, 8, 8, encoding, grouping, 8))
    assert np.isfinite(decoded).all()
    assert decoded.max() == 65504.0 and decoded.min() == -65504.0
    _, scales = element_params(payload, 8, 8, grouping, 8)
    assert_within_bound(as_f32(bits), decoded, scales)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), encoding=st.sampled_from(QUANTIZED), grouping=st.sampled_from(Grouping),
       n_tokens=st.integers(1, 70), width=st.integers(1, 40), gs=st.integers(1, 40))
def test_any_f16_bits_round_trip_within_bound(data, encoding, grouping, n_tokens, width, gs):
    bits = data.draw(hnp.arrays(np.uint16, (n_tokens, width)))
    payload = encode(bits, encoding, grouping, gs)
    assert payload.size == encoded_nbytes(n_tokens, width, encoding, grouping, gs)
    decoded = as_f32(decode(payload, n_tokens, width, encoding, grouping, gs))
    assert np.isfinite(decoded).all()
    x = as_f32(bits)
    ok = np.isfinite(x)
    _, scales = element_params(payload, n_tokens, width, grouping, gs)
    assert_within_bound(x[ok], decoded[ok], scales[ok])


# --- decode_into, payload types, errors -----------------------------------------------------


@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize("grouping", list(Grouping))
@pytest.mark.parametrize("shape", [(37, 48, 16), (37, 50, 16), (1, 20, 8)])
def test_decode_into_strided_view_writes_only_its_rows(encoding, grouping, shape):
    n_tokens, width, gs = shape
    bits = keys_like(np.random.default_rng(7), n_tokens, width)
    payload = encode(bits, encoding, grouping, gs)
    expected = decode(payload, n_tokens, width, encoding, grouping, gs)
    # Inside a larger buffer, and as the last columns of the last rows (no slack after the view).
    for rows, cols, view in [(slice(3, 3 + n_tokens), slice(5, 5 + width), (n_tokens + 13, 70)),
                             (slice(2, 2 + n_tokens), slice(width, 2 * width),
                              (n_tokens + 2, 2 * width))]:
        buf = np.full(view, 0xABCD, np.uint16)
        decode_into(payload, buf[rows, cols], encoding, grouping, gs)
        np.testing.assert_array_equal(buf[rows, cols], expected)
        outside = np.ones(view, bool)
        outside[rows, cols] = False
        assert (buf[outside] == 0xABCD).all()


@pytest.mark.parametrize("encoding", list(Encoding))
def test_decode_accepts_bytes_memoryview_and_unaligned_read_only_views(encoding):
    bits = keys_like(np.random.default_rng(8), 20, 32)
    payload = encode(bits, encoding, Grouping.PER_CHANNEL, 8)
    expected = decode(payload, 20, 32, encoding, Grouping.PER_CHANNEL, 8)
    record = b"x" + payload.tobytes() + b"yz"  # odd offset, like a payload inside a record
    views = [payload.tobytes(), memoryview(record)[1:-2],
             np.frombuffer(record, np.uint8)[1:-2], bytearray(payload.tobytes())]
    for view in views:
        np.testing.assert_array_equal(
            decode(view, 20, 32, encoding, Grouping.PER_CHANNEL, 8), expected)


@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize("grouping", list(Grouping))
def test_encode_accepts_row_strided_input(encoding, grouping):
    big = keys_like(np.random.default_rng(9), 40, 100)
    big[7, 20:23] = f16_bits(np.float32([np.inf, -np.inf, np.nan]))  # the non-finite path too
    for view in (big[3:35, 10:74], big[39:, 36:], big[5:6, :50], big[:, 1:]):
        assert (encode(view, encoding, grouping, 16).tobytes()
                == encode(view.copy(), encoding, grouping, 16).tobytes())


@pytest.mark.parametrize("encoding", list(Encoding))
def test_wrong_payload_length_is_block_corrupt(encoding):
    payload = encode(keys_like(np.random.default_rng(10), 8, 16), encoding, Grouping.PER_TOKEN, 4)
    for bad in (payload[:-1], np.concatenate([payload, payload[:2]])):
        with pytest.raises(BlockCorrupt):
            decode(bad, 8, 16, encoding, Grouping.PER_TOKEN, 4)


def test_invalid_arguments_raise_value_error():
    bits = keys_like(np.random.default_rng(11), 4, 16)
    with pytest.raises(ValueError):
        encode(bits.view(np.float16), Encoding.Q8, Grouping.PER_TOKEN, 4)
    with pytest.raises(ValueError):
        encode(bits, Encoding.Q8, Grouping.PER_TOKEN, 0)
    with pytest.raises(ValueError):
        encode(bits[:, ::2], Encoding.Q8, Grouping.PER_TOKEN, 4)
    with pytest.raises(ValueError):
        encode(bits, 7, Grouping.PER_TOKEN, 4)
    with pytest.raises(ValueError):
        quant.set_threads(0)


# --- threads --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize("grouping", list(Grouping))
def test_parallel_kernels_give_the_same_bytes(encoding, grouping, threads):
    n_tokens, width = 1001, 192  # above PARALLEL_MIN_VALUES, partial last group
    assert n_tokens * width >= quant.PARALLEL_MIN_VALUES
    bits = keys_like(np.random.default_rng(12), n_tokens, width)
    results = []
    for n in (1, numba.config.NUMBA_NUM_THREADS):
        quant.set_threads(n)
        payload = encode(bits, encoding, grouping, 32)
        buf = np.zeros((n_tokens, width + 8), np.uint16)
        decode_into(payload, buf[:, 4:4 + width], encoding, grouping, 32)
        results.append((payload.tobytes(), buf))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_concurrent_calls_from_worker_threads(threads):
    quant.set_threads(numba.config.NUMBA_NUM_THREADS)
    rng = np.random.default_rng(13)
    blocks = [keys_like(rng, 512, 192) for _ in range(4)]
    expected = [encode(b, Encoding.Q4, Grouping.PER_CHANNEL, 32).tobytes() for b in blocks]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                payload = encode(blocks[i], Encoding.Q4, Grouping.PER_CHANNEL, 32)
                assert payload.tobytes() == expected[i]
                decode(payload, 512, 192, Encoding.Q4, Grouping.PER_CHANNEL, 32)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors

