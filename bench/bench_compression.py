"""Compression options for the cool/cold tiers on real KV (issue 13): bytes per token against
next-token KL, top-1 agreement and perplexity, each option a row of one table.

The options are prototyped here in numpy (quantize, then dequantize) so that many can be compared
on the same windows; "today" and the chosen format also go through kvtier's own codec. Method as
``bench_fidelity``: each window prefills ``--context`` tokens of ``pydoc_data.topics``, its blocks
are quantized and restored into a second slot, and the next ``--continue`` tokens are decoded in
both slots with logits at every position. The first ``SINK_ROWS`` rows of block 0 stay exact in
every option (as the codec does). Bytes are the payload per token against f16 (23,040 bytes per
token for SmolLM2's 30 layers x 2 x 192 values); "zstd" columns compress the real bytes. "P+"
options quantize keys before RoPE (KVQuant: rotated back by their positions, RoPE re-applied
after decoding); ``--rope`` checks that inversion on real keys, ``--errors`` prints single
tensors' error. Mixed rows (56-) keep the rows that the window's own queries attended to most in
``q6q4``'s precision and the rest in a low format (``bench/attention_rank.py`` captures the queries
and ranks the rows); they also print the share of the continuation's attention on those rows. Run
from the repository root:

    python -m bench.bench_compression [--windows 8] [--context 1024] [--continue 64]
        [--only 0,18,19] [--name compression] [--errors] [--rope]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace

import llama_cpp
import numpy as np
import zstandard

from bench import attention_rank as ar
from bench import vq
from bench.bench_fidelity import live_window, restored_log_probs
from bench.common import document_tokens, print_table, write_json
from kvtier.config import load_config
from kvtier.engine import state_codec as sc
from kvtier.engine.hot import HotContext
from kvtier.engine.model import Model, default_model_path
from kvtier.ggml import F16
from kvtier.storage import codec
from kvtier.storage.codec import RecordFormat
from kvtier.storage.records import LayerKV, TensorRows

HEAD_DIM = 64


def hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.float32(np.sqrt(n))


H64 = hadamard(HEAD_DIM)


@dataclass(frozen=True)
class Rope:
    """The rotary embedding llama.cpp applied to the stored keys: pairs ``(2i, 2i + 1)`` of each
    head (``LLAMA_ROPE_TYPE_NORM``, the llama architecture's; ``neox`` pairs ``(i, i + d/2)``)
    rotated by ``pos * freq_base^(-2i/d)``, all ``d`` channels, no frequency scaling."""

    freq_base: float
    head_dim: int = HEAD_DIM
    neox: bool = False


def rotate(x: np.ndarray, rope: Rope, positions: np.ndarray, inverse: bool = False
           ) -> np.ndarray:
    """Keys ``x`` (tokens, heads x head_dim) rotated by RoPE at ``positions`` (or back), float32:
    the pre-RoPE options undo it before quantizing and redo it after (KVQuant)."""
    n, width = x.shape
    d = rope.head_dim
    h = np.asarray(x, np.float64).reshape(n, width // d, d)
    a, b = (h[..., :d // 2], h[..., d // 2:]) if rope.neox else (h[..., 0::2], h[..., 1::2])
    inv = rope.freq_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.asarray(positions, np.float64)[:, None, None] * inv
    c, s = np.cos(ang), np.sin(ang) * (-1 if inverse else 1)
    out = np.empty_like(h)
    lo, hi = (slice(0, d // 2), slice(d // 2, d)) if rope.neox else (slice(0, d, 2),
                                                                      slice(1, d, 2))
    out[..., lo], out[..., hi] = a * c - b * s, a * s + b * c
    return out.reshape(n, width).astype(np.float32)


@dataclass(frozen=True)
class Quant:
    """One tensor's option: ``bits`` per code (16: f16), groups ``per`` "token" (``g`` columns) or
    "channel" (``g`` rows), parameters "minmax" (f16 min + f16 scale) or "sym" (f16 scale only),
    an optional Hadamard rotation per head first, keys before RoPE (``prerope``: rotated back
    by their positions first, RoPE re-applied after), and non-uniform levels (``nuq``: a codebook
    of ``2^bits`` levels over the groups' normalized [min, max], fit to the tensor by k-means,
    KVQuant's nuq fit per record), and a ``sparse`` fraction of each group's most extreme values
    kept exact outside the quantized range (KVQuant's dense-and-sparse; 4 bytes each: an f16 and
    a 16-bit index)."""

    bits: int
    per: str = "token"
    g: int = 64
    params: str = "minmax"
    rotate: bool = False
    prerope: bool = False
    nuq: bool = False
    sparse: float = 0.0

    def label(self) -> str:
        if self.bits == 16:
            return "f16"
        r = ("P+" if self.prerope else "") + ("H+" if self.rotate else "")
        p = "" if self.params == "minmax" else " sym"
        kind = "NUQ" if self.nuq else "Q"
        sp = f" +{100 * self.sparse:g}% sparse" if self.sparse else ""
        return f"{r}{kind}{self.bits} {self.per[:4]} g{self.g}{p}{sp}"


ROPE: Rope | None = None
"""The model's RoPE, set by :func:`main` (pre-RoPE options need it)."""


def codebook(t: np.ndarray, levels: int, iters: int = 20) -> np.ndarray:
    """``levels`` points in [0, 1] fit to the values ``t`` (in [0, 1]) by Lloyd's k-means on a
    4,096-bin histogram, starting from uniform levels; rounded to f16 as stored."""
    hist, edges = np.histogram(t, 4096, (0.0, 1.0))
    mid = (edges[:-1] + edges[1:]) / 2
    c = np.linspace(0.0, 1.0, levels)
    for _ in range(iters):
        cut = np.searchsorted((c[1:] + c[:-1]) / 2, mid)
        w = np.bincount(cut, hist, levels)
        s = np.bincount(cut, hist * mid, levels)
        c = np.where(w > 0, s / np.maximum(w, 1), c)
        c[0], c[-1] = 0.0, 1.0      # the group's min and max stay exact
        c = np.sort(c)
    return c.astype(np.float16).astype(np.float32)


def qdq(x: np.ndarray, q: Quant, positions: np.ndarray | None = None
        ) -> tuple[np.ndarray, np.ndarray, int]:
    """(dequantized x, codes as uint8 in x's order, parameter bytes)."""
    n, w = x.shape
    if q.prerope:
        x = rotate(x, ROPE, positions, inverse=True)
    if q.rotate:
        x = (x.reshape(n, -1, HEAD_DIM) @ H64).reshape(n, w)
    if q.per == "token":
        grp = x.reshape(n, w // q.g, q.g)
    else:
        pad = -n % q.g
        xp = np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
        grp = xp.reshape(-1, q.g, w).transpose(0, 2, 1)
    levels = 2 ** q.bits - 1
    if q.nuq:
        lo = grp.min(-1, keepdims=True).astype(np.float16).astype(np.float32)
        span = (grp.max(-1, keepdims=True) - lo).astype(np.float16).astype(np.float32)
        inv = np.where(span > 0, 1 / np.where(span > 0, span, 1), 0)
        t = np.clip((grp - lo) * inv, 0, 1)
        c = codebook(t.reshape(-1), levels + 1)
        codes = np.abs(t[..., None] - c).argmin(-1)
        back = lo + c[codes] * span
        nparams = 4
    elif q.params == "minmax":
        if q.sparse:
            bottom = np.quantile(grp, q.sparse / 2, axis=-1, keepdims=True)
            top = np.quantile(grp, 1 - q.sparse / 2, axis=-1, keepdims=True)
            outliers = (grp < bottom) | (grp > top)
        else:
            bottom, top = grp.min(-1, keepdims=True), grp.max(-1, keepdims=True)
        lo = bottom.astype(np.float16).astype(np.float32)
        step = ((top - lo) / levels).astype(np.float32)
        scale = step.astype(np.float16).astype(np.float32)
        scale = np.where(scale < step, np.nextafter(scale.astype(np.float16), np.float16(np.inf))
                         .astype(np.float32), scale)
        inv = np.where(scale > 0, 1 / np.where(scale > 0, scale, 1), 0)
        codes = np.clip(np.floor((grp - lo) * inv + 0.5), 0, levels)
        back = lo + codes * scale
        nparams = 4
        if q.sparse:
            back = np.where(outliers, grp.astype(np.float16).astype(np.float32), back)
            n_sparse = int(outliers.sum())
    else:
        half = 2 ** (q.bits - 1)
        scale = (np.abs(grp).max(-1, keepdims=True) / half).astype(np.float16).astype(np.float32)
        scale = np.where(scale > 0, scale, 1)
        codes = np.clip(np.floor(grp / scale) + half, 0, levels)
        back = (codes - half + 0.5) * scale
        nparams = 2
    n_groups = grp.shape[0] * grp.shape[1]
    extra = (2 << q.bits if q.nuq else 0) + (4 * n_sparse if q.sparse else 0)
    if q.per == "token":
        back = back.reshape(n, w)
        codes = codes.reshape(n, w)
    else:
        back = back.transpose(0, 2, 1).reshape(-1, w)[:n]
        codes = codes.transpose(0, 2, 1).reshape(-1, w)[:n]
    if q.rotate:
        back = (back.reshape(n, -1, HEAD_DIM) @ H64.T).reshape(n, w)
    if q.prerope:
        back = rotate(back, ROPE, positions)
    return back, codes.astype(np.uint8), nparams * n_groups + extra


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Codes bit-packed, ``bits`` each, least significant first."""
    planes = (codes.reshape(-1, 1) >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


@dataclass(frozen=True)
class Mixed:
    """Row-level mixed precision by attention rank (fourth round): in each record the ``frac``
    share of rows ranked highest keeps ``k`` / ``v`` (their own per-channel groups over those
    rows), the rest takes the option's low formats. ``rank``: "sum" (the attention each row got
    from the window's own queries, summed over heads and queries, per layer: H2O), "mean" (that
    per query that could see it), "pooled" (the sum over all layers, one mask for every layer),
    or one of two controls: "random" (as many rows at random), "recent" (the record's last rows);
    ``unit`` > 1 ranks whole sub-blocks of that many rows instead. The mask costs a bit per row
    (or per unit) of the record."""

    k: Quant | None
    v: Quant | None
    """None: that tensor is not mixed (all its rows in the option's format)."""
    frac: float
    rank: str = "sum"
    unit: int = 1
    per_head: bool = False
    """A mask per KV head (each head's rows ranked by what its own query heads paid them, "sum"
    or "mean"; its 64 channels grouped on their own) instead of one for the record's rows."""
    bottom_k: Quant | None = None
    bottom_v: Quant | None = None
    bottom_frac: float = 0.0
    """A third level: the ``bottom_frac`` share of rows ranked lowest (by "sum" or "mean") in
    these formats; the mask then takes 2 bits a row."""

    def mask_bytes(self, n_rows: int) -> int:
        bits = -(-n_rows // self.unit) if self.unit > 1 else n_rows
        return -(-bits // 8) * (N_KV_HEAD if self.per_head else 1) * (2 if self.bottom_frac
                                                                        else 1)


N_KV_HEAD = 3
"""SmolLM2's KV heads (192 channels a row)."""


@dataclass(frozen=True)
class Option:
    name: str
    k: Quant | vq.PQ | None = None
    v: Quant | vq.PQ | None = None
    """None: that tensor kept exact (f16)."""
    record: RecordFormat | None = None
    """Through kvtier's codec instead of the prototype."""
    mixed: Mixed | None = None
    """High-precision formats for the attention-ranked rows; ``k`` and ``v`` are the rest's."""


IMPORTANCE: dict[str, np.ndarray] = {}
"""The current window's row scores by rank rule, each (layer, token): set by :func:`main`."""


def mixed_qdq(x: np.ndarray, mask: np.ndarray, hi: Quant, lo: Quant, positions: np.ndarray,
              bottom: tuple[np.ndarray, Quant] | None = None
              ) -> tuple[np.ndarray, list[tuple[np.ndarray, int]], int]:
    """:func:`qdq` with the ``mask`` rows in ``hi`` and the others in ``lo`` (but the rows of
    ``bottom``'s mask, in its format), each set grouped on its own (a per-channel group of a set
    spans at most all its rows): (dequantized x, (codes, bits) of each set, parameter bytes)."""
    back = np.empty_like(x, dtype=np.float32)
    parts, nparams = [], 0
    low = np.zeros_like(mask) if bottom is None else bottom[0]
    sets = [(mask, hi), (~mask & ~low, lo)] + ([] if bottom is None else [bottom])
    for rows, q in sets:
        if not rows.any():
            continue
        n = int(rows.sum())
        if q.per == "channel" and q.g > n:
            q = replace(q, g=n)
        b, codes, p = qdq(x[rows], q, positions[rows])
        back[rows] = b
        parts.append((codes, q.bits))
        nparams += p
    return back, parts, nparams


def mixed_mask(m: Mixed, block: int, index: int, exact: int, n_tokens: int) -> np.ndarray:
    """The rows of one record (its first ``exact`` rows left out: they stay exact) that
    ``m`` keeps in high precision: (rows,), or (rows, KV head) for a mask per head."""
    first = block * 256 + exact
    n = n_tokens - exact
    if m.per_head:
        return np.stack([ar.top_rows(IMPORTANCE[m.rank + "/head"][index, h, first:first + n],
                                     m.frac) for h in range(N_KV_HEAD)], axis=1)
    if m.rank == "random":
        rng = np.random.default_rng([block, index, int(1000 * m.frac), m.unit])
        units = (exact + np.arange(n)) // m.unit
        unique = np.unique(units)
        return np.isin(units, unique[ar.random_rows(len(unique), round(m.frac * len(unique)),
                                                    rng)])
    scores = np.arange(n, dtype=np.float64) if m.rank == "recent" else \
        IMPORTANCE[m.rank][index, first:first + n]
    return ar.top_rows(scores, m.frac, m.unit, exact)


def bottom_mask(m: Mixed, block: int, index: int, exact: int, n_tokens: int) -> np.ndarray:
    """The rows of one record that ``m``'s third level takes: the lowest ranked."""
    first = block * 256 + exact
    return ar.top_rows(-IMPORTANCE[m.rank][index, first:first + n_tokens - exact],
                       m.bottom_frac)


def entropy_bits(codes: np.ndarray) -> float:
    counts = np.bincount(codes.reshape(-1), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum() * codes.size)


class Sizes:
    def __init__(self) -> None:
        self.tokens = 0
        self.raw = 0
        self.zstd = 0
        self.planes = 0
        self.entropy = 0.0
        self.vq_f16_bytes = 0
        self.vq_fit_s = 0.0
        self.vq_assign_s = 0.0
        self.vq_decode_s = 0.0


FIXED_BOOKS: dict[tuple, np.ndarray] = {}
"""Codebooks of ``fixed`` PQ options by (option, tensor, layer), fit on the first block seen."""


def pq_qdq(x: np.ndarray, q: vq.PQ, positions: np.ndarray, sizes: Sizes, key: tuple
           ) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`qdq` for a PQ option; times the numpy encode (the k-means fit apart from the
    assignment of codes) and decode on this thread, RoPE's inversion for ``prerope`` left out."""
    if q.prerope:
        x = rotate(x, ROPE, positions, inverse=True)
    t0 = time.thread_time()
    z, mean, scale = vq.normalize(x, q)
    if q.fixed and key in FIXED_BOOKS:
        books = FIXED_BOOKS[key]
    else:
        books = FIXED_BOOKS.setdefault(key, vq.fit(z, q)) if q.fixed else vq.fit(z, q)
    t1 = time.thread_time()
    e = vq.Encoded(vq.assign(z, q, books), books, mean, scale)
    t2 = time.thread_time()
    back = vq.decode(e, q)
    t3 = time.thread_time()
    sizes.vq_f16_bytes += 2 * x.size
    sizes.vq_fit_s += t1 - t0
    sizes.vq_assign_s += t2 - t1
    sizes.vq_decode_s += t3 - t2
    if q.prerope:
        back = rotate(back, ROPE, positions)
    codes = e.codes.astype(np.uint8) if q.b <= 8 else e.codes
    return back, codes, e.param_bytes() - (2 * books.size if q.fixed else 0)


def apply(option: Option, layer: LayerKV, block: int, sizes: Sizes, zc, index: int = 0
          ) -> LayerKV:
    exact = codec.SINK_ROWS if block == 0 else 0
    if option.record is not None:
        record = codec.encode_record(layer, option.record, exact)
        header = codec.read_header(record)
        payload = header.k.nbytes + header.v.nbytes
        sizes.raw += payload
        stored = len(record) - codec._payload_offset(len(header.key_min) // 2)
        sizes.zstd += stored
        sizes.planes += stored
        sizes.entropy += stored
        sizes.tokens += layer.n_tokens
        return codec.decode_record(record)[1]
    out = []
    m = option.mixed
    mask = mixed_mask(m, block, index, exact, layer.n_tokens) if m else None
    low = bottom_mask(m, block, index, exact, layer.n_tokens) if m and m.bottom_frac else None
    if m:
        sizes.raw += m.mask_bytes(layer.n_tokens)
        sizes.zstd += m.mask_bytes(layer.n_tokens)
        sizes.planes += m.mask_bytes(layer.n_tokens)
        sizes.entropy += m.mask_bytes(layer.n_tokens)
    for role, t, q in (("K", layer.k, option.k), ("V", layer.v, option.v)):
        bits = t.rows.view(np.uint16)
        x = bits.view(np.float16).astype(np.float32)
        head, rest = bits[:exact], x[exact:]
        positions = np.arange(block * 256 + exact, block * 256 + layer.n_tokens)
        hi = (m.k if role == "K" else m.v) if m else None
        if q is None:       # exact: f16 as stored (the other tensor's error alone)
            back, parts, nparams = rest, [(bits[exact:].view(np.uint8), 8)], 0
        elif hi is not None and m.per_head:
            back, parts, nparams = np.empty_like(rest), [], 0
            for h in range(N_KV_HEAD):
                cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                back[:, cols], head_parts, head_params = mixed_qdq(
                    rest[:, cols], mask[:, h], hi, q, positions)
                parts += head_parts
                nparams += head_params
        elif hi is not None:
            bq = (m.bottom_k if role == "K" else m.bottom_v) if low is not None else None
            back, parts, nparams = mixed_qdq(rest, mask, hi, q, positions,
                                             None if bq is None else (low, bq))
        elif isinstance(q, vq.PQ):
            back, codes, nparams = pq_qdq(rest, q, positions, sizes, (option.name, role, index))
            parts = [(codes, q.bits)]
        else:
            back, codes, nparams = qdq(rest, q, positions)
            parts = [(codes, q.bits)]
        packed = b"".join(pack(c, b) for c, b in parts)
        codes = np.concatenate([c.reshape(-1) for c, _ in parts])
        raw = 2 * head.size + nparams + len(packed)
        sizes.raw += raw
        sizes.zstd += 2 * head.size + nparams + len(zc.compress(packed))
        sizes.planes += 2 * head.size + nparams + len(zc.compress(codes.tobytes()))
        sizes.entropy += 2 * head.size + nparams + sum(entropy_bits(c) for c, _ in parts) / 8
        rows = np.concatenate([head, back.astype(np.float16).view(np.uint16)])
        out.append(TensorRows(F16.id, np.ascontiguousarray(rows).view(np.uint8)))
    sizes.tokens += layer.n_tokens
    return LayerKV(*out)


def options() -> list[Option]:
    from kvtier.storage.quant import Encoding
    Q = Quant

    def P(bits: int, g: int, nuq: bool = False) -> Quant:
        return Quant(bits, "channel", g, prerope=True, nuq=nuq)

    def PQV(d: int, b: int, per_head: bool = False, norm: bool = True, prerope: bool = False
            ) -> vq.PQ:
        return vq.PQ(d, b, per_head, norm, prerope)

    return [
        Option("today: Q4 K chan g16 / V tok g16 + zstd", record=RecordFormat(Encoding.Q4, 3)),
        Option("Q8 (warm today)", record=RecordFormat(Encoding.Q8, 0)),
        Option("K Q5 chan g128 / V Q4 tok g16", Q(5, "channel", 128), Q(4, "token", 16)),
        Option("K Q6 chan g256 / V Q4 tok g16", Q(6, "channel", 256), Q(4, "token", 16)),
        Option("K Q4 chan g16 / V Q4 chan g128", Q(4, "channel", 16), Q(4, "channel", 128)),
        Option("K Q4 chan g16 / V H+Q3 tok g64 sym", Q(4, "channel", 16),
               Q(3, "token", 64, "sym", rotate=True)),
        Option("K Q6 chan g256 / V Q4 chan g128", Q(6, "channel", 256), Q(4, "channel", 128)),
        Option("K Q5 chan g128 / V Q4 chan g128", Q(5, "channel", 128), Q(4, "channel", 128)),
        Option("K Q5 chan g128 / V H+Q3 tok g64 sym", Q(5, "channel", 128),
               Q(3, "token", 64, "sym", rotate=True)),
        Option("K Q5 chan g128 / V Q3 chan g64", Q(5, "channel", 128), Q(3, "channel", 64)),
        Option("K Q4 chan g64 / V H+Q2 tok g64 sym", Q(4, "channel", 64),
               Q(2, "token", 64, "sym", rotate=True)),
        Option("K Q4 chan g128 / V H+Q2 tok g64 sym", Q(4, "channel", 128),
               Q(2, "token", 64, "sym", rotate=True)),
        Option("K Q5 chan g256 / V H+Q2 tok g64 sym", Q(5, "channel", 256),
               Q(2, "token", 64, "sym", rotate=True)),
        Option("K Q4 chan g128 / V Q2 chan g128", Q(4, "channel", 128), Q(2, "channel", 128)),
        Option("K Q6 chan g256 / V Q5 chan g128", Q(6, "channel", 256), Q(5, "channel", 128)),
        Option("K Q4 chan g64 / V Q4 tok g64 (rotation check: no H)", Q(4, "channel", 64),
               Q(4, "token", 64, "sym")),
        Option("warm: K Q8 chan g256 / V Q8 chan g256", Q(8, "channel", 256),
               Q(8, "channel", 256)),
        Option("warm: K Q8 chan g256 / V Q8 tok g32", Q(8, "channel", 256), Q(8, "token", 32)),
        # 18-: keys before RoPE (KVQuant), with today's q6q4 through the codec as the reference.
        Option("q6q4 (codec) + zstd", record=codec.tier_format("q6q4", 3)),
        Option("K P+Q6 chan g256 / V Q4 chan g128", P(6, 256), Q(4, "channel", 128)),
        Option("K P+Q5 chan g256 / V Q4 chan g128", P(5, 256), Q(4, "channel", 128)),
        Option("K P+Q5 chan g128 / V Q4 chan g128", P(5, 128), Q(4, "channel", 128)),
        Option("K P+Q4 chan g256 / V Q4 chan g128", P(4, 256), Q(4, "channel", 128)),
        Option("K P+Q4 chan g128 / V Q4 chan g128", P(4, 128), Q(4, "channel", 128)),
        Option("K P+Q4 chan g64 / V Q4 chan g128", P(4, 64), Q(4, "channel", 128)),
        Option("K P+Q3 chan g64 / V Q4 chan g128", P(3, 64), Q(4, "channel", 128)),
        Option("K P+Q4 chan g128 / V Q3 chan g64", P(4, 128), Q(3, "channel", 64)),
        Option("K P+Q4 chan g128 / V H+Q3 tok g64 sym", P(4, 128),
               Q(3, "token", 64, "sym", rotate=True)),
        Option("K P+Q5 chan g128 / V H+Q3 tok g64 sym", P(5, 128),
               Q(3, "token", 64, "sym", rotate=True)),
        Option("K P+NUQ4 chan g128 / V Q4 chan g128", P(4, 128, nuq=True), Q(4, "channel", 128)),
        Option("K P+NUQ4 chan g128 / V NUQ3 chan g64", P(4, 128, nuq=True),
               Q(3, "channel", 64, nuq=True)),
        Option("K P+NUQ3 chan g64 / V NUQ3 chan g64", P(3, 64, nuq=True),
               Q(3, "channel", 64, nuq=True)),
        Option("K P+Q4 chan g128 / V H+Q2 tok g64 sym", P(4, 128),
               Q(2, "token", 64, "sym", rotate=True)),
        Option("K P+NUQ5 chan g128 / V Q4 chan g128", P(5, 128, nuq=True), Q(4, "channel", 128)),
        Option("K P+Q5 chan g128 / V NUQ4 chan g128", P(5, 128), Q(4, "channel", 128, nuq=True)),
        Option("K P+NUQ5 chan g128 / V NUQ4 chan g128", P(5, 128, nuq=True),
               Q(4, "channel", 128, nuq=True)),
        # 36-: the values' share of q6q4's KL (its keys as they are, its values finer).
        Option("K Q6 chan g256 / V Q4 chan g64", Q(6, "channel", 256), Q(4, "channel", 64)),
        Option("K Q6 chan g256 / V NUQ4 chan g128", Q(6, "channel", 256),
               Q(4, "channel", 128, nuq=True)),
        # 38-: product quantization (bench/vq.py), a codebook per record fit by k-means; values
        # first with q6q4's keys, then keys.
        Option("K Q6 chan g256 / V PQ d4 b8", Q(6, "channel", 256), PQV(4, 8, norm=False)),
        Option("K Q6 chan g256 / V PQ d4 b8 norm", Q(6, "channel", 256), PQV(4, 8)),
        Option("K Q6 chan g256 / V PQ d4 b8 /head norm", Q(6, "channel", 256),
               PQV(4, 8, per_head=True)),
        Option("K Q6 chan g256 / V PQ d8 b8 norm", Q(6, "channel", 256), PQV(8, 8)),
        Option("K Q6 chan g256 / V PQ d2 b4 norm", Q(6, "channel", 256), PQV(2, 4)),
        Option("K Q6 chan g256 / V PQ d2 b5 norm", Q(6, "channel", 256), PQV(2, 5)),
        Option("K Q6 chan g256 / V PQ d2 b6 norm", Q(6, "channel", 256), PQV(2, 6)),
        Option("K Q6 chan g256 / V PQ d2 b6", Q(6, "channel", 256), PQV(2, 6, norm=False)),
        # 46-: keys by PQ, after and before RoPE, with values at ~3 and ~2 bits.
        Option("K PQ d2 b8 norm / V PQ d2 b6 norm", PQV(2, 8), PQV(2, 6)),
        Option("K P+PQ d2 b8 norm / V PQ d2 b6 norm", PQV(2, 8, prerope=True), PQV(2, 6)),
        Option("K P+PQ d2 b7 norm / V PQ d2 b6 norm", PQV(2, 7, prerope=True), PQV(2, 6)),
        Option("K P+PQ d2 b7 norm / V PQ d4 b8 norm", PQV(2, 7, prerope=True), PQV(4, 8)),
        Option("K P+PQ d2 b6 norm / V PQ d4 b8 norm", PQV(2, 6, prerope=True), PQV(4, 8)),
        Option("K P+PQ d4 b8 /head norm / V PQ d4 b8 norm", PQV(4, 8, True, prerope=True),
               PQV(4, 8)),
        # 52-: values by PQ at 3.5 and 4 bits, against scalar Q4 per channel at equal bits.
        Option("K Q6 chan g256 / V PQ d2 b7", Q(6, "channel", 256), PQV(2, 7, norm=False)),
        Option("K Q6 chan g256 / V PQ d2 b8", Q(6, "channel", 256), PQV(2, 8, norm=False)),
        # 54-: one codebook per layer and tensor, fit on window 0's block 0 and reused (what a
        # codebook learned once per model would give; not counted in the bytes).
        Option("K Q6 chan g256 / V PQ d2 b8 fixed", Q(6, "channel", 256),
               vq.PQ(2, 8, fixed=True)),
        Option("K Q6 chan g256 / V PQ d2 b8 norm fixed", Q(6, "channel", 256),
               vq.PQ(2, 8, norm=True, fixed=True)),
        # 56-: mixed precision by attention rank (fourth round): the rows the window's own
        # queries attended to most in q6q4's precision, the rest in a low format; "random" rows
        # are the control at the same bytes.
        *mixed_options(),
    ]


def mixed_options() -> list[Option]:
    """Rows 56-: each low format alone, then with a share of attention-ranked rows in q6q4's
    precision (K Q6 per channel, V Q4 per channel, over those rows)."""
    Q = Quant
    k6, v4 = Q(6, "channel", 256), Q(4, "channel", 128)
    low = {"K Q4 chan g128 / V H+Q2 tok g64 sym": (Q(4, "channel", 128),
                                                    Q(2, "token", 64, "sym", rotate=True)),
           "K Q4 chan g128 / V Q2 chan g128": (Q(4, "channel", 128), Q(2, "channel", 128)),
           "K Q3 chan g128 / V Q2 chan g128": (Q(3, "channel", 128), Q(2, "channel", 128))}
    rows = [("K Q4 chan g128 / V H+Q2 tok g64 sym", f, rank, 1)
            for f, rank in ((0.1, "sum"), (0.2, "sum"), (0.3, "sum"), (0.2, "random"),
                            (0.2, "mean"), (0.2, "pooled"))]
    rows += [("K Q4 chan g128 / V Q2 chan g128", 0.2, rank, 1) for rank in ("sum", "random")]
    rows += [("K Q3 chan g128 / V Q2 chan g128", f, rank, 1)
             for f, rank in ((0.2, "sum"), (0.3, "sum"), (0.2, "random"))]
    rows += [("K Q4 chan g128 / V H+Q2 tok g64 sym", 0.25, rank, 64)
             for rank in ("sum", "random")]
    out = [Option(f"{name} + {100 * f:g}% {'sub-blocks' if unit > 1 else 'rows'} "
                  f"({RANK_WORDS[rank]}) in q6q4", *low[name], mixed=Mixed(k6, v4, f, rank, unit))
           for name, f, rank, unit in rows]
    out.append(Option("K Q3 chan g128 / V Q2 chan g128", *low["K Q3 chan g128 / V Q2 chan g128"]))
    # 70-: the "mean" rank (the best of the first run) along f, its recency control, keys
    # before RoPE, a 3-bit key base, and Q8 for the ranked rows instead of q6q4's precision.
    lb = low["K Q4 chan g128 / V H+Q2 tok g64 sym"]
    name = "K Q4 chan g128 / V H+Q2 tok g64 sym"
    out += [Option(f"{name} + {100 * f:g}% rows ({RANK_WORDS[rank]}) in q6q4", *lb,
                   mixed=Mixed(k6, v4, f, rank))
            for f, rank in ((0.1, "mean"), (0.3, "mean"), (0.4, "mean"), (0.2, "recent"))]
    pk = Quant(4, "channel", 128, prerope=True)
    out.append(Option("K P+Q4 chan g128 / V H+Q2 tok g64 sym + 20% rows (attention mean) in "
                      "q6q4", pk, lb[1], mixed=Mixed(k6, v4, 0.2, "mean")))
    k3 = Q(3, "channel", 64)
    out += [Option(f"K Q3 chan g64 / V H+Q2 tok g64 sym + {100 * f:g}% rows (attention mean) in "
                   "q6q4", k3, lb[1], mixed=Mixed(k6, v4, f, "mean")) for f in (0.2, 0.3)]
    out.append(Option(f"{name} + 10% rows (attention mean) in Q8", *lb,
                      mixed=Mixed(Q(8, "channel", 256), Q(8, "channel", 256), 0.1, "mean")))
    # 78-: a mask per KV head, each ranked by its own query heads' attention.
    out += [Option(f"{name} + {100 * f:g}% rows per KV head ({RANK_WORDS[rank]}) in q6q4", *lb,
                   mixed=Mixed(k6, v4, f, rank, per_head=True))
            for f, rank in ((0.2, "mean"), (0.1, "mean"), (0.2, "sum"))]
    # 81-: only the values mixed, only the keys mixed; the mean rank at 60%; values at 10%.
    out += [Option(f"{name} + 20% rows (attention mean): V in Q4 chan", *lb,
                   mixed=Mixed(None, v4, 0.2, "mean")),
            Option(f"{name} + 20% rows (attention mean): K in Q6 chan", *lb,
                   mixed=Mixed(k6, None, 0.2, "mean")),
            Option(f"{name} + 40% rows (attention mean): V in Q4 chan", *lb,
                   mixed=Mixed(None, v4, 0.4, "mean")),
            Option(f"{name} + 60% rows (attention mean) in q6q4", *lb,
                   mixed=Mixed(k6, v4, 0.6, "mean")),
            Option(f"{name} + 10% rows (attention mean): V in Q4 chan", *lb,
                   mixed=Mixed(None, v4, 0.1, "mean"))]
    # 86-: each tensor's share of the KL, the other exact (f16): the base's keys, with and
    # without their ranked rows in Q6, and the base's values, with and without theirs in Q4.
    out += [Option("K Q4 chan g128 / V f16", lb[0], None),
            Option("K Q4 chan g128 + 20% rows (attention mean) in Q6 chan / V f16", lb[0], None,
                   mixed=Mixed(k6, None, 0.2, "mean")),
            Option("K f16 / V H+Q2 tok g64 sym", None, lb[1]),
            Option("K f16 / V H+Q2 tok g64 sym + 20% rows (attention mean) in Q4 chan", None,
                   lb[1], mixed=Mixed(None, v4, 0.2, "mean"))]
    # 90-: three levels: the lowest-ranked rows below the base (keys Q3 per channel, values
    # 1-bit rotated per token), paying for more rows in q6q4's precision.
    k3, v1 = Q(3, "channel", 128), Q(1, "token", 64, "sym", rotate=True)
    out += [Option(f"{name} + {100 * f:g}% rows (attention mean) in q6q4, lowest {100 * b:g}% "
                   "in K Q3 chan g128 / V H+Q1 tok g64 sym", *lb,
                   mixed=Mixed(k6, v4, f, "mean", bottom_k=k3, bottom_v=v1, bottom_frac=b))
            for f, b in ((0.2, 0.3), (0.2, 0.5), (0.3, 0.5))]
    return out


RANK_WORDS = {"sum": "attention sum", "mean": "attention mean", "pooled": "attention pooled",
              "random": "at random", "recent": "the record's last"}


ERROR_ROWS = [("V", Quant(4, "token", 16)), ("V", Quant(4, "token", 64)),
              ("V", Quant(4, "token", 64, rotate=True)), ("V", Quant(4, "token", 64, "sym", True)),
              ("V", Quant(3, "token", 64, "sym")), ("V", Quant(3, "token", 64, "sym", True)),
              ("V", Quant(3, "channel", 32)), ("V", Quant(4, "channel", 128)),
              ("V", Quant(2, "token", 64, "sym", True)),
              ("K", Quant(4, "channel", 16)), ("K", Quant(4, "channel", 64)),
              ("K", Quant(4, "channel", 128)), ("K", Quant(4, "token", 64, "sym", True)),
              ("K", Quant(4, "channel", 32, rotate=True)), ("K", Quant(5, "channel", 128)),
              ("K", Quant(6, "channel", 256)), ("K", Quant(6, "channel", 256, prerope=True)),
              ("K", Quant(5, "channel", 128, prerope=True)),
              ("K", Quant(4, "channel", 128, prerope=True)),
              ("K", Quant(4, "channel", 128, prerope=True, nuq=True)),
              ("K", Quant(4, "channel", 64, prerope=True)),
              ("K", Quant(3, "channel", 64, prerope=True)),
              ("K", Quant(3, "channel", 64, prerope=True, nuq=True)),
              ("K", Quant(4, "channel", 128, prerope=True, sparse=0.01)),
              ("K", Quant(4, "channel", 128, prerope=True, sparse=0.02)),
              ("K", Quant(5, "channel", 256, prerope=True, sparse=0.01)),
              ("K", Quant(4, "channel", 128, sparse=0.01)),
              ("V", Quant(3, "channel", 64, nuq=True)), ("V", Quant(4, "channel", 128, nuq=True)),
              ("V", Quant(4, "channel", 128, sparse=0.01)),
              ("V", Quant(3, "channel", 64, sparse=0.01))]
"""Single tensors for ``--errors``: rotation, bits and group sizes one at a time."""


def print_errors(blocks: dict) -> None:
    """Relative RMSE of each of ``ERROR_ROWS`` over a window's blocks (sink rows left out)."""
    rows = []
    for role, q in ERROR_ROWS:
        num = den = 0.0
        for b, layers in blocks.items():
            for layer in layers:
                t = layer.k if role == "K" else layer.v
                skip = codec.SINK_ROWS if b == 0 else 0
                x = t.rows.view(np.float16).astype(np.float32)[skip:]
                positions = np.arange(256 * b + skip, 256 * b + skip + len(x))
                back = qdq(x, q, positions)[0].astype(np.float16).astype(np.float32)
                num += float(((back - x) ** 2).sum())
                den += float((x ** 2).sum())
        bits = q.bits + (32 if q.params == "minmax" else 16) / q.g + 32 * q.sparse
        rows.append([role, q.label(), bits, np.sqrt(num / den)])
    print_table(["tensor", "quantizer", "bits/value", "rel. RMSE"], rows)


def print_rope_check(blocks: dict, model: Model, tokens: np.ndarray) -> None:
    """What pre-RoPE quantization rests on, on a window's real keys: llama.cpp's rope type and
    base, that RoPE(RoPE^-1(k)) gives k back to f16 rounding, and the per-channel spread of the
    keys after RoPE (as stored), before it, and with the other pairing (NEOX) as a control; and
    that layer 0's keys, which depend on the token alone, agree across positions before RoPE."""
    rope_type = llama_cpp.llama_model_rope_type(model.ptr)
    n_rot = model.meta("llama.rope.dimension_count")
    print(f"rope type {rope_type} (LLAMA_ROPE_TYPE_NORM = {llama_cpp.LLAMA_ROPE_TYPE_NORM}), "
          f"freq_base {ROPE.freq_base:g}, dimension count {n_rot}, "
          f"freq scale {llama_cpp.llama_model_rope_freq_scale_train(model.ptr):g}")
    neox = Rope(ROPE.freq_base, ROPE.head_dim, neox=True)
    same = total = worst = 0
    spread = {"post-RoPE (stored)": [], "pre-RoPE": [], "pre-RoPE, NEOX pairing (control)": []}
    for b, layers in blocks.items():
        skip = codec.SINK_ROWS if b == 0 else 0
        positions = np.arange(256 * b + skip, 256 * b + 256)
        for layer in layers:
            k16 = layer.k.rows.view(np.float16)[skip:]
            k = k16.astype(np.float32)
            pre = rotate(k, ROPE, positions, inverse=True)
            back = rotate(pre, ROPE, positions).astype(np.float16)
            same += int((back == k16).sum())
            total += k.size
            ulps = np.abs(back.astype(np.float32) - k) / np.spacing(np.abs(k16)).astype(np.float32)
            worst = max(worst, float(ulps.max()))
            for name, x in zip(spread, (k, pre, rotate(k, neox, positions, inverse=True))):
                spread[name].append((x.std(0).mean(), (x.max(0) - x.min(0)).mean()))
    print(f"RoPE(RoPE^-1(k)) == k for {100 * same / total:.4f}% of key values, "
          f"at most {worst:g} f16 ULPs off")
    # Layer 0's key of a token depends on the token alone, not its context: before RoPE, every
    # occurrence of a token should have the same key, whatever its position.
    ids = np.concatenate([np.full(256, b) for b in blocks]), np.concatenate(
        [np.arange(256) for _ in blocks])
    k0 = np.concatenate([layers[0].k.rows.view(np.float16).astype(np.float32)
                         for layers in blocks.values()])
    positions = 256 * ids[0] + ids[1]
    token_ids = tokens[:len(k0)]
    drift = {"post": [], "pre": []}
    pre0 = rotate(k0, ROPE, positions, inverse=True)
    for t in np.unique(token_ids):
        rows = np.flatnonzero(token_ids == t)
        rows = rows[rows >= codec.SINK_ROWS]
        if len(rows) < 2:
            continue
        for name, x in (("post", k0), ("pre", pre0)):
            drift[name].append(np.abs(x[rows] - x[rows[0]]).max() / np.abs(x[rows[0]]).max())
    print(f"layer 0, {len(drift['pre'])} tokens seen at several positions: max |k - k_first| / "
          f"max |k_first| after RoPE {np.max(drift['post']):.4f}, before RoPE "
          f"{np.max(drift['pre']):.4f}")
    print_table(["keys", "per-channel std (mean)", "per-channel range (mean)"],
                [[name, *np.mean(v, axis=0)] for name, v in spread.items()])


def set_importance(queries: np.ndarray, blocks: dict, n_head: int) -> None:
    """:data:`IMPORTANCE` for a window, from its own queries and stored keys."""
    per_head = ar.attention_received(queries, ar.window_keys(blocks))
    received = per_head.sum(1)
    IMPORTANCE["sum"] = received
    IMPORTANCE["mean"] = ar.mean_received(received, n_head)
    IMPORTANCE["pooled"] = np.broadcast_to(received.sum(0), received.shape)
    IMPORTANCE["sum/head"] = per_head
    IMPORTANCE["mean/head"] = ar.mean_received(per_head, n_head // per_head.shape[1])


def hi_mass(m: Mixed, blocks: dict, received: np.ndarray) -> float:
    """The share of ``received`` (layer, KV head, token: the continuation's attention to the
    window) on the rows that ``m`` keeps precise, over all records, exact rows left out."""
    on = total = 0.0
    for b, layers in blocks.items():
        exact = codec.SINK_ROWS if b == 0 else 0
        n = layers[0].n_tokens
        for i in range(len(layers)):
            r = received[i, :, b * 256 + exact:b * 256 + n].T            # (row, KV head)
            on += float(r[mixed_mask(m, b, i, exact, n)].sum())
            total += float(r.sum())
    return on / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--continue", dest="cont", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated row numbers to run")
    parser.add_argument("--errors", action="store_true",
                        help="only print single tensors' relative RMSE on the first window")
    parser.add_argument("--rope", action="store_true",
                        help="only check the RoPE inversion on the first window's keys")
    parser.add_argument("--name", default="compression", help="bench/results/<name>.json")
    args = parser.parse_args()
    opts = options()
    if args.only:
        opts = [opts[int(i)] for i in args.only.split(",")]
    model = Model(default_model_path())
    global ROPE
    ROPE = Rope(float(model.meta("llama.rope.freq_base")), HEAD_DIM)
    config = load_config(None, {"model.n_slots": 2, "model.n_batch": 512})
    hot = HotContext.for_config(model, config)
    layout = sc.layout_of(hot.ptr)
    tokens = document_tokens(model)
    stride = (len(tokens) - args.context - args.cont) // args.windows
    zc = zstandard.ZstdCompressor(level=3)
    kls = {o.name: [] for o in opts}
    agree = {o.name: [] for o in opts}
    nll = {o.name: [] for o in opts + [Option("live")]}
    sizes = {o.name: Sizes() for o in opts}
    mixed = [o for o in opts if o.mixed]
    mass = {o.name: [] for o in mixed}
    for w in range(args.windows):
        if mixed:
            cont, blocks, ref, queries, cont_queries = ar.captured_window(
                hot, tokens, w * stride, args.context, args.cont)
            set_importance(queries, blocks, model.n_head)
            cont_received = ar.attention_received_by(cont_queries, ar.window_keys(blocks),
                                                     args.context)
            for o in mixed:
                mass[o.name].append(hi_mass(o.mixed, blocks, cont_received))
        else:
            cont, blocks, ref = live_window(hot, tokens, w * stride, args.context, args.cont)
        if args.errors:
            print_errors(blocks)
            return
        if args.rope:
            print_rope_check(blocks, model, tokens[:args.context])
            return
        nll["live"].extend(-ref[np.arange(len(ref)), cont[1:]])
        for o in opts:
            new = [(b, [apply(o, layer, b, sizes[o.name], zc, i) for i, layer in enumerate(ls)])
                   for b, ls in blocks.items()]
            got = restored_log_probs(hot, layout, new, cont, args.context)
            kls[o.name].extend(np.sum(np.exp(ref) * (ref - got), axis=-1))
            agree[o.name].extend(ref.argmax(-1) == got.argmax(-1))
            nll[o.name].extend(-got[np.arange(len(got)), cont[1:]])
        print(f"window {w + 1}/{args.windows}", flush=True)
    ppl_live = float(np.exp(np.mean(nll["live"])))
    f16_per_token = 23040
    rows, results = [], {}
    for o in opts:
        kl = np.array(kls[o.name])
        s = sizes[o.name]
        per = {k: getattr(s, k) / s.tokens * 30 for k in ("raw", "zstd", "planes", "entropy")}
        r = {"kl_mean": float(kl.mean()), "kl_p95": float(np.percentile(kl, 95)),
             "top1_agreement": float(np.mean(agree[o.name])),
             "ppl_ratio": float(np.exp(np.mean(nll[o.name]))) / ppl_live,
             "bytes_per_token": per, "x_f16": {k: v / f16_per_token for k, v in per.items()}}
        results[o.name] = r
        rows.append([o.name, per["raw"] / f16_per_token, per["zstd"] / f16_per_token,
                     per["planes"] / f16_per_token, per["entropy"] / f16_per_token,
                     r["kl_mean"], r["kl_p95"], 100 * r["top1_agreement"], r["ppl_ratio"]])
    print_table(["option", "x f16", "zstd", "bytes+zstd", "entropy", "KL mean", "KL p95",
                 "top-1 %", "ppl ratio"], rows)
    if mixed:
        print("share of the continuation's attention (to the window, sink rows left out) on the "
              "rows kept in q6q4's precision:")
        print_table(["option", "attention share %"],
                    [[o.name, 100 * float(np.mean(mass[o.name]))] for o in mixed])
        for o in mixed:
            results[o.name]["continuation_attention_share"] = float(np.mean(mass[o.name]))
    speed = []
    for o in opts:
        s = sizes[o.name]
        if s.vq_f16_bytes:
            gbs = {"fit_and_assign": s.vq_f16_bytes / (s.vq_fit_s + s.vq_assign_s) / 1e9,
                   "assign_only": s.vq_f16_bytes / s.vq_assign_s / 1e9,
                   "decode": s.vq_f16_bytes / s.vq_decode_s / 1e9}
            results[o.name]["numpy_pq_gb_per_s_per_core"] = gbs
            speed.append([o.name, gbs["fit_and_assign"], gbs["assign_only"], gbs["decode"]])
    if speed:
        print("PQ tensors, numpy on one thread, GB/s of f16 (set OPENBLAS_NUM_THREADS=1):")
        print_table(["option", "encode (k-means + codes)", "codes only (given codebook)",
                     "decode"], speed)
    path = write_json(args.name, {"windows": args.windows, "context": args.context,
                                      "continue": args.cont, "live_perplexity": ppl_live,
                                      "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
