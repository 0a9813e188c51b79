"""The persistent catalog: where every block lives, which sequences and sessions use it.

An LMDB environment of its own (``<data_dir>/catalog``), synced on commit, with named databases:

    meta       format version, next sequence id, clean-shutdown flag, namespaces' fingerprints
    blocks     BlockId bytes            → BlockEntry (msgpack)
    hashes     namespace | chain hash   → BlockId bytes of the one stored copy of that full block
    sequences  namespace | sequence u64 → SequenceEntry (msgpack)
    sessions   session id (utf-8)       → SessionEntry (msgpack)
    summaries  BlockId bytes            → the block's key summary (:class:`KeySummary` bytes)

The catalog knows where blocks are; the codec knows their bytes. Block data is always written
before the catalog entry that points at it, and deleted only after the entry's removal commits.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import numpy as np

from kvtier.errors import TierDamaged, WriteFailed
from kvtier.storage.records import BlockId, ChainHash, Namespace
from kvtier.storage.tiers import Tier, move_aside, open_lmdb

CATALOG_VERSION = 1
_U64 = struct.Struct(">Q")
DATABASES = (b"meta", b"blocks", b"hashes", b"sequences", b"sessions", b"summaries")


@dataclass(frozen=True, slots=True)
class BlockEntry:
    """What the catalog knows of one block (all its layers)."""

    tier: Tier
    """Where the block's records are (stored as the tier's int)."""
    stored_bytes: int
    """Bytes the block costs against its tier's budget."""
    raw_bytes: int
    """Bytes of the block as llama.cpp holds it (for compression ratios)."""
    n_layers: int
    n_tokens: int
    refs: int = 1
    """Sequences whose block lists name this block."""
    chain: bytes = b""
    """Chain hash of a full, shared block; empty for a sequence's partial tail."""
    created: float = 0.0
    last_access: float = 0.0
    hits: float = 0.0
    """Hit count decayed with ``eviction.hit_half_life_s`` as of ``last_access``."""
    attention: float = -1.0
    """Measured attention score; negative until the engine reports one."""
    position: int = -1
    """The position of the block's first token when its keys were computed (keys are cached
    after RoPE); -1: its own position in its sequence (block index x block size)."""
    parent: bytes = b""
    """For a sequence's partial tail block: the chain hash of the full block before it (empty
    when the tail is the sequence's first block)."""
    tail_chain: bytes = b""
    """For a sequence's partial tail block: the chain hash of its tokens after ``parent``, by
    which a prompt that continues them finds it (:meth:`TierManager.match_tail`). Empty for full
    blocks, and for tails that no saved sequence has named yet."""

    def pack(self) -> bytes:
        return msgpack.packb([int(self.tier), *astuple(self)[1:]])

    @classmethod
    def unpack(cls, data: bytes) -> BlockEntry:
        tier, *rest = msgpack.unpackb(data)
        return cls(Tier(tier), *rest)


@dataclass(frozen=True, slots=True)
class SequenceEntry:
    """A stored token sequence: its tokens and the blocks (possibly shared) that hold its KV."""

    namespace: bytes
    sequence: int
    tokens: bytes
    """Token ids as little-endian int32."""
    blocks: tuple[bytes, ...]
    """BlockId bytes, in order; full blocks first, then at most one partial tail block."""
    created: float
    updated: float

    def pack(self) -> bytes:
        return msgpack.packb([self.namespace, self.sequence, self.tokens, list(self.blocks),
                              self.created, self.updated])

    @classmethod
    def unpack(cls, data: bytes) -> SequenceEntry:
        ns, seq, tokens, blocks, created, updated = msgpack.unpackb(data)
        return cls(ns, seq, tokens, tuple(blocks), created, updated)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) // 4

    def block_ids(self) -> list[BlockId]:
        return [BlockId.from_bytes(b) for b in self.blocks]


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """A named conversation: its sequence and whatever the engine keeps about it."""

    session_id: str
    namespace: bytes
    sequence: int
    created: float
    last_used: float
    data: dict[str, Any] = field(default_factory=dict)
    """Engine-owned metadata (messages, model name, ...), msgpack-able."""

    def pack(self) -> bytes:
        return msgpack.packb([self.session_id, self.namespace, self.sequence, self.created,
                              self.last_used, self.data])

    @classmethod
    def unpack(cls, data: bytes) -> SessionEntry:
        return cls(*msgpack.unpackb(data))


