"""The engine: requests in, tokens out, every KV block kept.

:class:`Engine` loads the model, opens the store and starts the engine thread
(:mod:`kvtier.engine.scheduler`); it checks and queues requests, serves the sessions API
(:mod:`kvtier.engine.sessions`) and reports the cache's state as one typed :class:`CacheStats`.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

from kvtier.config import Config
from kvtier.engine.api import (DEFAULT_TENANT, CacheStats, Finished, GenerationRequest,
                               HotStats, RemoteStats, SessionInfo, ThroughputStats, TierStats,
                               check_session_id)
from kvtier.engine.handle import GenerationHandle
from kvtier.engine.model import Model, default_model_path
from kvtier.engine.paging import Window
from kvtier.engine.prompt import build_prompt
from kvtier.engine.restore_policy import ThroughputModel
from kvtier.engine.job import Job
from kvtier.engine.scheduler import Scheduler
from kvtier.engine.sessions import SessionStore, new_messages, session_key
from kvtier.engine.sizing import hot_sizing
from kvtier.engine.windows import session_prefetch
from kvtier.engine.slots import SessionOwner
from kvtier.errors import ContextOverflow, InvalidRequest
from kvtier.storage.manager import TierManager
from kvtier.storage.records import Namespace
from kvtier.storage.tiers import Tier


class Engine:
    """Loads the model, opens the store, and runs the engine thread."""

    def __init__(self, config: Config, manager: TierManager | None = None) -> None:
        self.config = config
        mc = config.model
        self.model = Model(mc.model_path or default_model_path(), mc.n_gpu_layers)
        self.model_name = self.model.name
        self.n_slots = mc.n_slots
        self.block_size = mc.block_size
        self.sizing = hot_sizing(config, self.model.kv_bytes_per_token(*mc.cache_types),
                                 self.model.n_ctx_train, self.model.n_swa)
        self.context_size = self.sizing.context_size
        """The longest conversation a slot holds (hot, or through the working set)."""
        self.fingerprint = self.model.fingerprint(mc.cache_type_k, mc.cache_type_v, mc.block_size)
        self.namespace: Namespace = self.fingerprint.namespace
        self.manager = manager if manager is not None else TierManager(config)
        self._owns_manager = manager is None
        self.manager.register_namespace(self.namespace, self.fingerprint.to_bytes())
        self.sessions = SessionStore(self.manager, self.namespace, self.model_name)
        self._close_lock = threading.Lock()
        self._closed = False
        try:
            self._scheduler = Scheduler(config, self.model, self.sizing, self.manager,
                                        self.namespace, self.sessions)
        except BaseException:
            self._close_resources()
            raise
        writer = self._scheduler.writer
        self.sessions.storing = lambda key: not writer.wait_session(key, 0)

    # -- generation (any thread) -----------------------------------------------------------------
    def submit(self, request: GenerationRequest,
               loop: asyncio.AbstractEventLoop | None = None) -> GenerationHandle:
        """Check and queue a request; raises typed errors for requests that cannot run.

        Its ``model`` is not checked: an engine serves one model, and the pool
        (:mod:`kvtier.engine.pool`) routes requests by name. With ``loop``, read the handle with
        ``async for`` on that loop; without, with ``for``.
        """
        job = self._prepare(request, GenerationHandle(loop))
        try:
            self._scheduler.submit(job)
        except BaseException:
            if job.owner is not None:
                self.sessions.unlease(job.owner.session_id)
            raise
        if job.session is not None and self.config.working_set.prefetch:
            self._prefetch(job)
        return job.handle

    def _prefetch(self, job: Job) -> None:
        """Start promoting the session's blocks that its restore will read, while the request
        waits for its turn (cool and cold reads are the slow part of a restore)."""
        seq = self.manager.get_sequence(self.namespace, job.session.sequence)
        if seq is None:
            return
        blocks = seq.block_ids()
        entries = [self.manager.block_entry(b) for b in blocks]
        attention = [e.attention if e is not None else -1.0 for e in entries]
        self.manager.prefetch(session_prefetch(blocks, attention, self.sizing))

    def generate(self, request: GenerationRequest) -> Finished:
        """Run a request to the end on the calling thread's behalf (blocking)."""
        return self.submit(request).result()

    def _prepare(self, request: GenerationRequest, handle: GenerationHandle) -> Job:
        """The request's job: its session, prompt tokens and token budget, checked."""
        if (request.messages is None) == (request.prompt is None):
            raise InvalidRequest("give either messages or prompt", "messages")
        key = None
        if request.session_id is not None:
            key = session_key(request.tenant, check_session_id(request.session_id))
            # The session's previous turn may still be on its way into the store.
            self._scheduler.writer.wait_session(key)
            # Servers sharing a remote tier: one at a time writes a session.
            self.sessions.lease(key)
        try:
            return self._prepare_job(request, handle, key)
        except BaseException:
            if key is not None:
                self.sessions.unlease(key)
            raise

    def _prepare_job(self, request: GenerationRequest, handle: GenerationHandle,
                     key: str | None) -> Job:
        session = self.sessions.load(key) if key is not None else None
        owner = SessionOwner(key) if key is not None else None
        history = self.sessions.history(session)
        if request.messages is not None:
            request = replace(request, messages=new_messages(history.messages, request.messages))
        prompt = build_prompt(self.model, request, history, self.context_size)
        n_prompt = len(prompt.tokens)
        if n_prompt == 0:
            raise InvalidRequest("the prompt is empty", "prompt")
        room = self.context_size - n_prompt
        if room < 1:
            raise ContextOverflow(f"the prompt has {n_prompt} tokens; this server's context "
                                  f"holds {self.context_size} per conversation")
        max_new = request.sampling.max_tokens
        if max_new is not None and max_new > room:
            raise ContextOverflow(f"prompt ({n_prompt} tokens) + max_tokens ({max_new}) "
                                  f"exceeds the context of {self.context_size} tokens")
        if self.manager.remote is not None:
            # Blocks another server computed for this prompt's prefix (a shared system prompt,
            # a session's history) come into the local tiers before the request is admitted.
            self.manager.remote.fetch_prefix(self.namespace, prompt.tokens, self.block_size)
        return Job(request, handle, prompt.tokens, owner, session, prompt.text,
                   max_new if max_new is not None else room)

    # -- sessions --------------------------------------------------------------------------------
    def wait_session(self, session_id: str | None = None, tenant: str = DEFAULT_TENANT) -> None:
        """Wait until ``tenant``'s session's previous turn (None: every session's) is in the
        store, as a request of it does before it is prepared (a caller can wait here first, on
        a thread of its choosing)."""
        self._scheduler.writer.wait_session(
            None if session_id is None else session_key(tenant, check_session_id(session_id)))

    def list_sessions(self, after: str = "", limit: int = 20, tenant: str = DEFAULT_TENANT
                      ) -> list[SessionInfo]:
        """``tenant``'s sessions in id order, from after ``after``."""
        self._scheduler.writer.wait_session()
        return self.sessions.list(after, limit, tenant)

    def get_session(self, session_id: str, tenant: str = DEFAULT_TENANT) -> SessionInfo:
        self._scheduler.writer.wait_session(session_key(tenant, check_session_id(session_id)))
        return self.sessions.get(session_id, tenant)

    def delete_session(self, session_id: str, tenant: str = DEFAULT_TENANT) -> None:
        """Forget a session; :class:`SessionBusy` while it is generating a reply."""
        self._scheduler.writer.wait_session(session_key(tenant, check_session_id(session_id)))
        self.sessions.delete(session_id, tenant)

    def fork_session(self, session_id: str, new_id: str | None = None,
                     tenant: str = DEFAULT_TENANT) -> SessionInfo:
        """A new session with the same history; the two share every stored block."""
        self._scheduler.writer.wait_session(session_key(tenant, check_session_id(session_id)))
        return self.sessions.fork(session_id, new_id, tenant)

    # -- state -----------------------------------------------------------------------------------
    def idle(self) -> bool:
        """No request is queued or generating (one that finished may still be storing)."""
        slots = self._scheduler.slot_stats()
        return slots.busy == 0 and slots.queued == 0

    def memory_bytes(self) -> int:
        """What this engine holds in memory: the GGUF file and the hot tier's KV cache."""
        kv = self.model.kv_bytes_per_token(*self.config.model.cache_types)
        return self.model.path.stat().st_size + self.sizing.n_ctx * kv

    def wait_stored(self, timeout: float | None = None) -> bool:
        """Wait until the KV of every request finished so far is in the store (requests are
        answered first and stored in the background); False on timeout."""
        return self._scheduler.writer.drain(timeout)

    def cache_stats(self) -> CacheStats:
        """The store's tiers, the engine's token counts, its slots and measured throughput."""
        tiers = tuple(TierStats(s.name, s.blocks, s.stored_bytes, s.budget,
                                round(s.compression_ratio, 3), s.hits, s.misses, s.promotions,
                                s.demotions, s.drops, s.corrupt, s.write_errors)
                      for s in self.manager.stats())
        return CacheStats(tiers, self._scheduler.tokens.stats(), self._scheduler.slot_stats(),
                          _throughput_stats(self._scheduler.throughput),
                          self._scheduler.working_set_stats(),
                          self._scheduler.writer.stats(), self.manager.degradation(),
                          self.hot_stats(), remote=self.remote_stats())

    def remote_stats(self) -> RemoteStats:
        remote = self.manager.remote
        if remote is None:
            return RemoteStats()
        s = remote.stats()
        return RemoteStats(True, s.available, s.errors, s.conflicts, s.blocks_sent,
                           s.blocks_fetched, s.sessions_written, s.queued, s.dropped,
                           s.evictions)

    def hot_stats(self) -> HotStats:
        """What the slots hold in llama.cpp's cache now (read while the engine thread runs)."""
        scheduler, bs = self._scheduler, self.block_size
        tokens = blocks = 0
        for slot in scheduler.hot.slots:
            window = scheduler.windows.get(slot)
            if window is None:
                held = len(slot.tokens)
                tokens, blocks = tokens + held, blocks + -(-held // bs)
            else:
                tokens, blocks = tokens + _held_tokens(window), blocks + len(window.held)
        kv = self.model.kv_bytes_per_token(*self.config.model.cache_types)
        return HotStats(self.n_slots, tokens, blocks, tokens * kv,
                        self.n_slots * self.sizing.slot_tokens * kv)

    def close(self) -> None:
        """Cut queued requests, finish active ones as cancelled (their KV is stored), close."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._scheduler.close()
            self._close_resources()

    def _close_resources(self) -> None:
        if self._owns_manager:
            self.manager.close()
        self.model.close()


def _held_tokens(window: Window) -> int:
    """A working set's held tokens, read from another thread than the one changing them."""
    for _ in range(3):
        try:
            return window.held_tokens
        except RuntimeError:  # the engine thread changed the held blocks while we read them
            continue
    return len(window.held) * window.block_size


def _throughput_stats(throughput: ThroughputModel) -> ThroughputStats:
    return ThroughputStats(round(throughput.prefill_tps, 1),
                           tuple(round(throughput.restore_tps[t], 1) for t in Tier))
