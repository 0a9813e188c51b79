"""Decode speed with kvtier (snapshotting every request into the store) vs plain llama-cpp-python
on the same model, context and prompt, greedy.

    python -m bench.bench_decode [--tokens 256] [--prompt-tokens 600] [--repeats 3]

Both stream; decode speed is measured from the first to the last generated token, and the
end-to-end time includes kvtier's snapshot of the request's blocks after the last token. Each run
is its own process, alternating between the two: two llama.cpp contexts driven from two threads of
one process slow each other down (their OpenMP thread pools compete for the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from llama_cpp import Llama

from bench.common import document_tokens, print_table, write_json
from kvtier.config import load_config
from kvtier.engine.api import Finished, GenerationRequest, SamplingParams, TokenEvent
from kvtier.engine.engine import Engine
from kvtier.engine.model import default_model_path


def run_llama(llm: Llama, prompt: str, n: int) -> tuple[float, float, int]:
    llm.reset()
    start = time.perf_counter()
    stamps = []
    for _ in llm.create_completion(prompt, max_tokens=n, temperature=0.0, stream=True):
        stamps.append(time.perf_counter())
    return stamps[-1] - stamps[0], time.perf_counter() - start, len(stamps)


def run_kvtier(engine: Engine, prompt: str, n: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    stamps = []
    request = GenerationRequest(prompt=prompt, sampling=SamplingParams(temperature=0.0,
                                                                       max_tokens=n))
    for event in engine.submit(request):
        if isinstance(event, TokenEvent):
            stamps.append(time.perf_counter())
        elif isinstance(event, Finished):
            end = time.perf_counter()
    return stamps[-1] - stamps[0], end - start, len(stamps)


def run_one(runner: str, prompt_tokens: int, n: int, salt: int) -> tuple[float, float, int]:
    n_ctx = 2048
    # The same llama.cpp settings on both sides: kvtier's defaults (every core, flash attention
    # auto = on for this CPU build); llama-cpp-python would otherwise use half the cores, no FA.
    threads = len(os.sched_getaffinity(0))
    llm = Llama(str(default_model_path()), n_ctx=n_ctx, verbose=False, n_batch=512,
                n_threads=threads, n_threads_batch=threads, flash_attn=True)
    prompt = f"{salt}: " + llm.detokenize(
        document_tokens_for(llm, prompt_tokens).tolist()).decode(errors="ignore")
    if runner == "plain":
        return run_llama(llm, prompt, n)
    del llm
    engine = Engine(load_config(None, {"data_dir": tempfile.mkdtemp(prefix="kvtier-bench-"),
                                       "model.context_size": n_ctx, "model.n_slots": 1}))
    try:
        return run_kvtier(engine, prompt, n)
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runner", choices=["plain", "kvtier"], help=argparse.SUPPRESS)
    parser.add_argument("--salt", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runner:
        print(json.dumps(run_one(args.runner, args.prompt_tokens, args.tokens, args.salt)))
        return
    runs: dict[str, list] = {"plain": [], "kvtier": []}
    for i in range(args.repeats):
        for runner in runs:
            out = subprocess.run([sys.executable, "-m", "bench.bench_decode", "--runner", runner,
                                  "--salt", str(i), "--tokens", str(args.tokens),
                                  "--prompt-tokens", str(args.prompt_tokens)],
                                 capture_output=True, text=True, check=True)
            runs[runner].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def summary(results):
        decode = statistics.median(r[0] / (r[2] - 1) for r in results)
        total = statistics.median(r[1] for r in results)
        return decode, total, results[0][2]

    p_dec, p_tot, p_n = summary(runs["plain"])
    k_dec, k_tot, k_n = summary(runs["kvtier"])
    rows = [["llama-cpp-python", p_n, p_dec * 1000, 1 / p_dec, p_tot, 1.0],
            ["kvtier (snapshots on)", k_n, k_dec * 1000, 1 / k_dec, k_tot, k_dec / p_dec]]
    print_table(["runner", "tokens", "ms/token", "tokens/s", "end-to-end s",
                 "decode time ratio"], rows)
    path = write_json("decode", {"prompt_tokens": args.prompt_tokens, "tokens": args.tokens,
                                 "plain": {"ms_per_token": p_dec * 1000, "total_s": p_tot},
                                 "kvtier": {"ms_per_token": k_dec * 1000, "total_s": k_tot},
                                 "overhead": k_dec / p_dec - 1})
    print(f"decode overhead {100 * (k_dec / p_dec - 1):+.1f}%; wrote {path}")


def document_tokens_for(llm: Llama, n: int):
    class _Tok:
        def tokenize(self, text: str):
            import numpy as np
            return np.array(llm.tokenize(text.encode(), add_bos=False), dtype=np.int32)
    return document_tokens(_Tok(), 20_000)[:n]


if __name__ == "__main__":
    main()
