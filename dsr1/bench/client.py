"""Streaming OpenAI-compatible client: one request in, one timed `RequestResult` out.

Timing follows vLLM's benchmark_serving, with its known pitfall fixed: a role-only
first chunk is not a token (vllm #3759). A chunk counts as a token chunk when it
carries text in `content`, `reasoning_content` or vLLM's newer `reasoning` field.
TTFT is measured to the first token chunk of any kind and, separately, to the first
answer (`content`) chunk, which is what a user of a reasoning model waits for.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from dsr1.bench.http import HTTPFailure, Pool
from dsr1.errors import AuthError, NetworkError, NotFoundError, UsageError

REASONING_KEYS = ("reasoning_content", "reasoning")
_decode = json.JSONDecoder().decode  # on str: skips json.loads' per-call encoding sniffing of bytes


@dataclass
class RequestSpec:
    prompt: str
    max_tokens: int
    input_tokens: int | None = None  # as counted by the client tokenizer (chat template included)


@dataclass
class RequestResult:
    ok: bool
    sent: float  # perf_counter when the request was written
    scheduled: float | None = None  # perf_counter the load generator meant to send it (open loop)
    error: str | None = None  # kind: connect, timeout, read, http_<status>, stream_error, empty
    detail: str = ""
    ttft: float | None = None  # s, to the first token of any kind
    ttft_answer: float | None = None  # s, to the first answer token
    e2e: float | None = None  # s, to the end of the stream
    chunk_times: list[float] = field(default_factory=list)  # s after `sent`, each token chunk
    reasoning_chunks: int = 0
    answer_chunks: int = 0
    # Text pieces as streamed, joined once at the end: `attr += piece` copies the whole string each
    # time, quadratic over a 32k-token R1 answer.
    reasoning_parts: list[str] = field(default_factory=list)
    answer_parts: list[str] = field(default_factory=list)
    usage: dict | None = None
    input_tokens: int | None = None
    max_tokens: int = 0
    think_closed: bool = False  # with think_tags: </think> has been seen

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning_parts)

    @property
    def answer_text(self) -> str:
        return "".join(self.answer_parts)


@dataclass
class ServerInfo:
    base_url: str
    model: str
    models: list[str]
    server_header: str | None
    version: Any = None
    usage_reported: bool = False
    reasoning_seen: bool = False  # the probe answer streamed reasoning_content or reasoning
    ignore_eos_honoured: bool | None = None
    raw_models: Any = None


def normalize_url(url: str) -> str:
    url = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions", "/v1"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url.rstrip("/")


class Client:
    def __init__(self, base_url: str, model: str | None, *, api_key: str | None = None, endpoint: str = "chat",
                 ignore_eos: bool = True, timeout: float = 600.0, extra_body: dict | None = None,
                 think_tags: bool = False):
        if endpoint not in ("chat", "completions"):
            raise UsageError(f"unknown endpoint {endpoint!r}", hint="use --endpoint chat or --endpoint completions")
        self.base_url = normalize_url(base_url)
        try:
            self.pool = Pool(self.base_url)
        except ValueError as exc:
            raise UsageError(str(exc), hint="pass --url like http://127.0.0.1:8000") from None
        self.model = model
        self.endpoint = endpoint
        self.path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        self.ignore_eos = ignore_eos
        self.timeout = timeout
        self.extra_body = extra_body or {}
        # R1 served without a reasoning parser streams its thoughts as content, ending with </think>
        # (its chat template opens <think> in the prompt). With think_tags, content up to </think> is reasoning.
        self.think_tags = think_tags
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"

    def body(self, spec: RequestSpec) -> bytes:
        b: dict[str, Any] = {"model": self.model, "max_tokens": spec.max_tokens, "stream": True,
                             "stream_options": {"include_usage": True}}
        if self.endpoint == "chat":
            b["messages"] = [{"role": "user", "content": spec.prompt}]
        else:
            b["prompt"] = spec.prompt
        if self.ignore_eos:
            b["ignore_eos"] = True
        b.update(self.extra_body)
        return json.dumps(b).encode()

    async def send(self, spec: RequestSpec, scheduled: float | None = None) -> RequestResult:
        """Send one streaming request. Never raises for server or network trouble: it is recorded."""
        body = self.body(spec)
        res = RequestResult(ok=False, sent=time.perf_counter(), scheduled=scheduled, input_tokens=spec.input_tokens,
                            max_tokens=spec.max_tokens)
        try:
            async with asyncio.timeout(self.timeout):
                await self._stream(body, res)
        except TimeoutError:
            res.error, res.detail = "timeout", f"no complete answer in {self.timeout:g}s"
        except HTTPFailure as exc:
            res.error, res.detail = exc.kind, exc.detail
        if res.error is None and not res.chunk_times:
            res.error, res.detail = "empty", "stream ended without any token"
        res.ok = res.error is None
        return res

    async def _stream(self, body: bytes, res: RequestResult) -> None:
        resp = await self.pool.request("POST", self.path, body=body, headers=self.headers)
        try:
            if resp.status != 200:
                text = (await resp.read())[:300].decode("utf-8", "replace")
                res.error, res.detail = f"http_{resp.status}", text
                return
            buf = b""
            sent = res.sent
            async for t, data in resp.chunks():
                buf += data
                if b"\n" not in data:
                    continue
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        res.e2e = t - sent
                        continue
                    self._event(payload, t - sent, res)
            if res.e2e is None:  # servers that end the stream without [DONE]
                res.e2e = time.perf_counter() - sent
        finally:
            resp.release()

    def _event(self, payload: bytes, t: float, res: RequestResult) -> None:
        try:
            obj = _decode(payload.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError included
            res.error, res.detail = "stream_error", f"bad event: {payload[:120]!r}"
            return
        if obj.get("error"):
            res.error, res.detail = "stream_error", json.dumps(obj["error"])[:300]
            return
        if obj.get("usage"):
            res.usage = obj["usage"]
        choices = obj.get("choices")
        if not choices:
            return
        ch = choices[0]
        if self.endpoint == "chat":
            delta = ch.get("delta") or {}
            reasoning = next((delta[k] for k in REASONING_KEYS if delta.get(k)), None)
            answer = delta.get("content")
        else:
            reasoning, answer = None, ch.get("text")
        if self.think_tags and answer:
            if not res.think_closed:
                reasoning, answer = self._split_think(answer, res, reasoning)
            elif not res.answer_parts and not answer.strip():  # the blank line after </think>
                reasoning, answer = (reasoning or "") + answer, None
        if not (reasoning or answer):
            return  # role-only or empty chunk: not a token (vllm #3759)
        res.chunk_times.append(t)
        if res.ttft is None:
            res.ttft = t
        if reasoning:
            res.reasoning_chunks += 1
            res.reasoning_parts.append(reasoning)
        if answer:
            res.answer_chunks += 1
            res.answer_parts.append(answer)
            if res.ttft_answer is None:
                res.ttft_answer = t

    @staticmethod
    def _split_think(text: str, res: RequestResult, reasoning: str | None) -> tuple[str | None, str | None]:
        """Content before the first </think> is reasoning; after it, answer. A closing tag split across
        chunks is found because the tail of the reasoning so far is searched with this chunk."""
        tail = "".join(res.reasoning_parts[-7:])[-7:]  # parts are non-empty: 7 hold >= len("</think>") - 1
        end = (tail + text).find("</think>")
        if end < 0:
            return (reasoning or "") + text, None
        res.think_closed = True
        cut = end + len("</think>") - len(tail)
        before, after = text[:max(cut, 0)], text[max(cut, 0):]
        return ((reasoning or "") + before) or None, after.lstrip("\n") or None

    # -- before the run --------------------------------------------------------------
    async def preflight(self) -> ServerInfo:
        """Check the server is reachable, accepts the key and serves the model; raise a clear error if not."""
        try:
            status, headers, raw = await self._get("/v1/models")
            server = headers.get("server")
        except HTTPFailure as exc:
            raise NetworkError(f"cannot reach the server at {self.base_url}: {exc.detail}",
                               hint="start the server, or fix --url (e.g. http://127.0.0.1:8000)") from None
        if status in (401, 403):
            raise AuthError(f"the server at {self.base_url} rejected the API key (HTTP {status})",
                            hint="pass the server's key with --api-key")
        if status != 200:
            raise NetworkError(f"GET {self.base_url}/v1/models answered HTTP {status}: {raw[:200]!r}",
                               hint="is --url an OpenAI-compatible server? It must serve /v1/models")
        try:
            listing = json.loads(raw)
            ids = [m["id"] for m in listing.get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise NetworkError(f"{self.base_url}/v1/models did not return an OpenAI model list",
                               hint="is --url an OpenAI-compatible server?") from None
        if self.model is None:
            if not ids:
                raise NotFoundError(f"the server at {self.base_url} lists no models", hint="pass --model NAME")
            self.model = ids[0]
        elif self.model not in ids:
            raise NotFoundError(f"the server at {self.base_url} does not serve model {self.model!r}",
                                hint=f"pass --model with one of: {', '.join(ids) or '(none listed)'}")
        info = ServerInfo(self.base_url, self.model, ids, server, raw_models=listing.get("data"))
        info.version = await self._get_json("/version")
        probe = await self.send(RequestSpec("Say hello.", max_tokens=4))
        if probe.error == "empty" and (probe.usage or {}).get("completion_tokens"):
            # the server generated tokens whose text is empty (special or unknown ids: a random-weight
            # model sampling outside its tokenizer's vocabulary); the endpoint works
            probe.ok, probe.error = True, None
        if not probe.ok:
            if probe.error in ("http_401", "http_403"):
                raise AuthError(f"the server rejected the API key for {self.path}", hint="pass --api-key")
            if self.ignore_eos and probe.error in ("http_400", "http_422") and "ignore_eos" in probe.detail:
                # OpenAI-strict servers (transformers serve: HTTP 422) reject the vLLM/SGLang extension
                hint = "this server does not take ignore_eos: add --no-ignore-eos (outputs may then end early)"
            else:
                hint = "check the server's log; try --endpoint completions for servers without chat templates"
            raise NetworkError(f"a test request to {self.base_url}{self.path} failed ({probe.error}): {probe.detail}",
                               hint=hint)
        info.usage_reported = bool(probe.usage and "completion_tokens" in probe.usage)
        info.reasoning_seen = probe.reasoning_chunks > 0
        if info.usage_reported and self.ignore_eos:
            info.ignore_eos_honoured = probe.usage["completion_tokens"] == 4
        return info

    async def token_counters(self) -> dict[str, float] | None:
        """The server's Prometheus counters with "token" in their name, summed over labels; None without
        /metrics. Deltas around a point cross-check the client's token totals (guidellm #272)."""
        try:
            status, _, raw = await self._get("/metrics")
        except HTTPFailure:
            return None
        if status != 200:
            return None
        out: dict[str, float] = {}
        for line in raw.decode("utf-8", "replace").splitlines():
            if not line or line[0] == "#":
                continue
            name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else line.partition(" ")
            if "token" not in name or not name.endswith("_total"):
                continue
            try:
                value = float(rest.rsplit("}", 1)[-1].split()[0])
            except (ValueError, IndexError):
                continue
            out[name] = out.get(name, 0.0) + value
        return out

    async def _get(self, path: str) -> tuple[int, Any, bytes]:
        """GET path: (status, headers, body). The connection goes back to the pool, or is closed
        when the body could not be read."""
        resp = await self.pool.request("GET", path, headers=self.headers)
        try:
            return resp.status, resp.headers, await resp.read()
        finally:
            resp.release()

    async def _get_json(self, path: str) -> Any:
        try:
            status, _, raw = await self._get(path)
            return json.loads(raw) if status == 200 else None
        except (HTTPFailure, ValueError):
            return None

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
