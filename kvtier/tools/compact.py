"""``kvtier compact``: offline garbage collection, expiry, demotion and file compaction.

Steps, in order (each re-reads the store, so a later step sees what an earlier one did):

1. ``scratch``  remove what a killed run left of an LMDB rewrite;
2. ``scrub``    (``--scrub``) read every block and drop those whose records fail their checksum;
3. ``repair``   the tier manager's repair: entries without data, unreferenced blocks, stale hashes,
                wrong reference counts, sequences naming lost blocks, orphaned records; then
                sessions whose sequence is gone;
4. ``expire``   sessions older than ``--max-age`` or beyond the ``--keep`` most recent, and
                sequences no session names that are older than ``--max-age``;
5. ``demote``   warm → cool → cold by the eviction policy until the warm and cool tiers are within
                their targets (the demoted blocks are re-encoded for their new tier);
6. ``rocksdb``  ``compact_range`` of the cool and cold column families, with blob garbage
                collection forced when deleted payloads still sit in blob files;
7. ``lmdb``     a compacted copy of the warm LMDB environment swapped in for the old file.

Crash safety: every step goes through the tier manager, which writes data before the catalog
entry naming it and deletes data only after the entry's removal commits, and repairs the store
when it opens one that was not closed cleanly. The LMDB rewrite replaces ``data.mdb`` with one
``rename`` of a complete, synced copy. So a kill at any moment leaves a store that opens and
verifies. A second run finds nothing to do: every step is a no-op on its own result.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

from tqdm import tqdm

from kvtier.config import parse_size
from kvtier.errors import BlockCorrupt, KvtierError
from kvtier.storage import policy
from kvtier.storage.manager import COLD, COOL, LOW_WATERMARK, TIER_NAMES, WARM, TierManager
from kvtier.storage.records import BlockId, Namespace
from kvtier.storage.tiers import LmdbTier, RocksTier, dir_bytes
from kvtier.tools.render import human_bytes, table
from kvtier.tools.store import StoreView, block_name
from kvtier.tools.verify import Kind, Problem, check_records, check_references, corrupt_blocks

log = logging.getLogger(__name__)

LMDB_REWRITE_MIN_FRACTION = 0.05
"""Rewrite the warm LMDB file only when at least this part of it is free pages (or forced):
LMDB reuses free pages, so a rewrite pays off only when many are free."""


@dataclass(frozen=True, slots=True)
class Target:
    """A tier's target size: a byte count, or a fraction of the tier's budget."""

    nbytes: int | None = None
    fraction: float | None = None

    def resolve(self, budget: int) -> int:
        return self.nbytes if self.nbytes is not None else int(budget * (self.fraction or 0.0))

    @classmethod
    def parse(cls, text: str) -> Target:
        """``"512MiB"``, ``"400000"`` or ``"50%"`` (of the tier's budget)."""
        text = text.strip()
        if text.endswith("%"):
            value = float(text[:-1])
            if not 0 <= value <= 100:
                raise ValueError(f"a percentage of the budget is 0..100, got {text!r}")
            return cls(fraction=value / 100)
        try:
            return cls(nbytes=parse_size(text, "target"))
        except KvtierError as exc:
            raise ValueError(str(exc)) from None


DEFAULT_TARGET = Target(fraction=LOW_WATERMARK)
"""What the server's background worker aims at: its low watermark of each tier's budget."""


@dataclass(frozen=True, slots=True)
class CompactOptions:
    max_age_s: float | None = None
    """Expire sessions unused (and unnamed sequences unchanged) for longer than this."""
    keep: int | None = None
    """Keep only this many sessions, the most recently used."""
    warm_target: Target = DEFAULT_TARGET
    cool_target: Target = DEFAULT_TARGET
    scrub: bool = False
    """Read every block first and drop those whose records are corrupt."""
    rewrite: bool = True
    """Compact the files (RocksDB compaction, LMDB rewrite)."""
    force_rewrite: bool = False
    """Rewrite the LMDB file even when few of its pages are free."""
    dry_run: bool = False
    progress: bool = False
    now: float | None = None
    """The time sessions' ages are measured at (default: now)."""


@dataclass(slots=True)
class CompactReport:
    dry_run: bool
    before: list[dict[str, Any]]
    after: list[dict[str, Any]] = field(default_factory=list)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    remaining_problems: dict[str, int] = field(default_factory=dict)
    """Reference problems compact does not fix (``inspect verify`` names them)."""
    repaired_at_open: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(step.get("changed") for step in self.steps.values())

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "changed": self.changed, "steps": self.steps,
                "before": self.before, "after": self.after,
                "remaining_problems": self.remaining_problems,
                "repaired_at_open": self.repaired_at_open}


