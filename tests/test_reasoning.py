"""The R1 reasoning split (dsr1/serve/reasoning.py): one parser for streaming and non-streaming.

Every output in the table is split whole (`split_full`, what a non-streaming response
carries) and streamed in every way of cutting it into chunks; the concatenated deltas
must be exactly the whole split, and both must be the expected strings.
"""

from __future__ import annotations

import pytest

from dsr1.serve.reasoning import ReasoningParser, split_full

# (output text as the model wrote it, reasoning, content). A prompt that ends with "<think>\n"
# (DeepSeek's current template) gives the same output minus the leading tag: the split is the same.
CASES = {
    "tag emitted": ("<think>\nLet me think</think>\n\nThe answer", "Let me think", "The answer"),
    "tag forced by the template": ("Let me think\n</think>\n\nThe answer", "Let me think\n", "The answer"),
    "template opened, model repeats the tag": ("<think>\nhmm</think>ok", "hmm", "ok"),
    "newline before the forced reasoning": ("\nhmm </think>\n\nAnswer", "hmm ", "Answer"),
    "whitespace before the tag, newlines after": (" \n<think>\n\nhmm</think>\n\nok", "hmm", "ok"),
    "no <think>, </think> later (old template, GGUF)": ("Okay so</think>\n\nThe answer", "Okay so", "The answer"),
    "never closed (max_tokens)": ("<think>\nLet me", "Let me", ""),
    "never closed, partial </think> at the end": ("Step one</thi", "Step one</thi", ""),
    "never closed, partial <think> only": ("<thi", "<thi", ""),
    "no tags at all (plain stop)": ("Hello world", "Hello world", ""),
    "not a tag": ("a < b and <thinking> is not a tag", "a < b and <thinking> is not a tag", ""),
    "tag and layout only": ("<think>\n", "", ""),
    "whitespace only": ("\n \n", "", ""),
    "empty": ("", "", ""),
    "R1 skipping its reasoning": ("<think>\n\n</think>\n\nHi", "", "Hi"),
    "forced template, reasoning skipped": ("\n\n</think>\n\nHi", "", "Hi"),
    "closed, no answer yet": ("hmm</think>\n\n", "hmm", ""),
    "tags inside the answer stay content": ("r</think>\n\nuse <think> or </think>\n", "r", "use <think> or </think>\n"),
    "a later <think> is reasoning text": ("x <think> y</think>z", "x <think> y", "z"),
    "near misses before the tag": ("a<</th</think>b", "a<</th", "b"),
    "answer keeps its inner newlines": ("r</think>\n\nA\n\nB\n", "r", "A\n\nB\n"),
    "non-ASCII": ("<think>\n思考中</think>\n\n答案", "思考中", "答案"),
}


def _stream(chunks: list[str]) -> tuple[str, str]:
    p = ReasoningParser()
    deltas = [p.feed(c) for c in chunks] + [p.finish()]
    return "".join(r for r, _ in deltas), "".join(c for _, c in deltas)


def _cuttings(text: str):
    """Every 2-chunk cut, fixed chunk sizes 1..4, and each tag cut inside at every point with its neighbours."""
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    for n in range(1, 5):
        yield [text[i:i + n] for i in range(0, len(text), n)]
    for tag in ("<think>", "</think>"):
        at = text.find(tag)
        if at >= 0:
            for j in range(1, len(tag)):
                yield [text[:at + j], text[at + j:at + len(tag)], text[at + len(tag):]]


@pytest.mark.parametrize("text,reasoning,content", CASES.values(), ids=list(CASES))
def test_whole_split(text, reasoning, content):
    assert split_full(text) == (reasoning, content)


@pytest.mark.parametrize("text,reasoning,content", CASES.values(), ids=list(CASES))
def test_streamed_deltas_concatenate_to_the_whole_split(text, reasoning, content):
    for chunks in _cuttings(text):
        assert "".join(chunks) == text
        assert _stream(chunks) == (reasoning, content), chunks


def test_stream_holds_back_only_a_possible_tag():
    p = ReasoningParser()
    assert p.feed("<th") == ("", "")  # could still be <think>
    assert p.feed("ink>\n") == ("", "")  # layout newline after the tag
    assert p.feed("Let me th") == ("Let me th", "")  # reasoning streams as it comes
    assert p.feed("ink </") == ("ink ", "")  # "</" could start </think>: held
    assert p.feed("b>") == ("</b>", "")  # it did not
    assert p.feed("</think>\n") == ("", "")
    assert p.feed("\nThe") == ("", "The")
    assert p.feed(" </think>") == ("", " </think>")  # after the close everything is content, unheld
    assert p.finish() == ("", "")


def test_finish_flushes_a_held_partial_tag():
    p = ReasoningParser()
    assert p.feed("Step one</thi") == ("Step one", "")
    assert p.finish() == ("</thi", "")
