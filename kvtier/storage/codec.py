"""The bytes of one record: a checksummed header and the (possibly quantized, compressed) payload.

Format 2 (``KVB2``, what is written), a fixed binary header, so that a restore reads thousands of
them with one ``struct`` call each and decodes them all with one kernel call
(:class:`DecodeBatch`)::

    0   4  magic b"KVB2"
    4   8  u64 xxh3_64 of every byte after this field (header, summary and payload)
    12  4  u32 tokens
    16  4  u32 exact leading rows (f16 before the quantized rest, see SINK_ROWS)
    20  2  u16 flags: bit 0, the payload is one zstd frame
    22  2  u16 W, channels of the key summary (0: none, K is not f16)
    24 20  K: i32 ggml type, i8 encoding, u8 grouping, u16 group size, u32 width, u64 bytes
           (encoding: -1 raw, 0 f16, 1 Q8, 2 Q4, 3 Q6 since issue 13; grouping: 0 per token,
           1 per channel; K and V each carry their own, e.g. ``q6q4``'s Q6 keys, Q4 values)
    44 20  V: the same
    64 4W  key summary: per-channel min of K (f16 x W), then max (f16 x W)
       ..  zero padding to a multiple of 16 (aligned payloads for the kernels)
           payload: K's encoded bytes then V's (zstd-compressed as one frame when flagged)

Format 1 (``KVB1``) is still read: the same checksum, then ``u32 H`` and an H-byte msgpack header
``[version, tokens, K, V, zstd, key_min, key_max, exact_rows]`` (K and V as ``[ggml type,
encoding, grouping, group size, width, bytes]``), then the payload; ``kvtier compact`` re-encodes.

The checksum covers the header too, so a flipped byte anywhere is a :class:`BlockCorrupt`, never
data. The key summary (per-channel min and max of K, f16) is stored with every f16 block so that
query-aware block selection can score blocks in any tier without reading their payload.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import msgpack
import numpy as np
import xxhash
import zstandard

from kvtier.errors import BlockCorrupt, ModelMismatch
from kvtier.ggml import F16
from kvtier.storage import batch, quant
from kvtier.storage.quant import Encoding, Grouping
from kvtier.storage.records import LayerKV, TensorRows
from kvtier.storage.summary import key_min_max

MAGIC = b"KVB2"
"""Format 2, what :func:`encode_record` writes."""
MAGIC_V1 = b"KVB1"
"""Format 1, still read."""
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<4sQ")
_BODY = struct.Struct("<IIHH" + "ibBHIQ" * 2)
"""Format 2's fixed header after the prefix: tokens, exact rows, flags, summary channels, K, V."""
_HEAD = struct.Struct(_PREFIX.format + _BODY.format[1:])
_FIXED_BYTES = _HEAD.size
_V1_LENGTH = struct.Struct("<I")
_ALIGN = 16
_FLAG_ZSTD = 1

RAW = batch.RAW
"""Encoding of rows that are not f16 (llama.cpp's own quantized cache types): stored as they are."""


GROUP_SIZE = {Encoding.F16: 32, Encoding.Q8: 32, Encoding.Q4: 16, Encoding.Q6: 256}
"""Values per quantization group when a format does not say. Measured on the default model
(docs/quantization.md): Q8 at 32 is already at the model's own noise floor; Q4 needs 16 to stay
near it; Q6 keys in whole-block groups beat Q4 in groups of 16 at the same bytes."""

SINK_ROWS = 4
"""Rows of a sequence's first block kept exact (f16) in every encoding: the first tokens are the
attention sinks, with outliers that would inflate their per-channel key groups' scales."""


@dataclass(frozen=True, slots=True)
class TensorFormat:
    """How one tensor (K or V) of f16 rows is quantized."""

    encoding: Encoding
    grouping: Grouping
    group_size: int


@dataclass(frozen=True, slots=True)
class RecordFormat:
    """How a tier stores f16 records: the encoding, a zstd level (0: no compression), and K's and
    V's layouts where they are not the encoding's defaults (K per channel, V per token, groups of
    ``GROUP_SIZE[encoding]``)."""

    encoding: Encoding
    zstd_level: int = 0
    k: TensorFormat | None = None
    v: TensorFormat | None = None

    @property
    def key_format(self) -> TensorFormat:
        return self.k or TensorFormat(self.encoding, quant.KEY_GROUPING,
                                      GROUP_SIZE[self.encoding])

    @property
    def value_format(self) -> TensorFormat:
        return self.v or TensorFormat(self.encoding, quant.VALUE_GROUPING,
                                      GROUP_SIZE[self.encoding])


