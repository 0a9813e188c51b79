"""Time to first token when resuming a conversation: re-prefill vs llama.cpp's own state file vs
kvtier restoring from the warm, cool and cold tiers.

Every path ends the same way: the KV of the first N-1 tokens is in place and the last prompt token
is decoded for its logits, so the times compare like with like. Run from the repository root:

    python -m bench.bench_restore [--lengths 1024 4096 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np

from bench.common import document_tokens, print_table, write_json
from kvtier.config import load_config
from kvtier.engine.hot import BatchItem, HotContext
from kvtier.engine.model import Model, default_model_path
from kvtier.engine.restore_policy import ThroughputModel
from kvtier.engine.snapshot import Snapshotter, StoredSequence
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


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = Model(default_model_path())
    tokens_all = document_tokens(model)
    tmp = Path(tempfile.mkdtemp(prefix="kvtier-bench-restore-"))
    n_ctx = max(args.lengths) + 256
    config = load_config(None, {"data_dir": str(tmp), "model.n_slots": 1,
                                "model.context_size": n_ctx,
                                "tiers.gpu_vram_budget": n_ctx * model.kv_bytes_per_token("f16",
                                                                                           "f16"),
                                "tiers.host_ram_budget": "4GiB"})
    hot = HotContext.for_config(model, config)
    manager = TierManager(config, background=False)
    ns = model.fingerprint("f16", "f16", 256).namespace
    snaps = Snapshotter(hot, manager, ns, 256, ThroughputModel())
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

        def load_state_file() -> None:
            hot.clear(slot)
            read = llama_cpp.llama_state_seq_load_file(hot.ptr, str(state_file).encode(), 0,
                                                       out_tokens, n, ctypes.byref(n_out))
            assert read > 0
            slot.tokens = tokens.copy()
            last_token(hot, tokens)

        t_file = timed(load_state_file, args.repeats)

        seq = snaps.save(slot, StoredSequence(manager.new_sequence()))
        entry = manager.get_sequence(ns, seq.seq_id)
        tier_times, tier_bytes = {}, {}
        for tier in Tier:
            for block in seq.blocks:
                manager.move(block, tier)

            def restore() -> None:
                plan = snaps.plan(tokens, entry)
                restored = snaps.restore(slot, plan, tokens)
                assert restored.n_tokens == n
                last_token(hot, tokens)

            with manager.pinned(seq.blocks):    # measure the read path, not promotions after it
                tier_times[tier] = timed(restore, args.repeats)
            tier_bytes[tier] = sum(manager.block_entry(b).stored_bytes for b in seq.blocks)
        raw = sum(manager.block_entry(b).raw_bytes for b in seq.blocks)
        file_bytes = state_file.stat().st_size
        result = {"tokens": n, "prefill_s": t_prefill, "state_file_s": t_file,
                  "state_file_bytes": file_bytes, "f16_bytes": raw,
                  **{f"{t.label}_s": tier_times[t] for t in tier_times},
                  **{f"{t.label}_bytes": tier_bytes[t] for t in tier_bytes}}
        results.append(result)
        rows.append([n, t_prefill, t_file, t_prefill / t_file,
                     *[v for t in Tier for v in (tier_times[t], t_prefill / tier_times[t])],
                     file_bytes / n, *[tier_bytes[t] / n for t in (Tier.WARM, Tier.COOL)]])
        manager.delete_sequence(ns, seq.seq_id)
    print_table(["tokens", "prefill s", "llama file s", "x", "warm s", "x", "cool s", "x",
                 "cold s", "x", "file B/tok", "warm B/tok", "cool B/tok"], rows)
    path = write_json("restore", {"results": results,
                                  "note": "x = prefill time / restore time; cool and cold "
                                          "are on the same local disk in this run"})
    print(f"wrote {path}")
    manager.close()
    hot.close()


if __name__ == "__main__":
    main()
