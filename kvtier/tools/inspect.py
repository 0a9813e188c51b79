"""``kvtier inspect``: what a store holds, as plain data (for ``--json``) and as text tables.

Each view is a function from an open store to JSON-able data, and a ``render_*`` function from that
data to text, so that the human output never shows anything the JSON does not hold.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtier.errors import BlockCorrupt, BlockMissing, SessionNotFound
from kvtier.ggml import type_name
from kvtier.storage import codec, policy
from kvtier.storage.catalog import BlockEntry, SessionEntry
from kvtier.storage.codec import RecordFormat, RecordHeader, TensorHeader
from kvtier.storage.index import candidate
from kvtier.storage.manager import TierManager
from kvtier.storage.quant import Encoding, Grouping
from kvtier.storage.records import BlockId, LayerKV, TensorRows
from kvtier.storage.tiers import Tier, dir_bytes
from kvtier.storage.view import StoreView, block_name
from kvtier.tools.render import human_bytes, human_time, percent, ratio, table
from kvtier.tools.store import describe_namespace

MESSAGE_PREVIEW = 160
"""Characters of each message shown by ``inspect session`` (``--full`` shows all)."""


# -- summary -------------------------------------------------------------------------------------
def summary(manager: TierManager, view: StoreView) -> dict[str, Any]:
    config = manager.config
    paths = (config.warm_path, config.cool_path, config.cold_path)
    tiers = [{"name": s.name, "path": str(path), "blocks": s.blocks,
              "stored_bytes": s.stored_bytes, "raw_bytes": s.raw_bytes,
              "compression_ratio": round(s.compression_ratio, 3), "budget": s.budget,
              "disk_bytes": s.disk_bytes}
             for path, s in zip(paths, manager.stats())]
    refs = view.references()
    named = view.named_sequences()
    per_ns: dict[bytes, Counter[str]] = defaultdict(Counter)
    for block, entry in view.blocks.items():
        c = per_ns[bytes(block.namespace)]
        c["blocks"] += 1
        c["stored_bytes"] += entry.stored_bytes
        c["raw_bytes"] += entry.raw_bytes
    for (ns, _), seq in view.sequences.items():
        per_ns[ns]["sequences"] += 1
        per_ns[ns]["tokens"] += seq.n_tokens
    models: dict[bytes, set[str]] = defaultdict(set)
    for session in view.sessions.values():
        per_ns[session.namespace]["sessions"] += 1
        if isinstance(session.data, dict) and session.data.get("model"):
            models[session.namespace].add(str(session.data["model"]))
    keys = ("sessions", "sequences", "tokens", "blocks", "stored_bytes", "raw_bytes")
    namespaces = [{"namespace": ns.hex(), "fingerprint": describe_namespace(view.namespaces[ns]),
                   "models": sorted(models[ns]), **{k: per_ns[ns][k] for k in keys}}
                  for ns in sorted(view.namespaces)]
    referenced = [(b, e) for b, e in view.blocks.items() if refs[b] > 0]
    stored = sum(e.stored_bytes for _, e in referenced)
    unshared = sum(e.stored_bytes * refs[b] for b, e in referenced)
    sharing = {"shared_blocks": sum(1 for b, _ in referenced if refs[b] > 1),
               "block_references": sum(refs[b] for b, _ in referenced),
               "stored_bytes": stored, "unshared_bytes": unshared,
               "saved_bytes": unshared - stored,
               "saved_tokens": sum(e.n_tokens * (refs[b] - 1) for b, e in referenced)}
    return {"data_dir": str(config.data_path),
            "catalog": {"path": str(manager.catalog.path),
                        "disk_bytes": dir_bytes(manager.catalog.path)},
            "tiers": tiers,
            "totals": {"blocks": len(view.blocks), "sequences": len(view.sequences),
                       "unnamed_sequences": sum(1 for k in view.sequences if k not in named),
                       "sessions": len(view.sessions), "namespaces": len(view.namespaces),
                       "stored_bytes": sum(t["stored_bytes"] for t in tiers),
                       "disk_bytes": sum(t["disk_bytes"] for t in tiers)},
            "namespaces": namespaces, "sharing": sharing,
            "repaired_at_open": {k: v for k, v in manager.repaired.items() if v}}


def render_summary(data: dict[str, Any]) -> str:
    t = data["totals"]
    lines = [f"data dir   {data['data_dir']}",
             f"catalog    {t['sessions']} sessions, {t['sequences']} sequences "
             f"({t['unnamed_sequences']} without a session), {t['blocks']} blocks, "
             f"{t['namespaces']} namespaces; {human_bytes(data['catalog']['disk_bytes'])} on disk",
             ""]
    rows = [[x["name"], x["blocks"], human_bytes(x["stored_bytes"]), human_bytes(x["raw_bytes"]),
             ratio(x["raw_bytes"], x["stored_bytes"]), human_bytes(x["budget"]),
             percent(x["stored_bytes"], x["budget"]), human_bytes(x["disk_bytes"])]
            for x in data["tiers"]]
    rows.append(["total", t["blocks"], human_bytes(t["stored_bytes"]),
                 human_bytes(sum(x["raw_bytes"] for x in data["tiers"])), "", "", "",
                 human_bytes(t["disk_bytes"])])
    lines.append(table(["TIER", "BLOCKS", "STORED", "RAW (F16)", "RATIO", "BUDGET", "USED",
                        "DISK"], rows, right=range(1, 8)))
    lines.append("")
    rows = [[n["namespace"][:8], _short(", ".join(n["models"]), 30),
             _short(_compact_json(n["fingerprint"]), 40), n["sessions"], n["sequences"],
             n["tokens"], n["blocks"], human_bytes(n["stored_bytes"])]
            for n in data["namespaces"]]
    lines.append(table(["NAMESPACE", "MODEL", "FINGERPRINT", "SESSIONS", "SEQUENCES", "TOKENS",
                        "BLOCKS", "STORED"], rows, right=range(3, 8)))
    s = data["sharing"]
    lines += ["", f"shared prefixes: {s['shared_blocks']} blocks referenced "
                  f"{s['block_references']} times in all; {human_bytes(s['stored_bytes'])} "
                  f"stored instead of {human_bytes(s['unshared_bytes'])} "
                  f"(saves {human_bytes(s['saved_bytes'])}, {s['saved_tokens']} tokens)"]
    if data["repaired_at_open"]:
        lines.append(f"repaired when opened (it was not closed cleanly): "
                     f"{_counts(data['repaired_at_open'])}")
    return "\n".join(lines)


# -- sessions ------------------------------------------------------------------------------------
def sessions(view: StoreView) -> list[dict[str, Any]]:
    """Every session, most recently used first."""
    ordered = sorted(view.sessions.values(), key=lambda s: (-s.last_used, s.session_id))
    return [_session_row(view, s) for s in ordered]


def _session_row(view: StoreView, session: SessionEntry) -> dict[str, Any]:
    seq = view.sequence_of(session)
    where = {name: 0 for name in (*(t.label for t in Tier), "missing")}
    for block in seq.block_ids() if seq else []:
        entry = view.blocks.get(block)
        where[entry.tier.label if entry else "missing"] += 1
    data = session.data if isinstance(session.data, dict) else {}
    messages = data.get("messages")
    return {"session_id": session.session_id, "namespace": session.namespace.hex(),
            "sequence": session.sequence, "model": str(data.get("model", "")),
            "created": session.created, "last_used": session.last_used,
            "tokens": seq.n_tokens if seq else 0,
            "messages": len(messages) if isinstance(messages, list) else 0,
            "has_sequence": seq is not None, "blocks": where}


def render_sessions(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no sessions"
    body = [[r["session_id"], _short(r["model"], 24), human_time(r["created"]),
             human_time(r["last_used"]), r["tokens"], r["messages"], r["blocks"]["warm"],
             r["blocks"]["cool"], r["blocks"]["cold"], r["blocks"]["missing"]]
            for r in rows]
    return table(["SESSION", "MODEL", "CREATED", "LAST USED", "TOKENS", "MSGS", "WARM", "COOL",
                  "COLD", "MISSING"], body, right=range(4, 10)) + f"\n{len(rows)} sessions"


def session(view: StoreView, session_id: str) -> dict[str, Any]:
    """One session: its metadata (messages, model, ...) and where every block of it lives."""
    entry = view.sessions.get(session_id)
    if entry is None:
        raise SessionNotFound(f"no session {session_id!r}")
    refs = view.references()
    seq = view.sequence_of(entry)
    blocks = []
    for index, block in enumerate(seq.block_ids() if seq else []):
        b = view.blocks.get(block)
        blocks.append({"index": index, "block": block_name(block),
                       "tier": b.tier.label if b else "missing",
                       "tokens": b.n_tokens if b else 0,
                       "stored_bytes": b.stored_bytes if b else 0,
                       "refs": refs[block], "shared": refs[block] > 1,
                       "full": bool(b and b.chain)})
    return {**_session_row(view, entry), "data": entry.data,
            "sequence_created": seq.created if seq else None,
            "sequence_updated": seq.updated if seq else None, "block_list": blocks}


def render_session(data: dict[str, Any], full: bool = False) -> str:
    lines = [f"session    {data['session_id']}",
             f"model      {data['model'] or '-'} (namespace {data['namespace'][:8]})",
             f"created    {human_time(data['created'])}",
             f"last used  {human_time(data['last_used'])}",
             f"sequence   {data['namespace'][:8]}:{data['sequence']}"
             + ("" if data["has_sequence"] else " (missing)") + f", {data['tokens']} tokens",
             ""]
    messages = data["data"].get("messages") if isinstance(data["data"], dict) else None
    if isinstance(messages, list) and messages:
        lines.append(f"messages ({len(messages)}):")
        for m in messages:
            role = m.get("role", "?") if isinstance(m, dict) else "?"
            content = str(m.get("content", "")) if isinstance(m, dict) else str(m)
            shown = content if full else _short(content, MESSAGE_PREVIEW)
            lines.append(f"  [{role}] {shown}")
        lines.append("")
    other = {k: v for k, v in data["data"].items() if k not in ("messages", "model")} \
        if isinstance(data["data"], dict) else {}
    for key, value in other.items():
        lines.append(f"{key}: {_short(value, 100)}")
    if other:
        lines.append("")
    rows = [[b["index"], b["block"], b["tier"], b["tokens"], human_bytes(b["stored_bytes"]),
             b["refs"], "full" if b["full"] else "tail"]
            for b in data["block_list"]]
    lines.append(table(["#", "BLOCK", "TIER", "TOKENS", "STORED", "REFS", "KIND"], rows,
                       right=(0, 3, 4, 5)) if rows else "no blocks")
    return "\n".join(lines)


# -- blocks --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BlockFilter:
    session: str | None = None
    sequence: int | None = None
    namespace: str | None = None
    """Hex prefix of the namespace."""
    tier: Tier | None = None
    block: BlockId | None = None


def select_blocks(view: StoreView, f: BlockFilter) -> list[BlockId]:
    """Blocks matching every given filter: in sequence order when a session or sequence is
    given (shared blocks included), else in key order."""
    if f.session is not None:
        session_entry = view.sessions.get(f.session)
        if session_entry is None:
            raise SessionNotFound(f"no session {f.session!r}")
        seq = view.sequence_of(session_entry)
        candidates = seq.block_ids() if seq else []
    elif f.sequence is not None:
        candidates = [b for key, seq in sorted(view.sequences.items()) if key[1] == f.sequence
                      for b in seq.block_ids()]
    else:
        candidates = sorted(view.blocks)
    out = []
    for block in candidates:
        entry = view.blocks.get(block)
        if entry is None:
            continue
        if f.namespace and not block.namespace.hex().startswith(f.namespace.lower()):
            continue
        if f.tier is not None and entry.tier != f.tier:
            continue
        if f.block is not None and block != f.block:
            continue
        out.append(block)
    return out


def blocks(manager: TierManager, view: StoreView, selected: list[BlockId],
           now: float | None = None) -> list[dict[str, Any]]:
    now = time.time() if now is None else now
    refs = view.references()
    return [_block_row(manager, b, view.blocks[b], refs[b], now) for b in selected]


def _block_row(manager: TierManager, block: BlockId, e: BlockEntry, refs: int, now: float
               ) -> dict[str, Any]:
    return {"block": block_name(block), "namespace": block.namespace.hex(),
            "sequence": block.sequence, "index": block.block, "tier": e.tier.label,
            "layers": e.n_layers, "tokens": e.n_tokens, "stored_bytes": e.stored_bytes,
            "raw_bytes": e.raw_bytes, "refs": refs, "full": bool(e.chain),
            "chain": e.chain.hex(), "created": e.created, "last_access": e.last_access,
            "hits": round(e.hits, 4), "attention": e.attention,
            "priority": round(policy.priority(candidate(block, e), now, manager.weights), 4)}


def render_blocks(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no blocks match"
    body = [[r["block"], r["tier"], r["layers"], r["tokens"], human_bytes(r["stored_bytes"]),
             ratio(r["raw_bytes"], r["stored_bytes"]), r["refs"], f"{r['hits']:.2f}",
             human_time(r["last_access"]), f"{r['priority']:.2f}"] for r in rows]
    return table(["BLOCK", "TIER", "LAYERS", "TOKENS", "STORED", "RATIO", "REFS", "HITS",
                  "LAST ACCESS", "PRIORITY"], body, right=range(2, 10)) \
        + f"\n{len(rows)} blocks, {human_bytes(sum(r['stored_bytes'] for r in rows))} stored"


# -- records of one block: header and statistics ------------------------------------------------
def records(manager: TierManager, block: BlockId, layers: set[int] | None = None,
            quant_error: bool = False) -> dict[str, Any]:
    """The header and value statistics of every layer (or of ``layers``) of a block, read from
    its tier; with ``quant_error``, the error re-encoding each layer as Q8 and Q4 would add."""
    try:
        tier, values = manager.read_records(block)
    except BlockMissing:
        raise BlockMissing(f"{block_name(block)} is in no tier") from None
    out = []
    for layer, value in enumerate(values):
        if layers is not None and layer not in layers:
            continue
        if value is None:
            out.append({"layer": layer, "error": "missing"})
            continue
        try:
            header, kv = codec.decode_record(value)
        except BlockCorrupt as exc:
            out.append({"layer": layer, "record_bytes": len(value), "error": str(exc)})
            continue
        row: dict[str, Any] = {"layer": layer, "record_bytes": len(value),
                               "header": header_json(header), "k": tensor_stats(kv.k),
                               "v": tensor_stats(kv.v)}
        if quant_error:
            row["quant_error"] = requant_error(kv)
        out.append(row)
    return {"block": block_name(block), "tier": tier.label, "layers": out}


def header_json(h: RecordHeader) -> dict[str, Any]:
    summary = h.key_summary()
    return {"version": h.version, "n_tokens": h.n_tokens, "zstd": h.zstd,
            "exact_rows": h.exact_rows,
            "k": _tensor_header(h.k), "v": _tensor_header(h.v),
            "key_summary": None if summary is None else {
                "channels": int(summary[0].size), "min": float(summary[0].min(initial=np.inf)),
                "max": float(summary[1].max(initial=-np.inf))}}


def _tensor_header(t: TensorHeader) -> dict[str, Any]:
    raw = t.encoding == codec.RAW
    return {"type": type_name(t.ggml_type),
            "encoding": "raw" if raw else Encoding(t.encoding).name.lower(),
            "grouping": None if raw or t.encoding == Encoding.F16
            else Grouping(t.grouping).name.lower(),
            "group_size": None if raw or t.encoding == Encoding.F16 else t.group_size,
            "width": t.width, "nbytes": t.nbytes}


def _values(rows: TensorRows) -> np.ndarray:
    return np.ascontiguousarray(rows.rows).view(np.float16).astype(np.float32)


def tensor_stats(rows: TensorRows) -> dict[str, Any] | None:
    """Min, max, mean and standard deviation of the finite values of f16 rows (None otherwise)."""
    if not rows.is_f16:
        return None
    values = _values(rows)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"min": None, "max": None, "mean": None, "std": None,
                "nonfinite": int(values.size)}
    return {"min": float(finite.min()), "max": float(finite.max()),
            "mean": float(finite.mean()), "std": float(finite.std()),
            "nonfinite": int(values.size - finite.size)}


def requant_error(kv: LayerKV) -> dict[str, Any] | None:
    """Max and RMS absolute error of re-encoding a layer as Q8 and as Q4 (as the warm and the
    cool/cold tiers would), against its values as stored now."""
    if not (kv.k.is_f16 and kv.v.is_f16):
        return None
    out = {}
    for encoding in (Encoding.Q8, Encoding.Q4):
        _, back = codec.decode_record(codec.encode_record(kv, RecordFormat(encoding)))
        out[encoding.name.lower()] = {"k": _error(kv.k, back.k), "v": _error(kv.v, back.v)}
    return out


def _error(a: TensorRows, b: TensorRows) -> dict[str, float]:
    x, y = _values(a), _values(b)
    mask = np.isfinite(x)
    diff = np.abs(x[mask] - y[mask])
    return {"max_abs": float(diff.max(initial=0.0)),
            "rms": float(np.sqrt(np.mean(diff ** 2))) if diff.size else 0.0}


def render_records(data: dict[str, Any]) -> str:
    lines = [f"block {data['block']} in {data['tier']}"]
    rows = []
    for r in data["layers"]:
        if "error" in r:
            rows.append([r["layer"], human_bytes(r.get("record_bytes", 0)), "", "", "", "", "",
                         "ERROR: " + r["error"], "", ""])
            continue
        h = r["header"]
        rows.append([r["layer"], human_bytes(r["record_bytes"]), h["n_tokens"], h["exact_rows"],
                     _encoding(h["k"]), _encoding(h["v"]), "yes" if h["zstd"] else "no",
                     _stats(r["k"]), _stats(r["v"]), _qerr(r.get("quant_error"))])
    lines.append(table(["LAYER", "BYTES", "TOKENS", "EXACT", "K", "V", "ZSTD", "K MIN/MAX/MEAN",
                        "V MIN/MAX/MEAN", "REQUANT ERR Q8 / Q4 (K,V RMS)"], rows,
                       right=(0, 1, 2, 3)))
    return "\n".join(lines)


def _encoding(t: dict[str, Any]) -> str:
    if t["encoding"] in ("raw", "f16"):
        return t["type"] if t["encoding"] == "raw" else "f16"
    return f"{t['encoding']}/{t['grouping'].replace('per_', '')}/{t['group_size']}"


def _stats(s: dict[str, Any] | None) -> str:
    if not s or s["min"] is None:
        return "-"
    return f"{s['min']:.3g}/{s['max']:.3g}/{s['mean']:.3g}"


def _qerr(q: dict[str, Any] | None) -> str:
    if not q:
        return ""
    return " / ".join(f"{q[e]['k']['rms']:.3g},{q[e]['v']['rms']:.3g}" for e in ("q8", "q4"))


def _compact_json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _short(value: Any, width: int) -> str:
    text = value if isinstance(value, str) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
