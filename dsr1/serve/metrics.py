"""Prometheus metrics for the server (names follow vLLM's where one exists, prefixed dsr1_)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, model: str, *, engine_gauges: bool = True):
        """`engine_gauges=False` for the front of an external engine: the KV-cache and decode-step
        series describe the embedded engine only (vLLM's and llama.cpp's own are appended to
        /metrics by the front), and a gauge stuck at 0 would read as an idle cache."""
        r = self.registry = CollectorRegistry()
        self.model = model
        self.requests = Counter("dsr1_requests", "HTTP requests to the API by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.running = Gauge("dsr1_num_requests_running", "Requests in the running batch (incl. prefill)", registry=r)
        self.waiting = Gauge("dsr1_num_requests_waiting", "Requests queued for a slot", registry=r)
        er = r if engine_gauges else None  # unregistered: kept as objects, never exported
        self.kv_usage = Gauge("dsr1_kv_cache_usage_ratio", "Fraction of KV-cache token slots in use", registry=er)
        self.kv_bytes = Gauge("dsr1_kv_cache_capacity_bytes", "Bytes reserved for the KV cache", registry=er)
        self.ttft = Histogram("dsr1_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LAT, registry=r)
        self.tpot = Histogram("dsr1_time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=_TPOT, registry=r)
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

    def bind(self, counts: Callable[[], tuple[int, int]], kv_usage: Callable[[], float], kv_bytes: int) -> None:
        self.running.set_function(lambda: counts()[0])
        self.waiting.set_function(lambda: counts()[1])
        self.kv_usage.set_function(kv_usage)
        self.kv_bytes.set(kv_bytes)
        self._bind_gpus()

    def _bind_gpus(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        used = Gauge("dsr1_gpu_memory_used_bytes", "Memory allocated by this process on each GPU", ["gpu"],
                     registry=self.registry)
        util = Gauge("dsr1_gpu_utilization_ratio", "GPU utilization (NVML) over the last sample period", ["gpu"],
                     registry=self.registry)
        for i in range(torch.cuda.device_count()):
            used.labels(str(i)).set_function(lambda i=i: torch.cuda.memory_allocated(i))
            util.labels(str(i)).set_function(lambda i=i: _utilization(i))

    def bind_prefix_cache(self, pc) -> None:
        for g in (self.prefix_hit_rate, self.prefix_hits, self.prefix_queries):
            self.registry.register(g)
        self.prefix_hit_rate.set_function(pc.hit_rate)
        self.prefix_hits.set_function(lambda: pc.hit_tokens)
        self.prefix_queries.set_function(lambda: pc.queried_tokens)

    def bind_speculative(self) -> None:
        for m in (self.spec_drafted, self.spec_accepted, self.spec_rate):
            self.registry.register(m)
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


def _utilization(i: int) -> float:
    try:
        import torch

        return torch.cuda.utilization(i) / 100.0
    except Exception:  # NVML missing or unsupported: report nothing useful rather than fail the scrape
        return float("nan")
