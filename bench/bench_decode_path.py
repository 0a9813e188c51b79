"""The restore's decode path alone: a whole sequence's records, read from a real LMDB (warm) or
RocksDB (cool) store, verified and decoded into one llama.cpp state blob, as
``TierManager.get_blocks_into`` does for a restore. No model is needed.

    python -m bench.bench_decode_path [--shapes tiny default 8b] [--blocks 16] [--repeats 5]

Shapes: ``default`` is the default model (30 layers x 192 values per row), ``8b`` a Llama 8B
(32 layers x 1024), ``tiny`` 32 layers x 32 (the fixed cost per record); 256-token blocks.
Formats: warm Q8 and f16, cool Q4 + zstd, and llama.cpp's ``q8_0`` KV cache kept as it is in the
warm tier (a restore is a copy). Synthetic KV
(keys with outlier channels, as real keys have) is stored through ``put_block``, so the records
are the ones the server writes. The blob is laid out for a one-stream context with V per token
(flash attention), like the engine's.

Reported per case: seconds for the whole sequence (median), microseconds per record, GB/s of f16
written into the blob and of record bytes read; and, as the same-run baseline, a plain copy of
the blob's bytes (``memcpy``), so "x memcpy" says how far the path is from the memory's speed.
Writes bench/results/decode_path.json (``--out`` to change the name).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import print_table, write_json
from kvtier.config import load_config
from kvtier.engine import state_codec
from kvtier.engine.state_codec import CacheLayout, StateLayout
from kvtier.ggml import F16, Q8_0
from kvtier.storage.manager import TierManager
from kvtier.storage.records import BlockId, LayerKV, TensorRows, namespace_of
from kvtier.storage.tiers import Tier

try:
    from kvtier.storage.reads import RowTargets
except ImportError:          # before the batched decode path: one call per record
    RowTargets = None

SHAPES = {"default": (30, 192), "8b": (32, 1024), "tiny": (32, 32)}
"""name -> (layers, K or V values per row); ``tiny`` records (16 KB of f16 per tensor) show the
fixed cost per record, which the larger shapes hide behind their bytes."""
BLOCK = 256
CASES = [("warm", "f16", Tier.WARM, F16), ("warm", "q8", Tier.WARM, F16),
         ("cool", "q8", Tier.COOL, F16), ("warm", "q8", Tier.WARM, Q8_0)]
"""(label, warm_format, tier, KV cache type): cool blocks are Q4 + zstd whatever the warm format;
q8_0 rows are stored as they are in every tier."""
NS = namespace_of(b"bench-decode-path")


def synthetic_block(rng: np.random.Generator, n_layers: int, width: int,
                    cache_type=F16) -> list[LayerKV]:
    """f16 K with a few large channels and V with per-token scales, like real KV (random rows
    for a quantized cache type)."""
    if cache_type != F16:
        rb = cache_type.row_bytes(width)
        return [LayerKV(TensorRows(cache_type.id, rng.integers(0, 256, (BLOCK, rb), np.uint8)),
                        TensorRows(cache_type.id, rng.integers(0, 256, (BLOCK, rb), np.uint8)))
                for _ in range(n_layers)]
    layers = []
    for _ in range(n_layers):
        k = rng.standard_normal((BLOCK, width), dtype=np.float32)
        k[:, ::61] *= 12.0
        v = rng.standard_normal((BLOCK, width), dtype=np.float32)
        v *= rng.uniform(0.2, 2.0, (BLOCK, 1)).astype(np.float32)
        layers.append(LayerKV(TensorRows(F16.id, k.astype(np.float16).view(np.uint8)),
                              TensorRows(F16.id, v.astype(np.float16).view(np.uint8))))
    return layers


def layout_for(n_layers: int, width: int, cache_type=F16) -> StateLayout:
    rb = (cache_type.row_bytes(width),) * n_layers
    types = (cache_type.id,) * n_layers
    return StateLayout((CacheLayout(1, False, n_layers, types, rb, types, rb),))


def time_it(fn, repeats: int) -> list[float]:
    fn()                                             # compile, fault the pages in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_case(shape: str, label: str, warm_format: str, tier: Tier, cache_type, n_blocks: int,
             repeats: int, tmp: Path) -> dict:
    n_layers, width = SHAPES[shape]
    block_raw = n_layers * 2 * BLOCK * width * 2
    config = load_config(None, {
        "data_dir": str(tmp / f"{shape}-{label}-{warm_format}-{cache_type.name}"),
        "tiers.host_ram_budget": max(1 << 30, 2 * n_blocks * block_raw),
        "tiers.local_ssd_budget": 4 * n_blocks * block_raw,
        "tiers.warm_format": warm_format})
    rng = np.random.default_rng(0)
    with TierManager(config, background=False) as manager:
        blocks = []
        template = synthetic_block(rng, n_layers, width, cache_type)
        for b in range(n_blocks):
            # Every block its own bytes (a shifted copy of one random block: fast to make).
            layers = [LayerKV(TensorRows(cache_type.id, np.roll(kv.k.rows, b, axis=0)),
                              TensorRows(cache_type.id, np.roll(kv.v.rows, b, axis=0)))
                      for kv in template]
            blocks.append(manager.put_block(BlockId(NS, 1, b), layers))
            if tier != Tier.WARM:
                assert manager.move(blocks[-1], tier)
        stored = sum(manager.block_entry(b).stored_bytes for b in blocks)
        layout = layout_for(n_layers, width, cache_type)
        target = state_codec.allocate(layout, 0, 0, [(j, [BLOCK]) for j in range(n_blocks)],
                                      BLOCK)

        def destination(j: int, layer: int):
            k, v = target.rows(j, layer)
            return k, v, cache_type.id, cache_type.id

        if RowTargets is not None:   # as the restore does; older code takes the function
            base = np.frombuffer(target.blob, np.uint8).__array_interface__["data"][0]
            cache = layout.caches[0]
            destination = RowTargets(base + target.k_offsets, base + target.v_offsets,
                                     cache.k_types, cache.v_types, cache.k_row_bytes,
                                     cache.v_row_bytes, (BLOCK,) * n_blocks)

        def restore() -> None:
            errors = manager.get_blocks_into(blocks, destination)
            assert not any(errors), errors

        # The baseline first: blocks read from below warm are promoted once the pins go.
        blob = np.frombuffer(target.blob, np.uint8)
        copy = np.empty_like(blob)
        memcpy = statistics.median(time_it(lambda: np.copyto(copy, blob), repeats))
        with manager.pinned(blocks):
            times = time_it(restore, repeats)
    seconds = statistics.median(times)
    records = n_blocks * n_layers
    name = "q4+zstd" if tier == Tier.COOL else warm_format
    if cache_type != F16:
        name = f"{cache_type.name} as is"
    return {"shape": shape, "case": f"{label} {name}",
            "blocks": n_blocks, "records": records, "blob_bytes": int(blob.nbytes),
            "stored_bytes": int(stored), "seconds": seconds, "best_s": min(times),
            "us_per_record": seconds / records * 1e6,
            "blob_gb_s": blob.nbytes / seconds / 1e9, "stored_gb_s": stored / seconds / 1e9,
            "memcpy_s": memcpy, "x_memcpy": seconds / memcpy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES),
                        default=["tiny", "default", "8b"])
    parser.add_argument("--blocks", type=int, default=16,
                        help="blocks of 256 tokens per sequence (16 = 4K tokens; 128 = 32K)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="decode_path", help="results file name (no .json)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-decode-path-") as tmp:
        for shape in args.shapes:
            for label, warm_format, tier, cache_type in CASES:
                r = run_case(shape, label, warm_format, tier, cache_type, args.blocks,
                             args.repeats, Path(tmp))
                results.append(r)
                print(f"{r['shape']} {r['case']}: {r['seconds']:.4f} s, "
                      f"{r['us_per_record']:.1f} us/record", flush=True)
    print_table(["shape", "case", "records", "blob MB", "s", "us/record", "blob GB/s",
                 "stored GB/s", "memcpy s", "x memcpy"],
                [[r["shape"], r["case"], r["records"], r["blob_bytes"] / 1e6, r["seconds"],
                  r["us_per_record"], r["blob_gb_s"], r["stored_gb_s"], r["memcpy_s"],
                  r["x_memcpy"]] for r in results])
    path = write_json(args.out, {"blocks": args.blocks, "repeats": args.repeats,
                                 "destination": "function" if RowTargets is None
                                 else "addresses", "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
