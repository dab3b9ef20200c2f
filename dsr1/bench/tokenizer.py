"""Which tokenizer `dsr1 bench` counts with, and where it came from.

Random prompts of exact length need the served model's tokenizer. `choose` tries, in order, and
the first that loads wins:

1. `--tokenizer`: a model directory, a stored model's name, or a hub repo id (downloaded if need be).
   Asked for explicitly, so a failure is an error rather than a reason to look elsewhere.
2. MODEL or `--model` when it is a local model directory.
3. dsr1's store: MODEL, `--model` and the served name (the server's /v1/models id; `dsr1 serve`
   serves a stored model under its store name) as stored names, or a hub id as a stored model's repo.
4. The Hugging Face cache, never the network (an offline retry loop would stall the run): a catalog
   name's repo, or a served name that is a hub id (vLLM serves `org/name`).
5. The server itself: POST /tokenize (and /detokenize to check the round trip) as vLLM and SGLang
   serve them; see `ServerTokenizer`.

transformers is imported only inside `load_tokenizer`: `dsr1 bench --help` never loads it.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from dsr1.errors import ConfigError, NetworkError, NotFoundError

SOURCES = ("flag", "directory", "gguf", "store", "hf-cache", "server")
FLAG_HINT = ("pass --tokenizer with a local model directory (with tokenizer.json) or a stored model's name "
             "(`dsr1 list`)")


def load_tokenizer(name_or_path: str, *, local_only: bool = False) -> Any:
    """AutoTokenizer from a local directory or a hub id. `local_only`: the HF cache only, never the network."""
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a dependency
        raise ConfigError("transformers is not installed", hint="pip install transformers") from None
    p = Path(name_or_path).expanduser()
    try:
        if p.is_file() and p.suffix.lower() == ".gguf":  # the tokenizer inside the file (needs `gguf`)
            return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, local_files_only=True)
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
    except Exception as exc:  # transformers raises OSError/ValueError/HF errors alike
        raise NotFoundError(f"cannot load a tokenizer from {name_or_path!r}: {str(exc).splitlines()[0][:200]}",
                            hint=FLAG_HINT) from None


@dataclass(frozen=True)
class Candidate:
    source: str  # one of SOURCES
    ref: str  # what is loaded: a directory or a hub repo id
    label: str  # for people, e.g. "stored model smollm2-135m (/path)"
    local_only: bool = True


@dataclass(frozen=True)
class ServerRef:
    base_url: str
    model: str | None
    api_key: str | None = field(default=None, repr=False)


@dataclass
class TokenizerChoice:
    """The tokenizer (None: no source had one), where it came from, and what was tried before it."""

    tokenizer: Any = field(repr=False)
    source: str | None
    ref: str | None
    label: str
    tried: list[str] = field(default_factory=list)
    fix: str = FLAG_HINT  # what to do when there is none

    def public(self) -> dict[str, Any]:
        """As recorded in results.json under `tokenizer`."""
        return {"source": self.source, "ref": self.ref, "label": self.label, "tried": self.tried}


def _stored(name: str) -> tuple[Any, str | None]:
    """(manifest, why not) for a name or repo id in dsr1's store."""
    from dsr1 import store

    m = store.find(name)
    if m is None:
        return None, f"no stored model {name!r} in {store.store_root()}"
    if not Path(m.model_dir).is_dir():
        return None, f"stored model {m.name!r} points at {m.model_dir}, which is missing"
    return m, None


def _tokenizer_of(m) -> str:
    """Where a stored model's tokenizer is: its directory, or for a model stored as GGUF the embedded
    engine's copy when made, else the GGUF file itself (its vocabulary is in the header)."""
    if m.is_gguf:
        return m.embedded_dir if m.embedded_ready else str(m.gguf_path)
    return m.model_dir


def _is_gguf(name: str) -> bool:
    p = Path(name).expanduser()
    return p.suffix.lower() == ".gguf" and p.is_file()


def candidates(tokenizer: str | None, names: Sequence[str | None]) -> tuple[list[Candidate], list[str]]:
    """The local sources to try, in order, and the lookups that found nothing (for the error message).
    With `tokenizer` it is the only candidate."""
    if tokenizer:
        if Path(tokenizer).expanduser().is_dir() or _is_gguf(tokenizer):
            return [Candidate("flag", tokenizer, f"--tokenizer {tokenizer}", local_only=False)], []
        m, _ = _stored(tokenizer)
        if m is not None:
            label = f"--tokenizer {tokenizer} (stored model {m.name}, {_tokenizer_of(m)})"
            return [Candidate("flag", _tokenizer_of(m), label)], []
        return [Candidate("flag", tokenizer, f"--tokenizer {tokenizer}", local_only=False)], []
    from dsr1 import catalog

    uniq = list(dict.fromkeys(n for n in names if n))
    found: list[Candidate] = []
    missed: list[str] = []
    for n in uniq:
        if Path(n).expanduser().is_dir():
            found.append(Candidate("directory", n, f"model directory {n}"))
        elif _is_gguf(n):  # `dsr1 bench FILE.gguf` (llama-server): the vocabulary in the file
            found.append(Candidate("gguf", n, f"GGUF file {n}"))
    for n in uniq:
        m, why = _stored(n)
        if m is not None:
            found.append(Candidate("store", _tokenizer_of(m), f"stored model {m.name} ({_tokenizer_of(m)})"))
        elif not Path(n).expanduser().is_dir() and not _is_gguf(n):
            missed.append(why)
    for n in uniq:
        spec = catalog.find(n)
        repo = spec.repo if spec is not None else (n if n.count("/") == 1 and not Path(n).exists() else None)
        if repo:
            found.append(Candidate("hf-cache", repo, f"{repo} from the Hugging Face cache"))
    return list(dict.fromkeys(found)), missed


