"""Write-behind to the remote tier: one background thread sends blocks, then the sessions that
name them, in the order the store saved them.

The tier manager queues a saved sequence's blocks (:meth:`RemoteSync.push`) and a session's new
turn (:meth:`RemoteSync.publish`); the thread reads each block from the local tier that holds it
then, re-encodes it for the remote tier and writes a batch in one pipeline per node; a session is
written after every block queued before it, so a server that reads it finds its blocks. The queue
is bounded (:data:`QUEUE_LIMIT`): beyond it the oldest blocks are given up (counted) and sent again
with their sequence's next save. While Redis is down the queue waits; when it answers again the
thread catches up, and blocks it had sent are sent again (a failover may have lost them).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvtier.errors import KvtierError, RemoteUnavailable
from kvtier.storage import codec
from kvtier.storage.codec import RecordFormat
from kvtier.storage.records import BlockId
from kvtier.storage.remote import BlockMeta, RemoteBlock, RemoteFull, RemoteTier
from kvtier.storage.remote_catalog import RemoteCatalog, RemoteSession, WriteRefused

log = logging.getLogger(__name__)

QUEUE_LIMIT = 4096
"""Blocks waiting to be sent at most; a full queue gives up its oldest."""
BATCH = 16
"""Blocks sent in one pipeline."""
SENT_MEMORY = 65536
"""Blocks remembered as sent (so a sequence's next save sends only its new ones)."""


@dataclass(frozen=True, slots=True)
class Upload:
    """A block to send: where it is locally and its address in the remote tier."""

    block: BlockId
    remote: RemoteBlock


@dataclass(frozen=True, slots=True)
class Publish:
    """A session to write once the blocks before it are sent: built when its turn comes."""

    key: str
    build: Callable[[], RemoteSession | None]
    written: Callable[[int], None]
    """Called with the new version after a successful write."""
    ready: Callable[[], bool] = lambda: True
    """False while the turn's KV is still being stored locally: the session is written once its
    sequence names the turn's blocks (and those blocks are queued before it)."""


class RemoteSync:
    """The write-behind thread (see the module)."""

    def __init__(self, tier: RemoteTier, catalog: RemoteCatalog, fmt: RecordFormat,
                 read: Callable[[BlockId], tuple[BlockMeta, list[bytes | None]] | None],
                 address: Callable[[BlockId], RemoteBlock | None]) -> None:
        """``read(block)``: the block's shape and its records as a local tier holds them
        (None: no longer stored); ``address(block)``: where the remote tier keeps a local block
        (None: it has no content address)."""
        self.tier = tier
        self.catalog = catalog
        self.format = fmt
        self._read = read
        self._address = address
        self._cv = threading.Condition()
        self._queue: deque[Upload | Publish] = deque()
        self._blocks_queued = 0
        self._sent: OrderedDict[RemoteBlock, None] = OrderedDict()
        self._publishing: set[str] = set()
        self._attention: dict[BlockId, float] = {}
        """Measured attention not sent yet, summed per local block."""
        self.sent = 0
        self.dropped = 0
        self.sessions_written = 0
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="kvtier-remote-sync",
                                        daemon=True)
        self._thread.start()

    # -- the manager's side ----------------------------------------------------------------------
    def push(self, uploads: Sequence[Upload]) -> None:
        """Queue blocks not known to be in the remote tier."""
        with self._cv:
            for up in uploads:
                if up.remote in self._sent:
                    continue
                self._queue.append(up)
                self._blocks_queued += 1
            while self._blocks_queued > QUEUE_LIMIT:
                oldest = next(i for i, item in enumerate(self._queue) if isinstance(item, Upload))
                del self._queue[oldest]
                self._blocks_queued -= 1
                self.dropped += 1
            self._cv.notify_all()

    def attention(self, scores: dict[BlockId, float]) -> None:
        """Queue measured attention of local blocks for their remote copies' shared eviction
        priority (addressed and sent by the thread; lost if Redis is down then: a hint)."""
        with self._cv:
            for block, value in scores.items():
                self._attention[block] = self._attention.get(block, 0.0) + value
            self._cv.notify_all()

    def publish(self, item: Publish) -> None:
        with self._cv:
            self._queue.append(item)
            self._publishing.add(item.key)
            self._cv.notify_all()

    def mark_sent(self, blocks: Sequence[RemoteBlock]) -> None:
        """Blocks known to be in the remote tier (read from it)."""
        with self._cv:
            for block in blocks:
                self._remember(block)

    def publishing(self, key: str) -> bool:
        """Whether a write of session ``key`` is queued or running."""
        with self._cv:
            return key in self._publishing

    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is sent (or given up); False on timeout."""
        with self._cv:
            return self._cv.wait_for(
                lambda: not self._queue and not self._attention and not self._busy, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for at most ``timeout`` seconds), then stop."""
        self.drain(timeout)
        with self._cv:
            self._stopping = True
            self._queue.clear()
            self._cv.notify_all()
        self._thread.join()

    # -- the thread ------------------------------------------------------------------------------
    def _addressed(self, scores: dict[BlockId, float]) -> dict[RemoteBlock, float]:
        remote: dict[RemoteBlock, float] = {}
        for block, value in scores.items():
            address = self._address(block)
            if address is not None:
                remote[address] = remote.get(address, 0.0) + value
        return remote

    def _remember(self, block: RemoteBlock) -> None:
        self._sent[block] = None
        self._sent.move_to_end(block)
        while len(self._sent) > SENT_MEMORY:
            self._sent.popitem(last=False)

    def _work(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._attention or self._stopping)
                if self._stopping:
                    return
                attention, self._attention = self._attention, {}
                self._busy = bool(attention)
            if attention:
                try:
                    self.tier.add_attention(self._addressed(attention))
                except RemoteUnavailable:
                    pass        # counted by the client; attention is a hint
                except Exception:   # a bug must not stop the thread
                    log.exception("sending attention to the remote tier failed")
            with self._cv:
                self._busy = False
                self._cv.notify_all()
                if not self._queue:
                    continue
                head = self._queue[0]
                if isinstance(head, Publish) and not head.ready():
                    # Its sequence is not saved yet: let the blocks queued after it go first.
                    self._queue.rotate(-1)
                    self._cv.wait(timeout=0.02)
                    continue
                if isinstance(head, Publish):
                    batch: list[Upload | Publish] = [head]
                else:
                    batch = []
                    for item in self._queue:
                        if not isinstance(item, Upload) or len(batch) >= BATCH:
                            break
                        batch.append(item)
                self._busy = True
            failing = self.tier.redis.breaker.failing
            given_up = False
            try:
                if isinstance(head, Publish):
                    self._write_session(head)
                else:
                    self._send([b for b in batch if isinstance(b, Upload)])
            except RemoteFull:
                # Not retried in a loop: these blocks go again with their sequence's next save.
                given_up = True
            except RemoteUnavailable:
                # Keep the batch queued and wait for the breaker's next probe.
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
                    self._cv.wait(timeout=0.2)
                continue
            except Exception:   # a bug must not stop the thread
                log.exception("sending to the remote tier failed")
            with self._cv:
                if failing is not None:
                    # Redis came back: what it held before may be gone (a failover, a restart).
                    self._sent.clear()
                for _ in batch:
                    item = self._queue.popleft()
                    if isinstance(item, Upload):
                        self._blocks_queued -= 1
                        if given_up:
                            self.dropped += 1
                        else:
                            self._remember(item.remote)
                    elif not any(isinstance(i, Publish) and i.key == item.key
                                 for i in self._queue):
                        self._publishing.discard(item.key)
                self._busy = False
                self._cv.notify_all()

    def _send(self, uploads: list[Upload]) -> None:
        items = []
        for up in uploads:
            try:
                found = self._read(up.block)
            except KvtierError:
                found = None
            if found is None:
                continue    # dropped or quarantined meanwhile: nothing to share
            meta, records = found
            if any(r is None for r in records):
                continue
            remote = [codec.transcode(r, self.format) for r in records if r is not None]
            meta = BlockMeta(meta.n_layers, meta.n_tokens, meta.raw_bytes,
                             sum(map(len, remote)), meta.position)
            items.append((up.remote, meta, remote))
        self.sent += self.tier.put_blocks(items)

    def _write_session(self, item: Publish) -> None:
        session = item.build()
        if session is None:
            return
        try:
            version = self.catalog.put(session)
        except WriteRefused as exc:
            log.warning("session %r was not written to the remote catalog: %s", item.key, exc)
            return
        item.written(version)
        self.sessions_written += 1
