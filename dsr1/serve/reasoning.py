"""Split R1 output into reasoning (inside <think>...</think>) and answer, as it streams.

Rules (see docs/serve.md, and vllm #12999 / PR #14841, sglang #4539):
- If the prompt already ends inside <think> (DeepSeek's template appends "<think>\\n"),
  everything up to </think> is reasoning, whether or not the model repeats <think>.
- Otherwise the output is reasoning only if it starts (after whitespace) with <think>;
  with no tags at all the text stays in `content`.
- If </think> never comes (max_tokens reached), all of it stays reasoning and the
  response's finish_reason says "length".
- A </think> appearing in an answer that never opened <think> stays in content when
  streaming (already sent); in a non-streaming response the text before it is
  moved to reasoning.
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
    def __init__(self, prompt_opened: bool):
        self.state = "reasoning" if prompt_opened else "start"
        self.buf = ""
        self._strip_content = False
        self._fresh = True  # nothing emitted as reasoning yet: a repeated <think> may still come

    def feed(self, text: str) -> tuple[str, str]:
        """New text in; (reasoning delta, content delta) out."""
        self.buf += text
        reasoning, content = "", ""
        if self.state == "start":
            lead = self.buf.lstrip()
            if lead.startswith(OPEN):
                self.buf = lead[len(OPEN):]
                self.state = "reasoning"
            elif OPEN.startswith(lead):
                return "", ""  # could still become <think>
            else:
                self.state = "content"
        if self.state == "reasoning":
            lead = self.buf
            if self._fresh and lead.lstrip().startswith(OPEN):  # model repeated the tag the template opened
                lead = lead.lstrip()[len(OPEN):]
            elif self._fresh and OPEN.startswith(lead.lstrip()):
                return "", ""
            if self._fresh:  # the newline after <think> is layout, not reasoning
                lead = lead.lstrip("\n")
                if not lead:
                    self.buf = ""
                    return "", ""
            self._fresh = False
            i = lead.find(CLOSE)
            if i == -1:
                keep = _partial_suffix(lead, CLOSE)
                reasoning, self.buf = lead[: len(lead) - keep], lead[len(lead) - keep :]
                return reasoning, ""
            reasoning, self.buf = lead[:i], lead[i + len(CLOSE):]
            self.state, self._strip_content = "content", True
        if self.state == "content":
            content, self.buf = self.buf, ""
            if self._strip_content:  # R1 puts "\n\n" between </think> and the answer
                content = content.lstrip("\n")
                self._strip_content = not content
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Flush what was held back (a partial tag at the very end)."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            return rest, ""
        return "", rest


def split_full(text: str, prompt_opened: bool) -> tuple[str | None, str]:
    """Non-streaming split: (reasoning or None, content)."""
    p = ReasoningParser(prompt_opened)
    r1, c1 = p.feed(text)
    r2, c2 = p.finish()
    reasoning, content = r1 + r2, c1 + c2
    if p.state in ("content",) and not reasoning and CLOSE in content:
        head, _, tail = content.partition(CLOSE)
        return head.strip(), tail.lstrip("\n")
    if p.state == "start":  # nothing but whitespace or a bare partial tag
        return None, content
    return (reasoning if reasoning or p.state == "reasoning" else None), content
