"""Quantizer throughput and reconstruction error: numba (one and all threads) vs vectorised numpy.

Run from the repository root::

    python -m bench.bench_quant [--quick] [--records-only]

Prints the tables and writes ``bench/results/quant.json`` (``--records-only``:
``bench/results/quant_records.json``, the records table alone). Throughput is GB/s (1e9 bytes) of
f16 (2 bytes per value) each way: f16 bits in -> payload (encode), payload -> f16 bits out (decode,
into a preallocated buffer: the restore path). Data: synthetic keys with RoPE and a few large,
offset, low-frequency channels (as real keys have) and values with per-token scale variation, in
blocks of 256 tokens x 192 values (SmolLM2: 3 KV heads x 64), 30 layers x 16 blocks per timing;
decoding writes each block into its rows of one state-sized buffer, as a restore does.

The records table times whole warm records (:mod:`kvtier.storage.codec`: K and V, header, checksum
and the zstd frame when the format has one) through ``encode_record`` and a restore's batched
decode (``DecodeBatch``) on one thread, per tier format and zstd level, against the
uncompressed record in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numba
import numpy as np

from bench.common import machine
from kvtier.ggml import F16
from kvtier.storage import codec, quant
from kvtier.storage.quant import Encoding, Grouping
from kvtier.storage.records import LayerKV, TensorRows
from kvtier.storage.tiers import LmdbTier

TOKENS, WIDTH, HEAD_DIM = 256, 192, 64
LAYERS, BLOCKS = 30, 16
RESULTS = Path(__file__).resolve().parent / "results" / "quant.json"
RECORDS_RESULTS = RESULTS.with_name("quant_records.json")
RECORD_FORMATS = [("q8c", 0), ("q8c", 1), ("q8c", 3), ("q8", 0), ("q8", 1)]
"""Warm formats and zstd levels of the records table; the first is the baseline."""
LEVELS = {Encoding.Q8: 255, Encoding.Q4: 15, Encoding.Q6: 63}
NAN_BITS = np.uint16(0x7E00)
GS = quant.DEFAULT_GROUP_SIZE
CASES = [(Encoding.F16, Grouping.PER_TOKEN, GS, "f16"),
         (Encoding.Q8, quant.KEY_GROUPING, GS, "keys"),
         (Encoding.Q8, quant.VALUE_GROUPING, GS, "values"),
         (Encoding.Q4, quant.KEY_GROUPING, GS, "keys"),
         (Encoding.Q4, quant.VALUE_GROUPING, GS, "values"),
         (Encoding.Q6, Grouping.PER_CHANNEL, 256, "keys"),          # q6q4's keys
         (Encoding.Q4, Grouping.PER_CHANNEL, 128, "values"),        # q6q4's values
         (Encoding.Q8, Grouping.PER_CHANNEL, 256, "keys"),          # q8c's keys
         (Encoding.Q8, Grouping.PER_CHANNEL, 256, "values")]        # q8c's values


# ---------------------------------------------------------------------------------------------
# Data


def synthetic_kv(rng: np.random.Generator, n_blocks: int) -> tuple[list[np.ndarray],
                                                                   list[np.ndarray]]:
    """Blocks of f16 bits: keys after RoPE with outlier channels, values with token scales."""
    keys, values = [], []
    half = HEAD_DIM // 2
    theta = 10000.0 ** (-np.arange(half) / half)
    for b in range(n_blocks):
        pos = (b % BLOCKS) * TOKENS + np.arange(TOKENS)[:, None]
        k = np.empty((TOKENS, WIDTH), np.float32)
        for h in range(WIDTH // HEAD_DIM):
            sigma = rng.lognormal(0.0, 0.5, HEAD_DIM)
            mean = rng.normal(0.0, 0.3, HEAD_DIM)
            outliers = rng.choice(np.arange(half - 8, half), size=2, replace=False)
            for i in outliers:  # massive, offset channels sit in low-frequency rotary pairs
                mean[[i, i + half]] = rng.choice([-1, 1]) * rng.uniform(8, 20)
                sigma[[i, i + half]] *= 4
            x = mean + sigma * rng.standard_normal((TOKENS, HEAD_DIM))
            cos, sin = np.cos(pos * theta), np.sin(pos * theta)
            a, c = x[:, :half], x[:, half:]
            k[:, h * HEAD_DIM:h * HEAD_DIM + half] = a * cos - c * sin
            k[:, h * HEAD_DIM + half:(h + 1) * HEAD_DIM] = a * sin + c * cos
        token_scale = rng.lognormal(0.0, 0.3, (TOKENS, 1))
        channel_scale = rng.lognormal(-1.0, 0.3, (1, WIDTH))
        v = token_scale * channel_scale * rng.standard_normal((TOKENS, WIDTH))
        keys.append(k.astype(np.float16).view(np.uint16))
        values.append(v.astype(np.float16).view(np.uint16))
    return keys, values


# ---------------------------------------------------------------------------------------------
# The same formats in vectorised numpy (the baseline; must produce identical bytes)


def _grouped(bits: np.ndarray, grouping: Grouping, gs: int) -> tuple[np.ndarray, int]:
    """Pad with NaN (left out of every range) to whole groups; group axis last or middle."""
    n_tokens, width = bits.shape
    if grouping == Grouping.PER_TOKEN:
        n_col = -(-width // gs)
        padded = np.full((n_tokens, n_col * gs), NAN_BITS)
        padded[:, :width] = bits
        return padded.reshape(n_tokens, n_col, gs), 2
    n_blk = -(-n_tokens // gs)
    padded = np.full((n_blk * gs, width), NAN_BITS)
    padded[:n_tokens] = bits
    return padded.reshape(n_blk, gs, width), 1


def _key_to_bits(k: np.ndarray) -> np.ndarray:
    return k ^ np.where(k >= 0x8000, 0x8000, 0xFFFF).astype(np.uint16)


def np_encode(bits: np.ndarray, encoding: Encoding, grouping: Grouping, gs: int) -> np.ndarray:
    n_tokens, width = bits.shape
    if encoding == Encoding.F16:
        return bits.reshape(-1).view(np.uint8).copy()
    levels = np.float32(LEVELS[encoding])
    g, axis = _grouped(bits, grouping, gs)
    finite = (g & 0x7C00) != 0x7C00
    keys = g ^ np.where(g >= 0x8000, 0xFFFF, 0x8000).astype(np.uint16)
    kmin = np.where(finite, keys, np.uint16(0xFFFF)).min(axis, keepdims=True)
    kmax = np.where(finite, keys, np.uint16(0)).max(axis, keepdims=True)
    empty = kmin > kmax
    min_bits = _key_to_bits(np.where(empty, np.uint16(0x8000), kmin))
    max_bits = _key_to_bits(np.where(empty, np.uint16(0x8000), kmax))
    lo = min_bits.view(np.float16).astype(np.float32)
    step = (max_bits.view(np.float16).astype(np.float32) - lo) / levels
    scale_bits = step.astype(np.float16).view(np.uint16)
    scale_bits = scale_bits + (scale_bits.view(np.float16).astype(np.float32) < step)
    scale = scale_bits.view(np.float16).astype(np.float32)
    inv = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
    with np.errstate(invalid="ignore"):
        q = (g.view(np.float16).astype(np.float32) - lo) * inv + np.float32(0.5)
        q = np.minimum(np.where(q > 0, q, np.float32(0)), levels)
    padded_width = g.shape[1] * gs if axis == 2 else width
    codes = q.astype(np.uint8).reshape(-1, padded_width)[:n_tokens, :width]
    if encoding == Encoding.Q4:  # column j low nibble, column j + ceil(width/2) high nibble
        half = (width + 1) // 2
        if width & 1:
            codes = np.concatenate([codes, np.zeros((n_tokens, 1), np.uint8)], axis=1)
        codes = codes[:, :half] | (codes[:, half:] << 4)
    if encoding == Encoding.Q6:  # quarters of q columns: two nibble planes, then a 2-bit plane
        q = (width + 3) // 4
        padded = np.zeros((n_tokens, 4 * q), np.uint8)
        padded[:, :width] = codes
        k = [padded[:, i * q:(i + 1) * q] for i in range(4)]
        codes = np.concatenate([k[0] & 15 | (k[2] & 15) << 4, k[1] & 15 | (k[3] & 15) << 4,
                                k[0] >> 4 | (k[1] >> 4) << 2 | (k[2] >> 4) << 4
                                | (k[3] >> 4) << 6], axis=1)
    return np.concatenate([min_bits.reshape(-1).view(np.uint8),
                           scale_bits.reshape(-1).view(np.uint8), codes.reshape(-1)])


def np_decode(payload: np.ndarray, n_tokens: int, width: int, encoding: Encoding,
              grouping: Grouping, gs: int) -> np.ndarray:
    if encoding == Encoding.F16:
        return payload.view(np.uint16).reshape(n_tokens, width).copy()
    if grouping == Grouping.PER_TOKEN:
        n_col = -(-width // gs)
        n_groups = n_tokens * n_col
        params_shape, codes_shape = (n_tokens, n_col, 1), (n_tokens, n_col, gs)
    else:
        n_blk = -(-n_tokens // gs)
        n_groups = n_blk * width
        params_shape, codes_shape = (n_blk, 1, width), (n_blk, gs, width)
    lo = payload[:2 * n_groups].view(np.float16).astype(np.float32).reshape(params_shape)
    scale = payload[2 * n_groups:4 * n_groups].view(np.float16).astype(np.float32).reshape(
        params_shape)
    body = payload[4 * n_groups:]
    if encoding == Encoding.Q4:
        packed = body.reshape(n_tokens, -1)
        codes = np.concatenate([packed & 0xF, packed >> 4], axis=1)
    elif encoding == Encoding.Q6:
        packed = body.reshape(n_tokens, 3, -1)
        p0, p1, top = packed[:, 0], packed[:, 1], packed[:, 2]
        codes = np.concatenate([p0 & 15 | (top & 3) << 4, p1 & 15 | (top >> 2 & 3) << 4,
                                p0 >> 4 | (top >> 4 & 3) << 4, p1 >> 4 | (top >> 6) << 4], axis=1)
    else:
        codes = body.reshape(n_tokens, width)
    padded = np.zeros((codes_shape[0] * codes_shape[1], width) if grouping == Grouping.PER_CHANNEL
                      else (n_tokens, codes_shape[1] * gs), np.uint8)
    padded[:n_tokens, :width] = codes[:, :width]
    v = lo + padded.reshape(codes_shape).astype(np.float32) * scale
    v = np.minimum(v, np.float32(65504.0))
    return v.astype(np.float16).view(np.uint16).reshape(padded.shape)[:n_tokens, :width]


# ---------------------------------------------------------------------------------------------
# Timing. Wall-clock medians, and for single-threaded runs also the median CPU time of the
# calling thread: on a shared machine the second is the per-core figure that survives other
# processes taking turns on the cores.


def _timed(fn: Callable[[], None], repeats: int) -> tuple[float, float, float]:
    """Median wall, median thread-CPU and best thread-CPU seconds of ``fn``, after a warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.thread_time() - c0)
    return statistics.median(wall), statistics.median(cpu), min(cpu)


