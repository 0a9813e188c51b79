"""Shared pieces of the benchmarks: machine info, result files, tables, the default model."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import llama_cpp
    import numba
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__,
            "llama_cpp_python": llama_cpp.__version__, "date": time.strftime("%Y-%m-%d")}


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def document_tokens(model, n_chars: int = 400_000) -> np.ndarray:
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return model.tokenize(text[:n_chars])


def add_selection_options(parser) -> None:
    """``--query-layer-stride`` and ``--keep-margin``: the working set's selection settings a
    long-context benchmark may override (unset: the config's defaults)."""
    parser.add_argument("--query-layer-stride", type=int, default=None,
                        help="working_set.query_layer_stride (default: the config's)")
    parser.add_argument("--keep-margin", type=float, default=None,
                        help="working_set.keep_margin (default: the config's)")


def selection_settings(args) -> dict[str, Any]:
    """The config settings of the options :func:`add_selection_options` added, where given."""
    given = {"working_set.query_layer_stride": args.query_layer_stride,
             "working_set.keep_margin": args.keep_margin}
    return {key: value for key, value in given.items() if value is not None}


def selected(args):
    """The working-set settings a run with these options uses (``WorkingSetConfig``)."""
    from kvtier.config import load_config
    return load_config(None, selection_settings(args)).working_set
