"""What to send: random prompts of exact token length, or a ShareGPT-format dataset.

Random prompts are built so their length is exact *after the chat template* (vllm
#10847: asked 10000 tokens, got ~5827), from words that re-tokenize stably, and each
request gets fresh text after the optional shared prefix, so a warm prefix cache
cannot inflate throughput (vllm #52884). Where the tokenizer comes from (a local one
through transformers, imported inside functions, or the server's /tokenize) is
dsr1/bench/tokenizer.py's business; `counter()` gives either the same three counts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dsr1.bench.client import RequestSpec
from dsr1.bench.tokenizer import ServerRef, ServerTokenizer, TokenizerChoice, choose, load_tokenizer
from dsr1.errors import ConfigError, NotFoundError, UsageError

__all__ = ["Length", "RandomWorkload", "ShareGPTWorkload", "build_workload", "load_tokenizer", "token_counter"]


@dataclass(frozen=True)
class Length:
    """A fixed length (`128`) or a uniform range (`64-256`, both ends included)."""

    lo: int
    hi: int

    @classmethod
    def parse(cls, text: str | int, flag: str) -> "Length":
        s = str(text).strip()
        try:
            lo, _, hi = s.partition("-")
            lo_i, hi_i = int(lo), int(hi or lo)
        except ValueError:
            raise UsageError(f"{flag} {s!r} is not a length", hint=f"use {flag} 128 or {flag} 64-256") from None
        if lo_i < 1 or hi_i < lo_i:
            raise UsageError(f"{flag} {s!r} must be positive and low-high", hint=f"e.g. {flag} 64-256")
        return cls(lo_i, hi_i)

    def sample(self, rng: random.Random) -> int:
        return self.lo if self.lo == self.hi else rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


class Counter_:
    """Counts tokens the way the server does: the whole prompt through the chat template."""

    def __init__(self, tokenizer: Any, chat: bool):
        self.tok, self.chat = tokenizer, chat and getattr(tokenizer, "chat_template", None) is not None

    def prompt_tokens(self, text: str) -> int:
        if self.chat:
            ids = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
                ids = ids["input_ids"]
            return len(ids)
        return len(self.tok.encode(text))

    def text_tokens(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def plain_words(self) -> list[str]:
        """Vocabulary entries that decode to ' word' and re-encode to exactly one token."""
        rng = random.Random(1234)
        vocab = len(self.tok)
        words: list[str] = []
        for i in rng.sample(range(vocab), min(vocab, 6000)):
            w = self.tok.decode([i])
            if len(w) > 2 and w[0] == " " and w[1:].isalpha() and w[1:].isascii() and self.text_tokens(w) == 1:
                words.append(w)
            if len(words) >= 1500:
                break
        if len(words) < 50:
            raise ConfigError("could not find plain-word tokens in this tokenizer to build random prompts",
                              hint="use --dataset with a ShareGPT JSON file instead")
        return words


def counter(tokenizer: Any, chat: bool) -> Any:
    """Counter_ for a local tokenizer, tokenizer.ServerCounter for the server's (same three methods)."""
    return tokenizer.counter(chat) if isinstance(tokenizer, ServerTokenizer) else Counter_(tokenizer, chat)


class RandomWorkload:
    """Random prompts with an exact token count (template included) and sampled output lengths."""

    def __init__(self, tokenizer: Any, input_len: Length, output_len: Length, *, prefix_len: int = 0,
                 chat: bool = True, seed: int = 0):
        self.count = counter(tokenizer, chat)
        self.input_len, self.output_len, self.prefix_len = input_len, output_len, prefix_len
        self.rng = random.Random(seed)
        self.overhead = self.count.prompt_tokens("")
        if input_len.lo <= self.overhead + prefix_len:
            raise UsageError(f"--input-len {input_len} leaves no room: the chat template alone is {self.overhead} "
                             f"tokens and the shared prefix {prefix_len}",
                             hint=f"use --input-len above {self.overhead + prefix_len}")
        self.words = self.count.plain_words()
        self.prefix = "".join(self._words(prefix_len))

    def _words(self, n: int) -> list[str]:
        return [self.rng.choice(self.words) for _ in range(max(n, 0))]

    def prompt(self, target: int) -> tuple[str, int]:
        """A prompt whose templated length is `target` tokens (or as close as the tokenizer allows)."""
        body = self._words(target - self.overhead - self.prefix_len)
        n = self.count.prompt_tokens(self.prefix + "".join(body))
        for _ in range(30):
            if n == target:
                break
            if n > target:  # words merged with the template: drop the excess from the end
                del body[max(len(body) - (n - target), 1):]
            else:
                body += self._words(target - n)
            n = self.count.prompt_tokens(self.prefix + "".join(body))
        return self.prefix + "".join(body), n

    def __call__(self, i: int) -> RequestSpec:
        text, n = self.prompt(self.input_len.sample(self.rng))
        return RequestSpec(text, self.output_len.sample(self.rng), input_tokens=n)


