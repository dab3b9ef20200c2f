"""Split R1 output into reasoning and answer as it streams (`--reasoning-parser deepseek_r1`).

The rules are those of vLLM's deepseek_r1 parser (vllm PR #14841) and DeepSeek's API:
- Everything before `</think>` is reasoning, whether or not the output opened `<think>`.
  DeepSeek's current template ends the prompt with "<think>\\n", so the model never writes
  the tag (vllm #12999, #13125; DeepSeek-R1 #350); older R1-Distill templates (and many GGUF
  copies) do not, and the model often starts without it anyway and closes it later.
- A leading `<think>` (after whitespace) is dropped, with the newlines after it; leading
  whitespace is dropped too. The newlines right after `</think>` are layout, not content.
- Text after the first `</think>` is content verbatim, even if it contains the tags again.
- If `</think>` never comes (max_tokens, or an output with no tags at all) all of it is
  reasoning and content is ""; finish_reason says whether it was "stop" or "length".
  The parser cannot know in advance that no `</think>` will come (sglang #4539 kept such
  answers in content, at the price of streaming them differently); a model that does not
  think is served with `--reasoning-parser none`.

A non-streaming response is the same parser fed the whole text (`split_full`), so the
streamed deltas always concatenate to exactly the non-streaming fields. While streaming,
only text that may still turn out to be a tag is held back (a `</think>` split across
chunks), and `finish` flushes it.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """Feed text as it comes; get (reasoning delta, content delta) back. Call `finish` at the end."""

    def __init__(self) -> None:
        # lead: before any reasoning (whitespace, an optional <think>); opened: newlines after <think>;
        # reasoning: until </think>; closed: newlines after </think>; content: the rest.
        self._state = "lead"
        self._buf = ""  # held back: leading whitespace, a partial <think>, or a partial </think>

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back (whitespace, or a partial tag at the very end)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning = ""
        if self._state == "lead":
            self._buf = self._buf.lstrip()
            if self._buf.startswith(OPEN):
                self._buf, self._state = self._buf[len(OPEN):], "opened"
            elif OPEN.startswith(self._buf) and not final:
                return "", ""  # nothing yet, or could still become <think>
            else:
                self._state = "reasoning"
        if self._state == "opened":
            self._buf = self._buf.lstrip("\n")
            if not self._buf:
                return "", ""
            self._state = "reasoning"
        if self._state == "reasoning":
            i = self._buf.find(CLOSE)
            if i == -1:
                keep = 0 if final else _partial_suffix(self._buf, CLOSE)
                reasoning, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                return reasoning, ""
            reasoning, self._buf, self._state = self._buf[:i], self._buf[i + len(CLOSE):], "closed"
        if self._state == "closed":  # R1 writes "\n\n" between </think> and the answer
            self._buf = self._buf.lstrip("\n")
            if not self._buf:
                return reasoning, ""
            self._state = "content"
        content, self._buf = self._buf, ""
        return reasoning, content


def split_full(text: str) -> tuple[str, str]:
    """Non-streaming split: (reasoning, content), exactly what streaming `text` would send."""
    p = ReasoningParser()
    r1, c1 = p.feed(text)
    r2, c2 = p.finish()
    return r1 + r2, c1 + c2
