"""Do budgets bound the disk? Blocks the size of the default model's (30 layers x 256 tokens x
192 values, f16: 5.9 MB) are stored as the server stores them (written held, then their sequence
saved) into tiny budgets, and ``du`` of each tier's directory is sampled after every block, then
after a clean close. The baseline is the budget itself: the ratio is ``du / budget``.

    python -m bench.bench_disk_budget            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench.common import print_table, write_json
from kvtier.config import parse_size
from kvtier.storage.manager import TierManager
from kvtier.storage.tiers import Tier, dir_bytes
from tests.factories import NS, block_id, make_config, make_layers

BUDGETS = {"tiers.host_ram_budget": "8MiB", "tiers.local_ssd_budget": "6MiB",
           "tiers.nfs_budget": "6MiB"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=40)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="kvtier-disk-"))
    config = make_config(work, **BUDGETS)
    paths = {Tier.WARM: config.warm_path, Tier.COOL: config.cool_path,
             Tier.COLD: config.cold_path}
    peak = {t: 0 for t in Tier}
    with TierManager(config) as manager:
        for i in range(args.blocks):
            layers = make_layers(i, n_layers=30, n_tokens=256, width=192)
            seq = manager.new_sequence()
            b = manager.put_block(block_id(seq, 0), layers, hold=True)
            manager.save_sequence(NS, seq, np.arange(256), [b])
            manager.drain()
            for t, path in paths.items():
                peak[t] = max(peak[t], dir_bytes(path))
        budgets = {s.name: s.budget for s in manager.stats()}
        running = {t: dir_bytes(p) for t, p in paths.items()}
    closed = {t: dir_bytes(p) for t, p in paths.items()}
    rows, out = [], {}
    for t in Tier:
        key = ("tiers.host_ram_budget", "tiers.local_ssd_budget", "tiers.nfs_budget")[t]
        budget = parse_size(BUDGETS[key], key)
        out[t.label] = {"budget": budget, "budget_used": budgets[t.label], "peak_du": peak[t],
                        "du_before_close": running[t], "du_after_close": closed[t],
                        "peak_ratio": round(peak[t] / budget, 2),
                        "after_close_ratio": round(closed[t] / budget, 2)}
        rows.append([t.label, budget >> 20, round(peak[t] / 2**20, 1),
                     round(running[t] / 2**20, 1), round(closed[t] / 2**20, 1),
                     out[t.label]["peak_ratio"], out[t.label]["after_close_ratio"]])
    print_table(["tier", "budget MiB", "peak du MiB", "du MiB", "du closed MiB", "peak/budget",
                 "closed/budget"], rows)
    write_json("disk_budget", {"blocks": args.blocks, "budgets": BUDGETS, "tiers": out})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
