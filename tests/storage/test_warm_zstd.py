"""Warm records with zstd (``tiers.warm_zstd_level``, issue 13): lossless on top of their codes,
readable across a change of the setting either way, and re-framed by ``kvtier compact``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvtier.cli import main
from kvtier.errors import BlockCorrupt
from kvtier.storage import codec
from kvtier.storage.manager import TierManager
from kvtier.storage.quant import Grouping
from kvtier.storage.records import LayerKV
from kvtier.storage.tiers import Tier
from tests.factories import NS, block_id, make_config, make_layers

Q8C = codec.tier_format("q8c")
Q8C_Z = codec.tier_format("q8c", 1)


def default_block_layer(seed: int) -> LayerKV:
    """One layer of a default block: 256 tokens of 3 KV heads x 64."""
    return make_layers(seed, n_layers=1, n_tokens=256, width=192)[0]


def rows(layer: LayerKV) -> tuple[bytes, bytes]:
    return layer.k.rows.tobytes(), layer.v.rows.tobytes()


@pytest.mark.parametrize("exact", [0, codec.SINK_ROWS])
def test_a_compressed_record_decodes_to_the_uncompressed_ones_rows(exact):
    layer = default_block_layer(1)
    plain, packed = (codec.encode_record(layer, fmt, exact) for fmt in (Q8C, Q8C_Z))
    assert not codec.read_header(plain).zstd and codec.read_header(packed).zstd
    assert len(packed) < len(plain)
    plain_header, plain_layer = codec.decode_record(plain)
    packed_header, packed_layer = codec.decode_record(packed)
    assert rows(packed_layer) == rows(plain_layer)
    assert (packed_header.k, packed_header.v, packed_header.exact_rows, packed_header.key_min,
            packed_header.key_max) == (plain_header.k, plain_header.v, exact,
                                       plain_header.key_min, plain_header.key_max)


def test_transcode_keeps_the_codes_when_only_the_compression_differs():
    layer = default_block_layer(2)
    plain = codec.encode_record(layer, Q8C, codec.SINK_ROWS)
    packed = codec.transcode(plain, Q8C_Z)
    assert packed == codec.encode_record(layer, Q8C_Z, codec.SINK_ROWS)
    assert codec.transcode(packed, Q8C) == plain
    assert codec.transcode(packed, codec.tier_format("q8c", 3)) \
        == codec.encode_record(layer, codec.tier_format("q8c", 3), codec.SINK_ROWS)
    # Other codes go through f16, as before: q8 records become q8c ones, compressed.
    header = codec.read_header(codec.transcode(codec.encode_record(layer, codec.tier_format(
        "q8")), Q8C_Z))
    assert header.zstd and (header.v.grouping, header.v.group_size) == (Grouping.PER_CHANNEL, 256)


def test_a_damaged_record_is_not_reframed():
    record = bytearray(codec.encode_record(default_block_layer(3), Q8C))
    record[-1] ^= 1
    with pytest.raises(BlockCorrupt):
        codec.transcode(bytes(record), Q8C_Z)


def warm_headers(manager: TierManager) -> list[codec.RecordHeader]:
    warm = manager.tiers[Tier.WARM]
    return [codec.read_header(warm.get(key)) for key in warm.keys()]


def store(tmp_path, level: int) -> tuple[list[bytes], int]:
    """A sequence of two default-sized blocks in a warm tier written at zstd ``level``; their
    rows as read back, and their stored bytes."""
    config = make_config(tmp_path, **{"tiers.host_ram_budget": "64MiB",
                                      "tiers.warm_zstd_level": level})
    with TierManager(config, background=False) as m:
        ids = [m.put_block(block_id(1, b), make_layers(b, n_layers=3, n_tokens=256, width=192))
               for b in range(2)]
        m.save_sequence(NS, 1, np.arange(512), ids)
        assert {h.zstd for h in warm_headers(m)} == {bool(level)}
        return read_back(m), sum(m.block_entry(b).stored_bytes for b in ids)


def read_back(manager: TierManager) -> list[bytes]:
    return [r for b in range(2) for layer in manager.get_block(block_id(1, b))
            for r in rows(layer)]


@pytest.mark.parametrize("before, after", [(0, 1), (1, 0)])
def test_a_warm_tier_reads_and_recodes_after_the_setting_changes(tmp_path, before, after):
    expected, stored_before = store(tmp_path, before)
    config = make_config(tmp_path, **{"tiers.host_ram_budget": "64MiB",
                                      "tiers.warm_zstd_level": after})
    with TierManager(config, background=False) as m:
        assert {h.zstd for h in warm_headers(m)} == {bool(before)}     # as written
        assert read_back(m) == expected
        assert all(m.recode(block_id(1, b)) for b in range(2))
        assert {h.zstd for h in warm_headers(m)} == {bool(after)}
        assert read_back(m) == expected                                 # the same codes
        assert not any(m.recode(block_id(1, b)) for b in range(2))      # now in format
        stored_after = sum(m.block_entry(block_id(1, b)).stored_bytes for b in range(2))
    # 25 LMDB pages a record uncompressed, 24 compressed (these rows are random, not real KV)
    assert (stored_after < stored_before) == bool(after)


def test_compact_reframes_a_warm_tier_written_uncompressed(tmp_path, capsys):
    expected, stored_before = store(tmp_path, 0)
    args = ["compact", "--data-dir", str(tmp_path), "--set", "tiers.host_ram_budget=64MiB",
            "--set", "tiers.warm_zstd_level=1", "--no-progress", "--json"]
    capsys.readouterr()
    assert main(args) == 0
    recode = json.loads(capsys.readouterr().out)["steps"]["recode"]
    assert recode["warm"] == {"stale": 2, "recoded": 2}
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["steps"]["recode"]["warm"]["stale"] == 0
    config = make_config(tmp_path, **{"tiers.host_ram_budget": "64MiB",
                                      "tiers.warm_zstd_level": 1})
    with TierManager(config, background=False) as m:
        assert {h.zstd for h in warm_headers(m)} == {True}
        assert read_back(m) == expected
        assert sum(m.block_entry(block_id(1, b)).stored_bytes for b in range(2)) < stored_before
