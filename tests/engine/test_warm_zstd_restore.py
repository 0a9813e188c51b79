"""A warm tier with zstd (``tiers.warm_zstd_level``) restores through the engine, on the real
model, exactly as the uncompressed warm tier does: the compression is lossless (issue 13)."""

from __future__ import annotations

import numpy as np

from kvtier.config import load_config
from kvtier.engine.hot import HotContext
from kvtier.engine.restore_policy import ThroughputModel
from kvtier.engine.snapshot import Snapshotter
from kvtier.storage import codec
from kvtier.storage.manager import TierManager
from kvtier.storage.tiers import Tier
from tests.engine.test_snapshot import mean_kl, store_and_restore


def restored_logits(data_dir, model, tokens, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Live and restored logits of test_snapshot's conversation, stored in a warm tier written
    at zstd ``level``."""
    config = load_config(None, {"data_dir": str(data_dir), "model.n_slots": 2,
                                "tiers.warm_zstd_level": level})
    hot = HotContext.for_config(model, config)
    manager = TierManager(config, background=False)
    snaps = Snapshotter(hot, manager, model.fingerprint("f16", "f16", 256).namespace, 256,
                        ThroughputModel())
    try:
        live, restored = store_and_restore(hot, manager, snaps, tokens)
        warm = manager.tiers[Tier.WARM]
        headers = [codec.read_header(warm.get(key)) for key in warm.keys()]
        assert len(headers) == 3 * 30 and {h.zstd for h in headers} == {bool(level)}
    finally:
        snaps.close()
        manager.close()
        hot.close()
    return live, restored


def test_a_compressed_warm_tier_restores_the_uncompressed_ones_logits(tmp_path, model,
                                                                       document_tokens):
    _, plain = restored_logits(tmp_path / "plain", model, document_tokens, 0)
    live, packed = restored_logits(tmp_path / "zstd", model, document_tokens, 1)
    assert np.array_equal(packed, plain)
    assert mean_kl(live, packed) < 0.01          # test_snapshot's bound for warm q8
