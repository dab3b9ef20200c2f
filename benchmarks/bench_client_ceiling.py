"""The benchmark client's own ceiling, measured side by side in one run (issue 5).

A minimal loopback server (dsr1.bench.loopback, in its own process so it does not
share the client's GIL) streams a whole answer at once. Against it we measure:

  latency at concurrency 1 (sequential requests):
    raw     a blocking-socket client that does nothing but send and read: the floor
    dsr1    dsr1.bench.client (asyncio streams, parses every SSE event)
    httpx   httpx.AsyncClient streaming with aiter_lines (the obvious alternative)
  "added latency" = a client's TTFT / E2E percentile minus the raw floor's.

  ceiling: closed loop at --concurrency for --requests streamed requests, req/s,
  for dsr1 and httpx; GuideLLM too when it is importable (see docs/performance.md).

Targets (issue 5): >= 1000 streamed req/s, < 1 ms added p50.
Run: python benchmarks/bench_client_ceiling.py [--requests 3000] [--concurrency 32] [--tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsr1.bench.client import Client, RequestSpec  # noqa: E402
from dsr1.bench.load import run_closed  # noqa: E402
from dsr1.bench.metrics import percentile  # noqa: E402


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "dsr1.bench.loopback"], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc, proc.stdout.readline().strip()


def body(tokens: int) -> bytes:
    return json.dumps({"model": "loopback", "messages": [{"role": "user", "content": "hello world"}],
                       "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True},
                       "ignore_eos": True}).encode()


def raw_latency(url: str, n: int, tokens: int) -> tuple[list[float], list[float]]:
    """The floor: one keep-alive socket, send, recv until the terminating chunk."""
    host, port = url.removeprefix("http://").split(":")
    b = body(tokens)
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
           f"content-length: {len(b)}\r\n\r\n").encode() + b
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ttft, e2e = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(req)
        buf, first = b"", None
        while not buf.endswith(b"0\r\n\r\n"):
            buf += s.recv(1 << 16)
            if first is None and b'"content": "tok0' in buf:
                first = time.perf_counter()
        end = time.perf_counter()
        ttft.append(first - t0)
        e2e.append(end - t0)
    s.close()
    return ttft, e2e


async def dsr1_run(url: str, n: int, conc: int, tokens: int) -> tuple[float, list, list]:
    async with Client(url, "loopback") as c:
        await run_closed(c.send, lambda i: RequestSpec("hello world", tokens), conc, count=min(200, n))  # warm-up
        run = await run_closed(c.send, lambda i: RequestSpec("hello world", tokens), conc, count=n)
    bad = [r for r in run.results if not r.ok]
    assert not bad, bad[0].detail
    assert all(len(r.chunk_times) == tokens for r in run.results)
    return n / run.duration, [r.ttft for r in run.results], [r.e2e for r in run.results]


async def httpx_run(url: str, n: int, conc: int, tokens: int) -> tuple[float, list, list]:
    import httpx

    payload = body(tokens)
    ttft, e2e = [], []
    lim = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=url, limits=lim, timeout=60) as cl:
        async def one() -> None:
            t0 = time.perf_counter()
            first, count = None, 0
            async with cl.stream("POST", "/v1/chat/completions", content=payload,
                                 headers={"content-type": "application/json"}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:") and '"content": "tok' in line:
                        count += 1
                        first = first or time.perf_counter()
            assert count == tokens
            ttft.append(first - t0)
            e2e.append(time.perf_counter() - t0)

        async def worker(k: int) -> None:
            for _ in range(k):
                await one()

        await asyncio.gather(*(worker(min(200, n) // conc) for _ in range(conc)))  # warm-up
        ttft.clear()
        e2e.clear()
        t = time.perf_counter()
        await asyncio.gather(*(worker(n // conc) for _ in range(conc)))
        dur = time.perf_counter() - t
    return (n // conc) * conc / dur, ttft, e2e


def guidellm_run(url: str, n: int, conc: int, tokens: int, tokenizer: str | None) -> tuple[float | None, str]:
    """GuideLLM's concurrent profile against the same server, if guidellm is importable (GUIDELLM_PATH)."""
    extra = os.environ.get("GUIDELLM_PATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (extra, str(REPO)) if p)}
    probe = subprocess.run([sys.executable, "-c", "import guidellm"], env=env, capture_output=True, text=True)
    if probe.returncode:
        return None, "guidellm not importable: " + probe.stderr.strip().splitlines()[-1][:200]
    if not tokenizer:
        return None, "guidellm needs --tokenizer for synthetic data"
    out = Path(tempfile.mkdtemp()) / "gl.json"
    # guidellm 0.8 syntax (kind=... option groups)
    cmd = [sys.executable, "-m", "guidellm", "run", "--backend", f"kind=openai_http,target={url},model=loopback",
           "--profile", f"kind=concurrent,streams={conc}", "--constraint", f"kind=max_requests,count={n}",
           "--data", f"kind=synthetic_text,prompt_tokens=8,output_tokens={tokens}",
           "--tokenizer", f"kind=huggingface_auto,model={tokenizer}", "--output", f"kind=json,path={out}",
           "--disable-progress"]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    if p.returncode or not out.exists():
        return None, f"guidellm failed (rc {p.returncode}): " + (p.stderr or p.stdout).strip()[-600:]
    try:
        b = json.loads(out.read_text())["benchmarks"][0]
        ok = b["metrics"]["request_totals"]["successful"]
        ttft = b["metrics"]["time_to_first_token_ms"]["successful"]["median"]
        return ok / b["duration"], (f"{ok} ok in its measured {b['duration']:.2f}s; its TTFT p50 {ttft:.1f} ms; "
                                    f"wall {wall:.0f}s incl. startup")
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError) as exc:
        return None, f"could not read guidellm's report: {exc!r}"
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def ms(xs: list[float], p: float) -> float:
    return percentile(xs, p) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--latency-requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--tokenizer", default=None, help="for GuideLLM's synthetic prompts")
    a = ap.parse_args()
    proc, url = start_server()
    try:
        print(f"loopback server {url}; {a.tokens} streamed tokens per request; {os.cpu_count()} CPUs", flush=True)
        raw_t, raw_e = raw_latency(url, a.latency_requests, a.tokens)
        _, d_t, d_e = asyncio.run(dsr1_run(url, a.latency_requests, 1, a.tokens))
        _, h_t, h_e = asyncio.run(httpx_run(url, a.latency_requests, 1, a.tokens))
        print(f"\nlatency at concurrency 1 ({a.latency_requests} requests), ms:")
        print(f"{'client':8} {'TTFT p50':>9} {'TTFT p99':>9} {'E2E p50':>9} {'E2E p99':>9} "
              f"{'added p50':>10} {'added p99':>10}")
        for name, t, e in (("raw", raw_t, raw_e), ("dsr1", d_t, d_e), ("httpx", h_t, h_e)):
            print(f"{name:8} {ms(t, 50):9.3f} {ms(t, 99):9.3f} {ms(e, 50):9.3f} {ms(e, 99):9.3f} "
                  f"{ms(e, 50) - ms(raw_e, 50):10.3f} {ms(e, 99) - ms(raw_e, 99):10.3f}")
        srv = psutil.Process(proc.pid)
        c0, s0 = time.process_time(), sum(srv.cpu_times()[:2])
        d_rps, _, _ = asyncio.run(dsr1_run(url, a.requests, a.concurrency, a.tokens))
        d_cpu = (time.process_time() - c0) / (a.requests + 200) * 1e6
        s_cpu = (sum(srv.cpu_times()[:2]) - s0) / (a.requests + 200) * 1e6
        c0 = time.process_time()
        h_rps, _, _ = asyncio.run(httpx_run(url, a.requests, a.concurrency, a.tokens))
        h_cpu = (time.process_time() - c0) / (a.requests + 200) * 1e6
        g_rps, g_note = guidellm_run(url, min(a.requests, 1000), a.concurrency, a.tokens, a.tokenizer)
        print(f"\nceiling, closed loop at concurrency {a.concurrency} ({a.requests} requests):")
        print(f"  dsr1   {d_rps:8.0f} req/s  ({d_rps * a.tokens:,.0f} streamed tok/s); client CPU {d_cpu:.0f} us/request "
              f"(= {1e6 / d_cpu:,.0f} req/s per free core), loopback server CPU {s_cpu:.0f} us/request")
        print(f"  httpx  {h_rps:8.0f} req/s  -> dsr1/httpx = {d_rps / h_rps:.2f}x; client CPU {h_cpu:.0f} us/request")
        if g_rps:
            print(f"  guidellm {g_rps:6.0f} req/s  -> dsr1/guidellm = {d_rps / g_rps:.2f}x  ({g_note})")
        else:
            print(f"  guidellm: not measured: {g_note}")
        added = ms(d_e, 50) - ms(raw_e, 50)
        print(f"machine load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
              "(other jobs share this machine: ceilings scale with free CPU)")
        print(f"\ntargets: >= 1000 req/s: {'met' if d_rps >= 1000 else 'MISSED'} ({d_rps:.0f}); "
              f"< 1 ms added p50: {'met' if added < 1 else 'MISSED'} ({added:.3f} ms)")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
