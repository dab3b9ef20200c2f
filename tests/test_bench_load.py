"""The load generator: arrival process, concurrency limits, bounds; against a real loopback HTTP server."""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import pytest

from dsr1.bench.client import Client, RequestSpec
from dsr1.bench.load import arrival_offsets, run_closed, run_open
from dsr1.bench.loopback import Behaviour, LoopbackServer


def test_poisson_arrivals_have_the_asked_rate_and_exponential_gaps():
    rng = random.Random(7)
    offs = arrival_offsets(20.0, "poisson", rng, count=20000)
    gaps = [b - a for a, b in zip(offs, offs[1:])]
    rate = len(gaps) / (offs[-1] - offs[0])
    assert rate == pytest.approx(20.0, rel=0.03)
    # exponential gaps: coefficient of variation ~1 (constant arrivals have 0)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)
    # memoryless: about e^-1 of gaps exceed the mean
    assert sum(g > 1 / 20.0 for g in gaps) / len(gaps) == pytest.approx(0.3679, abs=0.02)


def test_constant_and_infinite_arrivals_and_duration_bound():
    offs = arrival_offsets(4.0, "constant", random.Random(0), count=5)
    assert offs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert arrival_offsets(float("inf"), "poisson", random.Random(0), count=3) == [0.0, 0.0, 0.0]
    offs = arrival_offsets(10.0, "poisson", random.Random(1), duration=30.0)
    assert all(o < 30.0 for o in offs) and len(offs) == pytest.approx(300, rel=0.2)
    with pytest.raises(ValueError):
        arrival_offsets(float("inf"), "poisson", random.Random(0), duration=1.0)


def test_closed_loop_never_exceeds_concurrency():
    with LoopbackServer(behaviour=Behaviour(token_delay_s=0.002)) as srv:
        async def go():
            async with Client(srv.url, "loopback") as client:
                return await run_closed(client.send, lambda i: RequestSpec("hi there", 5), 4, count=40)

        run = asyncio.run(go())
    assert len(run.results) == 40 and all(r.ok for r in run.results)
    assert run.max_inflight == 4
    assert srv.stats.max_inflight == 4  # the server saw exactly 4 at once, never more
    assert srv.stats.requests == 40


def test_closed_loop_duration_bound_stops_issuing():
    with LoopbackServer(behaviour=Behaviour(token_delay_s=0.01)) as srv:
        async def go():
            async with Client(srv.url, "loopback") as client:
                return await run_closed(client.send, lambda i: RequestSpec("x", 3), 2, duration=0.5)

        t = time.perf_counter()
        run = asyncio.run(go())
        elapsed = time.perf_counter() - t
    # each request takes ~20 ms; 2 users for 0.5 s: far fewer than unbounded, all finished
    assert 4 <= len(run.results) <= 60
    assert elapsed < 2.0
    assert all(r.ok for r in run.results)


def test_open_loop_sends_on_schedule_and_respects_max_concurrency():
    with LoopbackServer(behaviour=Behaviour(token_delay_s=0.02)) as srv:
        async def go(offsets, cap):
            async with Client(srv.url, "loopback") as client:
                return await run_open(client.send, lambda i: RequestSpec("x", 4), offsets, max_concurrency=cap)

        # constant 50 req/s for 30 requests: the last is sent ~0.58 s after the first
        offs = arrival_offsets(50.0, "constant", random.Random(0), count=30)
        run = asyncio.run(go(offs, None))
        sends = sorted(r.sent for r in run.results)
        assert sends[-1] - sends[0] == pytest.approx(0.58, abs=0.15)
        lags = [r.sent - r.scheduled for r in run.results]
        assert statistics.median(lags) < 0.02
        # all at once but capped at 3 in flight
        srv.stats.max_inflight = 0
        run = asyncio.run(go([0.0] * 12, 3))
    assert len(run.results) == 12 and all(r.ok for r in run.results)
    assert run.max_inflight == 3 and srv.stats.max_inflight == 3


def test_open_loop_duration_bound_stops_sending():
    with LoopbackServer() as srv:
        async def go():
            async with Client(srv.url, "loopback") as client:
                offs = arrival_offsets(40.0, "constant", random.Random(0), count=80)  # 2 s of arrivals
                return await run_open(client.send, lambda i: RequestSpec("x", 2), offs, duration=0.5)

        run = asyncio.run(go())
    assert 18 <= len(run.results) <= 21  # arrivals at 0, 25 ms, ... < 500 ms
    assert run.duration < 1.0
