"""Perplexity over a long document with the hot tier at a quarter of it: full attention vs the
working set (packed, and at the blocks' own positions) vs sinks + recent blocks.

    python -m bench.bench_perplexity [--tokens 4096] [--hot 1024] [--offsets 0 20000]

The document is English from ``pydoc_data.topics`` (ships with Python). Every token's next-token
negative log-likelihood is taken while the document is prefilled: in one context holding all of
it (full attention), or a block at a time on a working set of ``--hot`` tokens that the previous
block's queries chose (how kvtier prefills a long prompt). Perplexity is exp(mean NLL) over the
same tokens (the first block is left out: every method sees it whole). Writes
bench/results/perplexity.json.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from bench.common import (add_selection_options, document_tokens, print_table, selected,
                          selection_settings, write_json)
from kvtier.config import load_config
from kvtier.engine.hot import BatchItem, HotContext
from kvtier.engine.model import Model, default_model_path
from kvtier.engine.paging import Window
from kvtier.engine.query_capture import RowRange
from kvtier.storage.manager import TierManager



def nll(hot: HotContext, index: int, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihoods of ``targets`` from the logits at batch rows ``index`` on."""
    out = np.empty(len(targets))
    for i, target in enumerate(targets):
        logits = hot.logits(index + i).astype(np.float64)
        top = logits.max()
        out[i] = np.log(np.exp(logits - top).sum()) + top - logits[target]
    return out


def run(model: Model, tokens: np.ndarray, method: str, args: argparse.Namespace) -> np.ndarray:
    """Per-token NLL of ``tokens[1:]`` (the i-th predicts token i + 1) under ``method``."""
    per_token = model.kv_bytes_per_token("f16", "f16")
    block = args.block_size
    share = len(tokens) + block if method == "full" else args.hot
    settings = {"data_dir": tempfile.mkdtemp(prefix="kvtier-bench-ppl-"), "model.n_slots": 1,
                "model.context_size": len(tokens) + block, "model.block_size": block,
                "tiers.gpu_vram_budget": share * per_token,
                "working_set.sink_blocks": args.sink, "working_set.recent_blocks": args.recent,
                "working_set.score": args.score,
                **selection_settings(args)}
    if method == "own":
        settings["working_set.positions"] = "own"
    if method == "sinks+recent":
        settings["working_set.recent_blocks"] = args.hot // block - args.sink
    config = load_config(None, settings)
    hot = HotContext.for_config(model, config)
    manager = TierManager(config, background=False)
    slot = hot.slots[0]
    window = None if method == "full" else Window(
        hot, slot, hot.sizing, manager, model.fingerprint("f16", "f16", block).namespace,
        manager.new_sequence(), hot.capture.layers, model.n_head_kv, model.n_embd // model.n_head,
        score_by=config.working_set.score)
    out = []
    try:
        step = hot.n_batch if window is None else block
        for start in range(0, len(tokens) - 1, step):
            chunk = tokens[start:start + step]
            targets = tokens[start + 1:start + 1 + len(chunk)]
            chunk = chunk[:len(targets)]
            if window is None:
                index = hot.decode([BatchItem(0, chunk, start, False, all_logits=True)])[0]
                out.append(nll(hot, index, targets))
                continue
            position = window.prepare(len(chunk))
            select = (start // step) % args.select_every == 0
            if select:
                hot.capture.arm([RowRange(len(chunk) - args.query_tokens, args.query_tokens)])
            index = hot.decode([BatchItem(0, chunk, position, False, all_logits=True)])[0]
            queries = hot.capture.collect()[0] if select else None
            if args.own_queries and select and window.stored:
                window.score(queries)                   # the chunk's own queries choose,
                window.retract(len(chunk))              # and it is decoded again on their choice
                position = window.prepare(len(chunk))
                hot.capture.arm([RowRange(len(chunk) - args.query_tokens, args.query_tokens)])
                index = hot.decode([BatchItem(0, chunk, position, False, all_logits=True)])[0]
                (queries,) = hot.capture.collect()
            out.append(nll(hot, index, targets))
            window.completed(queries)
    finally:
        manager.close()
        hot.close()
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hot", type=int, default=1024)
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 20000],
                        help="where in the text each document starts (tokens)")
    parser.add_argument("--methods", nargs="+",
                        default=["full", "packed", "own", "sinks+recent"])
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--sink", type=int, default=1, help="working_set.sink_blocks")
    parser.add_argument("--recent", type=int, default=2, help="working_set.recent_blocks")
    parser.add_argument("--score", choices=("bound", "keys"), default="bound",
                        help="working_set.score: Quest's bound, or the blocks' mean keys")
    parser.add_argument("--query-tokens", type=int, default=8,
                        help="working_set.query_tokens: the queries of this many last tokens of "
                             "a chunk choose the next chunk's working set")
    parser.add_argument("--select-every", type=int, default=1,
                        help="choose the working set after every this many chunks (1: each)")
    parser.add_argument("--own-queries", action="store_true",
                        help="decode each chunk twice, the second time on the blocks its own "
                             "queries chose (InfLLM's order; kvtier does it for the last chunk)")
    parser.add_argument("--out", default="perplexity", help="results file name (no .json)")
    add_selection_options(parser)
    args = parser.parse_args()
    model = Model(default_model_path())
    text = document_tokens(model)
    results, rows = [], []
    for offset in args.offsets:
        tokens = text[offset:offset + args.tokens + 1]
        by_method = {m: run(model, tokens, m, args)[args.block_size:] for m in args.methods}
        for method, values in by_method.items():
            ppl = float(np.exp(values.mean()))
            base = float(np.exp(by_method[args.methods[0]].mean()))
            results.append({"offset": offset, "method": method, "tokens": args.tokens,
                            "hot": args.hot, "block_size": args.block_size, "sink": args.sink,
                            "recent": args.recent, "score": args.score,
                            "query_tokens": args.query_tokens, "own_queries": args.own_queries,
                            "select_every": args.select_every,
                            "query_layer_stride": selected(args).query_layer_stride,
                            "keep_margin": selected(args).keep_margin,
                            "perplexity": ppl, "ratio": ppl / base})
            rows.append([offset, method, f"{ppl:.3f}", f"{ppl / base:.4f}"])
            print(results[-1], flush=True)
    print_table(["offset", "method", "perplexity", f"vs {args.methods[0]}"], rows)
    write_json(args.out, {"results": results})


if __name__ == "__main__":
    main()
