"""The invariant checker: one walk over a store that finds every way the catalog and the tiers
disagree, and with ``fix`` repairs what can be repaired.

References are checked both ways:

- block entry → its records, all layers, in the tier the entry names; record → an entry that puts
  it there (anything else is an orphan);
- sequence → block entries; block entry → the sequences naming it (its reference count);
- hash index → the block holding that content; block with a chain hash → the index entry for it,
  and the chain hash recomputed from its sequence's tokens;
- session → its sequence; tier → its budget.

Reading the records (``records=True``) checks every checksum and header against its entry.

Fixing (the tier manager does it when it opens a store that was not closed cleanly; ``kvtier
compact`` does it on demand) drops entries whose records are missing (and, when records were read,
blocks that fail their checksum), cuts sequences before their first lost block, drops blocks no
sequence names any more, corrects reference counts, deletes hash entries leading nowhere and
records no entry places. It never deletes sessions: one whose sequence is gone still holds its
messages. :class:`Repair` is what fixing changes, computed whether or not it is applied.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
from tqdm import tqdm

from kvtier.errors import BlockCorrupt, TierDamaged
from kvtier.storage import codec
from kvtier.storage.catalog import BlockEntry, SequenceEntry
from kvtier.storage.placement import Placement
from kvtier.storage.records import NAMESPACE_BYTES, BlockId, ChainHash, Namespace, chain_hash
from kvtier.storage.tiers import Tier, TierStore
from kvtier.storage.view import StoreView, block_name, sequence_name


class Kind(str, Enum):
    CORRUPT_RECORD = "corrupt_record"
    """A record fails its checksum or cannot be decoded."""
    RECORD_MISMATCH = "record_mismatch"
    """A record decodes but disagrees with its catalog entry (token count, stored size)."""
    MISSING_RECORD = "missing_record"
    """A block entry names a tier that lacks some of its layers."""
    ORPHAN_RECORD = "orphan_record"
    """A record no block entry places where it is."""
    DANGLING_REFERENCE = "dangling_reference"
    """A sequence names a block that has no entry."""
    UNREFERENCED_BLOCK = "unreferenced_block"
    """A block entry no sequence names."""
    REFCOUNT_MISMATCH = "refcount_mismatch"
    """A block entry's reference count differs from the sequences naming it."""
    STALE_HASH = "stale_hash"
    """The hash index points at a missing block, or at one with other content."""
    UNINDEXED_BLOCK = "unindexed_block"
    """A full block with a chain hash that the hash index does not lead to."""
    CHAIN_MISMATCH = "chain_mismatch"
    """A block's chain hash is not the hash of its sequence's tokens."""
    TOKEN_MISMATCH = "token_mismatch"
    """A sequence's blocks hold more tokens than the sequence has."""
    DANGLING_SESSION = "dangling_session"
    """A session names a sequence that does not exist."""
    OVER_BUDGET = "over_budget"
    """A tier holds more bytes than its budget."""
    DAMAGED_TIER = "damaged_tier"
    """A tier's files cannot be walked (a damaged SST or blob file), or a tier or the catalog
    could not be opened and was moved aside when the store opened."""


@dataclass(frozen=True, slots=True)
class Problem:
    kind: Kind
    subject: str
    """The block (``NSPREFIX:SEQ:BLOCK``), sequence (``NSPREFIX:SEQ``), session id, record key
    (hex) or tier the problem is about."""
    detail: str
    tier: str | None = None
    layer: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        return data


@dataclass(slots=True)
class Repair:
    """What fixing the reference problems changes."""

    missing: list[BlockId] = field(default_factory=list)
    """Entries whose records are (partly) gone: dropped."""
    truncated: list[SequenceEntry] = field(default_factory=list)
    """Sequences cut before their first lost block, as they will be stored."""
    unreferenced: list[BlockId] = field(default_factory=list)
    """Entries no sequence names once the sequences are cut: dropped."""
    refs: dict[BlockId, int] = field(default_factory=dict)
    """Reference counts to correct."""
    stale_hashes: list[bytes] = field(default_factory=list)
    """Hash-index keys whose block has no entry."""
    orphans: dict[Tier, list[bytes]] = field(default_factory=dict)
    """Records no entry places where they are."""

    def counts(self) -> dict[str, int]:
        """How many of each repair, those that are not zero."""
        counts = {"missing_blocks": len(self.missing),
                  "truncated_sequences": len(self.truncated),
                  "unreferenced_blocks": len(self.unreferenced),
                  "reference_counts": len(self.refs), "stale_hashes": len(self.stale_hashes),
                  "orphan_records": sum(len(keys) for keys in self.orphans.values())}
        return {key: n for key, n in counts.items() if n}


