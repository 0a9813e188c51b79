"""What a store holds, read at one moment (for the invariant checker and the tools), and how blocks
and sequences are named in their output."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from kvtier.storage.catalog import BlockEntry, SequenceEntry, SessionEntry
from kvtier.storage.placement import Placement
from kvtier.storage.records import BlockId

SequenceKey = tuple[bytes, int]
"""(namespace, sequence number): how the catalog names a sequence."""
NAMESPACE_META = b"ns:"
"""Catalog meta entries ``ns:<namespace>`` hold registered namespaces' fingerprints."""


def block_name(block: BlockId) -> str:
    """``NSPREFIX:SEQUENCE:BLOCK``, the prefix being the namespace's first 4 bytes in hex
    (``1a2b3c4d:7:0``)."""
    return f"{block.namespace.hex()[:8]}:{block.sequence}:{block.block}"


def sequence_name(namespace: bytes, sequence: int) -> str:
    """``NSPREFIX:SEQUENCE``."""
    return f"{namespace.hex()[:8]}:{sequence}"


@dataclass(slots=True)
class StoreView:
    """Everything the catalog holds, read at one moment (block entries from the in-memory index,
    which includes access statistics not yet flushed)."""

    blocks: dict[BlockId, BlockEntry]
    sequences: dict[SequenceKey, SequenceEntry]
    sessions: dict[str, SessionEntry]
    hashes: dict[bytes, BlockId]
    """namespace | chain hash → the block stored for it."""
    namespaces: dict[bytes, bytes]
    """Registered namespaces and their fingerprints (unregistered ones that hold data are added
    with an empty fingerprint)."""

    @classmethod
    def load(cls, placement: Placement) -> StoreView:
        with placement.index.lock, placement.catalog.read() as txn:
            blocks = placement.index.snapshot()
            sequences = {(s.namespace, s.sequence): s for s in txn.iter_sequences()}
            sessions = {s.session_id: s for s in txn.iter_sessions()}
            hashes = dict(txn.iter_hashes())
            namespaces = {name[len(NAMESPACE_META):]: value
                          for name, value in txn.iter_meta(NAMESPACE_META)}
        for ns in [b.namespace for b in blocks] + [k[0] for k in sequences]:
            namespaces.setdefault(bytes(ns), b"")
        return cls(blocks, sequences, sessions, hashes, namespaces)

    def references(self) -> Counter[BlockId]:
        """How many times sequences name each block (what every entry's ``refs`` should be)."""
        refs: Counter[BlockId] = Counter()
        for seq in self.sequences.values():
            refs.update(seq.block_ids())
        return refs

    def sequence_of(self, session: SessionEntry) -> SequenceEntry | None:
        return self.sequences.get((session.namespace, session.sequence))

    def named_sequences(self) -> set[SequenceKey]:
        return {(s.namespace, s.sequence) for s in self.sessions.values()}

    def hash_key(self, block: BlockId, entry: BlockEntry) -> bytes:
        return bytes(block.namespace) + entry.chain