@dataclass(frozen=True, slots=True)
class KeySummary:
    """Per layer, the per-channel minimum and maximum of a block's keys (f16), and a few
    representative keys: what a query-aware working set scores a block by without reading it."""

    bounds: np.ndarray
    """float16, shape (layers, 2, width): ``[:, 0]`` minima, ``[:, 1]`` maxima."""
    representatives: np.ndarray | None = None
    """float16, shape (layers, n, width): keys that stand for the block's (see
    :mod:`kvtier.storage.summary`); None in summaries stored before they were kept."""

    _HEAD = struct.Struct("<HI")
    _REPS = struct.Struct("<H")

    def pack(self) -> bytes:
        layers, _, width = self.bounds.shape
        data = self._HEAD.pack(layers, width) + np.ascontiguousarray(
            self.bounds, dtype="<f2").tobytes()
        if self.representatives is not None:
            data += self._REPS.pack(self.representatives.shape[1]) + np.ascontiguousarray(
                self.representatives, dtype="<f2").tobytes()
        return data

    @classmethod
    def unpack(cls, data: bytes) -> KeySummary:
        layers, width = cls._HEAD.unpack_from(data)
        end = cls._HEAD.size + 2 * layers * 2 * width
        bounds = np.frombuffer(data, dtype="<f2", count=layers * 2 * width, offset=cls._HEAD.size)
        representatives = None
        if len(data) > end:     # older summaries end after the bounds
            (n,) = cls._REPS.unpack_from(data, end)
            representatives = np.frombuffer(data, dtype="<f2", count=layers * n * width,
                                            offset=end + cls._REPS.size).reshape(layers, n, width)
        return cls(bounds.reshape(layers, 2, width), representatives)


def sequence_key(namespace: bytes, sequence: int) -> bytes:
    return namespace + _U64.pack(sequence)


