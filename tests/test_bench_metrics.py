"""Statistics of `dsr1 bench` on known timing sequences (vLLM benchmark_serving definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from dsr1.bench.client import RequestResult
from dsr1.bench.metrics import (count_tokens, describe, itls, meets, parse_slo, percentile, request_metrics,
                                summarize, tpot)
from dsr1.errors import UsageError


def result(chunks, *, e2e=None, usage=None, reasoning=0, ok=True, error=None, max_tokens=0, input_tokens=None):
    """A request whose token chunks arrived at `chunks` (s after send); first `reasoning` are reasoning chunks."""
    r = RequestResult(ok=ok, sent=0.0, error=error, max_tokens=max_tokens, input_tokens=input_tokens)
    for i, t in enumerate(chunks):
        r.chunk_times.append(t)
        if i < reasoning:
            r.reasoning_chunks += 1
            r.reasoning_parts.append(f" r{i}")
        else:
            r.answer_chunks += 1
            r.answer_parts.append(f" a{i}")
            if r.ttft_answer is None:
                r.ttft_answer = t
    r.ttft = chunks[0] if chunks else None
    r.e2e = e2e if e2e is not None else (chunks[-1] if chunks else None)
    r.usage = usage
    return r


@pytest.mark.parametrize("p", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(p):
    rng = np.random.default_rng(0)
    xs = list(rng.exponential(1.0, 37))
    assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))


def test_percentile_known_values():
    xs = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert percentile(xs, 50) == 5.5
    assert percentile(xs, 90) == pytest.approx(9.1)
    assert percentile(xs, 99) == pytest.approx(9.91)
    assert percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_describe_reports_ms():
    d = describe([0.001, 0.002, 0.003, 0.004])
    assert d["mean"] == pytest.approx(2.5)
    assert d["p50"] == pytest.approx(2.5)
    assert d["min"] == pytest.approx(1.0) and d["max"] == pytest.approx(4.0)
    assert d["p99"] == pytest.approx(3.97)
    assert describe([]) is None


def test_tpot_excludes_first_token_and_itl_is_chunk_gaps():
    # first token at 100 ms, then 4 more at +20 ms each; stream ends at 190 ms
    r = result([0.1, 0.12, 0.14, 0.16, 0.18], e2e=0.19, usage={"completion_tokens": 5, "prompt_tokens": 7})
    assert tpot(r, 5) == pytest.approx((0.19 - 0.1) / 4)
    assert itls(r) == pytest.approx([0.02, 0.02, 0.02, 0.02])
    # a multi-token chunk is one gap, but TPOT still divides by tokens from usage
    r2 = result([0.1, 0.2], e2e=0.2, usage={"completion_tokens": 11})
    assert itls(r2) == pytest.approx([0.1])
    assert tpot(r2, 11) == pytest.approx(0.01)
    assert tpot(result([0.1]), 1) is None  # no TPOT for a one-token answer


def test_token_sources_usage_then_client_then_chunks():
    usage = result([0.1, 0.2, 0.3], usage={"completion_tokens": 9, "prompt_tokens": 12}, input_tokens=12)
    tok = count_tokens(usage, encode=lambda s: len(s.split()))
    assert (tok.output, tok.source, tok.client_output, tok.usage_output) == (9, "usage", 3, 9)
    assert (tok.usage_input, tok.client_input, tok.input) == (12, 12, 12)
    client = count_tokens(result([0.1, 0.2, 0.3], input_tokens=5), encode=lambda s: 2 * len(s.split()))
    assert (client.output, client.source, client.input) == (6, "client", 5)
    chunks = count_tokens(result([0.1, 0.2, 0.3, 0.4]), encode=None)
    assert (chunks.output, chunks.source) == (4, "chunks")


def test_reasoning_and_answer_tokens_split():
    r = result([0.1, 0.2, 0.3, 0.4], reasoning=3, usage={"completion_tokens": 8})
    tok = count_tokens(r, encode=None)  # no tokenizer: split the server's count by chunk share
    assert (tok.reasoning, tok.answer) == (6, 2)
    tok = count_tokens(r, encode=lambda s: len(s.split()))
    assert (tok.reasoning, tok.answer) == (6, 2)
    details = result([0.1, 0.2], reasoning=1,
                     usage={"completion_tokens": 10, "completion_tokens_details": {"reasoning_tokens": 7}})
    tok = count_tokens(details, encode=None)
    assert (tok.reasoning, tok.answer) == (7, 3)


def test_parse_slo():
    assert parse_slo("ttft=2000,tpot=80") == {"ttft": 2000.0, "tpot": 80.0}
    assert parse_slo("e2el=5000ms") == {"e2el": 5000.0}
    assert parse_slo("mlperf-r1") == {"ttft": 2000.0, "tpot": 80.0}
    assert parse_slo(None) == {}
    with pytest.raises(UsageError, match="unknown SLO key"):
        parse_slo("latency=3")
    with pytest.raises(UsageError, match="not a number"):
        parse_slo("ttft=fast")


def test_summary_goodput_throughput_and_errors_apart():
    rows = []
    # 4 good requests: TTFT 100 ms, TPOT 10 ms (10 tokens over 190 ms)
    for _ in range(4):
        r = result([0.1 + 0.01 * i for i in range(10)], e2e=0.19,
                   usage={"completion_tokens": 10, "prompt_tokens": 20}, max_tokens=10)
        rows.append(request_metrics(r, count_tokens(r, None)))
    # 1 slow-TTFT request: 600 ms to first token
    r = result([0.6 + 0.01 * i for i in range(10)], e2e=0.69, usage={"completion_tokens": 10, "prompt_tokens": 20},
               max_tokens=10)
    rows.append(request_metrics(r, count_tokens(r, None)))
    # 1 short request: server stopped at 4 of 10 despite ignore_eos
    r = result([0.1, 0.11, 0.12, 0.13], e2e=0.13, usage={"completion_tokens": 4, "prompt_tokens": 20}, max_tokens=10)
    rows.append(request_metrics(r, count_tokens(r, None)))
    # 2 failures, kept out of every latency and throughput
    for kind in ("http_500", "timeout"):
        f = RequestResult(ok=False, sent=0.0, error=kind)
        rows.append(request_metrics(f, count_tokens(f, None)))
    s = summarize(rows, duration=2.0, slo={"ttft": 500, "tpot": 20}, ignore_eos=True, max_inflight=3)
    assert (s["requests"], s["completed"], s["failed"]) == (8, 6, 2)
    assert s["errors"] == {"http_500": 1, "timeout": 1}
    assert s["request_throughput"] == pytest.approx(3.0)
    assert s["output_throughput"] == pytest.approx(54 / 2.0)
    assert s["total_token_throughput"] == pytest.approx((54 + 120) / 2.0)
    assert s["goodput"] == pytest.approx(5 / 2.0)  # 4 good + the short one (TTFT 100, TPOT 10)
    assert s["slo_attainment"] == pytest.approx(5 / 6)
    assert s["short_outputs"] == 1
    assert s["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert s["ttft_ms"]["max"] == pytest.approx(600.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(10.0)
    assert s["itl_ms"]["p50"] == pytest.approx(10.0)
    assert s["token_source"] == "usage"
    assert s["max_concurrency_observed"] == 3


def test_meets_requires_metric_present():
    assert meets({"ttft": 100}, {"ttft": 0.05})
    assert not meets({"ttft": 100}, {"ttft": 0.15})
    assert not meets({"tpot": 10}, {"tpot": None})  # one-token answers have no TPOT
    assert meets({"itl": 30}, {"itl_mean": 0.02})