class ShareGPTWorkload:
    """First human turn of each ShareGPT conversation; output length from the reply or --output-len."""

    def __init__(self, path: Path, *, tokenizer: Any | None, output_len: Length | None, chat: bool = True,
                 seed: int = 0, prefix: str = ""):
        self.rng = random.Random(seed)
        self.output_len = output_len
        self.count = counter(tokenizer, chat) if tokenizer is not None else None
        self.prefix = prefix
        if output_len is None and tokenizer is None:
            raise UsageError("a ShareGPT dataset needs a tokenizer to size outputs from the replies",
                             hint="pass --tokenizer PATH, or fix output lengths with --output-len")
        self.items = self._load(path)
        self.rng.shuffle(self.items)

    def _load(self, path: Path) -> list[tuple[str, str]]:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise NotFoundError(f"dataset {path} does not exist", hint="pass --dataset with a ShareGPT JSON file") \
                from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"dataset {path} is not JSON: {exc}", hint="pass a ShareGPT-format JSON list") from None
        items = []
        for entry in data if isinstance(data, list) else []:
            conv = entry.get("conversations") or entry.get("conversation") if isinstance(entry, dict) else None
            if not isinstance(conv, list) or len(conv) < 2:
                continue
            human, reply = conv[0], conv[1]
            if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in (human, reply)):
                continue
            if human["value"].strip():
                items.append((human["value"], reply["value"]))
        if not items:
            raise ConfigError(f"dataset {path} holds no usable conversations",
                              hint='expected [{"conversations": [{"from": "human", "value": ...}, '
                                   '{"from": "gpt", "value": ...}]}, ...]')
        return items

    def __call__(self, i: int) -> RequestSpec:
        prompt, reply = self.items[i % len(self.items)]
        prompt = self.prefix + prompt
        if self.output_len is not None:
            out = self.output_len.sample(self.rng)
        else:
            out = max(1, self.count.text_tokens(reply))
        n = self.count.prompt_tokens(prompt) if self.count else None
        return RequestSpec(prompt, out, input_tokens=n)


def token_counter(tokenizer: Any | None) -> Callable[[str], int] | None:
    if tokenizer is None:
        return None
    return counter(tokenizer, chat=False).text_tokens


def build_workload(cfg: Any, serve_model: str | None = None) -> tuple[Callable[[int], RequestSpec], TokenizerChoice]:
    """The workload a `BenchConfig` asks for, and the tokenizer it counts with (`choice.tokenizer`; None for a
    dataset run with nothing found) with its source. Call after the preflight: `cfg.model` is then the
    served name, and the server is there to ask."""
    chat = cfg.endpoint == "chat"
    server = ServerRef(cfg.url, cfg.model, cfg.api_key) if cfg.url else None
    choice = choose(cfg.tokenizer, [serve_model, cfg.model], server=server, chat=chat)
    if choice.tokenizer is None and cfg.dataset is None:
        raise UsageError("random prompts need the model's tokenizer, and none was found (tried: "
                         f"{'; '.join(choice.tried) or 'nothing to try'})", hint=choice.fix)
    tok = choice.tokenizer
    if cfg.dataset:
        out = Length.parse(cfg.output_len, "--output-len") if cfg.output_len else None
        return ShareGPTWorkload(Path(cfg.dataset), tokenizer=tok, chat=chat, seed=cfg.seed, output_len=out), choice
    return RandomWorkload(tok, Length.parse(cfg.input_len, "--input-len"), Length.parse(cfg.output_len, "--output-len"),
                          prefix_len=cfg.prefix_len, chat=chat, seed=cfg.seed), choice
