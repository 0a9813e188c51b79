"""Which blocks of a long sequence the hot tier holds, and where: pure functions of plain numbers.

A sequence longer than its slot's share of the hot tier keeps every block in the store and holds a
*working set* hot: the first ``sink`` blocks (attention sinks), the last ``recent`` blocks (the
local window, the partial tail among them) and the older blocks the current queries score highest,
up to ``budget`` blocks in all (:func:`select`).

Positions: keys are cached after RoPE, so a block sits at one position for everything in it to mean
what it meant. While the sequence fits the model's trained context, every held block keeps its own
position (block ``b`` at ``b * block_size``): what the model sees is the whole sequence with the
unselected blocks masked out, and nothing is ever rotated. Beyond the trained context that is
impossible, so the held blocks are *packed*: in order from position 0, no gaps (:func:`place`), and
the tokens that follow are decoded after them. A block moved from one position to another is
re-rotated by llama.cpp (``llama_memory_seq_add``: the K-shift), measured at the model's noise
floor.

:func:`plan` turns the current placement and the wanted one into the operations that take the hot
tier from one to the other: blocks to drop, blocks to move, blocks to bring in from the store.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Shape:
    """How a slot's working set is made up, in blocks."""

    sink: int = 1
    recent: int = 2
    budget: int = 4
    """Blocks held in all; what is left after sink and recent goes to the best-scored others."""
    keep: float = 0.0
    """A held block keeps its place against a candidate that scores up to this fraction more
    (0.25: a quarter): a selection then swaps fewer blocks for near-equal ones."""

    def __post_init__(self) -> None:
        if self.sink < 0 or self.recent < 1 or self.budget < self.sink + self.recent:
            raise ValueError(f"a working set of {self.budget} blocks cannot hold {self.sink} "
                             f"sink and {self.recent} recent blocks (at least one recent)")
        if self.keep < 0:
            raise ValueError(f"keep must be at least 0, got {self.keep}")


def select(n_blocks: int, scores: Mapping[int, float], shape: Shape,
           held: Collection[int] = ()) -> list[int]:
    """The blocks to hold, ascending: sinks, the recent window, then the best-scored others.

    ``n_blocks`` counts the sequence's blocks (a partial tail included: it is the last one).
    ``scores`` (at least 0) may name any blocks; unscored candidates rank below every scored
    one, later blocks first among equals. Blocks in ``held`` (those in the hot tier now) rank as
    if they scored ``1 + shape.keep`` times their score. A sequence of at most ``shape.budget``
    blocks is held whole.
    """
    if n_blocks <= shape.budget:
        return list(range(n_blocks))
    sink = range(min(shape.sink, n_blocks))
    recent = range(max(len(sink), n_blocks - shape.recent), n_blocks)
    candidates = [b for b in range(len(sink), recent.start)]
    room = shape.budget - len(sink) - len(recent)
    keep = 1.0 + shape.keep

    def rank(b: int) -> tuple[float, int]:
        score = scores.get(b, float("-inf"))
        return -(score * keep if b in held else score), -b
    ranked = sorted(candidates, key=rank)
    return sorted([*sink, *ranked[:room], *recent])


def place(blocks: Sequence[int], block_size: int, n_positions: int,
          max_position: int) -> dict[int, int]:
    """The first position of each held block, ascending ``blocks`` given.

    ``n_positions`` is how many positions the whole sequence spans (its token count); while that
    fits ``max_position`` (the model's trained context), blocks keep their own positions; beyond
    it they are packed from 0 in order.
    """
    if n_positions <= max_position:
        return {b: b * block_size for b in blocks}
    return {b: i * block_size for i, b in enumerate(blocks)}


def next_position(placement: Mapping[int, int], lengths: Mapping[int, int]) -> int:
    """The position after the last held token, given each held block's length in tokens."""
    if not placement:
        return 0
    last = max(placement, key=lambda b: placement[b])
    return placement[last] + lengths[last]


@dataclass(frozen=True, slots=True)
class Move:
    block: int
    source: int
    """First position now."""
    target: int


@dataclass(frozen=True, slots=True)
class Plan:
    """Operations that turn one placement into another, in the order to apply them."""

    drop: list[Move] = field(default_factory=list)
    """Blocks to remove from the hot tier (``target`` is unused: -1)."""
    move: list[Move] = field(default_factory=list)
    """Held blocks whose position changes."""
    load: list[Move] = field(default_factory=list)
    """Blocks to bring from the store (``source`` is -1) to ``target``."""

    @property
    def empty(self) -> bool:
        return not (self.drop or self.move or self.load)


def plan(current: Mapping[int, int], wanted: Mapping[int, int]) -> Plan:
    """How to go from ``current`` (block -> first position, held now) to ``wanted``."""
    drop = [Move(b, p, -1) for b, p in sorted(current.items()) if b not in wanted]
    move = [Move(b, current[b], p) for b, p in sorted(wanted.items())
            if b in current and current[b] != p]
    load = [Move(b, -1, p) for b, p in sorted(wanted.items()) if b not in current]
    return Plan(drop, move, load)
