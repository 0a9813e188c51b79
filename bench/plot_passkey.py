"""Plot every bench/results/passkey*.json together: passkeys found against prompt length, one line
per method (kvtier's by block size), as runs of bench_passkey with different lengths, methods and
block sizes write them.

    python -m bench.plot_passkey        # writes docs/passkey.png
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).parent.parent


def main() -> None:
    found: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    hot = set()
    for path in sorted((ROOT / "bench" / "results").glob("passkey*.json")):
        data = json.loads(path.read_text())
        hot.add(data["hot_tokens"])
        for r in data["results"]:
            label = r["method"] if r["method"] != "kvtier" \
                else f"kvtier, {data['block_size']}-token blocks"
            found[label][r["length"]].append(r["found"])
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label in sorted(found):
        lengths = sorted(found[label])
        ax.plot(lengths, [100 * sum(found[label][n]) / len(found[label][n]) for n in lengths],
                marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("passkeys found (%)")
    ax.set_ylim(-5, 105)
    ax.axvline(8192, color="grey", linestyle=":", linewidth=1)
    ax.set_title(f"Passkey, SmolLM2-135M (trained on 8K), hot share {'/'.join(map(str, hot))}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "passkey.png", dpi=120)


if __name__ == "__main__":
    main()
