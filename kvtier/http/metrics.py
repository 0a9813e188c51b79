"""Prometheus metrics: request counters kept by the HTTP layer, cache figures read from the engine.

Each application owns its :class:`~prometheus_client.CollectorRegistry`, so several servers (as in
the tests) never share or clash over series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvtier.engine import api
from kvtier.http.responses import CacheStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TIER_GAUGES = ("blocks", "bytes", "budget", "compression_ratio")
_TIER_COUNTERS = ("hits", "misses", "promotions", "demotions", "drops", "corrupt",
                  "write_errors")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0)


class EngineCollector(Collector):
    """Reads ``cache_stats()`` at scrape time, so the numbers are the engine's own."""

    def __init__(self, cache_stats: Callable[[], api.CacheStats]) -> None:
        self._cache_stats = cache_stats

    def collect(self) -> Iterator[Metric]:
        stats = CacheStats.of(self._cache_stats())
        gauges = {name: GaugeMetricFamily(f"kvtier_tier_{name}", f"Tier {name}.", labels=["tier"])
                  for name in _TIER_GAUGES}
        counters = {name: CounterMetricFamily(f"kvtier_tier_{name}", f"Tier {name}.",
                                              labels=["tier"]) for name in _TIER_COUNTERS}
        for tier in stats.tiers:
            for name, family in (*gauges.items(), *counters.items()):
                family.add_metric([tier.name], float(getattr(tier, name)))
        yield from gauges.values()
        yield from counters.values()
        yield GaugeMetricFamily("kvtier_hot_tokens", "Tokens whose KV the hot tier's slots hold.",
                                value=float(stats.hot.tokens))
        tokens = CounterMetricFamily("kvtier_engine_tokens", "Tokens by how the engine got them "
                                     "(restored, prefilled, hot_reused, generated).",
                                     labels=["kind"])
        for kind, value in stats.tokens.model_dump().items():
            tokens.add_metric([kind], float(value))
        yield tokens
        loaded = GaugeMetricFamily("kvtier_model_loaded", "Served models: 1 if loaded now.",
                                   labels=["model"])
        model_tokens = CounterMetricFamily("kvtier_model_tokens", "Tokens per served model, by "
                                           "how the engine got them.", labels=["model", "kind"])
        for model in stats.models:
            loaded.add_metric([model.name], float(model.loaded))
            for kind, value in model.tokens.model_dump().items():
                model_tokens.add_metric([model.name, kind], float(value))
        yield loaded
        yield model_tokens
        slots = GaugeMetricFamily("kvtier_slots", "Generation slots (total, busy, queued).",
                                  labels=["state"])
        for state, value in stats.slots.model_dump().items():
            slots.add_metric([state], float(value))
        yield slots
        working_set = CounterMetricFamily(
            "kvtier_working_set", "Working sets of conversations longer than a slot's share "
            "(selections, loads, drops, moves, stored, prefetches, prefetch_hits, "
            "prefetch_misses).", labels=["event"])
        for event, value in stats.working_set.model_dump().items():
            working_set.add_metric([event], float(value))
        yield working_set
        store = stats.store
        for name, value, text in (("queued_jobs", store.queued_jobs, "Store jobs queued."),
                                  ("queued_bytes", store.queued_bytes,
                                   "Bytes of state waiting to be stored.")):
            yield GaugeMetricFamily(f"kvtier_store_{name}", text, value=float(value))
        for name, value, text in (
                ("jobs", store.jobs, "Store jobs done."),
                ("blocks_written", store.blocks_written, "Blocks stored by the writer."),
                ("failures", store.failures, "Store jobs that failed."),
                ("waits", store.waits, "Times the engine waited for the store writer."),
                ("wait_seconds", store.wait_s, "Seconds the engine waited for the writer."),
                ("read_seconds", store.read_s, "Engine-thread seconds reading states."),
                ("write_seconds", store.write_s, "Writer-thread seconds storing.")):
            yield CounterMetricFamily(f"kvtier_store_{name}", text, value=float(value))
        remote = stats.remote
        yield GaugeMetricFamily("kvtier_remote_available", "1 while the remote tier answers "
                                "(0: down, or none configured).", value=float(remote.available))
        yield GaugeMetricFamily("kvtier_remote_queued", "Blocks and sessions waiting to be sent "
                                "to the remote tier.", value=float(remote.queued))
        for name, value, text in (
                ("errors", remote.errors, "Failed calls to the remote tier."),
                ("conflicts", remote.conflicts, "Session writes refused by the shared catalog."),
                ("blocks_sent", remote.blocks_sent, "Blocks sent to the remote tier."),
                ("blocks_fetched", remote.blocks_fetched, "Blocks read from the remote tier."),
                ("dropped", remote.dropped, "Blocks given up from a full send queue.")):
            yield CounterMetricFamily(f"kvtier_remote_{name}", text, value=float(value))


class Metrics:
    def __init__(self, cache_stats: Callable[[], api.CacheStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvtier_http_requests", "HTTP requests by route and status.",
                                ["method", "route", "status"], registry=r)
        self.duration = Histogram("kvtier_http_request_duration_seconds",
                                  "Time from request to the last byte of the response.",
                                  ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("kvtier_http_requests_in_flight", "Requests being handled.",
                               registry=r)
        self.ttft = Histogram("kvtier_time_to_first_token_seconds",
                              "Time from request to the first generated token.",
                              ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("kvtier_request_tokens", "Tokens of finished requests "
                              "(prompt, cached, completion).", ["kind"], registry=r)
        self.disconnects = Counter("kvtier_client_disconnects",
                                   "Generations cancelled because the client went away.",
                                   registry=r)
        r.register(EngineCollector(cache_stats))

    def observe_usage(self, usage: api.Usage) -> None:
        self.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.tokens.labels("cached").inc(usage.cached_tokens)
        self.tokens.labels("completion").inc(usage.completion_tokens)

    def render(self) -> bytes:
        """The exposition text; it calls into the engine, so run it off the event loop."""
        return generate_latest(self.registry)
