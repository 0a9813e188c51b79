import os
from pathlib import Path

import lmdb
import pytest

from kvtier.storage import codec
from kvtier.storage.manager import TierManager
from kvtier.storage.quant import Encoding, Grouping
from kvtier.storage.records import BlockId
from kvtier.storage.tiers import Tier, dir_bytes
from kvtier.tools.compact import CompactOptions, Target, compact
from kvtier.tools.verify import verify
from tests.factories import NS
from tests.tools.stores import (DAY, FULL_BLOCKS, N_LAYERS, N_SESSIONS, SHARED_BLOCKS,
                                session_id, store_config)

OWN_BLOCKS = FULL_BLOCKS - SHARED_BLOCKS + 1


def snapshot(path: Path) -> dict:
    """The store's logical content: sessions, sequences, and where every block is."""
    with TierManager(store_config(path), background=False) as m:
        return {"sessions": sorted(s.session_id for s in m.list_sessions(limit=1000)),
                "sequences": sorted((s.namespace, s.sequence, s.blocks) for s in m.sequences()),
                "blocks": {b: (e.tier, e.stored_bytes, e.refs) for b, e in m.blocks().items()}}


def assert_sound(path: Path, sessions: list[str]) -> None:
    """The store verifies, holds exactly ``sessions``, and every block of each one reads back."""
    with TierManager(store_config(path), background=False) as m:
        report = verify(m)
        assert report.ok, report.problems
        assert sorted(s.session_id for s in m.list_sessions(limit=1000)) == sorted(sessions)
        for sid in sessions:
            session = m.get_session(sid)
            seq = m.get_sequence(NS, session.sequence)
            assert len(seq.blocks) == FULL_BLOCKS + 1
            for block in seq.block_ids():
                assert len(m.get_block(block)) == N_LAYERS


def rocks_files(path: Path) -> set[str]:
    return {f for f in os.listdir(path) if f.endswith((".sst", ".blob"))}


def test_dry_run_changes_nothing_and_predicts_the_run(cli, built):
    before = snapshot(built.path)
    plan = cli.json("compact", "--dry-run", "--keep", "3", "--warm-target", "30%")
    assert plan["dry_run"] and plan["changed"]
    assert snapshot(built.path) == before
    code, out, _ = cli("compact", "--dry-run", "--keep", "3", "--warm-target", "30%")
    assert code == 0 and "dry run: nothing was changed" in out and "would expire 5" in out
    assert snapshot(built.path) == before

    done = cli.json("compact", "--keep", "3", "--warm-target", "30%")
    assert done["steps"]["expire"] == plan["steps"]["expire"]
    assert done["steps"]["expire"]["sessions"] == [session_id(i) for i in range(4, 9)]
    assert done["steps"]["demote"]["warm"] == plan["steps"]["demote"]["warm"]
    assert plan["steps"]["lmdb"]["would_rewrite"] and done["steps"]["lmdb"]["rewritten"]
    assert [r["blocks"] for r in done["after"]] == [r["blocks"] for r in plan["after"]]


@pytest.mark.parametrize("flags", [["--keep", "3"], ["--max-age", "12d"]])
def test_expiry_keeps_exactly_the_recent_sessions(cli, built, flags):
    report = cli.json("compact", *flags)
    expired = [session_id(i) for i in range(4, N_SESSIONS + 1)]
    assert report["steps"]["expire"]["sessions"] == expired
    assert report["steps"]["expire"]["blocks_freed"] == len(expired) * OWN_BLOCKS
    kept = [session_id(i) for i in range(1, 4)]
    assert_sound(built.path, kept)
    assert len(snapshot(built.path)["blocks"]) == SHARED_BLOCKS + 3 * OWN_BLOCKS + 2


def test_unnamed_sequences_expire_by_age(built):
    config = store_config(built.path)
    with TierManager(config, background=False) as m:
        report = compact(m, CompactOptions(max_age_s=DAY, now=built.built_at + DAY / 2))
    assert report.steps["expire"]["sessions"] == [session_id(i) for i in range(2, 9)]
    assert report.steps["expire"]["sequences"] == 0
    with TierManager(config, background=False) as m:
        report = compact(m, CompactOptions(max_age_s=DAY, now=built.built_at + 2 * DAY))
        assert report.steps["expire"]["sessions"] == [session_id(1)]
        assert report.steps["expire"]["sequences"] == 1
        assert m.blocks() == {} and m.sequences() == []
        assert all(list(tier.keys()) == [] for tier in m.tiers)
    assert_sound(built.path, [])


