"""Damaged stores on real files: the tier manager opens them, every read is a block or a miss
(never an exception), the damage is counted or reported, ``kvtier inspect verify`` reports it and
exits 1, and ``kvtier compact --scrub`` leaves a store that verifies clean."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvtier.cli import main
from kvtier.errors import KvtierError
from kvtier.storage.manager import TierManager
from kvtier.storage.tiers import Tier
from tests.reliability.damage import DAMAGE
from tests.tools.stores import CLI_BUDGETS, Built, build_store, store_config


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Built:
    built = build_store(tmp_path_factory.mktemp("faults") / "store")
    assert built.tiers["cool"] and built.tiers["cold"]     # every tier has blocks to damage
    return built


def tool(*args: str) -> int:
    return main([*args, *CLI_BUDGETS, "--no-progress"])


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_store_opens_reads_as_misses_and_scrubs_clean(template: Built, tmp_path: Path,
                                                                 name: str) -> None:
    data = tmp_path / "store"
    shutil.copytree(template.path, data)
    DAMAGE[name](data)

    with TierManager(store_config(data), background=False) as manager:
        blocks = list(manager.blocks())
        results = manager.get_blocks(blocks)        # never raises
        failed = [r for r in results if isinstance(r, KvtierError)]
        stats = manager.stats()
        corrupt = sum(s.corrupt for s in stats)
        # The damage is seen: at open (moved aside) or as the blocks are read (counted).
        assert manager.degraded or corrupt > 0, name
        assert corrupt >= len(failed)
        assert all(manager.block_entry(b) is None for b, r in zip(blocks, results)
                   if isinstance(r, KvtierError))      # quarantined: a miss from now on
    assert not [p for p in data.iterdir() if p.name.endswith(".rebuild")]

    fresh = tmp_path / "again"
    shutil.copytree(template.path, fresh)
    DAMAGE[name](fresh)
    assert tool("inspect", "verify", "--data-dir", str(fresh)) == 1
    assert tool("compact", "--scrub", "--data-dir", str(fresh)) == 0
    assert tool("inspect", "verify", "--data-dir", str(fresh)) == 0
    # Nothing damaged was deleted: it was moved aside (or scrubbed out of a store that opened).
    moved = [p.name for p in fresh.iterdir() if ".damaged-" in p.name]
    if name.endswith(("manifest_deleted", "truncated", "meta_pages")):
        assert moved, name


def test_unreadable_blocks_are_quarantined_and_counted_per_tier(template: Built,
                                                                tmp_path: Path) -> None:
    data = tmp_path / "store"
    shutil.copytree(template.path, data)
    DAMAGE["cool_blob_bytes"](data)
    with TierManager(store_config(data), background=False) as manager:
        cool = [b for b, e in manager.blocks().items() if e.tier == Tier.COOL]
        results = manager.get_blocks(cool)
        bad = [b for b, r in zip(cool, results) if isinstance(r, KvtierError)]
        assert bad
        assert manager.stats()[Tier.COOL].corrupt == len(bad)
        assert all(manager.block_entry(b) is None for b in bad)     # quarantined: misses now
    # A clean close repaired the sequences that named them: the store verifies clean.
    assert tool("inspect", "verify", "--data-dir", str(data)) == 0


def test_a_damaged_catalog_keeps_the_sessions_it_can_read(template: Built,
                                                          tmp_path: Path) -> None:
    data = tmp_path / "store"
    shutil.copytree(template.path, data)
    DAMAGE["catalog_bytes"](data)
    with TierManager(store_config(data), background=False) as manager:
        assert "catalog" in manager.degraded
        kept = manager.list_sessions()
        assert {s.session_id for s in kept} == set(template.sequences)   # found page by page
    assert any(p.name.startswith("catalog.damaged-") for p in data.iterdir())
