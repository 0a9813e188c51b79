"""The ``kvtier`` command: ``serve``, ``inspect`` and ``compact``.

Building the parser imports nothing heavy (no llama.cpp, numba or stores): each command imports
what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from kvtier.cli.common import common_parser
from kvtier.cli.serve import add_serve_command
from kvtier.cli.tools import add_tool_commands
from kvtier.errors import ConfigError, KvtierError


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(
        prog="kvtier", description="A tiered, persistent KV cache for local LLM inference.",
        epilog="Every command takes --config FILE, --set KEY=VALUE and --data-dir DIR (see "
               "docs/configuration.md); 'kvtier COMMAND --help' shows the rest.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_command(sub, common)
    add_tool_commands(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except ConfigError as exc:
        print(f"kvtier: config error: {exc}", file=sys.stderr)
        return 2
    except KvtierError as exc:
        print(f"kvtier: {exc}", file=sys.stderr)
        return 1
