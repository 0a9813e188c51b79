"""How often a working set must be chosen again while generating (``working_set.reselect_tokens``,
R): the quality and the cost of each R, against full attention.

    python -m bench.bench_reselect [--prompt 3072] [--generate 512] [--hot 1024]
        [--block-size 64 --sink 2 --recent 6] [--every 1 4 16 64 256 0] [--offsets 0 20000]

A document from ``pydoc_data.topics`` is prefilled as a long prompt is (a block at a time on a
working set of ``--hot`` tokens that the previous block's queries chose), then its next
``--generate`` tokens are decoded one at a time, as generated tokens are, teacher-forced: each
step's next-token negative log-likelihood is taken, and the working set is chosen again from the
queries of the last ``working_set.query_tokens`` tokens every R tokens (0: never while
generating). Full attention decodes the same tokens with the whole document hot. Reports, per R,
the perplexity of the generated span (its ratio to full attention's), the ms per token of the
engine's side (decode, capture, selection and the blocks it moves) and the selections and loads
while generating.
Writes bench/results/reselect.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from bench.bench_perplexity import nll
from bench.common import document_tokens, print_table, write_json
from kvtier.config import load_config
from kvtier.engine.hot import BatchItem, HotContext
from kvtier.engine.model import Model, default_model_path
from kvtier.engine.paging import Window
from kvtier.engine.query_capture import RowRange
from kvtier.storage.manager import TierManager

QUERY_TOKENS = 8
"""``working_set.query_tokens``' default."""


def run(model: Model, prompt: np.ndarray, follow: np.ndarray, every: int | None,
        args: argparse.Namespace) -> tuple[np.ndarray, float, dict[str, int]]:
    """After ``prompt``, the NLL of each of ``follow[1:]`` as ``follow[:-1]`` are decoded one at a
    time, the seconds those decodes took, and the window's counts; ``every`` None: full
    attention."""
    per_token = model.kv_bytes_per_token("f16", "f16")
    block = args.block_size
    n = len(prompt) + len(follow)
    config = load_config(None, {
        "data_dir": tempfile.mkdtemp(prefix="kvtier-bench-reselect-"), "model.n_slots": 1,
        "model.context_size": n + block, "model.block_size": block,
        "tiers.gpu_vram_budget": (n + block if every is None else args.hot) * per_token,
        "working_set.sink_blocks": args.sink, "working_set.recent_blocks": args.recent})
    hot = HotContext.for_config(model, config)
    manager = TierManager(config, background=False)
    window = None if every is None else Window(
        hot, hot.slots[0], hot.sizing, manager, model.fingerprint("f16", "f16", block).namespace,
        manager.new_sequence(), hot.capture.layers, model.n_head_kv, model.n_embd // model.n_head)
    out = []
    try:
        step = hot.n_batch if window is None else block
        for start in range(0, len(prompt), step):
            chunk = prompt[start:start + step]
            if window is None:
                hot.decode([BatchItem(0, chunk, start, False)])
                continue
            position = window.prepare(len(chunk))
            hot.capture.arm([RowRange(len(chunk) - QUERY_TOKENS, QUERY_TOKENS)])
            hot.decode([BatchItem(0, chunk, position, False)])
            (queries,) = hot.capture.collect()
            window.completed(queries)
        since = 0
        before = (window.stats.selections, window.stats.loads) if window is not None else (0, 0)
        start = time.perf_counter()
        for i in range(len(follow) - 1):
            token = follow[i:i + 1]
            if window is None:
                index = hot.decode([BatchItem(0, token, len(prompt) + i, True)])[0]
                out.append(nll(hot, index, follow[i + 1:i + 2]))
                continue
            # As the engine generates: a generated token's own query chooses (one row).
            capture = bool(every) and since + 1 >= every
            position = window.prepare(1)
            if capture:
                hot.capture.arm([RowRange(0, 1)])
            index = hot.decode([BatchItem(0, token, position, True)])[0]
            queries = hot.capture.collect()[0] if capture else None
            out.append(nll(hot, index, follow[i + 1:i + 2]))
            since = 0 if capture else since + 1
            window.completed(queries)
        seconds = time.perf_counter() - start
    finally:
        manager.close()
        hot.close()
    counts = {} if window is None else {"selections": window.stats.selections - before[0],
                                        "loads": window.stats.loads - before[1]}
    return np.concatenate(out), seconds, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=3072)
    parser.add_argument("--generate", type=int, default=512)
    parser.add_argument("--hot", type=int, default=1024)
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 20000])
    parser.add_argument("--every", type=int, nargs="+", default=[1, 4, 16, 64, 256, 0],
                        help="re-selection intervals R to measure (0: never while generating)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--sink", type=int, default=2, help="working_set.sink_blocks")
    parser.add_argument("--recent", type=int, default=6, help="working_set.recent_blocks")
    parser.add_argument("--out", default="reselect", help="results file name (no .json)")
    args = parser.parse_args()
    model = Model(default_model_path())
    text = document_tokens(model)
    results, rows = [], []
    for offset in args.offsets:
        prompt = text[offset:offset + args.prompt]
        follow = text[offset + args.prompt:offset + args.prompt + args.generate + 1]
        full, full_s, _ = run(model, prompt, follow, None, args)
        base = float(np.exp(full.mean()))
        results.append({"offset": offset, "every": None, "perplexity": base, "ratio": 1.0,
                        "ms_per_token": 1e3 * full_s / len(full)})
        rows.append([offset, "full attention", f"{base:.3f}", "1.000",
                     f"{1e3 * full_s / len(full):.1f}", "", ""])
        for every in args.every:
            values, seconds, counts = run(model, prompt, follow, every, args)
            ppl = float(np.exp(values.mean()))
            results.append({"offset": offset, "every": every, "perplexity": ppl,
                            "ratio": ppl / base, "ms_per_token": 1e3 * seconds / len(values),
                            **counts})
            rows.append([offset, f"R = {every}" if every else "never", f"{ppl:.3f}",
                         f"{ppl / base:.3f}", f"{1e3 * seconds / len(values):.1f}",
                         counts["selections"], counts["loads"]])
            print(results[-1], flush=True)
    print_table(["offset", "re-selection", "perplexity", "vs full", "ms/token", "selections",
                 "loads"], rows)
    write_json(args.out, {"prompt": args.prompt, "generate": args.generate, "hot": args.hot,
                          "block_size": args.block_size, "sink": args.sink,
                          "recent": args.recent, "results": results})


if __name__ == "__main__":
    main()
