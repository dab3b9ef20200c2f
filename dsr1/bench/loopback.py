"""A minimal OpenAI-compatible streaming server on raw asyncio, for measuring the client.

It answers at once (or with a fixed per-token delay), so a benchmark against it
measures the client's own ceiling rather than any model (issue 5: "the client must
not be the bottleneck"). Tests use it too, as a real HTTP server on 127.0.0.1 whose
behaviour can be set: reasoning tokens, server errors, a wrong API key, missing usage.

Run standalone (for the ceiling benchmark it must sit in its own process, so it does
not share the client's GIL): `python -m dsr1.bench.loopback --port 0` prints its URL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from dataclasses import dataclass, field


@dataclass
class Behaviour:
    model: str = "loopback"
    api_key: str | None = None
    ttft_s: float = 0.0  # delay before the first token
    token_delay_s: float = 0.0  # delay between tokens
    reasoning_tokens: int = 0  # first N output tokens are streamed as reasoning
    reasoning_field: str = "reasoning_content"  # or vLLM's newer "reasoning"
    fail_every: int = 0  # every Nth completion request gets a 500
    default_max_tokens: int = 16
    report_usage: bool = True
    role_chunk: bool = True  # a role-only first chunk, as vLLM sends (vllm #3759)
    tokens_per_chunk: int = 1
    textless: bool = False  # tokens whose text is empty (a random-weight model's ids past its tokenizer)


@dataclass
class Stats:
    requests: int = 0
    generated_tokens: int = 0  # served on /metrics as a Prometheus counter
    inflight: int = 0
    max_inflight: int = 0
    bodies: list = field(default_factory=list)


def _prompt_tokens(body: dict) -> int:
    if "messages" in body:
        text = " ".join(str(m.get("content", "")) for m in body["messages"])
    else:
        text = str(body.get("prompt", ""))
    return len(text.split())


class LoopbackServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, behaviour: Behaviour | None = None,
                 keep_bodies: bool = False):
        self.host, self.port = host, port
        self.behaviour = behaviour or Behaviour()
        self.stats = Stats()
        self.keep_bodies = keep_bodies
        self._cache: dict[tuple, bytes] = {}  # whole instant responses, by request shape
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def __enter__(self) -> "LoopbackServer":
        """Run in a background thread with its own event loop (for tests)."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self.stop())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="loopback-server")
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # -- HTTP ------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(n) if n else b""
                await self._route(method, path.split("?", 1)[0], headers, body, writer)
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    @staticmethod
    def _send(writer: asyncio.StreamWriter, status: int, payload: dict | str, ctype: str = "application/json") -> None:
        data = (json.dumps(payload) if isinstance(payload, dict) else payload).encode()
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 500: "Internal Server Error"}
        writer.write(f"HTTP/1.1 {status} {reason.get(status, 'X')}\r\ncontent-type: {ctype}\r\n"
                     f"content-length: {len(data)}\r\nserver: dsr1-loopback\r\n\r\n".encode() + data)

    async def _route(self, method: str, path: str, headers: dict, raw: bytes, writer: asyncio.StreamWriter) -> None:
        b = self.behaviour
        if path == "/health":
            self._send(writer, 200, "ok", "text/plain")
            return
        if path == "/metrics":
            self._send(writer, 200, "# TYPE loopback_generation_tokens_total counter\n"
                       f"loopback_generation_tokens_total {self.stats.generated_tokens}\n", "text/plain")
            return
        if b.api_key is not None and headers.get("authorization") != f"Bearer {b.api_key}":
            self._send(writer, 401, {"error": {"message": "Invalid API key", "type": "authentication_error"}})
            return
        if method == "GET" and path == "/v1/models":
            self._send(writer, 200, {"object": "list", "data": [
                {"id": b.model, "object": "model", "owned_by": "dsr1-loopback", "max_model_len": 4096}]})
            return
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            self._send(writer, 404, {"error": {"message": f"no route {method} {path}"}})
            return
        body = json.loads(raw or b"{}")
        if body.get("model") != b.model:
            self._send(writer, 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
            return
        st = self.stats
        st.requests += 1
        if self.keep_bodies:
            st.bodies.append(body)
        if b.fail_every and st.requests % b.fail_every == 0:
            self._send(writer, 500, {"error": {"message": "injected failure"}})
            return
        st.inflight += 1
        st.max_inflight = max(st.max_inflight, st.inflight)
        try:
            await self._complete(body, path.endswith("chat/completions"), writer)
        finally:
            st.inflight -= 1

    async def _complete(self, body: dict, chat: bool, writer: asyncio.StreamWriter) -> None:
        b = self.behaviour
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or b.default_max_tokens)
        self.stats.generated_tokens += n
        usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": n,
                 "total_tokens": _prompt_tokens(body) + n}
        obj = "chat.completion.chunk" if chat else "text_completion"
        if not body.get("stream"):
            text = "".join(f"tok{i} " for i in range(n))
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
            self._send(writer, 200, {"id": "x", "object": obj.replace(".chunk", ""), "model": b.model,
                                     "choices": [{**choice, "finish_reason": "length"}], "usage": usage})
            return
        instant = not (b.ttft_s or b.token_delay_s)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        key = (chat, n, usage["prompt_tokens"], include_usage)
        if instant and key in self._cache:  # the ceiling benchmark must measure the client, not this server
            writer.write(self._cache[key])
            await writer.drain()
            return
        out: list[bytes] = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                            b"server: dsr1-loopback\r\n\r\n"]
        writer.write(out[0])

        def event(payload: dict | str) -> None:
            data = b"data: " + (json.dumps(payload) if isinstance(payload, dict) else payload).encode() + b"\n\n"
            framed = b"%x\r\n%s\r\n" % (len(data), data)
            out.append(framed)
            writer.write(framed)

        if chat and b.role_chunk:
            event({"id": "x", "object": obj, "model": b.model,
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        if b.ttft_s:
            await writer.drain()
            await asyncio.sleep(b.ttft_s)
        i = 0
        while i < n:
            k = min(b.tokens_per_chunk, n - i)
            text = "" if b.textless else "".join(f"tok{j} " for j in range(i, i + k))
            if chat:
                key = b.reasoning_field if i < b.reasoning_tokens else "content"
                choice = {"index": 0, "delta": {key: text}, "finish_reason": None}
            else:
                choice = {"index": 0, "text": text, "finish_reason": None}
            i += k
            if i == n:
                choice["finish_reason"] = "length"
            event({"id": "x", "object": obj, "model": b.model, "choices": [choice]})
            if b.token_delay_s and i < n:
                await writer.drain()
                await asyncio.sleep(b.token_delay_s)
        if b.report_usage and include_usage:
            event({"id": "x", "object": obj, "model": b.model, "choices": [], "usage": usage})
        event("[DONE]")
        writer.write(b"0\r\n\r\n")
        if instant and len(self._cache) < 256:
            self._cache[key] = b"".join(out) + b"0\r\n\r\n"
        await writer.drain()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", default="loopback")
    p.add_argument("--token-delay", type=float, default=0.0)
    a = p.parse_args()

    async def serve() -> None:
        srv = LoopbackServer(port=a.port, behaviour=Behaviour(model=a.model, token_delay_s=a.token_delay))
        await srv.start()
        print(srv.url, flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
