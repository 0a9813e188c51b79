"""Time to first token when resuming a conversation: re-prefill vs llama.cpp's own state file vs
kvtier restoring from the warm, cool and cold tiers; and what storing the conversation costs the
engine thread (reading its state out of llama.cpp) against the background writer (the rest).

Every restore path ends the same way: the KV of the first N-1 tokens is in place and the last
prompt token is decoded for its logits, so the times compare like with like. Run from the
repository root:

    python -m bench.bench_restore [--lengths 1024 4096 8192] [--repeats 3]
        [--model PATH] [--n-gpu-layers -1] [--flash-attn on] [--cache-type q8_0]
        [--warm-format q8] [--warm-zstd-level 1] [--block-size 256] [--chunk-mib 256]
        [--out restore]

``--cache-type q8_0`` runs llama.cpp's q8_0 KV cache: records hold its rows as they are and a
restore is a copy. The hot tier is the engine's: one unified KV cache with a scratch sequence,
so restores go through the scratch sequence in chunks of ``--chunk-mib`` MiB of KV.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from pathlib import Path

import kvtier  # noqa: F401  first, before llama_cpp: see kvtier/_preload.py
import llama_cpp
import numpy as np

from bench.common import document_tokens, print_table, write_json
from kvtier.config import TierConfig, load_config
from kvtier.engine.host_buffers import BufferPool, CudaRegistrar
from kvtier.engine.hot import BatchItem, HotContext
from kvtier.engine.model import Model, default_model_path
from kvtier.engine.restore_policy import ThroughputModel
from kvtier.engine.snapshot import RESTORE_CHUNK_BYTES, Snapshotter, StoredSequence
from kvtier.engine.store_writer import StoreWriter
from kvtier.storage.codec import TIER_FORMATS
from kvtier.storage.manager import TierManager
from kvtier.storage.tiers import Tier


def prefill(hot: HotContext, tokens: np.ndarray, start: int = 0) -> None:
    for i in range(start, len(tokens), hot.n_batch):
        chunk = tokens[i:i + hot.n_batch]
        hot.decode([BatchItem(0, chunk, i, i + len(chunk) == len(tokens))])


def last_token(hot: HotContext, tokens: np.ndarray) -> None:
    """Decode the last prompt token on top of the first N-1 (the end of every restore path)."""
    hot.truncate(hot.slots[0], len(tokens) - 1)
    hot.decode([BatchItem(0, tokens[-1:], len(tokens) - 1, True)])


BEST: dict[str, float] = {}
"""The fastest pass of each timing, by name: the least disturbed one on a busy machine."""


def timed(fn, repeats: int, name: str = "") -> float:
    """The median of ``repeats`` passes (the fastest goes to ``BEST[name]``)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if name:
        BEST[name] = min(times)
    return statistics.median(times)