@dataclass(slots=True)
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    repair: Repair = field(default_factory=Repair)
    corrupt: list[BlockId] = field(default_factory=list)
    """Blocks with unreadable records (when records were read)."""
    damaged: list[Tier] = field(default_factory=list)
    """Tiers whose key walk failed: rebuilt by the tier manager's fix."""
    fixed: dict[str, int] = field(default_factory=dict)
    """What was repaired (with ``fix``): the repair's counts, and ``corrupt_blocks``."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind.value for p in self.problems))


# -- references -----------------------------------------------------------------------------------
def check_references(view: StoreView, tiers: Sequence[TierStore], budgets: Mapping[Tier, int],
                     report: CheckReport, walk: bool = True) -> None:
    """Every catalog reference, both ways, plus tier budgets, into ``report`` (its problems,
    counts and repair). Reads record keys, never record data; ``walk=False`` reads the catalog
    alone (records are taken to be where their entries say, orphans are not looked for)."""
    problems, repair = report.problems, report.repair
    present: dict[BlockId, set[int]] = defaultdict(set)
    n_keys = 0
    for tier in Tier if walk else ():
        orphans: list[bytes] = []
        try:
            for key in tiers[tier].keys():
                n_keys += 1
                orphan = _orphan_reason(view, tier, key)
                if orphan:
                    problems.append(Problem(Kind.ORPHAN_RECORD, key.hex(), orphan,
                                            tier=tier.label))
                    orphans.append(key)
                else:
                    present[BlockId.from_bytes(key[:BlockId.BYTES])].add(_layer_of(key))
        except TierDamaged as exc:
            # What the walk saw is not all there is: judge none of this tier's records by it.
            problems.append(Problem(Kind.DAMAGED_TIER, tier.label,
                                    f"its files cannot be walked: {exc}", tier=tier.label))
            report.damaged.append(tier)
            continue
        if orphans:
            repair.orphans[tier] = orphans

    refs = view.references()
    for block, entry in view.blocks.items():
        have = present.get(block, set())
        if entry.tier in report.damaged or not walk:
            pass
        elif len(have) < entry.n_layers:
            missing = sorted(set(range(entry.n_layers)) - have)
            problems.append(Problem(Kind.MISSING_RECORD, block_name(block),
                                    f"layers {_ranges(missing)} of {entry.n_layers} are not in "
                                    f"{entry.tier.label}", tier=entry.tier.label))
            repair.missing.append(block)
        if refs[block] == 0:
            problems.append(Problem(Kind.UNREFERENCED_BLOCK, block_name(block),
                                    "no sequence names this block"))
        elif refs[block] != entry.refs:
            problems.append(Problem(Kind.REFCOUNT_MISMATCH, block_name(block),
                                    f"entry says {entry.refs} references, sequences make "
                                    f"{refs[block]}"))
        if entry.chain and view.hashes.get(view.hash_key(block, entry)) != block:
            problems.append(Problem(Kind.UNINDEXED_BLOCK, block_name(block),
                                    "the hash index does not lead to this full block"))

    for key, block in view.hashes.items():
        target = view.blocks.get(block)
        if target is None:
            problems.append(Problem(Kind.STALE_HASH, key.hex(),
                                    f"points at {block_name(block)}, which has no entry"))
            repair.stale_hashes.append(key)
        elif view.hash_key(block, target) != key:
            problems.append(Problem(Kind.STALE_HASH, key.hex(),
                                    f"points at {block_name(block)}, whose chain hash differs"))

    for seq in view.sequences.values():
        problems.extend(_check_sequence(view, seq))
    _plan_references(view, repair)

    for session in view.sessions.values():
        if view.sequence_of(session) is None:
            gone = sequence_name(session.namespace, session.sequence)
            problems.append(Problem(Kind.DANGLING_SESSION, session.session_id,
                                    f"names sequence {gone}, which does not exist"))

    for tier in Tier:
        stored = sum(e.stored_bytes for e in view.blocks.values() if e.tier == tier)
        if stored > budgets[tier]:
            problems.append(Problem(Kind.OVER_BUDGET, tier.label,
                                    f"holds {stored} bytes, budget {budgets[tier]}",
                                    tier=tier.label))
    report.checked.update(blocks=len(view.blocks), record_keys=n_keys,
                          sequences=len(view.sequences), sessions=len(view.sessions),
                          hashes=len(view.hashes))


def _plan_references(view: StoreView, repair: Repair) -> None:
    """Cut sequences before their first block that has no entry or is dropped, then drop what
    no cut sequence names and correct the other reference counts."""
    lost = set(repair.missing)
    referenced: Counter[BlockId] = Counter()
    for seq in view.sequences.values():
        ids = seq.block_ids()
        keep = next((i for i, b in enumerate(ids) if b not in view.blocks or b in lost), len(ids))
        if keep < len(ids):
            repair.truncated.append(replace(seq, blocks=seq.blocks[:keep]))
        referenced.update(ids[:keep])
    for block, entry in view.blocks.items():
        if block in lost:
            continue
        if referenced[block] == 0:
            repair.unreferenced.append(block)
        elif referenced[block] != entry.refs:
            repair.refs[block] = referenced[block]


def _layer_of(key: bytes) -> int:
    return int.from_bytes(key[BlockId.BYTES:], "big")


def _orphan_reason(view: StoreView, tier: Tier, key: bytes) -> str:
    if len(key) != BlockId.BYTES + 2:
        return f"a {len(key)}-byte key is no record key"
    block = BlockId.from_bytes(key[:BlockId.BYTES])
    entry = view.blocks.get(block)
    layer = _layer_of(key)
    if entry is None:
        return f"layer {layer} of {block_name(block)}, which has no entry"
    if entry.tier != tier:
        return f"layer {layer} of {block_name(block)}, which lives in {entry.tier.label}"
    if layer >= entry.n_layers:
        return f"layer {layer} of {block_name(block)}, which has {entry.n_layers} layers"
    return ""


def _check_sequence(view: StoreView, seq: SequenceEntry) -> list[Problem]:
    problems = []
    name = sequence_name(seq.namespace, seq.sequence)
    tokens = np.frombuffer(seq.tokens, dtype="<i4")
    parent: ChainHash | None = None
    position = 0
    for index, block in enumerate(seq.block_ids()):
        entry = view.blocks.get(block)
        if entry is None:
            problems.append(Problem(Kind.DANGLING_REFERENCE, name,
                                    f"block {index} is {block_name(block)}, which has no entry"))
            parent = None
            continue
        end = position + entry.n_tokens
        if entry.chain and end <= len(tokens):
            expected = chain_hash(parent, tokens[position:end])
            if expected != entry.chain:
                problems.append(Problem(Kind.CHAIN_MISMATCH, block_name(block),
                                        f"its chain hash is not that of tokens {position}.."
                                        f"{end} of sequence {name}"))
        parent = ChainHash(entry.chain) if entry.chain else None
        position = end
    if position > len(tokens):
        problems.append(Problem(Kind.TOKEN_MISMATCH, name,
                                f"its blocks hold {position} tokens, the sequence {len(tokens)}"))
    return problems


def _ranges(values: list[int]) -> str:
    """Sorted ``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# -- records --------------------------------------------------------------------------------------
