"""dsr1's OpenAI front: the one HTTP layer, whatever engine runs behind it (dsr1.serve.backend).

Clients see the same server with the embedded engine, vLLM, SGLang or llama-server: the same
routes (`ROUTES`), request validation (dsr1.serve.schema, refusing with one error shape what
the engine behind lacks), the API key checked in constant time, admission (429 with
Retry-After past `max_concurrent` running and `max_queue` waiting; 503 while draining),
guards (dsr1.guard: the input checked before the engine sees it, the output checked as it
streams with hold-back, tool-call arguments too), the audit log, the reasoning in the field
names dsr1 serves (`reasoning_content`, `reasoning` or both) laid out the same way, usage,
and one request-log line per request.

Starlette rather than FastAPI: bodies are validated by dsr1.serve.schema so every error is
OpenAI-shaped (FastAPI's own validation answers 422 in its format).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dsr1.serve import requestlog, schema
from dsr1.serve.audit import Audit
from dsr1.serve.backend import Call, Piece


@dataclass
class FrontConfig:
    model_name: str
    max_model_len: int
    max_concurrent: int
    max_queue: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    reasoning_field: str = "both"  # reasoning_content | reasoning | both
    reasoning_on: bool = True  # the model's reasoning is split off (the engine's parser, or the embedded one)
    retry_after_s: int = 1
    adapters: tuple[str, ...] = ()  # LoRA adapters served by these names
    guard: Any = None  # dsr1.guard.Policy (--guard), or None
    guard_plugin: Any = None  # (text, where) -> allow?, from --guard-plugin
    audit_log: Path | None = None
    audit_content: bool = False
    audit_max_bytes: int = 0  # rotate the audit log past this size (0: never)
    audit_backups: int = 5


class Admission:
    """At most `running` requests at the engine and `queued` waiting for a turn; beyond that, 429."""

    def __init__(self, running: int, queued: int):
        self.sem = asyncio.Semaphore(running)
        self.limit_waiting = queued
        self.running = self.waiting = 0

    async def acquire(self) -> None:
        if self.sem.locked() and self.waiting >= self.limit_waiting:
            raise schema.ApiError(429, f"Server is overloaded ({self.running} running, {self.waiting} queued); "
                                       f"retry later", type="rate_limit_error", code="overloaded")
        self.waiting += 1
        try:
            await self.sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self.sem.release()


def error_response(e: schema.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def models_body(name: str, max_model_len: int, adapters=()) -> dict[str, Any]:
    """The base model, then each LoRA adapter with the base as its `parent` (as vLLM lists them)."""
    base = {"id": name, "object": "model", "created": schema.now(), "owned_by": "dsr1", "max_model_len": max_model_len,
            "root": name, "parent": None}
    return {"object": "list", "data": [base] + [{**base, "id": a, "root": a, "parent": name} for a in adapters]}


def authorized(req: HttpRequest, api_key: str | None) -> bool:
    if not api_key:
        return True
    header = req.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # constant-time comparison of bytes so key length/prefix timing leaks nothing useful
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


async def read_json(req: HttpRequest, limit: int) -> Any:
    """The request body as JSON, refusing bodies over `limit` bytes before reading them whole."""
    length = req.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise schema.ApiError(413, f"request body is {length} bytes; the limit is {limit}", code="request_too_large")
    data = bytearray()
    async for chunk in req.stream():
        data += chunk
        if len(data) > limit:
            raise schema.ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise schema.ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None


@dataclass
class _Choice:
    """One choice's output as the client gets it, and the front's state while it streams."""

    layout: "_Layout" = field(default_factory=lambda: _Layout())
    text_guard: Any = None
    reasoning_guard: Any = None
    held_tools: list[dict] = field(default_factory=list)  # tool-call deltas held for the guard
    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # merged (non-streamed answers)
    logprobs: Any = None
    finish: str | None = None


@dataclass
class _Ctx:
    kind: str
    call: Call
    pieces: Any  # the backend's async generator
    endpoint: str
    client: str
    t0: float
    choices: dict[int, _Choice] = field(default_factory=dict)
    blocked: bool = False
    released: bool = False
    ttft: float | None = None


class Front:
    def __init__(self, backend, cfg: FrontConfig, metrics):
        self.backend, self.cfg, self.metrics = backend, cfg, metrics
        self.audit = Audit(cfg.audit_log, cfg.audit_content, cfg.audit_max_bytes, cfg.audit_backups)
        self.admission: Admission | None = None  # created inside the event loop
        self.ready = False  # set once listening (dsr1.serve.listen's on_ready)
        self.draining = False
        self.nodes = None  # multi-node: () -> [{"rank", "address"}] of the node agents seen (dsr1.monitoring.nodeagent)
        counts = getattr(backend, "counts", None)
        if counts is not None:  # the embedded scheduler's own counts: requests admitted but not yet in a row wait
            metrics.running.set_function(lambda: counts()[0])
            metrics.waiting.set_function(lambda: counts()[1] + (self.admission.waiting if self.admission else 0))
        else:
            metrics.running.set_function(lambda: self.admission.running if self.admission else 0)
            metrics.waiting.set_function(lambda: self.admission.waiting if self.admission else 0)

    async def startup(self) -> None:
        self.admission = Admission(self.cfg.max_concurrent, self.cfg.max_queue)
        await self.backend.start()

    async def shutdown(self) -> None:
        await self.backend.stop()

    # -- routes --------------------------------------------------------------------------------
    async def health(self, req: HttpRequest) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not self.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not await self.backend.healthy():
            return JSONResponse({"status": "engine unavailable", "engine": self.backend.engine}, status_code=503)
        a = self.admission
        return JSONResponse({"status": "ok", "model": self.cfg.model_name, "engine": self.backend.engine,
                             "running": a.running if a else 0, "waiting": a.waiting if a else 0})

    async def models(self, req: HttpRequest) -> Response:
        return JSONResponse(models_body(self.cfg.model_name, self.cfg.max_model_len, self.cfg.adapters))

    async def metrics_route(self, req: HttpRequest) -> Response:
        own = self.metrics.render()
        return Response(own + await self.backend.engine_metrics(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def deployment(self, req: HttpRequest) -> Response:
        """What runs here and what it exports: read by `dsr1 monitor init` to write a monitoring setup
        with only the panels and alerts that will have data (dsr1.monitoring)."""
        return JSONResponse({"model": self.cfg.model_name, "engine": self.backend.engine,
                             "metrics": self.metrics.features(), "nodes": self.nodes() if self.nodes else []})

    async def chat(self, req: HttpRequest) -> Response:
        return await self._handle(req, "chat")

    async def completions(self, req: HttpRequest) -> Response:
        return await self._handle(req, "completions")

    # -- a request -------------------------------------------------------------------------------
    def _check_model(self, name: str) -> None:
        if name != self.cfg.model_name and name not in self.cfg.adapters:
            names = ", ".join(f"'{n}'" for n in [self.cfg.model_name, *self.cfg.adapters])
            raise schema.ApiError(404, f"The model '{name}' does not exist; this server serves {names}",
                                  param="model", code="model_not_found")

    async def _handle(self, req: HttpRequest, kind: str) -> Response:
        t0 = time.perf_counter()
        endpoint = f"/v1/{'chat/completions' if kind == 'chat' else 'completions'}"
        client = req.client.host if req.client else "-"
        admitted = False
        try:
            if self.draining:
                raise schema.ApiError(503, "Server is shutting down", type="server_error", code="shutting_down")
            body = await read_json(req, self.cfg.max_body_bytes)
            parse = schema.parse_chat if kind == "chat" else schema.parse_completion
            c = parse(body, self.backend.supports, self.backend.engine)
            self._check_model(c.model)
            call = Call(kind, c, body)
            if self.cfg.guard is not None or self.cfg.guard_plugin is not None:
                await self._guard_input(call, endpoint, client)
            await self.admission.acquire()
            admitted = True
            pieces = await self.backend.open(call)
        except schema.ApiError as e:
            if admitted:
                self.admission.release()
            if e.status in (429, 503):
                e.headers.setdefault("Retry-After", str(self.cfg.retry_after_s))
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            self.audit.write(client=client, endpoint=endpoint, model=self.cfg.model_name, status=e.status,
                             error=e.message)
            requestlog.request(endpoint=endpoint, model=self.cfg.model_name, engine=self.backend.engine,
                               status=e.status, client=client, seconds=time.perf_counter() - t0,
                               error=e.code or e.message)
            return error_response(e)
        except BaseException:
            if admitted:
                self.admission.release()
            raise
        x = _Ctx(kind, call, pieces, endpoint, client, t0)
        if c.stream:
            return StreamingResponse(self._stream(x), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(req, x)

    # -- guards (dsr1.guard) -----------------------------------------------------------------------
    def _audit_guard(self, d, x_or_where: tuple[str, str, str]) -> None:
        endpoint, client, model = x_or_where
        self.audit.write(event="guard", client=client, endpoint=endpoint, model=model, where=d.where, action=d.action,
                         rule=d.rule)

    async def _guard_input(self, call: Call, endpoint: str, client: str) -> None:
        """Check the request's text before the engine sees it; block (an error, no engine call) or mask it."""
        from dsr1 import guard

        c = call.c
        param = "messages" if call.kind == "chat" else "prompt"
        texts = [m["content"] for m in c.messages] if call.kind == "chat" else \
            ([c.prompt] if isinstance(c.prompt, str) else [])
        d = guard.Decision("allow")
        if self.cfg.guard is not None:
            d = guard.check_input(self.cfg.guard, "\n".join(texts))
        if not d.blocked and self.cfg.guard_plugin is not None:
            d = await self._plugin("\n".join(texts), "input") or d
        if d.action != "allow":
            self._audit_guard(d, (endpoint, client, c.model))
        if d.blocked:
            code = "prompt_too_large" if d.rule == "max_prompt_chars" else "content_filter"
            raise schema.ApiError(400, f"The request was blocked by this server's content policy (rule "
                                       f"'{d.rule}')", param=param, code=code)
        if d.action == "mask":  # the engine never sees the matched text
            call.masked = True
            if call.kind == "chat":
                for m in c.messages:
                    m["content"] = guard.mask_input(self.cfg.guard, m["content"])
            else:
                c.prompt = d.text

    async def _plugin(self, text: str, where: str):
        """The user's classifier, off the event loop, with the policy's timeout; None when it allows.
        A hang or an error fails closed (block) or open, as the policy says."""
        from dsr1 import guard

        p = self.cfg.guard or guard.Policy()
        loop = asyncio.get_running_loop()
        try:
            verdict = await asyncio.wait_for(loop.run_in_executor(None, self.cfg.guard_plugin, text, where),
                                             timeout=p.plugin_timeout_s)
        except asyncio.TimeoutError:
            return guard.Decision("block" if p.plugin_on_error == "block" else "log", "plugin:timeout", where=where)
        except Exception as e:  # noqa: BLE001 - any failure of user code is handled by policy
            return guard.Decision("block" if p.plugin_on_error == "block" else "log",
                                  f"plugin:error:{type(e).__name__}", where=where)
        if verdict is True or verdict is None:
            return None
        return guard.Decision("block", f"plugin:{verdict}" if isinstance(verdict, str) else "plugin", where=where)

    def _new_choice(self) -> _Choice:
        from dsr1 import guard

        ch = _Choice()
        p = self.cfg.guard
        if p is not None and (any(r.applies("output") for r in p.rules) or p.pii_mode != "off"):
            ch.text_guard = guard.OutputGuard(p)
            if p.check_reasoning:
                ch.reasoning_guard = guard.OutputGuard(p)
        return ch

    def _stopped(self, x: _Ctx, g) -> bool:
        """After feeding guard `g`: True when it blocked (audited once)."""
        if g is None or g.decision is None:
            return False
        if not g.audited:
            g.audited = True
            self._audit_guard(g.decision, (x.endpoint, x.client, x.call.c.model))
        return g.decision.blocked

    def _check_tools(self, x: _Ctx, ch: _Choice) -> list[dict] | None:
        """The held tool calls, merged, their arguments checked whole; None when a guard blocked them."""
        from dsr1 import guard

        calls = _merge_tool_calls([], ch.held_tools)
        for call in calls:
            g = guard.OutputGuard(self.cfg.guard)
            fn = call.get("function") or {}
            args = g.feed(fn.get("arguments") or "") + g.finish()
            if self._stopped(x, g):
                return None
            fn["arguments"] = args
        return calls

    # -- the output, guarded and laid out ---------------------------------------------------------
    async def _guarded(self, x: _Ctx) -> AsyncIterator[Piece]:
        """The backend's pieces as the client gets them: guarded (a block ends every choice with
        finish_reason "content_filter" and stops the engine), reasoning laid out, hidden if the policy says."""
        hide = self.cfg.guard is not None and not self.cfg.guard.return_reasoning
        async for p in x.pieces:
            ch = x.choices.get(p.index)
            if ch is None:
                ch = x.choices[p.index] = self._new_choice()
            last = p.finish_reason is not None
            reasoning, text, tools = p.reasoning, p.text, p.tool_calls
            if ch.text_guard is not None:
                rg = ch.reasoning_guard
                if rg is not None:
                    reasoning = rg.feed(reasoning) + (rg.finish() if (text or last) else "")
                    if text or last:
                        ch.reasoning_guard = None  # the reasoning is over: the rest is the answer
                text = ch.text_guard.feed(text) + (ch.text_guard.finish() if last else "")
                if tools:
                    ch.held_tools.extend(tools)
                    tools = None
                if self._stopped(x, rg) or self._stopped(x, ch.text_guard):
                    x.blocked = True
                elif last and ch.held_tools:
                    calls = self._check_tools(x, ch)
                    x.blocked = calls is None  # else each call goes out whole, as one delta with its index
                    tools = None if calls is None else [{"index": i, **c} for i, c in enumerate(calls)]
            if hide:
                reasoning = ""
            if reasoning or self.cfg.reasoning_on:
                reasoning = ch.layout.reasoning(reasoning) if reasoning else ""
                text = ch.layout.content(text) if text and x.kind == "chat" else text
            if x.blocked:
                yield Piece(p.index, text, reasoning, finish_reason="content_filter")
                for i, other in x.choices.items():
                    if i != p.index and other.finish is None:
                        yield Piece(i, finish_reason="content_filter")
                return
            if x.ttft is None and (text or reasoning or tools):
                x.ttft = time.perf_counter() - x.t0
                if not self.backend.measures_latency:  # the embedded scheduler observes its own
                    self.metrics.observe_ttft(x.ttft)
            if text is p.text and reasoning is p.reasoning and tools is p.tool_calls:
                yield p  # unchanged (no guard, no layout to fix): no copy per token
            else:
                yield Piece(p.index, text, reasoning, tools, p.logprobs, p.finish_reason)

    def _reasoning_fields(self, text: str) -> dict[str, str]:
        f = self.cfg.reasoning_field
        out = {}
        if f in ("reasoning_content", "both"):
            out["reasoning_content"] = text
        if f in ("reasoning", "both"):
            out["reasoning"] = text
        return out

    async def _whole(self, req: HttpRequest, x: _Ctx) -> Response:
        """A non-streamed answer: the pieces put together, the client's departure watched on a clock."""
        echo = _echo(x)

        async def gather() -> None:
            async for p in self._guarded(x):
                ch = x.choices.setdefault(p.index, _Choice())
                ch.text += p.text
                ch.reasoning += p.reasoning
                if p.tool_calls:
                    ch.tool_calls = _merge_tool_calls(ch.tool_calls, p.tool_calls)
                if p.logprobs:
                    ch.logprobs = _merge_logprobs(ch.logprobs, p.logprobs)
                if p.finish_reason:
                    ch.finish = p.finish_reason

        task = asyncio.ensure_future(gather())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                # Tokens keep arriving while a client is gone, so check on a clock, not on idleness.
                if not task.done() and await req.is_disconnected():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    await self._end(x, 499)
                    return Response(status_code=499)
            task.result()
        except asyncio.CancelledError:
            task.cancel()
            await self._end(x, 499)
            raise
        finally:
            await x.pieces.aclose()
        if self.cfg.guard_plugin is not None and not x.blocked and x.call.error is None:
            for ch in x.choices.values():
                d = await self._plugin(ch.text, "output")
                if d is not None:
                    self._audit_guard(d, (x.endpoint, x.client, x.call.c.model))
                    if d.blocked:
                        ch.text, ch.finish, x.blocked = "", "content_filter", True
        failed = any(ch.finish == "error" for ch in x.choices.values()) or not x.choices
        await self._end(x, 500 if failed else 200)
        if failed:
            return error_response(schema.ApiError(500, x.call.error or "generation failed; see the server log",
                                                  type="server_error"))
        out = []
        for i in sorted(x.choices):
            ch = x.choices[i]
            if x.kind == "chat":
                msg: dict[str, Any] = {"role": "assistant", "content": ch.text, "refusal": None}
                if ch.tool_calls:
                    msg["tool_calls"] = ch.tool_calls
                    msg["content"] = ch.text or None
                if self.cfg.reasoning_on and (self.cfg.guard is None or self.cfg.guard.return_reasoning):
                    msg.update(self._reasoning_fields(ch.reasoning))  # always there, "" when none, as streamed
                out.append({"index": i, "message": msg, "finish_reason": ch.finish, "logprobs": ch.logprobs})
            else:
                out.append({"index": i, "text": echo + ch.text, "finish_reason": ch.finish, "logprobs": ch.logprobs})
        body = {"id": schema.new_id("chatcmpl" if x.kind == "chat" else "cmpl"),
                "object": "chat.completion" if x.kind == "chat" else "text_completion", "created": schema.now(),
                "model": x.call.c.model, "choices": out, "usage": self._usage(x)}
        if x.call.fingerprint:
            body["system_fingerprint"] = x.call.fingerprint
        return JSONResponse(body)

    def _usage(self, x: _Ctx) -> dict[str, int]:
        u = x.call.usage
        return schema.usage(u.get("prompt_tokens", x.call.prompt_tokens), u.get("completion_tokens", 0))

    async def _stream(self, x: _Ctx) -> AsyncIterator[bytes]:
        c = x.call.c
        rid, created = schema.new_id("chatcmpl" if x.kind == "chat" else "cmpl"), schema.now()
        obj = "chat.completion.chunk" if x.kind == "chat" else "text_completion"

        # every chunk is this frame around its one choice: rendered once, not per token
        head = (f'data: {{"id": "{rid}", "object": "{obj}", "created": {created}, "model": '
                f'{json.dumps(c.model, ensure_ascii=False)}, "choices": [').encode()

        tails: dict[str | None, bytes] = {}

        def tail() -> bytes:  # what follows the choices; the fingerprint comes with the engine's first event
            fp = x.call.fingerprint
            if fp not in tails:
                tails[fp] = ((f', "system_fingerprint": {json.dumps(fp)}' if fp else "") +
                             (', "usage": null' if c.include_usage else "") + "}\n\n").encode()
            return tails[fp]

        def chunk(index: int, delta: dict | None, finish: str | None = None, text: str = "",
                  logprobs: Any = None) -> bytes:
            choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
            if x.kind == "chat":
                choice["delta"] = delta or {}
            else:
                choice["text"] = text
            return head + json.dumps(choice, ensure_ascii=False).encode() + b"]" + tail()

        def content(index: int, text: str) -> bytes:
            """chunk(index, {"content": text}), the one every token of an answer is, rendered without the dicts"""
            return b'%s{"index": %d, "finish_reason": null, "logprobs": null, "delta": {"content": %s}}]%s' % (
                head, index, json.dumps(text, ensure_ascii=False).encode(), tail())

        finished = False
        try:
            for i in range(c.n):
                if x.kind == "chat":
                    yield chunk(i, {"role": "assistant", "content": ""})
                elif _echo(x):
                    yield chunk(i, None, text=_echo(x))
            async for p in self._guarded(x):
                if p.finish_reason:
                    x.choices.setdefault(p.index, _Choice()).finish = p.finish_reason
                if p.finish_reason == "error":
                    continue
                if x.kind == "chat" and p.text and not (p.reasoning or p.tool_calls or p.logprobs):
                    yield content(p.index, p.text)
                elif x.kind == "chat":
                    delta: dict[str, Any] = {}
                    if p.reasoning:
                        delta.update(self._reasoning_fields(p.reasoning))
                    if p.text:
                        delta["content"] = p.text
                    if p.tool_calls:
                        delta["tool_calls"] = p.tool_calls
                    if delta or p.logprobs:
                        yield chunk(p.index, delta, logprobs=p.logprobs)
                elif p.text or p.logprobs:
                    yield chunk(p.index, None, text=p.text, logprobs=p.logprobs)
                if p.finish_reason:
                    yield chunk(p.index, {}, p.finish_reason)
            finished = True
            failed = any(ch.finish == "error" for ch in x.choices.values()) or not x.choices
            # Logged before the last chunks go out: a client that has seen [DONE] finds its audit line.
            await self._end(x, 500 if failed else 200)
            if failed:
                err = schema.ApiError(500, x.call.error or "generation failed; see the server log",
                                      type="server_error")
                yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
            elif c.include_usage:
                payload = {"id": rid, "object": obj, "created": created, "model": c.model, "choices": [],
                           "usage": self._usage(x)}
                yield b"data: " + json.dumps(payload).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            await x.pieces.aclose()  # client gone (generator closed or cancelled) before the end: the engine stops
            if not finished:
                await self._end(x, 499)

    async def _end(self, x: _Ctx, status: int) -> None:
        """Once per request: release its admission slot, count it, write its audit and log lines."""
        if x.released:
            return
        x.released = True
        self.admission.release()
        seconds = time.perf_counter() - x.t0
        self.metrics.requests.labels(x.endpoint, str(status)).inc()
        c, u = x.call.c, self._usage(x)
        if not self.backend.measures_latency:  # the embedded scheduler counts its own
            self.metrics.e2e.observe(seconds)
            self.metrics.prompt_tokens.inc(u["prompt_tokens"])
            self.metrics.generation_tokens.inc(u["completion_tokens"])
        finish = next((ch.finish for ch in x.choices.values() if ch.finish), None)
        if x.blocked:
            finish = "content_filter"
        output = "".join(ch.text for _, ch in sorted(x.choices.items()))
        prompt = c.messages if x.kind == "chat" else c.prompt
        self.audit.write(client=x.client, endpoint=x.endpoint, model=c.model, status=status,
                         prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                         finish_reason=finish, seconds=round(seconds, 4), prompt=prompt, output=output)
        requestlog.request(request_id=x.call.request_id or None, endpoint=x.endpoint, model=c.model,
                           engine=self.backend.engine, status=status, client=x.client, stream=bool(c.stream),
                           prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                           finish_reason=finish, seconds=seconds,
                           ttft_s=x.call.ttft_s if x.call.ttft_s is not None else x.ttft, prompt=prompt, output=output)