def choose(tokenizer: str | None, names: Sequence[str | None], *, server: ServerRef | None = None,
           chat: bool = True) -> TokenizerChoice:
    """The first source in the module docstring's order that gives a tokenizer."""
    found, tried = candidates(tokenizer, names)
    for c in found:
        try:
            tok = load_tokenizer(c.ref, local_only=c.local_only)
        except NotFoundError as exc:
            if c.source == "flag":  # asked for: say so, do not quietly use something else
                raise NotFoundError(f"--tokenizer {tokenizer}: {exc}", hint=FLAG_HINT) from None
            tried.append(f"{c.ref}: not in the Hugging Face cache (a guessed tokenizer is never downloaded)"
                         if c.source == "hf-cache" else f"{c.label}: {exc}")
            continue
        return TokenizerChoice(tok, c.source, c.ref, c.label, tried)
    if server is not None:
        try:
            st = ServerTokenizer.probe(server.base_url, server.model, api_key=server.api_key, chat=chat)
        except TokenizerUnavailable as exc:
            tried.append(str(exc))
            if exc.chat_unsupported:
                return TokenizerChoice(None, None, None, "none", tried, fix=f"{FLAG_HINT}; or --endpoint "
                                       "completions (the server's /tokenize counts raw prompts)")
        else:
            return TokenizerChoice(st, "server", st.url, f"the server's /tokenize at {st.base_url} ({st.style})",
                                   tried)
    return TokenizerChoice(None, None, None, "none", tried)


# -- the server's own tokenizer ----------------------------------------------------------------------------------

class TokenizerUnavailable(Exception):
    """The server has no usable /tokenize; the message says why (it goes into the list of what was tried)."""

    def __init__(self, message: str, *, chat_unsupported: bool = False):
        super().__init__(message)
        self.chat_unsupported = chat_unsupported


# Very common English words: one token each in the R1 family's tokenizers (Qwen2, Llama 3, DeepSeek-V3)
# and most others. `ServerCounter.plain_words` keeps the ones this server's tokenizer agrees on.
COMMON_WORDS = """
the of and to in is was for that with as on by at from his her are were which this be had not or but have one
all their they there been has its new more also when who after first into time two other some only most over
such many then these made would years about can may year him out so she up people world state city where known
used between while during each under three later part like through number both since before film work well
high same being life found school long called name four back area around war day team family early great
season music series company still government group house way university second what country take five general
until game small own national another left home did became end just last public set should even power include
several much often system water play right against support among land large local place however development
best line main form although because could point common side given order head church field major title won
river top free north south west east build live open close show light night story every father mother child
women men members party police
""".split()


