"""``kvtier serve``: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
from typing import Any

from kvtier.cli.common import build_config


def add_serve_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser("serve", parents=[common], help="run the OpenAI-compatible server")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address (default 127.0.0.1:8080)")
    serve.add_argument("--model", metavar="PATH", help="GGUF model (default: SmolLM2-135M)")
    serve.add_argument("--api-key", help="require this bearer token (or KVTIER_API_KEY)")
    serve.set_defaults(run=_run_serve)


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
