"""Put/get throughput per tier for 256-token blocks of the default model's KV, and bytes stored per
token per tier (compression against f16), with f16 records in LMDB as the baseline.

The blocks are real: a prefill of ``pydoc_data.topics`` text, parsed out of llama.cpp's state.
Throughput counts f16 bytes (what llama.cpp holds) through encode + write and read + decode.
Bytes stored are what each tier's accounting counts (LMDB: whole overflow pages).

    python -m bench.bench_tiers [--blocks 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import zstandard

from bench.common import document_tokens, print_table, write_json
from kvtier.config import load_config
from kvtier.engine import state_codec as sc
from kvtier.engine.hot import BatchItem, HotContext
from kvtier.engine.model import Model, default_model_path
from kvtier.storage import codec
from kvtier.storage.codec import RecordFormat
from kvtier.storage.quant import Encoding
from kvtier.storage.records import BlockId, namespace_of
from kvtier.storage.tiers import LMDB_PAGE, LmdbTier, RocksStore, RocksTier


def real_blocks(n_prefill: int = 1024):
    model = Model(default_model_path())
    config = load_config(None, {"model.n_slots": 1})
    hot = HotContext.for_config(model, config)
    tokens = document_tokens(model, 20_000)[:n_prefill]
    for i in range(0, n_prefill, 512):
        hot.decode([BatchItem(0, tokens[i:i + 512], i, False)])
    blocks = sc.split_blocks(sc.parse(sc.read_state(hot.ptr, 0)), 256)
    return [blocks[b] for b in sorted(blocks)]


def page_savings(sources, name: str, level: int) -> dict:
    """Per record of ``sources``: LMDB pages as ``name`` without and with zstd at ``level``, and
    what zstd makes of K's and of V's payload alone (is either worth compressing by itself?)."""
    plain_fmt, packed_fmt = codec.tier_format(name), codec.tier_format(name, level)
    pages = lambda n: -(-(n + 16) // LMDB_PAGE)  # noqa: E731  LmdbTier.stored_bytes in pages
    compressor = zstandard.ZstdCompressor(level=level)
    saved, k_ratio, v_ratio, n = 0, [], [], 0
    for b, layers in enumerate(sources):
        for layer in layers:
            exact = codec.SINK_ROWS if b == 0 else 0
            plain = codec.encode_record(layer, plain_fmt, exact)
            packed = codec.encode_record(layer, packed_fmt, exact)
            saved += pages(len(packed)) < pages(len(plain))
            header = codec.read_header(plain)
            start = len(plain) - header.k.nbytes - header.v.nbytes
            k = plain[start:start + header.k.nbytes]
            v = plain[start + header.k.nbytes:]
            k_ratio.append(len(compressor.compress(k)) / len(k))
            v_ratio.append(len(compressor.compress(v)) / len(v))
            n += 1
    return {"format": name, "zstd_level": level, "records": n, "records_saving_a_page": saved,
            "k_alone_ratio": sum(k_ratio) / n, "v_alone_ratio": sum(v_ratio) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sources = real_blocks()
    ns = namespace_of(b"bench")
    tmp = Path(tempfile.mkdtemp(prefix="kvtier-bench-tiers-"))
    rocks = RocksStore(tmp / "rocks", ["cool"])
    variants = [
        ("LMDB f16 (baseline)", lambda: LmdbTier(tmp / "f16", 4 << 30, "f16"),
         RecordFormat(Encoding.F16)),
        ("warm: LMDB q8c", lambda: LmdbTier(tmp / "warm", 4 << 30), codec.tier_format("q8c")),
        ("warm: LMDB q8c + zstd 1", lambda: LmdbTier(tmp / "warmz", 4 << 30),
         codec.tier_format("q8c", 1)),
        ("cool/cold: RocksDB q6q4 + zstd 3", lambda: RocksTier(rocks, "cool"),
         codec.tier_format("q6q4", 3)),
    ]
    rows, results = [], []
    base_put = base_get = None
    for name, make, fmt in variants:
        tier = make()
        put_times, get_times = [], []
        stored = 0
        for rep in range(args.repeats):
            ids = [BlockId(ns, rep + 1, b) for b in range(args.blocks)]
            raw = 0
            start = time.perf_counter()
            for i, block in enumerate(ids):
                layers = sources[i % len(sources)]
                exact = codec.SINK_ROWS if block.block == 0 else 0
                tier.put_many([(block.key(li).to_bytes(), codec.encode_record(layer, fmt, exact))
                               for li, layer in enumerate(layers)])
                raw += sum(layer.nbytes for layer in layers)
            put_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            for i, block in enumerate(ids):
                values = tier.get_many([block.key(li).to_bytes()
                                        for li in range(len(sources[i % len(sources)]))])
                for v in values:
                    codec.decode_record(v)
            get_times.append(time.perf_counter() - start)
            lengths = [len(tier.get(block.key(li).to_bytes()))
                       for block in ids for li in range(30)]
            stored = sum(map(tier.stored_bytes, lengths))
            tier.delete([block.key(li).to_bytes() for block in ids for li in range(30)])
        put_gbs = raw / statistics.median(put_times) / 1e9
        get_gbs = raw / statistics.median(get_times) / 1e9
        base_put = base_put or put_gbs
        base_get = base_get or get_gbs
        tokens = args.blocks * 256
        result = {"tier": name, "put_gb_s": put_gbs, "get_gb_s": get_gbs,
                  "blocks_per_s_put": args.blocks / statistics.median(put_times),
                  "blocks_per_s_get": args.blocks / statistics.median(get_times),
                  "bytes_per_token": stored / tokens, "f16_bytes_per_token": raw / tokens,
                  "compression": raw / stored, "x_f16": stored / raw,
                  "record_bytes": sum(lengths) / len(lengths),
                  "lmdb_pages": stored / len(lengths) / LMDB_PAGE
                  if isinstance(tier, LmdbTier) else None}
        results.append(result)
        rows.append([name, put_gbs, put_gbs / base_put, get_gbs, get_gbs / base_get,
                     result["bytes_per_token"], result["x_f16"], result["lmdb_pages"] or "-"])
        tier.close()
    rocks.close()
    print_table(["tier", "put GB/s (f16)", "x base", "get GB/s (f16)", "x base",
                 "bytes/token", "x f16", "LMDB pages/record"], rows)
    savings = page_savings(sources, "q8c", 1)
    print(f"q8c + zstd 1 on these {savings['records']} records: {savings['records_saving_a_page']}"
          f" take fewer LMDB pages than uncompressed; zstd alone on K's payload gives "
          f"{savings['k_alone_ratio']:.3f} of its size, on V's {savings['v_alone_ratio']:.3f}")
    path = write_json("tiers", {"blocks": args.blocks, "block_tokens": 256,
                                "layers": len(sources[0]), "results": results,
                                "zstd_page_savings": savings})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
