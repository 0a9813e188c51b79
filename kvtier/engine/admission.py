"""Starting a request in a slot: which slot, and how its prompt's prefix gets there.

A job is admitted into the idle slot that keeps the most of what slots hold, knowing the longest
prefix of its prompt that the store holds (:func:`~kvtier.engine.slots.choose_slot`). Then its
prefix is restored, or kept from what the slot still holds, and the rest of the prompt is left to
prefill; a conversation longer than a slot's share of the hot tier starts on its working set
(:mod:`.windows`). Runs on the engine thread.
"""

from __future__ import annotations

import time

from kvtier.engine.hot import HotContext
from kvtier.engine.job import Job, TokenCounts
from kvtier.engine.model import Model
from kvtier.engine.sampling import Sampler
from kvtier.engine.sizing import HotSizing
from kvtier.engine.slots import (SequenceOwner, SlotOwner, choose_slot, common_prefix,
                                 may_extend)
from kvtier.engine.snapshot import RestorePlan, Snapshotter, StoredSequence
from kvtier.engine.text import TextStream
from kvtier.engine.windows import WindowedSlots
from kvtier.storage.manager import TierManager
from kvtier.storage.records import Namespace


class Admission:
    """Admits jobs into slots and starts them (engine thread)."""

    def __init__(self, model: Model, hot: HotContext, sizing: HotSizing, manager: TierManager,
                 snapshots: Snapshotter, windows: WindowedSlots, tokens: TokenCounts,
                 block_size: int) -> None:
        self.model = model
        self.hot = hot
        self.sizing = sizing
        self.manager = manager
        self.snapshots = snapshots
        self.windows = windows
        self.tokens = tokens
        self.block_size = block_size
        self.slot_seq: dict[int, StoredSequence] = {}
        """The stored sequence each slot's KV belongs to, by slot index."""
        self.shared_tails = True
        """Whether a prompt may continue any stored sequence's partial tail block, not only
        its session's own: False with tenants, as a tail is matched token by token."""

    def start(self, job: Job) -> None:
        """Put the job's prompt prefix in its slot (restored, or still there) and plan the rest."""
        slot = job.slot
        assert slot is not None
        if slot.tenant != job.request.tenant:   # nothing of another tenant's KV is reused
            self.windows.drop(slot)
            self.hot.clear(slot)
            self.slot_seq.pop(slot.index, None)
            slot.tenant = job.request.tenant
        prompt = job.prompt
        hot = common_prefix(slot.tokens, prompt)
        window = self.windows.get(slot)
        if window is not None and not self.windows.continues(slot, prompt):
            hot = min(hot, window.hot_prefix)   # the rest of its cells hold a working set
        resident = self.slot_seq.get(slot.index)
        resident_owner = slot.owner
        plan = job.plan
        assert plan is not None
        if self.windows.continues(slot, prompt) or self.sizing.windowed(len(prompt)) \
                or self.sizing.windowed(plan.n_tokens):
            keep, restored = self._start_windowed(job, plan, hot, resident, resident_owner)
        else:
            if self.windows.get(slot) is not None:   # a long conversation was here: start afresh
                self.windows.drop(slot)
                self.hot.clear(slot)
                hot, resident = 0, None
            keep, restored = self._start_hot(job, plan, hot, resident, resident_owner)
        slot.owner = job.owner or SequenceOwner(job.seq.seq_id)
        job.cached = keep
        job.restored = min(restored, keep)
        self.tokens.restored += job.restored
        self.tokens.hot_reused += keep - job.restored
        job.pending = prompt[keep:]
        job.sampler = Sampler(job.request.sampling, self.model.n_vocab)
        job.sampler.accept_prompt(prompt)
        job.stream = TextStream(job.request.sampling.stop)
        job.prefill_started = time.perf_counter()

    def admit(self, job: Job) -> None:
        """Give the job a slot, knowing the longest prefix of its prompt the store holds: a
        restore replaces a slot's whole sequence, so that decides which slots' KV is worth
        keeping."""
        job.plan = self._plan(job)
        stored = job.plan.n_tokens if self.snapshots.worth_restoring(job.plan) else 0
        slot = choose_slot(self.hot.slots, job.prompt, stored, job.request.tenant)
        assert slot is not None  # the scheduler admits no more jobs than there are idle slots
        slot.busy = True
        job.slot = slot

    def _plan(self, job: Job) -> RestorePlan:
        """The longest prefix of the job's prompt that the store holds (with a session's own
        tail, for a session)."""
        session_seq = None
        if job.session is not None:
            session_seq = self.manager.get_sequence(Namespace(job.session.namespace),
                                                    job.session.sequence)
        return self.snapshots.plan(job.prompt, session_seq, self.shared_tails)

    def _start_hot(self, job: Job, plan: RestorePlan, hot: int, resident: StoredSequence | None,
                   resident_owner: SlotOwner | None) -> tuple[int, int]:
        """A conversation that fits the slot: restore its stored prefix whole, or keep what the
        slot holds. Returns the tokens kept and, of those, how many were restored."""
        slot = job.slot
        restored = 0
        if plan.n_tokens > hot and self.snapshots.worth_restoring(plan):
            restored = self.snapshots.restore(slot, plan, job.prompt).n_tokens
            hot = restored
            resident = None
        if restored == 0 and hot == 0:
            self.hot.clear(slot)
            resident = None
        keep = min(hot, len(job.prompt) - 1)  # the last prompt token is decoded again (logits)
        keep = self.hot.reusable(slot, keep)
        self.hot.truncate(slot, keep)
        job.seq = self._sequence_for(job, resident, resident_owner, keep)
        return keep, restored

    def _start_windowed(self, job: Job, plan: RestorePlan, hot: int,
                        resident: StoredSequence | None, resident_owner: SlotOwner | None
                        ) -> tuple[int, int]:
        """A conversation longer than the slot's share: its working set (:mod:`.windows`)."""
        slot, prompt = job.slot, job.prompt
        if self.windows.continues(slot, prompt):
            job.seq = self._sequence_for(job, resident, resident_owner, len(slot.tokens))
        elif plan.n_tokens > hot:
            job.seq = self._sequence_for(job, None, None, 0)
        else:
            self.windows.drop(slot)
            hot = min(hot, self.sizing.slot_tokens)
            job.seq = self._sequence_for(job, resident, resident_owner, hot)
        job.turn, keep, restored = self.windows.start(slot, prompt, plan, job.seq, hot)
        if keep == len(prompt):   # the last prompt token is decoded again for its logits
            job.turn.window.retract(1)
            keep -= 1
        return keep, restored

    def _sequence_for(self, job: Job, resident: StoredSequence | None,
                      resident_owner: SlotOwner | None, keep: int) -> StoredSequence:
        """The stored sequence that the job's KV goes to, given what the slot held before
        (``resident``, None if it is gone) and whose it was: a session's own sequence; else the
        resident anonymous one, if the job may extend it and kept all of it; else a new one."""
        bs = self.block_size
        if job.session is not None:
            if resident is not None and resident.seq_id == job.session.sequence:
                return resident.truncated(keep, bs)
            return StoredSequence(job.session.sequence)
        if resident is not None and may_extend(job.owner, resident_owner) \
                and keep >= resident.n_tokens(bs):
            return resident.truncated(keep, bs)
        return StoredSequence(self.manager.new_sequence())
