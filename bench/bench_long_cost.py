"""What a long conversation costs: decode speed and memory as it grows past the hot tier, and the
time to a first token over a conversation whose blocks are all in cold, with and without prefetch.

    python -m bench.bench_long_cost [--hot 1024] [--lengths 1024 2048 4096 8192 16384 32768]
                                    [--decode-tokens 64] [--cold-tokens 32768]

Decode: one session grows through the lengths (English from ``pydoc_data.topics``); at each, 64
tokens are generated and the time between streamed tokens taken (the working set is chosen again
every ``working_set.reselect_tokens`` of them: the scoring work is in the numbers). Full attention
(a hot share holding the whole conversation) is measured where the model's trained context allows.
Memory: the process's resident set after each length.

Cold: a conversation of ``--cold-tokens`` is stored, every block moved to cold, and a question sent
while the server's one slot is busy with another request (as a request waits its turn); time to
its first token from the moment it was sent, with ``working_set.prefetch`` on and off.
Writes bench/results/long_cost.json; --plot draws docs/long_cost.png.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.common import document_tokens, print_table, write_json
from kvtier.config import load_config
from kvtier.engine.api import Finished, GenerationRequest, SamplingParams, TokenEvent
from kvtier.engine.engine import Engine
from kvtier.engine.model import Model, default_model_path
from kvtier.storage.records import Namespace
from kvtier.storage.tiers import Tier

BLOCK = 256


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_engine(data_dir: str, share: int, context: int, per_token: int, **extra) -> Engine:
    return Engine(load_config(None, {"data_dir": data_dir, "model.n_slots": 1,
                                     "model.context_size": context,
                                     "tiers.gpu_vram_budget": share * per_token, **extra}))


def decode_ms(engine: Engine, session: str, n: int) -> float:
    """Median ms between streamed tokens of an n-token continuation of ``session``."""
    handle = engine.submit(GenerationRequest(
        prompt=" ", session_id=session,
        sampling=SamplingParams(temperature=0.0, max_tokens=n, stop=())))
    stamps = []
    for event in handle:
        if isinstance(event, TokenEvent):
            stamps.append(time.perf_counter())
        if isinstance(event, Finished):
            break
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return 1e3 * statistics.median(gaps) if gaps else float("nan")


def grow(engine: Engine, session: str, text_tokens, have: int, want: int) -> int:
    """Extend the session by document text to about ``want`` tokens."""
    if want <= have:
        return have
    chunk = text_tokens[have:want]
    text = b"".join(engine.model.piece(int(t)) for t in chunk).decode("utf-8", errors="ignore")
    done = engine.generate(GenerationRequest(prompt=text, session_id=session,
                                             sampling=SamplingParams(max_tokens=1)))
    return done.usage.prompt_tokens + done.usage.completion_tokens


def decode_curve(args, per_token: int, n_ctx_train: int, text) -> list[dict]:
    rows = []
    for method in ("kvtier", "full"):
        lengths = [n for n in args.lengths if method == "kvtier" or n + BLOCK <= n_ctx_train]
        if not lengths:
            continue
        share = args.hot if method == "kvtier" else max(lengths) + 2 * BLOCK
        engine = make_engine(tempfile.mkdtemp(prefix="kvtier-bench-cost-"), share,
                             max(lengths) + 4096, per_token)
        try:
            have = 0
            for length in lengths:
                have = grow(engine, "long", text, have, length)
                ms = decode_ms(engine, "long", args.decode_tokens)
                have += args.decode_tokens
                row = {"method": method, "tokens": have, "ms_per_token": ms, "rss_mib": rss_mib(),
                       "hot_share": share}
                rows.append(row)
                print(row, flush=True)
        finally:
            engine.close()
    return rows


def cold_ttft(args, per_token: int, text) -> list[dict]:
    data_dir = tempfile.mkdtemp(prefix="kvtier-bench-cold-")
    engine = make_engine(data_dir, args.hot, args.cold_tokens + 4096, per_token)
    try:
        grow(engine, "base", text, 0, args.cold_tokens)
    finally:
        engine.close()
    rows = []
    for prefetch in (False, True):
        engine = make_engine(data_dir, args.hot, args.cold_tokens + 4096, per_token,
                             **{"working_set.prefetch": prefetch})
        try:
            sid = f"q-{prefetch}"
            engine.fork_session("base", sid)
            seq = engine.manager.get_sequence(Namespace(engine.namespace),
                                              engine.sessions.load(sid).sequence)
            for block in seq.block_ids():
                engine.manager.move(block, Tier.COLD)
            engine.manager.drain()
            busy = threading.Thread(target=engine.generate, args=(GenerationRequest(
                prompt="Once upon a time", sampling=SamplingParams(max_tokens=args.busy_tokens,
                                                                   temperature=0.0)),))
            busy.start()
            time.sleep(0.2)
            start = time.perf_counter()
            handle = engine.submit(GenerationRequest(
                prompt="\nIn short, the text above is about", session_id=sid,
                sampling=SamplingParams(temperature=0.0, max_tokens=4)))
            first = None
            for event in handle:
                if first is None:
                    first = time.perf_counter() - start
                if isinstance(event, Finished):
                    break
            busy.join()
            stats = engine.cache_stats().working_set
            row = {"prefetch": prefetch, "tokens": args.cold_tokens, "ttft_s": first,
                   "prefetches": stats.prefetches, "prefetch_hits": stats.prefetch_hits,
                   "prefetch_misses": stats.prefetch_misses}
            rows.append(row)
            print(row, flush=True)
        finally:
            engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hot", type=int, default=1024)
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--cold-tokens", type=int, default=32768)
    parser.add_argument("--busy-tokens", type=int, default=96)
    parser.add_argument("--skip", choices=["decode", "cold"])
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args()
    model = Model(default_model_path())
    per_token, n_ctx_train = model.kv_bytes_per_token("f16", "f16"), model.n_ctx_train
    text = document_tokens(model)
    model.close()
    curve = decode_curve(args, per_token, n_ctx_train, text) if args.skip != "decode" else []
    cold = cold_ttft(args, per_token, text) if args.skip != "cold" else []
    if curve:
        print_table(["method", "tokens", "ms/token", "RSS MiB"],
                    [[r["method"], r["tokens"], f"{r['ms_per_token']:.1f}",
                      f"{r['rss_mib']:.0f}"] for r in curve])
    if cold:
        print_table(["prefetch", "tokens", "TTFT s", "hits", "misses"],
                    [[r["prefetch"], r["tokens"], f"{r['ttft_s']:.2f}", r["prefetch_hits"],
                      r["prefetch_misses"]] for r in cold])
    write_json("long_cost", {"hot_tokens": args.hot, "decode": curve, "cold": cold})
    if args.plot and curve:
        plot(curve, args.hot)


def plot(curve: list[dict], hot: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in ("kvtier", "full"):
        rows = [r for r in curve if r["method"] == method]
        if rows:
            left.plot([r["tokens"] for r in rows], [r["ms_per_token"] for r in rows],
                      marker="o", label=method)
            right.plot([r["tokens"] for r in rows], [r["rss_mib"] for r in rows], marker="o",
                       label=method)
    for ax, label in ((left, "decode ms/token"), (right, "resident memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("conversation tokens")
        ax.set_ylabel(label)
        ax.axvline(hot, color="grey", linestyle=":", linewidth=1)
        ax.legend()
    fig.suptitle(f"SmolLM2-135M, hot share {hot} tokens (dotted)")
    fig.tight_layout()
    fig.savefig("docs/long_cost.png", dpi=120)


if __name__ == "__main__":
    main()
