"""The engine: requests in, tokens out, every KV block kept.

One engine thread owns the llama.cpp context. It admits queued requests into slots, restores their
longest stored prefix (or reuses what the slot still holds), prefills the rest, and decodes all
active slots together in one ``llama_decode`` per step. When a request ends, the blocks it computed
are snapshotted into the store and its session (if any) is updated.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.config import Config
from kvtier.engine.api import (CacheStats, Finished, GenerationRequest, SessionInfo, SlotStats,
                               ThroughputStats, TierStats, TokenEvent, TokenStats, Usage,
                               check_session_id)
from kvtier.engine.hot import BatchItem, HotContext, Slot
from kvtier.engine.model import Model, default_model_path
from kvtier.engine.restore_policy import ThroughputModel
from kvtier.engine.sampling import Sampler
from kvtier.engine.snapshot import Snapshotter, StoredSequence
from kvtier.engine.text import TextStream
from kvtier.errors import (ContextOverflow, InvalidRequest, KvtierError, ModelMismatch,
                           ModelNotFound, Overloaded, SessionBusy, SessionNotFound)
from kvtier.storage.catalog import SessionEntry
from kvtier.storage.manager import TierManager
from kvtier.storage.records import Namespace
from kvtier.storage.tiers import Tier

log = logging.getLogger(__name__)

_END = object()


class GenerationHandle:
    """The events of one request: TokenEvents, then a Finished, or an exception."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop
        self._sync: queue.Queue[Any] = queue.Queue()
        self._async: asyncio.Queue[Any] | None = asyncio.Queue() if loop is not None else None
        self.cancelled = threading.Event()

    def _emit(self, item: Any) -> None:
        if self._async is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.cancelled.set()
        else:
            self._sync.put(item)

    def cancel(self) -> None:
        """Stop generating; what was generated so far is still stored."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[TokenEvent | Finished]:
        if self._async is not None:
            raise RuntimeError("this handle was submitted with a loop: use async for")
        while True:
            item = self._sync.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return

    async def _aiter(self) -> AsyncIterator[TokenEvent | Finished]:
        assert self._async is not None
        while True:
            item = await self._async.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return

    def __aiter__(self) -> AsyncIterator[TokenEvent | Finished]:
        if self._async is None:
            raise RuntimeError("this handle was submitted without a loop: use for")
        return self._aiter()

    def result(self) -> Finished:
        """Block until the request is done and return its Finished event."""
        for item in self:
            if isinstance(item, Finished):
                return item
        raise AssertionError("unreachable")


@dataclass(slots=True)
class _Job:
    request: GenerationRequest
    handle: GenerationHandle
    prompt: np.ndarray
    owner: str
    """Who the KV belongs to: ``session:<id>`` or an anonymous conversation key."""
    session: SessionEntry | None
    session_text: str
    """The rendered text that the prompt tokens stand for (sessions extend it exactly)."""
    max_new: int
    slot: Slot | None = None
    seq: StoredSequence | None = None
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    sampler: Sampler | None = None
    stream: TextStream | None = None
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None
    cached: int = 0
    restored: int = 0
    prefill_started: float = 0.0
    finish_reason: str | None = None


class Engine:
    """Loads the model, opens the store, and runs the engine thread."""

    def __init__(self, config: Config, manager: TierManager | None = None) -> None:
        self.config = config
        mc = config.model
        self.model = Model(mc.model_path or default_model_path(), mc.n_gpu_layers)
        self.model_name = self.model.name
        per_token = self.model.kv_bytes_per_token(mc.cache_type_k, mc.cache_type_v)
        if mc.context_size:
            n_ctx = mc.context_size
        else:
            n_ctx = config.tiers.gpu_vram_budget // per_token // mc.n_slots
        self.n_ctx_per_slot = max(mc.block_size, n_ctx // 256 * 256)
        self.n_slots = mc.n_slots
        self.block_size = mc.block_size
        self.fingerprint = self.model.fingerprint(mc.cache_type_k, mc.cache_type_v, mc.block_size)
        self.namespace: Namespace = self.fingerprint.namespace
        self.manager = manager if manager is not None else TierManager(config)
        self._owns_manager = manager is None
        self.manager.register_namespace(self.namespace, self.fingerprint.to_bytes())
        self.throughput = ThroughputModel()
        self.counters = {"restored": 0, "prefilled": 0, "hot_reused": 0, "generated": 0}
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._active: list[_Job] = []
        self._busy_sessions: set[str] = set()
        self._slot_seq: dict[int, StoredSequence] = {}
        self._stopping = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kvtier-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            if self._owns_manager:
                self.manager.close()
            self.model.close()
            raise self._start_error

    def _main(self) -> None:
        """The engine thread: it creates, uses and frees the llama.cpp context. Every decode
        runs on this one thread: llama.cpp's OpenMP thread pool is per calling thread, and a
        second thread's pool (even an idle one) halved decode speed on a 2-core machine."""
        try:
            self.hot = HotContext(self.model, self.config.model, self.n_ctx_per_slot)
            self.snapshots = Snapshotter(self.hot, self.manager, self.namespace,
                                         self.block_size, self.throughput)
        except BaseException as exc:
            self._start_error = exc
            if getattr(self, "hot", None) is not None:
                self.hot.close()
            return
        finally:
            self._started.set()
        try:
            self._run()
        finally:
            self.hot.close()

    # -- public API (any thread) -----------------------------------------------------------------
    def submit(self, request: GenerationRequest,
               loop: asyncio.AbstractEventLoop | None = None) -> GenerationHandle:
        """Validate and queue a request; raises typed errors for requests that cannot run."""
        if request.model and request.model != self.model_name:
            raise ModelNotFound(f"model {request.model!r} is not served here; "
                                f"this server has {self.model_name!r}")
        job = self._prepare(request, GenerationHandle(loop))
        with self._cv:
            if self._stopping:
                raise Overloaded("the server is shutting down", retry_after_s=5)
            if len(self._queue) >= self.config.server.max_queue + self.n_slots - len(self._active):
                raise Overloaded(f"{len(self._queue)} requests are already waiting for a slot")
            if job.session is not None or request.session_id:
                sid = request.session_id or ""
                if sid in self._busy_sessions:
                    raise SessionBusy(f"session {sid!r} is already generating a reply")
                self._busy_sessions.add(sid)
            self._queue.append(job)
            self._cv.notify()
        return job.handle

    def generate(self, request: GenerationRequest) -> Finished:
        """Run a request to the end on the calling thread's behalf (blocking)."""
        return self.submit(request).result()

    # -- sessions --------------------------------------------------------------------------------
    def _session_info(self, entry: SessionEntry) -> SessionInfo:
        seq = self.manager.get_sequence(Namespace(entry.namespace), entry.sequence)
        per_tier = Counter({tier.label: 0 for tier in Tier})
        for block in seq.block_ids() if seq is not None else []:
            e = self.manager.block_entry(block)
            per_tier[e.tier.label if e else "missing"] += 1
        return SessionInfo(entry.session_id, entry.created, entry.last_used,
                           seq.n_tokens if seq is not None else 0,
                           list(entry.data.get("messages", [])), dict(per_tier),
                           entry.data.get("model", ""), entry.data.get("parent"))

    def list_sessions(self, after: str = "", limit: int = 20) -> list[SessionInfo]:
        return [self._session_info(e) for e in self.manager.list_sessions(after, limit)]

    def get_session(self, session_id: str) -> SessionInfo:
        entry = self.manager.get_session(check_session_id(session_id))
        if entry is None:
            raise SessionNotFound(f"no session {session_id!r}")
        return self._session_info(entry)

    def delete_session(self, session_id: str) -> None:
        with self._cv:
            if session_id in self._busy_sessions:
                raise SessionBusy(f"session {session_id!r} is generating a reply")
        if not self.manager.delete_session(check_session_id(session_id)):
            raise SessionNotFound(f"no session {session_id!r}")

    def fork_session(self, session_id: str, new_id: str | None = None) -> SessionInfo:
        """A new session with the same history; the two share every stored block."""
        entry = self.manager.get_session(check_session_id(session_id))
        if entry is None:
            raise SessionNotFound(f"no session {session_id!r}")
        new_id = check_session_id(new_id) if new_id else uuid.uuid4().hex
        if self.manager.get_session(new_id) is not None:
            raise InvalidRequest(f"session {new_id!r} already exists", "new_id")
        ns = Namespace(entry.namespace)
        seq = self.manager.get_sequence(ns, entry.sequence)
        new_seq = self.manager.new_sequence()
        if seq is not None:
            self.manager.save_sequence(ns, new_seq, np.frombuffer(seq.tokens, "<i4"),
                                       seq.block_ids())
        now = time.time()
        data = dict(entry.data, parent=session_id)
        self.manager.put_session(SessionEntry(new_id, entry.namespace, new_seq, now, now, data))
        return self.get_session(new_id)

    def cache_stats(self) -> CacheStats:
        tiers = tuple(TierStats(s.name, s.blocks, s.stored_bytes, s.budget,
                                round(s.compression_ratio, 3), s.hits, s.misses, s.promotions,
                                s.demotions, s.drops, s.corrupt)
                      for s in self.manager.stats())
        with self._cv:
            slots = SlotStats(self.n_slots, len(self._active), len(self._queue))
        return CacheStats(tiers, TokenStats(**self.counters), slots, ThroughputStats(
            round(self.throughput.prefill_tps, 1),
            tuple(round(x, 1) for x in self.throughput.restore_tps)))

    def close(self) -> None:
        """Cut queued requests, finish active ones as cancelled (their KV is stored), close."""
        with self._cv:
            if self._stopping:
                return
            self._stopping = True
            while self._queue:
                job = self._queue.popleft()
                job.handle._emit(Overloaded("the server is shutting down", retry_after_s=5))
            for job in self._active:
                job.handle.cancel()
            self._cv.notify()
        self._thread.join()
        if self._owns_manager:
            self.manager.close()
        self.model.close()

    # -- preparing a request (caller's thread) --------------------------------------------------
    def _prepare(self, request: GenerationRequest, handle: GenerationHandle) -> _Job:
        if (request.messages is None) == (request.prompt is None):
            raise InvalidRequest("give either messages or prompt", "messages")
        session = None
        if request.session_id is not None:
            check_session_id(request.session_id)
            session = self.manager.get_session(request.session_id)
            if session is not None and session.namespace != self.namespace:
                raise ModelMismatch(f"session {request.session_id!r} was computed by another "
                                    "model or KV cache type")
        prompt, text = self._prompt_tokens(request, session)
        if len(prompt) == 0:
            raise InvalidRequest("the prompt is empty", "prompt")
        room = self.n_ctx_per_slot - len(prompt)
        if room < 1:
            raise ContextOverflow(f"the prompt has {len(prompt)} tokens; this server's context "
                                  f"holds {self.n_ctx_per_slot} per conversation")
        max_new = request.sampling.max_tokens
        if max_new is not None and max_new > room:
            raise ContextOverflow(f"prompt ({len(prompt)} tokens) + max_tokens ({max_new}) "
                                  f"exceeds the context of {self.n_ctx_per_slot} tokens")
        owner = f"session:{request.session_id}" if request.session_id else ""
        return _Job(request, handle, prompt, owner, session, text,
                    max_new if max_new is not None else room)

    def _prompt_tokens(self, request: GenerationRequest, session: SessionEntry | None
                       ) -> tuple[np.ndarray, str]:
        """Tokens of the request's prompt and the text they stand for.

        A session's stored tokens are reused as they are and only the new text is tokenized, so
        a resumed conversation's prefix is exactly the stored one.
        """
        stored_text = session.data.get("text", "") if session else ""
        stored_tokens = self._session_tokens(session)
        if request.messages is not None:
            history = list(session.data.get("messages", [])) if session else []
            messages = history + [{"role": m.role, "content": m.content}
                                  for m in request.messages]
            text = self.model.render_chat(messages)
        else:
            text = stored_text + (request.prompt or "")
        if session is not None and stored_text and text.startswith(stored_text):
            suffix = self.model.tokenize(text[len(stored_text):], add_special=False)
            return np.concatenate([stored_tokens, suffix]).astype(np.int32), text
        return self.model.tokenize(text, add_special=True), text

    def _session_tokens(self, session: SessionEntry | None) -> np.ndarray:
        if session is None:
            return np.zeros(0, np.int32)
        seq = self.manager.get_sequence(Namespace(session.namespace), session.sequence)
        return np.frombuffer(seq.tokens, "<i4").astype(np.int32) if seq else np.zeros(0, np.int32)

    # -- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._active and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._active:
                    return
                admitted = []
                while self._queue and not self._stopping:
                    slot = self._free_slot(self._queue[0])
                    if slot is None:
                        break
                    job = self._queue.popleft()
                    job.slot = slot
                    slot.busy = True
                    admitted.append(job)
            for job in admitted:
                try:
                    self._start(job)
                    self._active.append(job)
                except Exception as exc:  # a request that cannot start fails alone
                    log.exception("request could not start")
                    self._fail(job, exc)
            try:
                self._step()
            except Exception as exc:
                log.exception("decode step failed")
                for job in list(self._active):
                    self._fail(job, exc)

    def _free_slot(self, job: _Job) -> Slot | None:
        """The idle slot that holds the longest prefix of the job's prompt, else the LRU one."""
        idle = [s for s in self.hot.slots if not s.busy]
        if not idle:
            return None
        best = max(idle, key=lambda s: (_common_prefix(s.tokens, job.prompt), -s.last_used))
        if _common_prefix(best.tokens, job.prompt) == 0:
            best = min(idle, key=lambda s: s.last_used)
        return best

    def _start(self, job: _Job) -> None:
        slot = job.slot
        assert slot is not None
        prompt = job.prompt
        hot = _common_prefix(slot.tokens, prompt)
        seq = self._slot_seq.get(slot.index)
        # A stateless request may extend the anonymous conversation resident in its slot, never
        # a session's: that would rewrite the session's stored sequence under it.
        continues_slot = job.owner == "" and (slot.owner or "").startswith("seq:")
        session_seq = None
        if job.session is not None:
            session_seq = self.manager.get_sequence(Namespace(job.session.namespace),
                                                    job.session.sequence)
        plan = self.snapshots.plan(prompt, session_seq)
        restored = 0
        if plan.n_tokens > hot and self.snapshots.worth_restoring(plan):
            result = self.snapshots.restore(slot, plan, prompt)
            restored = result.n_tokens
            hot = restored
            seq = None
        if restored == 0 and hot == 0:
            self.hot.clear(slot)
            seq = None
        keep = min(hot, len(prompt) - 1)  # the last prompt token is decoded again for its logits
        self.hot.truncate(slot, keep)
        if job.session is not None:
            seq_id = job.session.sequence
            seq = _truncated(seq, keep, self.block_size) if seq and seq.seq_id == seq_id \
                else StoredSequence(seq_id)
        elif seq is None or not continues_slot or keep < len(seq.blocks) * self.block_size - \
                (self.block_size - seq.tail_tokens if seq.tail else 0):
            seq = StoredSequence(self.manager.new_sequence())
        else:
            seq = _truncated(seq, keep, self.block_size)
        job.seq = seq
        slot.owner = job.owner or f"seq:{seq.seq_id}"
        job.cached = keep
        job.restored = min(restored, keep)
        self.counters["restored"] += job.restored
        self.counters["hot_reused"] += keep - job.restored
        job.pending = prompt[keep:]
        job.sampler = Sampler(job.request.sampling, self.model.n_vocab)
        job.sampler.accept_prompt(prompt)
        job.stream = TextStream(job.request.sampling.stop)
        job.prefill_started = time.perf_counter()

    def _step(self) -> None:
        """One llama_decode for every active slot: a token each for the generating ones, then
        prompt chunks for the prefilling ones, as far as n_batch allows."""
        for job in self._active:
            if job.handle.cancelled.is_set() and not job.finish_reason:
                job.finish_reason = "cancelled"
        for job in [j for j in self._active if j.finish_reason]:
            self._finish(job)
        budget = self.hot.n_batch
        items: list[BatchItem] = []
        jobs: list[_Job] = []
        for job in self._active:
            if job.next_token is not None:
                items.append(BatchItem(job.slot.index, np.array([job.next_token], np.int32),
                                       len(job.slot.tokens), True))
                jobs.append(job)
                budget -= 1
        for job in self._active:
            if job.next_token is None and len(job.pending) and budget > 0:
                chunk = job.pending[:budget]
                job.pending = job.pending[len(chunk):]
                items.append(BatchItem(job.slot.index, chunk, len(job.slot.tokens),
                                       len(job.pending) == 0))
                jobs.append(job)
                budget -= len(chunk)
        if not items:
            return
        outputs = self.hot.decode(items)
        for job, item, index in zip(jobs, items, outputs):
            if job.next_token is not None:
                job.next_token = None
            else:
                self.counters["prefilled"] += len(item.tokens)
                if index >= 0:
                    self.throughput.observe_prefill(len(job.prompt) - job.cached,
                                                    time.perf_counter() - job.prefill_started)
            if index >= 0:
                self._sample(job, index)

    def _sample(self, job: _Job, index: int) -> None:
        token = job.sampler.sample(self.hot.ptr, index)
        job.next_token = token
        job.generated.append(token)
        if self.model.is_eog(token):
            job.finish_reason = "stop"
            return
        self.counters["generated"] += 1
        text, stopped = job.stream.push(self.model.piece(token))
        if text:
            job.handle._emit(TokenEvent(text, token))
        if stopped:
            job.finish_reason = "stop"
        elif len(job.generated) >= job.max_new or \
                len(job.slot.tokens) + 1 >= self.n_ctx_per_slot:
            job.finish_reason = "length"

    def _finish(self, job: _Job) -> None:
        """Decode the last sampled token (so the KV holds the whole reply), store, report."""
        self._active.remove(job)
        slot = job.slot
        outcome: Finished | KvtierError
        try:
            if job.next_token is not None and len(slot.tokens) < self.n_ctx_per_slot:
                self.hot.decode([BatchItem(slot.index, np.array([job.next_token], np.int32),
                                           len(slot.tokens), False)])
                job.next_token = None
            tail = job.stream.finish()
            if tail:
                job.handle._emit(TokenEvent(tail, -1))
            job.seq = self.snapshots.save(slot, job.seq)
            self._slot_seq[slot.index] = job.seq
            session_id = self._save_session(job)
            usage = Usage(len(job.prompt), sum(1 for t in job.generated
                                               if not self.model.is_eog(t)),
                          job.cached, job.restored, len(job.prompt) - job.cached)
            outcome = Finished(job.stream.text, job.finish_reason or "stop", usage, session_id)
        except Exception as exc:
            log.exception("finishing a request failed")
            outcome = exc if isinstance(exc, KvtierError) else \
                KvtierError(f"finishing the request failed: {exc}")
        # Release first: a client that submits again as soon as it has the result must find the
        # slot and the session free.
        self._release(job)
        job.handle._emit(outcome)

    def _save_session(self, job: _Job) -> str | None:
        sid = job.request.session_id
        if sid is None:
            return None
        now = time.time()
        old = job.session
        messages = list(old.data.get("messages", [])) if old else []
        if job.request.messages is not None:
            messages += [{"role": m.role, "content": m.content} for m in job.request.messages]
            messages.append({"role": "assistant", "content": job.stream.text})
        else:
            messages.append({"role": "prompt", "content": job.request.prompt or ""})
            messages.append({"role": "completion", "content": job.stream.text})
        generated_text = b"".join(self.model.piece(t, special=True)
                                  for t in job.generated).decode("utf-8", errors="replace")
        data = dict(old.data) if old else {}
        data.update(messages=messages, text=job.session_text + generated_text,
                    model=self.model_name)
        self.manager.put_session(SessionEntry(sid, self.namespace, job.seq.seq_id,
                                              old.created if old else now, now, data))
        return sid

    def _fail(self, job: _Job, exc: Exception) -> None:
        if job in self._active:
            self._active.remove(job)
        if job.slot is not None:
            self.hot.clear(job.slot)
            self._slot_seq.pop(job.slot.index, None)
        self._release(job)
        job.handle._emit(exc if isinstance(exc, KvtierError) else
                         KvtierError(f"generation failed: {exc}"))

    def _release(self, job: _Job) -> None:
        if job.sampler is not None:
            job.sampler.close()
        with self._cv:
            if job.slot is not None:
                job.slot.busy = False
            self._busy_sessions.discard(job.request.session_id or "")


def _truncated(seq: StoredSequence, keep: int, block_size: int) -> StoredSequence:
    n_full = keep // block_size
    tail_ok = seq.tail is not None and keep >= len(seq.full) * block_size + seq.tail_tokens \
        and len(seq.full) == n_full
    return StoredSequence(seq.seq_id, seq.full[:n_full], seq.chains[:n_full],
                          seq.tail if tail_ok else None, seq.tail_tokens if tail_ok else 0)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n
