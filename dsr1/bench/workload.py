"""What to send: random prompts of exact token length, or a ShareGPT-format dataset.

Random prompts are built so their length is exact *after the chat template* (vllm
#10847: asked 10000 tokens, got ~5827), from words that re-tokenize stably, and each
request gets fresh text after the optional shared prefix, so a warm prefix cache
cannot inflate throughput (vllm #52884). The tokenizer (transformers) is imported
only here, inside functions: `dsr1 bench --help` never loads it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dsr1.bench.client import RequestSpec
from dsr1.errors import ConfigError, NotFoundError, UsageError


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


def load_tokenizer(name_or_path: str, *, local_only: bool = False) -> Any:
    """AutoTokenizer from a local directory or a hub id. `local_only`: the HF cache only, never the network
    (for a tokenizer dsr1 guesses from the model name; an offline retry loop would stall the run)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a dependency
        raise ConfigError("transformers is not installed", hint="pip install transformers") from None
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
    except Exception as exc:  # transformers raises OSError/ValueError/HF errors alike
        raise NotFoundError(f"cannot load a tokenizer from {name_or_path!r}: {str(exc).splitlines()[0][:200]}",
                            hint="pass --tokenizer with a local model directory (with tokenizer.json)") from None


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


class RandomWorkload:
    """Random prompts with an exact token count (template included) and sampled output lengths."""

    def __init__(self, tokenizer: Any, input_len: Length, output_len: Length, *, prefix_len: int = 0,
                 chat: bool = True, seed: int = 0):
        self.count = Counter_(tokenizer, chat)
        self.tok = tokenizer
        self.input_len, self.output_len, self.prefix_len = input_len, output_len, prefix_len
        self.rng = random.Random(seed)
        self.overhead = self.count.prompt_tokens("")
        if input_len.lo <= self.overhead + prefix_len:
            raise UsageError(f"--input-len {input_len} leaves no room: the chat template alone is {self.overhead} "
                             f"tokens and the shared prefix {prefix_len}",
                             hint=f"use --input-len above {self.overhead + prefix_len}")
        self.words = self._stable_words()
        self.prefix = "".join(self._words(prefix_len))

    def _stable_words(self) -> list[str]:
        """Vocabulary entries that decode to ' word' and re-encode to exactly one token."""
        rng = random.Random(1234)
        vocab = len(self.tok)
        words: list[str] = []
        for i in rng.sample(range(vocab), min(vocab, 6000)):
            w = self.tok.decode([i])
            if len(w) > 2 and w[0] == " " and w[1:].isalpha() and w[1:].isascii() and self.count.text_tokens(w) == 1:
                words.append(w)
            if len(words) >= 1500:
                break
        if len(words) < 50:
            raise ConfigError("could not find plain-word tokens in this tokenizer to build random prompts",
                              hint="use --dataset with a ShareGPT JSON file instead")
        return words

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
        self.count = Counter_(tokenizer, chat) if tokenizer is not None else None
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
    return Counter_(tokenizer, chat=False).text_tokens


def tokenizer_source(tokenizer: str | None, serve_model: str | None, model: str | None) -> tuple[str | None, bool]:
    """Where to load the tokenizer from, and whether that was asked for (else: HF cache only, no download).

    --tokenizer; else MODEL or --model when it is a local directory; else a catalog model's repo;
    else a served name that looks like a hub id (vLLM serves "org/name"). A bare alias gives None.
    """
    if tokenizer:
        return tokenizer, True
    for cand in (serve_model, model):
        if cand and Path(cand).is_dir():
            return cand, False
    from dsr1 import catalog

    for cand in (serve_model, model):
        spec = catalog.find(cand) if cand else None
        if spec is not None:
            return spec.repo, False
    return (model, False) if model and "/" in model else (None, False)


def build_workload(cfg: Any, serve_model: str | None = None) -> tuple[Callable[[int], RequestSpec], Any, list[str]]:
    """The workload a `BenchConfig` asks for, its tokenizer (or None) and notes for the user."""
    src, explicit = tokenizer_source(cfg.tokenizer, serve_model, cfg.model)
    tok, notes = None, []
    if src:
        try:
            tok = load_tokenizer(src, local_only=not explicit)
        except NotFoundError as exc:
            if cfg.dataset is None:
                raise UsageError(f"random prompts need the model's tokenizer: {exc}",
                                 hint="pass --tokenizer with a local model directory") from None
            notes.append(f"{exc}; token counts come from the server's usage only")
    elif cfg.dataset is None:
        raise UsageError("random prompts need the model's tokenizer", hint="pass --tokenizer PATH")
    chat = cfg.endpoint == "chat"
    if cfg.dataset:
        out = Length.parse(cfg.output_len, "--output-len") if cfg.output_len else None
        return ShareGPTWorkload(Path(cfg.dataset), tokenizer=tok, chat=chat, seed=cfg.seed, output_len=out), tok, notes
    return RandomWorkload(tok, Length.parse(cfg.input_len, "--input-len"), Length.parse(cfg.output_len, "--output-len"),
                          prefix_len=cfg.prefix_len, chat=chat, seed=cfg.seed), tok, notes
