import numpy as np
import pytest

from kvtier.errors import BlockCorrupt
from kvtier.storage import codec
from kvtier.storage.codec import RecordFormat
from kvtier.storage.quant import Encoding
from kvtier.storage.records import LayerKV, TensorRows
from tests.factories import f16, make_layers

Q8 = RecordFormat(Encoding.Q8)
Q4Z = RecordFormat(Encoding.Q4, zstd_level=3)


def test_f16_round_trip_is_bit_exact():
    layer = make_layers(1, n_layers=1, n_tokens=37)[0]
    header, back = codec.decode_record(codec.encode_record(layer, RecordFormat(Encoding.F16)))
    assert header.n_tokens == 37
    assert np.array_equal(back.k.rows, layer.k.rows)
    assert np.array_equal(back.v.rows, layer.v.rows)


@pytest.mark.parametrize("fmt, rel", [(Q8, 0.01), (Q4Z, 0.15)])
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


@pytest.mark.parametrize("fmt", [Q8, Q4Z])
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


@pytest.mark.parametrize("fmt", [Q8, Q4Z])
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
