"""Load generators: closed loop (N users) and open loop (arrivals at a rate).

Closed loop keeps exactly N requests in flight and reaches a steady state; open loop
sends on a precomputed arrival schedule (Poisson or constant, as vLLM computes its
arrivals up front), optionally capped by `max_concurrency`, and so shows queueing.
A point ends when its request count is reached or its duration has passed, whichever
comes first; requests already in flight then finish and are counted. Each request is
a task of its own, so a slow one never holds up the next (no head-of-line blocking).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from dsr1.bench.client import RequestResult, RequestSpec

Send = Callable[[RequestSpec, "float | None"], Awaitable[RequestResult]]


@dataclass
class PointRun:
    results: list[RequestResult] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    max_inflight: int = 0

    @property
    def duration(self) -> float:
        return self.ended - self.started


def arrival_offsets(rate: float, process: str, rng: random.Random, *, count: int | None = None,
                    duration: float | None = None) -> list[float]:
    """Send times (s after the start) of an open-loop point. `rate` in requests/s; inf sends all at once."""
    if count is None and duration is None:
        raise ValueError("an arrival schedule needs a count or a duration")
    if math.isinf(rate):
        if count is None:
            raise ValueError("--rate inf needs --requests (all requests are sent at once)")
        return [0.0] * count
    if process not in ("poisson", "constant"):
        raise ValueError(f"unknown arrival process {process!r}")
    offsets, t = [], 0.0
    while (count is None or len(offsets) < count) and (duration is None or t < duration):
        offsets.append(t)
        t += rng.expovariate(rate) if process == "poisson" else 1.0 / rate
    return offsets


class _Tracker:
    """Counts requests in flight, so tests (and the results) can show the limit held."""

    def __init__(self, send: Send, on_done: Callable[[RequestResult], None] | None):
        self.send, self.on_done = send, on_done
        self.inflight = 0
        self.max_inflight = 0

    async def __call__(self, spec: RequestSpec, scheduled: float | None) -> RequestResult:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            res = await self.send(spec, scheduled)
        finally:
            self.inflight -= 1
        if self.on_done:
            self.on_done(res)
        return res


async def run_closed(send: Send, next_spec: Callable[[int], RequestSpec], concurrency: int, *,
                     count: int | None = None, duration: float | None = None,
                     on_done: Callable[[RequestResult], None] | None = None) -> PointRun:
    """`concurrency` workers, each sending its next request as soon as its last one ends."""
    if count is None and duration is None:
        raise ValueError("a point needs a request count or a duration")
    track = _Tracker(send, on_done)
    run = PointRun(started=time.perf_counter())
    deadline = run.started + duration if duration is not None else math.inf
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while (count is None or issued < count) and time.perf_counter() < deadline:
            i = issued
            issued += 1
            run.results.append(await track(next_spec(i), None))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.ended = time.perf_counter()
    run.max_inflight = track.max_inflight
    return run


async def run_open(send: Send, next_spec: Callable[[int], RequestSpec], offsets: list[float], *,
                   max_concurrency: int | None = None, duration: float | None = None,
                   on_done: Callable[[RequestResult], None] | None = None) -> PointRun:
    """Send request i at `offsets[i]` seconds after the start (later if `max_concurrency` is full)."""
    track = _Tracker(send, on_done)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    run = PointRun(started=time.perf_counter())
    deadline = run.started + duration if duration is not None else math.inf

    async def one(spec: RequestSpec, scheduled: float) -> None:
        if gate is None:
            run.results.append(await track(spec, scheduled))
            return
        async with gate:
            run.results.append(await track(spec, scheduled))

    tasks = []
    try:
        for i, off in enumerate(offsets):
            at = run.started + off
            if at >= deadline:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(next_spec(i), at)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    run.ended = time.perf_counter()
    run.max_inflight = track.max_inflight
    return run
