"""kvtier against llama.cpp's own ``llama-server``, same machine, model, threads and slots.

Run from the repository root, with the path of a ``llama-server`` binary::

    python -m bench.bench_llama_server --llama-server /tmp/lsrv/build/bin/llama-server

Both servers run the default model (SmolLM2-135M Q4_1) with 4 slots of 4096 tokens, the same
number of threads, and greedy 16-token answers, streamed through ``/v1/chat/completions``; time to
first token (TTFT) is measured by the client, from sending the request to the first content chunk.
Nothing warms a server up after its ``/health`` says ok: what a first request pays is measured.
The servers run side by side and their requests alternate (one at a time), so that a machine
whose load changes treats them alike.

* **interleaved**: two conversations over different ~2.8K-token documents, sent as OpenAI
  clients send them (the whole history, no session id), A B A B A B: the median TTFT of the
  follow-up turns (every turn but each conversation's first). llama-server keeps each in a slot
  (and its host-memory prompt cache); kvtier keeps each in a slot and in its store.
* **resumed**: a conversation's first turn, a restart, then a follow-up, for ``--restarts``
  documents. kvtier: with a session id, restored from its store. llama-server: its manual slot
  save before the restart (``POST /slots/0?action=save``, ``--slot-save-path``) and restore after
  it (``action=restore``) before the follow-up; its TTFT counts the restore request too.
  kvtier's full-history follow-up (no session id) after a restart is reported as well.

Prints a Markdown table and writes ``bench/results/llama_server.json`` (with the load average
before and after: the numbers mean something only on a quiet machine). Without the binary it
says so and exits (status 0): building it is described in docs/benchmarks_http.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.bench_http import QUESTIONS, Process, ask, documents

RESULTS = Path(__file__).resolve().parent / "results" / "llama_server.json"


@dataclass
class Turn:
    conversation: int
    turn: int
    ttft_s: float
    total_s: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    restore_s: float = 0.0
    """llama-server's slot restore before this turn (part of ``ttft_s``)."""


class Kvtier(Process):
    name = "kvtier"

    def __init__(self, args: argparse.Namespace, data_dir: Path) -> None:
        super().__init__([sys.executable, "-m", "kvtier.cli", "serve", "--data-dir", str(data_dir),
                          "--listen", "127.0.0.1:{port}",
                          "--set", f"model.context_size={args.ctx_per_slot}",
                          "--set", f"model.n_slots={args.slots}",
                          "--set", f"model.n_threads={args.threads}"], data_dir.parent)


class LlamaServer(Process):
    name = "llama-server"

    def __init__(self, args: argparse.Namespace, slot_dir: Path) -> None:
        slot_dir.mkdir(parents=True, exist_ok=True)
        # -np fixes the slots, so the KV cache is split into slots of -c / -np tokens, as
        # kvtier's; everything else (prompt cache in host memory, flash attention) is default.
        super().__init__([str(args.llama_server), "-m", str(args.model), "--host", "127.0.0.1",
                          "--port", "{port}", "-np", str(args.slots),
                          "-c", str(args.slots * args.ctx_per_slot), "-t", str(args.threads),
                          "-tb", str(args.threads), "--slot-save-path", str(slot_dir),
                          "--no-webui"], slot_dir.parent)


@dataclass
class Conversation:
    index: int
    document: str
    max_tokens: int
    session_id: str | None = None
    """kvtier sends only the new message with this; otherwise the whole history is sent."""
    slot: int | None = None
    """llama-server's slot to use (``id_slot``), for its manual save and restore."""
    history: list[dict[str, str]] = field(default_factory=list)
    turns: int = 0

    def __post_init__(self) -> None:
        self.history = [{"role": "system",
                         "content": "Answer questions about this text.\n\n" + self.document}]

    async def turn(self, http: aiohttp.ClientSession, url: str, restore_s: float = 0.0) -> Turn:
        question = {"role": "user", "content": QUESTIONS[self.turns % len(QUESTIONS)]}
        body: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": 0}
        if self.session_id is not None:
            new = ([self.history[0]] if self.turns == 0 else []) + [question]
            body.update(messages=new, session_id=self.session_id)
        else:
            body.update(messages=self.history + [question])
        if self.slot is not None:
            body["id_slot"] = self.slot
        text, ttft, total, usage = await ask(http, url, body)
        self.history += [question, {"role": "assistant", "content": text}]
        self.turns += 1
        details = usage.get("prompt_tokens_details") or {}
        return Turn(self.index, self.turns, ttft + restore_s, total + restore_s,
                    usage.get("prompt_tokens", 0), details.get("cached_tokens", 0), restore_s)


