"""One benchmark run: preflight, then each sweep point (warm-up, load, metrics, files).

`run_sweep` is the library entry point (`dsr1 bench` is a thin layer over it). It
never prints; progress goes through `Hooks`. After each point the results files are
rewritten, so an interrupted run keeps every finished point.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from dsr1 import __version__
from dsr1.bench import report
from dsr1.bench.client import Client, RequestResult, RequestSpec, ServerInfo
from dsr1.bench.load import arrival_offsets, run_closed, run_open
from dsr1.bench.metrics import count_tokens, request_metrics, summarize
from dsr1.errors import UsageError

DEFINITIONS = {
    "ttft": "send -> first chunk carrying a token (content, reasoning_content or reasoning); role-only chunks skipped",
    "ttft_answer": "send -> first chunk carrying answer text (content)",
    "tpot": "(e2el - ttft) / (output_tokens - 1), requests with >1 output token (vLLM benchmark_serving)",
    "itl": "gaps between consecutive token chunks, pooled over requests (vLLM benchmark_serving)",
    "e2el": "send -> end of stream",
    "output_tokens": "server usage.completion_tokens when reported, else client tokenizer; reasoning + answer",
    "output_throughput": "output tokens (reasoning + answer) of completed requests / point duration",
    "duration": "first send -> last completion of the point; warm-up excluded",
    "goodput": "completed requests meeting every --slo limit / point duration",
    "client_lag": "open loop: actual send - scheduled send (client queueing; max-concurrency waits included)",
    "server_token_counters": "change of the server's /metrics *token*_total counters over the point (null: no /metrics); "
                             "failed requests included",
}


@dataclass
class BenchConfig:
    url: str
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    endpoint: str = "chat"
    concurrency: list[int] = field(default_factory=list)  # closed-loop sweep
    rate: list[float] = field(default_factory=list)  # open-loop sweep (inf allowed)
    arrival: str = "poisson"
    max_concurrency: int | None = None
    requests: int | None = 100  # per point
    duration: float | None = None  # s per point
    warmup: int = 2
    input_len: str = "256"
    output_len: str = "128"
    prefix_len: int = 0
    dataset: str | None = None
    tokenizer: str | None = None
    ignore_eos: bool = True
    slo: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    timeout: float = 600.0
    think_tags: bool = False  # content before </think> is reasoning (R1 served without a reasoning parser)
    pool_size: int = 512  # prompts prepared per duration-bounded point

    def validate(self) -> None:
        if self.concurrency and self.rate:
            raise UsageError("--concurrency and --rate both given",
                             hint="sweep one: --concurrency 1,2,4 (closed loop) or --rate 1,2,inf (open loop); "
                                  "cap open loop with --max-concurrency")
        if self.requests is None and self.duration is None:
            raise UsageError("each point needs a bound", hint="pass --requests N and/or --duration SECONDS")
        if any(c < 1 for c in self.concurrency):
            raise UsageError("--concurrency values must be >= 1", hint="e.g. --concurrency 1,2,4,8")
        if any(not r > 0 for r in self.rate):  # `not >` also refuses nan
            raise UsageError("--rate values must be > 0", hint="e.g. --rate 1,2,4,inf")
        if any(math.isinf(r) for r in self.rate) and self.requests is None:
            raise UsageError("--rate inf sends every request at once and needs a count", hint="pass --requests N")
        if self.arrival not in ("poisson", "constant"):
            raise UsageError(f"unknown --arrival {self.arrival!r}", hint="use --arrival poisson or constant")
        if (self.requests is not None and self.requests < 1) or (self.duration is not None and self.duration <= 0):
            raise UsageError("--requests and --duration must be positive", hint="e.g. --requests 100")
        if self.dataset is not None and self.prefix_len:
            raise UsageError("--prefix-len applies to random prompts, not to --dataset",
                             hint="drop --prefix-len, or drop --dataset to use random prompts with a shared prefix")

    def client(self) -> Client:
        return Client(self.url, self.model, api_key=self.api_key, endpoint=self.endpoint, ignore_eos=self.ignore_eos,
                      timeout=self.timeout, think_tags=self.think_tags)

    def public(self) -> dict[str, Any]:
        """The config as recorded in results: never the API key itself."""
        d = asdict(self)
        d.pop("api_key")
        d["api_key_set"] = bool(self.api_key)
        d["rate"] = [None if math.isinf(r) else r for r in self.rate]  # JSON has no inf: null means inf
        return d


@dataclass
class Hooks:
    """Callbacks for progress; all optional. The command wires them to rich."""

    preparing: Callable[[int], None] = lambda n: None  # about to build n prompts (tokenizer work, untimed)
    point_start: Callable[[int, str, int | None], None] = lambda i, label, total: None
    request_done: Callable[[RequestResult], None] = lambda r: None
    point_done: Callable[[dict[str, Any]], None] = lambda p: None


def environment() -> dict[str, Any]:
    """Where the client ran. The load average is there because a busy client inflates TTFT (aiperf #1424)."""
    from dsr1.probe.gpu import probe_gpus
    from dsr1.probe.host import cpu_info

    gpus = probe_gpus()  # never raises: NVML trouble becomes findings
    return {"dsr1_version": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "machine": platform.machine(), "cpu_model": cpu_info()[0], "cpu_count": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0], "client": "dsr1.bench.http (asyncio, one process)",
            "gpus": [{"name": g.name, "memory_total": g.memory_total} for g in gpus.gpus],
            "gpu_driver": gpus.driver_version}


