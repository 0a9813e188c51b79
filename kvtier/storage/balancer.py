"""The balancer: tier budgets, demotion, promotion, drops, and the background worker.

A block is moved in three steps, and only the first and the last take the index's lock:

1. **claim** it (under the lock): the eviction policy chooses victims among blocks that are neither
   pinned nor moving, and each becomes a :class:`~kvtier.storage.index.Move`;
2. **copy** it (no lock): read its records from the source tier, re-encode them for the
   destination (e.g. warm Q8 → cool Q4 + zstd) and write them there, after reserving the room;
3. **commit** (under the lock): if the block is still where it was and not pinned, the catalog entry
   naming the new tier commits, the index follows, and the source records are deleted. Otherwise
   the move is abandoned and the copy deleted.

So a block stays readable in its source tier until its new entry commits, a pinned block (a
restore reads pinned blocks without the lock) is never moved or deleted under its reader, and the
engine's ``put_block`` and ``find_hash`` wait for the lock only while a pass chooses or commits,
never while it re-encodes. Writes reserve their room first, so after any public call no tier holds
more than its budget. When the cold tier is full the least valuable blocks are dropped and counted.

Budgets bound the disk, not just the bytes kvtier counts: a budget is capped by the free space of
its file system (at start, with a warning, and again whenever the worker looks), and a RocksDB
tier whose files (SST and blob files, garbage included) outgrow its budget is compacted, then
demoted further, so ``du`` stays near the budget. A write the disk refuses is counted
(``write_errors``) and logged once until writes work again.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from enum import Enum

from kvtier.errors import STORAGE_FAULTS, BlockCorrupt, TierFull, WriteFailed
from kvtier.storage import codec, policy, workers
from kvtier.storage.codec import RecordFormat
from kvtier.storage.index import Move
from kvtier.storage.placement import Placement
from kvtier.storage.records import BlockId
from kvtier.storage.tiers import RocksTier, Tier

log = logging.getLogger(__name__)

LOW_WATERMARK = 0.85
"""The background worker demotes until a tier is below this fraction of its budget."""
MOVE_WAIT_S = 0.5
"""How long a write that needs room waits for demotions in flight before it looks again."""
LAST = max(Tier)
FREE_SHARE = 0.8
"""Of the room a tier has on its disk, the part its budget may count: its files hold more than
the bytes counted (RocksDB's log, indexes and garbage before compaction, LMDB's free pages)."""
HEADROOM = 0.05
HEADROOM_MAX = 64 << 20
"""Free space kept on a tier's file system (this share of its size, at most HEADROOM_MAX): room
for RocksDB's compactions and for whatever else uses the disk."""
FILES_SLACK = 1.25
"""A RocksDB tier whose files exceed its budget by this factor is compacted (blob garbage
collected) before more is demoted."""
FILES_OVERHEAD = 1 << 20
"""Bytes a RocksDB tier's files may hold beyond :data:`FILES_SLACK` times its budget before it is
demoted further: SST indexes and blob file headers, which do not shrink with the data."""
BUDGET_RECHECK_S = 10.0
BOUND_FILES_S = 0.5
"""How often, at most, a demotion or promotion looks at RocksDB's files (:meth:`bound_files`
lists the store's directory and reads its properties: run for every promotion of a restore's
blocks, that took the GIL from the restore, 12-16% of a cool one's time)."""
RETRY_S = 2.0
"""How often a tier whose writes fail is given another chance (and free space looked at)."""


class Op(Enum):
    """What the background worker is asked to do."""

    BALANCE = "balance"
    """Demote every tier to its low watermark."""
    PROMOTE = "promote"
    """Move a block read from below warm up to warm, then balance."""
    FLUSH = "flush"
    """Write access statistics to the catalog."""
    STOP = "stop"


