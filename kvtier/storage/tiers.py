"""Storage tiers: their names (:class:`Tier`), one small interface (:class:`TierStore`), an LMDB
implementation (warm) and a RocksDB one (cool, cold).

A tier store holds opaque record bytes under record keys. It knows nothing of budgets, encodings or
the catalog: the tier manager holds the stores in tier order and never reaches inside one.

Every failure of the storage engines underneath is typed here, once: a read that LMDB or RocksDB
cannot serve (a checksum mismatch in an SST or blob file, a missing file, an I/O error) is a
:class:`BlockCorrupt`, a key walk over damaged files a :class:`TierDamaged`, a write refused (a full
disk) a :class:`WriteFailed`, and files that cannot be opened a :class:`TierDamaged` before anything
is mapped: an LMDB file shorter than its meta page says would SIGBUS the process when touched.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TypeVar

import lmdb
from rocksdict import (AccessType, BottommostLevelCompaction, CompactOptions, DBCompressionType,
                       Options, Rdict, WriteBatch)

from kvtier.errors import BlockCorrupt, KvtierError, TierDamaged, TierFull, WriteFailed

LMDB_PAGE = 4096
WRITE_BUFFER_BYTES = 16 << 20
"""RocksDB's memtable size per column family (its default is 64 MiB)."""
T = TypeVar("T")


class Tier(IntEnum):
    """The storage tiers below the hot one, fastest first. The value is what the catalog stores."""

    WARM = 0
    COOL = 1
    COLD = 2

    @property
    def label(self) -> str:
        """``warm``, ``cool`` or ``cold``: the name in stats, the CLI and the docs."""
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Tier:
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"no tier {label!r}; tiers are "
                             f"{', '.join(t.label for t in cls)}") from None


class TierStore(ABC):
    """get / put_many / contains / delete / close, plus key iteration for the checker."""

    name: str

    @abstractmethod
    def get(self, key: bytes) -> bytes | None: ...

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    def read_many(self, keys: Sequence[bytes],
                  use: Callable[[list[bytes | memoryview | None]], T]) -> T:
        """``use`` the values of ``keys``, which are valid only during the call (zero-copy
        buffers where the tier has them); ``use`` must not write to this tier."""
        return use(list(self.get_many(keys)))

    @abstractmethod
    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Write all items or none; raise :class:`TierFull` when the tier has no room."""

    def contains(self, key: bytes) -> bool:
        return self.get(key) is not None

    @abstractmethod
    def delete(self, keys: Sequence[bytes]) -> None: ...

    @abstractmethod
    def keys(self) -> Iterator[bytes]:
        """Every key, in order; for the invariant checker and inspection, not the hot path."""

    @abstractmethod
    def disk_bytes(self) -> int:
        """Bytes the tier's files take on disk."""

    def stored_bytes(self, value_len: int) -> int:
        """Bytes a value of ``value_len`` bytes costs against the tier's budget."""
        return value_len

    def compact(self) -> None:
        """Give free space back to the file system, where the tier can."""

    def recover(self) -> None:
        """Make the tier take writes again after a failed one, where it needs to be told."""

    @abstractmethod
    def close(self) -> None: ...


