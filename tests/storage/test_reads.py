"""The restore read path: pinned blocks decoded in parallel straight into caller-owned rows, one
kernel call per block, from every tier and both record formats; damage ends at its block."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest

from kvtier.errors import BlockCorrupt, BlockMissing, ModelMismatch
from kvtier.ggml import F16
from kvtier.storage import codec
from kvtier.storage.manager import TierManager
from kvtier.storage.reads import RowTargets
from kvtier.storage.tiers import Tier
from tests.factories import WIDTH, block_id, make_config, make_layers
from tests.storage.test_corruption import damage

N_LAYERS, N_TOKENS = 4, 64
ROW = 2 * WIDTH


def targets_for(n_blocks: int, n_rows: list[int] | None = None
                ) -> tuple[np.ndarray, RowTargets]:
    """A blob with room for every block's K and V rows, and where each record goes in it."""
    n_rows = n_rows or [N_TOKENS] * n_blocks
    blob = np.full(2 * N_LAYERS * sum(n_rows) * ROW, 0xEE, np.uint8)
    base = blob.__array_interface__["data"][0]
    k_addr = np.zeros((n_blocks, N_LAYERS), np.int64)
    v_addr = np.zeros_like(k_addr)
    off = 0
    for j in range(n_blocks):
        for layer in range(N_LAYERS):
            k_addr[j, layer], v_addr[j, layer] = base + off, base + off + n_rows[j] * ROW
            off += 2 * n_rows[j] * ROW
    layers = (F16.id,) * N_LAYERS
    return blob, RowTargets(k_addr, v_addr, layers, layers, (ROW,) * N_LAYERS,
                            (ROW,) * N_LAYERS, tuple(n_rows))


def rows_of(blob: np.ndarray, targets: RowTargets, j: int, layer: int,
            addressed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rows of record (j, layer) in ``blob``, placed as ``targets`` places them in
    ``addressed`` (the blob the addresses point into; ``blob`` itself by default)."""
    base = (blob if addressed is None else addressed).__array_interface__["data"][0]
    n = targets.n_rows[j]
    k = int(targets.k_addr[j, layer]) - base
    v = int(targets.v_addr[j, layer]) - base
    return blob[k:k + n * ROW].reshape(n, ROW), blob[v:v + n * ROW].reshape(n, ROW)


@pytest.fixture
def manager(tmp_path):
    with TierManager(make_config(tmp_path, **{"tiers.warm_format": "f16"}),
                     background=False) as m:
        yield m


def store(manager: TierManager, n_blocks: int) -> list:
    ids = [manager.put_block(block_id(1, b), make_layers(b, N_LAYERS, N_TOKENS))
           for b in range(n_blocks)]
    manager.save_sequence(ids[0].namespace, 1, np.arange(n_blocks * N_TOKENS), ids)
    return ids


def test_blocks_from_every_tier_decode_as_get_block_does(manager):
    ids = store(manager, 3)
    assert manager.move(ids[1], Tier.COOL) and manager.move(ids[2], Tier.COLD)
    expected = [manager.get_block(b) for b in ids]
    blob, targets = targets_for(3)
    with manager.pinned(ids):
        assert manager.get_blocks_into(ids, targets) == [None, None, None]
    for j in range(3):
        for layer in range(N_LAYERS):
            k, v = rows_of(blob, targets, j, layer)
            assert np.array_equal(k, expected[j][layer].k.rows)
            assert np.array_equal(v, expected[j][layer].v.rows)
    assert manager.stats()[Tier.WARM].hits >= 2    # get_block and get_blocks_into both count


def test_the_function_destination_gives_the_same_rows(manager):
    ids = store(manager, 2)
    blob, targets = targets_for(2)
    other = np.zeros_like(blob)
    with manager.pinned(ids):
        manager.get_blocks_into(ids, targets)

        def destination(j: int, layer: int):
            k, v = rows_of(other, targets, j, layer, addressed=blob)
            return k, v, F16.id, F16.id

        assert manager.get_blocks_into(ids, destination) == [None, None]
    assert np.array_equal(blob, other)


def test_damage_and_absence_are_per_block_and_the_damaged_block_goes(manager):
    ids = store(manager, 4)
    damage(manager.tiers[Tier.WARM], ids[1].key(2).to_bytes(), 300)
    manager.tiers[Tier.WARM].delete([ids[3].key(0).to_bytes()])
    blob, targets = targets_for(4)
    with manager.pinned(ids):
        errors = manager.get_blocks_into(ids, targets)
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], BlockCorrupt) and isinstance(errors[3], BlockCorrupt)
    assert manager.block_entry(ids[1]) is None and manager.block_entry(ids[3]) is None
    assert manager.stats()[Tier.WARM].corrupt == 2
    with manager.pinned(ids):
        assert isinstance(manager.get_blocks_into(ids[1:2], targets)[0], BlockMissing)


def test_a_destination_of_another_shape_is_a_model_mismatch(manager):
    ids = store(manager, 1)
    _, targets = targets_for(1, [N_TOKENS - 1])
    with manager.pinned(ids), pytest.raises(ModelMismatch):
        manager.get_blocks_into(ids, targets)


def test_format_1_records_in_a_store_restore(manager):
    golden = msgpack.unpackb((Path(__file__).parent / "data" / "kvb1_records.msgpack")
                             .read_bytes())
    # A block whose records were written by the format-1 codec (37 tokens, 64 wide).
    ids = store(manager, 1)
    records = [golden["records"][name] for name in ("f16", "q8", "q4_zstd", "q8")]
    keys = ids[0].record_keys(N_LAYERS)
    manager.tiers[Tier.WARM].put_many(list(zip(keys, records)))
    blob, targets = targets_for(1, [37])
    with manager.pinned(ids):
        assert manager.get_blocks_into(ids, targets) == [None]
    for layer, record in enumerate(records):
        _, expected = codec.decode_record(record)
        k, v = rows_of(blob, targets, 0, layer)
        assert np.array_equal(k, expected.k.rows) and np.array_equal(v, expected.v.rows)