def test_compact_frees_disk_and_keeps_live_sessions_readable(cli, built):
    config = store_config(built.path)
    paths = [config.warm_path, config.cool_path, config.cold_path]
    disk_before = [dir_bytes(p) for p in paths]
    warm_file = os.path.getsize(config.warm_path / "data.mdb")
    report = cli.json("compact", "--keep", "2")
    assert report["changed"]
    freed = report["steps"]["expire"]["bytes_freed"]
    assert freed["warm"] > 0 and freed["cool"] > 0
    assert os.path.getsize(config.warm_path / "data.mdb") < warm_file - freed["warm"] // 2
    cool = report["steps"]["rocksdb"]["cool"]
    assert cool["files_bytes_after"] < cool["files_bytes"]
    disk_after = [dir_bytes(p) for p in paths]
    assert disk_after[Tier.WARM] < disk_before[Tier.WARM]
    assert sum(disk_after) < sum(disk_before)
    assert report["before"][Tier.WARM]["disk_bytes"] > report["after"][Tier.WARM]["disk_bytes"]
    assert_sound(built.path, [session_id(1), session_id(2)])


def test_demotion_meets_the_targets_by_eviction_priority(cli, built):
    config = store_config(built.path)
    with TierManager(config, background=False) as m:
        budgets = [s.budget for s in m.stats()]
        warm = [b for b, e in m.blocks().items() if e.tier == Tier.WARM]
        valued = warm[:3]
        for block in valued:    # hits make blocks worth keeping warm
            for _ in range(3):
                m.get_block(block)
    report = cli.json("compact", "--warm-target", "40%", "--cool-target", "50%")
    demote = report["steps"]["demote"]
    assert demote["warm"]["blocks"] > 0 and demote["cool"]["blocks"] > 0
    assert demote["dropped"] == 0
    after = {r["name"]: r for r in report["after"]}
    assert after["warm"]["stored_bytes"] <= 0.4 * budgets[Tier.WARM]
    assert after["cool"]["stored_bytes"] <= 0.5 * budgets[Tier.COOL]
    state = snapshot(built.path)["blocks"]
    assert all(state[b][0] == Tier.WARM for b in valued)
    demoted = [b for b in warm if state[b][0] != Tier.WARM]
    assert demoted
    records = cli.json("inspect", "blocks", "--block",
                       f"{demoted[0].sequence}:{demoted[0].block}", "--layer", "0")
    header = records[0]["layers"][0]["header"]
    assert records[0]["tier"] in ("cool", "cold")
    assert (header["k"]["encoding"], header["v"]["encoding"], header["zstd"]) == (
        "q6", "q4", True)    # re-quantized from warm Q8 on the way down (q6q4)
    assert_sound(built.path, [session_id(i) for i in range(1, N_SESSIONS + 1)])


def test_demotion_into_a_full_cold_tier_drops_and_repairs(cli, built):
    with TierManager(store_config(built.path), background=False) as m:
        cold = m.stats()[Tier.COLD].stored_bytes
    small_cold = ["--set", f"tiers.nfs_budget={cold + 16 * 1024}"]    # full after one more
    report = cli.json("compact", "--warm-target", "0", "--cool-target", "0", *small_cold)
    demote = report["steps"]["demote"]
    assert demote["dropped"] > 0 and demote["repaired"]["truncated_sequences"] > 0
    assert report["remaining_problems"] == {}
    assert cli.json("inspect", "verify", *small_cold)["ok"]


def test_a_second_run_changes_nothing(cli, built):
    config = store_config(built.path)
    flags = ["--keep", "3", "--warm-target", "30%", "--cool-target", "40%"]
    first = cli.json("compact", *flags)
    assert first["changed"]
    state = snapshot(built.path)
    warm_size = os.path.getsize(config.warm_path / "data.mdb")
    files = [rocks_files(config.cool_path), rocks_files(config.cold_path)]

    second = cli.json("compact", *flags)
    assert not second["changed"], second["steps"]
    assert second["steps"]["expire"]["sessions"] == []
    assert second["steps"]["repair"]["found"] == {}
    assert not second["steps"]["lmdb"]["rewritten"]
    assert snapshot(built.path) == state
    assert os.path.getsize(config.warm_path / "data.mdb") == warm_size
    assert [rocks_files(config.cool_path), rocks_files(config.cold_path)] == files
    code, out, _ = cli("compact", *flags)
    assert code == 0 and "(nothing to do)" in out and "CHANGE" in out


