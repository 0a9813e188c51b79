"""How fast the tier worker moves blocks down when a long conversation overflows warm.

    python -m bench.bench_demotion [--blocks 144] [--shape 8b|default] [--warm 1GiB]

Stores ``--blocks`` blocks of a model's shape (random f16 KV: the 8B shape is 32 layers of
256 x 1024 K and V per block, 16 MiB) into a store whose warm budget holds only part of them, as
a long prompt does, then times how long the tier worker takes to bring warm back under its budget
(re-encoding to Q4 + zstd and writing cool), and how long ``close`` then takes. The baseline is
the time storing the blocks into warm took. Prints the rates and writes
bench/results/demotion.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import kvtier  # noqa: F401  (before llama_cpp, see kvtier/_preload.py)
from bench.common import print_table, write_json
from kvtier.config import load_config, parse_size
from kvtier.ggml import F16
from kvtier.storage.manager import TierManager
from kvtier.storage.records import BlockId, LayerKV, TensorRows
from kvtier.storage.tiers import Tier

SHAPES = {"8b": (32, 1024), "default": (30, 192)}
"""Layers, and K (= V) values per token."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=144)
    parser.add_argument("--shape", choices=SHAPES, default="8b")
    parser.add_argument("--warm", default="1GiB", help="tiers.host_ram_budget")
    parser.add_argument("--out", default="demotion")
    args = parser.parse_args()
    n_layers, width = SHAPES[args.shape]
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(n_layers):
        bits = rng.standard_normal((256, width)).astype(np.float16).view(np.uint8)
        rows = TensorRows(F16.id, bits.reshape(256, 2 * width))
        layers.append(LayerKV(rows, rows))
    config = load_config(None, {"data_dir": tempfile.mkdtemp(prefix="kvtier-bench-demote-"),
                                "tiers.host_ram_budget": args.warm})
    manager = TierManager(config)
    namespace = b"d" * 16
    seq = manager.new_sequence()
    start = time.perf_counter()
    for b in range(args.blocks):
        manager.put_block(BlockId(namespace, seq, b), layers)
    stored_s = time.perf_counter() - start
    budget = parse_size(args.warm, "tiers.host_ram_budget")
    trace = []
    while True:
        stats = {t.name: t for t in manager.stats()}
        trace.append((time.perf_counter() - start, stats["warm"].stored_bytes, stats["cool"].stored_bytes))
        if stats["warm"].stored_bytes <= stats["warm"].budget or time.perf_counter() - start > 600:
            break
        time.sleep(0.25)
    settled_s = time.perf_counter() - start
    close_start = time.perf_counter()
    manager.close()
    close_s = time.perf_counter() - close_start
    f16_bytes = args.blocks * n_layers * 2 * 256 * 2 * width
    moved = trace[-1][2]
    rows = [["store into warm", f"{stored_s:.2f}", f"{f16_bytes / stored_s / 1e9:.2f}"],
            ["warm under budget", f"{settled_s:.2f}", f"{f16_bytes / settled_s / 1e9:.2f}"],
            ["close", f"{close_s:.2f}", "-"]]
    print_table(["step", "seconds", "GB/s of f16"], rows)
    print(f"cool holds {moved / 1e6:.0f} MB; settling took {settled_s / stored_s:.1f}x storing")
    write_json(args.out, {"blocks": args.blocks, "shape": args.shape, "warm_budget": budget,
                          "store_s": stored_s, "settle_s": settled_s, "close_s": close_s,
                          "f16_bytes": f16_bytes, "trace": trace})


if __name__ == "__main__":
    main()
