"""The tier manager against a plain dict, with tiny budgets, reopening as it goes; sequences of
several blocks are written the way the store writer does (held, then saved) while other writes
evict, and every clean close leaves a store that verifies clean."""

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.errors import BlockMissing
from kvtier.storage.manager import TierManager
from tests.factories import NS, block_id, f16, make_config, make_layers


class TierManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kvtier-stateful-"))
        self.config = make_config(self.dir, **{"tiers.local_ssd_budget": "300KiB",
                                               "tiers.nfs_budget": "300KiB"})
        self.manager = TierManager(self.config, background=False)
        self.model: dict[int, list] = {}
        self.multi: dict[int, int] = {}
        """Sequences of several blocks: how many blocks each was saved with."""
        self.next_seq = 1
        self.drops_before = 0

    def teardown(self) -> None:
        self.manager.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def drops(self) -> int:
        return self.drops_before + sum(s.drops for s in self.manager.stats())

    @rule(seed=st.integers(0, 10_000), n_tokens=st.sampled_from([1, 17, 64]))
    def put(self, seed, n_tokens):
        seq = self.next_seq
        self.next_seq += 1
        layers = make_layers(seed, n_tokens=n_tokens)
        b = self.manager.put_block(block_id(seq, 0), layers)
        self.manager.save_sequence(NS, seq, np.arange(n_tokens), [b])
        self.model[seq] = layers

    @rule(seeds=st.lists(st.integers(0, 10_000), min_size=2, max_size=5),
          pressure=st.lists(st.integers(0, 10_000), max_size=6))
    def write_then_save_while_evicting(self, seeds, pressure):
        """The store writer's order: blocks written (held), other writes evicting meanwhile,
        then the sequence saved: it must name every block it wrote."""
        seq = self.next_seq
        self.next_seq += 1
        ids = [self.manager.put_block(block_id(seq, b), make_layers(seed), hold=True)
               for b, seed in enumerate(seeds)]
        for seed in pressure:
            self.put(seed, 64)
        entry = self.manager.save_sequence(NS, seq, np.arange(64 * len(ids)), ids)
        assert len(entry.blocks) == len(ids)
        self.multi[seq] = len(ids)

    @rule()
    def close_and_verify(self):
        self.drops_before = self.drops()
        self.manager.close()
        self.manager = TierManager(self.config, background=False)
        report = self.manager.check(fix=False, records=True)
        assert report.ok, report.problems
        # Sequences cut at close (blocks dropped while they were named) keep a prefix.
        for seq in list(self.multi):
            entry = self.manager.get_sequence(NS, seq)
            self.multi[seq] = len(entry.blocks) if entry is not None else 0

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def get(self, data):
        seq = data.draw(st.sampled_from(sorted(self.model)))
        try:
            back = self.manager.get_block(block_id(seq, 0))
        except BlockMissing:
            return  # dropped: the invariant below checks that it was counted
        for a, b in zip(self.model[seq], back):
            for x, y in ((f16(a.k), f16(b.k)), (f16(a.v), f16(b.v))):
                assert y.shape == x.shape
                assert np.abs(x - y).max() <= (x.max() - x.min()) / 15 + 1e-3

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        seq = data.draw(st.sampled_from(sorted(self.model)))
        self.manager.delete_sequence(NS, seq)
        del self.model[seq]
        assert self.manager.block_entry(block_id(seq, 0)) is None

    @rule()
    def reopen(self):
        self.drops_before = self.drops()
        self.manager.close()
        self.manager = TierManager(self.config, background=False)
        assert self.manager.repaired == {}

    @invariant()
    def budgets_hold(self):
        for stat in self.manager.stats():
            assert stat.stored_bytes <= stat.budget

    @invariant()
    def nothing_lost_uncounted(self):
        present = sum(self.manager.block_entry(block_id(s, 0)) is not None for s in self.model)
        assert len(self.model) - present <= self.drops()
        stored = sum(s.blocks for s in self.manager.stats())
        multi = sum(self.manager.block_entry(block_id(s, b)) is not None
                    for s, n in self.multi.items() for b in range(n))
        assert stored == present + multi


TierManagerMachine.TestCase.settings = settings(
    max_examples=20, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_tier_manager_against_a_dict = TierManagerMachine.TestCase
