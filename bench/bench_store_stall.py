"""Does storing a long conversation slow the other slots down? One slot streams tokens while the
other finishes a long prompt, whose KV is then stored (read out on the engine thread, written by the
store writer in the background); the streaming slot's time per token is compared while the store
runs and while nothing does, in the same run.

    python -m bench.bench_store_stall [--model PATH] [--n-gpu-layers -1] [--tokens 32768]
                                      [--stream-tokens 2048]

Each token of the streaming request is timestamped as it arrives; a token counts as "during the
store" when the store writer had a job queued or running when it arrived (``Engine.wait_stored``
with no wait: no tier statistics are gathered per token), and as "idle" in the stretch after the
store finished. Writes bench/results/store_stall.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import kvtier  # noqa: F401  first, before llama_cpp: see kvtier/_preload.py
from bench.common import document_tokens, print_table, write_json
from kvtier.config import load_config
from kvtier.engine.api import Finished, GenerationRequest, SamplingParams
from kvtier.engine.engine import Engine
from kvtier.engine.model import Model, default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=8192, help="the long prompt's tokens")
    parser.add_argument("--stream-tokens", type=int, default=512)
    parser.add_argument("--out", default="store_stall")
    args = parser.parse_args()
    path = str(args.model or default_model_path())
    model = Model(path, args.n_gpu_layers)
    per_token = model.kv_bytes_per_token("f16", "f16")
    long_text = b"".join(model.piece(int(t)) for t in document_tokens(model)[1:args.tokens]
                         ).decode("utf-8", errors="replace")
    model.close()
    share = args.tokens + 1024
    engine = Engine(load_config(None, {
        "data_dir": tempfile.mkdtemp(prefix="kvtier-bench-stall-"), "model.model_path": path,
        "model.n_gpu_layers": args.n_gpu_layers, "model.flash_attn": "auto",
        "model.n_slots": 2, "model.context_size": share,
        "tiers.gpu_vram_budget": 2 * share * per_token,
        "tiers.host_ram_budget": 3 * per_token * share,
        "tiers.local_ssd_budget": 3 * per_token * share}))
    arrivals: list[tuple[float, bool]] = []
    stop = threading.Event()

    def stream() -> None:
        handle = engine.submit(GenerationRequest(
            prompt="Count from one to ten thousand: one, two, three,",
            sampling=SamplingParams(temperature=0.0, max_tokens=args.stream_tokens)))
        for item in handle:
            if isinstance(item, Finished) or stop.is_set():
                break
            busy = not engine.wait_stored(0)    # the writer has a job queued or running
            arrivals.append((time.perf_counter(), busy))

    try:
        engine.generate(GenerationRequest(prompt="Warm up.", sampling=SamplingParams(
            max_tokens=4)))
        engine.wait_stored()
        streamer = threading.Thread(target=stream)
        streamer.start()
        time.sleep(1.0)
        long_done = engine.generate(GenerationRequest(
            prompt=long_text, sampling=SamplingParams(temperature=0.0, max_tokens=1)))
        finished_at = time.perf_counter()
        engine.wait_stored()
        stored_at = time.perf_counter()
        streamer.join()
        store = engine.cache_stats().store
    finally:
        stop.set()
        engine.close()
    gaps = [(b[0] - a[0], b[1], b[0]) for a, b in zip(arrivals, arrivals[1:])]
    during = [g for g, busy, at in gaps if busy and finished_at <= at <= stored_at]
    idle = [g for g, busy, at in gaps if not busy and at > stored_at]
    rows = [[name, len(v), 1e3 * statistics.median(v) if v else float("nan")]
            for name, v in (("during the store", during), ("idle, after it", idle))]
    print_table(["streaming slot", "tokens", "median ms/token"], rows)
    ratio = statistics.median(during) / statistics.median(idle) if during and idle else None
    print(f"long prompt {long_done.usage.prompt_tokens} tokens; store: engine-thread read "
          f"{store.read_s:.3f} s, writer {store.write_s:.2f} s; during/idle = {ratio}")
    write_json(args.out, {"model": path, "n_gpu_layers": args.n_gpu_layers,
                          "long_tokens": long_done.usage.prompt_tokens,
                          "during_ms": [1e3 * g for g in during],
                          "idle_ms": [1e3 * g for g in idle], "during_over_idle": ratio,
                          "store_read_s": store.read_s, "store_write_s": store.write_s})


if __name__ == "__main__":
    main()
