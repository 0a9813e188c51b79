"""The server on damaged stores, full disks and tiny budgets, with the real default model: every
request answers 200, the damage is counted (``corrupt``, ``write_errors``) or reported
(``/health`` ``degraded``), and ``kvtier compact --scrub`` leaves a store that verifies clean."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtier.cli import main
from tests.engine.conftest import document_text
from tests.http.conftest import Server, running_server, server_config
from tests.reliability.damage import DAMAGE

BUDGETS = {"tiers.host_ram_budget": "4MiB", "tiers.local_ssd_budget": "8MiB",
           "tiers.nfs_budget": "64MiB"}
SYSTEM = document_text()[:1500]     # ~350 tokens: one full block shared by every session
SESSIONS = ("s1", "s2", "s3")


def ask(server: Server, session: str, text: str) -> dict[str, Any]:
    status, body = server.json("POST", "/v1/chat/completions", {
        "max_tokens": 3, "temperature": 0, "session_id": session,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]})
    assert status == 200, body
    return body


def tiers(server: Server) -> dict[str, dict[str, Any]]:
    status, stats = server.json("GET", "/v1/cache/stats")
    assert status == 200
    return {t["name"]: t for t in stats["tiers"]}


def cli(data: Path, *args: str, **budgets: str) -> int:
    sets = [a for k, v in {**BUDGETS, **budgets}.items() for a in ("--set", f"{k}={v}")]
    return main([*args, "--data-dir", str(data), *sets, "--no-progress"])


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store the server filled: three sessions whose blocks lie in every tier."""
    data = tmp_path_factory.mktemp("server-faults") / "store"
    with running_server(server_config(data, **BUDGETS)) as server:
        for sid in SESSIONS:
            ask(server, sid, f"Say hello to {sid}.")
        deadline = time.monotonic() + 60     # stored and demoted in the background
        while tiers(server)["cool"]["blocks"] == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert tiers(server)["cool"]["blocks"] > 0
    return data


SERVER_DAMAGE = {
    # Met while serving (a blob that fails its CRC) and at open (a truncated map, a catalog
    # with random bytes: moved aside, the catalog salvaged), in one store.
    "blob+map+catalog": ("cool_blob_bytes", "warm_map_truncated", "catalog_bytes"),
    "sst+manifest": ("cold_sst_bytes", "cool_manifest_deleted"),
}
"""Each kind of damage alone is in test_store_faults; here, two servers meet all of them."""


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SERVER_DAMAGE))
def test_the_server_answers_every_request_on_a_damaged_store(template: Path, tmp_path: Path,
                                                             name: str) -> None:
    data = tmp_path / "store"
    shutil.copytree(template, data)
    for damage in SERVER_DAMAGE[name]:
        try:
            DAMAGE[damage](data)
        except FileNotFoundError:   # that tier holds no such file in this store
            pass
    with running_server(server_config(data, **BUDGETS)) as server:
        status, health = server.json("GET", "/health")
        assert status == 200
        for sid in SESSIONS:
            reply = ask(server, sid, "And now say goodbye.")
            assert reply["choices"][0]["message"]["content"] is not None
        stats = tiers(server)
        seen = health["status"] == "degraded" or sum(t["corrupt"] for t in stats.values())
        assert seen, (name, health, stats)
        if health["status"] == "degraded":
            assert health["degraded"]
        status, metrics = server.request("GET", "/metrics")[0], \
            server.request("GET", "/metrics")[2].decode()
        assert status == 200 and "kvtier_tier_corrupt" in metrics
    assert cli(data, "compact", "--scrub") == 0
    assert cli(data, "inspect", "verify") == 0


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``, or a skip saying why there cannot be one."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (id -u is not 0)")
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_a_full_disk_costs_the_cache_never_a_reply(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "48m") as disk:
        data = disk / "store"
        budgets = {"tiers.host_ram_budget": "1GiB", "tiers.local_ssd_budget": "1GiB",
                   "tiers.nfs_budget": "1GiB"}
        with running_server(server_config(data, **budgets)) as server:
            capped = tiers(server)
            assert all(t["budget"] < 48 << 20 for t in capped.values())   # capped at start
            ask(server, "before", "Say hello.")
            filler = disk / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"],
                           capture_output=True)
            for i in range(2):
                ask(server, f"full-{i}", f"Count to {i + 2}.")
            ask(server, "before", "Say it again.")
            status, health = server.json("GET", "/health")
            status, stats = server.json("GET", "/v1/cache/stats")
            failed = sum(t["write_errors"] for t in stats["tiers"]) + stats["store"]["failures"]
            assert failed > 0, stats
            assert health["status"] == "degraded" or stats["store"]["failures"], health
            filler.unlink()
            for i in range(2):
                ask(server, f"after-{i}", f"Spell the number {i}.")
            assert server.json("GET", "/v1/sessions/after-1")[0] == 200
        # The server closed on a disk with room again: the store verifies (after repair).
        assert cli(data, "compact", "--scrub", **budgets) == 0
        assert cli(data, "inspect", "verify", **budgets) == 0


@pytest.mark.slow
def test_tiny_budgets_lose_no_reply_and_leave_a_clean_store(tmp_path: Path) -> None:
    # Warm is smaller than one block of the default model (3.4 MB in Q8): blocks go to cool.
    tiny = {"tiers.host_ram_budget": "2MiB", "tiers.local_ssd_budget": "6MiB",
            "tiers.nfs_budget": "6MiB"}
    data = tmp_path / "store"
    with running_server(server_config(data, **tiny)) as server:
        for turn in range(2):
            for i in range(4):
                ask(server, f"t{i}", f"Turn {turn}: name a colour for {i}.")
        stats = tiers(server)
        assert stats["cold"]["drops"] + stats["cool"]["demotions"] > 0, stats
        for i in range(4):
            assert server.json("GET", f"/v1/sessions/t{i}")[0] == 200
    assert cli(data, "inspect", "verify", **tiny) == 0
