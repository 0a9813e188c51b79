"""What each kind of damage costs: the store of ``tests/tools/stores.py`` damaged one way at a
time (``tests/reliability/damage.py``), opened, and every block read; a markdown table of what was
moved aside, counted corrupt, still readable, and which sessions were kept.

    python -m bench.bench_fault_losses           # ~10 s
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from bench.common import write_json
from kvtier.errors import KvtierError
from kvtier.storage.manager import TierManager
from tests.reliability.damage import DAMAGE
from tests.tools.stores import build_store, store_config


def main() -> None:
    logging.disable(logging.CRITICAL)
    work = Path(tempfile.mkdtemp(prefix="kvtier-losses-"))
    template = build_store(work / "template")
    print(f"{template.n_blocks} blocks {template.tiers}, {len(template.sequences)} sessions")
    print("| damage | what was done | moved aside at open | blocks counted corrupt | "
          "blocks readable after | sessions kept |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for name in sorted(DAMAGE):
        data = work / name
        shutil.copytree(template.path, data)
        what = DAMAGE[name](data)
        with TierManager(store_config(data), background=False) as manager:
            results = manager.get_blocks(list(manager.blocks()))
            readable = sum(not isinstance(r, KvtierError) for r in results)
            rows[name] = {"damage": what, "moved_aside": sorted(manager.degraded),
                          "corrupt": sum(s.corrupt for s in manager.stats()),
                          "readable": readable, "blocks": template.n_blocks,
                          "sessions": len(manager.list_sessions()),
                          "sessions_before": len(template.sequences)}
        r = rows[name]
        print(f"| {name} | {what} | {', '.join(r['moved_aside']) or '-'} | {r['corrupt']} | "
              f"{readable}/{template.n_blocks} | {r['sessions']}/{r['sessions_before']} |")
    write_json("fault_losses", {"damage": rows})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
