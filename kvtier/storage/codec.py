"""The bytes of one record: a checksummed header and the (possibly quantized, compressed) payload.

    0   4  magic b"KVB1"
    4   8  u64 xxh3_64 of every byte after this field (header and payload)
    12  4  u32 header length H
    16  H  msgpack header: format version, token count, first position, for K and V the ggml
           type, encoding, grouping, group size, row width and encoded length; the key summary;
           compression
    16+H   payload: K's encoded bytes then V's (zstd-compressed as one frame when ``zstd`` is set)

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
from kvtier.storage import quant
from kvtier.storage.quant import Encoding, Grouping
from kvtier.storage.records import LayerKV, TensorRows
from kvtier.storage.summary import key_min_max

MAGIC = b"KVB1"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sQI")

RAW = -1
"""Encoding of rows that are not f16 (llama.cpp's own quantized cache types): stored as they are."""


GROUP_SIZE = {Encoding.F16: 32, Encoding.Q8: 32, Encoding.Q4: 16}
"""Values per quantization group. Measured on the default model (docs/quantization.md): Q8 at 32
is already at the model's own noise floor; Q4 needs 16 to stay near it."""

SINK_ROWS = 4
"""Rows of a sequence's first block kept exact (f16) in every encoding: the first tokens are the
attention sinks, with outliers that would inflate their per-channel key groups' scales."""


@dataclass(frozen=True, slots=True)
class RecordFormat:
    """How a tier stores f16 records: the encoding, and a zstd level (0: no compression)."""

    encoding: Encoding
    zstd_level: int = 0


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

    @property
    def payload_nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

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


def _encode_tensor(t: TensorRows, encoding: Encoding, grouping: Grouping, exact_rows: int
                   ) -> tuple[TensorHeader, np.ndarray]:
    if not t.is_f16:
        return (TensorHeader(t.ggml_type, RAW, 0, 0, t.row_bytes, t.rows.nbytes),
                np.ascontiguousarray(t.rows).reshape(-1))
    bits = np.ascontiguousarray(t.rows).view(np.uint16)
    group = GROUP_SIZE[encoding]
    payload = quant.encode(bits[exact_rows:], encoding, grouping, group)
    if exact_rows:
        payload = np.concatenate([bits[:exact_rows].reshape(-1).view(np.uint8), payload])
    return (TensorHeader(F16.id, int(encoding), int(grouping), group, bits.shape[1],
                         payload.nbytes), payload)


def key_summary(k: TensorRows) -> tuple[bytes, bytes]:
    if not k.is_f16 or k.n_tokens == 0:
        return b"", b""
    lo, hi = key_min_max(k.rows.view(np.uint16))
    return lo.tobytes(), hi.tobytes()


def encode_record(layer: LayerKV, fmt: RecordFormat, exact_rows: int = 0) -> bytes:
    """Serialize one layer of one block for a tier, the first ``exact_rows`` rows exactly."""
    if layer.k.n_tokens != layer.v.n_tokens:
        raise ValueError("K and V hold different numbers of tokens")
    exact_rows = 0 if fmt.encoding == Encoding.F16 else min(exact_rows, layer.n_tokens - 1)
    k_head, k_payload = _encode_tensor(layer.k, fmt.encoding, quant.KEY_GROUPING, exact_rows)
    v_head, v_payload = _encode_tensor(layer.v, fmt.encoding, quant.VALUE_GROUPING, exact_rows)
    payload: bytes | bytearray = b"".join((k_payload.data, v_payload.data))
    if fmt.zstd_level:
        payload = _compressor(fmt.zstd_level).compress(payload)
    key_min, key_max = key_summary(layer.k)
    header = msgpack.packb([FORMAT_VERSION, layer.n_tokens, k_head.pack(), v_head.pack(),
                            bool(fmt.zstd_level), key_min, key_max, exact_rows])
    body = struct.pack("<I", len(header)) + header + payload
    return MAGIC + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) + body


def _verify(data: bytes | memoryview) -> memoryview:
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise BlockCorrupt(f"record of {len(view)} bytes is shorter than its prefix")
    magic, checksum, _ = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise BlockCorrupt(f"bad magic {bytes(magic)!r}")
    if xxhash.xxh3_64_intdigest(view[12:]) != checksum:
        raise BlockCorrupt("checksum mismatch")
    return view


def _parse_header(view: memoryview) -> tuple[RecordHeader, memoryview]:
    (hlen,) = struct.unpack_from("<I", view, 12)
    try:
        fields = msgpack.unpackb(view[16:16 + hlen])
        version, n_tokens, k, v, zstd, key_min, key_max, exact_rows = fields
        header = RecordHeader(version, n_tokens, TensorHeader(*k), TensorHeader(*v), bool(zstd),
                              key_min, key_max, exact_rows)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BlockCorrupt(f"unreadable header: {exc}") from None
    if header.version != FORMAT_VERSION:
        raise BlockCorrupt(f"record format {header.version}, this kvtier reads {FORMAT_VERSION}")
    return header, view[16 + hlen:]


