from kvtier.engine.restore_policy import ThroughputModel
from kvtier.storage.tiers import Tier

WARM, COOL, COLD = Tier.WARM, Tier.COOL, Tier.COLD


def rates() -> ThroughputModel:
    return ThroughputModel(prefill_tps=1000.0,
                           restore_tps={WARM: 50_000.0, COOL: 5_000.0, COLD: 500.0})


def test_restore_wins_only_when_faster_than_prefill():
    model = rates()
    assert model.restore_wins({WARM: 1000})
    assert model.restore_wins({COOL: 1000})
    assert not model.restore_wins({COLD: 1000})
    # A mix: 100 tokens from cold cost 0.2 s, more than 0.1 s of recomputing them... but the
    # 900 from warm are nearly free, and recomputing all 1000 costs 1 s.
    assert model.restore_wins({WARM: 900, COLD: 100})


def test_measurements_move_the_rates():
    model = rates()
    for _ in range(20):
        model.observe_restore(COLD, 1000, 0.0001)   # the cold tier turns out to be fast
    assert model.restore_wins({COLD: 1000})
    for _ in range(20):
        model.observe_prefill(1000, 0.00001)     # and a GPU prefills faster still
    assert not model.restore_wins({COLD: 1000})


def test_every_tier_has_a_prior():
    assert set(ThroughputModel().restore_tps) == set(Tier)
