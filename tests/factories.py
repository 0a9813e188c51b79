"""Small factories for storage tests: configs with tiny budgets and synthetic f16 KV blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvtier.config import Config, load_config
from kvtier.ggml import F16
from kvtier.storage.records import BlockId, LayerKV, Namespace, TensorRows, namespace_of

NS = namespace_of(b"test-model")
WIDTH = 64


def make_config(tmp: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {"data_dir": str(tmp), "tiers.host_ram_budget": "1MiB",
                              "tiers.local_ssd_budget": "4MiB", "tiers.nfs_budget": "16MiB"}
    values.update(overrides)
    return load_config(None, values)


def f16_rows(rng: np.random.Generator, n_tokens: int, width: int = WIDTH,
             outliers: int = 2) -> TensorRows:
    """Keys-like f16 rows: mostly N(0,1), with a few outlier channels (as real keys have)."""
    values = rng.standard_normal((n_tokens, width)).astype(np.float32)
    values[:, :outliers] *= 20.0
    return TensorRows(F16.id, values.astype(np.float16).view(np.uint8))


def make_layers(seed: int, n_layers: int = 4, n_tokens: int = 64, width: int = WIDTH
                ) -> list[LayerKV]:
    rng = np.random.default_rng(seed)
    return [LayerKV(f16_rows(rng, n_tokens, width), f16_rows(rng, n_tokens, width, outliers=0))
            for _ in range(n_layers)]


def block_id(sequence: int, block: int, namespace: Namespace = NS) -> BlockId:
    return BlockId(namespace, sequence, block)


def f16(rows: TensorRows) -> np.ndarray:
    return rows.rows.view(np.float16).astype(np.float32)
