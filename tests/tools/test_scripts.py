"""The scripts in tools/ run the same commands from a checkout."""

import json
import subprocess
from pathlib import Path

from tests.tools.stores import CLI_BUDGETS, N_SESSIONS

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def run(script: str, built, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOOLS / script), "--data-dir", str(built.path), *CLI_BUDGETS,
                           *args], capture_output=True, text=True, timeout=120)


def test_scripts_run_the_tools(built):
    done = run("kvtier-inspect", built, "sessions", "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == N_SESSIONS
    done = run("kvtier-verify", built)
    assert done.returncode == 0 and "ok: no problems" in done.stdout
    done = run("kvtier-compact", built, "--dry-run", "--keep", "1")
    assert done.returncode == 0 and "would expire 7 sessions" in done.stdout