def test_a_killed_lmdb_rewrite_leaves_a_sound_store(cli, built):
    """What a kill during the rewrite can leave: the compacted copy renamed over data.mdb, and a
    scratch directory holding part of a copy."""
    config = store_config(built.path)
    cli.json("compact", "--keep", "4", "--no-rewrite")
    scratch = config.warm_path.with_name("warm.compact")
    scratch.mkdir()
    env = lmdb.open(str(config.warm_path), map_size=config.tiers.host_ram_budget)
    env.copy(str(scratch), compact=True)
    env.close()
    os.replace(scratch / "data.mdb", config.warm_path / "data.mdb")
    data = (config.warm_path / "data.mdb").read_bytes()
    (scratch / "data.mdb").write_bytes(data[:len(data) // 2])
    kept = [session_id(i) for i in range(1, 5)]
    assert_sound(built.path, kept)

    report = cli.json("compact")
    assert report["steps"]["scratch"]["changed"] and not scratch.exists()
    assert_sound(built.path, kept)


def test_bad_arguments_are_refused(cli):
    for flags, message in ((["--max-age", "soon"], "duration"),
                           (["--warm-target", "150%"], "0..100"),
                           (["--cool-target", "lots"], "byte size"),
                           (["--keep", "-1"], "negative")):
        code, _, err = cli("compact", *flags)
        assert code == 2 and message in err, (flags, err)


def test_targets_parse():
    assert Target.parse("50%").resolve(1000) == 500
    assert Target.parse("1KiB").resolve(10) == 1024
    assert Target.parse("0").resolve(10) == 0
    assert [t.label for t in Tier] == ["warm", "cool", "cold"]


def lower_headers(path: Path, **overrides: str) -> dict[BlockId, tuple[int, int]]:
    """(K, V) encodings of the first record of every cool and cold block."""
    with TierManager(store_config(path, **overrides), background=False) as m:
        return {b: (h.k.encoding, h.v.encoding)
                for b, e in m.blocks().items() if e.tier != Tier.WARM
                for h in [codec.read_header(m.tiers[e.tier].get(b.record_keys(1)[0]))]}


def test_compact_re_encodes_blocks_written_in_an_older_format(cli, built):
    old = {"tiers.cold_format": "q4"}
    with TierManager(store_config(built.path, **old), background=False) as m:
        lower = [b for b, e in m.blocks().items() if e.tier != Tier.WARM]
        assert lower and all(m.recode(b) for b in lower)   # as a store from before issue 13
        assert not any(m.recode(b) for b in lower)          # already in the tier's format
    assert set(lower_headers(built.path).values()) == {(Encoding.Q4, Encoding.Q4)}
    state = snapshot(built.path)
    plan = cli.json("compact", "--dry-run")["steps"]["recode"]
    assert plan["cool"]["stale"] + plan["cold"]["stale"] == len(lower)
    assert set(lower_headers(built.path).values()) == {(Encoding.Q4, Encoding.Q4)}
    report = cli.json("compact")["steps"]["recode"]
    assert report["changed"]
    assert report["cool"]["recoded"] + report["cold"]["recoded"] == len(lower)
    assert set(lower_headers(built.path).values()) == {(Encoding.Q6, Encoding.Q4)}
    after = snapshot(built.path)
    assert {b: v[0] for b, v in after["blocks"].items()} \
        == {b: v[0] for b, v in state["blocks"].items()}         # nothing moved
    assert sum(after["blocks"][b][1] for b in lower) < sum(state["blocks"][b][1] for b in lower)
    assert {k: v for k, v in after.items() if k != "blocks"} \
        == {k: v for k, v in state.items() if k != "blocks"}
    assert not cli.json("compact")["steps"]["recode"]["changed"]
    assert_sound(built.path, [session_id(i) for i in range(1, N_SESSIONS + 1)])


def warm_layouts(path: Path) -> set[tuple]:
    with TierManager(store_config(path), background=False) as m:
        return {(h.k.grouping, h.k.group_size, h.v.grouping, h.v.group_size)
                for b, e in m.blocks().items() if e.tier == Tier.WARM
                for h in [codec.read_header(m.tiers[Tier.WARM].get(b.record_keys(1)[0]))]}


def test_compact_re_encodes_warm_blocks_written_before_q8c(cli, built):
    q8 = (Grouping.PER_CHANNEL, 32, Grouping.PER_TOKEN, 32)
    q8c = (Grouping.PER_CHANNEL, 256, Grouping.PER_CHANNEL, 256)
    assert warm_layouts(built.path) == {q8c}                # the default since issue 13
    with TierManager(store_config(built.path, **{"tiers.warm_format": "q8"}),
                     background=False) as m:
        warm = [b for b, e in m.blocks().items() if e.tier == Tier.WARM]
        assert warm and all(m.recode(b) for b in warm)      # as a store from before q8c
    assert warm_layouts(built.path) == {q8}
    report = cli.json("compact")["steps"]["recode"]
    assert report["changed"] and report["warm"]["recoded"] == report["warm"]["stale"] > 0
    assert warm_layouts(built.path) == {q8c}
    assert not cli.json("compact")["steps"]["recode"]["changed"]
    assert_sound(built.path, [session_id(i) for i in range(1, N_SESSIONS + 1)])
