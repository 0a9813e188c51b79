"""kvtier.storage.batch: many tensors decoded by address in one call, exactly as one at a time;
bad tasks reported, never read or written past."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
import zstandard

from kvtier.storage import batch
from kvtier.storage.quant import Encoding, Grouping, decode, encode
from tests.storage.test_quant import keys_like


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("shape", [(256, 192, 32), (37, 50, 16), (5, 7, 4), (1, 20, 8)])
def test_decode_tasks_matches_decode_into_for_every_encoding(shape):
    n_tokens, width, gs = shape
    rng = np.random.default_rng(14)
    cases = [(e, g, exact) for e in Encoding for g in Grouping
             for exact in (0, min(4, n_tokens - 1))]
    sources, expected, tasks = [], [], []
    out = np.full((len(cases) + 1, n_tokens, width), 0xABCD, np.uint16)  # last one: untouched
    for i, (encoding, grouping, exact) in enumerate(cases):
        bits = keys_like(rng, n_tokens, width)
        # One byte of slack in front: payloads at odd addresses, as inside a KVB1 record.
        payload = np.concatenate([np.zeros(1, np.uint8), bits[:exact].reshape(-1).view(np.uint8),
                                  encode(bits[exact:], encoding, grouping, gs)
                                  if exact < n_tokens else np.zeros(0, np.uint8)])[1:]
        want = bits.copy()
        if exact < n_tokens:
            want[exact:] = decode(payload[2 * exact * width:], n_tokens - exact, width, encoding,
                                  grouping, gs)
        sources.append(payload)
        expected.append(want)
        tasks.append((_address(payload), payload.size, _address(out[i]), n_tokens, width,
                      int(encoding), int(grouping), gs, exact))
    status = batch.decode_tasks(np.array(tasks, np.int64))
    assert (status == batch.TASK_OK).all()
    for i in range(len(cases)):
        np.testing.assert_array_equal(out[i], expected[i])
    assert (out[-1] == 0xABCD).all()


def test_decode_tasks_copies_raw_rows_and_reports_bad_tasks_without_touching_them():
    rng = np.random.default_rng(15)
    raw = rng.integers(0, 256, (9, 34), dtype=np.uint8)
    payload = encode(keys_like(rng, 8, 16), Encoding.Q8, Grouping.PER_TOKEN, 4)
    dst_raw = np.zeros_like(raw)
    dst = np.full((8, 16), 7, np.uint16)
    a, d = _address(payload), _address(dst)
    tasks = np.array([
        (_address(raw), raw.size, _address(dst_raw), 9, 34, batch.RAW, 0, 0, 0),
        (a, payload.size - 1, d, 8, 16, 1, 0, 4, 0),       # payload one byte short
        (a, payload.size, d, 8, 16, 1, 0, 8, 0),           # another group size: another size
        (a, payload.size, d, 8, 16, 5, 0, 4, 0),           # no such encoding
        (a, payload.size, d, 8, 16, 1, 2, 4, 0),           # no such grouping
        (a, payload.size, d, 8, 16, 1, 0, 4, 9),           # more exact rows than rows
        (a, payload.size, d, 8, 16, 1, 0, 0, 0),           # group size 0
        (_address(raw), raw.size - 1, _address(dst_raw), 9, 34, batch.RAW, 0, 0, 0),
    ], np.int64)
    status = batch.decode_tasks(tasks)
    assert status.tolist() == [batch.TASK_OK, batch.TASK_BAD_SIZE, batch.TASK_BAD_SIZE,
                               batch.TASK_BAD_PARAMS, batch.TASK_BAD_PARAMS,
                               batch.TASK_BAD_PARAMS, batch.TASK_BAD_PARAMS, batch.TASK_BAD_SIZE]
    np.testing.assert_array_equal(dst_raw, raw)
    assert (dst == 7).all()
    with pytest.raises(ValueError):
        batch.decode_tasks(tasks[:, :8].copy())


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@pytest.mark.skipif(not batch.XXH3_ADDRESS, reason="this xxhash exports no XXH3_64bits")
def test_record_rows_verify_each_record_before_its_tasks_and_skip_the_ones_they_guard():
    rng = np.random.default_rng(16)
    good, bad = (rng.integers(0, 256, (4, 8), dtype=np.uint8) for _ in range(2))
    dst = np.zeros((4, 4, 8), np.uint8)
    digest = _signed(xxhash.xxh3_64_intdigest(good.tobytes()))
    tasks = np.array([(_address(src), src.size, _address(dst[i]), 4, 8, batch.RAW, 0, 0, 0)
                      for i, src in enumerate((good, good, bad, bad))], np.int64)
    none = (0,) * batch.RECORD_FIELDS
    records = np.array([(_address(good), good.size, digest, 2, 0, 0, 0, 0), none,
                        (_address(bad), bad.size, digest, 2, 0, 0, 0, 0), none], np.int64)
    status = batch.decode_tasks(tasks, records)
    assert status.tolist() == [batch.TASK_OK, batch.TASK_OK, batch.TASK_BAD_CHECKSUM,
                               batch.TASK_BAD_CHECKSUM]
    np.testing.assert_array_equal(dst[0], good)
    np.testing.assert_array_equal(dst[1], good)
    assert not dst[2:].any()                       # a failed check writes nothing it guards
    with pytest.raises(ValueError):
        batch.decode_tasks(tasks, records[:3].copy())


@pytest.mark.skipif(not batch.ZSTD_ADDRESS, reason="no system libzstd")
def test_record_rows_decompress_a_frame_before_its_tasks_and_refuse_one_of_another_length():
    rng = np.random.default_rng(17)
    rows = rng.integers(0, 8, (6, 10), dtype=np.uint8)    # compressible
    frame = np.frombuffer(zstandard.ZstdCompressor(level=3).compress(rows.tobytes()), np.uint8)
    scratch = np.zeros((2, rows.size), np.uint8)
    dst = np.zeros((2, 6, 10), np.uint8)
    tasks = np.array([(_address(scratch[i]), rows.size, _address(dst[i]), 6, 10, batch.RAW, 0,
                       0, 0) for i in range(2)], np.int64)
    records = np.array([(0, 0, 0, 1, _address(frame), frame.size, _address(scratch[0]),
                         rows.size),
                        (0, 0, 0, 1, _address(frame), frame.size, _address(scratch[1]),
                         rows.size - 1)], np.int64)
    status = batch.decode_tasks(tasks, records)
    assert status.tolist() == [batch.TASK_OK, batch.TASK_BAD_FRAME]
    np.testing.assert_array_equal(dst[0], rows)
    assert not dst[1].any()