def damaged_name(path: Path) -> Path:
    """Where a damaged tier (or catalog) is moved aside: its name, ``.damaged-``, a UTC time."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    return candidate


def move_aside(path: Path) -> Path:
    """Rename a damaged directory out of the way (never delete it: its owner may want it back)
    and return its new name."""
    target = damaged_name(path)
    os.replace(path, target)
    return target


_LMDB_META = struct.Struct("<I4xQ")           # mm_magic, mm_address skipped, mm_mapsize
_LMDB_LAST = struct.Struct("<QQ")             # mm_last_pg, mm_txnid
_LMDB_MAGIC = 0xBEEFC0DE


def lmdb_file_problem(path: Path) -> str | None:
    """Why the LMDB environment in ``path`` must not be mapped, or None (absent or empty is
    fine: it is created). Reads the two meta pages with plain file reads and checks that the
    file holds every page the newest valid one says is in use, so that a truncated file is
    never touched through the map (where reading past its end is a SIGBUS, not an error)."""
    data = Path(path) / "data.mdb"
    try:
        size = data.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with open(data, "rb") as f:
        head = f.read(16 + 160)
        best: tuple[int, int, int] | None = None      # txnid, last page, page size
        for meta in range(2):
            page_size = LMDB_PAGE
            if meta == 1:
                if best is None:
                    return f"{data}: no valid LMDB meta page ({size} bytes)"
                page_size = best[2]
                f.seek(page_size)
                head = f.read(16 + 160)
            if len(head) < 16 + 152:
                continue
            magic, _ = _LMDB_META.unpack_from(head, 16)
            if magic != _LMDB_MAGIC:
                continue
            psize = struct.unpack_from("<I", head, 40)[0]
            last_pg, txnid = _LMDB_LAST.unpack_from(head, 136)
            if psize < 512 or psize & (psize - 1):
                continue
            if best is None or txnid > best[0]:
                best = (txnid, last_pg, psize)
    if best is None:
        return f"{data}: no valid LMDB meta page ({size} bytes)"
    _, last_pg, psize = best
    need = (last_pg + 1) * psize
    if size < need:
        return f"{data} is truncated: {size} bytes, its meta page uses {need}"
    return None


def open_lmdb(path: Path, **kwargs: object) -> lmdb.Environment:
    """``lmdb.open`` after :func:`lmdb_file_problem`'s check, and a read of its root: a file
    that fails either raises :class:`TierDamaged` (nothing was mapped in the first case)."""
    problem = lmdb_file_problem(path)
    if problem is not None:
        raise TierDamaged(problem)
    try:
        env = lmdb.open(str(path), **kwargs)
    except lmdb.Error as exc:
        raise TierDamaged(f"{path}: {exc}") from exc
    try:
        env.stat()
        with env.begin() as txn:
            txn.cursor().first()
    except lmdb.Error as exc:
        env.close()
        raise TierDamaged(f"{path}: {exc}") from exc
    return env


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (allocated blocks, so sparse files count what
    they use); 0 if it does not exist."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


@dataclass(frozen=True, slots=True)
class LmdbFileStats:
    file_bytes: int
    """Bytes of the data file (up to its last used page)."""
    free_bytes: int
    """Free pages and the free list's own pages: what a compacted copy would not have."""


@dataclass(frozen=True, slots=True)
class RocksFileStats:
    files_bytes: int
    """Bytes of the column family's SST and blob files."""
    blob_garbage_bytes: int
    """Payloads deleted from blob files that still hold their space."""
    pending_deletes: int
    """Deletes still in the memtables (their payloads become blob garbage once compacted)."""


