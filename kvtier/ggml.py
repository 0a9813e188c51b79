"""ggml's tensor types as kvtier meets them: the one table of KV cache types.

A KV cache row of ``n`` values of a type takes ``n / block_values * block_bytes`` bytes. The ids
are ggml's ``enum ggml_type`` (they appear in llama.cpp's state blobs and in kvtier's records); the
names are llama.cpp's (``--cache-type-k q8_0``) and kvtier's config values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GgmlType:
    name: str
    id: int
    block_values: int
    """Values per quantization block (1 for plain floats)."""
    block_bytes: int

    @property
    def bytes_per_value(self) -> float:
        return self.block_bytes / self.block_values

    def row_bytes(self, n_values: int) -> int:
        return n_values // self.block_values * self.block_bytes


F32 = GgmlType("f32", 0, 1, 4)
F16 = GgmlType("f16", 1, 1, 2)
BF16 = GgmlType("bf16", 30, 1, 2)
Q4_0 = GgmlType("q4_0", 2, 32, 18)
Q4_1 = GgmlType("q4_1", 3, 32, 20)
Q5_0 = GgmlType("q5_0", 6, 32, 22)
Q5_1 = GgmlType("q5_1", 7, 32, 24)
Q8_0 = GgmlType("q8_0", 8, 32, 34)
IQ4_NL = GgmlType("iq4_nl", 20, 32, 18)

CACHE_TYPES: dict[str, GgmlType] = {t.name: t for t in
                                    (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL)}
"""The types llama.cpp accepts for its K and V caches, by name."""
BY_ID: dict[int, GgmlType] = {t.id: t for t in CACHE_TYPES.values()}


def type_name(type_id: int) -> str:
    """The name of a ggml type id, or the id itself for a type kvtier does not know."""
    known = BY_ID.get(type_id)
    return known.name if known is not None else str(type_id)
