"""Per-request and per-point metrics, defined as vLLM's benchmark_serving defines them.

  TTFT   send -> first token chunk (content, reasoning_content or reasoning; a
         role-only chunk is not a token). ttft_answer: send -> first `content` chunk.
  TPOT   (e2e - TTFT) / (output_tokens - 1); excludes the first token; only for
         requests with more than one output token.
  ITL    gaps between consecutive token chunks, pooled over requests (a chunk
         carrying several tokens is one gap).
  E2EL   send -> end of stream.
  Throughput: completed requests, output tokens (reasoning + answer) and input +
         output tokens, each divided by the point's wall time (first send to last
         completion). Goodput: completed requests meeting every SLO, per second.
Failed requests are counted by kind and kept out of every latency and throughput.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from dsr1.bench.client import RequestResult
from dsr1.errors import UsageError

PERCENTILES = (50, 90, 95, 99)
SLO_KEYS = ("ttft", "ttft_answer", "tpot", "itl", "e2el")
# MLPerf Inference server-scenario p99 limits for DeepSeek-R1 (ms), a ready-made preset.
SLO_PRESETS = {"mlperf-r1": {"ttft": 2000.0, "tpot": 80.0},
               "mlperf-r1-interactive": {"ttft": 1500.0, "tpot": 15.0}}


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, which vLLM uses)."""
    if not values:
        raise ValueError("percentile of no values")
    return _ranked(sorted(values), p)


