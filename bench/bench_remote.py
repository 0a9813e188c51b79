"""The Redis Cluster tier (issue 14): time to first token on server B for a conversation server A
computed, against re-prefill; remote put/get throughput over loopback with 1 and 3 shards.

    python -m bench.bench_remote [--tokens 900] [--runs 3] [--blocks 48]

Starts its own Redis Clusters (Debian's redis-server) in a temporary directory. TTFT: engines A
and B (the default model, f16 warm and remote blocks, in one process) share a 3-master cluster;
each run A answers a new session of ``--tokens`` tokens of text, waits until its blocks and the
session are in Redis, then B continues that session with one more sentence and one token of
reply: its time includes reading the session and its blocks from Redis, storing them locally and
restoring them. The baseline is engine C (no remote tier) answering the same text, a new session
each run (a full prefill). Throughput: ``--blocks`` blocks shaped as the default model's at
256-token blocks (30 layers, q4 + zstd records of random payload, so zstd cannot shrink them),
written and read 16 per pipeline. Writes bench/results/remote.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import print_table, write_json
from kvtier.config import load_config
from kvtier.engine.api import GenerationRequest, SamplingParams
from kvtier.engine.engine import Engine
from kvtier.engine.model import Model, default_model_path
from kvtier.storage.records import namespace_of
from kvtier.storage.remote import BlockMeta, Redis, RemoteBlock, RemoteTier
from tests.remote.cluster import Cluster

LAYERS = 30
RECORD_BYTES = 256 * 768 * 9 // 32
"""A q4 record of one layer of a 256-token block of the default model (768 bytes of f16 K+V per
token and layer; q4 with per-group scales: about 9/32 of f16)."""
BATCH = 16


def throughput(url: str, n_blocks: int) -> dict[str, float]:
    tier = RemoteTier(Redis(url), budget=1 << 40)
    ns = namespace_of(b"bench")
    blocks = [RemoteBlock(ns, uuid.uuid4().bytes) for _ in range(n_blocks)]
    payload = [os.urandom(RECORD_BYTES) for _ in range(LAYERS)]
    meta = BlockMeta(LAYERS, 256, 0, LAYERS * RECORD_BYTES)
    total = n_blocks * LAYERS * RECORD_BYTES
    start = time.perf_counter()
    for i in range(0, n_blocks, BATCH):
        tier.put_blocks([(b, meta, payload) for b in blocks[i:i + BATCH]])
    put_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, n_blocks, BATCH):
        got = tier.get_blocks(blocks[i:i + BATCH])
        assert all(g is not None for g in got)
    get_s = time.perf_counter() - start
    tier.close()
    return {"bytes": total, "put_s": put_s, "get_s": get_s, "put_gb_s": total / put_s / 1e9,
            "get_gb_s": total / get_s / 1e9}


def text_of(model: Model, n_tokens: int, seed: int) -> str:
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    keys = sorted(topics)
    text = "\n\n".join(topics[k] for k in keys[seed:] + keys[:seed])
    tokens = model.tokenize(text[:n_tokens * 8], add_special=False)[:n_tokens]
    return b"".join(model.piece(int(t)) for t in tokens).decode("utf-8", errors="ignore")


def engine(data: Path, **overrides: object) -> Engine:
    values = {"data_dir": str(data), "model.context_size": 2048, "model.n_slots": 1,
              "tiers.warm_format": "f16", "tiers.host_ram_budget": "256MiB", **overrides}
    return Engine(load_config(None, values))


def ask(e: Engine, prompt: str, session: str) -> tuple[float, int]:
    start = time.perf_counter()
    done = e.generate(GenerationRequest(prompt=prompt, session_id=session,
                                        sampling=SamplingParams(temperature=0.0, max_tokens=1)))
    return time.perf_counter() - start, done.usage.cached_tokens


def ttft(url: str, tmp: Path, n_tokens: int, runs: int) -> dict[str, object]:
    remote = {"tiers.remote_url": url, "tiers.remote_format": "f16"}
    a, b = engine(tmp / "a", **remote), engine(tmp / "b", **remote)
    c = engine(tmp / "c")
    model = a.model
    rows = []
    try:
        for e in (a, b, c):
            ask(e, "Hello", f"warm-{uuid.uuid4().hex}")
        for run in range(runs):
            text = text_of(model, n_tokens, run + 1)
            session = f"bench-{uuid.uuid4().hex[:8]}"
            ask(a, text, session)
            a.wait_stored(120)
            assert a.manager.remote.drain(120)
            while a.manager.remote.catalog.holds(session):   # A lets the lease go
                time.sleep(0.01)
            follow = " Summarize it."
            moved_s, cached = ask(b, follow, session)
            prefill_s, _ = ask(c, text + follow, f"base-{uuid.uuid4().hex[:8]}")
            rows.append({"run": run, "remote_s": moved_s, "cached_tokens": cached,
                         "prefill_s": prefill_s})
    finally:
        for e in (a, b, c):
            e.close()
    remote_s = statistics.median(r["remote_s"] for r in rows)
    prefill_s = statistics.median(r["prefill_s"] for r in rows)
    return {"tokens": n_tokens, "runs": rows, "remote_s": remote_s, "prefill_s": prefill_s,
            "speedup": prefill_s / remote_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=900)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=48)
    args = parser.parse_args()
    out: dict[str, object] = {"record_bytes": RECORD_BYTES, "layers": LAYERS}
    with tempfile.TemporaryDirectory() as tmp:
        for masters in (1, 3):
            cluster = Cluster(Path(tmp) / f"c{masters}", masters=masters).start()
            try:
                out[f"shards_{masters}"] = throughput(cluster.url, args.blocks)
                if masters == 3:
                    out["ttft"] = ttft(cluster.url, Path(tmp), args.tokens, args.runs)
            finally:
                cluster.stop()
    rows = [[f"{m} shard{'s' if m > 1 else ''}", out[f"shards_{m}"]["bytes"] / 1e6,
             out[f"shards_{m}"]["put_gb_s"], out[f"shards_{m}"]["get_gb_s"]] for m in (1, 3)]
    print_table(["cluster", "MB", "put GB/s", "get GB/s"], rows)
    t = out["ttft"]
    print()
    print_table(["tokens", "B from A's blocks (s)", "re-prefill (s)", "x"],
                [[t["tokens"], t["remote_s"], t["prefill_s"], t["speedup"]]])
    print(f"wrote {write_json('remote', out)}")


if __name__ == "__main__":
    main()