@dataclass(slots=True)
class _Run:
    """One compaction: the store, the options, and in a dry run the simulated catalog that each
    planned step changes as the real step would, so that later steps plan on its result."""

    manager: TierManager
    options: CompactOptions
    now: float
    sim: StoreView | None

    def view(self) -> StoreView:
        return self.sim if self.sim is not None else StoreView.load(self.manager)

    @property
    def dry(self) -> bool:
        return self.sim is not None


def compact(manager: TierManager, options: CompactOptions) -> CompactReport:
    """Run (or, with ``options.dry_run``, plan) every step on an open store."""
    report = CompactReport(options.dry_run, _sizes(manager),
                           repaired_at_open={k: v for k, v in manager.repaired.items() if v})
    run = _Run(manager, options, options.now if options.now is not None else time.time(),
               StoreView.load(manager) if options.dry_run else None)
    steps: list[tuple[str, Callable[[_Run], dict[str, Any]]]] = [
        ("scratch", _scratch), ("scrub", _scrub), ("repair", _repair), ("expire", _expire),
        ("demote", _demote), ("rocksdb", _rocksdb), ("lmdb", _lmdb)]
    with tqdm(total=len(steps), desc="compact", unit="step", disable=not options.progress,
              leave=False) as bar:
        for name, step in steps:
            bar.set_postfix_str(name)
            log.debug("compact: %s", name)
            report.steps[name] = step(run)
            bar.update()
    if run.sim is not None:
        report.after = _simulated_sizes(run.sim)
        return report
    manager.flush_stats()
    report.after = _sizes(manager)
    report.remaining_problems = _count_kinds(check_references(manager,
                                                              StoreView.load(manager)))
    return report


def _sizes(manager: TierManager) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"name": s.name, "blocks": s.blocks,
                                   "stored_bytes": s.stored_bytes, "disk_bytes": s.disk_bytes}
                                  for s in manager.stats()]
    rows.append({"name": "catalog", "blocks": None, "stored_bytes": None,
                 "disk_bytes": dir_bytes(manager.catalog.path)})
    return rows


def _simulated_sizes(sim: StoreView) -> list[dict[str, Any]]:
    """Blocks and (estimated) stored bytes per tier after a dry run's plan; disk bytes unknown."""
    rows: list[dict[str, Any]] = [
        {"name": name, "blocks": sum(1 for e in sim.blocks.values() if e.tier == i),
         "stored_bytes": _used(sim, i), "disk_bytes": None}
        for i, name in enumerate(TIER_NAMES)]
    rows.append({"name": "catalog", "blocks": None, "stored_bytes": None, "disk_bytes": None})
    return rows


def _used(view: StoreView, tier: int) -> int:
    return sum(e.stored_bytes for e in view.blocks.values() if e.tier == tier)


