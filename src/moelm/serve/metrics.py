"""Prometheus metrics of the server, vLLM's set under a `moelm_` prefix, plus tokens routed to each expert.

Every server has its own registry, so several servers (tests, notebooks) in one process never collide. The
per-expert counts live in the engine as tensors updated by router hooks; a custom collector reads them only
when /metrics is scraped, so the decode loop pays nothing for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from moelm.infer.engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _ExpertTokens(Collector):
    """moelm_expert_tokens_total{layer, expert}: tokens the router sent to each expert since start."""

    def __init__(self, counts: dict[int, torch.Tensor]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "moelm_expert_tokens", "Tokens routed to each routed expert, per MoE layer", labels=["layer", "expert"]
        )
        for layer, counts in self.counts.items():
            for expert, value in enumerate(counts.tolist()):
                family.add_metric([str(layer), str(expert)], value)
        yield family


class ServerMetrics:
    """The metric objects; the engine's callbacks and the HTTP handlers update them."""

    def __init__(self, expert_counts: dict[int, torch.Tensor], model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name

        def make(kind, name: str, doc: str, **kwargs):  # noqa: ANN001, ANN202 - a metric class and its options
            return kind(name, doc, labels, registry=self.registry, **kwargs).labels(model_name)

        self.running = make(Gauge, "moelm_num_requests_running", "Requests in the decode batch")
        self.waiting = make(Gauge, "moelm_num_requests_waiting", "Requests waiting for a batch row")
        self.cache_usage = make(Gauge, "moelm_kv_cache_usage_perc", "Share of the cache's token slots holding tokens")
        self.prompt_tokens = make(Counter, "moelm_prompt_tokens", "Prompt tokens prefilled")
        self.generation_tokens = make(Counter, "moelm_generation_tokens", "Tokens generated")
        self.prefix_queries = make(Counter, "moelm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = make(Counter, "moelm_prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.ttft = make(Histogram, "moelm_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS)
        self.itl = make(Histogram, "moelm_inter_token_latency_seconds", "Time between tokens", buckets=LATENCY_BUCKETS)
        self.e2e = make(
            Histogram, "moelm_e2e_request_latency_seconds", "Request latency, queue included", buckets=LATENCY_BUCKETS
        )
        self.finished = Counter(
            "moelm_request_success",
            "Finished requests by finish reason",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.registry.register(_ExpertTokens(expert_counts))
        self._last: dict[str, EngineStats] = {}  # each engine's counters at its previous step

    def finished_request(self, reason: str) -> None:
        self.finished.labels(self.model_name, reason).inc()

    def engine_step(self, stats: EngineStats, source: str = "base") -> None:
        """Called by an engine thread after each iteration; `source` names the engine (one per served adapter):
        counters add each engine's own progress, gauges show the sum over engines."""
        last = self._last.get(source, EngineStats())
        self.prompt_tokens.inc(stats.prompt_tokens - last.prompt_tokens)
        self.generation_tokens.inc(stats.generation_tokens - last.generation_tokens)
        self.prefix_queries.inc(stats.prefix_queried_tokens - last.prefix_queried_tokens)
        self.prefix_hits.inc(stats.prefix_hit_tokens - last.prefix_hit_tokens)
        self._last[source] = dataclasses.replace(stats)  # the engine updates its stats object in place
        latest = list(self._last.values())
        self.running.set(sum(s.running for s in latest))
        self.waiting.set(sum(s.waiting for s in latest))
        used, total = sum(s.cache_slots_used for s in latest), sum(s.cache_slots_total for s in latest)
        self.cache_usage.set(used / max(total, 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
