"""What one working-set change costs: the time of each step a long conversation's working set
takes, measured inside the engine while it serves a long prompt and then generates.

    python -m bench.bench_window_ops [--tokens 16384] [--hot 1024] [--generate 256]
    python3 -m bench.bench_window_ops --model /tmp/kvtier-8b.gguf --hot 8192 --tokens 40000 \
        --generate 32 --out window_ops_8b        # on a GPU machine

Steps (``kvtier.engine.paging.Window``): ``score`` (the queries against every stored block's key
summary), ``replan`` (which blocks, where), ``apply`` (drops, K-shift moves, and loads from the
store through the scratch sequence; ``load`` is that last part alone), ``store_block`` (a filled
block read out and handed to the store writer), ``writer.*`` (the store writer's threads: a
block's ``put_block``, the room made for it, a demoted block's copy and commit, the tiers'
writes), and ``decode`` (every ``llama_decode`` of the engine, prefill chunks and generated
tokens, the query capture included). Each is timed around the call (wall clock, on the engine
thread but for ``writer.*``) and reported as a count, a median and a total, beside the request's
wall time; ``score.*``, ``load.*`` and ``store_block.*`` are parts of those steps.
``--baseline`` serves the same prompt again with the whole conversation hot (full attention, no
working set) and prints the ratio of the two wall times. Writes bench/results/window_ops.json
(``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import tempfile
import time
from pathlib import Path
from collections import defaultdict

from bench import passkey
from bench.common import print_table, write_json
from kvtier.config import load_config
from kvtier.engine import paging
from kvtier.engine.block_scores import SummaryStack
from kvtier.engine.api import GenerationRequest, SamplingParams
from kvtier.engine.engine import Engine
from kvtier.engine.host_buffers import BufferPool
from kvtier.engine.hot import HotContext
from kvtier.engine.model import Model, default_model_path
from kvtier.storage.manager import TierManager
from kvtier.storage import codec, workers
from kvtier.storage.balancer import Balancer
from kvtier.storage.reads import BlockReader
from kvtier.storage.tiers import LmdbTier, RocksTier

TIMES: dict[str, list[float]] = defaultdict(list)
LOCK_WAITS: dict[str, list[float]] = defaultdict(list)


class TimedLock:
    """The store index's lock, timing how long each thread waits to take it."""

    def __init__(self, lock) -> None:
        self._lock = lock

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        start = time.perf_counter()
        taken = self._lock.acquire(blocking, timeout)
        LOCK_WAITS[threading.current_thread().name.split("_")[0]].append(
            time.perf_counter() - start)
        return taken

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def timed(owner, name: str, label: str, engine_only: bool = False) -> None:
    """Time every call of ``owner.name`` (with ``engine_only``, those on the engine thread)."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if not engine_only or threading.current_thread().name == "kvtier-engine":
                TIMES[label].append(time.perf_counter() - start)
    setattr(owner, name, wrapper)


def _setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` as a config override; VALUE parsed as JSON where it is JSON."""
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hot", type=int, default=1024)
    parser.add_argument("--generate", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    parser.add_argument("--out", default="window_ops", help="results file name (no .json)")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="sys.setswitchinterval for this run (Python's default: 5 ms)")
    parser.add_argument("--lock-waits", action="store_true",
                        help="time every wait for the store index's lock, per thread")
    parser.add_argument("--baseline", action="store_true",
                        help="also serve the prompt with all of it hot (full attention)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting for the working-set run, e.g. "
                             "working_set.query_layer_stride=2 (repeatable; VALUE as JSON)")
    parser.add_argument("--store-threads", type=int, default=0,
                        help="threads of the store's worker pool (workers.STORE; 0: its default, "
                             "a quarter of the cores)")
    args = parser.parse_args()
    settings = dict(_setting(s) for s in args.set)
    if args.store_threads:
        workers.STORE = workers.Workers(workers.STORE.name, lambda: args.store_threads)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    for name in ("score", "replan", "apply", "_load", "store_block"):
        timed(paging.Window, name, name.strip("_"))
    timed(HotContext, "decode", "decode")
    # The parts of store_block (and of loads: the pool's acquire waits while the writer is behind).
    timed(HotContext, "read_range_into", "store_block.read_out")
    timed(paging.Window, "_summary_of", "store_block.summary")
    timed(BufferPool, "acquire", "buffer_acquire")
    timed(SummaryStack, "shares", "score.shares")
    timed(paging.Window, "_stacked", "score.stack")
    timed(TierManager, "report_attention", "score.report")
    timed(TierManager, "prefetch", "score.prefetch")
    timed(TierManager, "get_blocks_into", "load.decode")
    timed(HotContext, "write_scratch", "load.write")
    timed(RocksTier, "get_many", "load.read_cool", engine_only=True)
    timed(LmdbTier, "read_many", "load.read_and_decode_warm", engine_only=True)
    timed(BlockReader, "_locate", "load.locate", engine_only=True)
    timed(BlockReader, "_account", "load.account", engine_only=True)
    # The store writer's side (its threads and the balancer's): a block's whole write, the room
    # made for it in warm (a demotion when warm is full), a demoted block's copy, the tiers'
    # writes, and each record re-encoded on the way down.
    timed(TierManager, "put_block", "writer.put_block")
    timed(Balancer, "_make_room", "writer.make_room")
    timed(Balancer, "_copy", "writer.demotion_copy")
    timed(Balancer, "_commit", "writer.demotion_commit")
    timed(LmdbTier, "put_many", "writer.warm_put")
    timed(RocksTier, "put_many", "writer.cool_put")
    timed(codec, "transcode", "writer.transcode_record")
    path = str(args.model or default_model_path())
    model = Model(path)
    kv_bytes = model.kv_bytes_per_token("f16", "f16")
    model.close()

    def serve(hot_tokens: int, extra: dict):
        engine = Engine(load_config(None, {
            "data_dir": tempfile.mkdtemp(prefix="kvtier-bench-window-"), "model.n_slots": 1,
            "model.model_path": path,
            "model.context_size": args.tokens + 4096, "model.block_size": args.block_size,
            "tiers.gpu_vram_budget": hot_tokens * kv_bytes, **extra}))
        count = lambda text: len(engine.model.tokenize(text, add_special=False))  # noqa: E731
        if args.lock_waits:
            index = engine.manager._index
            index.lock = TimedLock(index.lock)
        try:
            # Filler text without a question: the model keeps writing it (no early end token).
            text = passkey.document(args.tokens, 0.5, passkey.keys(1, seed=3)[0], count)
            start = time.perf_counter()
            done = engine.generate(GenerationRequest(prompt=text, sampling=SamplingParams(
                temperature=0.0, max_tokens=args.generate)))
            wall = time.perf_counter() - start
            print(f"hot {hot_tokens} tokens: prompt {done.usage.prompt_tokens} tokens, generated "
                  f"{done.usage.completion_tokens}, {wall:.2f} s")
            stats = engine.cache_stats()
            return wall, stats.working_set, stats.store
        finally:
            engine.close()

    baseline = None
    if args.baseline:
        baseline, _, _ = serve(args.tokens + 4096, {})
        TIMES.clear()
        LOCK_WAITS.clear()
    wall, stats, store = serve(args.hot, settings)
    if baseline is not None:
        print(f"working set / full attention: {wall / baseline:.2f}x the wall time")
    rows, results = [], {}
    for label, values in TIMES.items():
        results[label] = {"count": len(values), "median_ms": 1e3 * statistics.median(values),
                          "total_s": sum(values)}
        rows.append([label, len(values), results[label]["median_ms"], sum(values)])
    print_table(["step", "calls", "median ms", "total s"], rows)
    print(stats)
    print(store)
    waits = {name: {"count": len(v), "over_1ms": sum(w > 1e-3 for w in v), "total_s": sum(v),
                    "max_ms": 1e3 * max(v)} for name, v in LOCK_WAITS.items()}
    for name, w in waits.items():
        print(f"index lock, {name}: {w}")
    write_json(args.out, {"tokens": args.tokens, "hot_tokens": args.hot, "wall_s": wall,
                          "switch_interval_s": sys.getswitchinterval(),
                          "full_attention_wall_s": baseline, "model": Path(path).name,
                          "settings": settings, "store_threads": workers.STORE.n_threads,
                              "block_size": args.block_size, "steps": results,
                              "working_set": {n: getattr(stats, n) for n in stats.__slots__},
                              "store_writer": {n: getattr(store, n) for n in store.__slots__},
                              "index_lock_waits": waits})


if __name__ == "__main__":
    main()