class _Layout:
    """Leading newlines (and an opening <think>) of the reasoning, and the newlines starting the answer
    after reasoning, dropped across deltas: the embedded parser's layout whichever engine split
    (llama-server keeps the newline after <think>)."""

    def __init__(self) -> None:
        self.in_reasoning = self.in_content = False
        self.had_reasoning = False

    def reasoning(self, text: str) -> str:
        if not self.in_reasoning:
            text = text.lstrip("\n")
            # vLLM's streaming parser leaves the opening tag in when it comes in one delta with what
            # follows (seen under load: "<think>\nLet me"); the embedded parser drops it, so does this
            if text.startswith("<think>"):
                text = text[len("<think>"):].lstrip("\n")
            self.in_reasoning = bool(text)
        self.had_reasoning |= bool(text)
        return text

    def content(self, text: str) -> str:
        if self.had_reasoning and not self.in_content:
            text = text.lstrip("\n")
        self.in_content |= bool(text)
        return text


def _echo(x: _Ctx) -> str:
    """A completion's `echo`: the prompt text before the output, done here for every engine (llama-server
    has none; token-id prompts are not echoed)."""
    c = x.call.c
    return c.prompt if x.kind == "completions" and c.echo and isinstance(c.prompt, str) else ""


def _merge_tool_calls(calls: list[dict], deltas: list[dict]) -> list[dict]:
    """Streamed tool-call deltas (by `index`: id, type and name once, arguments in pieces) into whole calls."""
    out = [dict(c, function=dict(c.get("function") or {})) for c in calls]
    for d in deltas:
        i = d.get("index", len(out))
        while len(out) <= i:
            out.append({"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
        c = out[i]
        c["id"] = d.get("id") or c["id"]
        c["type"] = d.get("type") or c.get("type") or "function"
        fn = d.get("function") or {}
        if fn.get("name"):
            c["function"]["name"] = fn["name"]
        c["function"]["arguments"] = (c["function"].get("arguments") or "") + (fn.get("arguments") or "")
    return [{k: v for k, v in c.items() if k != "index"} for c in out]


def _merge_logprobs(acc: Any, part: Any) -> Any:
    """Streamed logprobs into one: chat's {"content": [...]} lists, or a completion's parallel lists."""
    if acc is None:
        return json.loads(json.dumps(part))
    if isinstance(acc, dict) and isinstance(part, dict):
        for k, v in part.items():
            if isinstance(v, list) and isinstance(acc.get(k), list):
                acc[k].extend(v)
            elif k not in acc or acc[k] is None:
                acc[k] = v
    return acc


# The one route table: (path, method, Front's handler, needs the API key)
ROUTES = (
    ("/health", "GET", "health", False),
    ("/v1/models", "GET", "models", True),
    ("/metrics", "GET", "metrics_route", True),
    ("/dsr1/deployment", "GET", "deployment", True),
    ("/v1/chat/completions", "POST", "chat", True),
    ("/v1/completions", "POST", "completions", True),
)


def create_front(backend, cfg: FrontConfig, metrics) -> tuple[Starlette, Front]:
    front = Front(backend, cfg, metrics)

    def keyed(handler):
        """The route `handler`, answering 401 first when the request lacks the API key."""
        async def route(req: HttpRequest) -> Response:
            if not authorized(req, cfg.api_key):
                metrics.requests.labels(req.url.path, "401").inc()
                return error_response(schema.ApiError(
                    401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"))
            return await handler(req)

        return route

    routes = [Route(path, keyed(getattr(front, name)) if key else getattr(front, name), methods=[method])
              for path, method, name, key in ROUTES]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await front.startup()
        try:
            yield
        finally:
            await front.shutdown()

    return Starlette(routes=routes, lifespan=lifespan), front