TIER_FORMATS = {
    "f16": RecordFormat(Encoding.F16),
    "q8": RecordFormat(Encoding.Q8),
    "q4": RecordFormat(Encoding.Q4),
    "q6q4": RecordFormat(Encoding.Q6, k=TensorFormat(Encoding.Q6, Grouping.PER_CHANNEL, 256),
                         v=TensorFormat(Encoding.Q4, Grouping.PER_CHANNEL, 128)),
    "q8c": RecordFormat(Encoding.Q8, k=TensorFormat(Encoding.Q8, Grouping.PER_CHANNEL, 256),
                        v=TensorFormat(Encoding.Q8, Grouping.PER_CHANNEL, 256)),
}
"""The formats a tier can be configured with (``tiers.warm_format``, ``tiers.cold_format``), by
name. ``q6q4``: keys as 6-bit codes per channel in groups of 256 tokens, values as 4-bit codes
per channel in groups of 128 tokens (docs/quantization.md has the table that chose it). ``q8c``:
Q8 with K and V per channel in groups of 256 tokens, a warm record of a default block in 25 LMDB
pages instead of ``q8``'s 28."""


def tier_format(name: str, zstd_level: int = 0) -> RecordFormat:
    """The record format called ``name``, with ``zstd_level``."""
    try:
        fmt = TIER_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown record format {name!r}; known: {sorted(TIER_FORMATS)}") \
            from None
    return RecordFormat(fmt.encoding, zstd_level, fmt.k, fmt.v)


@dataclass(frozen=True, slots=True)
class TensorHeader:
    ggml_type: int
    encoding: int
    grouping: int
    group_size: int
    width: int
    """Values per row for f16 rows; bytes per row for raw rows."""
    nbytes: int

    def pack(self) -> list[int]:
        return [self.ggml_type, self.encoding, self.grouping, self.group_size, self.width,
                self.nbytes]


