"""The HTTP layer: OpenAI-compatible routes over the scheduler (Starlette).

Starlette rather than FastAPI: bodies are validated by dsr1.serve.schema so every
error is OpenAI-shaped (FastAPI's own validation answers 422 in its format).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dsr1.serve import requestlog, schema
from dsr1.serve.reasoning import ReasoningParser, split_full
from dsr1.serve.sampling import SamplingParams
from dsr1.serve.scheduler import Draining, Event, Overloaded, Request, Scheduler



@dataclass
class AppConfig:
    model_name: str
    max_model_len: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    reasoning_parser: str = "none"  # deepseek_r1 | none, as chosen by server.plan
    reasoning_field: str = "both"  # reasoning_content | reasoning | both
    system_prompt: str = "keep"  # keep | merge | drop
    audit_log: Path | None = None
    audit_content: bool = False
    retry_after_s: int = 1
    adapters: dict[str, int] = field(default_factory=dict)  # LoRA: served name -> adapter id in the model
    guard: Any = None  # dsr1.guard.Policy (--guard), or None
    guard_plugin: Any = None  # (text, where) -> allow?, from --guard-plugin
    audit_max_bytes: int = 0  # rotate the audit log past this size (0: never)
    audit_backups: int = 5


class Audit:
    """Opt-in JSONL audit log. Never records headers (API keys live there).

    Opened for each line, so an external logrotate can move the file away at any time; with
    `max_bytes` it rotates itself (audit.jsonl -> audit.jsonl.1 -> ... .N), under the same lock
    as the writes, so no line is lost or split."""

    def __init__(self, path: Path | None, content: bool, max_bytes: int = 0, backups: int = 5):
        self.path, self.content = path, content
        self.max_bytes, self.backups = max_bytes, backups
        self._lock = threading.Lock()
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)

    def _rotate(self) -> None:
        import os

        try:
            if self.path.stat().st_size < self.max_bytes:
                return
        except FileNotFoundError:
            return
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def write(self, **rec: Any) -> None:
        if not self.path:
            return
        if not self.content:
            rec.pop("prompt", None)
            rec.pop("output", None)
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **rec}, ensure_ascii=False)
        with self._lock:
            if self.max_bytes:
                self._rotate()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def _error(e: schema.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def models_body(name: str, max_model_len: int, adapters=()) -> dict[str, Any]:
    """The base model, then each LoRA adapter with the base as its `parent` (as vLLM lists them)."""
    base = {"id": name, "object": "model", "created": schema.now(), "owned_by": "dsr1", "max_model_len": max_model_len,
            "root": name, "parent": None}
    return {"object": "list", "data": [base] + [{**base, "id": a, "root": a, "parent": name} for a in adapters]}


def deployment_body(model: str, engine: str, metrics, nodes: list[dict] | None = None) -> dict[str, Any]:
    """What runs here and what it exports: read by `dsr1 monitor init` to write a monitoring setup
    with only the panels and alerts that will have data (dsr1.monitoring)."""
    return {"model": model, "engine": engine, "metrics": metrics.features(), "nodes": nodes or []}


def unknown_model(name: str, served: str, adapters=()) -> schema.ApiError:
    names = ", ".join(f"'{n}'" for n in [served, *adapters])
    return schema.ApiError(404, f"The model '{name}' does not exist; this server serves {names}",
                           param="model", code="model_not_found")


def authorized(req: HttpRequest, api_key: str | None) -> bool:
    if not api_key:
        return True
    header = req.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # constant-time comparison of bytes so key length/prefix timing leaks nothing useful
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


def guard(handler, api_key: str | None, metrics):
    """The route `handler`, answering 401 first when the request lacks the API key."""
    async def route(req: HttpRequest) -> Response:
        if not authorized(req, api_key):
            metrics.requests.labels(req.url.path, "401").inc()
            return _error(schema.ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                          code="invalid_api_key"))
        return await handler(req)

    return route


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


class Api:
    def __init__(self, scheduler: Scheduler, cfg: AppConfig, metrics):
        self.sched, self.cfg, self.metrics = scheduler, cfg, metrics
        self.tok = scheduler.model.tokenizer
        self.reasoning_on = cfg.reasoning_parser == "deepseek_r1"
        self.audit = Audit(cfg.audit_log, cfg.audit_content, cfg.audit_max_bytes, cfg.audit_backups)
        self.ready = False

    # -- plumbing --------------------------------------------------------------------------------
    async def _body(self, req: HttpRequest) -> Any:
        return await read_json(req, self.cfg.max_body_bytes)

    def _check_model(self, name: str) -> int:
        """The adapter id for model `name` (0: the base model)."""
        if name == self.cfg.model_name:
            return 0
        if name in self.cfg.adapters:
            return self.cfg.adapters[name]
        raise unknown_model(name, self.cfg.model_name, list(self.cfg.adapters))

    def _budget(self, prompt_len: int, asked: int | None, param: str) -> int:
        room = self.cfg.max_model_len - prompt_len
        if room < 1:
            raise schema.ApiError(400, f"This model's maximum context length is {self.cfg.max_model_len} tokens. "
                                       f"However, your {param} resulted in {prompt_len} tokens. Shorten the {param}.",
                                  param=param, code="context_length_exceeded")
        return room if asked is None else min(asked, room)

    def _submit(self, ids: list[int], c: schema.Common, max_tokens: int, sink, adapter: int = 0) -> Request:
        params = SamplingParams(max_tokens=max_tokens, temperature=c.temperature, top_p=c.top_p, seed=c.seed,
                                stop=c.stop, ignore_eos=c.ignore_eos)
        try:
            return self.sched.submit(Request(ids, params, sink, adapter=adapter))
        except Overloaded as e:
            raise schema.ApiError(429, f"Server is overloaded ({e}); retry later", type="rate_limit_error",
                                  code="overloaded", headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
        except Draining:
            raise schema.ApiError(503, "Server is shutting down", type="server_error", code="shutting_down",
                                  headers={"Retry-After": str(self.cfg.retry_after_s)}) from None

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

    def _reasoning_fields(self, text: str) -> dict[str, str]:
        f = self.cfg.reasoning_field
        out = {}
        if f in ("reasoning_content", "both"):
            out["reasoning_content"] = text
        if f in ("reasoning", "both"):
            out["reasoning"] = text
        return out

    # -- routes --------------------------------------------------------------------------------
    async def health(self, req: HttpRequest) -> Response:
        if not self.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        running, waiting = self.sched.counts()
        return JSONResponse({"status": "ok", "model": self.cfg.model_name, "running": running, "waiting": waiting})

    async def models(self, req: HttpRequest) -> Response:
        return JSONResponse(models_body(self.cfg.model_name, self.cfg.max_model_len, self.cfg.adapters))

    async def metrics_route(self, req: HttpRequest) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def deployment(self, req: HttpRequest) -> Response:
        return JSONResponse(deployment_body(self.cfg.model_name, "embedded", self.metrics))

    async def chat(self, req: HttpRequest) -> Response:
        return await self._handle(req, "chat")

    async def completions(self, req: HttpRequest) -> Response:
        return await self._handle(req, "completions")

    async def _handle(self, req: HttpRequest, kind: str) -> Response:
        t0 = time.perf_counter()
        endpoint = f"/v1/{'chat/completions' if kind == 'chat' else 'completions'}"
        client = req.client.host if req.client else "-"
        try:
            body = await self._body(req)
            c = schema.parse_chat(body) if kind == "chat" else schema.parse_completion(body)
            adapter = self._check_model(c.model)
            if self.cfg.guard is not None or self.cfg.guard_plugin is not None:
                await self._guard_input(c, kind, endpoint, client)
            if kind == "chat":
                ids = self._chat_prompt(c.messages)
                param, prompt_text = "messages", c.messages
            else:
                if isinstance(c.prompt, str):
                    ids = self.tok(c.prompt).input_ids
                else:
                    ids = list(c.prompt)
                    if any(t < 0 or t >= self.sched.model.vocab for t in ids):
                        raise schema.bad("prompt", f"token ids must be in [0, {self.sched.model.vocab})")
                param, prompt_text = "prompt", c.prompt
            max_tokens = self._budget(len(ids), c.max_tokens, param)
            queue: asyncio.Queue[Event] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            handle = self._submit(ids, c, max_tokens, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
                                  adapter)
        except schema.ApiError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            self.audit.write(client=client, endpoint=endpoint, model=self.cfg.model_name, status=e.status,
                             error=e.message)
            requestlog.request(endpoint=endpoint, model=self.cfg.model_name, status=e.status, client=client,
                               seconds=time.perf_counter() - t0, error=e.code or e.message)
            return _error(e)
        ctx = _Ctx(kind, c, ids, handle, queue, endpoint, client, prompt_text, t0)
        if c.stream:
            return StreamingResponse(self._stream(ctx), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(req, ctx)

    # -- guards (dsr1.guard) ---------------------------------------------------------------------
    def _audit_guard(self, d, endpoint: str, client: str, model: str) -> None:
        self.audit.write(event="guard", client=client, endpoint=endpoint, model=model, where=d.where, action=d.action,
                         rule=d.rule)

    async def _guard_input(self, c, kind: str, endpoint: str, client: str) -> None:
        """Check the request's text before it is tokenized; block (an error, no model call) or mask it."""
        from dsr1 import guard

        param = "messages" if kind == "chat" else "prompt"
        texts = [m["content"] for m in c.messages] if kind == "chat" else \
            ([c.prompt] if isinstance(c.prompt, str) else [])
        d = guard.Decision("allow")
        if self.cfg.guard is not None:
            d = guard.check_input(self.cfg.guard, "\n".join(texts))
        if not d.blocked and self.cfg.guard_plugin is not None:
            d = await self._plugin("\n".join(texts), "input") or d
        if d.action != "allow":
            self._audit_guard(d, endpoint, client, c.model)
        if d.blocked:
            code = "prompt_too_large" if d.rule == "max_prompt_chars" else "content_filter"
            raise schema.ApiError(400, f"The request was blocked by this server's content policy (rule "
                                       f"'{d.rule}')", param=param, code=code)
        if d.action == "mask":  # the model never sees the matched text
            if kind == "chat":
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

    def _output_guard(self, x: "_Ctx"):
        from dsr1 import guard

        p = self.cfg.guard
        if p is None or not any(r.applies("output") for r in p.rules) and p.pii_mode == "off":
            return None
        skip = "</think>" if self.reasoning_on and not p.check_reasoning and x.kind == "chat" else None
        return guard.OutputGuard(p, skip_until=skip)

    def _guard_stopped(self, x: "_Ctx", g) -> bool:
        """After feeding the guard: True when it blocked (the request is aborted and audited once)."""
        if g is None or g.decision is None:
            return False
        if not g.audited:
            g.audited = True
            self._audit_guard(g.decision, x.endpoint, x.client, x.c.model)
        if g.decision.blocked:
            self.sched.abort(x.handle)
            return True
        return False

    async def _complete(self, req: HttpRequest, x: "_Ctx") -> Response:
        text, ev = "", None
        g = self._output_guard(x)
        shown = ""  # what the guard let through (everything without one)
        blocked = False
        next_check = time.monotonic() + 0.25
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(x.queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    ev = None
                # Tokens keep arriving while a client is gone, so check on a clock, not on idleness.
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.25
                    if await req.is_disconnected():
                        self.sched.abort(x.handle)
                        self._done(x, 499, ev, text)
                        return Response(status_code=499)
                if ev is None:
                    continue
                text += ev.text
                if g is not None:
                    shown += g.feed(ev.text) + (g.finish() if ev.finish_reason else "")
                    if self._guard_stopped(x, g):
                        blocked = True
                        break
                if ev.finish_reason:
                    break
        except asyncio.CancelledError:
            self.sched.abort(x.handle)
            raise
        if g is None:
            shown = text
        if not blocked and ev.finish_reason != "error" and self.cfg.guard_plugin is not None:
            d = await self._plugin(shown, "output")
            if d is not None:
                self._audit_guard(d, x.endpoint, x.client, x.c.model)
                blocked, shown = d.blocked, "" if d.blocked else shown
        text = shown
        status = 500 if ev.finish_reason == "error" and not blocked else 200
        finish = "content_filter" if blocked else ev.finish_reason
        self._done(x, status, ev, text, finish)
        if status != 200:
            return _error(schema.ApiError(500, "generation failed; see the server log", type="server_error"))
        u = schema.usage(ev.prompt_tokens, ev.completion_tokens)
        if x.kind == "chat":
            msg = {"role": "assistant", "content": text, "refusal": None}
            if self.reasoning_on:  # always present, "" when there was none: what the streamed deltas add up to
                reasoning, msg["content"] = split_full(text)
                if self.cfg.guard is None or self.cfg.guard.return_reasoning:
                    msg.update(self._reasoning_fields(reasoning))
            body = {"id": schema.new_id("chatcmpl"), "object": "chat.completion", "created": schema.now(),
                    "model": x.c.model,
                    "choices": [{"index": 0, "message": msg, "finish_reason": finish, "logprobs": None}], "usage": u}
        else:
            out = (x.prompt if isinstance(x.prompt, str) else "") + text if x.c.echo else text
            body = {"id": schema.new_id("cmpl"), "object": "text_completion", "created": schema.now(),
                    "model": x.c.model,
                    "choices": [{"index": 0, "text": out, "finish_reason": finish, "logprobs": None}], "usage": u}
        return JSONResponse(body)

    async def _stream(self, x: "_Ctx") -> AsyncIterator[bytes]:
        rid, created = schema.new_id("chatcmpl" if x.kind == "chat" else "cmpl"), schema.now()
        obj = "chat.completion.chunk" if x.kind == "chat" else "text_completion"
        parser = ReasoningParser() if (x.kind == "chat" and self.reasoning_on) else None
        text, ev, finished = "", None, False

        def chunk(delta: dict | None, finish: str | None = None, text_part: str | None = None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if x.kind == "chat":
                choice["delta"] = delta or {}
            else:
                choice["text"] = text_part or ""
            payload = {"id": rid, "object": obj, "created": created, "model": x.c.model, "choices": [choice]}
            if x.c.include_usage:
                payload["usage"] = None
            return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

        g = self._output_guard(x)
        hide_reasoning = self.cfg.guard is not None and not self.cfg.guard.return_reasoning
        finish = None
        try:
            if x.kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            elif x.c.echo and isinstance(x.prompt, str):
                yield chunk(None, text_part=x.prompt)
            while True:
                ev = await x.queue.get()
                last = ev.finish_reason is not None
                piece = ev.text
                if g is not None:  # only what the guard has checked goes on; a block ends the stream
                    piece = g.feed(ev.text) + (g.finish() if last else "")
                    if self._guard_stopped(x, g):
                        last, finish = True, "content_filter"
                text += piece
                parts = [parser.feed(piece)] if parser else [("", piece)]
                if last and parser:
                    parts.append(parser.finish())
                for r, c in parts:
                    if x.kind == "chat":
                        delta: dict[str, str] = {}
                        if r and not hide_reasoning:
                            delta.update(self._reasoning_fields(r))
                        if c:
                            delta["content"] = c
                        if delta:
                            yield chunk(delta)
                    elif c:
                        yield chunk(None, text_part=c)
                if last:
                    break
            finished = True
            finish = finish or ev.finish_reason
            # Logged before the last chunks go out: a client that has seen [DONE] finds its audit line.
            self._done(x, 500 if finish == "error" else 200, ev, text, finish)
            if finish == "error":
                err = schema.ApiError(500, "generation failed; see the server log", type="server_error")
                yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
            else:
                yield chunk({}, finish, "")
                if x.c.include_usage:
                    payload = {"id": rid, "object": obj, "created": created, "model": x.c.model,
                               "choices": [], "usage": schema.usage(ev.prompt_tokens, ev.completion_tokens)}
                    yield b"data: " + json.dumps(payload).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            # Client gone (generator closed or cancelled) before the end: free the slot now.
            if not finished:
                self.sched.abort(x.handle)
                self._done(x, 499, ev, text, finish)

    def _done(self, x: "_Ctx", status: int, ev: Event | None, text: str, finish: str | None = None) -> None:
        self.metrics.requests.labels(x.endpoint, str(status)).inc()
        seconds = time.perf_counter() - x.t0
        self.audit.write(client=x.client, endpoint=x.endpoint, model=x.c.model, status=status,
                         prompt_tokens=len(x.ids), completion_tokens=ev.completion_tokens if ev else 0,
                         finish_reason=finish or (ev.finish_reason if ev else None),
                         seconds=round(seconds, 4), prompt=x.prompt, output=text)
        h = x.handle
        requestlog.request(request_id=h.id, endpoint=x.endpoint, model=x.c.model, status=status,
                           client=x.client, stream=bool(x.c.stream), prompt_tokens=len(x.ids),
                           completion_tokens=ev.completion_tokens if ev else 0,
                           finish_reason=finish or (ev.finish_reason if ev else None), seconds=seconds,
                           ttft_s=h.first_token_at - h.arrived if h.first_token_at is not None else None,
                           prompt=x.prompt, output=text)


@dataclass
class _Ctx:
    kind: str
    c: Any
    ids: list[int]
    handle: Request
    queue: asyncio.Queue
    endpoint: str
    client: str
    prompt: Any
    t0: float


def create_app(scheduler: Scheduler, cfg: AppConfig, metrics) -> tuple[Starlette, Api]:
    api = Api(scheduler, cfg, metrics)

    def guarded(handler):
        return guard(handler, cfg.api_key, metrics)

    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", guarded(api.models), methods=["GET"]),
        Route("/metrics", guarded(api.metrics_route), methods=["GET"]),
        Route("/dsr1/deployment", guarded(api.deployment), methods=["GET"]),
        Route("/v1/chat/completions", guarded(api.chat), methods=["POST"]),
        Route("/v1/completions", guarded(api.completions), methods=["POST"]),
    ]
    return Starlette(routes=routes), api
