"""Keys and in-memory records of KV blocks.

A *block* is ``block_size`` consecutive tokens of one stored sequence; a *record* is one layer of
one block (its keys and values). Record keys are fixed-width big-endian so that LMDB and RocksDB,
which sort bytewise, keep a sequence's records contiguous and a block's layers next to each other:

    namespace (16) | sequence u64 | block u32 | layer u16        = 30 bytes

The block comes before the layer because a block (all layers) is the unit that moves between tiers;
a sequence stays contiguous either way.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import NewType

import numpy as np

from kvtier.ggml import F16

Namespace = NewType("Namespace", bytes)
"""16 bytes identifying a model and its KV cache types (see :func:`namespace_of`)."""

ChainHash = NewType("ChainHash", bytes)
"""16-byte content hash of a full block and everything before it."""

NAMESPACE_BYTES = 16
HASH_BYTES = 16

_BLOCK_ID = struct.Struct(">QI")
_BLOCK_KEY = struct.Struct(">QIH")


def namespace_of(fingerprint: bytes) -> Namespace:
    """The namespace of a model fingerprint (any canonical bytes describing model + cache types)."""
    return Namespace(hashlib.blake2b(fingerprint, digest_size=NAMESPACE_BYTES).digest())


WINDOWED = b"working-set"
"""The chain-hash key of blocks computed while only a working set of the blocks before them was
hot: their KV is a function of the same tokens, but not the full-attention one, so they are shared
only with other such blocks."""


def chain_hash(parent: ChainHash | None, tokens: np.ndarray, key: bytes = b"") -> ChainHash:
    """``h_i = H(h_{i-1}, tokens of block i[, key])``: equal prefixes give equal hashes, in any
    process; ``key`` (as vLLM's extra keys) tells apart KV computed another way."""
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    h.update(parent if parent is not None else b"\0" * HASH_BYTES)
    h.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    if key:
        h.update(key)
    return ChainHash(h.digest())


def _check_namespace(namespace: bytes) -> None:
    if len(namespace) != NAMESPACE_BYTES:
        raise ValueError(f"a namespace is {NAMESPACE_BYTES} bytes, got {len(namespace)}")


@dataclass(frozen=True, slots=True, order=True)
class BlockId:
    """All layers of one block of one stored sequence: the unit of placement in the tiers."""

    namespace: Namespace
    sequence: int
    block: int

    BYTES = NAMESPACE_BYTES + _BLOCK_ID.size

    def to_bytes(self) -> bytes:
        _check_namespace(self.namespace)
        return self.namespace + _BLOCK_ID.pack(self.sequence, self.block)

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockId:
        if len(data) != cls.BYTES:
            raise ValueError(f"a block id is {cls.BYTES} bytes, got {len(data)}")
        sequence, block = _BLOCK_ID.unpack_from(data, NAMESPACE_BYTES)
        return cls(Namespace(bytes(data[:NAMESPACE_BYTES])), sequence, block)

    def key(self, layer: int) -> BlockKey:
        return BlockKey(self.namespace, self.sequence, self.block, layer)

    def record_keys(self, n_layers: int) -> list[bytes]:
        """The keys of the block's records, layer 0 first."""
        return [self.key(layer).to_bytes() for layer in range(n_layers)]


@dataclass(frozen=True, slots=True, order=True)
class BlockKey:
    """One record: one layer of one block."""

    namespace: Namespace
    sequence: int
    block: int
    layer: int

    BYTES = NAMESPACE_BYTES + _BLOCK_KEY.size

    def to_bytes(self) -> bytes:
        _check_namespace(self.namespace)
        return self.namespace + _BLOCK_KEY.pack(self.sequence, self.block, self.layer)

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockKey:
        if len(data) != cls.BYTES:
            raise ValueError(f"a block key is {cls.BYTES} bytes, got {len(data)}")
        sequence, block, layer = _BLOCK_KEY.unpack_from(data, NAMESPACE_BYTES)
        return cls(Namespace(bytes(data[:NAMESPACE_BYTES])), sequence, block, layer)

    @property
    def block_id(self) -> BlockId:
        return BlockId(self.namespace, self.sequence, self.block)


@dataclass(frozen=True, slots=True)
class TensorRows:
    """One layer's K or V for the tokens of a block, one row per token, as llama.cpp lays it out.

    ``rows`` is uint8 of shape (n_tokens, row_bytes). For f16 caches ``rows.view(np.uint16)`` holds
    the f16 bit patterns; other cache types are kept as opaque rows and never re-quantized.
    """

    ggml_type: int
    rows: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.rows.shape[0])

    @property
    def row_bytes(self) -> int:
        return int(self.rows.shape[1])

    @property
    def is_f16(self) -> bool:
        return self.ggml_type == F16.id


@dataclass(frozen=True, slots=True)
class LayerKV:
    """Keys and values of one layer of one block: what a record holds once decoded."""

    k: TensorRows
    v: TensorRows

    @property
    def n_tokens(self) -> int:
        return self.k.n_tokens

    @property
    def nbytes(self) -> int:
        return int(self.k.rows.nbytes + self.v.rows.nbytes)
