"""An engine dsr1 supervises (vLLM, SGLang, llama-server) as a backend of dsr1's front.

Every request goes to the engine as a stream (whatever the client asked; the front puts a
non-streamed answer together), so the front sees output as it is generated and its guards
can stop it. The engine's reasoning, under either name (vLLM >= 0.11 sends `reasoning`,
llama-server and SGLang `reasoning_content`), becomes the piece's reasoning; tool-call and
logprob deltas pass through as the engine wrote them. The engine listens on 127.0.0.1 only
and gets no API key: the front checks it.

aiohttp rather than httpx for the engine's stream: every token passes through here, and
httpx's per-chunk path (httpcore, h11, anyio cancel scopes) cost the front about twice the
CPU per token (benchmarks/front_overhead.py; docs/performance.md) on a box where the engine
needs every core.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiohttp

from dsr1.serve import schema
from dsr1.serve.backend import Call, Piece

REASONING_NAMES = ("reasoning_content", "reasoning")
# the engines' words for a prompt longer than the context (vLLM: "This model's maximum context length
# is ..."; llama-server: "the request exceeds the available context size")
CONTEXT_EXCEEDED = re.compile(r"maximum context length|exceeds the available context size|context length", re.I)

# what each engine honours of schema.CAPABILITIES (checked against the engines' own request
# handling: vLLM's and SGLang's protocol.py; llama-server refuses n > 1, "Only one completion choice")
SUPPORTS = {
    "vllm": frozenset({"n", "logprobs", "tools", "response_format", "penalties", "logit_bias"}),
    "sglang": frozenset({"n", "logprobs", "tools", "response_format", "penalties", "logit_bias"}),
    "llamacpp": frozenset({"logprobs", "tools", "response_format", "penalties", "logit_bias"}),
}


@dataclass
class ProxyConfig:
    engine: str  # vllm | sglang | llamacpp
    url: str  # http://127.0.0.1:PORT
    health_path: str = "/health"
    max_connections: int = 16
    # LoRA adapter routing: served name -> what the engine needs. vLLM and SGLang serve each
    # adapter under its own model name; llama-server loads all adapters at start and applies
    # one per request by its index (the request's "lora" field), at scale 0 otherwise.
    lora_ids: dict[str, int] = field(default_factory=dict)
    served_name: str = ""
    tools: bool = True  # the plan enabled the engine's tool-call parser


class ProxyBackend:
    measures_latency = False

    def __init__(self, cfg: ProxyConfig):
        self.cfg = cfg
        self.engine = cfg.engine
        self.supports = SUPPORTS.get(cfg.engine, frozenset()) - (frozenset() if cfg.tools else {"tools"})
        self.client: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No timeout on reads: a long generation streams for minutes. Connection limits above the
        # front's admission, so admission, not the pool, is what queues.
        self.client = aiohttp.ClientSession(
            # llama-server's HTTP server (cpp-httplib) gives each open connection one of its few threads
            # for as long as it is kept alive, and closes it past a count or 5 s idle: no keep-alive there.
            # vLLM's and SGLang's (uvicorn) close idle connections after 5 s: ours go after 4.
            self.cfg.url, connector=aiohttp.TCPConnector(
                limit=self.cfg.max_connections + 8,
                **({"force_close": True} if self.engine == "llamacpp" else {"keepalive_timeout": 4})),
            timeout=aiohttp.ClientTimeout(total=None, connect=10.0))

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def _get(self, path: str) -> tuple[int, bytes]:
        """A short GET to the engine: (status, body), (0, b"") when it does not answer in 5 s."""
        try:
            async with self.client.get(path, timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return 0, b""

    async def healthy(self) -> bool:
        return (await self._get(self.cfg.health_path))[0] == 200

    async def engine_metrics(self) -> bytes:
        status, body = await self._get("/metrics")
        return body if status == 200 else b""

    def _request_body(self, call: Call) -> dict[str, Any]:
        body = dict(call.body)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # the front needs the counts; it tells the client if asked
        body.pop("echo", None)  # the front echoes the prompt itself, the same for every engine
        if call.masked:  # the input guard masked text: the engine gets the masked version
            if call.kind == "chat":
                body["messages"] = [{**orig, "content": m["content"]} if orig.get("content") is not None else orig
                                    for orig, m in zip(body["messages"], call.c.messages)]
            else:
                body["prompt"] = call.c.prompt
        lora = self.cfg.lora_ids
        if lora and self.engine == "llamacpp":  # every adapter loaded; this request's at scale 1, the rest at 0
            body["lora"] = [{"id": i, "scale": 1.0 if name == call.c.model else 0.0} for name, i in lora.items()]
            body["model"] = self.cfg.served_name
        return body

    async def open(self, call: Call) -> AsyncIterator[Piece]:
        path = "/v1/chat/completions" if call.kind == "chat" else "/v1/completions"
        body = self._request_body(call)
        for attempt in (1, 2, 3):
            try:
                resp = await self.client.post(path, json=body)
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                # A kept-alive connection the engine closed meanwhile: the request never reached the
                # engine, so it goes again (the next idle connection may be as stale: up to three tries).
                if attempt == 3 or isinstance(e, aiohttp.ClientConnectorError):
                    raise self._unavailable(e) from None
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise self._unavailable(e) from None
        if resp.status != 200:
            try:
                raw = await resp.read()
            except aiohttp.ClientError:
                raw = b""
            finally:
                resp.release()
            raise engine_error(resp.status, raw)
        return self._pieces(call, resp)

    def _unavailable(self, e: BaseException) -> schema.ApiError:
        return schema.ApiError(502, f"the {self.engine} engine did not answer ({type(e).__name__}: {e})",
                               type="server_error", code="engine_unavailable")

    async def _pieces(self, call: Call, resp: aiohttp.ClientResponse) -> AsyncIterator[Piece]:
        """The engine's SSE events as pieces. Closing this generator before the end closes the
        connection, and the engine aborts the request."""
        finished: set[int] = set()
        done = False
        rest = b""
        try:
            # What the socket delivered, split into lines here: an engine writes one event per token,
            # so a read is usually one event (two lines) and this is one await per event, not two.
            async for data in resp.content.iter_any():
                *lines, rest = (rest + data).split(b"\n") if rest else data.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        return
                    try:
                        event = json.loads(payload)
                    except ValueError:
                        continue
                    if not isinstance(event, dict):
                        continue
                    if "error" in event:
                        call.error = engine_error(500, payload).message
                        yield Piece(finish_reason="error")
                        return
                    call.request_id = call.request_id or str(event.get("id") or "")
                    call.fingerprint = event.get("system_fingerprint") or call.fingerprint
                    if event.get("usage"):
                        call.usage = {k: v for k, v in event["usage"].items() if isinstance(v, int)}
                    for ch in event.get("choices") or []:
                        yield _piece(ch)
                        if ch.get("finish_reason"):
                            finished.add(ch.get("index", 0))
            done = True
            if not finished:  # the engine ended the stream without a finish
                call.error = f"the {self.engine} engine ended the stream early"
                yield Piece(finish_reason="error")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # the engine died mid-stream
            call.error = f"the {self.engine} engine broke the stream ({type(e).__name__})"
            yield Piece(finish_reason="error")
        finally:
            if done:
                resp.release()  # read to the end: the connection goes back to the pool
            else:
                resp.close()  # the engine sees the connection drop and aborts the request


def _piece(ch: dict[str, Any]) -> Piece:
    delta = ch.get("delta")
    if isinstance(delta, dict):
        reasoning = next((delta[n] for n in REASONING_NAMES if delta.get(n)), "")
        text = delta.get("content") or ""
        tools = delta.get("tool_calls") or None
    else:  # a text completion's choice
        reasoning, text, tools = "", ch.get("text") or "", None
    return Piece(index=ch.get("index", 0), text=text, reasoning=reasoning, tool_calls=tools,
                 logprobs=ch.get("logprobs"), finish_reason=ch.get("finish_reason"))


def engine_error(status: int, raw: bytes) -> schema.ApiError:
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
    if status == 400 and (CONTEXT_EXCEEDED.search(message) or etype == "exceed_context_size_error"):
        code, etype = "context_length_exceeded", "invalid_request_error"  # as dsr1 and OpenAI name it
    return schema.ApiError(status, f"{message}", type=etype, code=str(code) if code is not None else None,
                           param=param if isinstance(param, str) else None)
