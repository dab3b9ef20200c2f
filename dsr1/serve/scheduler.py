"""Continuous batching: one engine thread that interleaves prompt chunks and decode steps.

Each loop iteration (1) takes in new requests and cancellations, (2) prefills up to
`prefill_chunk` prompt tokens per waiting request (whole short prompts together in one
padded forward, or one chunk of a long one; see `_budget`; whole prompts in a second forward
when more wait, see `_prefill_some`), and (3) runs one decode step for every running request.
Requests therefore join and leave the batch between decode steps, prompts delay running streams
by at most STREAMING_FORWARDS budgets per step (QUEUE_CHUNKS chunks each when the queue is long),
and a cancelled request (client gone) leaves at the next iteration.

Running requests occupy rows 0..n-1 of the slot cache; at most one request is
part-way through its prompt and sits right after them. When a request leaves,
the highest rows are moved into the hole so the batch stays one contiguous slice.

The HTTP layer talks to this thread only through `submit`, `abort` and the sink
callback each request carries (called on this thread; the HTTP layer hops back to
its event loop).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dsr1.serve.sampling import SamplingParams, make_generator, sample

log = logging.getLogger("dsr1.serve")

WAITING, PREFILL, RUNNING, DONE = "waiting", "prefill", "running", "done"
# The most prompt chunks one iteration prefills however long the queue (4 x 256 tokens): bounds how long
# one decode step stalls, and a burst's first prompts stream before the whole burst is prefilled.
QUEUE_CHUNKS = 4
# The most whole-prompt forwards of up to QUEUE_CHUNKS chunks each that one iteration runs while streams
# decode (they stall for all of them); while none does, as many as the waiting prompts need.
STREAMING_FORWARDS = 2
# An idle engine that gets a request waits until arrivals pause for COALESCE_GAP (at most COALESCE_MAX)
# before it prefills, so requests sent together are prefilled together (see _gather).
COALESCE_GAP, COALESCE_MAX = 0.003, 0.02


class Overloaded(Exception):
    """Running slots and the waiting queue are full (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class Event:
    """What a request's sink receives: new text, counts, and the finish reason at the end."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    id: str = ""
    state: str = WAITING
    slot: int = -1
    cached: int = 0
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    pending_tokens: int = 0
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float = 0.0
    finish_reason: str | None = None
    gen: torch.Generator | None = None
    adapter: int = 0  # LoRA adapter id in the model (0: the base model)
    spec_state: object = None  # the proposer's per-request state (dsr1.serve.speculative)
    written: int = 0  # positions whose K/V are in the cache; ahead of `cached` while a verify step is accepted
    _pfx: int = 0
    _read: int = 0


class Scheduler:
    def __init__(self, model, *, max_concurrent: int, max_queue: int, max_model_len: int, prefill_chunk: int = 256,
                 stream_interval: int = 1, metrics=None, worker, prefix_cache=None, proposer=None):
        self.model = model
        self.tok = model.tokenizer
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.prefill_chunk = max(1, prefill_chunk)
        self.stream_interval = max(1, stream_interval)
        self.metrics = metrics
        self.cache = model.make_cache(max_concurrent, max_model_len)
        # a callable (cache) -> PrefixCache, made after the slot cache so it can size itself from it
        self.prefix = prefix_cache(self.cache) if prefix_cache else None
        self.proposer = proposer  # dsr1.serve.speculative.NgramProposer or DraftProposer, or None
        self._lock = threading.Condition()
        self._inbox: list[Request] = []
        self._aborts: set[Request] = set()
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[Request] = []
        self._to_store: list[Request] = []  # prefilled, their prompts not yet in the prefix cache (_store_prompts)
        self._live = 0  # admitted and not finished (waiting + running), guarded by _lock
        self._accepting = True
        self._stop = False
        self._ids = itertools.count(1)
        # `worker`: the single-thread executor that loaded the model (see dsr1.serve.server.plan);
        # the loop must run on that same OS thread.
        self._worker = worker
        self._future = None

    # -- called from the HTTP side --------------------------------------------------------------
    def start(self) -> None:
        self._future = self._worker.submit(self._run)

    def submit(self, req: Request) -> Request:
        with self._lock:
            if not self._accepting:
                raise Draining("server is shutting down")
            if self._live >= self.max_concurrent + self.max_queue:
                raise Overloaded(f"{self.max_concurrent} requests running and {self.max_queue} queued")
            self._live += 1
            req.id = req.id or f"req-{next(self._ids)}"
            self._inbox.append(req)
            self._lock.notify()
        return req

    def abort(self, req: Request) -> None:
        with self._lock:
            if req.state != DONE:
                self._aborts.add(req)
                self._lock.notify()

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def cancel_all(self) -> None:
        with self._lock:
            self._aborts.update(self._inbox)
            self._aborts.update(self._waiting)
            self._aborts.update(self._rows)
            self._lock.notify()

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._future is not None:
            try:
                self._future.result(timeout)
            except Exception:
                log.exception("engine loop ended with an error")

    def counts(self) -> tuple[int, int]:
        """(running, waiting) right now; running includes the request being prefilled."""
        with self._lock:
            return len(self._rows), len(self._waiting) + len(self._inbox)

    def kv_usage(self) -> float:
        used = sum(r.cached for r in list(self._rows))
        return used / max(1, self.cache.capacity_tokens)

    # -- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self._inbox or self._aborts or self._waiting or self._rows):
                    self._lock.wait()
                if self._stop:
                    break
                self._gather()
                if self._stop:  # shut down while gathering: the requests are aborted below, not prefilled
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                aborts, self._aborts = self._aborts, set()
            for req in aborts:
                self._finish(req, "abort")
            try:
                idle = not any(r.state == RUNNING for r in self._rows)
                # waiting prompts' next forward before the decode step (any number while nobody decodes,
                # STREAMING_FORWARDS in all while streams do), with what arrived during the last one (a
                # client on the same cores sends late while a forward holds them): see _prefill_some
                forwards = 1
                while self._prefill_some() and (idle or forwards < STREAMING_FORWARDS) and self._take_arrivals():
                    forwards += 1
                self._store_prompts()
                self._decode_step()
            except Exception:  # a failed forward must not kill the server: fail the requests in it
                log.exception("engine step failed")
                self._to_store.clear()  # after a failed forward the rows' K/V are not worth keeping
                for req in list(self._rows):
                    self._finish(req, "error")
        for req in list(self._rows) + list(self._waiting) + self._inbox:
            self._finish(req, "abort")

    def _take_arrivals(self) -> bool:
        """Between the forwards of a burst: move new requests into the waiting queue; whether any wait now
        (False as well on a shutdown or an abort, which the loop's next iteration handles first)."""
        with self._lock:
            if self._stop or self._aborts:
                return False
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        return bool(self._waiting)

    def _gather(self) -> None:
        """With nothing running or waiting, give requests sent together a moment to arrive (called with
        the lock held; waiting releases it). Why: the first of a burst woke the engine alone, and the
        others, arriving a millisecond later, waited for its whole prefill before theirs started: at 8
        users with 256-token prompts (closed loop, so every burst arrives together) one request's first
        token came after ~0.1 s and the other seven after ~0.45 s, while all eight prefilled in one
        forward take ~0.39 s (demo model, 2-core Xeon). A lone request pays one quiet gap (3 ms)."""
        if self._rows or self._waiting or not self._inbox:
            return
        deadline = time.perf_counter() + COALESCE_MAX
        while len(self._inbox) < self.max_concurrent and not (self._stop or self._aborts):
            seen = len(self._inbox)
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._lock.wait(min(COALESCE_GAP, left))
            if len(self._inbox) == seen:  # a quiet gap: nobody else is on the way
                break

    def _prefill_some(self) -> int:
        """Spend up to `_budget()` prompt tokens: first on a part-prefilled long prompt, then on
        whole short prompts together in one forward, then on the next prompt that is long or whose
        beginning the prefix cache holds (loaded, then computed from there in chunks). Returns how
        many whole prompts that forward took.

        Called again at once, before the decode step, while it takes whole prompts and more wait (_run):
        when the iteration began with nobody decoding, until none waits, so a burst that reaches an idle
        engine is prefilled in forwards of up to QUEUE_CHUNKS prompts back to back, the first group's
        tokens already sent, and its last group does not also wait for a decode step of the first and the
        prefix cache's copy (8 users, 256-token prompts, demo model, 2-core Xeon with AMX, in the server:
        the last four's first token ~565 -> ~525 ms after arrival); nobody streams yet whom that would
        stall but the burst's own first group. While streams decode, STREAMING_FORWARDS forwards at most:
        at 8 users the requests that replace finished ones arrive six or eight at a time, and in one
        forward of four per step the last two waited for a decode step and another forward (p99 725 ms
        where the run's others were 450-511)."""
        budget = full = self._budget()
        pre = self._rows[-1] if self._rows and self._rows[-1].state == PREFILL else None
        if pre is not None:
            budget -= self._prefill_chunk(pre, budget)
            if pre.state == PREFILL:
                return 0
        fresh: list[Request] = []
        used = 0
        hits: list[int] = []
        while self._waiting and len(self._rows) + len(fresh) < self.max_concurrent:
            head = self._waiting[0]
            if self._to_store and self._shares_start(head):  # its beginning was just computed: reuse it
                self._store_prompts()
            # the prefix cache holds base-model KV; an adapted request computes its own
            hits = self.prefix.match(head.prompt_ids) if self.prefix and not head.adapter else []
            if hits or used + len(head.prompt_ids) > budget:
                break
            used += len(self._waiting.popleft().prompt_ids)
            fresh.append(head)
        if fresh:
            first = len(self._rows)
            for i, req in enumerate(fresh):
                req.state, req.slot = PREFILL, first + i
                req.gen = None if req.params.greedy else make_generator(req.params.seed)
                self._rows.append(req)
            logits = self.model.prefill_rows(self.cache, first, [r.prompt_ids for r in fresh],
                                             [r.adapter for r in fresh])
            for req in fresh:
                req.cached, req.state = len(req.prompt_ids), RUNNING
                if self.prefix and not req.adapter:
                    self.prefix.count_miss(len(req.prompt_ids))
                    self._to_store.append(req)
            tokens = sample(logits, [r.params for r in fresh], [r.gen for r in fresh])
            for req, tok in zip(fresh, tokens):
                self._accept(req, tok)
            budget -= used
        # what is left of the budget starts the next prompt in chunks if it is long (more than a whole
        # budget) or cached in part; one that fits a budget of its own waits for the next forward whole:
        # split by a leftover, a 257-token prompt after three of 256 took two forwards (244 + 13 tokens)
        head_len = len(self._waiting[0].prompt_ids) if self._waiting else 0
        if budget > 0 and self._waiting and len(self._rows) < self.max_concurrent \
                and (hits or head_len > budget and not (fresh and head_len <= full)):
            req = self._waiting.popleft()
            req.state, req.slot = PREFILL, len(self._rows)
            req.gen = None if req.params.greedy else make_generator(req.params.seed)
            self._rows.append(req)
            if self.prefix and not req.adapter:
                req.cached = self.prefix.load(self.cache, req.slot, hits, len(req.prompt_ids))
            self._prefill_chunk(req, budget)
        return len(fresh)

    def _budget(self) -> int:
        """Prompt tokens this iteration may prefill: `prefill_chunk` per waiting request, at least one
        chunk, at most QUEUE_CHUNKS of them (QUEUE_CHUNKS while nobody is decoding: nobody stalls then).

        Why in proportion to the queue: with a fixed budget of one chunk, 8 users arriving together
        with 256-token prompts were admitted one per decode step, so the last one's first token
        waited for 7 prefills and 7 decode steps (p99 TTFT 2.0 s on the demo model on 2 cores,
        against vLLM's 0.5 s, which prefills up to 4096 tokens a step on CPU). Prompts prefilled
        together in one forward also cost less per token than one at a time. What it costs: the
        running streams' one step that carries those prompts is longer (bounded by the cap). Why the
        cap is 4 chunks, not the 16 (4096 tokens, vLLM's CPU default) it was: prefill on a CPU is
        compute-bound, so a forward over 8 prompts takes as long as two over 4 each; with 16, all 8 of
        a burst waited for the one 8-prompt forward, in fours the first four stream after half of it
        and the other four one decode step later than all eight would (demo model, 8 users, 256-token
        prompts, 2-core Xeon with AMX: TTFT mean 422 -> 256 ms, p99 452 -> 464 ms; and with all 8
        in one forward only when nobody decodes: 343 / 485)."""
        waiting = len(self._waiting) + (1 if self._rows and self._rows[-1].state == PREFILL else 0)
        floor = 1 if any(r.state == RUNNING for r in self._rows) else QUEUE_CHUNKS
        return self.prefill_chunk * max(floor, min(waiting, QUEUE_CHUNKS))

    def _prefill_chunk(self, pre: Request, budget: int) -> int:
        """One chunk of a long prompt into its row; returns the tokens used."""
        chunk = pre.prompt_ids[pre.cached : pre.cached + budget]
        logits = self.model.prefill(self.cache, pre.slot, chunk, pre.cached, pre.adapter)
        pre.cached += len(chunk)
        if pre.cached == len(pre.prompt_ids):
            pre.state = RUNNING
            if self.prefix and not pre.adapter:
                self._to_store.append(pre)
            self._accept(pre, sample(logits[None], [pre.params], [pre.gen])[0])
        return len(chunk)

    def _decode_step(self) -> None:
        batch = [r for r in self._rows if r.state == RUNNING]
        if not batch:
            return
        t0 = time.perf_counter()
        drafts = self._drafts(batch) if self.proposer else None
        if drafts is None:
            logits = self.model.decode(self.cache, [r.out_ids[-1] for r in batch], [r.cached for r in batch],
                                       [r.adapter for r in batch])
            for r in batch:
                r.cached += 1
            tokens = sample(logits, [r.params for r in batch], [r.gen for r in batch])
            for r, t in zip(batch, tokens):
                self._accept(r, t)
        else:
            self._verify_step(batch, drafts)
        if self.metrics:
            self.metrics.observe_step(len(batch), time.perf_counter() - t0)

    def _drafts(self, batch: list[Request]) -> list[list[int]] | None:
        """Draft tokens per row (greedy rows only), or None when no row has any."""
        limits = [min(r.params.max_tokens - len(r.out_ids) - 1, self.max_model_len - r.cached - 2)
                  if r.params.greedy else 0 for r in batch]
        drafts = self.proposer.propose_batch(batch, limits)
        return drafts if any(drafts) else None

    def _verify_step(self, batch: list[Request], drafts: list[list[int]]) -> None:
        """One forward over each row's last token plus its draft; keep the drafted tokens that equal
        the model's greedy choice, then the model's own next token (greedy-exact)."""
        logits = self.model.verify(self.cache, [[r.out_ids[-1]] + d for r, d in zip(batch, drafts)],
                                   [r.cached for r in batch], [r.adapter for r in batch])
        sampled = [i for i, r in enumerate(batch) if not r.params.greedy]
        first = sample(logits[sampled, 0], [batch[i].params for i in sampled], [batch[i].gen for i in sampled]) \
            if sampled else []
        picks = dict(zip(sampled, first))
        best = logits.argmax(-1).tolist()
        outs = []
        for i, (r, d) in enumerate(zip(batch, drafts)):
            if i in picks:
                out = [picks[i]]
            else:
                m = 0
                while m < len(d) and d[m] == best[i][m]:
                    m += 1
                out = d[:m] + [best[i][m]]
                if self.metrics and d:
                    self.metrics.observe_spec(len(d), m)
            outs.append(out)
            r.written = r.cached + len(out)  # a row moved while earlier rows finish keeps these
        for r, out in zip(batch, outs):
            for tok in out:
                if r.state != RUNNING:
                    break
                r.cached += 1
                self._accept(r, tok)

    # -- per-token bookkeeping ----------------------------------------------------------------
    def _accept(self, req: Request, token: int) -> None:
        now = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = now
            if self.metrics:
                self.metrics.observe_ttft(now - req.arrived)
        elif self.metrics:
            self.metrics.observe_itl(now - req.last_token_at)
        req.last_token_at = now
        p = req.params
        if token in self.model.eos_ids and not p.ignore_eos:
            self._finish(req, "stop")
            return
        req.out_ids.append(token)
        req.pending_tokens += 1
        req.text += self._detok(req)
        if p.stop:
            hit = _find_stop(req.text, p.stop, req.sent)
            if hit is not None:
                req.text = req.text[:hit]
                self._finish(req, "stop")
                return
        if len(req.out_ids) >= p.max_tokens or req.cached + 1 >= self.max_model_len:
            self._finish(req, "length")
            return
        if req.pending_tokens >= self.stream_interval:
            # Hold back a possible stop-string prefix so it is never streamed.
            hold = max((len(s) - 1 for s in p.stop), default=0)
            upto = max(req.sent, len(req.text) - hold)
            self._emit(req, req.text[req.sent : upto])
            req.sent = upto

    def _detok(self, req: Request) -> str:
        # Incremental decoding (as vLLM/TGI do): decode a small window and emit what grew,
        # waiting while the tail is an incomplete UTF-8 sequence.
        ids = req.out_ids
        before = self.tok.decode(ids[req._pfx : req._read], skip_special_tokens=True)
        after = self.tok.decode(ids[req._pfx :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            req._pfx, req._read = req._read, len(ids)
            return after[len(before) :]
        return ""

    def _emit(self, req: Request, text: str, finish: str | None = None) -> None:
        req.pending_tokens = 0
        try:
            req.sink(Event(text, len(req.out_ids), len(req.prompt_ids), finish))
        except Exception:
            log.exception("request sink failed")

    def _finish(self, req: Request, reason: str) -> None:
        if req.state == DONE:
            return
        if req in self._rows:
            self._remove_row(req)
        elif req in self._waiting:
            self._waiting.remove(req)
        elif req in self._inbox:
            self._inbox.remove(req)
        req.state, req.finish_reason = DONE, reason
        with self._lock:
            self._live -= 1
            self._aborts.discard(req)
        # Counted before the last event goes out: a client that has its answer (dsr1 bench reading
        # /metrics right after its last request) finds the request in the counters.
        if self.metrics:
            self.metrics.observe_finish(req, time.perf_counter())
        self._emit(req, req.text[req.sent :], reason)
        req.sent = len(req.text)

    def _store_prompts(self) -> None:
        """Copy the prompts prefilled in this iteration into the prefix cache: after their first tokens
        went out and after the burst's later forwards (the copy took ~20 ms of a burst's time to first
        token, demo model, 2-core Xeon), before the decode step, and before any row moves (_remove_row),
        while each still sits in its row (the decode step writes past the prompt only)."""
        if self._to_store:
            self.prefix.store_rows(self.cache, [(r.slot, r.prompt_ids) for r in self._to_store])
            self._to_store.clear()

    def _shares_start(self, req: Request) -> bool:
        """Whether `req`'s first prefix-cache block equals that of a prompt waiting in _to_store."""
        b = self.prefix.block
        return not req.adapter and len(req.prompt_ids) > b and \
            any(r.prompt_ids[:b] == req.prompt_ids[:b] for r in self._to_store)

    def _remove_row(self, req: Request) -> None:
        self._store_prompts()  # a request that ended at its first token still leaves its prompt behind
        self._rows.remove(req)
        running = [r for r in self._rows if r.state == RUNNING]
        pre = [r for r in self._rows if r.state == PREFILL]
        n = len(running)
        free = sorted(set(range(n)) - {r.slot for r in running})
        for r, s in zip([r for r in running if r.slot >= n], free):
            self._move(r, s)
        for r in pre:
            if r.slot != n:
                self._move(r, n)
        self._rows = sorted(running, key=lambda r: r.slot) + pre

    def _move(self, r: Request, slot: int) -> None:
        self.cache.move(r.slot, slot, max(r.cached, r.written))
        if self.proposer:
            self.proposer.move(r, r.slot, slot)
        r.slot = slot


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    best = None
    for s in stops:
        i = text.find(s, max(0, start - len(s)))
        if i != -1 and (best is None or i < best):
            best = i
    return best
