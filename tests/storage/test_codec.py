import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
import xxhash

from kvtier.errors import BlockCorrupt, ModelMismatch
from kvtier.ggml import F16
from kvtier.storage import codec
from kvtier.storage.codec import RecordFormat
from kvtier.storage.quant import Encoding, Grouping
from kvtier.storage.records import LayerKV, TensorRows
from tests.factories import WIDTH, f16, make_layers

Q8 = RecordFormat(Encoding.Q8)
Q4Z = RecordFormat(Encoding.Q4, zstd_level=3)
Q6Q4Z = codec.tier_format("q6q4", 3)


def test_f16_round_trip_is_bit_exact():
    layer = make_layers(1, n_layers=1, n_tokens=37)[0]
    header, back = codec.decode_record(codec.encode_record(layer, RecordFormat(Encoding.F16)))
    assert header.n_tokens == 37
    assert np.array_equal(back.k.rows, layer.k.rows)
    assert np.array_equal(back.v.rows, layer.v.rows)


@pytest.mark.parametrize("fmt, rel", [(Q8, 0.01), (Q4Z, 0.15), (Q6Q4Z, 0.15)])
def test_quantized_round_trip_within_bounds(fmt, rel):
    layer = make_layers(2, n_layers=1, n_tokens=256)[0]
    _, back = codec.decode_record(codec.encode_record(layer, fmt))
    for a, b in ((layer.k, back.k), (layer.v, back.v)):
        x, y = f16(a), f16(b)
        assert y.shape == x.shape
        assert np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x ** 2)) < rel


def test_quantized_records_are_smaller():
    layer = make_layers(3, n_layers=1, n_tokens=256)[0]
    f16_len = len(codec.encode_record(layer, RecordFormat(Encoding.F16)))
    assert len(codec.encode_record(layer, Q8)) < 0.6 * f16_len
    assert len(codec.encode_record(layer, Q4Z)) < 0.4 * f16_len
    assert len(codec.encode_record(layer, Q6Q4Z)) < 0.35 * f16_len


def test_key_summary_is_per_channel_min_max():
    layer = make_layers(4, n_layers=1, n_tokens=100)[0]
    header = codec.read_header(codec.encode_record(layer, Q8))
    lo, hi = header.key_summary()
    k = f16(layer.k)
    assert np.array_equal(lo, k.min(axis=0)) and np.array_equal(hi, k.max(axis=0))


def test_non_f16_rows_are_kept_as_they_are():
    rng = np.random.default_rng(0)
    q8_0 = 8  # ggml's q8_0: 34 bytes per 32 values
    rows = TensorRows(q8_0, rng.integers(0, 256, (50, 34 * 2), dtype=np.uint8))
    layer = LayerKV(rows, rows)
    header, back = codec.decode_record(codec.encode_record(layer, Q4Z))
    assert header.k.encoding == codec.RAW and header.key_summary() is None
    assert back.k.ggml_type == q8_0 and np.array_equal(back.k.rows, rows.rows)


def test_transcode_q8_to_q4():
    layer = make_layers(5, n_layers=1, n_tokens=64)[0]
    q4 = codec.transcode(codec.encode_record(layer, Q8), Q4Z)
    header, back = codec.decode_record(q4)
    assert header.k.encoding == Encoding.Q4 and header.zstd
    assert back.k.rows.shape == layer.k.rows.shape


def test_a_transcoded_record_keeps_the_key_summary_of_the_keys_as_computed():
    # Not the summary of the Q8-decoded keys, which differ from them in most channels.
    layer = make_layers(5, n_layers=1, n_tokens=256)[0]
    q8 = codec.encode_record(layer, Q8)
    cool = codec.transcode(q8, Q6Q4Z)
    k = f16(layer.k)
    lo, hi = codec.read_header(cool).key_summary()
    assert np.array_equal(lo, k.min(axis=0)) and np.array_equal(hi, k.max(axis=0))
    decoded = f16(codec.decode_record(q8)[1].k)
    assert not np.array_equal(decoded.max(axis=0), k.max(axis=0))


