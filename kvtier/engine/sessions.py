"""Sessions: named conversations whose history and KV persist in the store.

A session's catalog entry names its stored sequence (the KV) and keeps its messages and rendered
text in ``data``; forks share every stored block. A session generates one reply at a time: the
engine claims it while a request of it is queued or running.

Sessions belong to a tenant, each with its own ids: the catalog key of tenant ``t``'s session
``id`` is ``~t~id`` (the ``default`` tenant's is ``id`` itself, as before tenants existed). ``~``
sorts after every character of an id, so a tenant's sessions are one contiguous range of keys and
the default tenant's come before every other's.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np

from kvtier.engine.api import (DEFAULT_TENANT, ChatMessage, GenerationRequest, SessionInfo,
                               check_session_id)
from kvtier.engine.prompt import History, message_dicts
from kvtier.errors import (STORAGE_FAULTS, InvalidRequest, ModelMismatch, RemoteUnavailable,
                           SessionBusy, SessionNotFound)
from kvtier.storage.catalog import SessionEntry
from kvtier.storage.manager import TierManager
from kvtier.storage.records import Namespace
from kvtier.storage.remote_link import REMOTE_VERSION
from kvtier.storage.tiers import Tier

log = logging.getLogger(__name__)

MISSING = "missing"
"""The ``blocks_per_tier`` key of a session's blocks that no tier holds any more."""
_TENANT_MARK = "~"


def session_key(tenant: str, session_id: str) -> str:
    """The catalog key of ``tenant``'s session ``session_id`` (an id already checked)."""
    return session_id if tenant == DEFAULT_TENANT else \
        f"{_TENANT_MARK}{tenant}{_TENANT_MARK}{session_id}"


def _prefix(tenant: str) -> str:
    return "" if tenant == DEFAULT_TENANT else f"{_TENANT_MARK}{tenant}{_TENANT_MARK}"


def session_id_of(key: str) -> str:
    """The id a tenant knows its session by."""
    return key.rpartition(_TENANT_MARK)[2]


def new_messages(stored: list[dict[str, str]], sent: tuple[ChatMessage, ...]
                 ) -> tuple[ChatMessage, ...]:
    """The messages of a request that its session does not hold yet.

    A client that resends the whole conversation (as OpenAI clients do) sends the session's
    stored messages first: when ``sent`` begins with every stored message (same roles, same
    contents), only what follows them is new. Otherwise all of ``sent`` is new, as it always was
    for clients that send only the next message.
    """
    n = len(stored)
    if n == 0 or len(sent) < n or any(
            m.role != s.get("role") or m.content != s.get("content")
            for m, s in zip(sent, stored)):
        return sent
    if len(sent) == n:
        raise InvalidRequest("the messages only repeat the session's stored history; add the "
                             "next message", "messages")
    return sent[n:]


