"""The tiers at work: a conversation that outgrows the warm and cool budgets, questioned about
different parts of it in turn; where its blocks are after each turn, moved by measured attention.

    python -m bench.bench_tiers_at_work [--tokens 8192] [--warm 24MiB] [--cool 48MiB] [--plot]

The document (filler with facts, as in bench_multiturn) is sent in a session; then each fact is
asked for, twice over. After every turn the store's background work is drained and each of the
conversation's blocks is located; a fact's block is the one holding its number. Writes
bench/results/tiers_at_work.json; --plot draws docs/tiers_at_work.png (blocks per tier by turn,
and the tier of each fact's block).
"""

from __future__ import annotations

import argparse
import random
import tempfile

import numpy as np

from bench.bench_multiturn import COLOURS, document, question
from bench.common import write_json
from kvtier.config import load_config
from kvtier.engine.api import GenerationRequest, SamplingParams
from kvtier.engine.engine import Engine
from kvtier.engine.model import Model, default_model_path
from kvtier.storage.records import Namespace
from kvtier.storage.tiers import Tier

BLOCK = 256


def locate(engine: Engine, session: str, numbers: dict[str, int]) -> dict:
    seq = engine.manager.get_sequence(Namespace(engine.namespace),
                                      engine.sessions.load(session).sequence)
    tokens = np.frombuffer(seq.tokens, dtype="<i4")
    blocks = seq.block_ids()
    entries = [engine.manager.block_entry(b) for b in blocks]
    counts = {t.label: sum(1 for e in entries if e is not None and e.tier == t) for t in Tier}
    facts = {}
    for colour, number in numbers.items():
        needle = engine.model.tokenize(f" {number}", add_special=False)
        at = next((i for i in range(len(tokens)) if np.array_equal(tokens[i:i + len(needle)],
                                                                   needle)), None)
        entry = entries[at // BLOCK] if at is not None else None
        facts[colour] = {"block": at // BLOCK if at is not None else None,
                         "tier": entry.tier.label if entry is not None else "missing",
                         "attention": entry.attention if entry is not None else None}
    attention = [e.attention for e in entries if e is not None]
    return {"tiers": counts, "facts": facts, "blocks": len(blocks),
            "mean_attention": float(np.mean([max(a, 0) for a in attention]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hot", type=int, default=1024)
    parser.add_argument("--warm", default="24MiB")
    parser.add_argument("--cool", default="48MiB")
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args()
    model = Model(default_model_path())
    per_token = model.kv_bytes_per_token("f16", "f16")
    model.close()
    engine = Engine(load_config(None, {
        "data_dir": tempfile.mkdtemp(prefix="kvtier-bench-tiers-"), "model.n_slots": 1,
        "model.context_size": args.tokens + 4096, "tiers.gpu_vram_budget": args.hot * per_token,
        "tiers.host_ram_budget": args.warm, "tiers.local_ssd_budget": args.cool}))
    rng = random.Random(3)
    numbers = {COLOURS[i]: rng.randint(10000, 99999) for i in range(args.facts)}
    count = lambda text: len(engine.model.tokenize(text, add_special=False))  # noqa: E731
    timeline = []
    try:
        engine.generate(GenerationRequest(
            prompt=document(args.tokens, list(numbers.items()), count), session_id="doc",
            sampling=SamplingParams(max_tokens=1)))
        engine.manager.drain()
        timeline.append({"turn": 0, "asked": None, "found": None,
                         **locate(engine, "doc", numbers)})
        print(timeline[-1], flush=True)
        order = [c for _ in range(2) for c in rng.sample(list(numbers), len(numbers))]
        for turn, colour in enumerate(order, 1):
            done = engine.generate(GenerationRequest(
                prompt=question(colour), session_id="doc",
                sampling=SamplingParams(temperature=0.0, max_tokens=8)))
            engine.manager.drain()
            timeline.append({"turn": turn, "asked": colour,
                             "found": str(numbers[colour]) in done.text.replace(" ", ""),
                             **locate(engine, "doc", numbers)})
            print(timeline[-1], flush=True)
    finally:
        engine.close()
    write_json("tiers_at_work", {"tokens": args.tokens, "warm": args.warm, "cool": args.cool,
                                 "timeline": timeline})
    if args.plot:
        plot(timeline, args)


def plot(timeline: list[dict], args: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    turns = [t["turn"] for t in timeline]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    top.stackplot(turns, *[[t["tiers"][tier.label] for t in timeline] for tier in Tier],
                  labels=[tier.label for tier in Tier])
    top.set_ylabel("blocks of the conversation")
    top.legend(loc="upper left")
    levels = {tier.label: i for i, tier in enumerate(Tier)}
    for colour in timeline[0]["facts"]:
        bottom.plot(turns, [levels.get(t["facts"][colour]["tier"], 3) for t in timeline],
                    marker="o", label=f"{colour} fact", color=colour if colour != "white"
                    else "grey")
    bottom.set_yticks(range(len(Tier)), [tier.label for tier in Tier])
    bottom.invert_yaxis()
    bottom.set_xlabel("turn (0: the document; then one question per turn)")
    bottom.set_ylabel("fact's block")
    top.set_title(f"{args.tokens}-token session, warm {args.warm}, cool {args.cool}")
    fig.tight_layout()
    fig.savefig("docs/tiers_at_work.png", dpi=120)


if __name__ == "__main__":
    main()
