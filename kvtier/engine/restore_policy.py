"""Restore or recompute: the one place that decides, from throughput measured on this machine.

Restoring ``n`` tokens from a tier costs about ``n / restore_rate[tier]``; recomputing them costs
``n / prefill_rate``. Both rates start from conservative priors and follow what the engine measures
(exponential moving averages), so a slow NFS tier on a fast GPU is recomputed instead of read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kvtier.storage.tiers import Tier

EMA_WEIGHT = 0.3


def _restore_priors() -> dict[Tier, float]:
    return {Tier.WARM: 100_000.0, Tier.COOL: 40_000.0, Tier.COLD: 10_000.0}


@dataclass(slots=True)
class ThroughputModel:
    prefill_tps: float = 300.0
    """Tokens per second of prompt processing (prior: a small model on a laptop CPU)."""
    restore_tps: dict[Tier, float] = field(default_factory=_restore_priors)
    """Tokens per second restored into the hot tier, per storage tier."""

    def observe_prefill(self, n_tokens: int, seconds: float) -> None:
        """Fold one measured prefill into the prefill rate (short ones are too noisy)."""
        if n_tokens >= 32 and seconds > 0:
            self.prefill_tps = _ema(self.prefill_tps, n_tokens / seconds)

    def observe_restore(self, tier: Tier, n_tokens: int, seconds: float) -> None:
        """Fold one measured restore from ``tier`` into that tier's rate."""
        if n_tokens > 0 and seconds > 0:
            self.restore_tps[tier] = _ema(self.restore_tps[tier], n_tokens / seconds)

    def restore_wins(self, n_tokens_by_tier: Mapping[Tier, int]) -> bool:
        """True when restoring these tokens (counted per source tier) beats recomputing them."""
        restore = sum(n / self.restore_tps[t] for t, n in n_tokens_by_tier.items())
        return restore < sum(n_tokens_by_tier.values()) / self.prefill_tps


def _ema(old: float, new: float) -> float:
    return (1 - EMA_WEIGHT) * old + EMA_WEIGHT * new
