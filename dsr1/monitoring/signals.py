"""Every PromQL expression dsr1's dashboard and alerts use, chosen for one deployment.

One table of signals, so the dashboard (dsr1.monitoring.dashboard), the alert rules
(dsr1.monitoring.prometheus) and the test that runs every expression against a real Prometheus
read the same queries. Names are those dsr1 exports (docs/metrics.md) and, for an external
engine, the engine's own as its /metrics has them (appended to dsr1's by the front):
vLLM 0.32 (vllm:*; checked by a live scrape in tests), SGLang 0.5 (sglang:*; from its
metrics_collector.py, not scraped here), llama-server (llamacpp:*; a live scrape in tests).

Rate windows are fixed ([1m]) rather than Grafana's $__rate_interval so every expression runs
as is in Prometheus, promtool and the tests; 1m holds 12 samples at the default 5 s scrape.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsr1.monitoring.deployment import Deployment

W = "1m"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # a Grafana unit id: reqps, s, percentunit, bytes, celsius, short
    queries: tuple[Query, ...]
    description: str = ""
    max: float | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def _q(expr: str, legend: str) -> Query:
    return Query(expr, legend)


def _quantiles(metric: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> tuple[Query, ...]:
    return tuple(_q(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[{W}])))", f"p{int(q * 100)}")
                 for q in qs)


# The same quantity under each engine's name. None: the engine does not export it.
_ENGINE = {
    "running": {"vllm": "sum(vllm:num_requests_running)", "sglang": "sum(sglang:num_running_reqs)",
                "llamacpp": "sum(llamacpp:requests_processing)"},
    "waiting": {"vllm": "sum(vllm:num_requests_waiting)", "sglang": "sum(sglang:num_queue_reqs)",
                "llamacpp": "sum(llamacpp:requests_deferred)"},
    "kv_usage": {"embedded": "max(dsr1_kv_cache_usage_ratio)", "vllm": "max(vllm:kv_cache_usage_perc)",
                 "sglang": "max(sglang:token_usage)", "llamacpp": None},
    "tokens": {"embedded": f"sum(rate(dsr1_generation_tokens_total[{W}]))",
               "vllm": f"sum(rate(vllm:generation_tokens_total[{W}]))",
               "sglang": f"sum(rate(sglang:generation_tokens_total[{W}]))",
               "llamacpp": f"sum(rate(llamacpp:tokens_predicted_total[{W}]))"},
    "prompt_tokens": {"embedded": f"sum(rate(dsr1_prompt_tokens_total[{W}]))",
                      "vllm": f"sum(rate(vllm:prompt_tokens_total[{W}]))",
                      "sglang": f"sum(rate(sglang:prompt_tokens_total[{W}]))",
                      "llamacpp": f"sum(rate(llamacpp:prompt_tokens_total[{W}]))"},
    "prefix_hit": {"embedded": "max(dsr1_kv_cache_hit_rate)",
                   "vllm": f"sum(rate(vllm:prefix_cache_hits_total[{W}])) / "
                           f"sum(rate(vllm:prefix_cache_queries_total[{W}]))",
                   "sglang": "max(sglang:cache_hit_rate)",
                   "llamacpp": f"sum(rate(llamacpp:prompt_tokens_cached_total[{W}])) / "
                               f"sum(rate(llamacpp:prompt_tokens_total[{W}]))"},
    "ttft": {"embedded": "dsr1_time_to_first_token_seconds", "vllm": "vllm:time_to_first_token_seconds",
             "sglang": "sglang:time_to_first_token_seconds", "llamacpp": "dsr1_time_to_first_token_seconds"},
    "itl": {"embedded": "dsr1_inter_token_latency_seconds", "vllm": "vllm:inter_token_latency_seconds",
            "sglang": "sglang:inter_token_latency_seconds", "llamacpp": None},
    "tpot": {"embedded": "dsr1_time_per_output_token_seconds",
             "vllm": "vllm:request_time_per_output_token_seconds", "sglang": None, "llamacpp": None},
    "spec": {"embedded": f"sum(rate(dsr1_spec_decode_accepted_tokens_total[{W}])) / "
                         f"sum(rate(dsr1_spec_decode_draft_tokens_total[{W}]))",
             "vllm": f"sum(rate(vllm:spec_decode_num_accepted_tokens_total[{W}])) / "
                     f"sum(rate(vllm:spec_decode_num_draft_tokens_total[{W}]))",
             "sglang": "max(sglang:spec_accept_rate)", "llamacpp": None},
}


def engine_expr(signal: str, engine: str) -> str | None:
    return _ENGINE[signal].get(engine)


def rows(d: Deployment) -> list[Row]:
    """The dashboard's rows for deployment `d`: only what it exports."""
    e = d.engine
    ext = e != "embedded"
    traffic = [
        Panel("Requests and 429s per second", "reqps", (
            _q(f'sum(rate(dsr1_requests_total{{endpoint=~"/v1/.*"}}[{W}]))', "requests/s"),
            _q(f'sum(rate(dsr1_requests_total{{status="429"}}[{W}]))', "429/s"),
            _q(f'sum(rate(dsr1_requests_total{{status=~"5.."}}[{W}]))', "5xx/s"),
        ), "API requests answered by dsr1, and those refused because max_concurrent run and max_queue wait."),
        Panel("Running and waiting requests", "short", (
            _q("sum(dsr1_num_requests_running)", "running"),
            _q("sum(dsr1_num_requests_waiting)", "waiting"),
        ) + ((_q(engine_expr("running", e), f"{e} running"), _q(engine_expr("waiting", e), f"{e} waiting"))
             if ext else ()), "Admitted by dsr1 (running) and queued for a slot (waiting)."),
        Panel("Output tokens per second", "short", (
            _q(engine_expr("tokens", e), "generated"), _q(engine_expr("prompt_tokens", e), "prompt")),
            "Tokens generated and prompt tokens processed, per second."),
    ]
    latency = [
        Panel("Time to first token", "s", _quantiles(engine_expr("ttft", e)),
              "Arrival to first generated token (TTFT), percentiles over the last minute."),
    ]
    if engine_expr("tpot", e):
        latency.append(Panel("Time per output token", "s", _quantiles(engine_expr("tpot", e)),
                             "Per request: (end - first token) / (tokens - 1) (TPOT)."))
    if engine_expr("itl", e):
        latency.append(Panel("Inter-token latency", "s", _quantiles(engine_expr("itl", e)),
                             "Time between two consecutive tokens of one request (ITL)."))
    latency.append(Panel("End-to-end request latency", "s", _quantiles("dsr1_e2e_request_latency_seconds"),
                         "Arrival to the last byte, as dsr1 answered it."))
    cache = []
    if engine_expr("kv_usage", e):
        cache.append(Panel("KV-cache usage", "percentunit", (_q(engine_expr("kv_usage", e), "used"),),
                           "Share of KV-cache token slots in use; near 1 new requests wait.", max=1))
    if e != "embedded" or d.prefix_cache:
        cache.append(Panel("Prefix-cache hit rate", "percentunit", (_q(engine_expr("prefix_hit", e), "hit rate"),),
                           "Share of prompt tokens whose KV came from the prefix cache.", max=1))
    if d.speculative and engine_expr("spec", e):
        cache.append(Panel("Speculative acceptance rate", "percentunit", (_q(engine_expr("spec", e), "accepted"),),
                           "Share of drafted tokens the model accepted.", max=1))
    out = [Row("Traffic", tuple(traffic)), Row("Latency", tuple(latency))]
    if cache:
        out.append(Row("Cache and speculation", tuple(cache)))
    if d.gpus:
        out.append(Row("GPUs", (
            Panel("GPU utilization", "percentunit", (_q("dsr1_gpu_utilization_ratio", "{{instance}} GPU {{gpu}}"),),
                  "NVML utilization: share of the sample period a kernel ran.", max=1),
            Panel("GPU memory", "bytes", (
                _q("dsr1_gpu_memory_used_bytes", "{{instance}} GPU {{gpu}} used"),
                _q("dsr1_gpu_memory_total_bytes", "{{instance}} GPU {{gpu}} total")),
                "Memory in use on each GPU (all processes), and installed."),
            Panel("GPU temperature", "celsius", (_q("dsr1_gpu_temperature_celsius", "{{instance}} GPU {{gpu}}"),),
                  "Core temperature (NVML)."),
        )))
    if d.nodes:
        out.append(Row("Nodes", (
            Panel("Latency toward the head node", "s", (
                _q("dsr1_node_head_rtt_seconds", "node {{node_rank}}"),),
                "TCP round trip from each node to the head, on the interface NCCL uses."),
            Panel("Nodes up", "short", (_q('sum(up{job="dsr1-nodes"})', "scraped"),
                                        _q("sum(dsr1_node_head_reachable)", "reach the head")),
                  "Node agents Prometheus scrapes, and those that reach the head."),
        )))
    return out


