"""The tier manager's three read paths: a block, several blocks decoded in parallel, and pinned
blocks decoded straight into a restore's rows; and raw records for the inspection tools.

Every read counts a hit (or a miss); a block that fails its checksum, or that its tier cannot read
at all (a damaged SST or blob file, an I/O error: :class:`BlockCorrupt` from the tier), is counted
as corrupt and quarantined (its entry removed, so the next lookup is a miss and the caller
recomputes it); a block read from below warm is scheduled for promotion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from kvtier.errors import BlockCorrupt, BlockMissing, KvtierError
from kvtier.storage import codec, workers
from kvtier.storage.balancer import Balancer, Op
from kvtier.storage.placement import Placement
from kvtier.storage.records import BlockId, LayerKV
from kvtier.storage.tiers import Tier

T = TypeVar("T")
RowDestination = Callable[[int, int], tuple[np.ndarray, np.ndarray, int, int]]
"""(block position, layer) -> (k_out, v_out, k_type, v_type): where a restore decodes rows."""
Fetched = tuple[Tier, list[bytes | None]]


@dataclass(frozen=True, slots=True)
class RowTargets:
    """Where a restore decodes every record, by address (no Python call per record): the rows of
    layer ``l`` of ``blocks[j]`` go to ``k_addr[j, l]`` and ``v_addr[j, l]``, ``n_rows[j]``
    contiguous rows of ``k_row_bytes[l]`` / ``v_row_bytes[l]`` bytes. The caller keeps the memory
    alive and writable while the read runs."""

    k_addr: np.ndarray
    """int64 (blocks, layers)."""
    v_addr: np.ndarray
    k_types: tuple[int, ...]
    v_types: tuple[int, ...]
    k_row_bytes: tuple[int, ...]
    v_row_bytes: tuple[int, ...]
    n_rows: tuple[int, ...]

    def add(self, batch: codec.DecodeBatch, j: int, layer: int, record: bytes | memoryview
            ) -> None:
        batch.add(record, int(self.k_addr[j, layer]), int(self.v_addr[j, layer]),
                  self.k_types[layer], self.v_types[layer], self.k_row_bytes[layer],
                  self.v_row_bytes[layer], self.n_rows[j])

LAYER_PARTS = 8
"""A block read alone is read and decoded in this many parts of its layers, in parallel."""


class BlockReader:
    """Reads blocks from whichever tier holds them."""

    def __init__(self, placement: Placement, balancer: Balancer) -> None:
        self._p = placement
        self._index = placement.index
        self._balancer = balancer
        self._half_life_s = balancer.weights.hit_half_life_s

    def get_block(self, block: BlockId) -> list[LayerKV]:
        """All layers of a block, decoded to llama.cpp rows, from whichever tier holds it.

        Raises :class:`BlockMissing` if no tier has it, :class:`BlockCorrupt` if its data fails
        its checksum; a corrupt block is removed, so the next lookup reports it missing.
        """
        result = self._decode(block, self._fetch(block))
        if isinstance(result, KvtierError):
            raise result
        return result

    def get_blocks(self, blocks: Sequence[BlockId]) -> list[list[LayerKV] | KvtierError]:
        """Several blocks, decoded in parallel (the quantizers hold no GIL): for each, its layers
        or the :class:`BlockMissing` / :class:`BlockCorrupt` that reading it met."""
        fetched = [self._fetch(block) for block in blocks]
        return workers.ENGINE.run_all(lambda b=b, f=f: self._decode(b, f)
                                      for b, f in zip(blocks, fetched))

    def get_blocks_into(self, blocks: Sequence[BlockId],
                        destination: RowTargets | RowDestination) -> list[KvtierError | None]:
        """Decode several **pinned** blocks in parallel straight into caller-owned rows, given as
        :class:`RowTargets` or as a function ``destination(j, layer) -> (k_out, v_out, k_type,
        v_type)`` of C-contiguous arrays. For each block, None or the error that reading it met
        (a corrupt block is removed, as with :meth:`get_block`).

        Each block is read in a decoding thread (a block alone, in parts of its layers on
        several), zero-copy where the tier allows (LMDB), and without the index's lock: the pin
        (a restore holds one) keeps it from moving. Its records are verified one by one and
        decoded by one kernel call (:class:`codec.DecodeBatch`), so a block costs its bytes, not
        a Python call per record."""
        located = [self._locate(block) for block in blocks]
        if isinstance(destination, RowTargets):
            add = destination.add
        else:
            def add(batch: codec.DecodeBatch, j: int, layer: int,
                    record: bytes | memoryview) -> None:
                batch.add_into(record, *destination(j, layer))

        def decode(j: int) -> KvtierError | None:
            where = located[j]
            if isinstance(where, KvtierError):
                return where
            tier, keys = where
            store = self._p.tiers[tier]

            def part(layers: range) -> None | BlockCorrupt:
                def run(records: list[bytes | memoryview]) -> None:
                    batch = codec.DecodeBatch()
                    for layer, record in zip(layers, records):
                        add(batch, j, layer, record)
                    batch.run()

                def into(values: list[bytes | memoryview | None]) -> None | BlockCorrupt:
                    return self._decode_values(blocks[j], tier, values, run)
                try:
                    return store.read_many([keys[i] for i in layers], into)
                except BlockCorrupt as exc:     # the tier could not read it at all
                    return exc

            # A block alone is read and decoded a part of its layers per worker (on an H200
            # host an 8B block from cool took 14 ms to read and as long to decode on one core);
            # several blocks, one per worker.
            parts = LAYER_PARTS if len(blocks) == 1 else 1
            reads = workers.ENGINE.run_all(lambda span=span: part(span)
                                           for span in workers.spans(len(keys), parts))
            read = next((r for r in reads if r is not None), None)
            result = self._account(blocks[j], tier, read)
            return result if isinstance(result, KvtierError) else None

        return workers.ENGINE.run_all(lambda j=j: decode(j) for j in range(len(blocks)))

    def _locate(self, block: BlockId) -> tuple[Tier, list[bytes]] | KvtierError:
        """The tier and record keys of a block, counting the access."""
        entry = self._index.touch(block, time.time(), self._half_life_s)
        if entry is None:
            with self._index.lock:
                self._index.counters[Tier.WARM].misses += 1
            return BlockMissing(f"{block} is in no tier")
        return entry.tier, block.record_keys(entry.n_layers)

    def _fetch(self, block: BlockId) -> Fetched | KvtierError:
        """The tier and record bytes of a block, read under the lock so that no move can delete
        them between the catalog lookup and the read."""
        with self._index.lock:
            located = self._locate(block)
            if isinstance(located, KvtierError):
                return located
            tier, keys = located
            try:
                return tier, self._p.tiers[tier].get_many(keys)
            except BlockCorrupt as exc:
                return self._account(block, tier, exc)

    def _decode(self, block: BlockId, fetched: Fetched | KvtierError
                ) -> list[LayerKV] | KvtierError:
        if isinstance(fetched, KvtierError):
            return fetched
        tier, values = fetched
        result = self._decode_values(block, tier, values,
                                     lambda vs: [codec.decode_record(v)[1] for v in vs])
        return self._account(block, tier, result)

    @staticmethod
    def _decode_values(block: BlockId, tier: Tier, values: Sequence[bytes | memoryview | None],
                       decode: Callable[[list[bytes | memoryview]], T]) -> T | BlockCorrupt:
        """``decode`` of a block's records, or the BlockCorrupt that it or a missing layer met;
        no side effects, so it can run inside a tier's read transaction."""
        try:
            if any(v is None for v in values):
                raise BlockCorrupt(f"{block}: {sum(v is None for v in values)} layers missing "
                                   f"from {tier.label}")
            return decode(list(values))
        except BlockCorrupt as exc:
            return exc

    def _account(self, block: BlockId, tier: Tier, result: T) -> T:
        """Count a read; remove a corrupt block; schedule promoting one read from below warm."""
        with self._index.lock:
            if isinstance(result, BlockCorrupt):
                self._index.counters[tier].corrupt += 1
                self._p.quarantine([block], str(result))
                return result
            self._index.counters[tier].hits += 1
        if tier != Tier.WARM:
            self._balancer.schedule(Op.PROMOTE, block)
        return result

    def read_records(self, block: BlockId) -> Fetched:
        """The tier and raw record bytes of every layer of a block (for inspection tools)."""
        with self._index.lock:
            entry = self._index.get(block)
            if entry is None:
                raise BlockMissing(f"{block} is in no tier")
            keys = block.record_keys(entry.n_layers)
            return entry.tier, self._p.tiers[entry.tier].get_many(keys)
