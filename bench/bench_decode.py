"""Decode speed with kvtier (snapshotting every request into the store) vs plain llama-cpp-python
on the same model, context and prompt, greedy.

    python -m bench.bench_decode [--tokens 256] [--prompt-tokens 600] [--repeats 3]

Both stream; decode speed is measured from the first to the last generated token, and the
end-to-end time includes kvtier's snapshot of the request's blocks after the last token.
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n_ctx = 2048
    # The same llama.cpp settings on both sides: kvtier's defaults (every core, flash attention
    # auto = on for this CPU build); llama-cpp-python would otherwise use half the cores, no FA.
    threads = len(os.sched_getaffinity(0))
    llm = Llama(str(default_model_path()), n_ctx=n_ctx, verbose=False, n_batch=512,
                n_threads=threads, n_threads_batch=threads, flash_attn=True)
    prompt = llm.detokenize(document_tokens_for(llm, args.prompt_tokens).tolist()).decode(
        errors="ignore")
    tmp = tempfile.mkdtemp(prefix="kvtier-bench-decode-")
    engine = Engine(load_config(None, {"data_dir": tmp, "model.context_size": n_ctx,
                                       "model.n_slots": 1}))
    plain, kv = [], []
    for i in range(args.repeats):
        # Vary the prompt so that neither side reuses the previous run's KV.
        p = f"{i}: {prompt}"
        plain.append(run_llama(llm, p, args.tokens))
        kv.append(run_kvtier(engine, p, args.tokens))
    engine.close()

    def summary(runs):
        decode = statistics.median(r[0] / (r[2] - 1) for r in runs)
        total = statistics.median(r[1] for r in runs)
        return decode, total, runs[0][2]

    p_dec, p_tot, p_n = summary(plain)
    k_dec, k_tot, k_n = summary(kv)
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