def read_header(data: bytes | memoryview) -> RecordHeader:
    """The verified header of a record (the checksum is checked over the whole record)."""
    return _parse_header(_verify(data))[0]


def _decode_tensor_into(head: TensorHeader, payload: memoryview, exact_rows: int,
                        out: np.ndarray) -> None:
    """Decode one tensor into ``out``: uint8 (n_tokens, row_bytes) with contiguous rows."""
    if head.encoding == RAW:
        out[...] = np.frombuffer(payload, dtype=np.uint8).reshape(out.shape)
        return
    bits = out.view(np.uint16)
    exact = exact_rows * head.width * 2
    bits[:exact_rows] = np.frombuffer(payload[:exact], dtype="<u2").reshape(-1, head.width)
    quant.decode_into(payload[exact:], bits[exact_rows:], Encoding(head.encoding),
                      Grouping(head.grouping), head.group_size)


def _row_bytes(head: TensorHeader) -> int:
    return head.width if head.encoding == RAW else 2 * head.width


def _payload(data: bytes | memoryview) -> tuple[RecordHeader, memoryview]:
    header, payload = _parse_header(_verify(data))
    if header.zstd:
        try:
            payload = memoryview(_decompressor().decompress(
                payload, max_output_size=header.payload_nbytes))
        except zstandard.ZstdError as exc:
            raise BlockCorrupt(f"zstd: {exc}") from None
    if len(payload) != header.payload_nbytes:
        raise BlockCorrupt(f"payload is {len(payload)} bytes, header says "
                           f"{header.payload_nbytes}")
    return header, payload


def decode_record(data: bytes | memoryview) -> tuple[RecordHeader, LayerKV]:
    """Verify and decode a record back to llama.cpp rows (f16 for quantized encodings)."""
    header, payload = _payload(data)
    tensors = []
    for head, part in ((header.k, payload[:header.k.nbytes]),
                       (header.v, payload[header.k.nbytes:])):
        rows = np.empty((header.n_tokens, _row_bytes(head)), dtype=np.uint8)
        _decode_tensor_into(head, part, header.exact_rows, rows)
        tensors.append(TensorRows(head.ggml_type, rows))
    return header, LayerKV(*tensors)


def decode_record_into(data: bytes | memoryview, k_out: np.ndarray, v_out: np.ndarray,
                       k_type: int, v_type: int) -> RecordHeader:
    """Verify a record and decode its K and V rows straight into ``k_out`` / ``v_out`` (uint8,
    (n_tokens, row_bytes), contiguous rows: e.g. a restore's state blob). Raises
    :class:`ModelMismatch` when the record's types or shapes are not the destination's."""
    header, payload = _payload(data)
    for head, out, ggml_type, name in ((header.k, k_out, k_type, "K"),
                                       (header.v, v_out, v_type, "V")):
        if head.ggml_type != ggml_type or out.shape != (header.n_tokens, _row_bytes(head)):
            raise ModelMismatch(f"{name}: a record of type {head.ggml_type}, "
                                f"{header.n_tokens} x {_row_bytes(head)} bytes, for a "
                                f"destination of type {ggml_type}, {out.shape[0]} x "
                                f"{out.shape[1]} bytes")
    _decode_tensor_into(header.k, payload[:header.k.nbytes], header.exact_rows, k_out)
    _decode_tensor_into(header.v, payload[header.k.nbytes:], header.exact_rows, v_out)
    return header


def transcode(data: bytes | memoryview, fmt: RecordFormat) -> bytes:
    """Re-encode a record for another tier (e.g. warm Q8 → cool Q4 + zstd)."""
    header, layer = decode_record(data)
    return encode_record(layer, fmt, header.exact_rows)


def warm_up() -> None:
    """Run every kernel once on a tiny record, so that numba compiles (or loads its cache) now
    rather than in the first request that stores or restores a block (~12 s on a cold cache)."""
    bits = np.arange(64 * 32, dtype=np.uint16).reshape(64, 32) & 0x3BFF
    rows = TensorRows(F16.id, bits.view(np.uint8))
    layer = LayerKV(rows, rows)
    for encoding in Encoding:
        record = encode_record(layer, RecordFormat(encoding, 1), SINK_ROWS)
        k_out = np.empty_like(layer.k.rows)
        decode_record_into(record, k_out, np.empty_like(k_out), F16.id, F16.id)
