"""Core of `dsr1 chat`: talk to an OpenAI-compatible server, keep the conversation.

History keeps only answers, never earlier reasoning (the R1 template drops it and
DeepSeek's API rejects it). Streaming uses httpx so chat works without the
`openai` package.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Iterator

import httpx

from dsr1.errors import AuthError, NetworkError, ServerError


@dataclass
class Reply:
    reasoning: str = ""
    content: str = ""
    completion_tokens: int = 0
    seconds: float = 0.0
    finish_reason: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ChatSession:
    url: str
    model: str | None = None
    api_key: str | None = None
    max_tokens: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def connect(self) -> str:
        """Find the served model name (GET /v1/models)."""
        try:
            r = httpx.get(self.url.rstrip("/") + "/v1/models", headers=self._headers(), timeout=10)
        except httpx.HTTPError as e:
            raise NetworkError(f"cannot reach {self.url}: {e}", hint="start one with `dsr1 serve MODEL` or check --url") from None
        if r.status_code == 401:
            raise AuthError("the server wants an API key", hint="pass --api-key or set DSR1_API_KEY")
        if r.status_code != 200:
            raise NetworkError(f"{self.url}/v1/models answered {r.status_code}", hint="is this an OpenAI-compatible server?")
        names = [m["id"] for m in r.json().get("data", [])]
        if not names:
            raise NetworkError(f"{self.url} serves no models", hint="check the server")
        self.model = self.model or names[0]
        return self.model

    def send(self, text: str) -> Iterator[tuple[str, str]]:
        """Stream ("reasoning" | "content", delta) pairs; the final Reply is in self.last."""
        self.history.append({"role": "user", "content": text})
        body = {"model": self.model, "messages": self.history, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        reply = Reply()
        self.last = reply
        t0 = time.perf_counter()
        try:
            with httpx.stream("POST", self.url.rstrip("/") + "/v1/chat/completions", json=body,
                              headers=self._headers(), timeout=None) as r:
                if r.status_code != 200:
                    r.read()
                    self.history.pop()
                    raise NetworkError(f"server answered {r.status_code}: {r.text[:300]}", hint="see the server log")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("error"):  # the server failed mid-stream (OpenAI-style error event)
                        self.history.pop()
                        raise ServerError(f"the server stopped this reply: {chunk['error'].get('message')}",
                                          hint="see the server log; the question was not kept, ask again")
                    if chunk.get("usage"):
                        reply.completion_tokens = chunk["usage"]["completion_tokens"]
                    for ch in chunk.get("choices", []):
                        d = ch.get("delta", {})
                        r_part = d.get("reasoning_content") or d.get("reasoning")
                        if r_part:
                            reply.reasoning += r_part
                            yield "reasoning", r_part
                        if d.get("content"):
                            reply.content += d["content"]
                            yield "content", d["content"]
                        reply.finish_reason = ch.get("finish_reason") or reply.finish_reason
        except httpx.HTTPError as e:
            self.history.pop()
            raise NetworkError(f"lost the server at {self.url}: {e}", hint="is it still running?") from None
        reply.seconds = time.perf_counter() - t0
        self.history.append({"role": "assistant", "content": reply.content})

    def reset(self) -> None:
        self.history.clear()
