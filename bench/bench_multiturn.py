"""Several questions in turn about different parts of one long document, in one session: the working
set must follow each question to the block that answers it.

    python -m bench.bench_multiturn [--tokens 4096] [--hot 1024] [--facts 4] [--rounds 2]
                                    [--methods full kvtier]

The document is filler text with ``--facts`` facts ("The secret number of the red door is N.") at
evenly spaced depths; it is sent once (a session), then each fact is asked for in turn, in a
shuffled order, ``--rounds`` times, each question a new turn of the same session. Per turn:
whether the answer holds the number, whether the working set held the block the fact is in (what
kvtier's selection controls; the answer also depends on the model), and how many tokens the
working set held. Full attention (a hot share holding the whole document) answers the same
questions as the baseline. Writes bench/results/multiturn.json.
"""

from __future__ import annotations

import argparse
import random
import tempfile

from bench import passkey
from bench.common import (add_selection_options, print_table, selected, selection_settings,
                          write_json)
from kvtier.config import load_config
from kvtier.engine.api import GenerationRequest, SamplingParams, WorkingSetStats
from kvtier.engine.engine import Engine
from kvtier.engine.model import Model, default_model_path

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


def fact_blocks(text: str, facts: list[tuple[str, int]], count, block: int
                ) -> dict[str, set[int]]:
    """The blocks each fact's tokens fall in (a fact may straddle two)."""
    blocks = {}
    for colour, number in facts:
        at = text.index(fact(colour, number))
        first = count(text[:at]) + 1                 # the BOS token comes first
        last = first + count(fact(colour, number)) - 1
        blocks[colour] = {first // block, last // block}
    return blocks


def held_blocks(engine: Engine) -> set[int] | None:
    """The blocks the slot's working set holds (None: the conversation is all hot)."""
    scheduler = engine._scheduler
    window = scheduler.windows.get(scheduler.hot.slots[0])
    return None if window is None else set(window.held)


def run(method: str, args: argparse.Namespace, model: Model) -> list[dict]:
    hot = args.tokens + 2 * args.block_size if method == "full" else args.hot
    if hot > model.n_ctx_train:
        print(f"{method}: a hot share of {hot} tokens is past the model's trained context")
        return []
    engine = Engine(load_config(None, {
        "data_dir": tempfile.mkdtemp(prefix="kvtier-bench-multiturn-"), "model.n_slots": 1,
        "model.context_size": args.tokens + 4096, "model.block_size": args.block_size,
        "working_set.sink_blocks": args.sink, "working_set.recent_blocks": args.recent,
        **selection_settings(args),
        "tiers.gpu_vram_budget": hot * model.kv_bytes_per_token("f16", "f16")}))
    rng = random.Random(args.tokens)
    facts = [(COLOURS[i], rng.randint(10000, 99999)) for i in range(args.facts)]
    count = lambda text: len(engine.model.tokenize(text, add_special=False))  # noqa: E731
    text = document(args.tokens, facts, count)
    where = fact_blocks(text, facts, count, args.block_size)
    results = []
    try:
        engine.generate(GenerationRequest(prompt=text, session_id="doc",
                                          sampling=SamplingParams(max_tokens=1)))
        order = [f for _ in range(args.rounds) for f in rng.sample(facts, len(facts))]
        for turn, (colour, number) in enumerate(order, 1):
            done = engine.generate(GenerationRequest(
                prompt=question(colour), session_id="doc",
                sampling=SamplingParams(temperature=0.0, max_tokens=8)))
            held = held_blocks(engine)
            row = {"method": method, "turn": turn, "colour": colour,
                   "depth": facts.index((colour, number)),
                   "found": str(number) in done.text.replace(" ", ""), "reply": done.text,
                   "fact_held": True if held is None else bool(where[colour] & held),
                   "context_tokens": done.usage.prompt_tokens,
                   "cached_tokens": done.usage.cached_tokens,
                   "working_set_tokens": done.usage.working_set_tokens}
            results.append(row)
            print(row, flush=True)
        results.append({"method": method, "working_set": {
            n: getattr(engine.cache_stats().working_set, n) for n in WorkingSetStats.__slots__}})
    finally:
        engine.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hot", type=int, default=1024)
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--sink", type=int, default=1, help="working_set.sink_blocks")
    parser.add_argument("--recent", type=int, default=2, help="working_set.recent_blocks")
    parser.add_argument("--methods", nargs="+", default=["full", "kvtier"],
                        choices=["full", "kvtier"])
    parser.add_argument("--out", default="multiturn", help="results file name (no .json)")
    add_selection_options(parser)
    args = parser.parse_args()
    model = Model(default_model_path())
    results = [row for method in args.methods for row in run(method, args, model)]
    model.close()
    turns = [r for r in results if "turn" in r]
    print_table(["method", "turn", "fact", "found", "fact's block held", "context", "cached",
                 "hot"],
                [[r["method"], r["turn"], r["colour"], r["found"], r["fact_held"],
                  r["context_tokens"], r["cached_tokens"], r["working_set_tokens"]]
                 for r in turns])
    for method in args.methods:
        rows = [r for r in turns if r["method"] == method]
        if rows:
            print(f"{method}: {sum(r['found'] for r in rows)}/{len(rows)} answered, the fact's "
                  f"block held in {sum(r['fact_held'] for r in rows)}/{len(rows)}")
    write_json(args.out, {"tokens": args.tokens, "hot_tokens": args.hot,
                          "block_size": args.block_size, "sink_blocks": args.sink,
                          "recent_blocks": args.recent,
                          "query_layer_stride": selected(args).query_layer_stride,
                          "keep_margin": selected(args).keep_margin, "results": results})


if __name__ == "__main__":
    main()