def _count_kinds(problems: list[Problem]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in problems:
        counts[p.kind.value] = counts.get(p.kind.value, 0) + 1
    return counts


# -- steps -----------------------------------------------------------------------------------------
def _scratch(run: _Run) -> dict[str, Any]:
    path = warm_tier(run.manager).scratch_path
    if not path.exists():
        return {"changed": False, "bytes": 0}
    nbytes = dir_bytes(path)
    if not run.dry:
        shutil.rmtree(path)
    return {"changed": True, "path": str(path), "bytes": nbytes}


def _scrub(run: _Run) -> dict[str, Any]:
    if not run.options.scrub:
        return {"changed": False, "skipped": True}
    view = run.view()
    corrupt = corrupt_blocks(check_records(run.manager, view, progress=run.options.progress),
                             view)
    for block in corrupt:
        if run.sim is not None:
            del run.sim.blocks[block]
            continue
        try:
            run.manager.get_block(block)
        except BlockCorrupt:
            pass    # the manager forgets a block that fails its checksum
    return {"changed": bool(corrupt), "corrupt_blocks": [block_name(b) for b in corrupt]}


REPAIR_PASSES = 4
"""Repair until it finds nothing: truncating a sequence at a lost block leaves the blocks after
it unreferenced, which only the next pass collects."""


def _repair(run: _Run) -> dict[str, Any]:
    if run.sim is not None:
        problems = check_references(run.manager, run.sim)
        found = repair_plan(problems)
        doomed = {p.subject for p in problems
                  if p.kind in (Kind.MISSING_RECORD, Kind.UNREFERENCED_BLOCK)}
        for block in [b for b in run.sim.blocks if block_name(b) in doomed]:
            del run.sim.blocks[block]
    else:
        found = repair_until_clean(run.manager)
    view = run.view()
    dangling = sorted(s.session_id for s in view.sessions.values()
                      if view.sequence_of(s) is None)
    for session_id in dangling:
        if run.sim is not None:
            del run.sim.sessions[session_id]
        else:
            run.manager.delete_session(session_id)
    return {"changed": bool(found or dangling), "found": found, "dangling_sessions": dangling}


def repair_until_clean(manager: TierManager) -> dict[str, int]:
    """Run the manager's repair until a pass finds nothing; what all passes found."""
    found: dict[str, int] = {}
    for _ in range(REPAIR_PASSES):
        counts = {k: v for k, v in manager.repair().items() if v}
        for key, value in counts.items():
            found[key] = found.get(key, 0) + value
        if not counts:
            break
    return found


def repair_plan(problems: list[Problem]) -> dict[str, int]:
    """What the tier manager's repair would count for these problems (same keys), plus the
    reference counts it would correct."""
    subjects: dict[str, set[str]] = {}
    for p in problems:
        key = _REPAIRED_AS.get(p.kind)
        if key:
            subjects.setdefault(key, set()).add(p.subject)
    return {key: len(found) for key, found in subjects.items()}


_REPAIRED_AS = {Kind.MISSING_RECORD: "missing_blocks",
                Kind.UNREFERENCED_BLOCK: "unreferenced_blocks",
                Kind.ORPHAN_RECORD: "orphan_records", Kind.STALE_HASH: "stale_hashes",
                Kind.DANGLING_REFERENCE: "truncated_sequences",
                Kind.REFCOUNT_MISMATCH: "reference_counts"}


def expiry_plan(view: StoreView, options: CompactOptions, now: float
                ) -> tuple[list[str], list[tuple[bytes, int]]]:
    """Sessions to delete, and sequences without a session to delete, under ``options``."""
    ordered = sorted(view.sessions.values(), key=lambda s: (-s.last_used, s.session_id))
    expired: set[str] = set()
    if options.keep is not None:
        expired.update(s.session_id for s in ordered[options.keep:])
    if options.max_age_s is not None:
        expired.update(s.session_id for s in ordered if now - s.last_used > options.max_age_s)
    unnamed: list[tuple[bytes, int]] = []
    if options.max_age_s is not None:
        named = view.named_sequences()
        unnamed = sorted(key for key, seq in view.sequences.items()
                         if key not in named and now - seq.updated > options.max_age_s)
    return sorted(expired), unnamed


def released_blocks(view: StoreView, sessions: list[str], sequences: list[tuple[bytes, int]]
                    ) -> list[BlockId]:
    """Blocks no sequence would name once these sessions' and sequences' are deleted."""
    doomed = set(sequences) | {(view.sessions[s].namespace, view.sessions[s].sequence)
                               for s in sessions}
    refs = view.references()
    for key in doomed:
        seq = view.sequences.get(key)
        if seq is not None:
            refs.subtract(seq.block_ids())
    return sorted(b for b in view.blocks if refs[b] <= 0)


def _expire(run: _Run) -> dict[str, Any]:
    view = run.view()
    sessions, sequences = expiry_plan(view, run.options, run.now)
    freed = released_blocks(view, sessions, sequences)
    bytes_freed = {name: sum(view.blocks[b].stored_bytes for b in freed
                             if view.blocks[b].tier == i)
                   for i, name in enumerate(TIER_NAMES)}
    if run.sim is not None:
        for session_id in sessions:
            session = run.sim.sessions.pop(session_id)
            run.sim.sequences.pop((session.namespace, session.sequence), None)
        for key in sequences:
            run.sim.sequences.pop(key, None)
        for block in freed:
            del run.sim.blocks[block]
    else:
        for session_id in sessions:
            run.manager.delete_session(session_id)
        for namespace, sequence in sequences:
            run.manager.delete_sequence(Namespace(namespace), sequence)
    return {"changed": bool(sessions or sequences), "sessions": sessions,
            "sequences": len(sequences), "blocks_freed": len(freed), "bytes_freed": bytes_freed}


def demotion_victims(manager: TierManager, view: StoreView, tier: int, excess: int, now: float
                     ) -> list[BlockId]:
    """The blocks of ``tier`` the eviction policy moves out first, ``excess`` bytes' worth."""
    candidates = []
    for block, e in view.blocks.items():
        if e.tier != tier:
            continue
        score = policy.importance(e.attention, e.hits, e.last_access, now, manager.half_life_s)
        candidates.append((block, policy.eviction_priority(score, now - e.last_access, e.tier,
                                                           manager.weights), e.stored_bytes))
    return cast(list[BlockId], policy.choose_victims(candidates, excess))


def _demote(run: _Run) -> dict[str, Any]:
    manager = run.manager
    targets = {WARM: run.options.warm_target.resolve(manager.budgets[WARM]),
               COOL: run.options.cool_target.resolve(manager.budgets[COOL])}
    drops_before = manager.counters[COLD].drops
    out: dict[str, Any] = {}
    for tier, target in targets.items():
        view = run.view()
        used = _used(view, tier)
        victims = demotion_victims(manager, view, tier, used - target, run.now) \
            if used > target else []
        if run.sim is not None:
            _simulate_moves(run.sim, victims, tier + 1)
        else:
            for block in tqdm(victims, desc=f"demote {TIER_NAMES[tier]}", unit="block",
                              disable=not run.options.progress, leave=False):
                manager.move(block, tier + 1)
        out[TIER_NAMES[tier]] = {"target": target, "before": used, "blocks": len(victims),
                                 "after": _used(run.view(), tier)}
    out["dropped"] = manager.counters[COLD].drops - drops_before
    if out["dropped"]:    # sequences naming a dropped block are cut before it
        out["repaired"] = repair_until_clean(manager)
    out["changed"] = any(out[TIER_NAMES[t]]["blocks"] for t in targets)
    return out


def _simulate_moves(sim: StoreView, blocks: list[BlockId], dest: int) -> None:
    """Move blocks to ``dest`` in a dry run; their size there is estimated from the compression
    ratio of what ``dest`` holds (or of the blocks themselves when it holds nothing)."""
    held = [e for e in sim.blocks.values() if e.tier == dest]
    raw = sum(e.raw_bytes for e in held)
    ratio = sum(e.stored_bytes for e in held) / raw if raw else 1.0
    for block in blocks:
        e = sim.blocks[block]
        sim.blocks[block] = replace(e, tier=dest, stored_bytes=int(e.raw_bytes * ratio)
                                    if raw else e.stored_bytes)


def _rocksdb(run: _Run) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tier in run.manager.tiers:
        if not isinstance(tier, RocksTier):
            continue
        before = rocks_files(tier)
        if run.dry or not run.options.rewrite:
            out[tier.name] = {**before, "compacted": False}
            continue
        tier.compact()
        after = rocks_files(tier)
        out[tier.name] = {**before, "compacted": True,
                          "files_bytes_after": after["files_bytes"],
                          "changed": after["files_bytes"] != before["files_bytes"]
                          or before["blob_garbage_bytes"] > 0}
    out["changed"] = any(isinstance(v, dict) and v.get("changed") for v in out.values())
    return out


def rocks_files(tier: RocksTier) -> dict[str, int]:
    """Bytes of a column family's SST and blob files, the garbage in its blob files, and deletes
    still in its memtables (their payloads become blob garbage once compacted)."""
    prop = tier.cf.property_int_value
    return {"files_bytes": (prop("rocksdb.total-sst-files-size") or 0)
            + (prop("rocksdb.total-blob-file-size") or 0),
            "blob_garbage_bytes": prop("rocksdb.live-blob-file-garbage-size") or 0,
            "pending_deletes": (prop("rocksdb.num-deletes-active-mem-table") or 0)
            + (prop("rocksdb.num-deletes-imm-mem-tables") or 0)}


def warm_tier(manager: TierManager) -> LmdbTier:
    tier = manager.tiers[WARM]
    assert isinstance(tier, LmdbTier), "the warm tier is an LMDB environment"
    return tier


def _lmdb(run: _Run) -> dict[str, Any]:
    file_bytes, free_bytes = lmdb_free_bytes(warm_tier(run.manager))
    if run.sim is not None:     # pages the planned steps free
        free_bytes += max(0, run.manager.stats()[WARM].stored_bytes - _used(run.sim, WARM))
    worth = free_bytes > 0 and (run.options.force_rewrite
                                or free_bytes >= LMDB_REWRITE_MIN_FRACTION * file_bytes)
    out: dict[str, Any] = {"file_bytes": file_bytes, "free_bytes": free_bytes,
                           "rewritten": False, "changed": False}
    if not (worth and run.options.rewrite):
        return out
    if run.dry:
        out.update(would_rewrite=True, changed=True)
    else:
        warm_tier(run.manager).compact()
        out.update(rewritten=True, changed=True,
                   file_bytes_after=lmdb_free_bytes(warm_tier(run.manager))[0])
    return out


def lmdb_free_bytes(tier: LmdbTier) -> tuple[int, int]:
    """Bytes of the LMDB data file, and of its pages a compacted copy would not have (free
    pages and the free list's own pages)."""
    info, stat = tier.env.info(), tier.env.stat()
    pages = info["last_pgno"] + 1
    used = 2 + stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
    return pages * stat["psize"], max(0, pages - used) * stat["psize"]


# -- rendering -----------------------------------------------------------------------------------
def render(report: CompactReport) -> str:
    s = report.steps
    verb = "would " if report.dry_run else ""
    lines = [("dry run: nothing was changed" if report.dry_run else "compaction done")
             + ("" if report.changed else " (nothing to do)")]
    if s["scratch"].get("changed"):
        lines.append(f"- {verb}remove a leftover LMDB copy ({human_bytes(s['scratch']['bytes'])})")
    if s["scrub"].get("corrupt_blocks"):
        lines.append(f"- {verb}drop {len(s['scrub']['corrupt_blocks'])} corrupt blocks: "
                     + ", ".join(s["scrub"]["corrupt_blocks"][:10]))
    if s["repair"]["found"]:
        lines.append(f"- {verb}repair: " + ", ".join(
            f"{v} {k.replace('_', ' ')}" for k, v in s["repair"]["found"].items()))
    if s["repair"]["dangling_sessions"]:
        lines.append(f"- {verb}delete {len(s['repair']['dangling_sessions'])} sessions whose "
                     f"sequence is gone")
    e = s["expire"]
    if e["changed"]:
        lines.append(f"- {verb}expire {len(e['sessions'])} sessions and {e['sequences']} "
                     f"sequences without one, freeing {e['blocks_freed']} blocks ("
                     + ", ".join(f"{human_bytes(v)} {k}" for k, v in e["bytes_freed"].items()
                                 if v) + ")")
    d = s["demote"]
    for name in ("warm", "cool"):
        if d.get(name, {}).get("blocks"):
            x = d[name]
            lines.append(f"- {verb}demote {x['blocks']} blocks from {name}: "
                         f"{human_bytes(x['before'])} → {human_bytes(x['after'])} "
                         f"(target {human_bytes(x['target'])})")
    if d.get("dropped"):
        lines.append(f"- dropped {d['dropped']} blocks: the cold tier was full")
    for name, x in s["rocksdb"].items():
        if isinstance(x, dict) and x.get("changed"):
            lines.append(f"- compacted RocksDB {name}: files {human_bytes(x['files_bytes'])} → "
                         f"{human_bytes(x['files_bytes_after'])}")
        elif isinstance(x, dict) and report.dry_run and (x["blob_garbage_bytes"]
                                                         or x["pending_deletes"]):
            lines.append(f"- would compact RocksDB {name}: {human_bytes(x['blob_garbage_bytes'])}"
                         f" of blob garbage, {x['pending_deletes']} deletes not yet compacted")
    w = s["lmdb"]
    if w.get("rewritten"):
        lines.append(f"- rewrote the warm LMDB file: {human_bytes(w['file_bytes'])} → "
                     f"{human_bytes(w['file_bytes_after'])}")
    elif w.get("would_rewrite"):
        lines.append(f"- would rewrite the warm LMDB file, freeing about "
                     f"{human_bytes(w['free_bytes'])} (more once the steps above free pages)")
    lines += ["", render_sizes(report)]
    if report.remaining_problems:
        lines += ["", "problems compact does not fix (see `kvtier inspect verify`): " + ", ".join(
            f"{v} {k}" for k, v in report.remaining_problems.items())]
    return "\n".join(lines)


def render_sizes(report: CompactReport) -> str:
    """Blocks, stored bytes and disk bytes per tier, before and after (a dry run's "after" is
    its estimate, without disk bytes)."""
    def cell(value: int | None, key: str) -> str:
        if value is None:
            return ""
        return str(value) if key == "blocks" else human_bytes(value)

    rows = []
    for before, after in zip(report.before, report.after):
        change = "" if after["disk_bytes"] is None \
            else human_bytes(after["disk_bytes"] - before["disk_bytes"])
        rows.append([before["name"]] + [cell(row[key], key) for key in
                                        ("blocks", "stored_bytes", "disk_bytes")
                                        for row in (before, after)] + [change])
    totals = [sum(r["disk_bytes"] or 0 for r in rows_) for rows_ in (report.before, report.after)]
    rows.append(["total", "", "", "", "", human_bytes(totals[0]),
                 "" if report.dry_run else human_bytes(totals[1]),
                 "" if report.dry_run else human_bytes(totals[1] - totals[0])])
    return table(["", "BLOCKS", "AFTER", "STORED", "AFTER", "DISK", "AFTER", "CHANGE"], rows,
                 right=range(1, 8))
