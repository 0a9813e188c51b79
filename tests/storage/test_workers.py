"""The worker pools: results in order, errors after every call is done, and a caller that never
waits behind work others queued."""

import threading
import time

import pytest

from kvtier.storage.workers import ENGINE, STORE, spans


def test_results_come_in_the_order_of_the_calls() -> None:
    assert ENGINE.run_all(lambda i=i: i * i for i in range(20)) == [i * i for i in range(20)]
    assert STORE.map_in_parts(lambda x: x + 1, list(range(37))) == list(range(1, 38))
    assert ENGINE.map_in_parts(lambda x: x, []) == []


def test_spans_cut_a_range_into_even_runs() -> None:
    assert spans(10, 3) == [range(0, 3), range(3, 6), range(6, 10)]
    assert spans(2, 8) == [range(0, 1), range(1, 2)]
    assert spans(0, 4) == [range(0, 0)]


def test_an_error_is_raised_once_every_call_is_done() -> None:
    done = []

    def slow() -> None:
        time.sleep(0.2)
        done.append(True)

    def fail() -> None:
        raise ValueError("bad record")
    with pytest.raises(ValueError, match="bad record"):
        ENGINE.run_all([fail, slow, slow])
    assert done == [True, True]


@pytest.mark.parametrize("pool", [ENGINE, STORE], ids=["engine", "store"])
def test_a_caller_does_not_wait_behind_a_busy_pool(pool) -> None:
    # Every worker is held by someone else's call: the caller's calls, still queued, are taken
    # back and run on the caller's thread.
    release = threading.Event()
    held = [pool.pool().submit(release.wait, 30) for _ in range(pool.n_threads)]
    try:
        names = pool.run_all(lambda: threading.current_thread().name for _ in range(4))
        assert names == [threading.current_thread().name] * 4
    finally:
        release.set()
        for future in held:
            future.result()


def test_a_worker_that_fans_out_runs_its_calls_itself() -> None:
    def fan_out() -> set[str]:
        return set(STORE.run_all(lambda: threading.current_thread().name for _ in range(8)))
    results = ENGINE.run_all([fan_out] * (ENGINE.n_threads + 2))
    assert all(len(names) == 1 for names in results)