def check_records(view: StoreView, tiers: Sequence[TierStore], report: CheckReport, *,
                  quick: bool = False, progress: bool = False) -> None:
    """Read every layer of every block from its tier and check it against its entry (``quick``:
    checksums and headers, without decoding payloads), into ``report``."""
    n_records = 0
    blocks = sorted(view.blocks.items(), key=lambda item: (item[1].tier, item[0]))
    with tqdm(total=len(blocks), unit="block", desc="verify", disable=not progress,
              leave=False) as bar:
        for block, entry in blocks:
            try:
                values = tiers[entry.tier].get_many(block.record_keys(entry.n_layers))
            except BlockCorrupt as exc:     # the tier cannot read the block at all
                report.problems.append(Problem(Kind.CORRUPT_RECORD, block_name(block),
                                               f"unreadable: {exc}", entry.tier.label))
                report.corrupt.append(block)
                bar.update()
                continue
            found = _check_block(tiers[entry.tier], block, entry, values, quick)
            report.problems.extend(found)
            if any(p.kind is Kind.CORRUPT_RECORD for p in found):
                report.corrupt.append(block)
            n_records += sum(v is not None for v in values)
            bar.update()
    report.checked["records_read"] = n_records


def _check_block(tier: TierStore, block: BlockId, entry: BlockEntry,
                 values: list[bytes | None], quick: bool) -> list[Problem]:
    name, label = block_name(block), entry.tier.label
    problems: list[Problem] = []
    stored = 0
    for layer, value in enumerate(values):
        if value is None:
            continue    # reported as a missing record by the reference check
        stored += tier.stored_bytes(len(value))
        try:
            header = codec.read_header(value) if quick else codec.decode_record(value)[0]
        except BlockCorrupt as exc:
            problems.append(Problem(Kind.CORRUPT_RECORD, name, str(exc), label, layer))
            continue
        except Exception as exc:  # a record that passes its checksum but breaks the decoder
            problems.append(Problem(Kind.CORRUPT_RECORD, name, f"undecodable: {exc!r}", label,
                                    layer))
            continue
        # A sliding-window layer holds only the rows of the block still in its window.
        if header.n_tokens > entry.n_tokens:
            problems.append(Problem(Kind.RECORD_MISMATCH, name,
                                    f"record holds {header.n_tokens} tokens, more than "
                                    f"the entry's {entry.n_tokens}", label, layer))
    if all(v is not None for v in values) and stored != entry.stored_bytes:
        problems.append(Problem(Kind.RECORD_MISMATCH, name,
                                f"records cost {stored} bytes, entry says {entry.stored_bytes}",
                                label))
    return problems


