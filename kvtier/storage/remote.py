"""The remote tier: KV blocks in a Redis Cluster (or Valkey) that several servers share.

Keys are content addresses, so any server finds any other's blocks: a block is one Redis hash
under ``kvt:b:<namespace hex>:<content hash hex>`` (the chain hash of a full block, the tail
chain hash of a partial tail: see :mod:`~kvtier.storage.index`), one field per layer holding the
record exactly as the other tiers store it (:mod:`~kvtier.storage.codec`: checksummed,
versioned, verified when decoded), and a field ``m`` with the block's shape. One key per block
means a block is read or written with one command on one node; a batch goes as one pipeline per
node (redis-py's cluster pipeline), never as a cross-slot command.

Budget: ``kvt:bytes`` counts the bytes of stored blocks, ``kvt:lru`` scores each block by when it
was last written or read, and each block's hash holds the attention servers measured for it
(fields ``a``, decayed as of time ``at``; every server's working set adds to it, in the
background). Beyond ``tiers.remote_budget`` blocks are evicted by the tiers' own priority
(:func:`~kvtier.storage.policy.rank_victims`: ``α/attention + β·age``; one shared tier has no tier
term) among the :data:`EVICT_SAMPLE` least recently used, as Redis samples its own LRU. Blocks
also expire ``tiers.remote_ttl_s`` after their last use. Redis ``maxmemory`` is a backstop only: a
write it refuses is counted, never retried in a loop.

Faults: every call has a short socket timeout (:data:`SOCKET_TIMEOUT_S`) and goes through a
:class:`Breaker`; while it is open, calls fail at once with :class:`RemoteUnavailable` and the
caller carries on with the local tiers. Each kind of failure is logged once until Redis answers
again, and every failed call is counted (``remote_errors``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import (OutOfMemoryError, RedisClusterException, RedisError,
                              ResponseError)
from redis.retry import Retry

from kvtier.errors import RemoteUnavailable
from kvtier.storage import policy
from kvtier.storage.records import HASH_BYTES, NAMESPACE_BYTES, Namespace
from kvtier.storage.tiers import TierStore

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 0.5
"""A Redis call waits at most this long for the network: a restore must never wait on a dead node
longer than recomputing a few blocks takes."""
BREAKER_MIN_S = 1.0
BREAKER_MAX_S = 8.0
"""After a failure, calls fail fast for BREAKER_MIN_S, doubling up to BREAKER_MAX_S while the
probes that follow keep failing."""
PREFIX = b"kvt:"
BYTES_KEY = PREFIX + b"bytes"
LRU_KEY = PREFIX + b"lru"
BLOCK_PREFIX = PREFIX + b"b:"
META_FIELD = b"m"
ATTENTION_FIELD = b"a"
"""Measured attention, summed over servers and decayed as of :data:`ATTENTION_AT_FIELD`."""
ATTENTION_AT_FIELD = b"at"
EVICT_BATCH = 64
EVICT_SAMPLE = 4 * EVICT_BATCH
"""The least recently used blocks that eviction ranks by priority at a time."""
T = TypeVar("T")


@dataclass(frozen=True, slots=True, order=True)
class RemoteBlock:
    """A block in the remote tier: its model namespace and content hash."""

    namespace: Namespace
    content: bytes

    BYTES = NAMESPACE_BYTES + HASH_BYTES

    def to_bytes(self) -> bytes:
        return self.namespace + self.content

    @classmethod
    def from_bytes(cls, data: bytes) -> RemoteBlock:
        if len(data) != cls.BYTES:
            raise ValueError(f"a remote block is {cls.BYTES} bytes, got {len(data)}")
        return cls(Namespace(bytes(data[:NAMESPACE_BYTES])), bytes(data[NAMESPACE_BYTES:]))

    @property
    def redis_key(self) -> bytes:
        return BLOCK_PREFIX + self.namespace.hex().encode() + b":" + self.content.hex().encode()

    @classmethod
    def from_redis_key(cls, key: bytes) -> RemoteBlock:
        ns, _, content = key[len(BLOCK_PREFIX):].partition(b":")
        return cls(Namespace(bytes.fromhex(ns.decode())), bytes.fromhex(content.decode()))

    def record_key(self, layer: int) -> bytes:
        """The tier interface's key of one layer's record: block bytes then layer u16."""
        return self.to_bytes() + layer.to_bytes(2, "big")


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What a remote block holds besides its records."""

    n_layers: int
    n_tokens: int
    raw_bytes: int
    stored_bytes: int
    position: int = -1

    def pack(self) -> bytes:
        return msgpack.packb([self.n_layers, self.n_tokens, self.raw_bytes, self.stored_bytes,
                              self.position])

    @classmethod
    def unpack(cls, data: bytes) -> BlockMeta:
        return cls(*msgpack.unpackb(data))