def _ranked(xs: list[float], p: float) -> float:
    """percentile() of already sorted values (describe sorts once for all four)."""
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def describe(values: list[float], scale: float = 1000.0) -> dict[str, float] | None:
    """mean, std, min, max and p50/p90/p95/p99 of `values` (seconds), in ms by default."""
    if not values:
        return None
    xs = sorted(v * scale for v in values)  # pooled ITLs of an R1 point can be millions of values
    mean = sum(xs) / len(xs)
    out = {"mean": mean, "std": math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)), "min": xs[0], "max": xs[-1]}
    out.update({f"p{p}": _ranked(xs, p) for p in PERCENTILES})
    return out


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft=2000,tpot=80` (milliseconds) or a preset name (mlperf-r1)."""
    if not text:
        return {}
    if text in SLO_PRESETS:
        return dict(SLO_PRESETS[text])
    slo = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in SLO_KEYS:
            raise UsageError(f"unknown SLO key {key!r} in --slo {text!r}",
                             hint=f"use keys {', '.join(SLO_KEYS)} in ms, or a preset: {', '.join(SLO_PRESETS)}")
        try:
            slo[key] = float(value.removesuffix("ms"))
        except ValueError:
            raise UsageError(f"--slo {key}={value!r} is not a number of milliseconds", hint="e.g. --slo ttft=2000,tpot=80")
    return slo


@dataclass
class Tokens:
    """Token counts of one request and where they came from."""

    input: int | None
    output: int
    reasoning: int
    answer: int
    source: str  # usage | client | chunks
    usage_output: int | None = None
    client_output: int | None = None
    usage_input: int | None = None
    client_input: int | None = None


def count_tokens(r: RequestResult, encode: Callable[[str], int] | None) -> Tokens:
    """Prefer the server's usage; fall back to the client tokenizer, then to chunk counts.

    `encode(text)` returns a token count (no special tokens added: a BOS per chunk
    inflated counts ~2x in inference-perf #580, so the whole text is encoded once).
    """
    usage = r.usage or {}
    usage_out = usage.get("completion_tokens")
    rtext, atext = r.reasoning_text, r.answer_text
    client_out = encode(rtext + atext) if encode else None
    if usage_out is not None:
        out, source = int(usage_out), "usage"
    elif client_out is not None:
        out, source = client_out, "client"
    else:
        out, source = len(r.chunk_times), "chunks"
    details = usage.get("completion_tokens_details") or {}
    if details.get("reasoning_tokens") is not None:
        reasoning = int(details["reasoning_tokens"])
    elif encode:
        if not (rtext and atext):  # all reasoning or all answer: no split to estimate
            reasoning = client_out if rtext else 0
        else:  # both: split the output count in the proportion the client tokenizer sees
            client_r, client_a = encode(rtext), encode(atext)
            reasoning = round(out * client_r / max(client_r + client_a, 1))
    else:
        reasoning = round(out * r.reasoning_chunks / max(r.reasoning_chunks + r.answer_chunks, 1))
    reasoning = min(reasoning, out)
    usage_in = usage.get("prompt_tokens")
    inp = usage_in if usage_in is not None else r.input_tokens
    return Tokens(inp, out, reasoning, out - reasoning, source, usage_out, client_out, usage_in, r.input_tokens)


def tpot(r: RequestResult, output_tokens: int) -> float | None:
    if r.ttft is None or r.e2e is None or output_tokens < 2:
        return None
    return (r.e2e - r.ttft) / (output_tokens - 1)


def itls(r: RequestResult) -> list[float]:
    t = r.chunk_times
    return [b - a for a, b in zip(t, t[1:])]


def meets(slo: dict[str, float], m: dict[str, float | None]) -> bool:
    """All SLO limits (ms) hold for one request's metrics (s). A missing metric fails (no answer, no TPOT)."""
    for key, limit in slo.items():
        v = m.get("itl_mean" if key == "itl" else key)
        if v is None or v * 1000.0 > limit:
            return False
    return True


def request_metrics(r: RequestResult, tok: Tokens) -> dict[str, Any]:
    """One request's row for the results file."""
    it = itls(r)
    return {"ok": r.ok, "error": r.error, "detail": r.detail or None,
            "ttft": r.ttft, "ttft_answer": r.ttft_answer, "e2el": r.e2e, "tpot": tpot(r, tok.output) if r.ok else None,
            "itl_mean": sum(it) / len(it) if it else None, "itl": it,
            "input_tokens": tok.input, "output_tokens": tok.output, "reasoning_tokens": tok.reasoning,
            "answer_tokens": tok.answer, "token_source": tok.source, "usage_output_tokens": tok.usage_output,
            "client_output_tokens": tok.client_output, "usage_input_tokens": tok.usage_input,
            "client_input_tokens": tok.client_input, "max_tokens": r.max_tokens, "chunks": len(r.chunk_times)}


def summarize(rows: list[dict[str, Any]], *, duration: float, slo: dict[str, float], ignore_eos: bool,
              client_lag: Iterable[float] = (), max_inflight: int = 0) -> dict[str, Any]:
    """Summary of one sweep point from its request rows (see `request_metrics`)."""
    ok = [r for r in rows if r["ok"]]
    errors = Counter(r["error"] for r in rows if not r["ok"])
    dur = max(duration, 1e-9)
    out_tok = sum(r["output_tokens"] for r in ok)
    in_tok = sum(r["input_tokens"] or 0 for r in ok)
    good = sum(1 for r in ok if meets(slo, r)) if slo else None
    compared = [r for r in ok if r["usage_output_tokens"] is not None and r["client_output_tokens"] is not None]
    mismatched = [r for r in compared if r["usage_output_tokens"] != r["client_output_tokens"]]
    sources = Counter(r["token_source"] for r in ok)
    in_compared = [r for r in ok if r["usage_input_tokens"] is not None and r["client_input_tokens"] is not None]
    return {
        "requests": len(rows), "completed": len(ok), "failed": len(rows) - len(ok), "errors": dict(errors),
        "duration_s": duration, "max_concurrency_observed": max_inflight,
        "request_throughput": len(ok) / dur,
        "output_throughput": out_tok / dur,
        "answer_throughput": sum(r["answer_tokens"] for r in ok) / dur,
        "total_token_throughput": (in_tok + out_tok) / dur,
        "goodput": good / dur if slo else None,
        "slo_attainment": (good / len(ok) if ok else 0.0) if slo else None,
        "input_tokens": in_tok, "output_tokens": out_tok,
        "reasoning_tokens": sum(r["reasoning_tokens"] for r in ok),
        "answer_tokens": sum(r["answer_tokens"] for r in ok),
        "token_source": next(iter(sources)) if len(sources) == 1 else ("mixed" if sources else None),
        "token_check": {"compared": len(compared), "mismatched": len(mismatched),
                        "usage_output_tokens": sum(r["usage_output_tokens"] for r in compared),
                        "client_output_tokens": sum(r["client_output_tokens"] for r in compared),
                        # prompts are built to an exact length; the server's count says whether it held (vllm #10847)
                        "input_compared": len(in_compared),
                        "input_mismatched": sum(1 for r in in_compared
                                                if r["usage_input_tokens"] != r["client_input_tokens"])},
        # ignore_eos asked for max_tokens; fewer means the server ignored it (vllm #13333, Ollama).
        "short_outputs": sum(1 for r in ok if r["output_tokens"] < r["max_tokens"]) if ignore_eos else None,
        "ttft_ms": describe([r["ttft"] for r in ok if r["ttft"] is not None]),
        "ttft_answer_ms": describe([r["ttft_answer"] for r in ok if r["ttft_answer"] is not None]),
        "tpot_ms": describe([r["tpot"] for r in ok if r["tpot"] is not None]),
        "itl_ms": describe([g for r in ok for g in r["itl"]]),
        "e2el_ms": describe([r["e2el"] for r in ok if r["e2el"] is not None]),
        "client_lag_ms": describe(list(client_lag)),
    }
