"""Sliding-window caches in a restore: which stored prefix restores exactly, and which of its rows
the window still needs.

A sliding-window model (Gemma 2/3, Cohere 2, gpt-oss, ...) has two caches in llama.cpp's state:
the full-attention layers' and the sliding-window layers', which holds only the positions a next
token can still see. ``llama_state_seq_get_data`` writes the window's cells that are not masked
for the sequence's last position ``L - 1``, i.e. positions ``[L - n_swa, L)``, so a block stores
the window rows it held when it was written (a suffix of the block, see :mod:`.layout`) and none
once the window had passed it.

A prefix of ``N`` tokens restores exactly when the stored blocks hold the window rows of
``[max(0, N - n_swa), N)``: the next token (at ``N``, or at ``N - 1`` when the last prompt token is
decoded again for its logits) sees nothing older. Without them the sliding-window layers would
attend to missing cells and the reply would differ from an uninterrupted run's: such a prefix is
recomputed instead. Only standard windows are modelled (a token sees the ``n_swa - 1`` positions
before it); a chunked window needs fewer rows than this asks for, so it is only ever
conservative.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockSpan:
    """What a stored block holds, in positions."""

    start: int
    """Its first position (block index x block size)."""
    end: int
    """One past its last position (start + its tokens)."""
    window_rows: int
    """Rows of the sliding-window cache it holds: positions ``[end - window_rows, end)``."""


def window_start(n_tokens: int, n_swa: int) -> int:
    """The first position whose window rows a restore of ``n_tokens`` tokens needs."""
    return max(0, n_tokens - n_swa)


def run_start(spans: Sequence[BlockSpan]) -> int:
    """The first position of the run of window rows that ends with the blocks' last position:
    every position from it on has its window row stored."""
    if not spans:
        return 0
    start = spans[-1].end
    for s in reversed(spans):
        if s.end != start or not s.window_rows:
            break
        start = s.end - s.window_rows
        if start > s.start:
            break
    return start


def covered(spans: Sequence[BlockSpan], n_swa: int) -> bool:
    """Whether the blocks (consecutive, from position 0) hold every window row that a restore of
    all of them needs."""
    return not spans or run_start(spans) <= window_start(spans[-1].end, n_swa)


def exact_blocks(spans: Sequence[BlockSpan], n_swa: int) -> int:
    """How many leading blocks restore exactly (0: recompute everything)."""
    for k in range(len(spans), 0, -1):
        if covered(spans[:k], n_swa):
            return k
    return 0


def rows_to_drop(spans: Sequence[BlockSpan], n_swa: int | None = None) -> list[int]:
    """Per block, how many of its leading window rows a restore of all the blocks leaves out:
    those before the run that ends with the last block (:func:`run_start`), and with ``n_swa``
    (a window cache sized for one window per sequence) those older than the window too.

    Without ``n_swa`` the run's rows older than the window are kept: the next token does not see
    them, but a sequence computed in place holds them too (llama.cpp's full-size window cache
    keeps them until it needs the room), and its flash-attention kernel sums over the cells in an
    order that depends on which cells are there, so the same cells give the same logits (with
    only the window's, Gemma 3's differed by up to 0.8)."""
    first = run_start(spans)
    if n_swa is not None and spans:
        first = max(first, window_start(spans[-1].end, n_swa))
    return [min(s.window_rows, max(0, first - (s.end - s.window_rows))) for s in spans]
