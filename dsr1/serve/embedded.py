"""The embedded engine as a backend of dsr1's front (dsr1.serve.backend): the prompt rendered and
tokenized here, the request handed to the scheduler's thread, its events turned into pieces
with the reasoning split off (dsr1.serve.reasoning) the way vLLM's deepseek_r1 parser splits it.

It honours `seed`, `stop` (in dsr1.serve.sampling) and `n` (n rows of the batch); the options of
schema.CAPABILITIES it lacks (logprobs, tools, response_format, penalties, logit_bias) are refused
by the front with the same error an engine lacking them gets.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from dsr1.serve import schema
from dsr1.serve.backend import Call, Piece
from dsr1.serve.reasoning import ReasoningParser
from dsr1.serve.sampling import SamplingParams
from dsr1.serve.scheduler import Draining, Event, Overloaded, Request, Scheduler


@dataclass
class EmbeddedConfig:
    max_model_len: int
    reasoning_on: bool  # the deepseek_r1 split runs (dsr1.serve.server.choose_reasoning_parser)
    system_prompt: str = "keep"  # keep | merge | drop
    adapters: dict[str, int] | None = None  # LoRA: served name -> adapter id in the model


class EmbeddedBackend:
    engine = "embedded"
    supports = frozenset({"n"})  # n choices as n rows; logprobs, tools, penalties, ... are refused
    measures_latency = True

    def __init__(self, scheduler: Scheduler, cfg: EmbeddedConfig):
        self.sched, self.cfg = scheduler, cfg
        self.tok = scheduler.model.tokenizer

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def healthy(self) -> bool:
        return True

    async def engine_metrics(self) -> bytes:
        return b""  # the scheduler fills dsr1's own series

    def counts(self) -> tuple[int, int]:
        return self.sched.counts()

    # -- the prompt ----------------------------------------------------------------------------
    def _chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        msgs = [dict(m) for m in messages]
        mode = self.cfg.system_prompt
        if mode != "keep" and any(m["role"] == "system" for m in msgs):
            system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
            msgs = [m for m in msgs if m["role"] != "system"]
            if mode == "merge":
                first = next((m for m in msgs if m["role"] == "user"), None)
                if first is None:
                    msgs.insert(0, {"role": "user", "content": system})
                else:
                    first["content"] = f"{system}\n\n{first['content']}"
        if not self.tok.chat_template:
            raise schema.ApiError(400, "this model has no chat template; use /v1/completions with a raw prompt",
                                  param="messages", code="no_chat_template")
        try:
            text = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja errors from the model's own template (e.g. role order rules)
            raise schema.ApiError(400, f"the model's chat template rejected these messages: {e}",
                                  param="messages") from None
        return self.tok(text, add_special_tokens=False).input_ids

    def _ids(self, call: Call) -> tuple[list[int], str]:
        c = call.c
        if call.kind == "chat":
            return self._chat_prompt(c.messages), "messages"
        if isinstance(c.prompt, str):
            return self.tok(c.prompt).input_ids, "prompt"
        ids = list(c.prompt)
        if any(t < 0 or t >= self.sched.model.vocab for t in ids):
            raise schema.bad("prompt", f"token ids must be in [0, {self.sched.model.vocab})")
        return ids, "prompt"

    def _budget(self, prompt_len: int, asked: int | None, param: str) -> int:
        room = self.cfg.max_model_len - prompt_len
        if room < 1:
            raise schema.ApiError(400, f"This model's maximum context length is {self.cfg.max_model_len} tokens. "
                                       f"However, your {param} resulted in {prompt_len} tokens. Shorten the {param}.",
                                  param=param, code="context_length_exceeded")
        return room if asked is None else min(asked, room)

    # -- generating ----------------------------------------------------------------------------
    async def open(self, call: Call) -> AsyncIterator[Piece]:
        c = call.c
        ids, param = self._ids(call)
        max_tokens = self._budget(len(ids), c.max_tokens, param)
        adapter = (self.cfg.adapters or {}).get(c.model, 0)
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        handles: list[Request] = []
        try:
            for i in range(c.n):  # `n` choices: n rows of one batch, seeds seed, seed+1, ... when seeded
                params = SamplingParams(max_tokens=max_tokens, temperature=c.temperature, top_p=c.top_p,
                                        seed=None if c.seed is None else c.seed + i, stop=c.stop,
                                        ignore_eos=c.ignore_eos)
                sink = (lambda i: lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)))(i)
                handles.append(self.sched.submit(Request(ids, params, sink, adapter=adapter)))
        except (Overloaded, Draining) as e:
            for h in handles:
                self.sched.abort(h)
            if isinstance(e, Draining):
                raise schema.ApiError(503, "Server is shutting down", type="server_error",
                                      code="shutting_down") from None
            # the front's admission keeps this from happening; the scheduler's own guard
            raise schema.ApiError(429, f"Server is overloaded ({e}); retry later", type="rate_limit_error",
                                  code="overloaded") from None
        call.prompt_tokens, call.request_id = len(ids), handles[0].id
        return self._pieces(call, handles, queue)

    async def _pieces(self, call: Call, handles: list[Request], queue: asyncio.Queue) -> AsyncIterator[Piece]:
        split = [ReasoningParser() if call.kind == "chat" and self.cfg.reasoning_on else None for _ in handles]
        done: set[int] = set()
        tokens = [0] * len(handles)
        try:
            while len(done) < len(handles):
                i, ev = await queue.get()
                if split[i] is not None:
                    reasoning, text = split[i].feed(ev.text)
                    if ev.finish_reason:
                        r2, t2 = split[i].finish()
                        reasoning, text = reasoning + r2, text + t2
                else:
                    reasoning, text = "", ev.text
                tokens[i] = ev.completion_tokens
                call.usage = schema.usage(ev.prompt_tokens, sum(tokens))  # the prompt counts once
                if ev.finish_reason:
                    done.add(i)
                    h = handles[i]
                    if i == 0 and h.first_token_at is not None:
                        call.ttft_s = h.first_token_at - h.arrived
                yield Piece(index=i, text=text, reasoning=reasoning, finish_reason=ev.finish_reason)
        finally:
            for i, h in enumerate(handles):
                if i not in done:  # closed early: the client left or a guard blocked; free the rows now
                    self.sched.abort(h)