def store_costs(snaps: Snapshotter, writer: StoreWriter, slot, repeats: int) -> dict:
    """Storing the whole conversation afresh: the engine thread's part (the state read) and the
    writer's part, medians over ``repeats`` fresh sequences."""
    engine_s, writer_s = [], []
    for _ in range(repeats):
        seq = StoredSequence(snaps.manager.new_sequence())
        _, job = snaps.prepare(slot, seq)
        engine_s.append(job.read_s)
        start = time.perf_counter()
        writer.submit(job)
        writer.drain()
        writer_s.append(time.perf_counter() - start)
        snaps.manager.delete_sequence(snaps.namespace, seq.seq_id)
    return {"store_engine_s": statistics.median(engine_s),
            "store_writer_s": statistics.median(writer_s), "store_bytes_read": job.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--cache-type", default="f16", help="llama.cpp K and V cache type")
    parser.add_argument("--warm-format", choices=sorted(TIER_FORMATS),
                        default=TierConfig.model_fields["warm_format"].default)
    parser.add_argument("--warm-zstd-level", type=int,
                        default=TierConfig.model_fields["warm_zstd_level"].default,
                        help="zstd level of warm records (0: not compressed)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per stored block")
    parser.add_argument("--chunk-mib", type=float, default=RESTORE_CHUNK_BYTES / 2**20,
                        help="KV MiB per restore chunk where the context has a scratch sequence")
    parser.add_argument("--tiers", nargs="+", choices=[t.label for t in Tier],
                        default=[t.label for t in Tier])
    parser.add_argument("--out", default="restore", help="results file name (no .json)")
    parser.add_argument("--flush", action="store_true",
                        help="flush a RocksDB tier's memtable before its restores, so they read "
                             "files as after a restart (else some records may be in memory)")
    args = parser.parse_args()

    model = Model(args.model or default_model_path(), args.n_gpu_layers)
    tokens_all = document_tokens(model)
    tmp = Path(tempfile.mkdtemp(prefix="kvtier-bench-restore-"))
    n_ctx = -(-max(args.lengths) // args.block_size) * args.block_size
    per_token = model.kv_bytes_per_token(args.cache_type, args.cache_type)
    config = load_config(None, {
        "data_dir": str(tmp), "model.n_slots": 1, "model.context_size": n_ctx,
        "model.n_gpu_layers": args.n_gpu_layers, "model.flash_attn": args.flash_attn,
        "model.cache_type_k": args.cache_type, "model.cache_type_v": args.cache_type,
        "tiers.warm_format": args.warm_format, "tiers.warm_zstd_level": args.warm_zstd_level,
        "tiers.gpu_vram_budget": n_ctx * per_token,
        "tiers.host_ram_budget": max(4 << 30, 3 * per_token * n_ctx),
        "tiers.local_ssd_budget": max(8 << 30, 3 * per_token * n_ctx)})
    hot = HotContext.for_config(model, config)
    manager = TierManager(config, background=False)
    ns = model.fingerprint(args.cache_type, args.cache_type, args.block_size).namespace
    snaps = Snapshotter(hot, manager, ns, args.block_size, ThroughputModel(),
                        restore_chunk_bytes=int(args.chunk_mib * 2**20))
    writer = StoreWriter(manager, BufferPool(config.tiers.store_queue_budget, CudaRegistrar.find(),
                                             "store buffers"))
    tiers = [Tier.from_label(t) for t in args.tiers]
    rows, results = [], []
    for n in args.lengths:
        tokens = tokens_all[:n]
        slot = hot.slots[0]
        hot.clear(slot)
        start = time.perf_counter()
        prefill(hot, tokens)
        t_prefill = time.perf_counter() - start

        state_file = tmp / f"state-{n}.bin"
        arr = (llama_cpp.llama_token * n)(*tokens.tolist())
        llama_cpp.llama_state_seq_save_file(hot.ptr, str(state_file).encode(), 0, arr, n)
        out_tokens = (llama_cpp.llama_token * n)()
        n_out = ctypes.c_size_t(0)

        parts: dict[str, list[float]] = {}

        def load_state_file() -> None:
            start = time.perf_counter()
            hot.clear(slot)
            read = llama_cpp.llama_state_seq_load_file(hot.ptr, str(state_file).encode(), 0,
                                                       out_tokens, n, ctypes.byref(n_out))
            assert read > 0
            parts.setdefault("state_file_load", []).append(time.perf_counter() - start)
            slot.tokens = tokens.copy()
            last_token(hot, tokens)

        t_file = timed(load_state_file, args.repeats, "state_file")
        costs = store_costs(snaps, writer, slot, args.repeats)
        start = time.perf_counter()
        seq = snaps.save(slot, StoredSequence(manager.new_sequence()))
        t_save = time.perf_counter() - start
        entry = manager.get_sequence(ns, seq.seq_id)
        tier_times, tier_bytes = {}, {}
        for tier in tiers:
            for block in seq.blocks:
                manager.move(block, tier)
            if args.flush and hasattr(manager.tiers[tier], "flush"):
                manager.tiers[tier].flush()     # read from files, as after a restart

            def restore() -> None:
                start = time.perf_counter()
                plan = snaps.plan(tokens, entry)
                restored = snaps.restore(slot, plan, tokens)
                assert restored.n_tokens == n
                parts.setdefault(f"{tier.label}_restore", []).append(time.perf_counter() - start)
                last_token(hot, tokens)

            # Before the restores: the blocks they read from below warm are promoted after them.
            tier_bytes[tier] = sum(manager.block_entry(b).stored_bytes for b in seq.blocks)
            with manager.pinned(seq.blocks):    # measure the read path, not promotions after it
                tier_times[tier] = timed(restore, args.repeats, tier.label)
        raw = sum(manager.block_entry(b).raw_bytes for b in seq.blocks)
        file_bytes = state_file.stat().st_size
        result = {"tokens": n, "prefill_s": t_prefill, "state_file_s": t_file,
                  "state_file_bytes": file_bytes, "raw_bytes": raw, "save_s": t_save, **costs,
                  **{f"{t.label}_s": tier_times[t] for t in tier_times},
                  **{f"{name}_best_s": best for name, best in BEST.items()},
                  # Without the last token's decode, which is the same work on every path but
                  # the noisiest part on a busy machine (llama.cpp's threads spin-wait).
                  **{f"{name}_s": statistics.median(v) for name, v in parts.items()},
                  **{f"{name}_best_s": min(v) for name, v in parts.items()},
                  **{f"{t.label}_bytes": tier_bytes[t] for t in tier_bytes}}
        results.append(result)
        load = statistics.median(parts["state_file_load"])
        rows.append([n, t_prefill, t_file, t_prefill / t_file,
                     *[v for t in tiers for v in (tier_times[t], t_prefill / tier_times[t],
                                                  tier_times[t] / t_file)],
                     load, *[statistics.median(parts[f"{t.label}_restore"]) / load
                             for t in tiers],
                     costs["store_engine_s"], costs["store_writer_s"],
                     *[tier_bytes[t] / n for t in tiers]])
        manager.delete_sequence(ns, seq.seq_id)
        state_file.unlink()
    print_table(["tokens", "prefill s", "llama file s", "x prefill",
                 *[h for t in tiers for h in (f"{t.label} s", "x prefill", "x file")],
                 "file load only s", *[f"{t.label} only x" for t in tiers],
                 "store: engine s", "writer s", *[f"{t.label} B/tok" for t in tiers]], rows)
    settings = {"model": Path(args.model or default_model_path()).name,
                "n_gpu_layers": args.n_gpu_layers, "flash_attn": args.flash_attn,
                "cache_type": args.cache_type, "warm_format": args.warm_format,
                "warm_zstd_level": args.warm_zstd_level,
                "block_size": args.block_size, "flush": args.flush,
                "scratch_seq": snaps.scratch_seq, "restore_chunk_mib": args.chunk_mib,
                "pinned": snaps.restore_buffers.pinned}
    path = write_json(args.out, {"settings": settings, "results": results,
                                 "note": "x prefill = prefill time / the path's time; x file = "
                                         "restore time / llama.cpp state-file time (lower is "
                                         "better), both with the last token's decode; *_restore_s "
                                         "and state_file_load_s without it; *_best_s the fastest "
                                         "pass; store_engine_s is the state read on the engine "
                                         "thread, store_writer_s the background rest; cool and "
                                         "cold are on the same local disk in this run"})
    print(f"wrote {path}")
    writer.close()
    snaps.close()
    manager.close()
    hot.close()


if __name__ == "__main__":
    main()