async def slot_action(http: aiohttp.ClientSession, url: str, action: str, filename: str) -> float:
    """llama-server's ``POST /slots/0?action=...``: seconds it took, as the client sees them."""
    started = time.perf_counter()
    async with http.post(f"{url}/slots/0?action={action}", json={"filename": filename}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"slot {action}: {resp.status}: {await resp.text()}")
        await resp.read()
    return time.perf_counter() - started


@dataclass
class Contender:
    """A server and how its client carries a conversation: the whole history each time
    (``full-history``), a kvtier session id (``session``), or llama-server's slot 0 with its
    manual slot file across restarts (``slot-file``)."""

    name: str
    mode: str
    start: Callable[[], Process]
    server: Process | None = None

    @property
    def key(self) -> str:
        return f"{self.name} {self.mode}"

    def conversation(self, index: int, document: str, args: argparse.Namespace) -> Conversation:
        return Conversation(index, document, args.max_tokens,
                            session_id=f"bench-{index}" if self.mode == "session" else None,
                            slot=0 if self.mode == "slot-file" else None)

    async def up(self, http: aiohttp.ClientSession) -> str:
        self.server = self.start()
        await self.server.ready(http)
        return self.server.url

    def down(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


async def interleaved(http: aiohttp.ClientSession, contenders: list[Contender], docs: list[str],
                      args: argparse.Namespace) -> dict[str, list[Turn]]:
    """Two full-history conversations per contender, A B A B A B; the contenders' requests
    alternate, so that both meet the same machine."""
    turns: dict[str, list[Turn]] = {c.key: [] for c in contenders}
    try:
        urls = [await c.up(http) for c in contenders]
        conversations = [[c.conversation(i, doc, args) for i, doc in enumerate(docs)]
                         for c in contenders]
        for _ in range(args.turns):
            for i in range(len(docs)):
                for c, url, convs in zip(contenders, urls, conversations):
                    turns[c.key].append(await convs[i].turn(http, url))
    finally:
        for c in contenders:
            c.down()
    return turns


async def resumed(http: aiohttp.ClientSession, contenders: list[Contender], docs: list[str],
                  args: argparse.Namespace) -> dict[str, list[Turn]]:
    """Per document: a first turn on every contender, a restart of all, then the follow-up on
    each in turn (the order rotates from one document to the next)."""
    turns: dict[str, list[Turn]] = {c.key: [] for c in contenders}
    for i, doc in enumerate(docs):
        conversations = [c.conversation(i, doc, args) for c in contenders]
        try:
            for c, conversation in zip(contenders, conversations):
                url = await c.up(http)
                await conversation.turn(http, url)
                if c.mode == "slot-file":
                    await slot_action(http, url, "save", f"conversation-{i}.bin")
        finally:
            for c in contenders:
                c.down()
        try:
            urls = [await c.up(http) for c in contenders]
            order = [(j + i) % len(contenders) for j in range(len(contenders))]
            for j in order:
                c, url, conversation = contenders[j], urls[j], conversations[j]
                restore_s = 0.0
                if c.mode == "slot-file":
                    restore_s = await slot_action(http, url, "restore", f"conversation-{i}.bin")
                turns[c.key].append(await conversation.turn(http, url, restore_s))
        finally:
            for c in contenders:
                c.down()
    return turns


def median_ttft(turns: list[Turn]) -> float:
    return statistics.median(t.ttft_s for t in turns)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    docs = documents(2 + args.restarts, args.doc_tokens)
    results: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=1800)
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-llama-server-") as tmp:
        base = args.work_dir or Path(tmp)

        def contender(name: str, mode: str, scenario: str) -> Contender:
            run_dir = base / scenario / f"{name}-{mode}"
            if name == "kvtier":
                return Contender(name, mode, lambda: Kvtier(args, run_dir / "data"))
            return Contender(name, mode, lambda: LlamaServer(args, run_dir / "slots"))

        # A new connection per request: llama-server's HTTP library closes a connection after a
        # streamed reply, which a pooled connection would find out only when it is reused.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            if "interleaved" in args.scenarios:
                print("interleaved full-history conversations...", file=sys.stderr, flush=True)
                contenders = [contender(n, "full-history", "interleaved") for n in args.servers]
                turns = await interleaved(http, contenders, docs[:2], args)
                for c in contenders:
                    results[f"{c.name} interleaved"] = {
                        "median_ttft_s": median_ttft([t for t in turns[c.key] if t.turn > 1]),
                        "turns": [asdict(t) for t in turns[c.key]]}
            if "resumed" in args.scenarios:
                print("resumed after a restart...", file=sys.stderr, flush=True)
                modes = {"kvtier": ["session", "full-history"], "llama-server": ["slot-file"]}
                contenders = [contender(n, m, "resumed") for n in args.servers for m in modes[n]]
                turns = await resumed(http, contenders, docs[2:], args)
                for c in contenders:
                    results[f"{c.name} resumed {c.mode}"] = {
                        "median_ttft_s": median_ttft(turns[c.key]),
                        "turns": [asdict(t) for t in turns[c.key]]}
    return results


