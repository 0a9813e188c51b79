"""Where a warm restore's time goes, on the GPU machine: the whole restore at several chunk sizes
with the decoder thread's and the engine thread's parts summed, then decoding alone (every block
at once, all cores) and llama.cpp's ``set_data`` alone from the pinned blob.

    python -m bench.gpu.restore_parts --model /tmp/kvtier-8b.gguf --tokens 32768 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import kvtier  # noqa: F401  first, before llama_cpp: see kvtier/_preload.py
from bench.bench_restore import last_token, prefill
from bench.common import document_tokens
from kvtier.config import load_config
from kvtier.engine import state_codec
from kvtier.engine.hot import HotContext
from kvtier.engine.model import Model
from kvtier.engine.restore_policy import ThroughputModel
from kvtier.engine.snapshot import Snapshotter, StoredSequence
from kvtier.storage.manager import TierManager
from kvtier.storage.tiers import Tier


def breakdown(snaps: Snapshotter, slot, blocks, repeats: int) -> dict:
    """Decoding every block at once with 1, 4 and all decoding threads, and the seconds each
    phase took summed over threads (wall, and CPU of the calling thread: a gap is the GIL or a
    wait for a core)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from kvtier.storage import codec, reads, tiers
    sums: dict[str, list[float]] = {}
    lock = threading.Lock()

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def timed(*a, **k):
            w, c = time.perf_counter(), time.thread_time()
            try:
                return original(*a, **k)
            finally:
                w, c = time.perf_counter() - w, time.thread_time() - c
                with lock:
                    s = sums.setdefault(label, [0.0, 0.0, 0])
                    s[0] += w
                    s[1] += c
                    s[2] += 1
        setattr(owner, name, timed)
        return original

    originals = [(codec.DecodeBatch, "add", wrap(codec.DecodeBatch, "add", "verify+parse")),
                 (codec, "_decompress", wrap(codec, "_decompress", "zstd (in verify+parse)")),
                 (tiers.RocksTier, "get_many", wrap(tiers.RocksTier, "get_many",
                                                    "rocksdb get_many")),
                 (codec.DecodeBatch, "run", wrap(codec.DecodeBatch, "run", "kernel")),
                 (tiers.LmdbTier, "read_many", wrap(tiers.LmdbTier, "read_many",
                                                    "lmdb read_many (incl. the above)"))]
    entries = [snaps.manager.block_entry(b) for b in blocks]
    out: dict = {}
    n_cores = len(__import__("os").sched_getaffinity(0))
    for workers in sorted({1, 4, n_cores}):
        reads._pool = ThreadPoolExecutor(workers, thread_name_prefix="kvtier-decode")
        times = []
        for _ in range(repeats):
            sums.clear()
            start = time.perf_counter()
            buffer, _, good = snaps._decode_chunk(slot, blocks, entries, range(len(entries)))
            times.append(time.perf_counter() - start)
            snaps.restore_buffers.release(buffer)
        out[workers] = {"decode_all_s": statistics.median(times),
                        "phases": {k: {"wall_s": v[0], "cpu_s": v[1], "calls": v[2]}
                                   for k, v in sums.items()}}
        print(f"{workers} decoding threads: {out[workers]['decode_all_s']:.3f} s; last pass, "
              "summed over threads: " + "; ".join(f"{k} {v[0]:.3f} s wall {v[1]:.3f} s cpu "
                                                  f"({v[2]} calls)" for k, v in sums.items()),
              flush=True)
    for owner, name, original in originals:
        setattr(owner, name, original)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--warm-format", default="q8")
    parser.add_argument("--chunks-mib", type=int, nargs="+", default=[128, 256, 1024, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tier", choices=["warm", "cool"], default="warm")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()

    model = Model(args.model, -1)
    n = args.tokens
    tokens = document_tokens(model)[:n]
    per_token = model.kv_bytes_per_token("f16", "f16")
    config = load_config(None, {
        "data_dir": tempfile.mkdtemp(prefix="kvtier-parts-"), "model.n_slots": 1,
        "model.context_size": n + 256, "model.n_gpu_layers": -1, "model.flash_attn": "on",
        "tiers.warm_format": args.warm_format, "tiers.gpu_vram_budget": (n + 256) * per_token,
        "tiers.host_ram_budget": 3 * per_token * n, "tiers.local_ssd_budget": 3 * per_token * n})
    hot = HotContext.for_config(model, config)
    manager = TierManager(config, background=False)
    ns = model.fingerprint("f16", "f16", 256).namespace
    snaps = Snapshotter(hot, manager, ns, 256, ThroughputModel())
    slot = hot.slots[0]
    start = time.perf_counter()
    prefill(hot, tokens)
    prefill_s = time.perf_counter() - start
    seq = snaps.save(slot, StoredSequence(manager.new_sequence()))
    entry = manager.get_sequence(ns, seq.seq_id)
    if args.tier == "cool":
        for block in seq.blocks:
            manager.move(block, Tier.COOL)
    results: dict = {"tokens": n, "prefill_s": prefill_s, "warm_format": args.warm_format,
                     "tier": args.tier,
                     "chunks": {}}

    parts = {"decode": 0.0, "write": 0.0}
    decode_chunk, write_chunk = snaps._decode_chunk, snaps._write_chunk

    def timed_decode(*a):
        t = time.perf_counter()
        try:
            return decode_chunk(*a)
        finally:
            parts["decode"] += time.perf_counter() - t

    def timed_write(*a, **k):
        t = time.perf_counter()
        try:
            return write_chunk(*a, **k)
        finally:
            parts["write"] += time.perf_counter() - t

    snaps._decode_chunk, snaps._write_chunk = timed_decode, timed_write
    with manager.pinned(seq.blocks):
        for mib in args.chunks_mib:
            snaps.restore_chunk_bytes = mib << 20
            rows = []
            for _ in range(args.repeats):
                parts.update(decode=0.0, write=0.0)
                start = time.perf_counter()
                plan = snaps.plan(tokens, entry)
                assert snaps.restore(slot, plan, tokens).n_tokens == n
                total = time.perf_counter() - start
                rows.append((total, parts["decode"], parts["write"]))
                last_token(hot, tokens)
            med = [statistics.median(r[i] for r in rows) for i in range(3)]
            results["chunks"][mib] = {"restore_s": med[0], "decode_sum_s": med[1],
                                      "write_sum_s": med[2],
                                      "n_chunks": len(snaps._chunks(
                                          [manager.block_entry(b) for b in seq.blocks]))}
            print(f"chunk {mib} MiB: restore {med[0]:.3f} s, decoder thread {med[1]:.3f} s, "
                  f"engine thread writes {med[2]:.3f} s (x prefill {prefill_s / med[0]:.1f})",
                  flush=True)
        snaps._decode_chunk, snaps._write_chunk = decode_chunk, write_chunk
        results["breakdown"] = breakdown(snaps, slot, seq.blocks, args.repeats)
        # Decoding alone: every block in one call (all cores), into one pinned blob.
        entries = [manager.block_entry(b) for b in seq.blocks]
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            buffer, blob, good = decode_chunk(slot, seq.blocks, entries, range(len(entries)))
            times.append(time.perf_counter() - start)
            assert good == len(entries)
            if _ < args.repeats - 1:
                snaps.restore_buffers.release(buffer)
        results["decode_all_s"] = statistics.median(times)
        # set_data alone, from that pinned blob.
        times = []
        for _ in range(args.repeats):
            hot.clear(slot)
            start = time.perf_counter()
            state_codec.write_state(hot.ptr, slot.index, blob)
            times.append(time.perf_counter() - start)
        results["set_data_all_s"] = statistics.median(times)
        results["blob_bytes"] = len(blob)
        results["pinned"] = snaps.restore_buffers.pinned
        snaps.restore_buffers.release(buffer)
    print(f"decode alone (all blocks, all cores): {results['decode_all_s']:.3f} s; set_data "
          f"alone: {results['set_data_all_s']:.3f} s for {len(blob) / 1e9:.2f} GB "
          f"(pinned: {results['pinned']})")
    out = Path(args.out, f"restore_parts_{args.tier}_{args.warm_format}.json")
    out.write_text(json.dumps(results, indent=1))
    snaps.close()
    manager.close()
    hot.close()


if __name__ == "__main__":
    main()
