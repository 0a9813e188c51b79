"""SIGKILL soak: ``kvtier serve`` under a load of concurrent sessions, killed at a random moment
(some rounds while it starts), round after round on one data directory with tiny budgets.

After each kill, ``kvtier inspect verify`` must find no problem (the store is repaired when it
opens), and the next server must still have every session a client got an answer for. Counted:
requests answered 200 and not (a 400, by its ``param``: a session that outgrew the context goes
on in a new one), kills during startup, verify failures, sessions lost, and turns lost (answered,
but missing from the session after the kill: a turn's messages are committed before its reply,
its KV in the background).

    python -m bench.bench_soak --rounds 100          # ~20 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from bench.bench_http import free_port
from bench.common import write_json

BUDGETS = {"tiers.host_ram_budget": "8MiB", "tiers.local_ssd_budget": "6MiB",
           "tiers.nfs_budget": "6MiB"}
SYSTEM = ("You are a terse assistant. " * 60).strip()     # a shared full block


def call(url: str, method: str = "GET", body: Any = None, timeout: float = 120
         ) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, None
    except (OSError, ValueError) as exc:
        if os.environ.get("SOAK_DEBUG"):
            print(repr(exc), file=sys.stderr)
        return -1, None      # the server died under the request


def serve(data: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    sets = [a for k, v in BUDGETS.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtier.cli", "serve", "--data-dir", str(data),
         "--listen", f"127.0.0.1:{port}", "--set", "model.context_size=2048",
         "--set", "model.n_slots=4", "--set", "model.n_threads=2", *sets],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def ready(proc: subprocess.Popen, url: str, deadline_s: float = 300) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and proc.poll() is None:
        if call(url + "/health", timeout=2)[0] == 200:
            return True
        time.sleep(0.1)
    return False


def verify(data: Path) -> dict[str, Any]:
    sets = [a for k, v in BUDGETS.items() for a in ("--set", f"{k}={v}")]
    done = subprocess.run([sys.executable, "-m", "kvtier.cli", "inspect", "verify", "--data-dir",
                           str(data), *sets, "--json", "--no-progress"],
                          capture_output=True, text=True)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {"ok": False, "problem_counts": {"crashed": 1}, "stderr": done.stderr[-2000:]}
    report["returncode"] = done.returncode
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--name", default="soak", help="results file: bench/results/NAME.json")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--startup-kills", type=float, default=0.1,
                        help="share of rounds killed while the server starts")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--min-load-s", type=float, default=8.0)
    parser.add_argument("--max-load-s", type=float, default=40.0,
                        help="the kill comes this long (at most) after the load starts")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kvtier-soak-"))
    data, log = work / "store", work / "server.log"
    answered: Counter[str] = Counter()        # session -> turns answered 200
    counts: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    lost_sessions: set[str] = set()
    lost_turns = 0
    start = time.monotonic()
    for round_ in range(args.rounds):
        proc, url = serve(data, log)
        if rng.random() < args.startup_kills:
            time.sleep(rng.uniform(0.2, 4.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            counts["startup_kills"] += 1
        else:
            if not ready(proc, url):
                counts["failed_starts"] += 1
                proc.kill()
                proc.wait()
                continue
            # Every session answered before must still be there, with its answered turns.
            for sid, turns in answered.items():
                status, info = call(f"{url}/v1/sessions/{sid}")
                if status != 200:
                    lost_sessions.add(sid)
                elif info["n_messages"] < 3 * turns:     # system, user, reply per turn
                    lost_turns += turns - info["n_messages"] // 3
                    answered[sid] = info["n_messages"] // 3
            stop = threading.Event()

            def client(k: int) -> None:
                sid, n = f"r{round_ % 10}-c{k}", 0
                while not stop.is_set():
                    status, body = call(f"{url}/v1/chat/completions", "POST", {
                        "session_id": sid, "max_tokens": 4, "temperature": 0.7,
                        "messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": f"Say something about {k}."}]})
                    if status == -1:
                        counts["cut_by_kill"] += 1      # the kill: no answer, nothing promised
                        return
                    counts[f"status_{status}"] += 1
                    if status == 200:
                        answered[sid] += 1
                    elif status == 400:
                        # The session outgrew the context: go on in a new one, as a client would.
                        error = (body or {}).get("error", {})
                        counts[f"400_{error.get('param') or error.get('code')}"] += 1
                        n += 1
                        sid = f"r{round_ % 10}-c{k}-{n}"

            clients = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
            for c in clients:
                c.start()
            time.sleep(rng.uniform(args.min_load_s, args.max_load_s))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stop.set()
            for c in clients:
                c.join()
        report = verify(data)
        if not report.get("ok"):
            problems.update(report.get("problem_counts", {}))
            counts["verify_failures"] += 1
        counts["rounds"] += 1
        print(f"round {round_ + 1}/{args.rounds}: {dict(counts)} problems={dict(problems)} "
              f"lost sessions={len(lost_sessions)} lost turns={lost_turns}", flush=True)
        result = {"rounds_planned": args.rounds, "clients": args.clients, "budgets": BUDGETS,
                  "counts": dict(counts), "verify_problems": dict(problems),
                  "sessions_answered": len(answered), "turns_answered": sum(answered.values()),
                  "lost_sessions": sorted(lost_sessions), "lost_turns": lost_turns,
                  "seconds": round(time.monotonic() - start, 1), "data_dir": str(data)}
        write_json(args.name, result)      # after every round: a cut run keeps its numbers
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
