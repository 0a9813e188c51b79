"""Model switch benchmark: a conversation on model A resumed from the store after the server
served model B in between (and so unloaded A), against re-prefilling its history.

Run from the repository root::

    python -m bench.bench_model_switch [--tokens 1024,2048] [--repeats 3]

One in-process ``kvtier serve`` (the real HTTP server, on a loopback port) serves two models with
``model.memory_budget`` room for one (each takes ~228 MiB: its file and a 4,096-token hot tier):
A, the default GGUF, and B, a copy of it whose ``general.name`` differs by one byte (the same
weights, another file hash, so another fingerprint and storage namespace, as a different model
has). For each history length, each repeat:

1. A, session ``s``: a document of about N tokens and a question (the history, stored).
2. ``hot``: A, session ``s``, the next question, with A still loaded: its slot holds the history.
3. B, one short request: A is unloaded (its hot tier freed; its blocks stay in the store).
4. ``resume``: A, session ``s``, the next question: A is loaded again and the history restored
   from the store.
5. B again, then ``re-prefill``: A loaded again, the whole history sent as one stateless request
   with a unique first line, so nothing is reused.
6. B again, then ``load``: A loaded again for a one-token prompt.

Time to first token is measured at the client (streaming, first content chunk), median of the
repeats; how long each load of A took comes from the pool's log, and the table also gives both
paths' time to first token less that load (restore vs prefill alone). Prints a Markdown table and writes ``bench/results/model_switch.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

from bench.common import print_table, write_json
from kvtier.config import load_config
from kvtier.engine.model import default_model_path
from kvtier.http.server import run

QUESTIONS = ["Summarise the text above in one sentence.", "What is the main keyword?",
             "Give one example."]


def second_model(directory: Path) -> Path:
    """The default GGUF with one byte of ``general.name`` changed: another namespace."""
    path = directory / "model-b.gguf"
    shutil.copyfile(default_model_path(), path)
    with open(path, "r+b") as f:
        at = f.read(4096).index(b"Smollm2 135M")
        f.seek(at)
        f.write(b"T")
    return path


class Server:
    """``kvtier.http.server.run`` on its own event loop in a thread."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(300) or not hasattr(self, "url"):
            raise RuntimeError("the server did not start")

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop, self._stop = loop, asyncio.Event()

        def ready(url: str) -> None:
            self.url = url
            self._ready.set()
        try:
            loop.run_until_complete(run(self.config, self._stop, on_ready=ready))
        finally:
            self._ready.set()
            loop.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(120)

    def ask(self, model: str, messages: list[dict[str, str]], session: str | None = None,
            max_tokens: int = 8) -> tuple[float, str, dict[str, Any]]:
        """Time to first token, the reply, and the usage of one streamed chat request."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        if session:
            body["session_id"] = session
        request = urllib.request.Request(self.url + "/v1/chat/completions",
                                         json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        started = time.perf_counter()
        ttft, text, usage = None, "", {}
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                line = line.strip()
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    if ttft is None and choice["delta"].get("content") is not None:
                        ttft = time.perf_counter() - started
                    text += choice["delta"].get("content") or ""
        return ttft if ttft is not None else time.perf_counter() - started, text, usage


class LoadTimes(logging.Handler):
    """The pool's "loaded NAME in S s" log records: how long each load of a model took."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.last: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("loaded %s in"):
            name, seconds = record.args[0], record.args[1]
            self.last[name] = seconds

    def take(self, name: str) -> float:
        """The last load of ``name``'s seconds, forgotten once taken (0: it was loaded)."""
        return self.last.pop(name, 0.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def document(n_tokens: int, offset: int) -> str:
    text = "\n\n".join(topics[k] for k in sorted(topics))
    start = offset * 50_000
    return text[start:start + int(n_tokens * 3.6)]


def measure(server: Server, loads: LoadTimes, n_tokens: int, repeat: int) -> dict[str, Any]:
    session = f"switch-{n_tokens}-{repeat}-{uuid.uuid4().hex[:6]}"
    history = [{"role": "system", "content": document(n_tokens, repeat)},
               {"role": "user", "content": QUESTIONS[0]}]
    _, reply, first = server.ask("A", history, session)
    loads.take("A")
    history.append({"role": "assistant", "content": reply})
    row: dict[str, Any] = {"history_tokens": first["prompt_tokens"] + first["completion_tokens"]}

    def turn(label: str, question: str) -> None:
        nonlocal reply
        ttft, reply, usage = server.ask("A", [{"role": "user", "content": question}], session)
        history.extend([{"role": "user", "content": question},
                        {"role": "assistant", "content": reply}])
        details = usage["prompt_tokens_details"]
        row[label] = {"ttft_s": ttft, "load_s": loads.take("A"),
                      "prompt_tokens": usage["prompt_tokens"],
                      "cached_tokens": details["cached_tokens"],
                      "restored_tokens": details["restored_tokens"]}

    turn("hot", QUESTIONS[1])
    server.ask("B", [{"role": "user", "content": "Hello"}], max_tokens=1)
    turn("resume", QUESTIONS[2])
    server.ask("B", [{"role": "user", "content": "Hello"}], max_tokens=1)
    fresh = [{"role": "system", "content": f"[{uuid.uuid4().hex}]\n" + history[0]["content"]},
             *history[1:], {"role": "user", "content": QUESTIONS[2]}]
    ttft, _, usage = server.ask("A", fresh)
    row["re-prefill"] = {"ttft_s": ttft, "load_s": loads.take("A"),
                         "prompt_tokens": usage["prompt_tokens"],
                         "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                         "restored_tokens": 0}
    server.ask("B", [{"role": "user", "content": "Hello"}], max_tokens=1)
    ttft, _, usage = server.ask("A", [{"role": "user", "content": "Hi"}], max_tokens=1)
    row["load"] = {"ttft_s": ttft, "load_s": loads.take("A"),
                   "prompt_tokens": usage["prompt_tokens"],
                   "cached_tokens": 0, "restored_tokens": 0}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1024,2048",
                        help="history lengths to measure, comma-separated (about)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="model.n_threads (0: all)")
    args = parser.parse_args()
    lengths = [int(t) for t in args.tokens.split(",")]
    with tempfile.TemporaryDirectory(prefix="kvtier-switch-") as tmp:
        a = Path(tmp) / "A.gguf"
        a.symlink_to(default_model_path())
        b = second_model(Path(tmp)).rename(Path(tmp) / "B.gguf")
        config = load_config(None, {
            "data_dir": f"{tmp}/data", "server.listen": f"127.0.0.1:{free_port()}",
            "model.model_path": str(a), "model.models": [str(b)],
            "model.n_slots": 1, "model.context_size": 4096, "model.n_threads": args.threads,
            "model.memory_budget": "300MiB", "tiers.host_ram_budget": "1GiB"})
        loads = LoadTimes()
        logging.getLogger("kvtier.engine.pool").addHandler(loads)
        logging.getLogger("kvtier.engine.pool").setLevel(logging.INFO)
        server = Server(config)
        try:
            server.ask("A", [{"role": "user", "content": "warm up"}], max_tokens=1)
            rows = {n: [measure(server, loads, n, r) for r in range(args.repeats)]
                    for n in lengths}
        finally:
            server.stop()
    table, results = [], []
    for n, runs in rows.items():
        med = {label: statistics.median(r[label]["ttft_s"] for r in runs)
               for label in ("hot", "resume", "re-prefill", "load")}
        # Loading the model is part of both paths; without it, restore vs prefill remains.
        net = {label: statistics.median(r[label]["ttft_s"] - r[label]["load_s"] for r in runs)
               for label in ("resume", "re-prefill")}
        load = statistics.median(r[label]["load_s"] for r in runs
                                 for label in ("resume", "re-prefill", "load"))
        history = statistics.median(r["history_tokens"] for r in runs)
        restored = statistics.median(r["resume"]["restored_tokens"] for r in runs)
        results.append({"tokens": n, "history_tokens": history, "median_ttft_s": med,
                        "median_ttft_less_load_s": net, "median_load_s": load,
                        "resume_restored_tokens": restored,
                        "re_prefill_over_resume": med["re-prefill"] / med["resume"],
                        "runs": runs})
        table.append([int(history), med["hot"], load, med["resume"], med["re-prefill"],
                      f"{med['re-prefill'] / med['resume']:.2f}x", net["resume"],
                      net["re-prefill"], f"{net['re-prefill'] / net['resume']:.2f}x",
                      int(restored)])
    print_table(["history tokens", "hot (no switch) s", "model load s",
                 "resume after switch s", "re-prefill after switch s", "re-prefill / resume",
                 "resume less load s", "re-prefill less load s", "ratio less load",
                 "restored tokens"], table)
    path = write_json("model_switch", {"repeats": args.repeats, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
