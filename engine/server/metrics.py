"""Prometheus metrics with the same names on both engines, modelled on vLLM's `vllm:*` set.

Latencies (TTFT, inter-token, end-to-end) are measured here from the output stream, so they mean the
same thing whichever engine produced the tokens. Engine-side state (running/waiting, KV blocks,
preemptions, prefix cache) is read from `Backend.stats()` at scrape time by a collector. Each app has
its own registry, so several apps in one process (tests) never collide. `crossover_concurrency` is the
measured engine crossover of the CPU this server runs on (engine/crossover.py), for the operator's gear
advice and the monitoring rules: the node's CPU is known here, not where the operator runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from gearshift.engine import crossover
from gearshift.engine.outputs import EngineStats
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

P = "gearshift:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    """Gauges and cumulative counters read from the engine's stats when Prometheus scrapes."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.stats()
        labels, value = ["model_name"], [self.model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(P + name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(P + name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("num_requests_running", "Requests being decoded or prefilled.", s.num_running)
        yield gauge("num_requests_waiting", "Requests admitted but not yet scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent.", s.kv_cache_usage)
        yield gauge("kv_cache_total_blocks", "KV-cache blocks in total.", s.num_total_blocks)
        yield gauge("kv_cache_free_blocks", "KV-cache blocks free (or cached and unreferenced).", s.num_free_blocks)
        yield counter("num_preemptions", "Preemptions since start.", s.num_preemptions)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], EngineStats], cpu_class: str | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(model_name, stats))
        r, lab = self.registry, ["model_name"]
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prefill tokens processed.", lab, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens.", lab, registry=r)
        self.request_success = Counter(P + "request_success", "Finished requests by finish reason.",
                                       lab + ["finished_reason"], registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between output tokens.", lab,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "End-to-end request latency.", lab,
                             buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(P + "request_queue_time_seconds", "Time spent waiting before scheduling.",
                                    lab, buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens_c = self.prompt_tokens.labels(model_name)
        self.generation_tokens_c = self.generation_tokens.labels(model_name)
        self.ttft_h = self.ttft.labels(model_name)
        self.itl_h = self.itl.labels(model_name)
        self.e2e_h = self.e2e.labels(model_name)
        self.queue_time_h = self.queue_time.labels(model_name)
        for reason in ("stop", "length", "abort"):  # present from the start so rate() works on them
            self.request_success.labels(model_name, reason)
        self.cpu_class = cpu_class or crossover.node_cpu_class()
        Gauge(P + "crossover_concurrency", "Concurrent requests per replica from which the paged engine serves "
              "more output tokens/s than the gguf runner on this CPU class (measured, engine/crossover.py).",
              lab + ["cpu_class"], registry=r).labels(model_name, self.cpu_class).set(
                  crossover.crossover(self.cpu_class))

    def finished(self, reason: str) -> None:
        self.request_success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
