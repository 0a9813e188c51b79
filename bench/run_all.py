"""Run every benchmark in turn (what `make bench` does); each writes bench/results/<name>.json.

Run them on an otherwise idle machine: llama.cpp's threads spin-wait, so any other load distorts
every timing here.
"""

from __future__ import annotations

import subprocess
import sys

BENCHES = ["bench_quant", "bench_tiers", "bench_decode_path", "bench_restore", "bench_decode",
           "bench_fidelity", "bench_http", "bench_passkey", "bench_multiturn", "bench_perplexity",
           "bench_long_cost", "bench_tiers_at_work", "bench_input_limits",
           "bench_swa_memory", "bench_model_switch"]
"""The long-context ones (passkey to 32K tokens on 2 cores) take about an hour together;
bench_llama_server needs a llama-server binary (see docs/benchmarks_http.md) and the GPU ones a GPU
machine (bench/gpu/)."""


def main() -> None:
    for name in BENCHES:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, "-m", f"bench.{name}"], check=True)
    subprocess.run([sys.executable, "-m", "bench.plot_restore"], check=True)


if __name__ == "__main__":
    main()
