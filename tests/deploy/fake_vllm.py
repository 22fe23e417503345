"""A tiny HTTP server exposing vLLM's own metrics (names, labels and buckets of vLLM 0.32's
PrometheusStatLogger, vllm/v1/metrics/loggers.py), advancing a little at every scrape.

The dashboard test scrapes it beside the real featurewatch sidecar, so vLLM panels are checked
against realistic series without running a vLLM engine.
"""

from __future__ import annotations

import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vllm/v1/metrics/buckets.py defaults.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0]
LABELS = ["model_name", "engine"]


class FakeVllmMetrics:
    def __init__(self, model_name: str, engine: str = "0", seed: int = 0) -> None:
        self.registry = r = CollectorRegistry()
        self.labels = (model_name, engine)
        self.rng = random.Random(seed)
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", LABELS, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", LABELS, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", LABELS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", LABELS, registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", LABELS, registry=r)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.", LABELS + ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", LABELS,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", LABELS,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", LABELS,
                             buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        for reason in ("stop", "length", "abort", "error"):
            self.success.labels(*self.labels, reason)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def step(self) -> None:
        """One scrape interval of simulated traffic."""
        rng, labels = self.rng, self.labels
        with self._lock:
            self.running.labels(*labels).set(rng.randint(1, 8))
            self.waiting.labels(*labels).set(rng.randint(0, 3))
            self.kv_usage.labels(*labels).set(round(rng.uniform(0.1, 0.6), 3))
            finished = rng.randint(1, 4)
            self.prompt_tokens.labels(*labels).inc(finished * rng.randint(20, 200))
            self.generation_tokens.labels(*labels).inc(finished * rng.randint(10, 100))
            self.success.labels(*labels, "stop").inc(finished)
            for _ in range(finished):
                self.ttft.labels(*labels).observe(rng.uniform(0.02, 0.4))
                self.e2e.labels(*labels).observe(rng.uniform(0.4, 4.0))
                self.itl.labels(*labels).observe(rng.uniform(0.01, 0.06))

    def exposition(self) -> bytes:
        self.step()
        with self._lock:
            return generate_latest(self.registry)

    def start(self, host: str = "127.0.0.1") -> int:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = fake.exposition()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
