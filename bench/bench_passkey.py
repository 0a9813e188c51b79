"""Passkey retrieval beyond the hot tier: full attention vs sinks + recent blocks vs kvtier's
working set, on the default model, through the engine.

    python -m bench.bench_passkey [--hot 1024] [--lengths 2048 4096 8192 16384 32768]
                                  [--depths 0.1 0.3 0.5 0.7 0.9] [--keys 1]

Each method serves the same prompts (filler text, "The pass key is N" at a depth, the question at
the end) with a slot's hot share of ``--hot`` tokens, except full attention, whose share holds the
whole prompt (it runs only where the model's trained context holds the prompt: 8,192 tokens for
SmolLM2). Sinks + recent fills the same share with the first block and the latest ones
(StreamingLLM's window); kvtier holds the first block, the best-scored blocks for the current
queries and the two latest. Writes bench/results/passkey.json (``--out``); --plot draws
docs/passkey.png from every passkey*.json (:mod:`bench.plot_passkey`).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench import passkey
from bench.common import (add_selection_options, print_table, selected, selection_settings,
                          write_json)
from kvtier.config import load_config
from kvtier.engine.api import GenerationRequest, SamplingParams
from kvtier.engine.engine import Engine
from kvtier.engine.model import Model, default_model_path

ANSWER = SamplingParams(temperature=0.0, max_tokens=8)
METHODS = ("full", "sinks+recent", "kvtier")


def engine_for(method: str, length: int, model: Model, args: argparse.Namespace
               ) -> Engine | None:
    """An engine whose slot holds ``args.hot`` tokens (the whole prompt for full attention,
    which runs only inside the model's trained context); None where the method cannot run."""
    block = args.block_size
    if method == "full" and length > model.n_ctx_train:
        return None
    share = min(length + 2 * block, model.n_ctx_train) if method == "full" else args.hot
    settings = {"data_dir": tempfile.mkdtemp(prefix="kvtier-bench-passkey-"),
                "model.n_slots": 1, "model.context_size": length + 1024,
                "model.n_threads": args.threads, "model.block_size": block,
                "tiers.gpu_vram_budget": share * model.kv_bytes_per_token("f16", "f16"),
                "working_set.sink_blocks": args.sink, "working_set.recent_blocks": args.recent,
                **selection_settings(args)}
    if method == "sinks+recent":
        settings["working_set.recent_blocks"] = args.hot // block - args.sink
    return Engine(load_config(None, settings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hot", type=int, default=1024, help="a slot's hot share, in tokens")
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--keys", type=int, default=1, help="keys per length and depth")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--sink", type=int, default=1, help="working_set.sink_blocks")
    parser.add_argument("--recent", type=int, default=2, help="working_set.recent_blocks")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--out", default="passkey", help="results file name (no .json)")
    add_selection_options(parser)
    args = parser.parse_args()

    model = Model(default_model_path())
    results = []
    for length in args.lengths:
        for method in args.methods:
            engine = engine_for(method, length, model, args)
            if engine is None:
                continue
            count = lambda text: len(engine.model.tokenize(text, add_special=False))  # noqa: E731
            try:
                for depth in args.depths:
                    for key in passkey.keys(args.keys, seed=hash((length, depth)) & 0xFFFF):
                        text = passkey.prompt(length, depth, key, count)
                        start = time.perf_counter()
                        done = engine.generate(GenerationRequest(prompt=text, sampling=ANSWER))
                        seconds = time.perf_counter() - start
                        row = {"method": method, "length": length, "depth": depth, "key": key,
                               "tokens": done.usage.prompt_tokens,
                               "found": passkey.found(done.text, key), "reply": done.text,
                               "seconds": seconds,
                               "working_set_tokens": done.usage.working_set_tokens}
                        results.append(row)
                        print(row, flush=True)
            finally:
                engine.close()
    table = []
    for length in args.lengths:
        line: list = [length]
        for method in args.methods:
            rows = [r for r in results if r["method"] == method and r["length"] == length]
            line.append(f"{sum(r['found'] for r in rows)}/{len(rows)}" if rows else "-")
        table.append(line)
    print_table(["tokens", *args.methods], table)
    write_json(args.out, {"hot_tokens": args.hot, "block_size": args.block_size,
                          "sink_blocks": args.sink, "recent_blocks": args.recent,
                          "query_layer_stride": selected(args).query_layer_stride,
                          "keep_margin": selected(args).keep_margin, "results": results})
    if args.plot:
        from bench import plot_passkey
        plot_passkey.main()


if __name__ == "__main__":
    main()