@dataclass(frozen=True, slots=True)
class RecordHeader:
    version: int
    n_tokens: int
    k: TensorHeader
    v: TensorHeader
    zstd: bool
    key_min: bytes
    """Per-channel minimum of K as f16 bytes (empty when K is not f16)."""
    key_max: bytes
    exact_rows: int = 0
    """Leading rows stored as f16 before the quantized rest (see SINK_ROWS)."""

    def key_summary(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-channel (min, max) of K as float32, or None for non-f16 caches."""
        if not self.key_min:
            return None
        lo = np.frombuffer(self.key_min, dtype=np.float16).astype(np.float32)
        hi = np.frombuffer(self.key_max, dtype=np.float16).astype(np.float32)
        return lo, hi


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def _encode_tensor(t: TensorRows, fmt: TensorFormat, exact_rows: int
                   ) -> tuple[TensorHeader, np.ndarray]:
    if not t.is_f16:
        return (TensorHeader(t.ggml_type, RAW, 0, 0, t.row_bytes, t.rows.nbytes),
                np.ascontiguousarray(t.rows).reshape(-1))
    bits = np.ascontiguousarray(t.rows).view(np.uint16)
    header = (F16.id, int(fmt.encoding), int(fmt.grouping), fmt.group_size, bits.shape[1])
    if not len(bits):
        # A sliding-window layer holds no rows of a block that left its window.
        return TensorHeader(*header, 0), np.empty(0, np.uint8)
    payload = quant.encode(bits[exact_rows:], fmt.encoding, fmt.grouping, fmt.group_size)
    if exact_rows:
        payload = np.concatenate([bits[:exact_rows].reshape(-1).view(np.uint8), payload])
    return TensorHeader(*header, payload.nbytes), payload


def key_summary(k: TensorRows) -> tuple[bytes, bytes]:
    if not k.is_f16 or k.n_tokens == 0:
        return b"", b""
    lo, hi = key_min_max(k.rows.view(np.uint16))
    return lo.tobytes(), hi.tobytes()


def _payload_offset(summary_channels: int) -> int:
    return -(-(_FIXED_BYTES + 4 * summary_channels) // _ALIGN) * _ALIGN


def encode_record(layer: LayerKV, fmt: RecordFormat, exact_rows: int = 0,
                  summary: bytes | None = None) -> bytes:
    """Serialize one layer of one block for a tier, the first ``exact_rows`` rows exactly.
    ``summary``: the key summary to store (minima then maxima, f16) where it is known already
    (a record re-encoded keeps its own, taken from the keys as computed); None: from ``layer``."""
    if layer.k.n_tokens != layer.v.n_tokens:
        raise ValueError("K and V hold different numbers of tokens")
    k_fmt, v_fmt = fmt.key_format, fmt.value_format
    exact_rows = 0 if k_fmt.encoding == v_fmt.encoding == Encoding.F16 \
        else max(0, min(exact_rows, layer.n_tokens - 1))
    k_head, k_payload = _encode_tensor(layer.k, k_fmt, exact_rows)
    v_head, v_payload = _encode_tensor(layer.v, v_fmt, exact_rows)
    payload = b"".join((k_payload.data, v_payload.data))
    if summary is None:
        key_min, key_max = key_summary(layer.k)
        summary = key_min + key_max
    return _assemble(layer.n_tokens, exact_rows, k_head, v_head, summary, payload,
                     fmt.zstd_level)


def _assemble(n_tokens: int, exact_rows: int, k_head: TensorHeader, v_head: TensorHeader,
              summary: bytes, payload: bytes | memoryview, zstd_level: int) -> bytes:
    """A format 2 record from its parts: ``summary`` is the key summary (min then max) and
    ``payload`` K's encoded bytes then V's, compressed here when ``zstd_level`` is not 0."""
    zstd = bool(zstd_level) and len(payload) > 0
    if zstd:
        payload = _compressor(zstd_level).compress(payload)
    channels = len(summary) // 4
    if channels > 0xFFFF:
        raise ValueError(f"a key summary of {channels} channels does not fit a record header")
    body = _BODY.pack(n_tokens, exact_rows, _FLAG_ZSTD if zstd else 0, channels,
                      *k_head.pack(), *v_head.pack())
    pad = bytes(_payload_offset(channels) - _FIXED_BYTES - len(summary))
    checked = b"".join((body, summary, pad, payload))
    return _PREFIX.pack(MAGIC, xxhash.xxh3_64_intdigest(checked)) + checked


def _verify(data: bytes | memoryview) -> memoryview:
    view = memoryview(data)
    if len(view) < _V1_LENGTH.size + _PREFIX.size:
        raise BlockCorrupt(f"record of {len(view)} bytes is shorter than its prefix")
    magic, checksum = _PREFIX.unpack_from(view)
    if magic != MAGIC and magic != MAGIC_V1:
        raise BlockCorrupt(f"bad magic {bytes(magic)!r}")
    if xxhash.xxh3_64_intdigest(view[_PREFIX.size:]) != checksum:
        raise BlockCorrupt("checksum mismatch")
    return view


def _parse_header(view: memoryview) -> tuple[RecordHeader, int]:
    """The header of a verified record, and where its payload starts."""
    if view[:4] == MAGIC:
        if len(view) < _FIXED_BYTES:
            raise BlockCorrupt(f"record of {len(view)} bytes is shorter than its header")
        n_tokens, exact_rows, flags, channels, *t = _BODY.unpack_from(view, _PREFIX.size)
        offset = _payload_offset(channels)
        if flags & ~_FLAG_ZSTD or len(view) < offset:
            raise BlockCorrupt(f"flags {flags:#x}, {channels} summary channels in a record of "
                               f"{len(view)} bytes")
        summary = _FIXED_BYTES + 2 * channels
        return (RecordHeader(FORMAT_VERSION, n_tokens, TensorHeader(*t[:6]), TensorHeader(*t[6:]),
                             bool(flags), bytes(view[_FIXED_BYTES:summary]),
                             bytes(view[summary:summary + 2 * channels]), exact_rows), offset)
    (hlen,) = _V1_LENGTH.unpack_from(view, _PREFIX.size)
    start = _PREFIX.size + _V1_LENGTH.size
    try:
        fields = msgpack.unpackb(view[start:start + hlen])
        version, n_tokens, k, v, zstd, key_min, key_max, exact_rows = fields
        header = RecordHeader(version, n_tokens, TensorHeader(*k), TensorHeader(*v), bool(zstd),
                              key_min, key_max, exact_rows)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BlockCorrupt(f"unreadable header: {exc}") from None
    if header.version != 1:
        raise BlockCorrupt(f"a KVB1 record says format {header.version}")
    return header, start + hlen


def _same_codes(header: RecordHeader, fmt: RecordFormat) -> bool:
    """Whether a record's tensors are encoded as ``fmt`` encodes them, compression aside."""
    for t, want in ((header.k, fmt.key_format), (header.v, fmt.value_format)):
        if t.encoding == RAW:
            continue
        if t.encoding != want.encoding or (want.encoding != Encoding.F16 and (
                t.grouping != want.grouping or t.group_size != want.group_size)):
            return False
    return True


def in_format(header: RecordHeader, fmt: RecordFormat) -> bool:
    """Whether a record is stored as ``fmt`` writes it (records of rows that are not f16, and
    empty ones, always are): ``kvtier compact`` re-encodes those that are not."""
    if header.n_tokens == 0:
        return True
    return _same_codes(header, fmt) and header.zstd == bool(fmt.zstd_level)


def read_header(data: bytes | memoryview) -> RecordHeader:
    """The verified header of a record (the checksum is checked over the whole record)."""
    view = _verify(data)
    return _parse_header(view)[0]


def _row_bytes(encoding: int, width: int) -> int:
    return width if encoding == RAW else 2 * width


def _address(buffer: bytes | bytearray | memoryview | np.ndarray) -> int:
    return np.frombuffer(buffer, np.uint8).__array_interface__["data"][0]


def _decompress(compressed: memoryview, nbytes: int) -> bytes:
    try:
        payload = _decompressor().decompress(compressed, max_output_size=nbytes)
    except zstandard.ZstdError as exc:
        raise BlockCorrupt(f"zstd: {exc}") from None
    if len(payload) != nbytes:
        raise BlockCorrupt(f"payload is {len(payload)} bytes, header says {nbytes}")
    return payload


_NO_RECORD_WORK = (0,) * batch.RECORD_FIELDS
"""A row of a record table for a task whose record needs no work in the kernel."""


class DecodeBatch:
    """Records decoded into caller-owned rows with one kernel call (:func:`batch.decode_tasks`).

    :meth:`add` verifies a record (checksum, header, that it fits its destination) and notes where
    its tensors' payloads are and where their rows go; :meth:`run` decodes them all without the
    GIL. Records and destinations are used in place: they must stay valid (an LMDB transaction
    open, the blob alive) until :meth:`run` returns. Per record this costs one ``struct`` call
    and a few comparisons in Python; its checksum is verified and its payload decompressed in
    :meth:`run`'s kernel call, just before its tensors are decoded (see :mod:`.batch`).
    """

    __slots__ = ("_tasks", "_records", "_keep")

    def __init__(self) -> None:
        self._tasks: list[tuple[int, ...]] = []
        self._records: list[tuple[int, ...]] = []
        self._keep: list[bytes | np.ndarray] = []

    def __len__(self) -> int:
        return len(self._tasks) // 2

    def add(self, data: bytes | memoryview, k_dst: int, v_dst: int, k_type: int, v_type: int,
            k_row_bytes: int, v_row_bytes: int, n_rows: int) -> None:
        """Check a record's header and queue its K and V for decoding to the addresses ``k_dst``
        and ``v_dst``: ``n_rows`` contiguous rows of ``k_row_bytes`` (``v_row_bytes``) bytes each.
        Its checksum is verified (and its zstd payload decompressed) here, or by :meth:`run` just
        before its tensors are decoded (format 2 records, where xxh3 and libzstd can be called by
        address). Raises
        :class:`BlockCorrupt` for a damaged record (perhaps only in :meth:`run`),
        :class:`ModelMismatch` for one whose types or shapes are not the destination's."""
        view = memoryview(data)
        magic = None
        deferred = False
        if len(view) >= _FIXED_BYTES:
            (magic, checksum, n, exact, zstd, channels,
             kt, ke, kg, kgs, kw, kn, vt, ve, vg, vgs, vw, vn) = _HEAD.unpack_from(view)
        if magic != MAGIC:
            view = _verify(view)           # format 1, or damaged: the general path says which
            header, offset = _parse_header(view)
            k, v = header.k, header.v
            n, exact, zstd = header.n_tokens, header.exact_rows, header.zstd
            kt, ke, kg, kgs, kw, kn = k.ggml_type, k.encoding, k.grouping, k.group_size, \
                k.width, k.nbytes
            vt, ve, vg, vgs, vw, vn = v.ggml_type, v.encoding, v.grouping, v.group_size, \
                v.width, v.nbytes
        elif batch.XXH3_ADDRESS and (not zstd or batch.ZSTD_ADDRESS):
            deferred = True
        elif xxhash.xxh3_64_intdigest(view[_PREFIX.size:]) != checksum:
            raise BlockCorrupt("checksum mismatch")
        if zstd & ~_FLAG_ZSTD:
            raise BlockCorrupt(f"unknown flags {zstd:#x}")
        if magic == MAGIC:
            offset = _payload_offset(channels)
        k_rb = kw if ke == RAW else 2 * kw
        v_rb = vw if ve == RAW else 2 * vw
        if kt != k_type or vt != v_type or n != n_rows or k_rb != k_row_bytes \
                or v_rb != v_row_bytes:
            if deferred:
                _verify(view)              # a damaged header is corruption, not a mismatch
            raise ModelMismatch(f"a record of types {kt}/{vt}, {n} rows of {k_rb}/{v_rb} bytes, "
                                f"for a destination of types {k_type}/{v_type}, {n_rows} rows "
                                f"of {k_row_bytes}/{v_row_bytes} bytes")
        frame = (0, 0, 0, 0)
        if offset > len(view):
            raise BlockCorrupt(f"record of {len(view)} bytes is shorter than its header")
        if n == 0:
            # A sliding-window layer's empty record: nothing to decode, so verify it here.
            if deferred:
                _verify(view)
            if kn or vn or zstd or len(view) != offset:
                raise BlockCorrupt(f"a record of 0 rows has a payload of {len(view) - offset} "
                                   f"bytes (header: {kn} + {vn})")
            return
        if zstd and deferred:
            if kn + vn > 2 * n * (k_rb + v_rb) + 65536:   # never more than f16 and its scales
                _verify(view)
                raise BlockCorrupt(f"payload of {kn + vn} bytes for {n} rows")
            payload = np.empty(kn + vn, np.uint8)    # filled by the kernel, before decoding
            self._keep.append(payload)
            base = _address(payload)
            frame = (_address(view) + offset, len(view) - offset, base, kn + vn)
        elif zstd:
            payload = _decompress(view[offset:], kn + vn)
            self._keep.append(payload)
            base = _address(payload)
        elif len(view) - offset != kn + vn:
            raise BlockCorrupt(f"payload is {len(view) - offset} bytes, header says {kn + vn}")
        else:
            base = _address(view) + offset
        if deferred:
            signed = checksum - (1 << 64) if checksum >= 1 << 63 else checksum
            self._records.append((_address(view) + _PREFIX.size, len(view) - _PREFIX.size,
                                  signed, 2, *frame))
        else:
            self._records.append(_NO_RECORD_WORK)
        self._records.append(_NO_RECORD_WORK)
        self._tasks.append((base, kn, k_dst, n, kw, ke, kg, kgs, 0 if ke == RAW else exact))
        self._tasks.append((base + kn, vn, v_dst, n, vw, ve, vg, vgs, 0 if ve == RAW else exact))

    def add_into(self, data: bytes | memoryview, k_out: np.ndarray, v_out: np.ndarray,
                 k_type: int, v_type: int) -> None:
        """:meth:`add` with uint8 ``(n_rows, row_bytes)`` C-contiguous arrays as destinations."""
        for out in (k_out, v_out):
            if out.dtype != np.uint8 or out.ndim != 2 or not out.flags.c_contiguous \
                    or not out.flags.writeable:
                raise ValueError("destinations are writable C-contiguous uint8 (rows, bytes)")
        if k_out.shape[0] != v_out.shape[0]:
            raise ValueError(f"K has {k_out.shape[0]} rows, V {v_out.shape[0]}")
        self.add(data, _address(k_out), _address(v_out), k_type, v_type, k_out.shape[1],
                 v_out.shape[1], k_out.shape[0])

    def run(self) -> None:
        """Decode everything added (then the batch is empty); raises :class:`BlockCorrupt` when a
        payload does not have the length its header's shape needs (nothing is read or written
        beyond either then; other tensors are decoded)."""
        tasks, self._tasks = self._tasks, []
        records, self._records = self._records, []
        try:
            if not tasks:
                return
            status = batch.decode_tasks(np.array(tasks, np.int64), np.array(records, np.int64))
        finally:
            self._keep.clear()
        if (status == batch.TASK_BAD_CHECKSUM).any():
            raise BlockCorrupt("checksum mismatch")
        if (status == batch.TASK_BAD_FRAME).any():
            raise BlockCorrupt("zstd frame does not decompress to its header's length")
        bad = np.flatnonzero(status)
        if bad.size:
            raise BlockCorrupt(f"{bad.size} of {len(tasks)} tensors have payloads that do not "
                               f"fit their shape (first: task {bad[0]}, status {status[bad[0]]})")


def decode_record(data: bytes | memoryview) -> tuple[RecordHeader, LayerKV]:
    """Verify and decode a record back to llama.cpp rows (f16 for quantized encodings)."""
    header = read_header(data)
    k_out = np.empty((header.n_tokens, _row_bytes(header.k.encoding, header.k.width)), np.uint8)
    v_out = np.empty((header.n_tokens, _row_bytes(header.v.encoding, header.v.width)), np.uint8)
    batch = DecodeBatch()
    batch.add_into(data, k_out, v_out, header.k.ggml_type, header.v.ggml_type)
    batch.run()
    return header, LayerKV(TensorRows(header.k.ggml_type, k_out),
                           TensorRows(header.v.ggml_type, v_out))


def decode_record_into(data: bytes | memoryview, k_out: np.ndarray, v_out: np.ndarray,
                       k_type: int, v_type: int) -> None:
    """Verify a record and decode its K and V rows straight into ``k_out`` / ``v_out`` (uint8,
    (n_tokens, row_bytes), C-contiguous: e.g. a restore's state blob). Raises
    :class:`ModelMismatch` when the record's types or shapes are not the destination's."""
    batch = DecodeBatch()
    batch.add_into(data, k_out, v_out, k_type, v_type)
    batch.run()


def transcode(data: bytes | memoryview, fmt: RecordFormat) -> bytes:
    """Re-encode a record for another tier (e.g. warm Q8 → cool q6q4 + zstd); KVB1 records come
    out as KVB2. A record whose tensors are already encoded as ``fmt`` keeps its codes bit for bit
    and only gains or loses its zstd frame (quantizing decoded values again would move some
    codes)."""
    view = _verify(data)
    header, offset = _parse_header(view)
    if header.n_tokens and _same_codes(header, fmt):
        payload = view[offset:]
        if header.zstd:
            payload = _decompress(payload, header.k.nbytes + header.v.nbytes)
        elif len(payload) != header.k.nbytes + header.v.nbytes:
            raise BlockCorrupt(f"payload is {len(payload)} bytes, header says "
                               f"{header.k.nbytes + header.v.nbytes}")
        return _assemble(header.n_tokens, header.exact_rows, header.k, header.v,
                         header.key_min + header.key_max, payload, fmt.zstd_level)
    header, layer = decode_record(data)
    # Its key summary stays: it is the keys' as computed, and computing it again from decoded
    # keys took a quarter of a re-encode's time (a warm-to-cool demotion's).
    summary = header.key_min + header.key_max if header.key_min and layer.k.is_f16 else None
    return encode_record(layer, fmt, header.exact_rows, summary)


def warm_up() -> None:
    """Run every kernel once on a tiny record, so that numba compiles (or loads its cache) now
    rather than in the first request that stores or restores a block (~12 s on a cold cache)."""
    bits = np.arange(64 * 32, dtype=np.uint16).reshape(64, 32) & 0x3BFF
    rows = TensorRows(F16.id, bits.view(np.uint8))
    layer = LayerKV(rows, rows)
    for encoding in Encoding:
        decode_record(encode_record(layer, RecordFormat(encoding, 1), SINK_ROWS))
