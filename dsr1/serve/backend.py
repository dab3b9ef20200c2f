"""What dsr1's OpenAI front (dsr1.serve.front) asks of whatever generates behind it.

Two kinds implement it: the embedded scheduler in this process (dsr1.serve.embedded) and a
proxy to an engine dsr1 supervises (dsr1.serve.proxy: vLLM, SGLang, llama-server). A request
goes in validated; a stream of `Piece`s comes out, the reasoning already split from the
answer and the engine's own tool-call and logprob deltas carried as the engine sent them.
Everything a client sees besides (auth, admission, guards, audit, field names, usage, the
request log) is the front's, once for every engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol


@dataclass
class Piece:
    """A part of one choice's output: text (a chat message's content or a completion's text),
    reasoning, the engine's tool-call deltas and logprobs, and at the end its finish reason."""

    index: int = 0
    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict] | None = None
    logprobs: Any = None
    finish_reason: str | None = None


@dataclass
class Call:
    """One validated request as the backend gets it."""

    kind: str  # chat | completions
    c: Any  # schema.ChatRequest | schema.CompletionRequest (texts masked by the input guard)
    body: dict[str, Any]  # the client's JSON body, for the options a proxy forwards as sent
    masked: bool = False  # the input guard changed texts in `c`: a proxy sends those
    prompt_tokens: int = 0  # set by the backend when it knows
    usage: dict[str, int] = field(default_factory=dict)  # set by the backend at the end
    request_id: str = ""
    ttft_s: float | None = None  # the engine's own time to first token, when it measures it
    fingerprint: str | None = None  # the engine's system_fingerprint (vLLM: version, TP size, ...)
    error: str | None = None  # why generation failed (a piece with finish_reason "error")


class Backend(Protocol):
    engine: str  # embedded | vllm | sglang | llamacpp: named in errors, /health, the request log
    supports: frozenset[str]  # schema.CAPABILITIES it honours
    measures_latency: bool  # it observes TTFT/ITL itself (the embedded scheduler); else the front does

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def healthy(self) -> bool: ...

    async def engine_metrics(self) -> bytes: ...  # the engine's own /metrics, appended to dsr1's

    async def open(self, call: Call) -> AsyncIterator[Piece]:
        """Start generating: raises schema.ApiError before anything is generated when the request
        cannot run (context too long, the engine's own 400), else returns the pieces as an async
        generator; closing it (aclose) aborts the request in the engine."""
        ...

