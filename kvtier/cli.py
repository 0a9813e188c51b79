"""The ``kvtier`` command: ``serve``, ``inspect``, ``compact`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from kvtier.config import Config, load_config
from kvtier.errors import ConfigError, KvtierError


def _parse_set(values: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(item, "expected KEY=VALUE")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="JSON config file (see docs/configuration.md)")
    common.add_argument("--data-dir", metavar="DIR",
                        help="base of every tier's files (default ~/.local/share/kvtier)")
    common.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config key, e.g. --set tiers.host_ram_budget=2GiB")
    common.add_argument("--verbose", "-v", action="store_true", help="log more")
    return common


def build_config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    overrides = _parse_set(args.set)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    overrides.update(extra or {})
    return load_config(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(
        prog="kvtier", description="A tiered, persistent KV cache for local LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the OpenAI-compatible server")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address (default 127.0.0.1:8080)")
    serve.add_argument("--model", metavar="PATH", help="GGUF model (default: SmolLM2-135M)")
    serve.add_argument("--api-key", help="require this bearer token (or KVTIER_API_KEY)")
    serve.set_defaults(run=_run_serve)

    from kvtier.tools_cli import add_tool_commands
    add_tool_commands(sub, common)
    return parser


def _run_serve(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    if args.listen:
        extra["server.listen"] = args.listen
    if args.model:
        extra["model.model_path"] = args.model
    if args.api_key:
        extra["server.api_key"] = args.api_key
    config = build_config(args, extra)
    from kvtier.http.server import serve
    return serve(config)


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


if __name__ == "__main__":
    sys.exit(main())
