"""The shared session catalog in the Redis Cluster: which session holds which tokens and blocks,
and which server may write it now.

A session is a Redis hash ``kvt:s:{<session key>}`` with fields ``version`` (a counter that every
write raises by one) and ``record`` (msgpack of :class:`RemoteSession`). Its lease is the string
``kvt:l:{<session key>}`` holding the owning server's id, set with ``SET NX PX`` and renewed while
the server runs or stores a request of the session. The two keys share a hash tag, so one Lua
script reads the lease and compares the version before it writes: a server whose lease expired
(paused, partitioned) cannot overwrite what the next owner wrote; its write is refused and counted.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
from redis.cluster import RedisCluster

from kvtier.errors import RemoteUnavailable
from kvtier.storage.remote import PREFIX, Redis

log = logging.getLogger(__name__)

LEASE_MS = 10_000
"""A lease's life: renewed every third of it while needed, so a server that dies holds its
sessions at most this long."""
SESSION_PREFIX = PREFIX + b"s:"
LEASE_PREFIX = PREFIX + b"l:"

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_WRITE = """
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return -1 end
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if version ~= tonumber(ARGV[2]) then return -2 end
redis.call('HSET', KEYS[1], 'version', version + 1, 'record', ARGV[3])
return version + 1
"""
_DELETE = """
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return -1 end
return redis.call('DEL', KEYS[1])
"""


@dataclass(frozen=True, slots=True)
class RemoteSession:
    """A session as every server sees it: enough to rebuild it in a local catalog."""

    key: str
    """The session's catalog key (tenant included)."""
    namespace: bytes
    tokens: bytes
    """The stored sequence's tokens, int32 little-endian."""
    blocks: tuple[tuple[bytes, bool], ...]
    """Each block's content hash and whether it is a full block (a chain hash) or the tail."""
    created: float
    last_used: float
    data: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    """The catalog version this record was read at (0: never written)."""

    def pack(self) -> bytes:
        return msgpack.packb([self.key, self.namespace, self.tokens,
                              [list(b) for b in self.blocks], self.created, self.last_used,
                              self.data])

    @classmethod
    def unpack(cls, data: bytes, version: int) -> RemoteSession:
        key, ns, tokens, blocks, created, last_used, extra = msgpack.unpackb(data)
        return cls(key, ns, tokens, tuple((bytes(c), bool(f)) for c, f in blocks), created,
                   last_used, extra, version)


def _tag(key: str) -> bytes:
    return b"{" + key.encode() + b"}"


def session_key(key: str) -> bytes:
    return SESSION_PREFIX + _tag(key)


def lease_key(key: str) -> bytes:
    return LEASE_PREFIX + _tag(key)


class WriteRefused(Exception):
    """A session write lost its compare-and-set: another server holds the lease or wrote a newer
    version."""


