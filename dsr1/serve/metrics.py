"""Prometheus metrics for the server (names follow vLLM's where one exists, prefixed dsr1_).

Every name here is documented in docs/metrics.md and used by the dashboard and alert rules
`dsr1 monitor init` writes (dsr1.monitoring); renaming one breaks both, so don't.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
# Status codes whose series exist from the start, at 0: a dashboard's "429s per second" then
# reads 0 instead of "no data" on a server that has never refused anything.
_STATUSES = ("200", "429", "500")
API_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


class Metrics:
    def __init__(self, model: str, *, engine_gauges: bool = True, nvml: Any = None, gpus: bool = True):
        """`engine_gauges=False` for the front of an external engine: the KV-cache and decode-step
        series describe the embedded engine only (vLLM's and llama.cpp's own are appended to
        /metrics by the front), and a gauge stuck at 0 would read as an idle cache."""
        r = self.registry = CollectorRegistry()
        self.model = model
        self.engine_gauges = engine_gauges
        self._prefix_on = self._spec_on = False  # set by bind_prefix_cache / bind_speculative
        self.requests = Counter("dsr1_requests", "HTTP requests to the API by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        for endpoint in API_ENDPOINTS:
            for status in _STATUSES:
                self.requests.labels(endpoint, status)
        self.running = Gauge("dsr1_num_requests_running", "Requests in the running batch (incl. prefill)", registry=r)
        self.waiting = Gauge("dsr1_num_requests_waiting", "Requests queued for a slot", registry=r)
        er = r if engine_gauges else None  # unregistered: kept as objects, never exported
        self.kv_usage = Gauge("dsr1_kv_cache_usage_ratio", "Fraction of KV-cache token slots in use", registry=er)
        self.kv_bytes = Gauge("dsr1_kv_cache_capacity_bytes", "Bytes reserved for the KV cache", registry=er)
        self.ttft = Histogram("dsr1_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LAT, registry=r)
        self.tpot = Histogram("dsr1_time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=_TPOT, registry=r)
        self.itl = Histogram("dsr1_inter_token_latency_seconds", "Time between two tokens of one request",
                             buckets=_TPOT, registry=er)
        self.e2e = Histogram("dsr1_e2e_request_latency_seconds", "Arrival to finish", buckets=_LAT, registry=r)
        self.step = Histogram("dsr1_decode_step_seconds", "Wall time of one batched decode step",
                              buckets=_TPOT, registry=er)
        self.batch = Gauge("dsr1_decode_batch_size", "Requests in the last decode step", registry=er)
        self.prompt_tokens = Counter("dsr1_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("dsr1_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("dsr1_request_finished", "Finished generations by finish reason", ["reason"],
                                registry=r)
        # prefix caching and speculative decoding (embedded engine; exported when turned on)
        self.prefix_hit_rate = Gauge("dsr1_kv_cache_hit_rate", "Share of prompt tokens whose KV came from the "
                                     "prefix cache instead of being computed", registry=None)
        self.prefix_hits = Gauge("dsr1_prefix_cache_hit_tokens", "Prompt tokens loaded from the prefix cache "
                                 "(total)", registry=None)
        self.prefix_queries = Gauge("dsr1_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix "
                                    "cache (total)", registry=None)
        self.spec_drafted = Counter("dsr1_spec_decode_draft_tokens", "Tokens proposed by speculative decoding",
                                    registry=None)
        self.spec_accepted = Counter("dsr1_spec_decode_accepted_tokens", "Proposed tokens the model agreed with",
                                     registry=None)
        self.spec_rate = Gauge("dsr1_spec_decode_acceptance_rate", "Accepted share of drafted tokens so far",
                               registry=None)
        from dsr1.serve.gpustats import GpuCollector

        # gpus=False on a multi-node head: its node agent exports this node's GPUs (counted here, not exported twice)
        self.gpus = GpuCollector(nvml)
        if self.gpus.available and gpus:
            r.register(self.gpus)

    def features(self) -> dict[str, Any]:
        """What this server exports, for `dsr1 monitor init` (GET /dsr1/deployment)."""
        return {"gpus": len(self.gpus.handles), "prefix_cache": self._prefix_on, "speculative": self._spec_on,
                "engine_metrics": self.engine_gauges}

    def bind(self, counts: Callable[[], tuple[int, int]], kv_usage: Callable[[], float], kv_bytes: int) -> None:
        self.running.set_function(lambda: counts()[0])
        self.waiting.set_function(lambda: counts()[1])
        self.kv_usage.set_function(kv_usage)
        self.kv_bytes.set(kv_bytes)

    def bind_prefix_cache(self, pc) -> None:
        for g in (self.prefix_hit_rate, self.prefix_hits, self.prefix_queries):
            self.registry.register(g)
        self._prefix_on = True
        self.prefix_hit_rate.set_function(pc.hit_rate)
        self.prefix_hits.set_function(lambda: pc.hit_tokens)
        self.prefix_queries.set_function(lambda: pc.queried_tokens)

    def bind_speculative(self) -> None:
        for m in (self.spec_drafted, self.spec_accepted, self.spec_rate):
            self.registry.register(m)
        self._spec_on = True
        self._drafted = self._accepted = 0

    def observe_spec(self, drafted: int, accepted: int) -> None:
        self.spec_drafted.inc(drafted)
        self.spec_accepted.inc(accepted)
        self._drafted += drafted
        self._accepted += accepted
        self.spec_rate.set(self._accepted / self._drafted if self._drafted else 0.0)

    def observe_step(self, batch: int, seconds: float) -> None:
        self.step.observe(seconds)
        self.batch.set(batch)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_finish(self, req, now: float) -> None:
        self.finished.labels(req.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(req.prompt_ids))
        self.generation_tokens.inc(len(req.out_ids))
        self.e2e.observe(now - req.arrived)
        n = len(req.out_ids)
        if req.first_token_at is not None and n > 1:
            self.tpot.observe((now - req.first_token_at) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


