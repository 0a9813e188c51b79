"""``kvtier inspect`` and ``kvtier compact`` (the logic is in :mod:`kvtier.tools`).

Building the parser imports nothing heavy: ``kvtier serve`` builds it too, and must be free to load
llama.cpp before numpy (DESIGN.md).

Exit codes: 0 success; 1 a failure, or problems found by ``inspect verify``; 2 a bad argument or
configuration; 3 the data directory is in use (stop the server first).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvtier.cli.common import build_config
from kvtier.errors import BlockMissing, ConfigError, KvtierError, StoreLocked

if TYPE_CHECKING:
    from kvtier.storage.manager import TierManager

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3
VIEWS = ("summary", "sessions", "session", "blocks", "verify", "remote")


def add_tool_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    inspect = sub.add_parser(
        "inspect", parents=[common], help="show what a store holds; verify it",
        description="Show a stopped server's store. VIEW is summary (the default), sessions, "
                    "session ID, blocks, verify, or remote (the Redis Cluster tier of "
                    "tiers.remote_url).")
    inspect.add_argument("view", nargs="?", default="summary", choices=VIEWS, metavar="VIEW",
                         help="summary | sessions | session ID | blocks | verify | remote")
    inspect.add_argument("ident", nargs="?", metavar="ID", help="the session id (for session)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    group = inspect.add_argument_group("session")
    group.add_argument("--full", action="store_true", help="print whole messages")
    group = inspect.add_argument_group("blocks")
    group.add_argument("--session", metavar="ID", help="blocks of this session, in order")
    group.add_argument("--sequence", type=int, metavar="N", help="blocks of sequence N, in order")
    group.add_argument("--namespace", metavar="HEX", help="blocks of namespaces with this prefix")
    # Tier's labels, written out: building the parser must not import the stores.
    group.add_argument("--tier", choices=("warm", "cool", "cold"), help="blocks in this tier")
    group.add_argument("--block", metavar="[NS:]SEQ:BLOCK",
                       help="one block: its header and statistics, layer by layer")
    group.add_argument("--layer", type=int, action="append", metavar="L",
                       help="with --stats or --block: only layer L (repeatable)")
    group.add_argument("--stats", action="store_true",
                       help="read the listed blocks: header, min/max/mean of K and V per layer")
    group.add_argument("--quant-error", action="store_true",
                       help="with --stats or --block: the error re-encoding as Q8 and Q4 adds")
    group.add_argument("--limit", type=int, default=0, metavar="N", help="list at most N blocks")
    group = inspect.add_argument_group("verify")
    group.add_argument("--quick", action="store_true",
                       help="check checksums and headers without decoding the payloads")
    group = inspect.add_argument_group("remote")
    group.add_argument("--check", action="store_true",
                       help="read every remote block and verify its records")
    inspect.set_defaults(run=_guarded(_run_inspect))

    compact = sub.add_parser(
        "compact", parents=[common], help="collect garbage, expire, demote, shrink the files",
        description="Compact a stopped server's store: repair and collect orphans, expire "
                    "sessions, demote to the tier targets, re-encode blocks stored in another "
                    "format than their tier's, compact RocksDB and rewrite the "
                    "LMDB file. Safe to kill at any moment; a second run changes nothing.")
    compact.add_argument("--dry-run", action="store_true", help="print what would be done")
    compact.add_argument("--max-age", metavar="DURATION",
                         help="expire sessions unused for longer (30d, 12h, 90m, 3600s); also "
                              "sequences without a session unchanged for longer")
    compact.add_argument("--keep", type=int, metavar="N",
                         help="keep only the N most recently used sessions")
    compact.add_argument("--warm-target", metavar="SIZE|PCT", default=None,
                         help="demote from warm down to this many bytes or percent of its "
                              "budget (default 85%%)")
    compact.add_argument("--cool-target", metavar="SIZE|PCT", default=None,
                         help="demote from cool down to this many bytes or percent of its "
                              "budget (default 85%%)")
    compact.add_argument("--scrub", action="store_true",
                         help="first read every block and drop those that fail their checksum "
                              "or that their tier cannot read (damaged files)")
    compact.add_argument("--no-rewrite", action="store_true",
                         help="leave the files as they are (no RocksDB compaction, no LMDB "
                              "rewrite)")
    compact.add_argument("--force-rewrite", action="store_true",
                         help="rewrite the LMDB file even when little of it is free")
    compact.add_argument("--remote", action="store_true",
                         help="also compact the remote tier (tiers.remote_url), which every "
                              "server shares: expire its sessions by --max-age, drop damaged "
                              "blocks with --scrub, recount it, evict to tiers.remote_budget")
    compact.add_argument("--json", action="store_true", help="print JSON instead of tables")
    compact.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    compact.set_defaults(run=_guarded(_run_compact))


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map the tools' expected failures to a message and an exit code."""
    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except StoreLocked as exc:
            print(f"kvtier {args.command}: {exc}", file=sys.stderr)
            return EXIT_LOCKED
        except ConfigError:
            raise
        except KvtierError as exc:    # no store there, no such session or block, ...
            print(f"kvtier {args.command}: {exc}", file=sys.stderr)
            return EXIT_PROBLEMS
        except _UsageError as exc:
            print(f"kvtier {args.command}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return guarded


class _UsageError(Exception):
    pass


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _open(args: argparse.Namespace) -> TierManager:
    from kvtier.tools.store import open_store
    return open_store(build_config(args))


def _run_inspect(args: argparse.Namespace) -> int:
    from kvtier.tools import verify
    from kvtier.tools.render import write_json

    if args.view == "session" and not args.ident:
        raise _UsageError("inspect session needs a session ID")
    if args.ident and args.view != "session":
        raise _UsageError(f"inspect {args.view} takes no ID")
    with _open(args) as manager:
        if args.view == "verify":
            report = verify.verify(manager, quick=args.quick, progress=_progress(args))
            data: Any = report.to_json()
            code = EXIT_OK if report.ok else EXIT_PROBLEMS

            def text() -> str:
                return verify.render(report)
        else:
            data, text = _inspect_view(args, manager)
            code = EXIT_OK
        if args.json:
            write_json(data)
        else:
            print(text())
    return code


def _inspect_view(args: argparse.Namespace, manager: TierManager
                  ) -> tuple[Any, Callable[[], str]]:
    """The data of one ``inspect`` view, and how to render it as text."""
    from kvtier.storage.tiers import Tier
    from kvtier.tools import inspect
    from kvtier.tools.store import parse_block

    if args.view == "remote":
        from kvtier.tools import remote
        if manager.remote is None:
            raise _UsageError("no remote tier: tiers.remote_url is not set")
        data = remote.summary(manager.remote, check=args.check)
        return data, lambda: remote.render_summary(data)
    view = manager.view()
    if args.view == "summary":
        summary = inspect.summary(manager, view)
        return summary, lambda: inspect.render_summary(summary)
    if args.view == "sessions":
        rows = inspect.sessions(view)
        return rows, lambda: inspect.render_sessions(rows)
    if args.view == "session":
        session = inspect.session(view, args.ident)
        return session, lambda: inspect.render_session(session, full=args.full)
    try:
        block = parse_block(args.block, set(view.namespaces), view.blocks) if args.block \
            else None
        tier = Tier.from_label(args.tier) if args.tier else None
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    selected = inspect.select_blocks(view, inspect.BlockFilter(
        args.session, args.sequence, args.namespace, tier, block))
    if block is not None and not selected:
        raise BlockMissing(f"no block {args.block}")
    if args.limit:
        selected = selected[:args.limit]
    if args.stats or block is not None:
        layers = set(args.layer) if args.layer else None
        records = [inspect.records(manager, b, layers, args.quant_error) for b in selected]
        return records, lambda: "\n\n".join(inspect.render_records(r) for r in records) \
            or "no blocks match"
    rows = inspect.blocks(manager, view, selected)
    return rows, lambda: inspect.render_blocks(rows)


def _run_compact(args: argparse.Namespace) -> int:
    from kvtier.tools.compact import DEFAULT_TARGET, CompactOptions, Target, compact, render
    from kvtier.tools.render import parse_duration, write_json

    try:
        max_age = parse_duration(args.max_age) if args.max_age else None
        warm = Target.parse(args.warm_target) if args.warm_target else DEFAULT_TARGET
        cool = Target.parse(args.cool_target) if args.cool_target else DEFAULT_TARGET
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    if args.keep is not None and args.keep < 0:
        raise _UsageError("--keep must not be negative")
    options = CompactOptions(max_age_s=max_age, keep=args.keep, warm_target=warm,
                             cool_target=cool, scrub=args.scrub, rewrite=not args.no_rewrite,
                             force_rewrite=args.force_rewrite, dry_run=args.dry_run,
                             progress=_progress(args), remote=args.remote)
    with _open(args) as manager:
        report = compact(manager, options)
    if args.json:
        write_json(report.to_json())
    else:
        print(render(report))
    return EXIT_OK
