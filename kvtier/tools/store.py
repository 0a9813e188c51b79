"""What the tools see of a store: a snapshot of its catalog, and block ids written as text.

The tools open a data directory with the tier manager (which takes the directory's exclusive lock,
so a running server makes them fail with :class:`~kvtier.errors.StoreLocked`) and with no
background worker: nothing moves unless a tool moves it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from kvtier.config import Config
from kvtier.errors import KvtierError
from kvtier.storage.catalog import BlockEntry, SequenceEntry, SessionEntry
from kvtier.storage.manager import TIER_NAMES, TierManager
from kvtier.storage.records import NAMESPACE_BYTES, BlockId, Namespace

SequenceKey = tuple[bytes, int]
"""(namespace, sequence number): how the catalog names a sequence."""


class NoStore(KvtierError):
    """The data directory holds no store (the tools never create one)."""


def open_store(config: Config) -> TierManager:
    """The store of ``config.data_path``, exclusively, without a background worker, and without
    demoting to ``config``'s budgets (which may not be the server's)."""
    if not (config.data_path / "catalog" / "data.mdb").exists():
        raise NoStore(f"no kvtier store at {config.data_path} (give the server's --config or "
                      f"--data-dir)")
    return TierManager(config, background=False, balance_on_open=False)


def tier_index(name: str) -> int:
    try:
        return TIER_NAMES.index(name)
    except ValueError:
        raise ValueError(f"no tier {name!r}; tiers are {', '.join(TIER_NAMES)}") from None


def block_name(block: BlockId) -> str:
    """``NSPREFIX:SEQUENCE:BLOCK``, the prefix being the namespace's first 4 bytes in hex
    (``1a2b3c4d:7:0``)."""
    return f"{block.namespace.hex()[:8]}:{block.sequence}:{block.block}"


def parse_block(text: str, namespaces: set[bytes], stored: Collection[BlockId] = ()
                ) -> BlockId:
    """A block id from ``NSPREFIX:SEQUENCE:BLOCK`` (any unambiguous hex prefix of the namespace)
    or ``SEQUENCE:BLOCK`` (when one namespace, or one of the ``stored`` blocks, fits)."""
    parts = text.split(":")
    try:
        if len(parts) == 2:
            prefix, sequence, block = "", int(parts[0]), int(parts[1])
        elif len(parts) == 3:
            prefix, sequence, block = parts[0].lower(), int(parts[1]), int(parts[2])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"expected [NSPREFIX:]SEQUENCE:BLOCK, got {text!r}") from None
    matches = [ns for ns in namespaces if ns.hex().startswith(prefix)]
    if len(matches) > 1 and stored:
        matches = [ns for ns in matches if BlockId(Namespace(ns), sequence, block) in stored]
    if len(matches) != 1:
        what = "no namespace" if not matches else f"{len(matches)} namespaces"
        raise ValueError(f"{what} of this store match {text!r}; give a longer namespace prefix")
    return BlockId(Namespace(matches[0]), sequence, block)


def describe_namespace(description: bytes) -> Any:
    """A namespace's registered fingerprint for display: JSON if it is JSON, else text, else hex."""
    try:
        text = description.decode()
    except UnicodeDecodeError:
        return description.hex()
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass(slots=True)
class StoreView:
    """Everything the catalog holds, read at one moment (block entries from the manager's mirror,
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
    def load(cls, manager: TierManager) -> StoreView:
        blocks = manager.blocks()
        with manager.catalog.read() as txn:
            sequences = {(s.namespace, s.sequence): s for s in txn.iter_sequences()}
            sessions = {s.session_id: s for s in txn.iter_sessions()}
            hashes = dict(txn.iter_hashes())
        namespaces = dict(manager.namespaces())
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


def namespace_prefix(namespace: bytes) -> str:
    return namespace[:NAMESPACE_BYTES].hex()[:8]