def _throughput(blocks: list[np.ndarray], encoding: Encoding, grouping: Grouping, gs: int,
                repeats: int, numpy_repeats: int) -> dict[str, float]:
    nbytes = sum(b.nbytes for b in blocks)
    n_all = numba.config.NUMBA_NUM_THREADS
    payloads = [quant.encode(b, encoding, grouping, gs) for b in blocks]
    # A restore decodes each block into its rows of one large state buffer, as the engine does.
    state = np.empty((len(blocks) * TOKENS, WIDTH), np.uint16)
    jobs = [(p, state[i * TOKENS:(i + 1) * TOKENS]) for i, p in enumerate(payloads)]

    def enc(items: list[np.ndarray]) -> None:
        for b in items:
            quant.encode(b, encoding, grouping, gs)

    def dec(items: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for p, target in items:
            quant.decode_into(p, target, encoding, grouping, gs)

    pool = ThreadPoolExecutor(n_all)

    def workers(fn: Callable, items: list) -> Callable[[], None]:
        """One single-threaded worker per core, as the server's thread pool calls them."""
        shards = [items[i::n_all] for i in range(n_all)]

        def run() -> None:
            list(pool.map(fn, shards))
        return run

    row: dict[str, float] = {}
    for name, threads, enc_fn, dec_fn in [
            ("numba_1t", 1, lambda: enc(blocks), lambda: dec(jobs)),
            ("numba_parallel", n_all, lambda: enc(blocks), lambda: dec(jobs)),
            ("numba_workers", 1, workers(enc, blocks), workers(dec, jobs))]:
        quant.set_threads(threads)
        for direction, fn in (("encode", enc_fn), ("decode", dec_fn)):
            wall, cpu, best = _timed(fn, repeats)
            row[f"{direction}_{name}"] = nbytes / wall / 1e9
            if name == "numba_1t":
                row[f"{direction}_{name}_cpu"] = nbytes / cpu / 1e9
                row[f"{direction}_{name}_cpu_best"] = nbytes / best / 1e9
    pool.shutdown()
    quant.set_threads(1)
    for direction, fn in (
            ("encode", lambda: [np_encode(b, encoding, grouping, gs) for b in blocks]),
            ("decode", lambda: [np_decode(p, TOKENS, WIDTH, encoding, grouping, gs)
                                for p in payloads])):
        wall, cpu, best = _timed(fn, numpy_repeats)
        row[f"{direction}_numpy"] = nbytes / wall / 1e9
        row[f"{direction}_numpy_cpu"] = nbytes / cpu / 1e9
        row[f"{direction}_numpy_cpu_best"] = nbytes / best / 1e9
    return row


def _crossover(blocks: list[np.ndarray], repeats: int) -> list[dict[str, float]]:
    """Single-call wall time of Q8 on one vs all threads by block size (for PARALLEL_MIN_VALUES)."""
    saved = quant.PARALLEL_MIN_VALUES
    quant.PARALLEL_MIN_VALUES = 0
    n_all = numba.config.NUMBA_NUM_THREADS
    rows = []
    big = np.concatenate(blocks[:16])
    try:
        for n_tokens in (32, 64, 128, 256, 512, 1024, 4096):
            bits = big[:n_tokens]
            row: dict[str, float] = {"n_tokens": n_tokens, "values": bits.size}
            for grouping in Grouping:
                payload = quant.encode(bits, Encoding.Q8, grouping, 32)
                out = np.empty_like(bits)
                loops = max(1, 400_000 // bits.size)
                for threads in (1, n_all):
                    quant.set_threads(threads)

                    def enc() -> None:
                        for _ in range(loops):
                            quant.encode(bits, Encoding.Q8, grouping, 32)

                    def dec() -> None:
                        for _ in range(loops):
                            quant.decode_into(payload, out, Encoding.Q8, grouping, 32)
                    key = f"{grouping.name.lower()}_{threads}t"
                    row[f"encode_us_{key}"] = _timed(enc, repeats)[0] / loops * 1e6
                    row[f"decode_us_{key}"] = _timed(dec, repeats)[0] / loops * 1e6
            rows.append(row)
    finally:
        quant.PARALLEL_MIN_VALUES = saved
        quant.set_threads(1)
    return rows


def _records(keys: list[np.ndarray], values: list[np.ndarray], repeats: int) -> list[dict]:
    """Whole records per core: encode (``encode_record``) and the restore's batched decode into
    one state buffer (``DecodeBatch``), GB/s of f16 by thread CPU time, and their LMDB size."""
    layers = [LayerKV(TensorRows(F16.id, k.view(np.uint8)), TensorRows(F16.id, v.view(np.uint8)))
              for k, v in zip(keys, values)]
    nbytes = sum(layer.nbytes for layer in layers)
    row_bytes = 2 * WIDTH
    state_k = np.empty((len(layers) * TOKENS, row_bytes), np.uint8)
    state_v = np.empty_like(state_k)
    quant.set_threads(1)
    lmdb = LmdbTier(Path(tempfile.mkdtemp(prefix="kvtier-bench-quant-")), 1 << 20)
    rows = []
    for name, level in RECORD_FORMATS:
        fmt = codec.tier_format(name, level)
        records = [codec.encode_record(layer, fmt) for layer in layers]

        def encode() -> None:
            for layer in layers:
                codec.encode_record(layer, fmt)

        def decode() -> None:
            batch = codec.DecodeBatch()
            for i, record in enumerate(records):
                rows_at = slice(i * TOKENS, (i + 1) * TOKENS)
                batch.add_into(record, state_k[rows_at], state_v[rows_at], F16.id, F16.id)
            batch.run()
        _, enc_cpu, enc_best = _timed(encode, repeats)
        _, dec_cpu, dec_best = _timed(decode, repeats)
        stored = sum(lmdb.stored_bytes(len(r)) for r in records)
        rows.append({"format": name, "zstd_level": level,
                     "record_bytes": sum(map(len, records)) / len(records),
                     "lmdb_pages": stored / len(records) / 4096, "x_f16": stored / nbytes,
                     "encode_cpu": nbytes / enc_cpu / 1e9,
                     "encode_cpu_best": nbytes / enc_best / 1e9,
                     "decode_cpu": nbytes / dec_cpu / 1e9,
                     "decode_cpu_best": nbytes / dec_best / 1e9})
    lmdb.close()
    base = rows[0]
    for row in rows:
        for d in ("encode", "decode"):
            row[f"{d}_x_base"] = row[f"{d}_cpu"] / base[f"{d}_cpu"]
    return rows


def _print_records(rows: list[dict], n_blocks: int, repeats: int) -> None:
    print(f"\nwhole records, one thread ({n_blocks} layers of {TOKENS} tokens, synthetic KV; "
          f"median of {repeats}; GB/s of f16 by thread CPU time, x = against {rows[0]['format']} "
          f"zstd {rows[0]['zstd_level']} in this run)")
    print(f"{'format':8} {'zstd':>4} {'record B':>9} {'pages':>6} {'x f16':>6} {'encode':>7} "
          f"{'x':>5} {'decode':>7} {'x':>5}")
    for r in rows:
        print(f"{r['format']:8} {r['zstd_level']:4d} {r['record_bytes']:9.0f} "
              f"{r['lmdb_pages']:6.2f} {r['x_f16']:6.3f} {r['encode_cpu']:7.2f} "
              f"{r['encode_x_base']:5.2f} {r['decode_cpu']:7.2f} {r['decode_x_base']:5.2f}")


# ---------------------------------------------------------------------------------------------
# Reconstruction error


def _fake_quant(x: np.ndarray, levels: int, grouping: Grouping, gs: int, symmetric: bool,
                f32_params: bool) -> np.ndarray:
    """Quantize-dequantize variants the format does not store (for the design comparison)."""
    t, w = x.shape
    g = x.reshape(t, w // gs, gs) if grouping == Grouping.PER_TOKEN else x.reshape(t // gs, gs, w)
    axis = 2 if grouping == Grouping.PER_TOKEN else 1
    if symmetric:
        half = (levels - 1) // 2
        scale = np.abs(g).max(axis, keepdims=True) / half
        lo, codes_min, codes_max = 0.0, -half, half
    else:
        lo = g.min(axis, keepdims=True)
        scale = (g.max(axis, keepdims=True) - lo) / levels
        codes_min, codes_max = 0, levels
    if not f32_params:  # the stored format's rule: round the scale up to an f16
        s16 = scale.astype(np.float16)
        s16 = np.where(s16 < scale, np.nextafter(s16, np.float16(np.inf)), s16)
        scale = s16.astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.clip(np.round((g - lo) * inv), codes_min, codes_max)
    return (lo + q * scale).reshape(t, w).astype(np.float16).astype(np.float32)


def _error_stats(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    num = sum(float(((x.astype(np.float64) - y) ** 2).sum()) for x, y in pairs)
    den = sum(float((x.astype(np.float64) ** 2).sum()) for x, _ in pairs)
    return {"rel_rmse": (num / den) ** 0.5,
            "max_abs": max(float(np.abs(x - y).max()) for x, y in pairs)}


def _errors(keys: list[np.ndarray], values: list[np.ndarray]) -> list[dict]:
    rows = []
    values_per_block = TOKENS * WIDTH
    for kind, blocks in (("keys", keys), ("values", values)):
        f32 = [b.view(np.float16).astype(np.float32) for b in blocks]
        for encoding in (Encoding.Q8, Encoding.Q4):
            for grouping in Grouping:
                for gs in (16, 32, 64, 128):
                    pairs = []
                    for b, x in zip(blocks, f32):
                        p = quant.encode(b, encoding, grouping, gs)
                        y = quant.decode(p, TOKENS, WIDTH, encoding, grouping, gs)
                        pairs.append((x, y.view(np.float16).astype(np.float32)))
                    size = quant.encoded_nbytes(TOKENS, WIDTH, encoding, grouping, gs)
                    rows.append({"tensor": kind, "variant": f"{encoding.name} asym f16 params",
                                 "grouping": grouping.name, "group_size": gs,
                                 "bytes_per_value": size / values_per_block,
                                 **_error_stats(pairs)})
        gs = quant.DEFAULT_GROUP_SIZE
        for levels, symmetric, f32_params, name, extra_bytes in [
                (255, True, False, "Q8 sym f16 scale", 2), (255, False, True,
                                                             "Q8 asym f32 params", 8),
                (15, True, False, "Q4 sym f16 scale", 2), (15, False, True,
                                                           "Q4 asym f32 params", 8)]:
            for grouping in Grouping:
                pairs = [(x, _fake_quant(x, levels, grouping, gs, symmetric, f32_params))
                         for x in f32]
                code_bits = 8 if levels == 255 else 4
                rows.append({"tensor": kind, "variant": name, "grouping": grouping.name,
                             "group_size": gs,
                             "bytes_per_value": code_bits / 8 + extra_bytes / gs,
                             **_error_stats(pairs)})
    return rows


# ---------------------------------------------------------------------------------------------


def _machine() -> dict[str, object]:
    """The machine and library versions the numbers came from, with numba's threading."""
    return {**machine(), "numba_threads": numba.config.NUMBA_NUM_THREADS,
            "threading_layer": numba.threading_layer(), "platform": platform.platform(),
            "load_average": os.getloadavg()}


def _check_same_bytes(keys: list[np.ndarray], values: list[np.ndarray]) -> None:
    for encoding, grouping, gs, kind in CASES:
        bits = keys[0] if kind == "keys" else values[0]
        payload = quant.encode(bits, encoding, grouping, gs)
        reference = np_encode(bits, encoding, grouping, gs)
        assert payload.tobytes() == reference.tobytes(), (encoding, grouping)
        decoded = quant.decode(payload, TOKENS, WIDTH, encoding, grouping, gs)
        np.testing.assert_array_equal(decoded, np_decode(payload, TOKENS, WIDTH, encoding,
                                                         grouping, gs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer blocks and repeats")
    parser.add_argument("--records-only", action="store_true",
                        help="only the whole-records table (bench/results/quant_records.json)")
    args = parser.parse_args()
    n_blocks = 2 * BLOCKS if args.quick else LAYERS * BLOCKS
    repeats, numpy_repeats = (3, 1) if args.quick else (7, 3)
    keys, values = synthetic_kv(np.random.default_rng(0), n_blocks)
    if args.records_only:
        codec.warm_up()
        records = _records(keys, values, repeats)
        _print_records(records, n_blocks, repeats)
        RECORDS_RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RECORDS_RESULTS.write_text(json.dumps({
            "command": "python -m bench.bench_quant --records-only"
                       + (" --quick" if args.quick else ""),
            "machine": machine(), "records": records}, indent=1) + "\n")
        print(f"\nwrote {RECORDS_RESULTS}")
        return
    _check_same_bytes(keys, values)  # also compiles (or loads) every kernel
    gs = GS

    throughput = []
    n_all = numba.config.NUMBA_NUM_THREADS
    print(f"{n_blocks} blocks of {TOKENS}x{WIDTH} f16 ({n_blocks * TOKENS * WIDTH * 2 / 1e6:.0f} "
          f"MB) per timing, group {gs}; GB/s of f16, median of {repeats} (numpy "
          f"{numpy_repeats}); wall clock unless 'cpu' (median thread CPU time) or 'best' "
          f"(its minimum); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'':25} {'numba':>7} {'numba':>7} {'numba':>7} {'numba':>9} {'numba':>9} "
          f"{'numpy':>7} {'numpy':>7} {'ratio':>6} {'bytes/':>7}")
    print(f"{'enc grouping    g   dir':25} {'1T':>7} {'1T cpu':>7} {'1T best':>7} "
          f"{f'{n_all}T par':>9} {f'{n_all} wkrs':>9} {'':>7} {'cpu':>7} {'cpu':>6} {'value':>7}")
    for encoding, grouping, gs, kind in CASES:
        blocks = keys if kind == "keys" else values
        row = _throughput(blocks, encoding, grouping, gs, repeats, numpy_repeats)
        size = quant.encoded_nbytes(TOKENS, WIDTH, encoding, grouping, gs)
        entry = {"encoding": encoding.name, "grouping": grouping.name, "data": kind,
                 "group_size": gs, "bytes_per_value": size / (TOKENS * WIDTH), **row}
        for d in ("encode", "decode"):
            entry[f"{d}_ratio_cpu"] = row[f"{d}_numba_1t_cpu"] / row[f"{d}_numpy_cpu"]
            print(f"{encoding.name:3} {grouping.name:11} {gs:<3} {d[:3]:3} "
                  f"{row[f'{d}_numba_1t']:7.2f} "
                  f"{row[f'{d}_numba_1t_cpu']:7.2f} {row[f'{d}_numba_1t_cpu_best']:7.2f} "
                  f"{row[f'{d}_numba_parallel']:9.2f} "
                  f"{row[f'{d}_numba_workers']:9.2f} {row[f'{d}_numpy']:7.3f} "
                  f"{row[f'{d}_numpy_cpu']:7.3f} {entry[f'{d}_ratio_cpu']:5.0f}x "
                  f"{entry['bytes_per_value']:7.3f}")
        throughput.append(entry)

    crossover = _crossover(keys, repeats)
    print(f"\nQ8, one call, wall microseconds: 1 thread / {n_all} threads")
    for r in crossover:
        parts = [f"{d} {g.name.lower()} {r[f'{d}_us_{g.name.lower()}_1t']:7.1f} / "
                 f"{r[f'{d}_us_{g.name.lower()}_{n_all}t']:7.1f}"
                 for g in Grouping for d in ("encode", "decode")]
        print(f"  {r['n_tokens']:5d} tokens: " + "   ".join(parts))

    records = _records(keys, values, repeats)
    _print_records(records, n_blocks, repeats)

    errors = _errors(keys[:64], values[:64])
    print("\nreconstruction error (64 blocks): relative RMSE, max |error|, bytes per value")
    for e in errors:
        print(f"  {e['tensor']:6} {e['variant']:20} {e['grouping']:11} g={e['group_size']:<4d}"
              f" rel_rmse {e['rel_rmse']:.5f}  max_abs {e['max_abs']:.4f}  "
              f"B/value {e['bytes_per_value']:.3f}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "python -m bench.bench_quant" + (" --quick" if args.quick else ""),
        "machine": _machine(),
        "block": {"tokens": TOKENS, "width": WIDTH, "blocks_per_timing": n_blocks,
                  "repeats": repeats, "numpy_repeats": numpy_repeats, "group_size": gs,
                  "parallel_min_values": quant.PARALLEL_MIN_VALUES},
        "throughput_gbps": throughput, "parallel_crossover": crossover, "records": records,
        "errors": errors,
    }, indent=1) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
