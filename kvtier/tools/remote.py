"""The remote tier in the tools: ``kvtier inspect remote`` (summary, ``--check`` verifies every
record) and the ``remote`` step of ``kvtier compact`` (expire sessions, drop damaged blocks,
rebuild the byte count and the use index, evict to the budget).

The remote tier is shared: these act on what every server stored, so run them from one place.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from kvtier.errors import BlockCorrupt, KvtierError, RemoteUnavailable
from kvtier.storage import codec
from kvtier.storage.remote import RemoteBlock
from kvtier.storage.remote_link import RemoteLink
from kvtier.tools.render import human_bytes, table


def _blocks(link: RemoteLink) -> list[RemoteBlock]:
    return [RemoteBlock.from_redis_key(k) for k in link.tier.block_keys()]


def summary(link: RemoteLink, check: bool = False) -> dict[str, Any]:
    """What the remote tier holds: blocks per namespace, bytes, sessions, leases; with
    ``check``, every block read and its records verified (checksums, headers, payloads)."""
    t = link.tier
    blocks = _blocks(link)
    metas = t.metas(blocks)
    per_ns: Counter[str] = Counter()
    stored = 0
    for block, meta in zip(blocks, metas):
        per_ns[block.namespace.hex()] += 1
        stored += meta.stored_bytes if meta else 0
    out: dict[str, Any] = {
        "url": link.redis.url, "blocks": len(blocks), "stored_bytes": stored,
        "counted_bytes": t.stored(), "budget": t.budget, "ttl_s": t.ttl_ms / 1000,
        "namespaces": dict(sorted(per_ns.items())),
        "sessions": sorted(link.catalog.keys()), "leases": link.catalog.leases()}
    if check:
        out["check"] = verify(link, blocks)
    return out


def verify(link: RemoteLink, blocks: list[RemoteBlock] | None = None) -> dict[str, Any]:
    """Read every block and decode every record; the damaged ones by Redis key."""
    blocks = _blocks(link) if blocks is None else blocks
    damaged: list[str] = []
    missing = 0
    for block in blocks:
        got = link.tier.get_blocks([block], touch=False)[0]
        if got is None:
            missing += 1     # expired or evicted while we walked
            continue
        try:
            for record in got[1]:
                codec.decode_record(record)
        except (BlockCorrupt, KvtierError, ValueError):
            damaged.append(block.redis_key.decode())
    return {"blocks": len(blocks), "damaged": damaged, "gone_meanwhile": missing,
            "ok": not damaged}


def render_summary(data: dict[str, Any]) -> str:
    lines = [f"remote     {data['url']}",
             f"blocks     {data['blocks']} ({human_bytes(data['stored_bytes'])} stored, "
             f"{human_bytes(data['counted_bytes'])} counted, budget "
             f"{human_bytes(data['budget'])}, expiry {data['ttl_s']:g} s after last use)",
             f"sessions   {len(data['sessions'])}, {len(data['leases'])} leased now", ""]
    lines.append(table(["NAMESPACE", "BLOCKS"], [[ns[:8], n] for ns, n in
                                                 data["namespaces"].items()], right=[1]))
    if "check" in data:
        c = data["check"]
        lines += ["", f"check      {c['blocks']} blocks read, {len(c['damaged'])} damaged"
                  + "".join(f"\n  {key}" for key in c["damaged"])]
    return "\n".join(lines)


def compact(link: RemoteLink, max_age_s: float | None, scrub: bool, dry_run: bool,
            now: float | None = None) -> dict[str, Any]:
    """The remote step of ``kvtier compact``: sessions unused for ``max_age_s`` are deleted,
    damaged blocks too (``scrub``), the byte count and use index are rebuilt from the blocks
    (expiry and concurrent writers make them drift) and the least recently used blocks are
    evicted to the budget."""
    now = time.time() if now is None else now
    try:
        expired = []
        if max_age_s is not None:
            for key in link.catalog.keys():
                session = link.catalog.get(key)
                if session is not None and now - session.last_used > max_age_s:
                    expired.append(key)
        damaged = verify(link)["damaged"] if scrub else []
        if dry_run:
            return {"changed": bool(expired or damaged), "expired_sessions": len(expired),
                    "damaged_blocks": len(damaged), "evicted_blocks": 0}
        for key in expired:
            link.catalog.delete(key)
        link.tier.delete_blocks([RemoteBlock.from_redis_key(k.encode()) for k in damaged])
        blocks, total = link.tier.recount()
        evicted = link.tier.enforce_budget()
    except RemoteUnavailable as exc:
        return {"changed": False, "error": str(exc)}
    return {"changed": bool(expired or damaged or evicted), "expired_sessions": len(expired),
            "damaged_blocks": len(damaged), "evicted_blocks": evicted, "blocks": blocks,
            "stored_bytes": total}
