"""dsr1's OpenAI front over an engine it supervises (vLLM, SGLang, llama-server).

Whatever runs behind it, clients see the same server as with the embedded engine:
the same `/v1` routes and request validation (dsr1.serve.schema), the API key
checked here in constant time (the engine listens on 127.0.0.1 only and gets no
key), `/health` that says whether the engine is up, `/metrics` with dsr1's request
counters followed by the engine's own, the same 429 when `max_concurrent` requests
run and `max_queue` wait, and the reasoning in the field names dsr1 serves
(`reasoning_content`, `reasoning` or both) whichever name the engine uses: vLLM
>= 0.11 sends `reasoning`, llama-server and SGLang `reasoning_content`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dsr1.serve import requestlog, schema
from dsr1.serve.app import _error, deployment_body, guard, models_body, read_json, unknown_model

log = logging.getLogger("dsr1.serve")
REASONING_NAMES = ("reasoning_content", "reasoning")


@dataclass
class FrontConfig:
    model_name: str
    engine: str  # for messages: "vllm", "llamacpp", "sglang"
    engine_url: str  # http://127.0.0.1:PORT
    engine_health_path: str
    max_model_len: int
    max_concurrent: int
    max_queue: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    reasoning_field: str = "both"  # reasoning_content | reasoning | both
    reasoning_on: bool = True
    retry_after_s: int = 1
    adapters: tuple[str, ...] = ()  # LoRA adapters the engine serves by these names


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


class Front:
    def __init__(self, cfg: FrontConfig, metrics):
        self.cfg, self.metrics = cfg, metrics
        self.admission: Admission | None = None  # created inside the event loop
        self.client: httpx.AsyncClient | None = None
        self.engine_up = False
        self.draining = False
        self.nodes = None  # multi-node: () -> [{"rank", "address"}] of the node agents seen (dsr1.monitoring.nodeagent)
        metrics.running.set_function(lambda: self.admission.running if self.admission else 0)
        metrics.waiting.set_function(lambda: self.admission.waiting if self.admission else 0)

    async def startup(self) -> None:
        self.admission = Admission(self.cfg.max_concurrent, self.cfg.max_queue)
        # No timeout on reads: a long generation streams for minutes. Connection limits above
        # max_concurrent so admission, not the pool, is what queues.
        limits = httpx.Limits(max_connections=self.cfg.max_concurrent + 8,
                              max_keepalive_connections=self.cfg.max_concurrent + 8)
        self.client = httpx.AsyncClient(base_url=self.cfg.engine_url, limits=limits,
                                        timeout=httpx.Timeout(None, connect=10.0))

    async def shutdown(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    # -- reasoning fields --------------------------------------------------------------------
    def _rename(self, part: dict[str, Any], layout: "_Layout", *, whole: bool) -> None:
        """Put the engine's reasoning (under either name) into dsr1's field(s), in place, with the
        embedded engine's layout: the newline after `<think>` and those after `</think>` belong to
        neither field (llama-server keeps the first in its reasoning, for one)."""
        if not self.cfg.reasoning_on:
            return
        text = None
        for name in REASONING_NAMES:
            v = part.pop(name, None)
            if v is not None and text is None:
                text = v
        text = layout.reasoning(text or "")
        if part.get("content"):
            part["content"] = layout.content(part["content"])
        if not text and not whole:
            return
        f = self.cfg.reasoning_field  # a non-streamed message always carries the field(s), as embedded does
        if f in ("reasoning_content", "both"):
            part["reasoning_content"] = text
        if f in ("reasoning", "both"):
            part["reasoning"] = text

    def _shape(self, body: dict[str, Any], layout: "_Layout", model: str) -> dict[str, Any]:
        body["model"] = model  # the name the client asked for: the served name or a LoRA adapter's
        for choice in body.get("choices") or []:
            choice.setdefault("logprobs", None)  # required (nullable) by OpenAI's schema; llama-server omits it
            if isinstance(choice.get("message"), dict):
                msg = choice["message"]
                self._rename(msg, layout, whole=True)
                msg.setdefault("refusal", None)
                if msg.get("content") is None and not msg.get("tool_calls"):
                    msg["content"] = ""
            elif isinstance(choice.get("delta"), dict):
                self._rename(choice["delta"], layout, whole=False)
        return body

    # -- routes ------------------------------------------------------------------------------
    async def health(self, req: HttpRequest) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        ok = False
        try:
            r = await self.client.get(self.cfg.engine_health_path, timeout=5)
            ok = r.status_code == 200
        except httpx.HTTPError:
            pass
        if not ok:
            return JSONResponse({"status": "engine unavailable", "engine": self.cfg.engine}, status_code=503)
        a = self.admission
        return JSONResponse({"status": "ok", "model": self.cfg.model_name, "engine": self.cfg.engine,
                             "running": a.running if a else 0, "waiting": a.waiting if a else 0})

    async def models(self, req: HttpRequest) -> Response:
        return JSONResponse(models_body(self.cfg.model_name, self.cfg.max_model_len, self.cfg.adapters))

    async def metrics_route(self, req: HttpRequest) -> Response:
        own = self.metrics.render()
        try:
            r = await self.client.get("/metrics", timeout=5)
            engine = r.content if r.status_code == 200 else b""
        except httpx.HTTPError:
            engine = b""
        return Response(own + engine, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def deployment(self, req: HttpRequest) -> Response:
        return JSONResponse(deployment_body(self.cfg.model_name, self.cfg.engine, self.metrics,
                                            self.nodes() if self.nodes else None))

    async def chat(self, req: HttpRequest) -> Response:
        return await self._forward(req, "/v1/chat/completions", schema.parse_chat)

    async def completions(self, req: HttpRequest) -> Response:
        return await self._forward(req, "/v1/completions", schema.parse_completion)

    async def _forward(self, req: HttpRequest, path: str, parse) -> Response:
        t0 = time.perf_counter()
        try:
            if self.draining:
                raise schema.ApiError(503, "Server is shutting down", type="server_error", code="shutting_down",
                                      headers={"Retry-After": str(self.cfg.retry_after_s)})
            body = await read_json(req, self.cfg.max_body_bytes)
            c = parse(body)  # the same validation and errors as the embedded engine
            if c.model != self.cfg.model_name and c.model not in self.cfg.adapters:
                raise unknown_model(c.model, self.cfg.model_name, self.cfg.adapters)
            slot = self.admission
            await slot.acquire()
        except schema.ApiError as e:
            if e.status == 429:
                e.headers.setdefault("Retry-After", str(self.cfg.retry_after_s))
            self._answered(path, e.status, t0, error=e.code or e.message)
            return _error(e)
        try:
            upstream = self.client.build_request("POST", path, json=body)
            resp = await self.client.send(upstream, stream=True)
        except httpx.HTTPError as e:
            slot.release()
            self._answered(path, 502, t0, error=type(e).__name__)
            return _error(schema.ApiError(502, f"the {self.cfg.engine} engine did not answer ({type(e).__name__})",
                                          type="server_error", code="engine_unavailable"))
        if resp.status_code != 200:
            try:
                raw = await resp.aread()
            finally:
                await resp.aclose()
                slot.release()
            err = self._engine_error(resp.status_code, raw)
            self._answered(path, resp.status_code, t0, error=err.message[:200])
            return _error(err)
        if c.stream:
            return StreamingResponse(self._relay(resp, slot, path, t0, c.model), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            data = json.loads(await resp.aread())
        finally:
            await resp.aclose()
            slot.release()
        self.metrics.e2e.observe(time.perf_counter() - t0)
        u = (data.get("usage") or {}) if isinstance(data, dict) else {}
        self._answered(path, 200, t0, request_id=data.get("id") if isinstance(data, dict) else None,
                       prompt_tokens=u.get("prompt_tokens"), completion_tokens=u.get("completion_tokens"),
                       finish_reason=_finish(data))
        return JSONResponse(self._shape(data, _Layout(), c.model))

    async def _relay(self, resp: httpx.Response, slot: Admission, path: str, t0: float,
                     model: str) -> AsyncIterator[bytes]:
        """Re-emit the engine's SSE events with dsr1's reasoning field names. Closing this generator
        (the client went away) closes the upstream stream, and the engine aborts the request."""
        first = True
        status = "499"
        layout = _Layout()
        ttft = rid = finish = None
        usage: dict = {}
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    status = "200"
                    yield b"data: [DONE]\n\n"
                    break
                try:
                    event = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(event, dict) and "error" not in event:
                    rid = rid or event.get("id")
                    usage = event.get("usage") or usage
                    finish = _finish(event) or finish
                    event = self._shape(event, layout, model)
                    if first and any(ch.get("delta", {}).get("content") or ch.get("text")
                                     or any(ch.get("delta", {}).get(n) for n in REASONING_NAMES)
                                     for ch in event.get("choices") or []):
                        ttft = time.perf_counter() - t0
                        self.metrics.observe_ttft(ttft)
                        first = False
                yield b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"
            else:
                status = "502"  # the engine ended the stream without [DONE]
        finally:
            await resp.aclose()
            slot.release()
            self.metrics.e2e.observe(time.perf_counter() - t0)
            self._answered(path, int(status), t0, request_id=rid, stream=True, ttft_s=ttft, finish_reason=finish,
                           prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"))

    def _answered(self, path: str, status: int, t0: float, **fields) -> None:
        """Count one answer in /metrics and write its line to the request log."""
        self.metrics.requests.labels(path, str(status)).inc()
        requestlog.request(endpoint=path, model=self.cfg.model_name, engine=self.cfg.engine, status=status,
                           seconds=time.perf_counter() - t0, **fields)

    def _engine_error(self, status: int, raw: bytes) -> schema.ApiError:
        """The engine's error, in OpenAI's shape whatever shape the engine used."""
        message, etype, code, param = raw.decode(errors="replace")[:2000] or f"HTTP {status}", None, None, None
        try:
            data = json.loads(raw)
            err = data.get("error", data) if isinstance(data, dict) else {}
            if isinstance(err, dict):
                message = str(err.get("message") or err.get("detail") or message)
                etype, code, param = err.get("type"), err.get("code"), err.get("param")
            elif isinstance(err, str):
                message = err
        except ValueError:
            pass
        etype = etype if isinstance(etype, str) else ("server_error" if status >= 500 else "invalid_request_error")
        return schema.ApiError(status, f"{message}", type=etype, code=str(code) if code is not None else None,
                               param=param if isinstance(param, str) else None)


class _Layout:
    """Leading newlines of the reasoning, and of the answer after reasoning, dropped across deltas."""

    def __init__(self) -> None:
        self.in_reasoning = self.in_content = False
        self.had_reasoning = False

    def reasoning(self, text: str) -> str:
        if not self.in_reasoning:
            text = text.lstrip("\n")
            self.in_reasoning = bool(text)
        self.had_reasoning |= bool(text)
        return text

    def content(self, text: str) -> str:
        if self.had_reasoning and not self.in_content:
            text = text.lstrip("\n")
        self.in_content |= bool(text)
        return text


def _finish(body: Any) -> str | None:
    choices = body.get("choices") if isinstance(body, dict) else None
    return next((c.get("finish_reason") for c in choices or [] if c.get("finish_reason")), None)


def create_front(cfg: FrontConfig, metrics) -> tuple[Starlette, Front]:
    front = Front(cfg, metrics)

    def guarded(handler):
        return guard(handler, cfg.api_key, metrics)

    routes = [
        Route("/health", front.health, methods=["GET"]),
        Route("/v1/models", guarded(front.models), methods=["GET"]),
        Route("/metrics", guarded(front.metrics_route), methods=["GET"]),
        Route("/dsr1/deployment", guarded(front.deployment), methods=["GET"]),
        Route("/v1/chat/completions", guarded(front.chat), methods=["POST"]),
        Route("/v1/completions", guarded(front.completions), methods=["POST"]),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await front.startup()
        try:
            yield
        finally:
            await front.shutdown()

    return Starlette(routes=routes, lifespan=lifespan), front
