"""Restores through the cool tier in each cool/cold format, and from warm ``q8c``, on the real
model (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.config import load_config
from kvtier.engine.hot import HotContext
from kvtier.engine.restore_policy import ThroughputModel
from kvtier.engine.snapshot import Snapshotter, StoredSequence
from kvtier.storage import codec
from kvtier.storage.manager import TierManager
from kvtier.storage.quant import Encoding, Grouping
from kvtier.storage.tiers import Tier
from tests.engine.test_snapshot import (N_PROMPT, mean_kl, next_logits, prefill,
                                        store_and_restore)


@pytest.fixture
def cool_setup(tmp_path, model, request):
    overrides = {"data_dir": str(tmp_path), "model.n_slots": 2}
    if isinstance(request.param, dict):
        overrides.update(request.param)
    elif request.param is not None:
        overrides["tiers.cold_format"] = request.param
    config = load_config(None, overrides)
    hot = HotContext.for_config(model, config)
    manager = TierManager(config, background=False)
    ns = model.fingerprint("f16", "f16", 256).namespace
    snaps = Snapshotter(hot, manager, ns, 256, ThroughputModel())
    yield hot, manager, snaps
    snaps.close()
    manager.close()
    hot.close()


def cool_headers(manager: TierManager) -> list[codec.RecordHeader]:
    cool = manager.tiers[Tier.COOL]
    return [codec.read_header(cool.get(key)) for key in cool.keys()]


# None: the default. The bound is the one test_snapshot uses for cool Q8 (3x the measured KL of
# either format; a broken codec gives a KL above 1).
@pytest.mark.parametrize("cool_setup, k, v", [
    (None, (Encoding.Q6, Grouping.PER_CHANNEL, 256), (Encoding.Q4, Grouping.PER_CHANNEL, 128)),
    ("q4", (Encoding.Q4, Grouping.PER_CHANNEL, 16), (Encoding.Q4, Grouping.PER_TOKEN, 16)),
], indirect=["cool_setup"])
def test_a_restore_from_cool_stays_close_in_each_format(cool_setup, k, v, document_tokens):
    hot, manager, snaps = cool_setup
    headers = []
    live, restored = store_and_restore(hot, manager, snaps, document_tokens, Tier.COOL,
                                       lambda: headers.extend(cool_headers(manager)))
    assert len(headers) == 3 * 30 and all(h.zstd for h in headers)  # 2 full blocks + the tail
    for h in headers:
        assert (h.k.encoding, h.k.grouping, h.k.group_size) == k
        assert (h.v.encoding, h.v.grouping, h.v.group_size) == v
    assert mean_kl(live, restored) < 0.02
    assert np.sum(live.argmax(axis=1) == restored.argmax(axis=1)) >= 13



# None: the default, q8c since issue 13's second round.
@pytest.mark.parametrize("cool_setup", [None], indirect=True)
def test_a_restore_from_warm_q8c_stays_close(cool_setup, document_tokens):
    hot, manager, snaps = cool_setup
    live, restored = store_and_restore(hot, manager, snaps, document_tokens)
    warm = manager.tiers[Tier.WARM]
    headers = [codec.read_header(warm.get(key)) for key in warm.keys()]
    assert len(headers) == 3 * 30
    assert {(h.k.encoding, h.k.grouping, h.k.group_size, h.v.encoding, h.v.grouping,
             h.v.group_size) for h in headers} == {
        (Encoding.Q8, Grouping.PER_CHANNEL, 256, Encoding.Q8, Grouping.PER_CHANNEL, 256)}
    assert mean_kl(live, restored) < 0.01      # test_snapshot's bound for warm q8
    assert np.sum(live.argmax(axis=1) == restored.argmax(axis=1)) >= 14


def test_warm_q8_records_restore_after_the_default_became_q8c(tmp_path, model, document_tokens):
    prompt = document_tokens[:N_PROMPT]
    following = document_tokens[N_PROMPT:N_PROMPT + 8]
    ns = model.fingerprint("f16", "f16", 256).namespace
    old = load_config(None, {"data_dir": str(tmp_path), "model.n_slots": 2,
                             "tiers.warm_format": "q8"})
    hot = HotContext.for_config(model, old)
    try:
        with TierManager(old, background=False) as manager:
            snaps = Snapshotter(hot, manager, ns, 256, ThroughputModel())
            prefill(hot, 0, prompt)
            seq = snaps.save(hot.slots[0], StoredSequence(manager.new_sequence()))
            live = np.stack([next_logits(hot, 0, int(t)) for t in following])
            snaps.close()
        config = load_config(None, {"data_dir": str(tmp_path), "model.n_slots": 2})
        assert config.tiers.warm_format == "q8c"
        with TierManager(config, background=False) as manager:
            warm = manager.tiers[Tier.WARM]
            assert {codec.read_header(warm.get(k)).v.grouping for k in warm.keys()} == {
                Grouping.PER_TOKEN}                      # still q8's records
            snaps = Snapshotter(hot, manager, ns, 256, ThroughputModel())
            hot.clear(hot.slots[0])
            plan = snaps.plan(prompt, manager.get_sequence(ns, seq.seq_id))
            assert snaps.restore(hot.slots[0], plan, prompt).n_tokens == N_PROMPT
            again = np.stack([next_logits(hot, 0, int(t)) for t in following])
            snaps.close()
    finally:
        hot.close()
    assert mean_kl(live, again) < 0.01                  # test_snapshot's bound for warm q8
    assert np.sum(live.argmax(axis=1) == again.argmax(axis=1)) >= 7
