"""Prometheus metrics of the server (GET /metrics), named with their units like vLLM's.

Latencies are histograms per model; running/waiting requests and slot use are read from each
engine's `stats()` at scrape time (a custom collector), so a scrape right after a slot frees shows
it free. Each app owns its registry, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

disable_created_metrics()  # no *_created samples: one line per counter, as scrapers and tests read them

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineGauges:
    """Gauges read from the engines when scraped: {name: callable returning Engine.stats()}."""

    def __init__(self, stats: dict[str, Callable[[], dict]]):
        self._stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily]:
        running = GaugeMetricFamily("jaxlm_requests_running", "Sequences in a slot, being generated",
                                    labels=["model"])
        waiting = GaugeMetricFamily("jaxlm_requests_waiting", "Sequences queued for a slot", labels=["model"])
        used = GaugeMetricFamily("jaxlm_slots_used", "Slots holding a sequence", labels=["model"])
        total = GaugeMetricFamily("jaxlm_slots_total", "Slots of the engine (--slots)", labels=["model"])
        usage = GaugeMetricFamily("jaxlm_slot_usage_ratio", "Slots used / slots", labels=["model"])
        for name, stats in self._stats.items():
            s = stats()
            running.add_metric([name], s["running"])
            waiting.add_metric([name], s["waiting"])
            used.add_metric([name], s["slots_used"])
            total.add_metric([name], s["slots"])
            usage.add_metric([name], s["slots_used"] / max(s["slots"], 1))
        yield from (running, waiting, used, total, usage)


class ServerMetrics:
    """Every metric the server exports; `render()` is the /metrics body."""

    def __init__(self, engine_stats: dict[str, Callable[[], dict]]):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter("jaxlm_http_requests", "HTTP requests answered, by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        self.requests = Counter("jaxlm_requests", "Sequences finished, by model and finish reason",
                                ["model", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("jaxlm_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("jaxlm_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("jaxlm_time_to_first_token_seconds", "Submit to first generated token",
                              ["model"], buckets=_FAST, registry=r)
        self.itl = Histogram("jaxlm_inter_token_latency_seconds", "Time between generated tokens",
                             ["model"], buckets=_FAST, registry=r)
        self.e2e = Histogram("jaxlm_e2e_request_latency_seconds", "HTTP request arrival to its last token",
                             ["model"], buckets=_SLOW, registry=r)
        self.queue_time = Histogram("jaxlm_request_queue_time_seconds", "Submit to getting a slot",
                                    ["model"], buckets=_SLOW, registry=r)
        r.register(_EngineGauges(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