class SessionStore:
    """The sessions API over the store, for the model whose KV lives in ``namespace``."""

    def __init__(self, manager: TierManager, namespace: Namespace, model_name: str) -> None:
        self.manager = manager
        self.namespace = namespace
        self.model_name = model_name
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self.remote = manager.remote
        """The shared catalog and remote tier (``tiers.remote_url``), or None."""
        self.storing: Callable[[str], bool] = lambda key: False
        """Whether a turn of the session is still on its way into the store (set by the
        engine): its lease is kept until it is stored and published."""
        if self.remote is not None:
            self.remote.catalog.needed.append(self._needs_lease)

    # -- reading ---------------------------------------------------------------------------------
    def load(self, key: str) -> SessionEntry | None:
        """The stored session a request continues (None: a new one), by its catalog key
        (:func:`session_key`); refuses another model's."""
        entry = self.manager.get_session(key)
        if self.remote is not None:
            # Another server may have continued the session since this one last stored it.
            shared = self.remote.session(key)
            if shared is not None and shared.namespace != self.namespace and entry is None:
                raise ModelMismatch(f"session {session_id_of(key)!r} was computed by another "
                                    "model or KV cache type")
            if shared is not None and shared.namespace == self.namespace and \
                    shared.version > (entry.data.get(REMOTE_VERSION, 0) if entry else 0):
                try:
                    entry = self.remote.import_session(shared, entry)
                except STORAGE_FAULTS as exc:   # the local store refuses it: go on without
                    log.warning("session %r was not imported from the remote catalog: %s",
                                session_id_of(key), exc)
        if entry is not None and entry.namespace != self.namespace:
            raise ModelMismatch(f"session {session_id_of(key)!r} was computed by another model "
                                "or KV cache type")
        return entry

    def history(self, entry: SessionEntry | None) -> History:
        """What ``entry`` brings to its next request: messages, rendered text, stored tokens."""
        if entry is None:
            return History()
        seq = self.manager.get_sequence(Namespace(entry.namespace), entry.sequence)
        tokens = np.frombuffer(seq.tokens, "<i4").astype(np.int32) if seq else \
            np.zeros(0, np.int32)
        return History(list(entry.data.get("messages", [])), entry.data.get("text", ""), tokens)

    def info(self, entry: SessionEntry) -> SessionInfo:
        """The session as the API shows it, with where its blocks are now."""
        seq = self.manager.get_sequence(Namespace(entry.namespace), entry.sequence)
        per_tier = Counter({tier.label: 0 for tier in Tier})
        for block in seq.block_ids() if seq is not None else []:
            e = self.manager.block_entry(block)
            per_tier[Tier(e.tier).label if e else MISSING] += 1
        return SessionInfo(session_id_of(entry.session_id), entry.created, entry.last_used,
                           seq.n_tokens if seq is not None else 0,
                           list(entry.data.get("messages", [])), dict(per_tier),
                           entry.data.get("model", ""), entry.data.get("parent"))

    def list(self, after: str = "", limit: int = 20, tenant: str = DEFAULT_TENANT
             ) -> list[SessionInfo]:
        """``tenant``'s sessions in id order, from after ``after``."""
        prefix = _prefix(tenant)
        start = session_key(tenant, check_session_id(after)) if after else prefix
        entries = self.manager.list_sessions(start, limit)
        return [self.info(e) for e in entries if e.session_id.startswith(prefix)
                and (prefix or not e.session_id.startswith(_TENANT_MARK))]

    def get(self, session_id: str, tenant: str = DEFAULT_TENANT) -> SessionInfo:
        return self.info(self._existing(session_key(tenant, check_session_id(session_id))))

    # -- changing --------------------------------------------------------------------------------
    def delete(self, session_id: str, tenant: str = DEFAULT_TENANT) -> None:
        """Forget the session; blocks that nothing else names are freed."""
        key = session_key(tenant, check_session_id(session_id))
        with self._lock:
            if key in self._busy:
                raise SessionBusy(f"session {session_id!r} is generating a reply")
        shared = False
        if self.remote is not None:
            try:
                shared = self.remote.catalog.delete(key)
            except RemoteUnavailable:
                pass
        if not self.manager.delete_session(key) and not shared:
            raise SessionNotFound(f"no session {session_id!r}")

    def fork(self, session_id: str, new_id: str | None = None,
             tenant: str = DEFAULT_TENANT) -> SessionInfo:
        """A new session of the same tenant with the same history; the two share every stored
        block."""
        entry = self._existing(session_key(tenant, check_session_id(session_id)))
        new_id = check_session_id(new_id) if new_id else uuid.uuid4().hex
        new_key = session_key(tenant, new_id)
        if self.manager.get_session(new_key) is not None:
            raise InvalidRequest(f"session {new_id!r} already exists", "new_id")
        ns = Namespace(entry.namespace)
        seq = self.manager.get_sequence(ns, entry.sequence)
        new_seq = self.manager.new_sequence()
        if seq is not None:
            self.manager.save_sequence(ns, new_seq, np.frombuffer(seq.tokens, "<i4"),
                                       seq.block_ids())
        now = time.time()
        data = dict(entry.data, parent=session_id)
        self.manager.put_session(SessionEntry(new_key, entry.namespace, new_seq, now, now, data))
        return self.info(self._existing(new_key))

    def save_turn(self, key: str, previous: SessionEntry | None,
                  request: GenerationRequest, reply: str, text: str, seq_id: int) -> None:
        """Record one request and its reply: the messages, the conversation's rendered ``text``
        (its special tokens included) and the stored sequence now holding its KV; ``key`` is
        the session's catalog key."""
        now = time.time()
        messages = list(previous.data.get("messages", [])) if previous else []
        if request.messages is not None:
            messages += message_dicts(request.messages)
            messages.append({"role": "assistant", "content": reply})
        else:
            messages.append({"role": "prompt", "content": request.prompt or ""})
            messages.append({"role": "completion", "content": reply})
        data = dict(previous.data) if previous else {}
        data.update(messages=messages, text=text, model=self.model_name)
        self.manager.put_session(SessionEntry(key, self.namespace, seq_id,
                                              previous.created if previous else now, now, data))
        if self.remote is not None:
            self.remote.publish(key, ready=lambda: not self.storing(key))

    # -- one reply at a time ---------------------------------------------------------------------
    def lease(self, key: str) -> None:
        """Take the session's lease in the shared catalog for one request (a no-op without a
        remote tier): :class:`SessionBusy` while another server generates a reply of it."""
        if self.remote is not None and not self.remote.catalog.acquire(key):
            raise SessionBusy(f"session {session_id_of(key)!r} is generating a reply on "
                              "another server")

    def unlease(self, key: str) -> None:
        """The request that took :meth:`lease` is over (the lease goes once its turn is
        stored and published)."""
        if self.remote is not None:
            self.remote.catalog.done(key)

    def _needs_lease(self, key: str) -> bool:
        with self._lock:
            if key in self._busy:
                return True
        return self.storing(key)

    def claim(self, key: str) -> None:
        """Mark the session (by catalog key) as generating; :class:`SessionBusy` if it already
        is."""
        with self._lock:
            if key in self._busy:
                raise SessionBusy(f"session {session_id_of(key)!r} is already generating a "
                                  "reply")
            self._busy.add(key)

    def release(self, key: str) -> None:
        with self._lock:
            self._busy.discard(key)
        self.unlease(key)

    def _existing(self, key: str) -> SessionEntry:
        """The session stored under ``key``; another tenant's is not found under it."""
        entry = self.manager.get_session(key)
        if entry is None:
            raise SessionNotFound(f"no session {session_id_of(key)!r}")
        return entry
