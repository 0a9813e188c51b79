"""Oversized prompts against a live server (issue 12): how long refusing them takes, and what
they do to ``/health`` and to a small chat meanwhile.

Run from the repository root::

    python -m bench.bench_input_limits [--prompts 8] [--mib 7]

A ``kvtier serve`` process (the real CLI, the default model, ``model.context_size`` 32768) gets
``--prompts`` concurrent chat requests of ``--mib`` MiB each; while they are in flight ``/health``
is asked again and again, and one small chat is sent. Baselines from the same run: ``/health``
and the small chat on the idle server, and, in this process, tokenizing one such prompt against
refusing it by its length. (Before issue 12, a 7 MiB prompt was tokenized, ~5 s, before being
refused, and 8 of them made ``/health`` take 14.8 s and a small chat 12 s.)

Prints a table and writes ``bench/results/input_limits.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.bench_http import Process
from bench.common import print_table, write_json


class Serve(Process):
    name = "kvtier"

    def __init__(self, data_dir: Path) -> None:
        import sys
        super().__init__([sys.executable, "-m", "kvtier.cli", "serve", "--data-dir",
                          str(data_dir), "--listen", "127.0.0.1:{port}",
                          "--set", "model.context_size=32768", "--set", "model.n_slots=2",
                          "--set", "model.n_threads=2"], data_dir.parent)


async def timed(http: aiohttp.ClientSession, method: str, url: str, body: Any = None
                ) -> tuple[float, int]:
    start = time.perf_counter()
    async with http.request(method, url, json=body) as resp:
        await resp.read()
        return time.perf_counter() - start, resp.status


SMALL = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


async def measure(url: str, n_prompts: int, mib: float) -> dict[str, Any]:
    big = {"messages": [{"role": "user", "content": "word " * int(mib * 1024**2 / 5)}],
           "max_tokens": 1}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await timed(http, "POST", url + "/v1/chat/completions", SMALL)   # warm
        idle_health = [(await timed(http, "GET", url + "/health"))[0] for _ in range(20)]
        idle_chat = [(await timed(http, "POST", url + "/v1/chat/completions", SMALL))[0]
                     for _ in range(3)]
        start = time.perf_counter()
        bigs = [asyncio.create_task(timed(http, "POST", url + "/v1/chat/completions", big))
                for _ in range(n_prompts)]
        chat = asyncio.create_task(timed(http, "POST", url + "/v1/chat/completions", SMALL))
        storm_health = []
        while not all(b.done() for b in bigs):
            storm_health.append((await timed(http, "GET", url + "/health"))[0])
        results = await asyncio.gather(*bigs)
        storm = time.perf_counter() - start
        chat_s, chat_status = await chat
    return {"idle_health_s": statistics.median(idle_health),
            "storm_health_median_s": statistics.median(storm_health),
            "storm_health_max_s": max(storm_health), "storm_health_n": len(storm_health),
            "idle_chat_s": statistics.median(idle_chat), "storm_chat_s": chat_s,
            "storm_chat_status": chat_status, "storm_s": storm,
            "big_statuses": sorted({status for _, status in results})}


def refuse_vs_tokenize(mib: float) -> dict[str, float]:
    from kvtier.engine.api import ChatMessage, GenerationRequest
    from kvtier.engine.model import Model, default_model_path
    from kvtier.engine.prompt import History, build_prompt
    from kvtier.errors import ContextOverflow
    model = Model(default_model_path())
    text = "word " * int(mib * 1024**2 / 5)
    request = GenerationRequest(messages=(ChatMessage("user", text),))
    start = time.perf_counter()
    try:
        build_prompt(model, request, History(), 32768)
    except ContextOverflow:
        refused = time.perf_counter() - start
    start = time.perf_counter()
    n = len(model.tokenize(model.render_chat([{"role": "user", "content": text}])))
    tokenized = time.perf_counter() - start
    model.close()
    return {"refuse_s": refused, "tokenize_s": tokenized, "tokens": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--mib", type=float, default=7.0)
    args = parser.parse_args()
    local = refuse_vs_tokenize(args.mib)
    with tempfile.TemporaryDirectory() as tmp:
        server = Serve(Path(tmp) / "data")
        try:
            async def run() -> dict[str, Any]:
                async with aiohttp.ClientSession() as http:
                    await server.ready(http)
                return await measure(server.url, args.prompts, args.mib)
            live = asyncio.run(run())
        finally:
            server.stop()
    print_table(["measure", "idle / baseline", f"{args.prompts} x {args.mib:g} MiB", "ratio"], [
        ["one prompt: refused by length vs tokenized (s)", local["tokenize_s"],
         local["refuse_s"], f"{local['tokenize_s'] / local['refuse_s']:.0f}x faster"],
        ["/health median (s)", live["idle_health_s"], live["storm_health_median_s"],
         f"{live['storm_health_median_s'] / live['idle_health_s']:.2f}x"],
        ["/health max (s)", live["idle_health_s"], live["storm_health_max_s"],
         f"{live['storm_health_max_s'] / live['idle_health_s']:.2f}x"],
        ["small chat (s)", live["idle_chat_s"], live["storm_chat_s"],
         f"{live['storm_chat_s'] / live['idle_chat_s']:.2f}x"],
        ["all big prompts answered (s)", "-", live["storm_s"], str(live["big_statuses"])]])
    path = write_json("input_limits", {"args": vars(args), "local": local, "live": live})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
