"""Which rows of a window the window's own queries attended to: the importance behind
``bench_compression``'s mixed-precision rows (issue 13, fourth round; H2O's accumulated attention,
as MiKV and ZipCache rank tokens).

:func:`captured_window` prefills a window as ``bench_fidelity.live_window`` does, with
:class:`~kvtier.engine.query_capture.QueryCapture` armed for every micro-batch, so it also returns
the queries (after RoPE) of all layers for the window's tokens: what a store could have seen before
it demotes the window's blocks. :func:`attention_received` recomputes llama.cpp's attention
weights from them and the stored keys (causal, grouped heads) and sums, per layer and KV head,
what each row received over queries and the query heads that read it. The continuation that the
KL is scored on is never part of the ranking; its queries are captured only for
:func:`attention_received_by`: the share of its attention that a mask covers tells how well the
window's past predicts what the next tokens read.
"""

from __future__ import annotations

import numpy as np

from kvtier.engine import state_codec as sc
from kvtier.engine.hot import BatchItem, HotContext
from kvtier.engine.query_capture import RowRange


def captured_window(hot: HotContext, tokens: np.ndarray, start: int, context: int, n_cont: int
                    ) -> tuple[np.ndarray, dict, np.ndarray, np.ndarray, np.ndarray]:
    """``live_window`` (cont, blocks, ref) plus the queries of the window's ``context`` tokens
    and of the continuation, each ``(layer, token, head, head_dim)`` float32 (every layer
    captured: ``hot`` built with a query layer stride of 1)."""
    from bench.bench_fidelity import decode_with_logits, log_softmax
    ctx = tokens[start:start + context]
    cont = tokens[start + context:start + context + n_cont + 1]
    for slot in hot.slots:
        hot.clear(slot)
    step = min(hot.n_batch, hot.n_ubatch)  # the callback sees one micro-batch per layer
    chunks = []
    for i in range(0, len(ctx), step):
        chunk = ctx[i:i + step]
        hot.capture.arm([RowRange(0, len(chunk))])
        hot.decode([BatchItem(0, chunk, i, False)])
        chunks.append(hot.capture.collect()[0])
    blocks = sc.split_blocks(sc.parse(sc.read_state(hot.ptr, 0)), 256)
    hot.capture.arm([RowRange(0, n_cont)])
    ref = log_softmax(decode_with_logits(hot, 0, cont[:-1], len(ctx)))
    cont_queries = hot.capture.collect()[0].copy()
    return cont, blocks, ref, np.concatenate(chunks, axis=1), cont_queries


def window_keys(blocks: dict) -> np.ndarray:
    """The window's stored keys, ``(layer, token, n_kv_head x head_dim)`` float32."""
    return np.stack([np.concatenate([ls[i].k.rows.view(np.float16) for _, ls in
                                     sorted(blocks.items())]).astype(np.float32)
                     for i in range(len(next(iter(blocks.values()))))])


def attention_weights(q: np.ndarray, k: np.ndarray, first: int = 0) -> np.ndarray:
    """Softmax(q . k / sqrt(d)) of one layer: ``q`` (query, head, d) at positions ``first``,
    ``first + 1``, ...; ``k`` (key, kv_head x d) at 0, 1, ...; a query sees keys at or before its
    own position; query head ``h`` reads KV head ``h // (heads / kv_heads)`` (ggml's broadcast in
    ``mul_mat``, llama.cpp's grouped-query attention). Returns (query, head, key)."""
    n_q, n_head, d = q.shape
    group = n_head // (k.shape[1] // d)
    kh = np.repeat(k.reshape(len(k), -1, d), group, axis=1)  # (key, head, d)
    scores = (q.transpose(1, 0, 2) @ kh.transpose(1, 2, 0)).transpose(1, 0, 2) \
        / np.float32(np.sqrt(d))
    visible = np.arange(len(k))[None, :] <= (first + np.arange(n_q))[:, None]
    scores = np.where(visible[:, None, :], scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    w = np.exp(scores)
    return w / w.sum(-1, keepdims=True)


def attention_received(queries: np.ndarray, keys: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Per layer, KV head and key row, the attention it received from the window's own queries,
    summed over the query heads that read that KV head and over queries (H2O's accumulated
    score): ``queries`` (layer, token, head, d), ``keys`` (layer, token, kv_head x d), the same
    tokens. Returns (layer, kv_head, token) float64; each layer sums to tokens x heads."""
    n_layer, n_tok, _, d = queries.shape
    n_kv_head = keys.shape[2] // d
    out = np.zeros((n_layer, n_kv_head, n_tok))
    for layer in range(n_layer):
        for i in range(0, n_tok, chunk):
            w = attention_weights(queries[layer, i:i + chunk], keys[layer, :i + chunk], i)
            out[layer, :, :i + chunk] += w.reshape(len(w), n_kv_head, -1, w.shape[-1]).sum(
                (0, 2), dtype=np.float64)
    return out


def attention_received_by(queries: np.ndarray, keys: np.ndarray, first: int) -> np.ndarray:
    """Per layer, KV head and key row, the attention that later queries (at ``first``,
    ``first + 1``, ...: a continuation) paid to ``keys``, summed over query heads and queries;
    normalized over those keys alone (the continuation's own keys are not in them). Returns
    (layer, kv_head, key) float64."""
    n_kv_head = keys.shape[2] // queries.shape[3]
    return np.stack([w.reshape(len(w), n_kv_head, -1, w.shape[-1]).sum((0, 2), dtype=np.float64)
                     for w in (attention_weights(q, k, first) for q, k in zip(queries, keys))])


def mean_received(received: np.ndarray, n_head: int) -> np.ndarray:
    """:func:`attention_received` per query that could see the row (a row at position ``j`` of
    ``n`` is seen by ``n - j`` queries of each of the ``n_head`` heads summed): the sum favours
    early rows, this does not."""
    n = received.shape[-1]
    return received / (n_head * (n - np.arange(n)))


def top_rows(scores: np.ndarray, frac: float, unit: int = 1, offset: int = 0) -> np.ndarray:
    """A mask of the rows to keep precise: the ``round(frac x rows)`` best-scored rows, or, with
    ``unit`` > 1, the ``round(frac x units)`` best units of ``unit`` rows by summed score (a row's
    unit is ``(offset + row) // unit``: the record's rows start at ``offset``). Ties go to the
    earlier row."""
    n = len(scores)
    mask = np.zeros(n, bool)
    if unit == 1:
        mask[np.argsort(-scores, kind="stable")[:round(frac * n)]] = True
        return mask
    units = (offset + np.arange(n)) // unit
    units -= units[0]
    per_unit = np.bincount(units, scores)
    best = np.argsort(-per_unit, kind="stable")[:round(frac * len(per_unit))]
    return np.isin(units, best)


def random_rows(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """A mask of ``count`` of ``n`` rows chosen at random: the control with the same bytes."""
    mask = np.zeros(n, bool)
    mask[rng.choice(n, count, replace=False)] = True
    return mask

