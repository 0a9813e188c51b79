"""Worker threads for numeric kernels that release the GIL (decoding records, key summaries,
block scores, encoding), in two pools: :data:`ENGINE`, one thread per core, for work the engine
thread waits on (a restore's or a working set's decoding, scoring); and :data:`STORE`, a quarter
of the cores, for the background's encoding (the store writer, demotions), so that it never takes
every core from the engine. On an H200 host, the background encoding on every core made the
engine's scoring 5x and its decoding 3x slower (docs/benchmarks.md, issue 10).

:meth:`Workers.run_all` runs a list of calls on a pool and on the calling thread, and
:meth:`Workers.map_in_parts` maps a function over a list in parts. The caller never waits behind
work queued by others (it takes its calls back from the queue and runs them itself), and a worker
that fans out runs its calls itself, so no task ever waits on a pool its own waiting has filled.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_local = threading.local()


def n_cores() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def spans(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` runs of consecutive indices, as even as they go (fewer
    when ``n`` is smaller; one, empty, when ``n`` is 0)."""
    parts = max(1, min(n, parts))
    return [range(p * n // parts, (p + 1) * n // parts) for p in range(parts)]


def _mark() -> None:
    _local.worker = True


class Workers:
    """A pool of worker threads, started on first use."""

    def __init__(self, name: str, threads: Callable[[], int]) -> None:
        self.name = name
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def n_threads(self) -> int:
        return self._threads()

    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.n_threads,
                                                thread_name_prefix=self.name, initializer=_mark)
            return self._pool

    def run_all(self, calls: Iterable[Callable[[], T]]) -> list[T]:
        """The results of ``calls``, in order, run on the pool's threads and this one; the first
        exception raised is raised here once every call is done.

        This thread runs the first call itself, then each call that no worker has started yet
        (it is taken back from the queue): so it waits only for calls running on a worker, never
        behind other work queued on a busy pool. Called from a worker thread (of any pool), it
        runs every call itself."""
        calls = list(calls)
        if len(calls) < 2 or getattr(_local, "worker", False):
            outcomes = [_outcome(call) for call in calls]
        else:
            futures = [self.pool().submit(call) for call in calls[1:]]
            outcomes = [_outcome(calls[0])]
            for future, call in zip(futures, calls[1:]):
                outcomes.append(_outcome(call) if future.cancel() else _outcome(future.result))
        for ok, value in outcomes:
            if not ok:
                raise value
        return [value for _, value in outcomes]

    def map_in_parts(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` of every item, in order: the items split in one run of consecutive items per
        thread (a call per item would cost more than the kernels of a small record)."""
        runs = self.run_all(lambda span=span: [fn(items[i]) for i in span]
                            for span in spans(len(items), self.n_threads + 1))
        return [result for run in runs for result in run]


def _outcome(call: Callable[[], T]) -> tuple[bool, T | BaseException]:
    try:
        return True, call()
    except BaseException as exc:  # raised by run_all once every call is done
        return False, exc


ENGINE = Workers("kvtier-work", n_cores)
"""For work the engine thread waits on: one thread per core."""
STORE = Workers("kvtier-store-work", lambda: max(1, n_cores() // 4))
"""For the background's encoding: a quarter of the cores (one on a small machine)."""