class Balancer:
    """Keeps every tier within its budget, by the eviction policy."""

    def __init__(self, placement: Placement, budgets: Mapping[Tier, int],
                 formats: Mapping[Tier, RecordFormat], weights: policy.Weights) -> None:
        self._p = placement
        self.index = placement.index
        self.tiers = placement.tiers
        self.configured = dict(budgets)
        """The budgets as configured; :attr:`budgets` are those capped by free space."""
        self.budgets = dict(budgets)
        self.formats = dict(formats)
        self._failing: dict[Tier, str] = {}
        self._failed_at: dict[Tier, float] = {}
        self._last_recheck = 0.0
        self._last_bound = 0.0
        self.weights = weights
        self._queue: queue.Queue[tuple[Op, BlockId | None]] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._promoting: dict[BlockId, int] = {}
        """Blocks with a promotion queued, and their bytes as llama.cpp holds them (asked
        again, a block is not queued twice)."""
        self._stopping = threading.Event()

    # -- the worker -------------------------------------------------------------------------------
    def start(self) -> None:
        """Run operations on a background thread from now on (else on the caller's)."""
        self._worker = threading.Thread(target=self._work, name="kvtier-tiers", daemon=True)
        self._worker.start()

    def schedule(self, op: Op, block: BlockId | None = None) -> None:
        if self._worker is None:
            self._run(op, block)
            return
        if op is Op.PROMOTE:
            with self.index.lock:
                entry = self.index.get(block)
                if block in self._promoting or entry is None:
                    return
                self._promoting[block] = entry.raw_bytes
        self._queue.put((op, block))

    def queued_promotion_bytes(self) -> int:
        """Bytes (as llama.cpp holds them) of the blocks waiting to be promoted."""
        with self.index.lock:
            return sum(self._promoting.values())

    def drain(self) -> None:
        """Wait until the background worker has done everything queued so far."""
        if self._worker is not None:
            self._queue.join()

    def stop(self) -> None:
        """Stop the worker promptly: the block being moved is finished or abandoned, queued
        promotions and balancing are dropped (they are hints; budgets are enforced again on the
        next open's first write), so a shutdown does not wait for a backlog of moves."""
        if self._worker is not None:
            self._stopping.set()
            self._queue.put((Op.STOP, None))
            self._worker.join()
            self._worker = None

    def _work(self) -> None:
        """Demotions to the low watermarks, promotions, and a periodic write of access
        statistics (every 30 s, or after 5 s without work)."""
        last_flush = time.monotonic()
        while True:
            try:
                op, block = self._queue.get(timeout=5.0)
            except queue.Empty:
                self._run_logged(Op.FLUSH, None)
                last_flush = time.monotonic()
                continue
            try:
                if op is Op.PROMOTE:
                    with self.index.lock:
                        self._promoting.pop(block, None)
                if op is Op.STOP:
                    return
                if self._stopping.is_set():
                    continue
                self._run_logged(op, block)
                if time.monotonic() - last_flush > 30.0:
                    self._run_logged(Op.FLUSH, None)
                    last_flush = time.monotonic()
            finally:
                self._queue.task_done()

    def _run_logged(self, op: Op, block: BlockId | None) -> None:
        try:
            self._run(op, block)
        except STORAGE_FAULTS as exc:   # a full or damaged tier: counted where it was met
            log.warning("tier worker: %s %s: %s", op.value, block or "", exc)
        except Exception:  # the worker must survive; the failure is logged with its cause
            log.exception("tier worker: %s %s failed", op.value, block)

    def _run(self, op: Op, block: BlockId | None) -> None:
        if op is Op.PROMOTE and block is not None:
            self.promote(block)
        if op in (Op.BALANCE, Op.PROMOTE):
            self.enforce(self.watermarks())
        if op is Op.FLUSH:
            self._p.flush_stats()
            if time.monotonic() - self._last_recheck > BUDGET_RECHECK_S:
                self.cap_budgets()
                self.enforce(self.watermarks())     # and bound_files, unless it just ran

    # -- the disk ----------------------------------------------------------------------------------
    def cap_budgets(self, warn: bool = False) -> dict[Tier, int]:
        """Cap each budget by the space its file system has for it: what the tier holds there
        plus its share of the free space (tiers on one file system share it in proportion to
        their budgets). Returns the tiers capped, with their caps; ``warn``: log each (at
        start; later, a budget newly capped is logged)."""
        self._last_recheck = time.monotonic()
        where: dict[Tier, tuple[int, int, int]] = {}     # device, free bytes, held bytes
        for tier in self.configured:
            store = self.tiers[tier]
            path = store.path if hasattr(store, "path") else store.store.path
            try:
                usage = shutil.disk_usage(path)
                headroom = min(HEADROOM_MAX, int(usage.total * HEADROOM))
                where[tier] = (path.stat().st_dev, usage.free - headroom, store.disk_bytes())
            except OSError:
                continue
        capped = {}
        for tier, (device, free, held) in where.items():
            sharing = sum(self.configured[t] for t, w in where.items() if w[0] == device)
            room = max(0, int((held + free * self.configured[tier] / sharing) * FREE_SHARE))
            budget = min(self.configured[tier], room)
            if budget < self.configured[tier]:
                capped[tier] = budget
                if warn or self.budgets[tier] == self.configured[tier]:
                    log.warning("the %s budget of %d bytes exceeds the space its disk has for "
                                "it (%d bytes free): using %d", tier.label,
                                self.configured[tier], free, budget)
            self.budgets[tier] = budget
        return capped

    def bound_files(self) -> None:
        """Keep each RocksDB tier's files within its budget: compact (collect blob garbage)
        when they exceed it by :data:`FILES_SLACK`, and demote what they still hold over it."""
        self._last_bound = time.monotonic()
        for tier in Tier:
            store = self.tiers[tier]
            if not isinstance(store, RocksTier):
                continue
            try:
                files = store.file_stats().files_bytes + store.log_bytes()
                limit = self.budgets[tier] * FILES_SLACK + FILES_OVERHEAD
                if files > limit:
                    store.flush()
                    store.compact()
                    files = store.file_stats().files_bytes + store.log_bytes()
            except Exception as exc:  # a damaged or full tier: reads say so where it matters
                log.warning("compacting the %s tier failed: %s", tier.label, exc)
                continue
            with self.index.lock:
                counted = self.index.usage[tier].stored_bytes
            if files > limit and counted:
                # Files hold more than the blocks counted (headers, index, garbage): demote in
                # proportion so that the files come down to the watermark.
                excess = int(counted - counted * self.budgets[tier] * LOW_WATERMARK / files)
                if excess > 0:
                    self.demote(tier, excess)

    def write_failed(self, tier: Tier, exc: WriteFailed) -> None:
        """Count a refused write; log it once until writes to the tier work again."""
        with self.index.lock:
            self.index.counters[tier].write_errors += 1
            first = tier not in self._failing
            self._failing[tier] = str(exc)
            self._failed_at[tier] = time.monotonic()
        if first:
            log.error("writes to the %s tier fail (%s): requests are served and not stored "
                      "until they work again", tier.label, exc)
            self.cap_budgets()

    def failing(self) -> dict[Tier, str]:
        """Tiers whose last write failed, with the error."""
        with self.index.lock:
            return dict(self._failing)

    def _write_ok(self, tier: Tier) -> None:
        if tier in self._failing:
            with self.index.lock:
                self._failing.pop(tier, None)
            log.warning("writes to the %s tier work again", tier.label)

    def _retry_failing(self, tier: Tier) -> None:
        """Before writing to a tier whose last write failed (at most every RETRY_S): let it
        recover (RocksDB must be reopened) and look at the free space again."""
        with self.index.lock:
            failed_at = self._failed_at.get(tier)
            if failed_at is None or time.monotonic() - failed_at < RETRY_S:
                return
            self._failed_at[tier] = time.monotonic()
            try:
                self.tiers[tier].recover()
            except Exception as exc:  # still failing: the write that follows says so
                log.warning("the %s tier did not recover: %s", tier.label, exc)
            self.cap_budgets()

    def discard_records(self, tier: Tier, keys: Sequence[bytes]) -> None:
        """Delete records written for a block whose entry never committed (best effort: the
        checker collects what stays)."""
        try:
            self.tiers[tier].delete(keys)
        except WriteFailed:
            pass

    # -- budgets -----------------------------------------------------------------------------------
    def watermarks(self) -> dict[Tier, int]:
        return {tier: int(budget * LOW_WATERMARK) for tier, budget in self.budgets.items()}

    def enforce(self, limits: Mapping[Tier, int]) -> None:
        """Demote (from the last tier: drop) until every tier holds at most its limit, and keep
        RocksDB's files within their budgets (:meth:`bound_files`)."""
        for tier in Tier:
            with self.index.lock:
                excess = (self.index.usage[tier].stored_bytes - self.index.leaving(tier)
                          - limits[tier])
            if excess > 0:
                self.demote(tier, excess)
        if time.monotonic() - self._last_bound >= BOUND_FILES_S:
            self.bound_files()

    @contextmanager
    def room(self, tier: Tier, nbytes: int) -> Iterator[None]:
        """Reserve ``nbytes`` of ``tier`` for a write, demoting first if they would not fit
        its budget; :class:`TierFull` if everything left there is pinned."""
        self._make_room(tier, nbytes)
        try:
            yield
        finally:
            self.index.release(tier, nbytes)

    def _over(self, tier: Tier, nbytes: int) -> int:
        usage = self.index.usage[tier]
        return usage.stored_bytes + usage.reserved_bytes + nbytes - self.budgets[tier]

    def _make_room(self, tier: Tier, nbytes: int) -> None:
        while True:
            with self.index.lock:
                over = self._over(tier, nbytes)
                if over <= 0:
                    self.index.reserve(tier, nbytes)
                    return
                need = over - self.index.leaving(tier)
                if need <= 0:    # demotions in flight will free enough
                    self.index.wait_for_moves(MOVE_WAIT_S)
                    continue
            if self.demote(tier, need):
                continue
            with self.index.lock:
                if self.index.leaving(tier) == 0 and self._over(tier, nbytes) > 0:
                    if time.monotonic() - self._last_recheck > RETRY_S:
                        self.cap_budgets()      # space may have come back
                        continue
                    if nbytes > self.budgets[tier]:
                        raise TierFull(f"{nbytes} bytes do not fit the {tier.label} budget of "
                                       f"{self.budgets[tier]} (capped by free space)")
                    raise TierFull(f"{tier.label} is full of pinned blocks")
                self.index.wait_for_moves(MOVE_WAIT_S)

    def demote(self, tier: Tier, nbytes: int) -> bool:
        """Move at least ``nbytes`` out of ``tier`` (from the last tier: drop them), the least
        valuable blocks first; False when nothing could be moved."""
        with self.index.lock:
            victims = policy.rank_victims(self.index.candidates(tier, dropping=tier == LAST),
                                          nbytes, time.time(), self.weights)
            if not victims:
                return False
            if tier == LAST:
                self._drop(victims)
                return True
            moves = [(block, self.index.begin_move(block, Tier(tier + 1))) for block in victims]
        moved = False
        for i, (block, move) in enumerate(moves):
            if self._stopping.is_set():      # shutting down: leave the rest where it is
                for claimed, _ in moves[i:]:
                    self.index.end_move(claimed)
                break
            try:
                moved = self._copy(block, move) or moved
            except BaseException:
                for claimed, _ in moves[i + 1:]:
                    self.index.end_move(claimed)
                raise
        # All abandoned because the next tier refuses writes: nothing will move until it takes
        # them again, so a writer waiting for room must not wait for this.
        return moved or Tier(tier + 1) not in self._failing

    def _drop(self, blocks: Sequence[BlockId]) -> None:
        self.index.counters[LAST].drops += len(blocks)
        for block in blocks:
            log.warning("dropped block %s: every tier is full", block)
        self._p.forget(blocks)

    def write_records(self, tier: Tier, records: Sequence[tuple[bytes, bytes]]) -> None:
        self._retry_failing(tier)
        for _ in range(8):
            try:
                self.tiers[tier].put_many(records)
                self._write_ok(tier)
                return
            except WriteFailed as exc:
                self.write_failed(tier, exc)
                raise
            except TierFull:
                # LMDB's own pages ran out before our accounting did: demote more and retry.
                if tier != Tier.WARM or not self.demote(Tier.WARM,
                                                         self.budgets[Tier.WARM] // 8):
                    raise
        raise TierFull(f"{tier.label} stays full after demotion")

    # -- moves -------------------------------------------------------------------------------------
    def promote(self, block: BlockId) -> None:
        """Move a block read from a lower tier up to warm, unless it is moving or too large to be
        worth a place there. A pinned block (a reader is reading it, as after every read that
        asks for its promotion) is promoted once its pins are released."""
        with self.index.lock:
            entry = self.index.get(block)
            if entry is None or entry.tier == Tier.WARM \
                    or entry.raw_bytes > self.budgets[Tier.WARM] * LOW_WATERMARK:
                return
            if self.index.promote_when_unpinned(block) or self.index.movable(block) is None:
                return
            move = self.index.begin_move(block, Tier.WARM)
        self._copy(block, move)

    def move(self, block: BlockId, dest: Tier) -> bool:
        """Move a block to ``dest`` (re-encoded for it); False if it is gone, pinned, moving or
        there already, or if the move was abandoned or found the block corrupt."""
        with self.index.lock:
            entry = self.index.movable(block)
            if entry is None or entry.tier == dest:
                return False
            move = self.index.begin_move(block, dest)
        return self._copy(block, move)

    def recode(self, block: BlockId) -> bool:
        """Re-encode a block's records where they are, in its tier's format (after the format a
        tier is configured with changed); False if it is gone, pinned, moving, already in that
        format or unreadable. The records are overwritten in place: each is whole in either
        format, so a crash midway leaves a block that reads, in a mix of the two."""
        with self.index.lock:
            entry = self.index.movable(block)
            if entry is None:
                return False
            move = self.index.begin_move(block, entry.tier)
        try:
            tier, fmt = move.source, self.formats[move.source]
            keys = block.record_keys(move.n_layers)
            values = self.tiers[tier].get_many(keys)
            if any(v is None for v in values):
                return False
            try:
                if all(codec.in_format(codec.read_header(v), fmt) for v in values):
                    return False
                records = list(zip(keys, workers.STORE.map_in_parts(
                    lambda v: codec.transcode(v, fmt), values)))
            except BlockCorrupt:
                return False    # the scrub step and readers deal with damage
            stored = sum(self.tiers[tier].stored_bytes(len(v)) for _, v in records)
            with self.room(tier, max(0, stored - move.stored_bytes)), self.index.lock:
                entry = self.index.get(block)
                if entry is None or not self.index.may_commit(block, move):
                    return False
                self.write_records(tier, records)
                recoded = replace(entry, stored_bytes=stored)
                with self._p.catalog.write() as txn:
                    txn.put_block(block, recoded)
                self.index.add(block, recoded)
            return True
        except WriteFailed:
            return False        # counted and logged; the block keeps its records
        finally:
            self.index.end_move(block)

    def _copy(self, block: BlockId, move: Move) -> bool:
        """Copy a claimed block to ``move.dest`` and commit it there; False if abandoned.
        Ends the move either way."""
        keys = block.record_keys(move.n_layers)
        try:
            try:
                values = self.tiers[move.source].get_many(keys)
                if not self.index.may_commit(block, move):
                    return False
                if any(v is None for v in values):
                    raise BlockCorrupt(f"{block}: layers missing from {move.source.label}")
                fmt = self.formats[move.dest]
                # A part of the layers per worker thread: the kernels and zstd hold no GIL.
                records = list(zip(keys, workers.STORE.map_in_parts(
                    lambda v: codec.transcode(v, fmt), values)))
            except BlockCorrupt:
                with self.index.lock:
                    # Removed meanwhile, its records went with it; pinned, its reader meets
                    # the damage itself.
                    if self.index.may_commit(block, move):
                        self.index.counters[move.source].corrupt += 1
                        self._p.quarantine([block], f"unreadable in {move.source.label}")
                return False
            stored = sum(self.tiers[move.dest].stored_bytes(len(v)) for _, v in records)
            with self.room(move.dest, stored):
                try:
                    self.write_records(move.dest, records)
                except WriteFailed:
                    return False    # counted and logged; the block stays where it is
                try:
                    if self._commit(block, move, stored, keys):
                        return True
                except WriteFailed as exc:
                    log.warning("moving %s: the catalog refused the change: %s", block, exc)
            self.discard_records(move.dest, keys)
            return False
        finally:
            self.index.end_move(block)

    def _commit(self, block: BlockId, move: Move, stored: int, keys: list[bytes]) -> bool:
        with self.index.lock:
            entry = self.index.get(block)
            if entry is None or not self.index.may_commit(block, move):
                return False
            moved = replace(entry, tier=move.dest, stored_bytes=stored)
            with self._p.catalog.write() as txn:
                txn.put_block(block, moved)
            self.index.add(block, moved)
            # Under the lock, so that no new block can take this id before its old records go.
            try:
                self.tiers[move.source].delete(keys)
            except WriteFailed as exc:   # orphans now: the checker collects them
                log.warning("moved %s, its old records stay behind: %s", block, exc)
            if move.dest > move.source:
                self.index.counters[move.source].demotions += 1
            else:
                self.index.counters[move.dest].promotions += 1
            return True