@dataclass(frozen=True)
class Recording:
    record: str
    expr: str


@dataclass(frozen=True)
class Alert:
    name: str
    quantity: str  # what is compared: the test checks it returns data
    op: str
    threshold: float
    for_: str
    severity: str
    summary: str

    @property
    def expr(self) -> str:
        return f"{self.quantity} {self.op} {self.threshold:g}"


def recordings(d: Deployment) -> list[Recording]:
    e = d.engine
    out = [
        Recording("dsr1:request_rate:5m", 'sum(rate(dsr1_requests_total{endpoint=~"/v1/.*"}[5m]))'),
        # 429s as a share of all answers; clamp_min keeps an idle server at 0 rather than NaN
        Recording("dsr1:rejected_ratio:5m", 'sum(rate(dsr1_requests_total{status="429"}[5m])) / '
                                            'clamp_min(sum(rate(dsr1_requests_total[5m])), 1e-9)'),
        Recording("dsr1:ttft_p99:5m", "histogram_quantile(0.99, sum by (le) "
                                      f"(rate({engine_expr('ttft', e)}_bucket[5m])))"),
    ]
    if engine_expr("kv_usage", e):
        out.append(Recording("dsr1:kv_cache_usage", engine_expr("kv_usage", e)))
    if d.gpus:
        out.append(Recording("dsr1:gpu_memory_used_ratio",
                             "dsr1_gpu_memory_used_bytes / dsr1_gpu_memory_total_bytes"))
    return out


