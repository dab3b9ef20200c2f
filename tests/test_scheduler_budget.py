"""The embedded scheduler's prompt budget grows with the queue: prompts that arrive together while
streams run are prefilled together, not one per decode step (issue 23: p99 TTFT at 8 users).

Real model (the demo, fp32, fast path) and the real scheduler on its own engine thread; the one
instrument is a pass-through wrapper around the model's prefill_rows that records how many prompts
each call carried.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import torch

from dsr1.serve.engine import EmbeddedModel
from dsr1.serve.sampling import SamplingParams
from dsr1.serve.scheduler import QUEUE_CHUNKS, Request, Scheduler


def _wait(cond, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_prompts_arriving_together_are_prefilled_together(demo_model_dir):
    worker = cf.ThreadPoolExecutor(1)  # the model is loaded on the thread the engine loop runs on
    model = worker.submit(lambda: EmbeddedModel(demo_model_dir, dtype=torch.float32)).result()
    calls: list[int] = []
    real = model.prefill_rows

    def prefill_rows(cache, first, rows, *a, **k):
        calls.append(len(rows))
        return real(cache, first, rows, *a, **k)

    model.prefill_rows = prefill_rows
    chunk = 32
    sched = Scheduler(model, max_concurrent=8, max_queue=8, max_model_len=256, prefill_chunk=chunk, worker=worker)
    sched.start()
    done: dict[str, threading.Event] = {}
    firsts: dict[str, int] = {}

    def submit(name: str, text: str, n: int) -> Request:
        ids = model.tokenizer(text)["input_ids"]
        assert len(ids) <= chunk
        done[name] = threading.Event()

        def sink(ev, name=name):
            firsts.setdefault(name, len(calls))
            if ev.finish_reason:
                done[name].set()

        return sched.submit(Request(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), sink))

    try:
        streaming = submit("stream", "Count from one to a hundred:", 120)
        _wait(lambda: len(streaming.out_ids) >= 3)  # it is decoding
        with sched._lock:  # the six arrive within one iteration of the engine loop
            for i in range(6):
                submit(f"u{i}", f"Question {i}: what is {i} plus {i}? Answer briefly.", 4)
        for ev in done.values():
            assert ev.wait(120)
    finally:
        sched.shutdown()
        worker.shutdown()
    # One chunk per waiting prompt: all six in one forward (a fixed one-chunk budget took one per step)
    assert calls[0] == 1 and 6 in calls[1:], calls
    assert len({firsts[f"u{i}"] for i in range(6)}) == 1, firsts


def test_the_budget_is_capped():
    """However long the queue, one iteration prefills at most QUEUE_CHUNKS chunks (a bounded stall)."""
    s = Scheduler.__new__(Scheduler)
    s.prefill_chunk, s._rows = 256, []
    s._waiting = list(range(100))
    assert s._budget() == 256 * QUEUE_CHUNKS
    s._waiting = []
    assert s._budget() == 256 * 4  # nobody decoding: a burst of arrivals in one forward