@pytest.mark.parametrize("fmt", [Q8, Q4Z, Q6Q4Z])
def test_every_flipped_byte_is_detected(fmt):
    data = codec.encode_record(make_layers(6, n_layers=1, n_tokens=32)[0], fmt)
    rng = np.random.default_rng(1)
    for pos in list(range(0, 40)) + list(rng.integers(0, len(data), 60)):
        damaged = bytearray(data)
        damaged[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(BlockCorrupt):
            codec.decode_record(bytes(damaged))
    with pytest.raises(BlockCorrupt):
        codec.decode_record(data[:-1])
    with pytest.raises(BlockCorrupt):
        codec.decode_record(b"KVB")


@pytest.mark.parametrize("fmt", [Q8, Q4Z, Q6Q4Z])
def test_a_batch_detects_every_flipped_byte_before_writing_the_record(fmt):
    # Without zstd the checksum is verified inside the kernel call, just before the record's
    # tensors are decoded: a damaged record fails the batch and writes nothing.
    layer = make_layers(6, n_layers=1, n_tokens=32)[0]
    data = codec.encode_record(layer, fmt)
    header = codec.read_header(data)
    rng = np.random.default_rng(2)
    for pos in list(range(0, 40)) + list(rng.integers(0, len(data), 60)):
        damaged = bytearray(data)
        damaged[pos] ^= 1 << int(rng.integers(0, 8))
        k_out = np.zeros_like(layer.k.rows.view(np.uint8).reshape(32, -1))
        v_out = np.zeros_like(k_out)
        batch = codec.DecodeBatch()
        with pytest.raises((BlockCorrupt)):
            batch.add_into(bytes(damaged), k_out, v_out, header.k.ggml_type,
                           header.v.ggml_type)
            batch.run()
        assert not k_out.any() and not v_out.any()


@pytest.mark.parametrize("fmt", [Q8, Q4Z, Q6Q4Z])
@pytest.mark.parametrize("n_tokens", [1, 4, 5, 256])
def test_exact_rows_survive_quantization_and_transcoding(fmt, n_tokens):
    layer = make_layers(8, n_layers=1, n_tokens=n_tokens)[0]
    data = codec.encode_record(layer, fmt, exact_rows=codec.SINK_ROWS)
    expected = min(codec.SINK_ROWS, n_tokens - 1)
    for record in (data, codec.transcode(data, Q4Z)):
        header, back = codec.decode_record(record)
        assert header.exact_rows == expected
        assert np.array_equal(back.k.rows[:expected], layer.k.rows[:expected])
        assert np.array_equal(back.v.rows[:expected], layer.v.rows[:expected])
        assert back.k.rows.shape == layer.k.rows.shape


# --- format 2 and format 1 ------------------------------------------------------------------

KVB1 = Path(__file__).parent / "data" / "kvb1_records.msgpack"
"""Records written by kvtier's format-1 codec (before KVB2), and the rows it decoded them to."""


def test_format_2_header_is_fixed_and_the_payload_aligned():
    layer = make_layers(11, n_layers=1, n_tokens=37)[0]
    record = codec.encode_record(layer, Q8, exact_rows=4)
    magic, _, n, exact, flags, channels = struct.unpack_from("<4sQIIHH", record)
    assert (magic, n, exact, flags, channels) == (b"KVB2", 37, 4, 0, 64)
    k = struct.unpack_from("<ibBHIQ", record, 24)
    v = struct.unpack_from("<ibBHIQ", record, 44)
    assert k[:5] == (1, Encoding.Q8, Grouping.PER_CHANNEL, 32, 64)
    assert v[:5] == (1, Encoding.Q8, Grouping.PER_TOKEN, 32, 64)
    offset = -(-(64 + 4 * 64) // 16) * 16
    assert len(record) == offset + k[5] + v[5]
    lo = np.frombuffer(record[64:64 + 128], np.float16)
    assert np.array_equal(lo, f16(layer.k).min(axis=0).astype(np.float16))


@pytest.mark.parametrize("name", ["f16", "q8", "q4_zstd", "q8_0_raw"])
def test_format_1_records_still_read(name):
    golden = msgpack.unpackb(KVB1.read_bytes())
    record = golden["records"][name]
    assert record[:4] == b"KVB1"
    header, layer = codec.decode_record(record)
    assert header.version == 1
    assert layer.k.rows.tobytes() == golden["decoded"][name][0]
    assert layer.v.rows.tobytes() == golden["decoded"][name][1]
    k_out, v_out = np.empty_like(layer.k.rows), np.empty_like(layer.v.rows)
    codec.decode_record_into(record, k_out, v_out, header.k.ggml_type, header.v.ggml_type)
    assert np.array_equal(k_out, layer.k.rows) and np.array_equal(v_out, layer.v.rows)
    upgraded = codec.transcode(record, Q8 if name != "f16" else RecordFormat(Encoding.F16))
    assert upgraded[:4] == b"KVB2"
    assert codec.read_header(upgraded).key_summary() is not None or name == "q8_0_raw"


def test_format_1_flipped_bytes_are_detected():
    record = msgpack.unpackb(KVB1.read_bytes())["records"]["q8"]
    for pos in range(0, len(record), 97):
        damaged = bytearray(record)
        damaged[pos] ^= 0x04
        with pytest.raises(BlockCorrupt):
            codec.decode_record(bytes(damaged))


def _rechecksummed(record: bytearray) -> bytes:
    struct.pack_into("<Q", record, 4, xxhash.xxh3_64_intdigest(bytes(record[12:])))
    return bytes(record)


def test_a_header_that_lies_about_the_payload_is_corrupt_even_with_a_good_checksum():
    layer = make_layers(12, n_layers=1, n_tokens=64)[0]
    record = bytearray(codec.encode_record(layer, Q8))
    struct.pack_into("<H", record, 24 + 6, 16)            # K's group size: 32 -> 16
    with pytest.raises(BlockCorrupt):
        codec.decode_record(_rechecksummed(record))
    record = bytearray(codec.encode_record(layer, Q8))
    struct.pack_into("<H", record, 20, 2)                 # an unknown flag
    with pytest.raises(BlockCorrupt):
        codec.decode_record(_rechecksummed(record))


def test_decode_batch_fills_many_destinations_with_one_call():
    layers = make_layers(13, n_layers=8, n_tokens=40)
    records = [codec.encode_record(kv, fmt, exact_rows=4)
               for kv, fmt in zip(layers, [Q8, Q4Z, RecordFormat(Encoding.F16), Q6Q4Z] * 2)]
    blob = np.full(8 * 2 * 40 * WIDTH * 2 + 16, 0xEE, np.uint8)
    base = blob.__array_interface__["data"][0]
    batch = codec.DecodeBatch()
    row_bytes = 2 * WIDTH
    for i, record in enumerate(records):
        k_off, v_off = (2 * i) * 40 * row_bytes, (2 * i + 1) * 40 * row_bytes
        batch.add(record, base + k_off, base + v_off, F16.id, F16.id, row_bytes, row_bytes, 40)
    assert len(batch) == 8
    batch.run()
    for i, record in enumerate(records):
        _, expected = codec.decode_record(record)
        k = blob[2 * i * 40 * row_bytes:(2 * i + 1) * 40 * row_bytes].reshape(40, row_bytes)
        v = blob[(2 * i + 1) * 40 * row_bytes:(2 * i + 2) * 40 * row_bytes].reshape(40, row_bytes)
        assert np.array_equal(k, expected.k.rows) and np.array_equal(v, expected.v.rows)
    assert (blob[-16:] == 0xEE).all()                     # nothing written past the rows


def test_decode_batch_refuses_a_destination_of_another_shape_or_type():
    record = codec.encode_record(make_layers(14, n_layers=1, n_tokens=40)[0], Q8)
    rows = np.empty((40, 2 * WIDTH), np.uint8)
    for k_out, k_type in ((np.empty((39, 2 * WIDTH), np.uint8), F16.id),
                          (np.empty((40, 2 * WIDTH + 2), np.uint8), F16.id),
                          (rows, 8)):
        with pytest.raises(ModelMismatch):
            codec.decode_record_into(record, k_out, rows if k_out.shape[0] == 40 else k_out,
                                     k_type, F16.id)
    with pytest.raises(ValueError):
        codec.decode_record_into(record, rows[:, :WIDTH], rows[:, :WIDTH], F16.id, F16.id)


@pytest.mark.parametrize("fmt", [RecordFormat(Encoding.F16), Q8, Q4Z, Q6Q4Z])
def test_a_layer_without_rows_round_trips(fmt):
    """A sliding-window layer of a block its window has left holds no rows (issue 11: storing one
    raised 'empty block (0 x 256)' and the request failed)."""
    empty = TensorRows(F16.id, np.zeros((0, 2 * WIDTH), np.uint8))
    record = codec.encode_record(LayerKV(empty, empty), fmt, codec.SINK_ROWS)
    header, back = codec.decode_record(record)
    assert header.n_tokens == 0 and not header.zstd
    assert back.k.rows.shape == back.v.rows.shape == (0, 2 * WIDTH)
    assert codec.decode_record(codec.transcode(record, Q4Z))[0].n_tokens == 0
    full = make_layers(9, n_layers=1, n_tokens=8)[0]
    k_out, v_out = np.empty((8, 2 * WIDTH), np.uint8), np.empty((8, 2 * WIDTH), np.uint8)
    batch = codec.DecodeBatch()   # an empty record beside a full one, in one kernel call
    batch.add_into(record, k_out[:0], v_out[:0], F16.id, F16.id)
    batch.add_into(codec.encode_record(full, RecordFormat(Encoding.F16)), k_out, v_out, F16.id,
                   F16.id)
    batch.run()
    assert np.array_equal(k_out, full.k.rows) and np.array_equal(v_out, full.v.rows)


def test_an_empty_record_with_a_payload_is_corrupt():
    empty = TensorRows(F16.id, np.zeros((0, 2 * WIDTH), np.uint8))
    record = bytearray(codec.encode_record(LayerKV(empty, empty), Q8))
    record += b"\0" * 8
    record[4:12] = xxhash.xxh3_64_intdigest(bytes(record[12:])).to_bytes(8, "little")
    with pytest.raises(BlockCorrupt):
        codec.DecodeBatch().add(bytes(record), 0, 0, F16.id, F16.id, 2 * WIDTH, 2 * WIDTH, 0)


# --- issue 13: per-tensor formats, and records written before them ----------------------------

KVB2_Q4 = Path(__file__).parent / "data" / "kvb2_records.msgpack"
"""Format-2 records written by kvtier's codec before issue 13 (commit 240a278: Q8 in groups of 32,
Q4 in groups of 16 with V per token, four exact rows; layers ``make_layers(1313, 1, 40)``) and the
rows it decoded them to."""


@pytest.mark.parametrize("name", ["f16", "q8", "q4_zstd", "q8_0_raw"])
def test_records_written_before_issue_13_read_the_same(name):
    golden = msgpack.unpackb(KVB2_Q4.read_bytes())
    record = golden["records"][name]
    header, layer = codec.decode_record(record)
    assert header.version == 2
    assert layer.k.rows.tobytes() == golden["decoded"][name][0]
    assert layer.v.rows.tobytes() == golden["decoded"][name][1]
    if name in ("q8", "q4_zstd"):   # the formats kept by name write the same bytes as then
        source = make_layers(1313, n_layers=1, n_tokens=40)[0]
        fmt = codec.tier_format("q8") if name == "q8" else codec.tier_format("q4", 3)
        assert codec.encode_record(source, fmt, 4) == record
    upgraded = codec.transcode(record, Q6Q4Z)
    if name != "q8_0_raw":
        h = codec.read_header(upgraded)
        assert (h.k.encoding, h.v.encoding, h.exact_rows) == (Encoding.Q6, Encoding.Q4,
                                                             header.exact_rows)


def test_q6q4_header_names_each_tensors_layout():
    layer = make_layers(15, n_layers=1, n_tokens=256)[0]
    record = codec.encode_record(layer, Q6Q4Z, exact_rows=4)
    h = codec.read_header(record)
    assert (h.k.encoding, h.k.grouping, h.k.group_size) == (Encoding.Q6, Grouping.PER_CHANNEL,
                                                              256)
    assert (h.v.encoding, h.v.grouping, h.v.group_size) == (Encoding.Q4, Grouping.PER_CHANNEL,
                                                              128)
    assert h.k.nbytes == 4 * 2 * WIDTH + 4 * WIDTH + 252 * 3 * (WIDTH // 4)
    assert h.v.nbytes == 4 * 2 * WIDTH + 2 * 4 * WIDTH + 252 * WIDTH // 2
    _, back = codec.decode_record(record)
    assert np.array_equal(back.k.rows[:4], layer.k.rows[:4])


def test_q8c_warm_record_of_a_default_block_fits_25_lmdb_pages():
    layer = make_layers(16, n_layers=1, n_tokens=256, width=192)[0]
    record = codec.encode_record(layer, codec.tier_format("q8c"))
    h = codec.read_header(record)
    assert (h.k.grouping, h.k.group_size, h.v.grouping, h.v.group_size) == (
        Grouping.PER_CHANNEL, 256, Grouping.PER_CHANNEL, 256)
    pages = lambda r: -(-(len(r) + 16) // 4096)  # noqa: E731  (LMDB overflow pages of 4 KiB)
    assert len(record) == 100_672 and pages(record) == 25
    assert pages(codec.encode_record(layer, codec.tier_format("q8c"), exact_rows=4)) == 25
    assert len(codec.encode_record(layer, Q8)) == 111_424 and pages(
        codec.encode_record(layer, Q8)) == 28
    _, back = codec.decode_record(record)
    for a, b in ((layer.k, back.k), (layer.v, back.v)):
        x, y = f16(a), f16(b)
        assert np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x ** 2)) < 0.01


def test_tier_formats_by_name():
    assert codec.tier_format("q4", 3) == Q4Z
    assert codec.tier_format("q8") == Q8
    assert codec.tier_format("q6q4", 3).key_format.encoding == Encoding.Q6
    with pytest.raises(ValueError, match="q5"):
        codec.tier_format("q5")