class LmdbTier(TierStore):
    """The warm tier: a memory-mapped LMDB environment whose map size is the host RAM budget."""

    def __init__(self, path: Path, map_size: int, name: str = "warm") -> None:
        self.name = name
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # The warm tier is a cache of blocks whose catalog entries are written (synced) after them:
        # a system crash can only lose data the catalog repair treats as missing, so skip fsync.
        self.map_size = map_size
        self.env = self._open_env()

    def _open_env(self) -> lmdb.Environment:
        return open_lmdb(self.path, map_size=self.map_size, max_dbs=1, sync=False,
                         metasync=False, readahead=False, lock=True)

    def get(self, key: bytes) -> bytes | None:
        try:
            with self.env.begin() as txn:
                return txn.get(key)
        except lmdb.Error as exc:
            raise BlockCorrupt(f"{self.name}: {exc}") from exc

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        try:
            with self.env.begin() as txn:
                return [txn.get(k) for k in keys]
        except lmdb.Error as exc:
            raise BlockCorrupt(f"{self.name}: {exc}") from exc

    def read_many(self, keys: Sequence[bytes],
                  use: Callable[[list[bytes | memoryview | None]], T]) -> T:
        # Buffers point into the memory map: valid while the read transaction is open.
        with self.env.begin(buffers=True) as txn:
            try:
                values = [txn.get(k) for k in keys]
            except lmdb.Error as exc:
                raise BlockCorrupt(f"{self.name}: {exc}") from exc
            return use(values)

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        try:
            with self.env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value)
        except lmdb.MapFullError:
            raise TierFull(f"{self.name}: LMDB map of {self.map_size} bytes is full") from None
        except lmdb.Error as exc:
            raise WriteFailed(f"{self.name}: {exc}") from exc

    def contains(self, key: bytes) -> bool:
        with self.env.begin(buffers=True) as txn:
            return txn.get(key) is not None

    def delete(self, keys: Sequence[bytes]) -> None:
        try:
            with self.env.begin(write=True) as txn:
                for key in keys:
                    txn.delete(key)
        except lmdb.Error as exc:
            raise WriteFailed(f"{self.name}: {exc}") from exc

    def keys(self) -> Iterator[bytes]:
        try:
            with self.env.begin() as txn:
                cursor = txn.cursor()
                for key in cursor.iternext(keys=True, values=False):
                    yield bytes(key)
        except lmdb.Error as exc:
            raise TierDamaged(f"{self.name}: {exc}") from exc

    def stored_bytes(self, value_len: int) -> int:
        # Values this large live on overflow pages; a page header comes first.
        return -(-(value_len + 16) // LMDB_PAGE) * LMDB_PAGE

    def disk_bytes(self) -> int:
        return dir_bytes(self.path)

    def file_stats(self) -> LmdbFileStats:
        """The data file's size and the part of it a compacted copy would not have."""
        info, stat = self.env.info(), self.env.stat()
        pages = info["last_pgno"] + 1
        used = 2 + stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        return LmdbFileStats(pages * stat["psize"], max(0, pages - used) * stat["psize"])

    @property
    def scratch_path(self) -> Path:
        """Where :meth:`compact` writes its copy; a leftover one is stale and may be removed."""
        return self.path.with_name(self.path.name + ".compact")

    def compact(self) -> None:
        """Swap a compacted copy of the environment in for its data file, so the file shrinks.

        The copy is written to :attr:`scratch_path`, synced, checked to hold every entry, and
        renamed over ``data.mdb`` while the environment is closed (LMDB must never have its file
        replaced under an open environment). A kill before the rename leaves the old file and a
        stale scratch directory; after it, the new file. Both hold the same records.
        """
        scratch = self.scratch_path
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        self.env.copy(str(scratch), compact=True)
        copied = scratch / "data.mdb"
        _fsync(copied)
        entries = self.env.stat()["entries"]
        check = open_lmdb(scratch, map_size=self.map_size, max_dbs=1, readonly=True, lock=False)
        try:
            if check.stat()["entries"] != entries:
                raise KvtierError(f"the compacted copy of {self.path} lost entries; kept the old")
        finally:
            check.close()
        self.env.close()
        try:
            os.replace(copied, self.path / "data.mdb")
            _fsync(self.path)
        finally:
            self.env = self._open_env()
        shutil.rmtree(scratch, ignore_errors=True)

    def close(self) -> None:
        self.env.close()


class RocksStore:
    """One RocksDB database, holding one column family per tier that lives at its path."""

    def __init__(self, path: Path, column_families: Sequence[str], read_only: bool = False
                 ) -> None:
        """``read_only``: for a disk too full to open it for writing (RocksDB replays its log
        into new files when it opens); its writes then fail until it is reopened."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.column_families = list(column_families)
        self.read_only = read_only
        self.tiers: list[RocksTier] = []
        """The tiers using this store (reattached when it is reopened)."""
        self._open()
        self.lock = threading.Lock()

    def _open(self) -> None:
        options = self._options()
        try:
            existing = Rdict.list_cf(str(self.path), options) \
                if (self.path / "CURRENT").exists() else ["default"]
            wanted = set(existing) | set(self.column_families)
            access = AccessType.read_only() if self.read_only else AccessType.read_write()
            self.db = Rdict(str(self.path), options=options, access_type=access,
                            column_families={cf: self._options() for cf in wanted
                                             if cf != "default"})
        except Exception as exc:  # rocksdict raises bare Exceptions: Corruption, IO error, ...
            raise TierDamaged(f"{self.path}: {exc}") from exc

    def reopen(self) -> None:
        """Close and open the database again: after a failed write (a full disk) RocksDB
        refuses every write until it is reopened, even once there is room again."""
        for tier in self.tiers:
            tier.cf = tier.cf_handle = None
        try:
            self.db.close()
        except Exception:  # it reports the write error again; the files are released anyway
            pass
        self.db = None
        self.read_only = False
        try:
            self._open()
        except TierDamaged:
            # Still no room to open for writing (RocksDB writes as it opens): keep reading.
            self.read_only = True
            self._open()
            raise
        finally:
            if self.db is not None:
                for tier in self.tiers:
                    tier.attach()

    @staticmethod
    def _options() -> Options:
        opt = Options(raw_mode=True)
        opt.create_if_missing(True)
        opt.create_missing_column_families(True)
        # Values are already zstd-compressed, ~50 KB each: keep them out of the LSM tree in blob
        # files so compactions move keys, not payloads, and do not compress them again.
        opt.set_enable_blob_files(True)
        opt.set_min_blob_size(4096)
        opt.set_enable_blob_gc(True)
        opt.set_compression_type(DBCompressionType.none())
        opt.set_blob_compression_type(DBCompressionType.none())
        opt.set_keep_log_file_num(2)
        # Payloads sit in the write-ahead log until their memtable is flushed: bound both, so
        # that the files of a small budget are not mostly log (the balancer flushes sooner).
        opt.set_write_buffer_size(WRITE_BUFFER_BYTES)
        opt.set_max_total_wal_size(2 * WRITE_BUFFER_BYTES)
        return opt

    def close(self) -> None:
        try:
            self.db.close()
        except Exception as exc:  # a write error it still holds: the WAL replays at next open
            raise WriteFailed(f"{self.path}: {exc}") from exc
        finally:
            self.db = None


class RocksTier(TierStore):
    """The cool (local SSD) and cold (NFS/HDD) tiers: a column family of a RocksDB database."""

    def __init__(self, store: RocksStore, column_family: str) -> None:
        self.name = column_family
        self.store = store
        store.tiers.append(self)
        self.attach()

    def attach(self) -> None:
        self.cf = self.store.db.get_column_family(self.name)
        self.cf_handle = self.store.db.get_column_family_handle(self.name)

    def recover(self) -> None:
        self.store.reopen()

    # rocksdict raises bare Exceptions ("Corruption: Blob CRC mismatch", "IO error: ..."), so
    # each call into it is wrapped alone.
    def get(self, key: bytes) -> bytes | None:
        try:
            return self.cf.get(key)
        except Exception as exc:
            raise BlockCorrupt(f"{self.name}: {exc}") from exc

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            return list(self.cf.get(list(keys)))
        except Exception as exc:
            raise BlockCorrupt(f"{self.name}: {exc}") from exc

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        batch = WriteBatch(raw_mode=True)
        for key, value in items:
            batch.put(key, value, self.cf_handle)
        self._write(batch)

    def _write(self, batch: WriteBatch) -> None:
        try:
            self.store.db.write(batch)
        except Exception as exc:
            raise WriteFailed(f"{self.name}: {exc}") from exc

    def contains(self, key: bytes) -> bool:
        try:
            return self.cf.key_may_exist(key) and self.cf.get(key) is not None
        except Exception as exc:
            raise BlockCorrupt(f"{self.name}: {exc}") from exc

    def delete(self, keys: Sequence[bytes]) -> None:
        batch = WriteBatch(raw_mode=True)
        for key in keys:
            batch.delete(key, self.cf_handle)
        self._write(batch)

    def keys(self) -> Iterator[bytes]:
        """Every key; :class:`TierDamaged` where the walk meets a damaged file (rocksdict's own
        ``keys()`` just stops there, which would look like an empty tier)."""
        it = self.cf.iter()
        it.seek_to_first()
        while it.valid():
            yield bytes(it.key())
            it.next()
        try:
            it.status()
        except Exception as exc:
            raise TierDamaged(f"{self.name}: {exc}") from exc

    def disk_bytes(self) -> int:
        return dir_bytes(self.store.path)

    def compact(self) -> None:
        """Compact the column family, then collect blob garbage if payloads are still held.

        A manual compaction relocates only the blobs of the oldest quarter of blob files, so
        payloads deleted from newer ones keep their disk space: a second, forced compaction with
        an age cutoff over every blob file reclaims them. The cutoff goes back to RocksDB's
        default afterwards; the force threshold is never lowered instead: at 0 RocksDB compacts
        in an endless loop. On a compacted column family this rewrites nothing.
        """
        self.cf.compact_range(None, None)
        if not self.file_stats().blob_garbage_bytes:
            return
        options = CompactOptions()
        options.set_bottommost_level_compaction(BottommostLevelCompaction.force())
        self.cf.set_options({"blob_garbage_collection_age_cutoff": "1.0"})
        try:
            self.cf.compact_range(None, None, options)
        finally:
            self.cf.set_options({"blob_garbage_collection_age_cutoff": "0.25"})

    def log_bytes(self) -> int:
        """Bytes of the store's write-ahead logs (shared by its column families)."""
        total = 0
        for entry in os.scandir(self.store.path):
            if entry.name.endswith(".log"):
                try:
                    total += entry.stat().st_size
                except FileNotFoundError:
                    pass
        return total

    def flush(self) -> None:
        """Write the memtable out (into blob and SST files), so its log can go."""
        try:
            self.cf.flush()
        except Exception as exc:
            raise WriteFailed(f"{self.name}: {exc}") from exc

    def file_stats(self) -> RocksFileStats:
        """The column family's files, the garbage in them, and deletes not yet compacted."""
        def prop(name: str) -> int:
            return self.cf.property_int_value(f"rocksdb.{name}") or 0

        return RocksFileStats(
            prop("total-sst-files-size") + prop("total-blob-file-size"),
            prop("live-blob-file-garbage-size"),
            prop("num-deletes-active-mem-table") + prop("num-deletes-imm-mem-tables"))

    def close(self) -> None:
        """Drop the column family; its store is closed by its owner (it may hold others).

        rocksdict keeps the database open, and its LOCK held, while a column family object
        lives, so this must run before the store's close."""
        self.cf = None
        self.cf_handle = None
        if self in self.store.tiers:
            self.store.tiers.remove(self)