def new_document(cfg: BenchConfig, tokenizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """An empty results document. `tokenizer`: `TokenizerChoice.public()`, where the client's counts came from."""
    doc = {"schema_version": report.SCHEMA_VERSION,
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "interrupted": False, "config": cfg.public(), "environment": environment(), "server": {},
           "definitions": DEFINITIONS, "points": []}
    if tokenizer is not None:
        doc["tokenizer"] = tokenizer
    return doc


def _plan(cfg: BenchConfig) -> list[tuple[str, float]]:
    if cfg.rate:
        return [("rate", r) for r in cfg.rate]
    return [("concurrency", float(c)) for c in (cfg.concurrency or [1])]


async def _settled_counters(client: Client, wait: float = 0.05, limit: float = 2.0) -> dict[str, float] | None:
    """The server's token counters once two reads `wait` apart agree (at most `limit` s): a server may
    count a request just after its last event reaches the client, which would move the warm-up's last
    request into the point (+1 request) or the point's last one out of it (-1)."""
    last = await client.token_counters()
    deadline = time.monotonic() + limit
    while last is not None and time.monotonic() < deadline:
        await asyncio.sleep(wait)
        now = await client.token_counters()
        if now == last:
            break
        last = now
    return last


async def _point(cfg: BenchConfig, client: Client, idx: int, mode: str, x: float, specs: list[RequestSpec],
                 rng: random.Random, encode: Callable[[str], int] | None, hooks: Hooks) -> dict[str, Any]:
    """Measure one load level; return its results entry (summary and per-request rows)."""
    label = f"c={int(x)}" if mode == "concurrency" else f"rate={x:g}"
    before = await _settled_counters(client)
    hooks.point_start(idx, label, cfg.requests)
    pick = lambda i: specs[i % len(specs)]  # noqa: E731
    if mode == "concurrency":
        run = await run_closed(client.send, pick, int(x), count=cfg.requests, duration=cfg.duration,
                               on_done=hooks.request_done)
    else:
        offsets = arrival_offsets(x, cfg.arrival, rng, count=cfg.requests, duration=cfg.duration)
        run = await run_open(client.send, pick, offsets, max_concurrency=cfg.max_concurrency,
                             duration=cfg.duration, on_done=hooks.request_done)
    after = await _settled_counters(client) if before is not None else None
    rows = []
    for r in sorted(run.results, key=lambda r: r.sent):
        row = request_metrics(r, count_tokens(r, encode))
        row["start"] = r.sent - run.started
        row["client_lag"] = None if r.scheduled is None else r.sent - r.scheduled
        rows.append(row)
    lags = [r["client_lag"] for r in rows if r["client_lag"] is not None]
    return {"index": idx, "mode": mode,
            "concurrency": int(x) if mode == "concurrency" else cfg.max_concurrency,
            "rate": None if mode == "concurrency" or math.isinf(x) else x,
            "arrival": cfg.arrival if mode == "rate" else None,
            "summary": summarize(rows, duration=run.duration, slo=cfg.slo, ignore_eos=cfg.ignore_eos,
                                 client_lag=lags, max_inflight=run.max_inflight),
            "server_token_counters": None if after is None else {k: v - before.get(k, 0.0) for k, v in after.items()},
            "requests": rows}


async def _run(cfg: BenchConfig, workload: Callable[[int], RequestSpec], encode: Callable[[str], int] | None,
               doc: dict[str, Any], out_dir: Path | None, hooks: Hooks, server_extra: dict[str, Any],
               info: ServerInfo | None) -> None:
    async with cfg.client() as client:
        if info is None:
            info = await client.preflight()
        doc["server"] = {**asdict(info), **server_extra}
        spec_i = 0
        rng = random.Random(cfg.seed)
        for idx, (mode, x) in enumerate(_plan(cfg)):
            # Fresh prompts for every point, prepared before timing starts (tokenizing in the
            # loop would slow the client), so a prefix cache warmed by one point cannot help the next.
            n = cfg.requests if cfg.requests is not None else cfg.pool_size
            hooks.preparing(n + cfg.warmup)
            specs = [workload(spec_i + i) for i in range(n + cfg.warmup)]
            spec_i += n + cfg.warmup
            warm, specs = specs[: cfg.warmup], specs[cfg.warmup:]
            if warm:
                conc = int(x) if mode == "concurrency" else (cfg.max_concurrency or len(warm))
                await run_closed(lambda s, _t: client.send(s), lambda i: warm[i], max(1, min(conc, len(warm))),
                                 count=len(warm))
            point = await _point(cfg, client, idx, mode, x, specs, rng, encode, hooks)
            doc["points"].append(point)
            if out_dir is not None:
                report.write(doc, out_dir)
            hooks.point_done(point)


def check_server(cfg: BenchConfig) -> ServerInfo:
    """The preflight alone (reachable, key accepted, model served); sets `cfg.model` to the served name."""

    async def go() -> ServerInfo:
        async with cfg.client() as client:
            return await client.preflight()

    info = asyncio.run(go())
    cfg.model = info.model
    return info


def run_sweep(cfg: BenchConfig, workload: Callable[[int], RequestSpec], *, encode: Callable[[str], int] | None = None,
              out_dir: Path | None = None, hooks: Hooks | None = None, server_extra: dict[str, Any] | None = None,
              info: ServerInfo | None = None, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every point of `cfg`; return the results document (also written under `out_dir`
    after every point). `info`: the result of `check_server(cfg)`, when the caller already ran
    it. `doc`: the document to fill (default `new_document(cfg)`), so a caller still holds it
    when Ctrl-C arrives.

    On Ctrl-C the document is marked interrupted, written with the finished points,
    and the KeyboardInterrupt propagates.
    """
    cfg.validate()
    doc = new_document(cfg) if doc is None else doc
    try:
        asyncio.run(_run(cfg, workload, encode, doc, out_dir, hooks or Hooks(), server_extra or {}, info))
    except KeyboardInterrupt:
        doc["interrupted"] = True
        if out_dir is not None and doc["points"]:
            report.write(doc, out_dir)
        raise
    return doc
