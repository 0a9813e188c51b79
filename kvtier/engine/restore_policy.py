"""Restore or recompute: the one place that decides, from throughput measured on this machine.

Restoring ``n`` tokens from a tier costs about ``n / restore_rate[tier]``; recomputing them costs
``n / prefill_rate``. Both rates start from conservative priors and follow what the engine measures
(exponential moving averages), so a slow NFS tier on a fast GPU is recomputed instead of read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EMA_WEIGHT = 0.3


@dataclass(slots=True)
class ThroughputModel:
    prefill_tps: float = 300.0
    """Tokens per second of prompt processing (prior: a small model on a laptop CPU)."""
    restore_tps: list[float] = field(default_factory=lambda: [100_000.0, 40_000.0, 10_000.0])
    """Tokens per second restored into the hot tier from warm, cool and cold."""

    def observe_prefill(self, n_tokens: int, seconds: float) -> None:
        if n_tokens >= 32 and seconds > 0:
            self.prefill_tps = _ema(self.prefill_tps, n_tokens / seconds)

    def observe_restore(self, tier: int, n_tokens: int, seconds: float) -> None:
        if n_tokens > 0 and seconds > 0:
            self.restore_tps[tier] = _ema(self.restore_tps[tier], n_tokens / seconds)

    def restore_wins(self, n_tokens_by_tier: list[int]) -> bool:
        """True when restoring these tokens (counted per source tier) beats recomputing them."""
        restore = sum(n / self.restore_tps[t] for t, n in enumerate(n_tokens_by_tier))
        return restore < sum(n_tokens_by_tier) / self.prefill_tps


def _ema(old: float, new: float) -> float:
    return (1 - EMA_WEIGHT) * old + EMA_WEIGHT * new
