"""Fidelity per tier on real text: next-token KL, top-1 agreement and perplexity after restoring
a context from each tier, against the exact (live) KV.

Each window prefills ``--context`` tokens of ``pydoc_data.topics``, stores its blocks the way each
tier holds them (warm: ``q8c``; cool: the warm record demoted to the cool format, ``q6q4`` + zstd;
cold: the cool record demoted again; and, for comparison, the formats they replaced: warm ``q8``,
``q8`` re-encoded to ``q8c`` as ``kvtier compact`` does, cool ``q6q4`` and ``q4`` from ``q8``),
restores them into a second slot and decodes the next ``--continue`` tokens of the text
in both slots with logits at every position. A "noise floor" row perturbs the exact KV by
flipping the lowest bit of 1% of the keys: what any lossless-looking change already costs on this
model. Run from the repository root:

    python -m bench.bench_fidelity [--windows 16] [--context 1024] [--continue 64]
"""

from __future__ import annotations

import argparse

import llama_cpp
import numpy as np

from bench.common import document_tokens, print_table, write_json
from kvtier.config import load_config
from kvtier.engine import state_codec as sc
from kvtier.engine.hot import BatchItem, HotContext
from kvtier.engine.model import Model, default_model_path
from kvtier.storage import codec
from kvtier.storage.codec import tier_format
from kvtier.storage.records import LayerKV, TensorRows
from kvtier.storage.tiers import Tier

WARM_FORMATS = {"q8c": tier_format("q8c"), "q8": tier_format("q8")}
"""The warm default (issue 13) and the one before it."""
COOL_FORMATS = {"q6q4": tier_format("q6q4", 3), "q4": tier_format("q4", 3)}
"""Today's cool/cold default and the one before issue 13."""
VARIANTS = {
    "warm (q8c)": (Tier.WARM, ("q8c",), ""),
    "cool (q6q4+zstd)": (Tier.COOL, ("q8c",), "q6q4"),
    "cold (q6q4+zstd)": (Tier.COLD, ("q8c",), "q6q4"),
    "warm (q8, before)": (Tier.WARM, ("q8",), ""),
    "warm (q8 recoded to q8c)": (Tier.WARM, ("q8", "q8c"), ""),
    "cool (q6q4+zstd from q8)": (Tier.COOL, ("q8",), "q6q4"),
    "cool (q4+zstd from q8, before)": (Tier.COOL, ("q8",), "q4"),
    "cold (q4+zstd from q8, before)": (Tier.COLD, ("q8",), "q4"),
}
"""Each stored variant: the tier, the warm formats it was written in (then re-encoded to, as
``kvtier compact`` does), and the cool/cold format it was demoted to."""


def through_tier(layer: LayerKV, block: int, tier: Tier, cool: str = "q6q4",
                 warm: tuple[str, ...] = ("q8c",)) -> LayerKV:
    """The layer as ``tier`` holds it: written warm (and re-encoded in each further warm
    format), then demoted once per tier below warm."""
    exact = codec.SINK_ROWS if block == 0 else 0
    record = codec.encode_record(layer, WARM_FORMATS[warm[0]], exact)
    for name in warm[1:]:
        record = codec.transcode(record, WARM_FORMATS[name])
    for _ in range(tier - Tier.WARM):
        record = codec.transcode(record, COOL_FORMATS[cool])
    return codec.decode_record(record)[1]


def noise_floor(layer: LayerKV, rng: np.random.Generator) -> LayerKV:
    bits = layer.k.rows.view(np.uint16).copy()
    bits[rng.random(bits.shape) < 0.01] ^= 1
    return LayerKV(TensorRows(layer.k.ggml_type, bits.view(np.uint8)), layer.v)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def decode_with_logits(hot: HotContext, slot: int, tokens: np.ndarray, pos: int) -> np.ndarray:
    b = hot._batch
    for i, t in enumerate(tokens):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(t), pos + i, 1, True
        b.seq_id[i][0] = slot
    b.n_tokens = len(tokens)
    assert llama_cpp.llama_decode(hot.ptr, b) == 0
    return np.stack([hot.logits(i) for i in range(len(tokens))])