def table(results: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        return f"{results[key]['median_ttft_s'] * 1000:.0f}" if key in results else "-"

    def ratio(a: str, b: str) -> str:
        return f"{results[a]['median_ttft_s'] / results[b]['median_ttft_s']:.2f}x" \
            if a in results and b in results else "-"

    rows = [
        "| scenario | kvtier TTFT p50 (ms) | llama-server TTFT p50 (ms) | kvtier / llama-server |",
        "|---|---|---|---|",
        f"| interleaved full-history follow-ups | {ms('kvtier interleaved')} | "
        f"{ms('llama-server interleaved')} | "
        f"{ratio('kvtier interleaved', 'llama-server interleaved')} |",
        f"| resumed after a restart (session id vs slot restore) | "
        f"{ms('kvtier resumed session')} | {ms('llama-server resumed slot-file')} | "
        f"{ratio('kvtier resumed session', 'llama-server resumed slot-file')} |",
        f"| resumed after a restart, full history (no session id) | "
        f"{ms('kvtier resumed full-history')} | {ms('llama-server resumed slot-file')} | "
        f"{ratio('kvtier resumed full-history', 'llama-server resumed slot-file')} |"]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", type=Path,
                        default=os.environ.get("LLAMA_SERVER", "/tmp/lsrv/build/bin/llama-server"),
                        help="the llama-server binary (default: $LLAMA_SERVER or "
                             "/tmp/lsrv/build/bin/llama-server)")
    parser.add_argument("--model", type=Path, default=None,
                        help="GGUF model for both servers (default: kvtier's default model)")
    parser.add_argument("--threads", type=int, default=2, help="threads, both servers")
    parser.add_argument("--slots", type=int, default=4, help="slots, both servers")
    parser.add_argument("--ctx-per-slot", type=int, default=4096, help="context per slot")
    parser.add_argument("--doc-tokens", type=int, default=2800,
                        help="approximate length of each conversation's document")
    parser.add_argument("--turns", type=int, default=3,
                        help="turns of each interleaved conversation (default 3: A B A B A B)")
    parser.add_argument("--restarts", type=int, default=3,
                        help="conversations resumed after a restart, per server and mode")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--servers", default="kvtier,llama-server", type=lambda v: v.split(","),
                        help="which servers to run (default: kvtier,llama-server)")
    parser.add_argument("--scenarios", default="interleaved,resumed",
                        type=lambda v: v.split(","),
                        help="which scenarios to run (default: interleaved,resumed)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep data and logs here (default: a temporary directory)")
    args = parser.parse_args()
    if not args.llama_server.is_file():
        print(f"skipped: no llama-server binary at {args.llama_server} (build it as "
              "docs/benchmarks_http.md says, then pass --llama-server PATH)")
        return
    if args.model is None:
        from kvtier.engine.model import default_model_path
        args.model = default_model_path()
    load_before = os.getloadavg()
    results = asyncio.run(main_async(args))
    print(table(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
