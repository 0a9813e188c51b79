"""``kvtier compact``: offline garbage collection, expiry, demotion and file compaction.

Steps, in order (each re-reads the store, so a later step sees what an earlier one did):

1. ``scratch``  remove what a killed run left of an LMDB rewrite;
2. ``scrub``    (``--scrub``) read every block and drop those whose records fail their checksum;
3. ``repair``   the invariant checker's fix: entries without data, sequences naming lost blocks,
                unreferenced blocks, wrong reference counts, stale hashes, orphaned records;
                then sessions whose sequence is gone;
4. ``expire``   sessions older than ``--max-age`` or beyond the ``--keep`` most recent, and
                sequences no session names that are older than ``--max-age``;
5. ``demote``   warm → cool → cold in the server's eviction order until the warm and cool tiers
                are within their targets (the demoted blocks are re-encoded for their new tier);
6. ``recode``   blocks stored in another format than their tier's (cool and cold ``q4`` records
                after ``tiers.cold_format`` became ``q6q4``, warm ``q8`` ones after
                ``tiers.warm_format`` became ``q8c``) re-encoded in place;
7. ``rocksdb``  ``compact_range`` of the cool and cold column families, with blob garbage
                collection forced when deleted payloads still sit in blob files;
8. ``lmdb``     a compacted copy of the warm LMDB environment swapped in for the old file.

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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tqdm import tqdm

from kvtier.config import parse_size
from kvtier.errors import BlockCorrupt, KvtierError
from kvtier.storage import codec, policy
from kvtier.storage.balancer import LOW_WATERMARK
from kvtier.storage.checker import CheckReport, Kind, Repair, check_records, check_references
from kvtier.storage.index import candidate
from kvtier.storage.manager import TierManager
from kvtier.storage.records import BlockId, Namespace
from kvtier.storage.tiers import LmdbTier, RocksTier, Tier, dir_bytes
from kvtier.storage.view import StoreView, block_name
from kvtier.tools.render import human_bytes, table

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
    remote: bool = False
    """Also compact the remote tier (:mod:`kvtier.tools.remote`)."""


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
        return self.sim if self.sim is not None else self.manager.view()

    @property
    def dry(self) -> bool:
        return self.sim is not None


def compact(manager: TierManager, options: CompactOptions) -> CompactReport:
    """Run (or, with ``options.dry_run``, plan) every step on an open store."""
    report = CompactReport(options.dry_run, _sizes(manager),
                           repaired_at_open={k: v for k, v in manager.repaired.items() if v})
    run = _Run(manager, options, options.now if options.now is not None else time.time(),
               manager.view() if options.dry_run else None)
    steps: list[tuple[str, Callable[[_Run], dict[str, Any]]]] = [
        ("scratch", _scratch), ("scrub", _scrub), ("repair", _repair), ("expire", _expire),
        ("demote", _demote), ("recode", _recode), ("rocksdb", _rocksdb), ("lmdb", _lmdb),
        ("remote", _remote)]
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
    report.remaining_problems = manager.check(fix=False).counts()
    return report


def _remote(run: _Run) -> dict[str, Any]:
    if not run.options.remote or run.manager.remote is None:
        return {"changed": False}
    from kvtier.tools import remote
    return remote.compact(run.manager.remote, run.options.max_age_s, run.options.scrub,
                          run.dry, run.now)


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
        {"name": tier.label, "blocks": sum(1 for e in sim.blocks.values() if e.tier == tier),
         "stored_bytes": _used(sim, tier), "disk_bytes": None}
        for tier in Tier]
    rows.append({"name": "catalog", "blocks": None, "stored_bytes": None, "disk_bytes": None})
    return rows


def _used(view: StoreView, tier: Tier) -> int:
    return sum(e.stored_bytes for e in view.blocks.values() if e.tier == tier)


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
    if run.sim is not None:
        checked = CheckReport()
        check_records(run.sim, run.manager.tiers, checked, progress=run.options.progress)
        for block in checked.corrupt:
            del run.sim.blocks[block]
    else:
        checked = run.manager.check(fix=True, references=False, records=True,
                                    progress=run.options.progress)
    corrupt = sorted(checked.corrupt)
    return {"changed": bool(corrupt), "corrupt_blocks": [block_name(b) for b in corrupt]}


def _repair(run: _Run) -> dict[str, Any]:
    if run.sim is not None:
        checked = CheckReport()
        check_references(run.sim, run.manager.tiers, _budgets(run.manager), checked)
        _simulate_repair(run.sim, checked.repair)
        found = checked.repair.counts()
    else:
        checked = run.manager.check(fix=True)
        found = checked.fixed
    dangling = sorted(p.subject for p in checked.problems if p.kind is Kind.DANGLING_SESSION)
    for session_id in dangling:
        if run.sim is not None:
            del run.sim.sessions[session_id]
        else:
            run.manager.delete_session(session_id)
    return {"changed": bool(found or dangling), "found": found, "dangling_sessions": dangling}


def _simulate_repair(sim: StoreView, repair: Repair) -> None:
    for block in repair.missing + repair.unreferenced:
        del sim.blocks[block]
    for seq in repair.truncated:
        sim.sequences[(seq.namespace, seq.sequence)] = seq
    for block, refs in repair.refs.items():
        sim.blocks[block] = replace(sim.blocks[block], refs=refs)


def _budgets(manager: TierManager) -> dict[Tier, int]:
    return {tier: stat.budget for tier, stat in zip(Tier, manager.stats())}


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
    bytes_freed = {tier.label: sum(view.blocks[b].stored_bytes for b in freed
                                   if view.blocks[b].tier == tier)
                   for tier in Tier}
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


def demotion_victims(manager: TierManager, view: StoreView, tier: Tier, excess: int, now: float
                     ) -> list[BlockId]:
    """The blocks of ``tier`` the server's eviction ranking moves out first, ``excess`` bytes'
    worth."""
    candidates = [candidate(block, entry) for block, entry in view.blocks.items()
                  if entry.tier == tier]
    return policy.rank_victims(candidates, excess, now, manager.weights)


def _demote(run: _Run) -> dict[str, Any]:
    manager = run.manager
    budgets = _budgets(manager)
    targets = {Tier.WARM: run.options.warm_target.resolve(budgets[Tier.WARM]),
               Tier.COOL: run.options.cool_target.resolve(budgets[Tier.COOL])}
    drops_before = manager.stats()[Tier.COLD].drops
    out: dict[str, Any] = {}
    for tier, target in targets.items():
        view = run.view()
        used = _used(view, tier)
        victims = demotion_victims(manager, view, tier, used - target, run.now) \
            if used > target else []
        if run.sim is not None:
            _simulate_moves(run.sim, victims, Tier(tier + 1))
        else:
            for block in tqdm(victims, desc=f"demote {tier.label}", unit="block",
                              disable=not run.options.progress, leave=False):
                manager.move(block, Tier(tier + 1))
        out[tier.label] = {"target": target, "before": used, "blocks": len(victims),
                           "after": _used(run.view(), tier)}
    out["dropped"] = manager.stats()[Tier.COLD].drops - drops_before
    if out["dropped"]:    # sequences naming a dropped block are cut before it
        out["repaired"] = manager.check(fix=True).fixed
    out["changed"] = any(out[t.label]["blocks"] for t in targets)
    return out


def _simulate_moves(sim: StoreView, blocks: list[BlockId], dest: Tier) -> None:
    """Move blocks to ``dest`` in a dry run; their size there is estimated from the compression
    ratio of what ``dest`` holds (or of the blocks themselves when it holds nothing)."""
    held = [e for e in sim.blocks.values() if e.tier == dest]
    raw = sum(e.raw_bytes for e in held)
    ratio = sum(e.stored_bytes for e in held) / raw if raw else 1.0
    for block in blocks:
        e = sim.blocks[block]
        sim.blocks[block] = replace(e, tier=dest, stored_bytes=int(e.raw_bytes * ratio)
                                    if raw else e.stored_bytes)


def stale_blocks(manager: TierManager, view: StoreView, tier: Tier) -> list[BlockId]:
    """Blocks of ``tier`` whose first record is not in the tier's format (one header read each;
    a record that does not read is left to the scrub step and to readers)."""
    fmt = manager.formats[tier]
    stale = []
    for block, entry in view.blocks.items():
        if entry.tier != tier:
            continue
        record = manager.tiers[tier].get(block.record_keys(1)[0])
        try:
            if record is not None and not codec.in_format(codec.read_header(record), fmt):
                stale.append(block)
        except BlockCorrupt:
            continue
    return stale


def _recode(run: _Run) -> dict[str, Any]:
    manager = run.manager
    out: dict[str, Any] = {}
    for tier in Tier:
        stale = stale_blocks(manager, run.view(), tier)
        recoded = 0
        if run.sim is None:
            for block in tqdm(stale, desc=f"recode {tier.label}", unit="block",
                              disable=not run.options.progress, leave=False):
                recoded += manager.recode(block)
        out[tier.label] = {"stale": len(stale), "recoded": recoded}
    out["changed"] = any(out[t.label]["recoded"] for t in Tier)
    return out


def _rocksdb(run: _Run) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tier in run.manager.tiers:
        if not isinstance(tier, RocksTier):
            continue
        before = asdict(tier.file_stats())
        if run.dry or not run.options.rewrite:
            out[tier.name] = {**before, "compacted": False}
            continue
        tier.compact()
        after = asdict(tier.file_stats())
        out[tier.name] = {**before, "compacted": True,
                          "files_bytes_after": after["files_bytes"],
                          "changed": after["files_bytes"] != before["files_bytes"]
                          or before["blob_garbage_bytes"] > 0}
    out["changed"] = any(isinstance(v, dict) and v.get("changed") for v in out.values())
    return out


def warm_tier(manager: TierManager) -> LmdbTier:
    tier = manager.tiers[Tier.WARM]
    assert isinstance(tier, LmdbTier), "the warm tier is an LMDB environment"
    return tier


def _lmdb(run: _Run) -> dict[str, Any]:
    files = warm_tier(run.manager).file_stats()
    file_bytes, free_bytes = files.file_bytes, files.free_bytes
    if run.sim is not None:     # pages the planned steps free
        free_bytes += max(0, run.manager.stats()[Tier.WARM].stored_bytes
                          - _used(run.sim, Tier.WARM))
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
                   file_bytes_after=warm_tier(run.manager).file_stats().file_bytes)
    return out


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
    for name, x in s["recode"].items():
        if isinstance(x, dict) and x["stale"]:
            done = f"would re-encode {x['stale']}" if report.dry_run \
                else f"re-encoded {x['recoded']} of {x['stale']}"
            lines.append(f"- {done} {name} blocks stored in another format than the tier's")
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
    r = s.get("remote", {})
    if r.get("error"):
        lines.append(f"- the remote tier was not compacted: {r['error']}")
    elif r.get("changed") or "blocks" in r:
        lines.append(f"- remote tier: {verb}expire {r['expired_sessions']} sessions, drop "
                     f"{r['damaged_blocks']} damaged blocks, evict {r['evicted_blocks']}"
                     + (f"; {r['blocks']} blocks, {human_bytes(r['stored_bytes'])} remain"
                        if "blocks" in r else ""))
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
