"""What llama.cpp's full-size window cache (``model.swa_full``) costs a sliding-window model, and
what it buys: the KV memory of the hot tier with it on and off, and whether a conversation that
shares only its first blocks with a stored one restores them.

    python -m bench.bench_swa_memory [--slots 4]

Gemma 3 270M (the test model, ``make install``), the default hot share (4,096 tokens a slot).
Memory is llama.cpp's own account of its KV buffers (its log). Writes
bench/results/swa_memory.json.
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile

from bench.common import print_table, write_json
from kvtier.config import load_config
from kvtier.engine.api import ChatMessage, GenerationRequest, SamplingParams
from kvtier.engine.engine import Engine
from tests.engine.conftest import document_text
from tests.models.conftest import gemma3_path

_SIZE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers")


class _KvSizes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.caches: list[tuple[float, int, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = _SIZE.search(record.getMessage())
        if found:
            self.caches.append((float(found[1]), int(found[2]), int(found[3])))


def _ask(engine: Engine, text: str):
    return engine.generate(GenerationRequest(messages=(ChatMessage("user", text),),
                                             sampling=SamplingParams(temperature=0.0,
                                                                     max_tokens=4)))


def measure(swa_full: bool, slots: int) -> dict:
    handler = _KvSizes()
    log = logging.getLogger("kvtier.llama_cpp")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    document = document_text()[30_000:44_000]   # ~3,500 tokens: more than a window-sized cache
    with tempfile.TemporaryDirectory() as data_dir:
        engine = Engine(load_config(None, {"data_dir": data_dir, "model.n_slots": slots,
                                           "model.model_path": str(gemma3_path()),
                                           "model.swa_full": swa_full}))
        try:
            _ask(engine, "Read this text.\n\n" + document + "\n\nWhat is it about?")
            engine._scheduler.writer.drain()
            # A conversation sharing the first ~600 tokens, from the store (slots emptied).
            for slot in engine._scheduler.hot.slots:
                engine._scheduler.hot.clear(slot)
            branch = _ask(engine, "Read this text.\n\n" + document[:2_400] + "\n\nWho wrote it?")
        finally:
            engine.close()
    log.removeHandler(handler)
    (full_mib, cells, full_layers), (swa_mib, swa_cells, swa_layers) = handler.caches[:2]
    return {"swa_full": swa_full, "slots": slots, "full_cache_mib": full_mib,
            "full_cells": cells, "full_layers": full_layers, "window_cache_mib": swa_mib,
            "window_cells": swa_cells, "window_layers": swa_layers,
            "kv_mib": full_mib + swa_mib, "branch_prompt": branch.usage.prompt_tokens,
            "branch_restored": branch.usage.restored_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=4)
    args = parser.parse_args()
    rows = [measure(on, args.slots) for on in (True, False)]
    print_table(["swa_full", "full cache", "window cache", "KV MiB", "branch restored"],
                [[r["swa_full"], f"{r['full_cells']} cells, {r['full_cache_mib']} MiB",
                  f"{r['window_cells']} cells, {r['window_cache_mib']} MiB", r["kv_mib"],
                  f"{r['branch_restored']} of {r['branch_prompt']}"] for r in rows])
    print("KV memory, on / off:", round(rows[0]["kv_mib"] / rows[1]["kv_mib"], 2))
    print("wrote", write_json("swa_memory", {"runs": rows}))


if __name__ == "__main__":
    main()
