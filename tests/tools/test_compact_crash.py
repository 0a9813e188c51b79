"""SIGKILL ``kvtier compact`` in every step and at random moments; the store must open, verify,
keep every session readable, and a rerun must finish the job."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from kvtier.storage.manager import TierManager
from kvtier.tools.compact import CompactOptions, Target, compact
from kvtier.tools.verify import verify
from tests.factories import NS
from tests.tools.stores import CLI_BUDGETS, FULL_BLOCKS, N_LAYERS, session_id, store_config

FLAGS = ["--keep", "3", "--warm-target", "30%", "--cool-target", "40%"]
OPTIONS = CompactOptions(keep=3, warm_target=Target(fraction=0.3),
                         cool_target=Target(fraction=0.4))
STEPS = ["scratch", "repair", "expire", "demote", "recode", "rocksdb", "lmdb"]


def run_and_kill(path, rng: random.Random, after_step: str | None) -> None:
    """Start compact in a child; kill it a random moment after it logs ``after_step`` begins
    (or a random moment after it starts)."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    child = subprocess.Popen(
        [sys.executable, "-m", "kvtier.cli", "compact", "--data-dir", str(path), *CLI_BUDGETS,
         *FLAGS, "--verbose", "--no-progress"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if after_step is None:
            time.sleep(rng.uniform(1.0, 3.0))
        else:
            for line in child.stderr:
                if line.rstrip().endswith(f"compact: {after_step}"):
                    break
            time.sleep(rng.uniform(0.0, 0.15))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def assert_opens_and_verifies(path, sessions: set[str] | None = None) -> set[str]:
    with TierManager(store_config(path), background=False) as m:
        report = verify(m)
        assert report.ok, report.problems
        live = {s.session_id for s in m.list_sessions(limit=1000)}
        for sid in live:
            seq = m.get_sequence(NS, m.get_session(sid).sequence)
            assert len(seq.blocks) == FULL_BLOCKS + 1
            for block in seq.block_ids():
                assert len(m.get_block(block)) == N_LAYERS
    if sessions is not None:
        assert live == sessions
    return live


@pytest.mark.slow
@pytest.mark.parametrize("after_step", STEPS + [None, None, None])
def test_sigkill_during_compact_leaves_a_sound_store(template, tmp_path, after_step):
    rng = random.Random(f"{after_step}-{tmp_path.name}")
    path = tmp_path / "store"
    shutil.copytree(template.path, path)
    run_and_kill(path, rng, after_step)

    live = assert_opens_and_verifies(path)
    assert {session_id(i) for i in range(1, 4)} <= live

    with TierManager(store_config(path), background=False) as m:
        assert compact(m, OPTIONS).remaining_problems == {}
    with TierManager(store_config(path), background=False) as m:
        assert not compact(m, OPTIONS).changed
    assert_opens_and_verifies(path, {session_id(i) for i in range(1, 4)})
