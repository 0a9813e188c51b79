"""The engine thread: batched decoding of every active request, and handing what each computed to
the store.

One thread owns the llama.cpp context. It admits queued jobs into slots and starts them
(:mod:`.admission`: restore, reuse what the slot holds, or prefill), then decodes all active slots
together in one ``llama_decode`` per step. When a job ends, the cells it computed are read out of
llama.cpp and queued for the store writer (:mod:`.store_writer`) with its session's update; a
conversation on a working set has stored its blocks as they filled (:mod:`.windows`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np

from kvtier.config import Config
from kvtier.engine.admission import Admission
from kvtier.engine.api import Finished, SlotStats, TokenEvent, Usage, WorkingSetStats
from kvtier.engine.host_buffers import BufferPool, CudaRegistrar
from kvtier.engine.hot import BatchItem, HotContext
from kvtier.engine.job import Job, TokenCounts
from kvtier.engine.model import Model
from kvtier.engine.query_capture import RowRange
from kvtier.engine.restore_policy import ThroughputModel
from kvtier.engine.sessions import SessionStore
from kvtier.engine.sizing import HotSizing
from kvtier.engine.snapshot import Snapshotter
from kvtier.engine.store_writer import StoreWriter
from kvtier.engine.warmup import warm_up
from kvtier.engine.windows import WindowedSlots
from kvtier.errors import STORAGE_FAULTS, KvtierError, Overloaded
from kvtier.storage.manager import TierManager
from kvtier.storage.records import Namespace

log = logging.getLogger(__name__)


class Scheduler:
    """Runs the engine thread; :meth:`submit` and :meth:`close` may be called from any thread."""

    def __init__(self, config: Config, model: Model, sizing: HotSizing, manager: TierManager,
                 namespace: Namespace, sessions: SessionStore) -> None:
        self.config = config
        self.model = model
        self.sizing = sizing
        self.context_size = sizing.context_size
        self.n_slots = config.model.n_slots
        self.block_size = config.model.block_size
        self.manager = manager
        self.namespace = namespace
        self.sessions = sessions
        self.throughput = ThroughputModel()
        self.tokens = TokenCounts()
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._active: list[Job] = []
        self._stopping = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        # Finished requests are stored by this writer's thread; the engine thread only reads
        # their new cells out of llama.cpp (see Snapshotter.prepare).
        registrar = CudaRegistrar.find()
        log.info("state buffers for stores and restores: %s",
                 f"pinned through {registrar.name}" if registrar is not None
                 else "pageable (no CUDA runtime in this process)")
        self.writer = StoreWriter(manager, BufferPool(config.tiers.store_queue_budget, registrar,
                                                      "store buffers"))
        self._thread = threading.Thread(target=self._main, name="kvtier-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            self.writer.close()
            raise self._start_error

    def _main(self) -> None:
        """The engine thread: it creates, uses and frees the llama.cpp context. Every decode
        runs on this one thread: llama.cpp's OpenMP thread pool is per calling thread, and a
        second thread's pool (even an idle one) halved decode speed on a 2-core machine."""
        try:
            self.hot = HotContext(self.model, self.config.model, self.sizing,
                                  self.config.working_set.query_layer_stride)
            self.snapshots = Snapshotter(self.hot, self.manager, self.namespace,
                                         self.block_size, self.throughput, self.writer)
            ws = self.config.working_set
            self.windows = WindowedSlots(self.hot, self.sizing, self.manager, self.namespace,
                                         ws.query_tokens, ws.reselect_tokens, ws.prefetch,
                                         self.writer, ws.score,
                                         self.snapshots.restore_buffers)
            self.admission = Admission(self.model, self.hot, self.sizing, self.manager,
                                       self.snapshots, self.windows, self.tokens,
                                       self.block_size)
            server = self.config.server
            self.admission.shared_tails = not (server.api_keys or server.api_keys_file)
            log.info("engine warmed up in %.2f s", warm_up(self.hot, self.model))
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
            self.snapshots.close()
            self.hot.close()

    # -- any thread ------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it: :class:`Overloaded`, :class:`SessionBusy`."""
        with self._cv:
            if self._stopping:
                raise Overloaded("the server is shutting down", retry_after_s=5)
            if len(self._queue) >= self.config.server.max_queue + self.n_slots - len(self._active):
                raise Overloaded(f"{len(self._queue)} requests are already waiting for a slot")
            if job.owner is not None:
                self.sessions.claim(job.owner.session_id)
            self._queue.append(job)
            self._cv.notify()

    def working_set_stats(self) -> WorkingSetStats:
        stats = self.windows.stats()
        return WorkingSetStats(**{n: getattr(stats, n) for n in WorkingSetStats.__slots__})

    def slot_stats(self) -> SlotStats:
        with self._cv:
            return SlotStats(self.n_slots, len(self._active), len(self._queue))

    def close(self) -> None:
        """Cut queued jobs, finish active ones as cancelled, stop, and store everything."""
        with self._cv:
            if self._stopping:
                return
            self._stopping = True
            while self._queue:
                self._queue.popleft().handle.fail(
                    Overloaded("the server is shutting down", retry_after_s=5))
            for job in self._active:
                job.handle.cancel()
            self._cv.notify()
        self._thread.join()
        self.writer.close()

    # -- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._active and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._active:
                    return
                admitted = []
                idle = sum(not s.busy for s in self.hot.slots)
                while self._queue and not self._stopping and len(admitted) < idle:
                    admitted.append(self._queue.popleft())
            for job in admitted:
                try:
                    self.admission.admit(job)
                    self.admission.start(job)
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

    def _step(self) -> None:
        """One llama_decode for every active slot: a token each for the generating ones, then
        prompt chunks for the prefilling ones, as far as n_batch allows. Jobs on a working set
        arrange it before, and capture the queries that choose the next one."""
        for job in self._active:
            if job.handle.cancelled and not job.finish_reason:
                job.finish_reason = "cancelled"
        for job in [j for j in self._active if j.finish_reason]:
            self._finish(job)
        budget = self.hot.n_batch
        items: list[BatchItem] = []
        jobs: list[Job] = []
        captures: list[tuple[Job, RowRange]] = []
        rows = 0
        for job in self._active:
            if job.next_token is not None:
                turn = job.turn
                pos = turn.window.prepare(1) if turn else len(job.slot.tokens)
                if turn and self.windows.wants_queries(turn, prefill=False):
                    captures.append((job, RowRange(rows, 1)))
                items.append(BatchItem(job.slot.index, np.array([job.next_token], np.int32),
                                       pos, True))
                jobs.append(job)
                rows += 1
        for job in self._active:
            if job.next_token is None and len(job.pending) and rows < budget:
                if job.turn:
                    chunk = self.windows.prefill_chunk(job.turn, job.pending, budget - rows)
                    pos = job.turn.window.prepare(len(chunk))
                    captures.append((job, self.windows.capture_range(rows, len(chunk))))
                else:
                    chunk = job.pending[:budget - rows]
                    pos = len(job.slot.tokens)
                job.pending = job.pending[len(chunk):]
                items.append(BatchItem(job.slot.index, chunk, pos, len(job.pending) == 0))
                jobs.append(job)
                rows += len(chunk)
        if not items:
            return
        # Queries come out of one micro-batch only (query_capture): a larger batch goes without.
        armed = bool(captures) and rows <= self.hot.n_ubatch
        if armed:
            self.hot.capture.arm([r for _, r in captures])
        outputs = self.hot.decode(items)
        queries = dict(zip((id(j) for j, _ in captures), self.hot.capture.collect())) \
            if armed else {}
        for job, item, index in zip(jobs, items, outputs):
            q = queries.get(id(job))
            if job.next_token is not None:
                job.next_token = None
                if job.turn:
                    self.windows.after_token(job.turn, q)
            else:
                if job.turn and not self.windows.after_prefill(job.turn, item.tokens, index >= 0,
                                                               q):
                    job.pending = np.concatenate([item.tokens, job.pending])
                    continue
                self.tokens.prefilled += len(item.tokens)
                if index >= 0:
                    self.throughput.observe_prefill(len(job.prompt) - job.cached,
                                                    time.perf_counter() - job.prefill_started)
            if index >= 0:
                self._sample(job, index)

    def _sample(self, job: Job, index: int) -> None:
        token = job.sampler.sample(self.hot.ptr, index)
        job.next_token = token
        job.generated.append(token)
        if self.model.is_eog(token):
            job.finish_reason = "stop"
            return
        self.tokens.generated += 1
        text, stopped = job.stream.push(self.model.piece(token))
        if text:
            job.handle.emit_token(TokenEvent(text, token))
        if stopped:
            job.finish_reason = "stop"
        elif len(job.generated) >= job.max_new or \
                len(job.slot.tokens) + 1 >= self.context_size:
            job.finish_reason = "length"

    def _finish(self, job: Job) -> None:
        """Decode the last sampled token (so the KV holds the whole reply), store, report."""
        self._active.remove(job)
        try:
            finished = self._store(job)
        except Exception as exc:
            log.exception("finishing a request failed")
            self._release(job)
            job.handle.fail(_as_kvtier_error(exc, "finishing the request failed"))
            return
        # Release first: a client that submits again as soon as it has the result must find the
        # slot and the session free.
        self._release(job)
        job.handle.finish(finished)

    def _store(self, job: Job) -> Finished:
        """Decode the last token, read the cells the store lacks, and queue them for the store
        writer (with the session's update, which must follow its sequence): the only part of
        storing that runs on the engine thread is reading the state out of llama.cpp."""
        slot = job.slot
        if job.next_token is not None and len(slot.tokens) < self.context_size:
            pos = job.turn.window.prepare(1) if job.turn else len(slot.tokens)
            self.hot.decode([BatchItem(slot.index, np.array([job.next_token], np.int32),
                                       pos, False)])
            if job.turn:
                self.windows.after_token(job.turn, None)
            job.next_token = None
        tail = job.stream.finish()
        if tail:
            job.handle.emit_token(TokenEvent(tail, -1))
        try:
            self._submit_store(job)
        except STORAGE_FAULTS as exc:
            # A full disk or a damaged store costs the cache this turn, never the reply.
            log.warning("a finished reply is not stored: %s", exc)
            self.admission.slot_seq.pop(slot.index, None)
        usage = Usage(len(job.prompt), sum(1 for t in job.generated if not self.model.is_eog(t)),
                      job.cached, job.restored, len(job.prompt) - job.cached,
                      job.turn.window.held_tokens if job.turn else len(slot.tokens))
        return Finished(job.stream.text, job.finish_reason or "stop", usage,
                        job.request.session_id)

    def _submit_store(self, job: Job) -> None:
        """Queue the turn's KV for the store writer and, before the reply goes out, record its
        messages: a turn the client was answered is never lost, while its KV, until stored, is
        only recomputed on the next turn."""
        slot = job.slot
        if job.turn:
            # A long conversation's full blocks were queued as they filled; the rest is here.
            job.seq, store = self.windows.finish(job.turn)
        else:
            job.seq, store = self.snapshots.prepare(slot, job.seq)
        self.admission.slot_seq[slot.index] = job.seq
        if job.owner is not None:
            store.session_id = job.owner.session_id
        self.writer.submit(store)
        self._save_turn(job)

    def _save_turn(self, job: Job) -> None:
        """Record a session's new turn now (one synced catalog commit, ~3 ms). Its sequence keeps
        the id it had (a new session's starts empty: whichever of this and the writer's save
        comes first), so until the writer stores the turn's KV the session resumes from its
        previous turns' blocks and recomputes the rest."""
        if job.owner is None:
            return
        generated = b"".join(self.model.piece(t, special=True)
                             for t in job.generated).decode("utf-8", errors="replace")
        self.sessions.save_turn(job.owner.session_id, job.session, job.request,
                                job.stream.text, job.session_text + generated, job.seq.seq_id)

    def _fail(self, job: Job, exc: Exception) -> None:
        if job in self._active:
            self._active.remove(job)
        if job.slot is not None:
            self.windows.drop(job.slot)
            self.hot.clear(job.slot)
            self.admission.slot_seq.pop(job.slot.index, None)
        self._release(job)
        job.handle.fail(_as_kvtier_error(exc, "generation failed"))

    def _release(self, job: Job) -> None:
        if job.sampler is not None:
            job.sampler.close()
        with self._cv:
            if job.slot is not None:
                job.slot.busy = False
        if job.owner is not None:
            self.sessions.release(job.owner.session_id)


def _as_kvtier_error(exc: Exception, what: str) -> KvtierError:
    """Typed errors pass as they are; anything else becomes a KvtierError saying ``what``."""
    return exc if isinstance(exc, KvtierError) else KvtierError(f"{what}: {exc}")
