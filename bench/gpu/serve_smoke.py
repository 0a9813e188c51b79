"""On the GPU machine: the real server, end to end, on a model offloaded to the GPU.

    python3 -m bench.gpu.serve_smoke --model /tmp/kvtier-8b.gguf [--long-tokens 40000]

Starts ``kvtier serve`` (all layers on the GPU, a hot share of ``--slot-tokens`` per slot), then:
a chat in a session; a restart; the session resumed (its history must come back from the store:
``cached_tokens``); a completion longer than a slot's hot share (a working set on the GPU); the
statistics and /health. Every request must answer 200. Prints and writes the answers' usage and
times to $OUT/serve_smoke.json (else bench/out/). Random-weight models answer gibberish: this
checks the path, not the words.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: argparse.Namespace, data_dir: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = ["model.n_gpu_layers=-1", "model.n_slots=2",
                    f"model.context_size={args.context}",
                    f"tiers.gpu_vram_budget={2 * args.slot_tokens * args.kv_bytes_per_token}"]
        command = [sys.executable, "-X", "faulthandler", "-m", "kvtier.cli", "serve", "--model", args.model,
                   "--data-dir", data_dir, "--listen", f"127.0.0.1:{self.port}"]
        for setting in settings + args.set:
            command += ["--set", setting]
        self.log_path = os.path.join(data_dir, "server.log")
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                self.get("/health")
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.process.returncode}")
                time.sleep(0.5)
        raise RuntimeError("the server did not start in 600 s")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def post(self, path: str, body: dict) -> tuple[dict, float]:
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.load(response), time.perf_counter() - start

    def stop(self, timeout: float = 120) -> None:
        """SIGTERM, and wait; a server that does not stop in ``timeout`` is aborted, its threads'
        stacks (faulthandler) and the end of its log printed."""
        self.process.send_signal(signal.SIGTERM)
        start = time.perf_counter()
        try:
            self.process.wait(timeout=timeout)
            self.stop_seconds = time.perf_counter() - start
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)
            self.process.wait(timeout=60)
            with open(self.log_path, "rb") as f:
                print(f.read()[-20000:].decode(errors="replace"))
            raise RuntimeError(f"the server did not stop within {timeout} s of SIGTERM")
        finally:
            self.log.close()


def words(n: int) -> str:
    return " ".join(f"line {i} of the long document says nothing new." for i in range(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--slot-tokens", type=int, default=8192, help="a slot's hot share")
    parser.add_argument("--kv-bytes-per-token", type=int, default=131072,
                        help="the model's f16 KV per token (131072: the Llama 3.1 8B shape)")
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more config for the server (repeatable)")
    parser.add_argument("--history-lines", type=int, default=300)
    parser.add_argument("--long-lines", type=int, default=3000)
    args = parser.parse_args()
    out = os.environ.get("OUT", "bench/out")
    os.makedirs(out, exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix="kvtier-gpu-smoke-")
    results: dict = {"model": args.model}
    server = Server(args, data_dir)
    try:
        history = [{"role": "user", "content": words(args.history_lines)}]
        body = {"model": "local", "messages": history, "max_tokens": 16, "temperature": 0,
                "session_id": "gpu-smoke"}
        reply, seconds = server.post("/v1/chat/completions", body)
        results["first_turn"] = {"usage": reply["usage"], "seconds": seconds}
    finally:
        server.stop()
    results["first_stop_seconds"] = server.stop_seconds
    server = Server(args, data_dir)
    try:
        body = {"model": "local", "messages": [{"role": "user", "content": "And then?"}],
                "max_tokens": 16, "temperature": 0, "session_id": "gpu-smoke"}
        reply, seconds = server.post("/v1/chat/completions", body)
        results["resumed_after_restart"] = {"usage": reply["usage"], "seconds": seconds}
        body = {"model": "local", "prompt": words(args.long_lines), "max_tokens": 32,
                "temperature": 0}
        reply, seconds = server.post("/v1/completions", body)
        results["longer_than_hot_share"] = {"usage": reply["usage"], "seconds": seconds}
        stats = server.get("/v1/cache/stats")
        results["stats"] = {"hot": stats["hot"], "working_set": stats["working_set"],
                            "tiers": stats["tiers"], "store": stats["store"]}
        results["health"] = server.get("/health")["status"]
    finally:
        server.stop()
    results["second_stop_seconds"] = server.stop_seconds
    resumed = results["resumed_after_restart"]["usage"]["prompt_tokens_details"]
    long_usage = results["longer_than_hot_share"]["usage"]
    results["checks"] = {
        "resumed_from_store": resumed.get("restored_tokens", 0) > 0,
        "long_prompt_on_working_set": long_usage["prompt_tokens"] > args.slot_tokens
        and long_usage.get("prompt_tokens_details", {}).get("working_set_tokens", 0) > 0,
        "health": results["health"] in ("ok", "degraded")}
    print(json.dumps(results, indent=1))
    with open(os.path.join(out, "serve_smoke.json"), "w") as f:
        json.dump(results, f, indent=1)
    if not all(results["checks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
