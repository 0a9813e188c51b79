"""SIGKILL a process that is writing blocks, many times; the store must reopen consistent."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kvtier.storage import codec
from kvtier.storage.manager import TierManager
from tests.factories import make_config

WRITER = textwrap.dedent("""
    import sys, numpy as np
    from kvtier.storage.manager import TierManager
    from tests.factories import NS, block_id, make_config, make_layers
    budgets = dict(zip(("tiers.host_ram_budget", "tiers.local_ssd_budget", "tiers.nfs_budget"),
                       sys.argv[2:5]))
    manager = TierManager(make_config(sys.argv[1], **budgets))
    seq = manager.new_sequence()
    print("ready", flush=True)
    i = 0
    while True:
        # As the store writer does: held while the background balancer evicts, then saved.
        ids = [manager.put_block(block_id(seq, b), make_layers(i + b), hold=True)
               for b in range(3)]
        entry = manager.save_sequence(NS, seq, np.arange(3 * 64), ids)
        assert len(entry.blocks) == 3, "a block the writer held was dropped before the save"
        if i % 3 == 2:
            manager.delete_sequence(NS, seq - 1)
        seq = manager.new_sequence()
        i += 1
""")


BUDGETS = {"small": ("1MiB", "400KiB", "400KiB"),
           # Cool and cold hold about three blocks each: the balancer drops while saves run.
           "tiny": ("1MiB", "64KiB", "64KiB")}


@pytest.mark.slow
@pytest.mark.parametrize("budgets,rounds", [("small", 12), ("tiny", 8)])
def test_sigkill_at_random_moments_leaves_a_consistent_store(tmp_path, budgets, rounds):
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    sizes = BUDGETS[budgets]
    config = make_config(tmp_path, **dict(zip(("tiers.host_ram_budget",
                                               "tiers.local_ssd_budget", "tiers.nfs_budget"),
                                              sizes)))
    for round_ in range(rounds):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), *sizes],
                                 env=env, stdout=subprocess.PIPE)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 1.5))
        child.send_signal(signal.SIGKILL)
        child.wait()

        with TierManager(config, background=False) as manager:
            blocks = manager.blocks()
            # Read as the inspection tools do: no access is counted and nothing is promoted, so
            # that checking cannot push other blocks out of the store.
            for block, entry in blocks.items():
                _, values = manager.read_records(block)
                layers = [codec.decode_record(v)[1] for v in values]   # checksums verified
                assert len(layers) == entry.n_layers
            for seq in manager.sequences():
                assert all(manager.block_entry(b) is not None for b in seq.block_ids())
            report = manager.check(fix=False)
            assert report.ok, report.problems
            expected = {b.key(i).to_bytes() for b, e in manager.blocks().items()
                        for i in range(e.n_layers)}
            stored = {k for tier in manager.tiers for k in tier.keys()}
            assert stored == expected, f"round {round_}"