class RemoteFull(RemoteUnavailable):
    """Redis refused a write for want of memory (``maxmemory``)."""


class Breaker:
    """A circuit breaker: open after a failure, probing again after a growing pause."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open_until = 0.0
        self._pause = 0.0
        self.failing: str | None = None
        """The kind of the failure that opened it (None: closed)."""

    def allow(self) -> bool:
        with self._lock:
            return time.monotonic() >= self._open_until

    def success(self) -> None:
        with self._lock:
            was, self.failing, self._pause, self._open_until = self.failing, None, 0.0, 0.0
        if was is not None:
            log.warning("the remote tier answers again (after %s): catching up", was)

    def failure(self, exc: Exception) -> None:
        kind = type(exc).__name__
        with self._lock:
            first = self.failing != kind
            self.failing = kind
            self._pause = min(BREAKER_MAX_S, max(BREAKER_MIN_S, self._pause * 2))
            self._open_until = time.monotonic() + self._pause
        if first:
            log.error("the remote tier fails (%s: %s): serving from the local tiers and "
                      "recomputation until it answers again", kind, exc)


class Redis:
    """The cluster client, behind the breaker: :meth:`call` runs one function with it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.breaker = Breaker()
        self.errors = 0
        """Calls that failed (timeouts, refused connections, cluster down, full memory)."""
        self.full = False
        """Redis refused a write for want of memory, and none has succeeded since."""
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()
        self.scripts: dict[str, Any] = {}

    def _connect(self) -> RedisCluster:
        with self._lock:
            if self._client is None:
                self._client = RedisCluster.from_url(
                    self.url, socket_timeout=SOCKET_TIMEOUT_S,
                    socket_connect_timeout=SOCKET_TIMEOUT_S,
                    retry=Retry(NoBackoff(), 1))
            return self._client

    def call(self, fn: Callable[[RedisCluster], T]) -> T:
        """``fn(client)``, or :class:`RemoteUnavailable` (counted; the breaker opens) when
        Redis fails or the breaker is open."""
        if not self.breaker.allow():
            raise RemoteUnavailable(f"the remote tier is unavailable ({self.breaker.failing})")
        try:
            result = fn(self._connect())
        except (RedisError, RedisClusterException, OSError) as exc:
            # Nodes down, the cluster down (a slot without a master), a timeout, a full memory
            # (OOM), or anything else Redis answers: the request goes on without the remote
            # tier. The client is kept: it relearns the topology itself after a failover.
            with self._lock:
                self.errors += 1
            if isinstance(exc, OutOfMemoryError) or \
                    (isinstance(exc, ResponseError) and str(exc).startswith("OOM")):
                # Reads still work: no breaker; the write is given up, logged once.
                if not self.full:
                    log.error("Redis refuses writes (%s): blocks stay local until it has room; "
                              "set maxmemory above tiers.remote_budget", exc)
                self.full = True
                raise RemoteFull(f"the remote tier is full: {exc}") from exc
            self.breaker.failure(exc)
            raise RemoteUnavailable(f"the remote tier failed: {exc}") from exc
        self.breaker.success()
        return result

    def script(self, name: str, source: str) -> Any:
        client = self._connect()
        if name not in self.scripts or self.scripts[name][0] is not client:
            self.scripts[name] = (client, client.register_script(source))
        return self.scripts[name][1]

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class RemoteTier(TierStore):
    """Blocks in the cluster (see the module). Record keys are :meth:`RemoteBlock.record_key`."""

    def __init__(self, redis: Redis, budget: int, ttl_s: float = 0.0, name: str = "remote",
                 weights: policy.Weights = policy.Weights()) -> None:
        self.name = name
        self.redis = redis
        self.budget = budget
        self.weights = weights
        self.ttl_ms = int(ttl_s * 1000)
        self.hits = 0
        self.misses = 0
        self.puts = 0
        self.evictions = 0

    # -- blocks ----------------------------------------------------------------------------------
    def get_blocks(self, blocks: Sequence[RemoteBlock], touch: bool = True
                   ) -> list[tuple[BlockMeta, list[bytes]] | None]:
        """Each block's shape and records, layer 0 first (None: not stored); a read renews its
        use (unless ``touch`` is false: the tools). The records are verified when they are
        decoded, as every tier's are."""
        if not blocks:
            return []

        def read(client: RedisCluster) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for block in blocks:
                pipe.hgetall(block.redis_key)
            return pipe.execute()
        found = self.redis.call(read)
        out: list[tuple[BlockMeta, list[bytes]] | None] = []
        for fields in found:
            packed = fields.get(META_FIELD) if fields else None
            if packed is None:
                out.append(None)
                continue
            meta = BlockMeta.unpack(packed)
            records = [fields.get(str(i).encode()) for i in range(meta.n_layers)]
            out.append(None if any(r is None for r in records) else (meta, records))
        hit = [b for b, r in zip(blocks, out) if r is not None]
        self.hits += len(hit)
        self.misses += len(blocks) - len(hit)
        if hit and touch:
            self._touch(hit)
        return out

    def metas(self, blocks: Sequence[RemoteBlock]) -> list[BlockMeta | None]:
        """Each block's shape, without its records (None: not stored)."""
        if not blocks:
            return []

        def read(client: RedisCluster) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for block in blocks:
                pipe.hget(block.redis_key, META_FIELD)
            return pipe.execute()
        return [BlockMeta.unpack(m) if m else None for m in self.redis.call(read)]

    def put_blocks(self, items: Sequence[tuple[RemoteBlock, BlockMeta, list[bytes]]]) -> int:
        """Store blocks that are not stored yet (content-addressed: one that is only has its use
        renewed); returns how many were new. Evicts beyond the budget."""
        if not items:
            return 0
        present = self.metas([b for b, _, _ in items])
        now = time.time()

        def write(client: RedisCluster) -> None:
            pipe = client.pipeline(transaction=False)
            added = 0
            for (block, meta, records), old in zip(items, present):
                if old is None:
                    mapping = {str(i).encode(): r for i, r in enumerate(records)}
                    mapping[META_FIELD] = meta.pack()
                    pipe.hset(block.redis_key, mapping=mapping)
                    added += meta.stored_bytes
                if self.ttl_ms:
                    pipe.pexpire(block.redis_key, self.ttl_ms)
                pipe.zadd(LRU_KEY, {block.redis_key: now})
            if added:
                pipe.incrby(BYTES_KEY, added)
            pipe.execute()
        self.redis.call(write)
        if self.redis.full:
            self.redis.full = False
            log.warning("Redis takes writes again")
        new = sum(old is None for old in present)
        self.puts += new
        if new:
            self.enforce_budget()
        return new

    def _touch(self, blocks: Sequence[RemoteBlock]) -> None:
        now = time.time()

        def touch(client: RedisCluster) -> None:
            pipe = client.pipeline(transaction=False)
            for block in blocks:
                pipe.zadd(LRU_KEY, {block.redis_key: now}, xx=True)
                if self.ttl_ms:
                    pipe.pexpire(block.redis_key, self.ttl_ms)
            pipe.execute()
        self.redis.call(touch)

    def delete_blocks(self, blocks: Sequence[RemoteBlock]) -> int:
        """Delete blocks (and their budget entries); returns the bytes freed."""
        return self._delete_keys([b.redis_key for b in blocks])

    def _delete_keys(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0

        def delete(client: RedisCluster) -> int:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hget(key, META_FIELD)
            metas = pipe.execute()
            freed = sum(BlockMeta.unpack(m).stored_bytes for m in metas if m)
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.delete(key)
            pipe.zrem(LRU_KEY, *keys)
            if freed:
                pipe.decrby(BYTES_KEY, freed)
            pipe.execute()
            return freed
        return self.redis.call(delete)

    def stored(self) -> int:
        """Bytes of blocks stored (all servers' together)."""
        return int(self.redis.call(lambda c: c.get(BYTES_KEY)) or 0)

    def add_attention(self, scores: dict[RemoteBlock, float], now: float | None = None) -> None:
        """Add measured attention to stored blocks (decaying what they held with the eviction
        weights' half-life). Two servers adding to one block at once may lose one addition:
        attention steers eviction, it is never data."""
        blocks = [b for b in scores if scores[b] > 0]
        if not blocks:
            return
        now = time.time() if now is None else now
        half_life = self.weights.hit_half_life_s
        keys = [b.redis_key for b in blocks]

        def add(client: RedisCluster) -> None:
            held = _pipelined(client, keys, lambda p, k: p.hmget(
                k, META_FIELD, ATTENTION_FIELD, ATTENTION_AT_FIELD))
            pipe = client.pipeline(transaction=False)
            for block, key, (meta, a, at) in zip(blocks, keys, held):
                if meta is None:       # evicted or expired meanwhile
                    continue
                value = policy.decayed_hits(float(a or 0.0), float(at or now), now, half_life)
                pipe.hset(key, mapping={ATTENTION_FIELD: repr(value + scores[block]),
                                        ATTENTION_AT_FIELD: repr(now)})
            pipe.execute()
        self.redis.call(add)

    def enforce_budget(self, budget: int | None = None) -> int:
        """Evict blocks until the stored bytes fit ``budget`` (the configured one by default),
        ranked by the eviction priority among the least recently used; returns how many were
        evicted."""
        budget = self.budget if budget is None else budget
        evicted = 0
        while (excess := self.stored() - budget) > 0:
            oldest = self.redis.call(
                lambda c: c.zrange(LRU_KEY, 0, EVICT_SAMPLE - 1, withscores=True))
            if not oldest:
                # Counted bytes with no block left to evict: the count drifted (two servers
                # stored one block at once); recount it.
                self.recount()
                break
            keys = [key for key, _ in oldest]
            held = self.redis.call(lambda c: _pipelined(c, keys, lambda p, k: p.hmget(
                k, META_FIELD, ATTENTION_FIELD, ATTENTION_AT_FIELD)))
            victims = policy.rank_victims(
                [_candidate(key, used, *fields, self.weights.hit_half_life_s)
                 for (key, used), fields in zip(oldest, held)],
                excess, time.time(), self.weights)[:EVICT_BATCH]
            self._delete_keys(victims)
            evicted += len(victims)
        self.evictions += evicted
        return evicted

    def block_keys(self) -> Iterator[bytes]:
        """The Redis key of every stored block, over every master (for the tools)."""
        def scan(client: RedisCluster) -> list[bytes]:
            return list(client.scan_iter(match=BLOCK_PREFIX + b"*", count=1000))
        yield from self.redis.call(scan)

    def recount(self) -> tuple[int, int]:
        """Rebuild the byte count and the use index from the blocks stored (after drift or
        expiry); returns (blocks, bytes)."""
        keys = list(self.block_keys())
        metas = self.redis.call(lambda c: _pipelined(c, keys, lambda p, k: p.hget(k, META_FIELD)))
        total = sum(BlockMeta.unpack(m).stored_bytes for m in metas if m)
        indexed = self.redis.call(lambda c: c.zrange(LRU_KEY, 0, -1))
        gone = set(indexed) - set(keys)

        def fix(client: RedisCluster) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.set(BYTES_KEY, total)
            if gone:
                pipe.zrem(LRU_KEY, *gone)
            now = time.time()
            for key in keys:
                pipe.zadd(LRU_KEY, {key: now}, nx=True)
            pipe.execute()
        self.redis.call(fix)
        return len(keys), total

    # -- the tier interface (record keys) --------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        blocks = [RemoteBlock.from_bytes(k[:RemoteBlock.BYTES]) for k in keys]
        unique = sorted(set(blocks))
        found = dict(zip(unique, self.get_blocks(unique)))
        out: list[bytes | None] = []
        for key, block in zip(keys, blocks):
            got, layer = found[block], int.from_bytes(key[RemoteBlock.BYTES:], "big")
            out.append(got[1][layer] if got is not None and layer < len(got[1]) else None)
        return out

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Records of whole blocks (every layer of each block, in order)."""
        grouped: dict[RemoteBlock, list[bytes]] = {}
        for key, value in items:
            grouped.setdefault(RemoteBlock.from_bytes(key[:RemoteBlock.BYTES]), []).append(value)
        self.put_blocks([(block, BlockMeta(len(records), 0, 0, sum(map(len, records))),
                          records) for block, records in grouped.items()])

    def delete(self, keys: Sequence[bytes]) -> None:
        self.delete_blocks(sorted({RemoteBlock.from_bytes(k[:RemoteBlock.BYTES]) for k in keys}))

    def keys(self) -> Iterator[bytes]:
        for key in sorted(self.block_keys()):
            block = RemoteBlock.from_redis_key(key)
            meta = self.metas([block])[0]
            for layer in range(meta.n_layers if meta else 0):
                yield block.record_key(layer)

    def disk_bytes(self) -> int:
        return self.stored()

    def close(self) -> None:
        self.redis.close()


def _candidate(key: bytes, last_used: float, meta: bytes | None, attention: bytes | None,
               attention_at: bytes | None, half_life_s: float) -> policy.Candidate[bytes]:
    """What the eviction policy knows of a remote block: its bytes, when it was last used, and
    its measured attention (as of its last use; a block never measured counts as used once
    then, so that among those recency decides, and a fresh block is not the first to go)."""
    size = BlockMeta.unpack(meta).stored_bytes if meta else 0
    measured = -1.0
    if attention is not None:
        # As of ``last_used``: the policy decays it from there to now.
        measured = float(attention) * 0.5 ** ((last_used - float(attention_at or last_used))
                                              / half_life_s)
    return policy.Candidate(key, size, tier=0, position=0, attention=measured, hits=1.0,
                            last_access=last_used)


def _pipelined(client: RedisCluster, keys: Sequence[bytes],
               add: Callable[[Any, bytes], object]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        add(pipe, key)
    return pipe.execute() if keys else []
