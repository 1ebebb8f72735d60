"""Prometheus metrics of the server: requests, tokens, queue depth, latencies, batch size.

`Metrics` owns one CollectorRegistry per app (so several apps in one process,
as in the tests, do not collide) and a `ServeStats` subclass that feeds the
scheduler's hooks (time to first token, inter-token latency, decode batch
size, finished generations) into histograms and counters. `GET /metrics`
serves `render()`.

Not here: the statistics the scheduler keeps itself (moekit.infer.serve_stats).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..infer.serve_stats import ServeStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("moekit_http_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.generations = Counter("moekit_generations", "generations finished, by finish reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("moekit_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.generated_tokens = Counter("moekit_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("moekit_time_to_first_token_seconds", "time from submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("moekit_inter_token_latency_seconds", "time between two tokens of one request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("moekit_batch_size", "sequences per decode step", buckets=BATCH_BUCKETS, registry=r)
        self.queue = Gauge("moekit_queue_depth", "requests waiting for a batch slot", registry=r)
        self.running = Gauge("moekit_running_requests", "sequences in the running batch", registry=r)
        self.stats = _PrometheusStats(self)
        self.queue.set_function(lambda: self.stats.waiting)
        self.running.set_function(lambda: self.stats.running)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _PrometheusStats(ServeStats):
    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def on_ttft(self, seconds: float) -> None:
        self.metrics.ttft.observe(seconds)
        self.metrics.generated_tokens.inc()

    def on_itl(self, seconds: float) -> None:
        self.metrics.itl.observe(seconds)
        self.metrics.generated_tokens.inc()

    def on_batch(self, batch_size: int) -> None:
        self.metrics.batch.observe(batch_size)

    def on_finished(self, request, reason: str) -> None:
        self.metrics.generations.labels(reason).inc()
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))


__all__ = ["Metrics"]
