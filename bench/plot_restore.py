"""Plot bench/results/restore.json: time to first token of a resumed conversation vs its length.

    python -m bench.plot_restore        # writes docs/restore.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).parent.parent


def main() -> None:
    data = json.loads((ROOT / "bench" / "results" / "restore.json").read_text())
    rows = data["results"]
    tokens = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("prefill_s", "re-prefill", "o-"),
              ("state_file_s", "llama.cpp state file (f16)", "s--"),
              ("warm_s", "kvtier warm (LMDB, Q8)", "^-"),
              ("cool_s", "kvtier cool (RocksDB, Q4+zstd)", "v-"),
              ("cold_s", "kvtier cold (RocksDB, Q4+zstd)", "d:")]
    for key, label, style in series:
        ax.plot(tokens, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(tokens, [str(t) for t in tokens])
    ax.set_xlabel("conversation length (tokens)")
    ax.set_ylabel("time to first token (s)")
    m = data["machine"]
    ax.set_title(f"Resuming a conversation: SmolLM2-135M, {m['cores']} CPU cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = ROOT / "docs" / "restore.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
