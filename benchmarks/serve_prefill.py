"""Does a long prompt stall running streams? Inter-token latency with chunked vs unchunked prefill.

Starts `dsr1 serve` twice (--prefill-chunk 256, then a chunk larger than any prompt), runs 4
streaming requests, sends one ~1500-token prompt while they decode, and reports the running
streams' largest inter-token gap around that moment next to their median gap.

    DSR1_TEST_CACHE=/work/test-cache python benchmarks/serve_prefill.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import PROMPT, default_model, start_dsr1  # noqa: E402

LONG = "The quick brown fox jumps over the lazy dog. " * 150  # ~1500 tokens


def stream(url: str, prompt: str, new: int, times: list[float]) -> None:
    body = {"model": "bench", "prompt": prompt, "max_tokens": new, "stream": True, "ignore_eos": True,
            "temperature": 0}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())


def run(url: str, new: int) -> dict:
    streams = [[] for _ in range(4)]
    threads = [threading.Thread(target=stream, args=(url, PROMPT, new, t)) for t in streams]
    for t in threads:
        t.start()
    while min(len(t) for t in streams) < 10:
        time.sleep(0.01)
    long_times: list[float] = []
    t_long = time.perf_counter()
    lt = threading.Thread(target=stream, args=(url, LONG, 2, long_times))
    lt.start()
    for t in threads + [lt]:
        t.join()
    gaps = [b - a for t in streams for a, b in zip(t, t[1:])]
    around = [b - a for t in streams for a, b in zip(t, t[1:]) if b >= t_long and a <= long_times[0]]
    return {"median_itl_ms": 1000 * statistics.median(gaps), "max_itl_during_long_prefill_ms": 1000 * max(around),
            "long_ttft_s": long_times[0] - t_long}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=default_model())
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--new", type=int, default=60)
    args = ap.parse_args()
    for chunk in (256, 100_000):
        with start_dsr1(args.model, args.dtype, None, extra=["--prefill-chunk", str(chunk),
                                                            "--max-model-len", "2048"]) as url:
            stream(url, PROMPT, 4, [])  # warm-up
            r = run(url, args.new)
        print(f"prefill chunk {chunk}: {json.dumps({k: round(v, 3) for k, v in r.items()})}", flush=True)


if __name__ == "__main__":
    main()
