"""``kvtier inspect verify``: read every block, check every checksum and every catalog reference.

References are checked both ways:

- block entry → its records, all layers, in the tier the entry names; record → an entry that puts
  it there (anything else is an orphan);
- sequence → block entries; block entry → the sequences naming it (its reference count);
- hash index → the block holding that content; block with a chain hash → the index entry for it,
  and the chain hash recomputed from its sequence's tokens;
- session → its sequence.

Every problem found is a :class:`Problem`; a store verifies when there are none.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from tqdm import tqdm

from kvtier.errors import BlockCorrupt, BlockMissing
from kvtier.storage import codec
from kvtier.storage.catalog import BlockEntry, SequenceEntry
from kvtier.storage.manager import TIER_NAMES, TierManager
from kvtier.storage.records import BlockId, ChainHash, chain_hash
from kvtier.tools.store import StoreView, block_name, namespace_prefix


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
class VerifyReport:
    problems: list[Problem] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    repaired_at_open: dict[str, int] = field(default_factory=dict)
    """What the tier manager repaired when it opened a store that was not closed cleanly."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind.value for p in self.problems))

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "problem_counts": self.counts(),
                "problems": [p.to_json() for p in self.problems],
                "repaired_at_open": self.repaired_at_open}


def sequence_name(namespace: bytes, sequence: int) -> str:
    return f"{namespace_prefix(namespace)}:{sequence}"


def verify(manager: TierManager, *, quick: bool = False, progress: bool = False
           ) -> VerifyReport:
    """Check references, then read every record (``quick``: verify checksums and headers
    without decoding payloads)."""
    view = StoreView.load(manager)
    report = VerifyReport(repaired_at_open={k: v for k, v in manager.repaired.items() if v})
    report.problems.extend(check_references(manager, view, report.checked))
    report.problems.extend(check_records(manager, view, report.checked, quick=quick,
                                         progress=progress))
    return report


def check_references(manager: TierManager, view: StoreView,
                     checked: dict[str, int] | None = None) -> list[Problem]:
    """Every catalog reference, both ways, plus tier budgets. Reads keys, never record data."""
    problems: list[Problem] = []
    present: dict[BlockId, set[int]] = defaultdict(set)
    n_keys = 0
    for index, tier in enumerate(manager.tiers):
        for key in tier.keys():
            n_keys += 1
            orphan = _orphan_reason(view, index, key)
            if orphan:
                problems.append(Problem(Kind.ORPHAN_RECORD, key.hex(), orphan,
                                        tier=TIER_NAMES[index]))
            else:
                present[BlockId.from_bytes(key[:BlockId.BYTES])].add(_layer_of(key))

    refs = view.references()
    for block, entry in view.blocks.items():
        have = present.get(block, set())
        if len(have) < entry.n_layers:
            missing = sorted(set(range(entry.n_layers)) - have)
            problems.append(Problem(Kind.MISSING_RECORD, block_name(block),
                                    f"layers {_ranges(missing)} of {entry.n_layers} are not in "
                                    f"{TIER_NAMES[entry.tier]}", tier=TIER_NAMES[entry.tier]))
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
        elif view.hash_key(block, target) != key:
            problems.append(Problem(Kind.STALE_HASH, key.hex(),
                                    f"points at {block_name(block)}, whose chain hash differs"))

    for seq in view.sequences.values():
        problems.extend(_check_sequence(view, seq))

    for session in view.sessions.values():
        if view.sequence_of(session) is None:
            gone = sequence_name(session.namespace, session.sequence)
            problems.append(Problem(Kind.DANGLING_SESSION, session.session_id,
                                    f"names sequence {gone}, which does not exist"))

    for stat in manager.stats():
        if stat.stored_bytes > stat.budget:
            problems.append(Problem(Kind.OVER_BUDGET, stat.name,
                                    f"holds {stat.stored_bytes} bytes, budget {stat.budget}",
                                    tier=stat.name))
    if checked is not None:
        checked.update(blocks=len(view.blocks), record_keys=n_keys,
                       sequences=len(view.sequences), sessions=len(view.sessions),
                       hashes=len(view.hashes))
    return problems


def _layer_of(key: bytes) -> int:
    return int.from_bytes(key[BlockId.BYTES:], "big")


def _orphan_reason(view: StoreView, tier: int, key: bytes) -> str:
    if len(key) != BlockId.BYTES + 2:
        return f"a {len(key)}-byte key is no record key"
    block = BlockId.from_bytes(key[:BlockId.BYTES])
    entry = view.blocks.get(block)
    layer = _layer_of(key)
    if entry is None:
        return f"layer {layer} of {block_name(block)}, which has no entry"
    if entry.tier != tier:
        return f"layer {layer} of {block_name(block)}, which lives in {TIER_NAMES[entry.tier]}"
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


def check_records(manager: TierManager, view: StoreView, checked: dict[str, int] | None = None,
                  *, quick: bool = False, progress: bool = False) -> list[Problem]:
    """Read every layer of every block from its tier and check it against its entry."""
    problems: list[Problem] = []
    n_records = 0
    blocks = sorted(view.blocks.items(), key=lambda item: (item[1].tier, item[0]))
    with tqdm(total=len(blocks), unit="block", desc="verify", disable=not progress,
              leave=False) as bar:
        for block, entry in blocks:
            found, n_read = _check_block(manager, block, entry, quick)
            problems.extend(found)
            n_records += n_read
            bar.update()
    if checked is not None:
        checked["records_read"] = n_records
    return problems


def _check_block(manager: TierManager, block: BlockId, entry: BlockEntry, quick: bool
                 ) -> tuple[list[Problem], int]:
    """Problems of one block, and the number of records read."""
    name = block_name(block)
    try:
        tier, values = manager.read_records(block)
    except BlockMissing:
        return [], 0
    tier_name = TIER_NAMES[tier]
    problems: list[Problem] = []
    stored = 0
    for layer, value in enumerate(values):
        if value is None:
            continue    # reported as a missing record by the reference check
        stored += manager.tiers[tier].stored_bytes(len(value))
        try:
            header = codec.read_header(value) if quick else codec.decode_record(value)[0]
        except BlockCorrupt as exc:
            problems.append(Problem(Kind.CORRUPT_RECORD, name, str(exc), tier_name, layer))
            continue
        except Exception as exc:  # a record that passes its checksum but breaks the decoder
            problems.append(Problem(Kind.CORRUPT_RECORD, name, f"undecodable: {exc!r}",
                                    tier_name, layer))
            continue
        if header.n_tokens != entry.n_tokens:
            problems.append(Problem(Kind.RECORD_MISMATCH, name,
                                    f"record holds {header.n_tokens} tokens, entry says "
                                    f"{entry.n_tokens}", tier_name, layer))
    if all(v is not None for v in values) and stored != entry.stored_bytes:
        problems.append(Problem(Kind.RECORD_MISMATCH, name,
                                f"records cost {stored} bytes, entry says {entry.stored_bytes}",
                                tier_name))
    return problems, sum(v is not None for v in values)


def corrupt_blocks(problems: list[Problem], view: StoreView) -> list[BlockId]:
    """The blocks that ``problems`` show to have unreadable records."""
    by_name = {block_name(b): b for b in view.blocks}
    return sorted({by_name[p.subject] for p in problems
                   if p.kind is Kind.CORRUPT_RECORD and p.subject in by_name})


def _ranges(values: list[int]) -> str:
    """Sorted ``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