def live_window(hot: HotContext, tokens: np.ndarray, start: int, context: int, n_cont: int
                ) -> tuple[np.ndarray, dict, np.ndarray]:
    """Prefill ``context`` tokens from ``start`` into slot 0 (every slot cleared first): the
    ``n_cont + 1`` tokens that follow, the state's rows split into 256-token blocks, and the live
    model's log-probabilities over the continuation (the reference every variant is scored
    against)."""
    ctx = tokens[start:start + context]
    cont = tokens[start + context:start + context + n_cont + 1]
    for slot in hot.slots:
        hot.clear(slot)
    for i in range(0, len(ctx), hot.n_batch):
        hot.decode([BatchItem(0, ctx[i:i + hot.n_batch], i, False)])
    blocks = sc.split_blocks(sc.parse(sc.read_state(hot.ptr, 0)), 256)
    ref = log_softmax(decode_with_logits(hot, 0, cont[:-1], len(ctx)))
    return cont, blocks, ref


def restored_log_probs(hot: HotContext, layout, blocks: list, cont: np.ndarray, context: int
                       ) -> np.ndarray:
    """Log-probabilities over the continuation with ``blocks`` (block index, layers) written
    into slot 1 as its state: the variant being scored."""
    hot.clear(hot.slots[1])
    sc.write_state(hot.ptr, 1, sc.compose(layout, 1, sc.stream_of(layout, 1), blocks, 256))
    return log_softmax(decode_with_logits(hot, 1, cont[:-1], context))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--continue", dest="cont", type=int, default=64)
    args = parser.parse_args()
    model = Model(default_model_path())
    config = load_config(None, {"model.n_slots": 2, "model.n_batch": 512})
    hot = HotContext.for_config(model, config)
    layout = sc.layout_of(hot.ptr)
    tokens = document_tokens(model)
    stride = (len(tokens) - args.context - args.cont) // args.windows
    rng = np.random.default_rng(0)
    variants = ["exact (f16)", "noise floor", *VARIANTS]
    kls = {v: [] for v in variants}
    agree = {v: [] for v in variants}
    nll = {v: [] for v in variants + ["live"]}
    for w in range(args.windows):
        cont, blocks, ref = live_window(hot, tokens, w * stride, args.context, args.cont)
        nll["live"].extend(-ref[np.arange(len(ref)), cont[1:]])
        for variant in variants:
            if variant.startswith("exact"):
                new = list(blocks.items())
            elif variant == "noise floor":
                new = [(b, [noise_floor(layer, rng) for layer in ls]) for b, ls in blocks.items()]
            else:
                tier, warm, cool = VARIANTS[variant]
                new = [(b, [through_tier(layer, b, tier, cool, warm) for layer in ls])
                       for b, ls in blocks.items()]
            got = restored_log_probs(hot, layout, new, cont, args.context)
            kls[variant].extend(np.sum(np.exp(ref) * (ref - got), axis=-1))
            agree[variant].extend(ref.argmax(-1) == got.argmax(-1))
            nll[variant].extend(-got[np.arange(len(got)), cont[1:]])
        print(f"window {w + 1}/{args.windows}", flush=True)
    rows, results = [], {}
    ppl_live = float(np.exp(np.mean(nll["live"])))
    for v in variants:
        kl = np.array(kls[v])
        result = {"kl_mean": float(kl.mean()), "kl_p95": float(np.percentile(kl, 95)),
                  "top1_agreement": float(np.mean(agree[v])),
                  "perplexity": float(np.exp(np.mean(nll[v])))}
        results[v] = result
        rows.append([v, result["kl_mean"], result["kl_p95"], 100 * result["top1_agreement"],
                     result["perplexity"], result["perplexity"] / ppl_live])
    rows.append(["live (reference)", 0.0, 0.0, 100.0, ppl_live, 1.0])
    print_table(["KV restored from", "KL mean", "KL p95", "top-1 %", "perplexity",
                 "ppl / live"], rows)
    path = write_json("fidelity", {"windows": args.windows, "context": args.context,
                                   "continue": args.cont,
                                   "tokens_scored": args.windows * args.cont,
                                   "live_perplexity": ppl_live, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