class RemoteCatalog:
    """Sessions and their leases in the cluster, for one server (its id: :attr:`owner`)."""

    def __init__(self, redis: Redis, owner: str | None = None) -> None:
        self.redis = redis
        self.owner = owner or uuid.uuid4().hex
        self.conflicts = 0
        """Session writes refused because another server held the lease or wrote first."""
        self._lock = threading.Lock()
        self._ops = threading.Lock()
        self._held: Counter[str] = Counter()
        """Leases this server holds, with how many local requests use each."""
        self.needed: list[Callable[[str], bool]] = []
        """Whether a session still needs its lease once no request uses it (its turn is still
        being stored or published); a lease is released when none says so."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._upkeep, name="kvtier-remote-leases",
                                        daemon=True)
        self._thread.start()

    # -- sessions --------------------------------------------------------------------------------
    def get(self, key: str) -> RemoteSession | None:
        def read(client: RedisCluster) -> list[Any]:
            return client.hmget(session_key(key), [b"version", b"record"])
        version, record = self.redis.call(read)
        if record is None:
            return None
        return RemoteSession.unpack(record, int(version or 0))

    def put(self, session: RemoteSession) -> int:
        """Write ``session`` if the stored version is still ``session.version`` and no other
        server holds its lease; returns the new version, or :class:`WriteRefused`."""
        script = self.redis.script("write", _WRITE)
        result = int(self.redis.call(lambda c: script(
            keys=[session_key(session.key), lease_key(session.key)],
            args=[self.owner, session.version, session.pack()], client=c)))
        log.debug("session %s written by %s at %d: %d", session.key, self.owner[:6],
                  session.version, result)
        if result < 0:
            with self._lock:
                self.conflicts += 1
            raise WriteRefused("another server holds the lease" if result == -1 else
                               "another server wrote a newer version")
        return result

    def delete(self, key: str) -> bool:
        script = self.redis.script("delete", _DELETE)
        return int(self.redis.call(lambda c: script(
            keys=[session_key(key), lease_key(key)], args=[self.owner], client=c))) > 0

    def keys(self) -> Iterator[str]:
        """Every session key in the cluster (for the tools)."""
        found = self.redis.call(lambda c: list(c.scan_iter(match=SESSION_PREFIX + b"*",
                                                           count=1000)))
        for raw in found:
            yield raw[len(SESSION_PREFIX) + 1:-1].decode()

    def leases(self) -> dict[str, str]:
        """Every lease in the cluster: session key → owning server."""
        def read(client: RedisCluster) -> dict[str, str]:
            out = {}
            for raw in client.scan_iter(match=LEASE_PREFIX + b"*", count=1000):
                owner = client.get(raw)
                if owner is not None:
                    out[raw[len(LEASE_PREFIX) + 1:-1].decode()] = owner.decode()
            return out
        return self.redis.call(read)

    # -- leases ----------------------------------------------------------------------------------
    def acquire(self, key: str) -> bool:
        """Take (or keep) the session's lease for one more local request; False when another
        server holds it. Where Redis cannot be reached the request goes on without one (the
        versions still keep the catalog whole)."""
        # Lease calls to Redis take turns (``_ops``): a release that found the lease idle must
        # not delete it in Redis after this request renewed it there. The counts have their
        # own lock, never held over a network call (the engine thread takes it in done()).
        with self._ops:
            with self._lock:
                if self._held[key] > 0:
                    self._held[key] += 1
                    return True
            script = self.redis.script("acquire", _ACQUIRE)
            try:
                ok = int(self.redis.call(lambda c: script(keys=[lease_key(key)],
                                                          args=[self.owner, LEASE_MS],
                                                          client=c)))
            except RemoteUnavailable:
                ok = 1
            if ok:
                with self._lock:
                    self._held[key] += 1
        log.debug("lease %s for %s: %s", key, self.owner[:6], bool(ok))
        return bool(ok)

    def done(self, key: str) -> None:
        """One local request of the session ended (the lease goes once nothing needs it)."""
        with self._lock:
            if self._held[key] > 0:
                self._held[key] -= 1

    def holds(self, key: str) -> bool:
        with self._lock:
            return key in self._held

    def _upkeep(self) -> None:
        renewed = 0.0
        while not self._stop.wait(0.05):
            with self._lock:
                held = dict(self._held)
            idle = [k for k, n in held.items() if n == 0 and not any(f(k) for f in self.needed)]
            for key in idle:
                self._release(key)
            if time.monotonic() - renewed > LEASE_MS / 3000:
                renewed = time.monotonic()
                for key in set(held) - set(idle):
                    self._renew(key)

    def _release(self, key: str) -> None:
        with self._ops:
            with self._lock:
                if self._held.get(key) != 0:
                    return      # a request took it again meanwhile
            script = self.redis.script("release", _RELEASE)
            try:
                self.redis.call(lambda c: script(keys=[lease_key(key)], args=[self.owner],
                                                 client=c))
            except RemoteUnavailable:
                pass    # it expires
            with self._lock:
                if self._held.get(key) == 0:
                    del self._held[key]
        log.debug("lease %s released by %s", key, self.owner[:6])

    def _renew(self, key: str) -> None:
        script = self.redis.script("renew", _RENEW)
        try:
            if not int(self.redis.call(lambda c: script(keys=[lease_key(key)],
                                                        args=[self.owner, LEASE_MS],
                                                        client=c))):
                # Expired while Redis was out of reach, or taken over: the next write of the
                # session is refused if someone else wrote since.
                self.redis.call(lambda c: c.set(lease_key(key), self.owner, nx=True,
                                                px=LEASE_MS))
        except RemoteUnavailable:
            pass

    def close(self) -> None:
        """Release every lease held and stop renewing."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            for key in self._held:
                self._held[key] = 0
            keys = list(self._held)
        for key in keys:
            if self.redis.breaker.allow():
                self._release(key)
