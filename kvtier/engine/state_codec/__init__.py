"""Codec between llama.cpp's per-sequence state blobs and kvtier's block records.

:mod:`.layout` documents the blob and the block convention; :mod:`.parse` reads blobs into block
records, :mod:`.compose` writes block records into blobs, :mod:`.context` moves blobs in and out of
a live llama.cpp context, :mod:`.window` says which stored prefix of a sliding-window model
restores exactly. Callers use the names below (``from kvtier.engine import state_codec``).
"""

from kvtier.engine.state_codec.compose import ComposedState, allocate, compose
from kvtier.engine.state_codec.context import layout_of, read_state, write_state
from kvtier.engine.state_codec.layout import (STATE_MAGIC, VERIFIED_LLAMA_CPP_PYTHON, CacheCells,
                                              CacheLayout, SequenceState, StateLayout, stream_of)
from kvtier.engine.state_codec.parse import parse, split_blocks
from kvtier.engine.state_codec.window import BlockSpan, exact_blocks, rows_to_drop, run_start

__all__ = ["STATE_MAGIC", "VERIFIED_LLAMA_CPP_PYTHON", "BlockSpan", "CacheCells", "CacheLayout",
           "ComposedState", "SequenceState", "StateLayout", "allocate", "compose", "exact_blocks",
           "layout_of", "parse", "read_state", "rows_to_drop", "run_start", "split_blocks",
           "stream_of", "write_state"]
