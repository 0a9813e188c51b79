"""How big the hot tier is and how it is shared: pure arithmetic from the config and the model.

The hot tier is one llama.cpp context with a unified KV cache: ``n_slots`` live sequences and one
scratch sequence share its cells. Each slot owns an equal share, in whole blocks; a conversation
longer than its share keeps every block in the store and holds a working set (sinks, recent
blocks, the best-scored others) in it. The scratch sequence is where blocks land on their way
into a live sequence (``llama_state_seq_set_data`` replaces a whole sequence, so blocks are written
to the scratch one and copied over with ``llama_memory_seq_cp``, metadata-only in a unified cache).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvtier.config import Config
from kvtier.engine.working_set import Shape
from kvtier.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_SLOT_TOKENS = 4096
"""A slot's hot share when ``tiers.gpu_vram_budget`` is 0 (the default)."""
SCRATCH_BLOCKS = 8
"""Cells of the scratch sequence, in blocks: a restore writes this many blocks at a time."""


@dataclass(frozen=True, slots=True)
class HotSizing:
    block_size: int
    slot_tokens: int
    """A slot's share of the hot tier: the most of a conversation it holds at once."""
    context_size: int
    """The longest conversation a slot may hold (``model.context_size``)."""
    scratch_tokens: int
    n_slots: int
    shape: Shape
    """The working set of a conversation longer than ``slot_tokens``, in blocks."""
    max_position: int
    """Positions at and past this are never used: held blocks are packed below it."""
    packed: bool = True
    """Held blocks of a working set always packed (``working_set.positions``), or at their own
    positions while the conversation fits ``max_position``."""

    @property
    def n_ctx(self) -> int:
        """Cells of llama.cpp's context: every slot's share and the scratch sequence's."""
        return self.n_slots * self.slot_tokens + self.scratch_tokens

    @property
    def scratch_seq(self) -> int:
        """The sequence id of the scratch sequence (the slots are 0 .. n_slots - 1)."""
        return self.n_slots

    def windowed(self, n_tokens: int) -> bool:
        """Whether a conversation of ``n_tokens`` needs a working set (is longer than a share)."""
        return n_tokens > self.slot_tokens


def hot_sizing(config: Config, kv_bytes_per_token: int, n_ctx_train: int,
               sliding_window: int = 0) -> HotSizing:
    """The hot tier's layout for ``config`` and a model with this KV size and trained context.

    A sliding-window model (``sliding_window`` > 0) gets no working set: its window cache holds
    the last positions of a sequence, which blocks moved between positions would scramble, so
    its conversations end at a slot's hot share."""
    mc, ws = config.model, config.working_set
    bs = mc.block_size
    if config.tiers.gpu_vram_budget:
        share = config.tiers.gpu_vram_budget // kv_bytes_per_token // mc.n_slots
        if share < bs:
            raise ConfigError("tiers.gpu_vram_budget",
                              f"gives each of {mc.n_slots} slots {share} tokens of KV; a slot "
                              f"needs at least one block ({bs} tokens, "
                              f"{bs * kv_bytes_per_token * mc.n_slots} bytes in all)")
    else:
        share = min(mc.context_size or DEFAULT_SLOT_TOKENS, DEFAULT_SLOT_TOKENS)
    slot_tokens = max(bs, share // bs * bs)
    context_size = mc.context_size or slot_tokens
    if sliding_window and context_size > slot_tokens:
        log.warning("a sliding-window model has no working set: conversations end at a slot's "
                    "hot share of %d tokens, not model.context_size %d (raise "
                    "tiers.gpu_vram_budget for longer ones)", slot_tokens, context_size)
        context_size = slot_tokens
    blocks = slot_tokens // bs
    shape = _shape(blocks, ws.sink_blocks, ws.recent_blocks, ws.top_k, context_size > slot_tokens,
                   ws.keep_margin)
    max_position = ws.max_position or n_ctx_train or context_size
    if max_position < slot_tokens:
        raise ConfigError("working_set.max_position",
                          f"is {max_position}, less than a slot's hot share of {slot_tokens} "
                          f"tokens")
    return HotSizing(bs, slot_tokens, context_size, min(SCRATCH_BLOCKS, blocks) * bs,
                     mc.n_slots, shape, max_position, ws.positions == "packed")


def _shape(blocks: int, sink: int, recent: int, top_k: int, needed: bool,
           keep: float = 0.0) -> Shape:
    """The working set a share of ``blocks`` holds; checked only where conversations can
    outgrow their share. A share that sinks and recent blocks fill leaves no room for selected
    blocks: a StreamingLLM-like window, allowed (a baseline to compare with) but said."""
    room = blocks - sink - recent
    if needed and room < 0:
        raise ConfigError("working_set.recent_blocks",
                          f"a slot's share of {blocks} blocks cannot hold {sink} sink and "
                          f"{recent} recent blocks; raise tiers.gpu_vram_budget or lower "
                          f"working_set.sink_blocks / working_set.recent_blocks")
    if needed and room == 0:
        log.warning("a slot's share of %d blocks holds only %d sink and %d recent blocks: "
                    "long conversations keep no block chosen by their queries", blocks, sink,
                    recent)
    if not needed:
        return Shape(0, 1, max(blocks, 1))
    budget = sink + recent + (min(top_k, room) if top_k else room)
    return Shape(sink, recent, budget, keep)