# -- the walk, and the fix ------------------------------------------------------------------------
def check(placement: Placement, budgets: Mapping[Tier, int], *, fix: bool,
          references: bool = True, records: bool = False, quick: bool = False,
          progress: bool = False, walk: bool = True) -> CheckReport:
    """Check the store (its references, and with ``records`` every record); with ``fix``,
    repair it: corrupt blocks first, then the references as they are after that. Fix only a
    store nothing else changes meanwhile (when it opens, or offline): the repair is planned
    from one view of it. ``walk=False``: the catalog alone (see :func:`check_references`)."""
    report = CheckReport()
    if records:
        check_records(StoreView.load(placement), placement.tiers, report, quick=quick,
                      progress=progress)
        if fix and report.corrupt:
            _forget_corrupt(placement, report.corrupt)
            report.fixed["corrupt_blocks"] = len(report.corrupt)
    if references:
        found = CheckReport()
        check_references(StoreView.load(placement), placement.tiers, budgets, found, walk)
        report.problems[:0] = found.problems
        report.checked.update(found.checked)
        report.repair = found.repair
        report.damaged = found.damaged
        if fix:
            _apply(placement, found.repair)
            report.fixed.update(found.repair.counts())
    return report


def _forget_corrupt(placement: Placement, blocks: list[BlockId]) -> None:
    with placement.index.lock:
        for block in blocks:
            entry = placement.index.get(block)
            if entry is not None:
                placement.index.counters[entry.tier].corrupt += 1
        placement.forget(blocks)


def _apply(placement: Placement, repair: Repair) -> None:
    index = placement.index
    with index.lock:
        recounted = {block: replace(entry, refs=repair.refs[block]) for block in repair.refs
                     if (entry := index.get(block)) is not None}
        with placement.catalog.write() as txn:
            for block in repair.missing + repair.unreferenced:
                placement.unlink(txn, block)
            for seq in repair.truncated:
                txn.put_sequence(seq)
            for block, entry in recounted.items():
                txn.put_block(block, entry)
            for key in repair.stale_hashes:
                txn.delete_hash(Namespace(key[:NAMESPACE_BYTES]), key[NAMESPACE_BYTES:])
        for block, entry in recounted.items():
            index.add(block, entry)
        for key in repair.stale_hashes:
            index.drop_hash(key)
    for tier, keys in repair.orphans.items():
        placement.tiers[tier].delete(keys)
