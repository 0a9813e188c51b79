"""HTTP benchmark: requests per second and time to first token for N concurrent clients holding
multi-turn conversations, with kvtier's cache and without it (every prompt re-prefilled).

Run from the repository root::

    python -m bench.bench_http [--clients 1,4] [--turns 4] [--quick]

Each mode runs against a fresh ``kvtier serve`` process (the real CLI, the default model) on a
fresh data directory. Every client opens its conversation with its own ~``--doc-tokens`` document
(text from ``pydoc_data.topics``) and then asks ``--turns`` short questions, streaming each answer
(``--max-tokens`` tokens, greedy). Modes:

* ``session``: kvtier sessions; each request carries only the new message.
* ``stateless``: the full history every time, as most OpenAI clients send it; kvtier reuses the
  longest stored prefix on its own.
* ``no-cache``: the full history with a unique first line, so nothing can be reused: the
  re-prefill baseline.

After the ``session`` turns the server is stopped (SIGTERM) and started again on the same data
directory, and every client asks one more question: the time to first token of that turn is a
restore from the store, to compare with the ``no-cache`` turn of the same history length.

Prints a Markdown table and writes ``bench/results/http.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pydoc_data.topics import topics

RESULTS = Path(__file__).resolve().parent / "results" / "http.json"
QUESTIONS = ["Summarise the text above in one sentence.", "What is the main keyword?",
             "Give one example.", "Is there any caveat?", "What would you read next?",
             "Explain it to a child."]


@dataclass
class Turn:
    client: int
    turn: int
    ttft_s: float
    total_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class ModeResult:
    mode: str
    clients: int
    wall_s: float
    turns: list[Turn] = field(default_factory=list)
    resumed: list[Turn] = field(default_factory=list)
    stats_tokens: dict[str, int] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A server in a subprocess, its output in a log file, ready when ``/health`` says 200."""

    name = "server"

    def __init__(self, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([a.replace("{port}", str(self.port)) for a in argv],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)

    async def ready(self, http: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log_path}")
            try:
                async with http.get(self.url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become ready; see {self.log_path}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class ServeProcess(Process):
    """``kvtier serve`` in a subprocess. Nothing warms it up once ``/health`` says ok: the server
    pays its one-time costs before that, so a first turn (or the first turn after a restart) is
    measured as a client meets it."""

    name = "kvtier"

    def __init__(self, data_dir: Path, args: argparse.Namespace) -> None:
        super().__init__([sys.executable, "-m", "kvtier.cli", "serve", "--data-dir", str(data_dir),
                          "--listen", "127.0.0.1:{port}",
                          "--set", f"model.context_size={args.context_size}",
                          "--set", f"model.n_slots={args.slots}",
                          "--set", f"model.n_threads={args.threads}"], data_dir.parent)


def documents(n: int, tokens: int) -> list[str]:
    """``n`` different texts of about ``tokens`` tokens (4 characters a token)."""
    texts = [t for _, t in sorted(topics.items()) if len(t) > tokens * 4]
    return [texts[(i * 7) % len(texts)][:tokens * 4] for i in range(n)]


async def ask(http: aiohttp.ClientSession, url: str, body: dict[str, Any]
              ) -> tuple[str, float, float, dict[str, Any]]:
    """Streams one chat completion: text, time to first token, total time, usage."""
    started = time.perf_counter()
    ttft = 0.0
    text = []
    usage: dict[str, Any] = {}
    async with http.post(url + "/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")  # may be absent
                if piece:
                    if not ttft:
                        ttft = time.perf_counter() - started
                    text.append(piece)
    total = time.perf_counter() - started
    return "".join(text), ttft or total, total, usage


class Conversation:
    def __init__(self, index: int, document: str, mode: str, max_tokens: int) -> None:
        self.index = index
        self.mode = mode
        self.session_id = f"bench-{index}-{uuid.uuid4().hex[:8]}"
        self.max_tokens = max_tokens
        self.history: list[dict[str, str]] = [
            {"role": "system", "content": "Answer questions about this text.\n\n" + document}]
        self.turns = 0

    async def turn(self, http: aiohttp.ClientSession, url: str) -> Turn:
        question = {"role": "user", "content": QUESTIONS[self.turns % len(QUESTIONS)]}
        body: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": 0}
        if self.mode == "session":
            new = ([self.history[0]] if self.turns == 0 else []) + [question]
            body.update(messages=new, session_id=self.session_id)
        elif self.mode == "stateless":
            body.update(messages=self.history + [question])
        else:  # no-cache: a unique first line makes every prompt new to the cache
            nonce = {"role": "system", "content": f"Request {uuid.uuid4().hex}."}
            body.update(messages=[nonce] + self.history + [question])
        text, ttft, total, usage = await ask(http, url, body)
        self.history += [question, {"role": "assistant", "content": text}]
        self.turns += 1
        return Turn(self.index, self.turns, ttft, total, usage["prompt_tokens"],
                    usage["prompt_tokens_details"]["cached_tokens"],
                    usage["completion_tokens"])


async def run_mode(mode: str, n_clients: int, args: argparse.Namespace, base: Path
                   ) -> ModeResult:
    data_dir = base / f"{mode}-{n_clients}" / "data"
    data_dir.mkdir(parents=True)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        server = ServeProcess(data_dir, args)
        try:
            await server.ready(http)
            conversations = [Conversation(i, doc, mode, args.max_tokens)
                             for i, doc in enumerate(documents(n_clients, args.doc_tokens))]

            async def client(c: Conversation) -> list[Turn]:
                return [await c.turn(http, server.url) for _ in range(args.turns)]

            started = time.perf_counter()
            per_client = await asyncio.gather(*(client(c) for c in conversations))
            result = ModeResult(mode, n_clients, time.perf_counter() - started,
                                [t for turns in per_client for t in turns])
            async with http.get(server.url + "/v1/cache/stats") as resp:
                result.stats_tokens = (await resp.json())["tokens"]
        finally:
            server.stop()
        if mode in ("session", "no-cache"):
            # One more turn each after a restart: restored from the store (or re-prefilled).
            server = ServeProcess(data_dir, args)
            try:
                await server.ready(http)
                result.resumed = list(await asyncio.gather(
                    *(c.turn(http, server.url) for c in conversations)))
            finally:
                server.stop()
    return result


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f}" if values else "-"


def _p95(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000:.0f}"


def table(results: list[ModeResult]) -> str:
    lines = [
        "| clients | mode | requests/s | TTFT p50, turn 1 (ms) | TTFT p50, turns 2+ (ms) | "
        "TTFT p95, turns 2+ (ms) | prompt tokens, turns 2+ (mean) | cached, turns 2+ | "
        "TTFT p50 after restart (ms) |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        first = [t.ttft_s for t in r.turns if t.turn == 1]
        later = [t for t in r.turns if t.turn > 1]
        prompt = sum(t.prompt_tokens for t in later)
        cached = sum(t.cached_tokens for t in later)
        lines.append(
            f"| {r.clients} | {r.mode} | {len(r.turns) / r.wall_s:.2f} | {_ms(first)} | "
            f"{_ms([t.ttft_s for t in later])} | {_p95([t.ttft_s for t in later])} | "
            f"{prompt / max(1, len(later)):.0f} | {100 * cached / max(1, prompt):.0f}% | "
            f"{_ms([t.ttft_s for t in r.resumed])} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[ModeResult]:
    results = []
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-http-") as tmp:
        for n_clients in args.clients:
            for mode in ("session", "stateless", "no-cache"):
                print(f"running {mode} with {n_clients} client(s)...", file=sys.stderr,
                      flush=True)
                results.append(await run_mode(mode, n_clients, args, Path(tmp)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4",
                        type=lambda v: [int(x) for x in v.split(",")],
                        help="comma-separated numbers of concurrent clients (default 1,4)")
    parser.add_argument("--turns", type=int, default=4, help="questions per conversation")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--doc-tokens", type=int, default=600,
                        help="approximate length of each conversation's document")
    parser.add_argument("--slots", type=int, default=2, help="model.n_slots")
    parser.add_argument("--context-size", type=int, default=2048, help="model.context_size")
    parser.add_argument("--threads", type=int, default=2, help="model.n_threads")
    parser.add_argument("--quick", action="store_true",
                        help="1 and 2 clients, 2 turns, 200-token documents")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.turns, args.doc_tokens = [1, 2], 2, 200
    results = asyncio.run(main_async(args))
    print(table(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "args": {k: v for k, v in vars(args).items()},
        "results": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    main()
