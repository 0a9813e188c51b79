"""Several questions in turn about different parts of one long document, in one session: the working
set must follow each question to the block that answers it.

    python -m bench.bench_multiturn [--tokens 8192] [--hot 1024] [--facts 4] [--rounds 2]

The document is filler text with ``--facts`` facts ("The secret number of the red door is N.") at
evenly spaced depths; it is sent once (a session), then each fact is asked for in turn, in a
shuffled order, ``--rounds`` times, each question a new turn of the same session. Per turn:
whether the answer holds the number, and how many tokens the working set held. Writes
bench/results/multiturn.json.
"""

from __future__ import annotations

import argparse
import random
import tempfile

from bench import passkey
from bench.common import print_table, write_json
from kvtier.config import load_config
from kvtier.engine.api import GenerationRequest, SamplingParams
from kvtier.engine.engine import Engine
from kvtier.engine.model import Model, default_model_path

BLOCK = 256
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")


def fact(colour: str, number: int) -> str:
    return f"The secret number of the {colour} door is {number}. "


def question(colour: str) -> str:
    return (f"\nWhat is the secret number of the {colour} door? The secret number of the "
            f"{colour} door is")


def document(n_tokens: int, facts: list[tuple[str, int]], count) -> str:
    per_filler = count(passkey.FILLER)
    n_filler = max(len(facts) + 1, (n_tokens - count(passkey.HEAD)) // per_filler - 4 * len(facts))
    parts = [passkey.HEAD]
    step = n_filler // (len(facts) + 1)
    for i, (colour, number) in enumerate(facts):
        parts.append(passkey.FILLER * step)
        parts.append(fact(colour, number))
    parts.append(passkey.FILLER * (n_filler - step * len(facts)))
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hot", type=int, default=1024)
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--recent", type=int, default=2,
                        help="working_set.recent_blocks (hot/256 - 1: sinks + recent only)")
    args = parser.parse_args()
    model = Model(default_model_path())
    engine = Engine(load_config(None, {
        "data_dir": tempfile.mkdtemp(prefix="kvtier-bench-multiturn-"), "model.n_slots": 1,
        "model.context_size": args.tokens + 4096, "working_set.recent_blocks": args.recent,
        "tiers.gpu_vram_budget": args.hot * model.kv_bytes_per_token("f16", "f16")}))
    model.close()
    rng = random.Random(args.tokens)
    facts = [(COLOURS[i], rng.randint(10000, 99999)) for i in range(args.facts)]
    count = lambda text: len(engine.model.tokenize(text, add_special=False))  # noqa: E731
    results = []
    try:
        engine.generate(GenerationRequest(prompt=document(args.tokens, facts, count),
                                          session_id="doc", sampling=SamplingParams(max_tokens=1)))
        order = [f for _ in range(args.rounds) for f in rng.sample(facts, len(facts))]
        for turn, (colour, number) in enumerate(order, 1):
            done = engine.generate(GenerationRequest(
                prompt=question(colour), session_id="doc",
                sampling=SamplingParams(temperature=0.0, max_tokens=8)))
            row = {"turn": turn, "colour": colour, "depth": facts.index((colour, number)),
                   "found": str(number) in done.text.replace(" ", ""), "reply": done.text,
                   "context_tokens": done.usage.prompt_tokens,
                   "cached_tokens": done.usage.cached_tokens,
                   "working_set_tokens": done.usage.working_set_tokens}
            results.append(row)
            print(row, flush=True)
    finally:
        stats = engine.cache_stats().working_set
        engine.close()
    print_table(["turn", "fact", "found", "context", "cached", "hot"],
                [[r["turn"], r["colour"], r["found"], r["context_tokens"], r["cached_tokens"],
                  r["working_set_tokens"]] for r in results])
    print(f"{sum(r['found'] for r in results)}/{len(results)} answered; {stats}")
    write_json("multiturn", {"tokens": args.tokens, "hot_tokens": args.hot,
                             "recent_blocks": args.recent, "results": results,
                             "working_set": {n: getattr(stats, n) for n in stats.__slots__}})


if __name__ == "__main__":
    main()