def alerts(d: Deployment, *, ttft_slo_s: float, job: str = "dsr1") -> list[Alert]:
    out = [
        Alert("Dsr1ServerDown", f'up{{job="{job}"}}', "==", 0, "1m", "critical",
              "dsr1 at {{ $labels.instance }} does not answer /metrics"),
        Alert("Dsr1Rejecting", "dsr1:rejected_ratio:5m", ">", 0.05, "5m", "warning",
              "{{ $value | humanizePercentage }} of requests get 429: raise --max-concurrent/--max-queue or add capacity"),
        Alert("Dsr1TtftOverSlo", "dsr1:ttft_p99:5m", ">", ttft_slo_s, "5m", "warning",
              f"TTFT p99 is {{{{ $value | humanizeDuration }}}}, over the {ttft_slo_s:g} s objective"),
    ]
    if engine_expr("kv_usage", d.engine):
        out.append(Alert("Dsr1KvCacheFull", "dsr1:kv_cache_usage", ">", 0.95, "10m", "warning",
                         "KV cache {{ $value | humanizePercentage }} full: requests queue; lower context or add memory"))
    if d.gpus:
        out.append(Alert("Dsr1GpuMemoryHigh", "dsr1:gpu_memory_used_ratio", ">", 0.97, "10m", "warning",
                         "GPU {{ $labels.gpu }} on {{ $labels.instance }} is {{ $value | humanizePercentage }} full"))
    if d.nodes:
        out.append(Alert("Dsr1NodeDown", 'up{job="dsr1-nodes"}', "==", 0, "1m", "critical",
                         "the node agent on {{ $labels.instance }} does not answer: the node is down"))
        out.append(Alert("Dsr1NodeUnreachable", "dsr1_node_head_reachable", "==", 0, "1m", "critical",
                         "node {{ $labels.node_rank }} cannot reach the head on the NCCL interface"))
    return out


def all_queries(d: Deployment) -> list[str]:
    return [q.expr for r in rows(d) for p in r.panels for q in p.queries]