class CatalogTxn:
    """Typed access to the catalog inside one LMDB transaction."""

    def __init__(self, catalog: Catalog, txn: lmdb.Transaction,
                 hooks: list[Callable[[], None]] | None = None) -> None:
        self._c = catalog
        self._txn = txn
        self._hooks = hooks

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once this write transaction has committed (never if it aborts): where
        record data whose entry this transaction removes is deleted."""
        if self._hooks is None:
            raise TypeError("a read transaction never commits")
        self._hooks.append(fn)

    # blocks
    def get_block(self, block: BlockId) -> BlockEntry | None:
        data = self._txn.get(block.to_bytes(), db=self._c.blocks_db)
        return BlockEntry.unpack(data) if data is not None else None

    def put_block(self, block: BlockId, entry: BlockEntry) -> None:
        self._txn.put(block.to_bytes(), entry.pack(), db=self._c.blocks_db)

    def delete_block(self, block: BlockId) -> None:
        self._txn.delete(block.to_bytes(), db=self._c.blocks_db)

    def iter_blocks(self) -> Iterator[tuple[BlockId, BlockEntry]]:
        cursor = self._txn.cursor(db=self._c.blocks_db)
        for key, value in cursor:
            yield BlockId.from_bytes(key), BlockEntry.unpack(value)

    # key summaries
    def get_summary(self, block: BlockId) -> KeySummary | None:
        data = self._txn.get(block.to_bytes(), db=self._c.summaries_db)
        return KeySummary.unpack(data) if data is not None else None

    def put_summary(self, block: BlockId, summary: KeySummary) -> None:
        self._txn.put(block.to_bytes(), summary.pack(), db=self._c.summaries_db)

    def delete_summary(self, block: BlockId) -> None:
        self._txn.delete(block.to_bytes(), db=self._c.summaries_db)

    # content hashes of shared full blocks
    def find_hash(self, namespace: Namespace, chain: ChainHash) -> BlockId | None:
        data = self._txn.get(namespace + chain, db=self._c.hashes_db)
        return BlockId.from_bytes(data) if data is not None else None

    def put_hash(self, namespace: Namespace, chain: ChainHash, block: BlockId) -> None:
        self._txn.put(namespace + chain, block.to_bytes(), db=self._c.hashes_db)

    def delete_hash(self, namespace: Namespace, chain: bytes) -> None:
        self._txn.delete(namespace + chain, db=self._c.hashes_db)

    def iter_hashes(self) -> Iterator[tuple[bytes, BlockId]]:
        cursor = self._txn.cursor(db=self._c.hashes_db)
        for key, value in cursor:
            yield bytes(key), BlockId.from_bytes(value)

    # sequences
    def next_sequence(self) -> int:
        current = self._txn.get(b"next_seq", db=self._c.meta_db)
        value = _U64.unpack(current)[0] if current else 1
        self._txn.put(b"next_seq", _U64.pack(value + 1), db=self._c.meta_db)
        return value

    def get_sequence(self, namespace: bytes, sequence: int) -> SequenceEntry | None:
        data = self._txn.get(sequence_key(namespace, sequence), db=self._c.sequences_db)
        return SequenceEntry.unpack(data) if data is not None else None

    def put_sequence(self, entry: SequenceEntry) -> None:
        self._txn.put(sequence_key(entry.namespace, entry.sequence), entry.pack(),
                      db=self._c.sequences_db)

    def delete_sequence(self, namespace: bytes, sequence: int) -> None:
        self._txn.delete(sequence_key(namespace, sequence), db=self._c.sequences_db)

    def iter_sequences(self) -> Iterator[SequenceEntry]:
        cursor = self._txn.cursor(db=self._c.sequences_db)
        for _, value in cursor:
            yield SequenceEntry.unpack(value)

    # sessions
    def get_session(self, session_id: str) -> SessionEntry | None:
        data = self._txn.get(session_id.encode(), db=self._c.sessions_db)
        return SessionEntry.unpack(data) if data is not None else None

    def put_session(self, entry: SessionEntry) -> None:
        self._txn.put(entry.session_id.encode(), entry.pack(), db=self._c.sessions_db)

    def delete_session(self, session_id: str) -> None:
        self._txn.delete(session_id.encode(), db=self._c.sessions_db)

    def iter_sessions(self, after: str = "") -> Iterator[SessionEntry]:
        cursor = self._txn.cursor(db=self._c.sessions_db)
        if after:
            if not cursor.set_range(after.encode()):
                return
            if bytes(cursor.key()) == after.encode() and not cursor.next():
                return
        elif not cursor.first():
            return
        for _, value in cursor:
            yield SessionEntry.unpack(value)

    # meta
    def get_meta(self, name: bytes) -> bytes | None:
        return self._txn.get(name, db=self._c.meta_db)

    def put_meta(self, name: bytes, value: bytes) -> None:
        self._txn.put(name, value, db=self._c.meta_db)

    def iter_meta(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """``(name, value)`` of every meta entry whose name starts with ``prefix``, in order."""
        cursor = self._txn.cursor(db=self._c.meta_db)
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            yield bytes(key), bytes(value)


class Catalog:
    """The catalog's LMDB environment. Use :meth:`read` and :meth:`write` as context managers."""

    def __init__(self, path: Path, map_size: int = 4 * 1024**3) -> None:
        """Open (or create) the catalog; :class:`TierDamaged` if its file cannot be read."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = open_lmdb(self.path, map_size=map_size, max_dbs=8, readahead=False)
        try:
            self.meta_db, self.blocks_db, self.hashes_db, self.sequences_db, \
                self.sessions_db, self.summaries_db = (self.env.open_db(name)
                                                       for name in DATABASES)
            with self.write() as txn:
                version = txn.get_meta(b"version")
                if version is None:
                    txn.put_meta(b"version", _U64.pack(CATALOG_VERSION))
                elif _U64.unpack(version)[0] != CATALOG_VERSION:
                    raise RuntimeError(f"catalog format {_U64.unpack(version)[0]}, this kvtier "
                                       f"reads {CATALOG_VERSION}")
        except (lmdb.Error, WriteFailed) as exc:
            self.env.close()
            raise TierDamaged(f"{self.path}: {exc}") from exc

    def walk(self) -> None:
        """Read every entry of every database; :class:`TierDamaged` at the first that cannot
        be read or unpacked (a damaged page, random bytes in a value)."""
        walks = ((self.meta_db, None), (self.blocks_db, BlockEntry.unpack),
                 (self.hashes_db, None), (self.sequences_db, SequenceEntry.unpack),
                 (self.sessions_db, SessionEntry.unpack), (self.summaries_db, None))
        try:
            with self.env.begin() as txn:
                for db, unpack in walks:
                    for _, value in txn.cursor(db=db):
                        if unpack is not None:
                            unpack(value)
        except Exception as exc:  # lmdb's errors, or msgpack's / a dataclass's on bad bytes
            raise TierDamaged(f"{self.path}: {exc!r}") from exc

    @contextmanager
    def read(self) -> Iterator[CatalogTxn]:
        with self.env.begin() as txn:
            yield CatalogTxn(self, txn)

    @contextmanager
    def write(self) -> Iterator[CatalogTxn]:
        """A write transaction; it commits when the block ends, then runs its after-commit
        hooks in order. An exception aborts it, and no hook runs."""
        hooks: list[Callable[[], None]] = []
        try:
            with self.env.begin(write=True) as txn:
                yield CatalogTxn(self, txn, hooks)
        except lmdb.Error as exc:       # a full disk, an I/O error: nothing was written
            raise WriteFailed(f"catalog: {exc}") from exc
        for fn in hooks:
            fn()

    def was_clean(self) -> bool:
        with self.read() as txn:
            return txn.get_meta(b"clean") == b"1"

    def set_clean(self, clean: bool) -> None:
        with self.write() as txn:
            txn.put_meta(b"clean", b"1" if clean else b"0")

    def close(self) -> None:
        self.env.close()



def salvage(path: Path, map_size: int = 4 * 1024**3) -> tuple[Path, Catalog, dict[str, int]]:
    """Move a damaged catalog aside and build a new one at ``path`` from every entry of it that
    can still be read (its clean flag cleared, so the checker repairs the store around what was
    lost). Returns where the old one went, the new catalog and the entries kept per database.

    A truncated file is read from a copy padded with zeros to the size its meta page says, so
    that nothing is ever read past its end through the map. Where a database cannot be walked
    (a damaged branch page, or the page naming the databases), its entries are looked for page by
    page (:func:`_scan_pages`), newest copy first; sequence ids then continue after the largest
    one found."""
    moved = move_aside(Path(path))
    fresh = Catalog(path, map_size)
    kept: dict[str, int] = {}
    try:
        source = _readable_copy(moved)
    except (OSError, TierDamaged):
        source = None
    if source is not None:
        try:
            env = lmdb.open(str(source), map_size=map_size, max_dbs=8, readonly=True,
                            lock=False)
        except lmdb.Error:
            env = None
        if env is not None:
            try:
                kept = _copy_readable(env, fresh)
            finally:
                env.close()
        else:
            kept = {name.decode(): 0 for name in DATABASES}
        if any(kept[name] == 0 for name in ("blocks", "sequences", "sessions")):
            found = _scan_pages(source / "data.mdb")
            for name, items in found.items():
                if kept[name] == 0 and items:
                    db = fresh.env.open_db(name.encode())
                    with fresh.env.begin(write=True) as txn:
                        for key, value in items.items():
                            txn.put(key, value, db=db)
                    kept[name] = len(items)
        _continue_sequence_ids(fresh)
        _index_hashes(fresh)
        if source != moved:
            shutil.rmtree(source, ignore_errors=True)
    fresh.set_clean(False)
    return moved, fresh, kept


def _readable_copy(moved: Path) -> Path:
    """``moved`` itself, or a zero-padded copy of a truncated data file next to it."""
    from kvtier.storage.tiers import lmdb_file_problem
    problem = lmdb_file_problem(moved)
    if problem is None:
        return moved
    if "truncated" not in problem:
        raise TierDamaged(problem)
    copy = moved.with_name(moved.name + ".salvage")
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    shutil.copyfile(moved / "data.mdb", copy / "data.mdb")
    need = int(problem.rsplit(" uses ", 1)[1])
    os.truncate(copy / "data.mdb", need)
    return copy


def _copy_readable(env: lmdb.Environment, fresh: Catalog) -> dict[str, int]:
    kept: dict[str, int] = {}
    unpack = {b"blocks": BlockEntry.unpack, b"sequences": SequenceEntry.unpack,
              b"sessions": SessionEntry.unpack}
    for name in DATABASES:
        items: list[tuple[bytes, bytes]] = []
        try:
            db = env.open_db(name, create=False)
            with env.begin() as txn:
                for key, value in txn.cursor(db=db):
                    try:
                        if name in unpack:
                            unpack[name](value)
                    except Exception:  # one bad value: skip it, keep walking
                        continue
                    items.append((bytes(key), bytes(value)))
        except Exception:  # a damaged page ends this database's walk; keep what came before
            pass
        target = fresh.env.open_db(name)
        with fresh.env.begin(write=True) as txn:
            for key, value in items:
                if name == b"meta" and key in (b"version", b"clean"):
                    continue
                txn.put(key, value, db=target)
        kept[name.decode()] = len(items)
    return kept


_PAGE_HEAD = struct.Struct("<HHH")          # mp_flags, mp_lower, mp_upper (after pgno and pad)
_NODE_HEAD = struct.Struct("<HHHH")         # mn_lo, mn_hi (data size), mn_flags, mn_ksize
_P_LEAF, _P_OVERFLOW, _P_META, _P_LEAF2 = 0x02, 0x04, 0x08, 0x20
_F_BIGDATA, _F_SUBDATA, _F_DUPDATA = 0x01, 0x02, 0x04


def _leaf_nodes(data: bytes, psize: int) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) on every leaf page of an LMDB file's bytes, current or stale."""
    for page in range(2 * psize, len(data) - psize + 1, psize):
        flags, lower, upper = _PAGE_HEAD.unpack_from(data, page + 10)
        if flags & (_P_OVERFLOW | _P_META | _P_LEAF2) or not flags & _P_LEAF \
                or not 16 <= lower <= upper <= psize:
            continue
        for i in range((lower - 16) // 2):
            at = struct.unpack_from("<H", data, page + 16 + 2 * i)[0]
            if not upper <= at <= psize - 8:
                break
            lo, hi, node_flags, ksize = _NODE_HEAD.unpack_from(data, page + at)
            if node_flags & (_F_SUBDATA | _F_DUPDATA):
                continue
            start = page + at + 8
            key, size = data[start:start + ksize], lo | hi << 16
            if node_flags & _F_BIGDATA:
                overflow = struct.unpack_from("<Q", data, start + ksize)[0] * psize + 16
                value = data[overflow:overflow + size]
            else:
                value = data[start + ksize:start + ksize + size]
            if len(key) == ksize and len(value) == size:
                yield key, value


def _scan_pages(data_file: Path) -> dict[str, dict[bytes, bytes]]:
    """Catalog entries found page by page in a damaged file: blocks, hashes, sequences and
    sessions recognised by their keys and values (a value must unpack as its entry and agree with
    its key). Of several copies of one entry (pages of older transactions), the newest is kept."""
    from kvtier.storage.tiers import LMDB_PAGE
    try:
        data = data_file.read_bytes()
    except OSError:
        return {}
    found: dict[str, dict[bytes, bytes]] = {"blocks": {}, "hashes": {}, "sequences": {},
                                             "sessions": {}}
    stamps: dict[tuple[str, bytes], float] = {}

    def keep(name: str, key: bytes, value: bytes, stamp: float) -> None:
        if stamps.get((name, key), -1.0) < stamp:
            stamps[name, key] = stamp
            found[name][key] = value

    for key, value in _leaf_nodes(data, LMDB_PAGE):
        try:
            if len(key) == BlockId.BYTES:
                entry = BlockEntry.unpack(value)
                keep("blocks", key, value, entry.last_access)
            elif len(key) == BlockId.BYTES + 4 and len(value) == BlockId.BYTES \
                    and value[:16] == key[:16]:
                keep("hashes", key, value, 0.0)
            elif len(key) == 24 and (seq := SequenceEntry.unpack(value)) is not None \
                    and sequence_key(seq.namespace, seq.sequence) == key:
                keep("sequences", key, value, seq.updated)
            elif (session := SessionEntry.unpack(value)).session_id.encode() == key:
                keep("sessions", key, value, session.last_used)
        except Exception:  # not an entry of that kind: another database's, or damaged bytes
            continue
    return found


def _index_hashes(catalog: Catalog) -> None:
    """Give every salvaged full block the hash-index entry that leads to it, where none does
    (the index is derived from the blocks' chain hashes, so it can be rebuilt from them)."""
    with catalog.write() as txn:
        for block, entry in list(txn.iter_blocks()):
            if entry.chain and txn.find_hash(block.namespace, ChainHash(entry.chain)) is None:
                txn.put_hash(block.namespace, ChainHash(entry.chain), block)


def _continue_sequence_ids(catalog: Catalog) -> None:
    """Make the next sequence id follow every sequence id the salvaged entries use."""
    with catalog.write() as txn:
        top = 0
        for block, _ in txn.iter_blocks():
            top = max(top, block.sequence)
        for seq in txn.iter_sequences():
            top = max(top, seq.sequence)
        for session in txn.iter_sessions():
            top = max(top, session.sequence)
        current = txn.get_meta(b"next_seq")
        if current is None or _U64.unpack(current)[0] <= top:
            txn.put_meta(b"next_seq", _U64.pack(top + 1))
