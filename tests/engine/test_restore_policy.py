from kvtier.engine.restore_policy import ThroughputModel


def test_restore_wins_only_when_faster_than_prefill():
    model = ThroughputModel(prefill_tps=1000.0, restore_tps=[50_000.0, 5_000.0, 500.0])
    assert model.restore_wins([1000, 0, 0])
    assert model.restore_wins([0, 1000, 0])
    assert not model.restore_wins([0, 0, 1000])
    # A mix: 100 tokens from cold cost 0.2 s, more than 0.1 s of recomputing them... but the
    # 900 from warm are nearly free, and recomputing all 1000 costs 1 s.
    assert model.restore_wins([900, 0, 100])


def test_measurements_move_the_rates():
    model = ThroughputModel(prefill_tps=1000.0, restore_tps=[50_000.0, 5_000.0, 500.0])
    for _ in range(20):
        model.observe_restore(2, 1000, 0.0001)   # the cold tier turns out to be fast
    assert model.restore_wins([0, 0, 1000])
    for _ in range(20):
        model.observe_prefill(1000, 0.00001)     # and a GPU prefills faster still
    assert not model.restore_wins([0, 0, 1000])
