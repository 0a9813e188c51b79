"""A small store with everything the tools look at, built with the storage API directly.

Eight sessions of one model, each a sequence of four full blocks and a 32-token tail, all starting
with the same two full blocks (a shared prefix, stored once); one sequence of another model that no
session names. Budgets are tiny, so the blocks end up in all three tiers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.config import Config
from kvtier.storage.catalog import SessionEntry
from kvtier.storage.manager import TierManager
from kvtier.storage.records import BlockId, chain_hash, namespace_of
from kvtier.storage.tiers import Tier
from tests.factories import NS, block_id, make_config, make_layers

NS2 = namespace_of(b"other-model")
BUDGETS = {"tiers.host_ram_budget": "1MiB", "tiers.local_ssd_budget": "160KiB",
           "tiers.nfs_budget": "16MiB"}
CLI_BUDGETS = [arg for key, value in BUDGETS.items() for arg in ("--set", f"{key}={value}")]
N_SESSIONS = 8
BLOCK_TOKENS = 64
TAIL_TOKENS = 32
SHARED_BLOCKS = 2
FULL_BLOCKS = 4
N_LAYERS = 4
DAY = 86400.0


def store_config(path: Path, **overrides: Any) -> Config:
    return make_config(path, **{**BUDGETS, **overrides})


def session_id(i: int) -> str:
    return f"session-{i}"


@dataclass(frozen=True, slots=True)
class Built:
    """What was stored, to compare the tools' output with."""

    path: Path
    built_at: float
    sequences: dict[str, int]
    """Session id → its sequence number."""
    unnamed: BlockId
    """The first block of the sequence no session names."""
    tiers: dict[str, int]
    """Blocks per tier right after building."""
    placement: dict[BlockId, Tier]
    n_blocks: int


def session_tokens(i: int) -> np.ndarray:
    prefix = np.arange(SHARED_BLOCKS * BLOCK_TOKENS)
    own = 10_000 * i + np.arange((FULL_BLOCKS - SHARED_BLOCKS) * BLOCK_TOKENS + TAIL_TOKENS)
    return np.concatenate([prefix, own])


def build_store(path: Path) -> Built:
    """Session ``i`` (1-based) was last used ``5 * (i - 1)`` days before ``built_at``."""
    built_at = time.time()
    sequences = {}
    with TierManager(store_config(path), background=False) as m:
        m.register_namespace(NS, b'{"model": "test-model"}')
        for i in range(1, N_SESSIONS + 1):
            seq = m.new_sequence()
            tokens = session_tokens(i)
            ids, parent = [], None
            for b in range(FULL_BLOCKS):
                parent = chain_hash(parent, tokens[b * BLOCK_TOKENS:(b + 1) * BLOCK_TOKENS])
                seed = b if b < SHARED_BLOCKS else 100 * seq + b
                ids.append(m.put_block(block_id(seq, b), make_layers(seed, N_LAYERS), parent))
            ids.append(m.put_block(block_id(seq, FULL_BLOCKS),
                                   make_layers(100 * seq + FULL_BLOCKS, N_LAYERS, TAIL_TOKENS)))
            m.save_sequence(NS, seq, tokens, ids)
            last_used = built_at - 5 * DAY * (i - 1)
            messages = [{"role": "user", "content": f"question {i}"},
                        {"role": "assistant", "content": f"answer {i}"}]
            m.put_session(SessionEntry(session_id(i), NS, seq, last_used - 60, last_used,
                                       {"messages": messages, "model": "test-model"}))
            sequences[session_id(i)] = seq
        seq = m.new_sequence()
        unnamed = [m.put_block(BlockId(NS2, seq, b), make_layers(900 + b, N_LAYERS))
                   for b in range(2)]
        m.save_sequence(NS2, seq, np.arange(2 * BLOCK_TOKENS), unnamed)
        placement = {b: e.tier for b, e in m.blocks().items()}
        tiers = {s.name: s.blocks for s in m.stats()}
    return Built(path, built_at, sequences, unnamed[0], tiers, placement, len(placement))


def expected_blocks() -> int:
    return SHARED_BLOCKS + N_SESSIONS * (FULL_BLOCKS - SHARED_BLOCKS + 1) + 2