@dataclass
class ServerTokenizer:
    """The served model's own tokenizer over HTTP, as vLLM and SGLang expose it (both at the server's root,
    not under /v1; SGLang also at /v1/tokenize):

    POST /tokenize  {"model", "prompt": str, "add_special_tokens": bool}        (both)
                    {"model", "messages": [...], "add_generation_prompt": true}  (vLLM; SGLang since it
                    took chat messages: the server's own chat template, as a chat completion renders it)
                 -> {"tokens": [int], "count": int, "max_model_len": int}       (+ "token_strs" in vLLM)
    POST /detokenize {"model", "tokens": [int]} -> {"prompt": str} (vLLM) or {"text": str} (SGLang)

    Sources: vLLM vllm/entrypoints/serve/tokenize/protocol.py and serving.py; SGLang
    python/sglang/srt/entrypoints/openai/protocol.py (TokenizeRequest, DetokenizeResponse) and
    http_server.py (routes). One blocking request per count, over one keep-alive connection; prompts
    are built before a point's timing starts, so this never slows the measured requests.
    """

    base_url: str
    model: str | None
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    style: str = "vLLM/SGLang"
    _conn: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.base_url + "/tokenize"

    @classmethod
    def probe(cls, base_url: str, model: str | None, *, api_key: str | None = None,
              chat: bool = True) -> "ServerTokenizer":
        """A ServerTokenizer once the server proved it has one; else TokenizerUnavailable saying why."""
        st = cls(base_url.rstrip("/"), model, api_key)
        where = f"the server's /tokenize at {st.base_url}"
        try:
            status, body = st._post("/tokenize", st._text_body(" hello world", special=False))
        except NetworkError as exc:
            raise TokenizerUnavailable(f"{where}: {exc}") from None
        ids = body.get("tokens") if isinstance(body, dict) else None
        if status != 200 or not (_is_ids(ids) and ids):
            why = f"HTTP {status}" if status != 200 else "an answer without a token list"
            raise TokenizerUnavailable(f"{where}: {why} (vLLM and SGLang have it; other servers may not)")
        status, body = st._post("/detokenize", {"model": model, "tokens": ids})
        if status == 200 and isinstance(body, dict):
            text = body.get("prompt", body.get("text"))
            if not isinstance(text, str) or "hello world" not in text:
                raise TokenizerUnavailable(f"{where}: /detokenize did not give back the text /tokenize was given")
            st.style = "vLLM-style" if "prompt" in body else "SGLang-style"
        if chat:
            status, body = st._post("/tokenize", st._chat_body("hello"))
            if status != 200 or not _is_ids(body.get("tokens") if isinstance(body, dict) else None):
                raise TokenizerUnavailable(f"{where}: it takes no chat messages (HTTP {status}), so the chat "
                                           "template's tokens cannot be counted", chat_unsupported=True)
        return st

    def _text_body(self, text: str, *, special: bool) -> dict[str, Any]:
        return {"model": self.model, "prompt": text, "add_special_tokens": special}

    def _chat_body(self, text: str) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": text}], "add_generation_prompt": True}

    def count(self, text: str, *, chat: bool = False, special: bool = True) -> int:
        """Tokens in `text`: through the server's chat template as one user message (`chat`), else as a
        raw prompt with (`special`) or without the special tokens the server adds to one (BOS)."""
        body = self._chat_body(text) if chat else self._text_body(text, special=special)
        status, obj = self._post("/tokenize", body)
        ids = obj.get("tokens") if isinstance(obj, dict) else None
        if status != 200 or not _is_ids(ids):
            raise NetworkError(f"{self.url} answered HTTP {status}: {str(obj)[:200]}",
                               hint=f"check the server's log, or {FLAG_HINT}")
        return len(ids)

    def counter(self, chat: bool) -> "ServerCounter":
        return ServerCounter(self, chat)

    # -- HTTP -----------------------------------------------------------------------------------------------
    def _connect(self) -> http.client.HTTPConnection:
        u = urlsplit(self.base_url)
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        return cls(u.hostname or "127.0.0.1", u.port, timeout=self.timeout)

    def _post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """(status, parsed JSON or the text); NetworkError when the server cannot be reached."""
        data = json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        prefix = urlsplit(self.base_url).path.rstrip("/")
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: once more on a new one
            conn, reused = (self._conn, True) if self._conn is not None else (self._connect(), False)
            try:
                conn.request("POST", prefix + path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._conn = None
                if reused and not attempt:
                    continue
                raise NetworkError(f"POST {self.base_url}{path} failed: {exc}",
                                   hint=f"check that the server is up, or {FLAG_HINT}") from None
            self._conn = None if resp.will_close else conn
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw[:200].decode("utf-8", "replace")
        raise AssertionError("unreachable")


def _is_ids(x: Any) -> bool:
    """A token id list (empty is one: "" without special tokens)."""
    return isinstance(x, list) and all(isinstance(i, int) for i in x)


class ServerCounter:
    """`workload.Counter_`'s three counts, through the server's /tokenize."""

    def __init__(self, tokenizer: ServerTokenizer, chat: bool):
        self.tok, self.chat = tokenizer, chat

    def prompt_tokens(self, text: str) -> int:
        return self.tok.count(text, chat=self.chat, special=True)

    def text_tokens(self, text: str) -> int:
        return self.tok.count(text, special=False)

    def plain_words(self) -> list[str]:
        """' word' pieces that are one token each. The vocabulary cannot be listed over HTTP, so common
        words are checked instead, many per request: a run of single-token words tokenizes to exactly
        as many tokens as it has words (the pre-tokenizer splits at spaces), so a group that does is
        kept whole and one that does not is halved until the multi-token words are isolated."""
        words = [f" {w}" for w in COMMON_WORDS]
        good: list[str] = []
        groups = [words]
        while groups:
            g = groups.pop()
            if self.text_tokens("".join(g)) == len(g):
                good += g
            elif len(g) > 1:
                groups += [g[: len(g) // 2], g[len(g) // 2:]]
        if len(good) < 50:
            raise ConfigError(f"only {len(good)} common English words are one token each in the server's tokenizer",
                              hint=f"{FLAG_HINT}, or use --dataset with a ShareGPT JSON file")
        return sorted(good)  # the order /tokenize answered in must not change which words a seed picks
