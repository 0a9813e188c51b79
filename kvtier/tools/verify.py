"""``kvtier inspect verify``: the tier manager's invariant checker, without fixing anything, over
every catalog reference and every record (see :mod:`kvtier.storage.checker` for what it checks).

Every problem found is a :class:`~kvtier.storage.checker.Problem`; a store verifies when there are
none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvtier.storage.checker import CheckReport, Kind, Problem
from kvtier.storage.manager import TierManager
from kvtier.tools.render import table


@dataclass(slots=True)
class VerifyReport:
    check: CheckReport
    repaired_at_open: dict[str, int] = field(default_factory=dict)
    """What the tier manager repaired when it opened a store that was not closed cleanly."""

    @property
    def ok(self) -> bool:
        return self.check.ok

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.check.checked,
                "problem_counts": self.check.counts(),
                "problems": [p.to_json() for p in self.check.problems],
                "repaired_at_open": self.repaired_at_open}


def verify(manager: TierManager, *, quick: bool = False, progress: bool = False
           ) -> VerifyReport:
    """Check references, then read every record (``quick``: verify checksums and headers
    without decoding payloads)."""
    report = manager.check(fix=False, records=True, quick=quick, progress=progress)
    # Parts found damaged when the store opened were moved aside and recreated (and what they
    # held repaired around): still a problem to report, once.
    report.problems[:0] = [Problem(Kind.DAMAGED_TIER, part, reason,
                                   tier=None if part == "catalog" else part)
                           for part, reason in manager.degraded.items()]
    return VerifyReport(report, dict(manager.repaired))


def render(report: VerifyReport) -> str:
    c = report.check.checked
    lines = [f"checked {c.get('blocks', 0)} blocks ({c.get('records_read', 0)} records read, "
             f"{c.get('record_keys', 0)} record keys), {c.get('sequences', 0)} sequences, "
             f"{c.get('sessions', 0)} sessions, {c.get('hashes', 0)} hash entries"]
    if report.repaired_at_open:
        lines.append("repaired when opened (it was not closed cleanly): " + ", ".join(
            f"{v} {k.replace('_', ' ')}" for k, v in report.repaired_at_open.items()))
    if report.ok:
        lines.append("ok: no problems")
        return "\n".join(lines)
    problems = report.check.problems
    rows = [[p.kind.value, p.subject, p.tier or "", "" if p.layer is None else p.layer, p.detail]
            for p in problems]
    lines += [table(["PROBLEM", "SUBJECT", "TIER", "LAYER", "DETAIL"], rows),
              f"{len(problems)} problems: " + ", ".join(
                  f"{v} {k}" for k, v in report.check.counts().items()),
              "`kvtier compact` repairs references and orphans; `kvtier compact --scrub` also "
              "drops corrupt blocks"]
    return "\n".join(lines)
