"""Input and output checks for `dsr1 serve --guard POLICY.toml` (docs/guards.md).

A policy names rules (a regular expression or a list of keywords, for the input, the output or
both), a maximum prompt size, a PII mode (email, phone, card and ID numbers: block, mask or log)
and how a user's classifier plugin fails. The input is checked on the request's text before it is
tokenized: a rule that fires answers an OpenAI-shaped error with a stable code and the model is
never called. The output is checked as it is generated: `OutputGuard` holds back the last
`holdback` characters, so a match split across tokens is seen whole before any of it is sent, and
a rule that fires ends the response with finish_reason "content_filter" without the matched text.
"""

from __future__ import annotations

import importlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dsr1.errors import ConfigError, UsageError

PII_PATTERNS = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    "phone": r"(?<![\w+])\+?\d{1,3}[ .-]?(?:\(\d{2,4}\)|\d{2,4})[ .-]?\d{3,4}[ .-]?\d{3,4}(?!\d)",
    "card": r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)",  # then Luhn-checked
    "id": r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)",  # US SSN shape; add your own IDs as rules
}
PII_MODES = ("off", "block", "mask", "log")
WHERE = ("input", "output", "both")


@dataclass
class Rule:
    name: str
    where: str
    regex: re.Pattern
    span: int  # longest text it can match, for the output's holdback (regexes: the policy's holdback)

    def applies(self, where: str) -> bool:
        return self.where in (where, "both")


@dataclass
class Policy:
    rules: list[Rule] = field(default_factory=list)
    max_prompt_chars: int | None = None
    pii_mode: str = "off"
    pii_types: list[str] = field(default_factory=lambda: list(PII_PATTERNS))
    pii_where: str = "both"
    check_reasoning: bool = True
    return_reasoning: bool = True
    holdback: int = 64
    plugin_timeout_s: float = 2.0
    plugin_on_error: str = "block"  # block (fail closed) | allow (fail open)
    path: str = ""

    @property
    def pii(self) -> list[tuple[str, re.Pattern]]:
        if self.pii_mode == "off":
            return []
        return [(t, re.compile(PII_PATTERNS[t])) for t in self.pii_types]


@dataclass
class Decision:
    action: str  # allow | block | mask | log
    rule: str | None = None
    where: str = "input"
    text: str | None = None  # the text to use (masked) when action is mask

    @property
    def blocked(self) -> bool:
        return self.action == "block"


def load(path: Path) -> Policy:
    """A policy file; every mistake is a ConfigError naming the key."""
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"--guard {path}: {e.strerror}", hint="pass a policy TOML file (docs/guards.md)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--guard {path} is not valid TOML: {e}") from None
    where = f"--guard {path}"
    known = {"max_prompt_chars", "check_reasoning", "return_reasoning", "holdback_chars", "pii", "rules", "plugin"}
    extra = sorted(set(data) - known)
    if extra:
        raise ConfigError(f"{where}: unknown keys {extra}", hint=f"known: {', '.join(sorted(known))}")
    p = Policy(path=str(path), max_prompt_chars=data.get("max_prompt_chars"),
               check_reasoning=bool(data.get("check_reasoning", True)),
               return_reasoning=bool(data.get("return_reasoning", True)), holdback=int(data.get("holdback_chars", 64)))
    pii = data.get("pii", {})
    p.pii_mode = pii.get("mode", "off")
    if p.pii_mode not in PII_MODES:
        raise ConfigError(f"{where}: pii.mode {p.pii_mode!r}", hint=f"use one of {', '.join(PII_MODES)}")
    p.pii_types = list(pii.get("types", list(PII_PATTERNS)))
    bad = sorted(set(p.pii_types) - set(PII_PATTERNS))
    if bad:
        raise ConfigError(f"{where}: pii.types {bad}", hint=f"known: {', '.join(PII_PATTERNS)}")
    p.pii_where = pii.get("where", "both")
    plugin = data.get("plugin", {})
    p.plugin_timeout_s = float(plugin.get("timeout_s", 2.0))
    p.plugin_on_error = plugin.get("on_error", "block")
    if p.plugin_on_error not in ("block", "allow"):
        raise ConfigError(f"{where}: plugin.on_error {p.plugin_on_error!r}", hint="block (fail closed) or allow")
    names = set()
    for i, r in enumerate(data.get("rules", [])):
        name = r.get("name") or f"rule-{i + 1}"
        if name in names:
            raise ConfigError(f"{where}: two rules named {name!r}")
        names.add(name)
        w = r.get("where", "both")
        if w not in WHERE:
            raise ConfigError(f"{where}: rule {name}: where = {w!r}", hint="input, output or both")
        if ("pattern" in r) == ("keywords" in r):
            raise ConfigError(f"{where}: rule {name} needs exactly one of pattern or keywords")
        if "pattern" in r:
            try:
                rx = re.compile(r["pattern"])
            except re.error as e:
                raise ConfigError(f"{where}: rule {name}: bad pattern: {e}") from None
            span = p.holdback
        else:
            words = [str(k) for k in r["keywords"] if str(k)]
            if not words:
                raise ConfigError(f"{where}: rule {name}: keywords is empty")
            # whole words, any case: "bomb" does not fire on "bombastic"
            rx = re.compile(r"(?i)\b(?:" + "|".join(re.escape(k) for k in words) + r")\b")
            span = max(len(k) for k in words)
        p.rules.append(Rule(name, w, rx, span))
    if p.pii_mode != "off":
        p.holdback = max(p.holdback, 32)
    return p


def _luhn(digits: str) -> bool:
    d = [int(c) for c in digits if c.isdigit()]
    total = sum(d[-1::-2]) + sum(sum(divmod(2 * x, 10)) for x in d[-2::-2])
    return len(d) >= 13 and total % 10 == 0


def _pii_hits(policy: Policy, text: str, where: str):
    if policy.pii_mode == "off" or policy.pii_where not in (where, "both"):
        return []
    hits = []
    for kind, rx in policy.pii:
        for m in rx.finditer(text):
            if kind == "card" and not _luhn(m.group()):
                continue
            hits.append((kind, m))
    return hits


def _mask(text: str, hits) -> str:
    """Replace each match with [KIND]; of overlapping matches (a card number also looks like a
    phone number) the one starting first, then the longest, wins."""
    chosen, end = [], -1
    for kind, m in sorted(hits, key=lambda h: (h[1].start(), -h[1].end())):
        if m.start() >= end:
            chosen.append((kind, m))
            end = m.end()
    for kind, m in reversed(chosen):
        text = text[: m.start()] + f"[{kind.upper()}]" + text[m.end():]
    return text


def mask_input(policy: Policy, text: str) -> str:
    """`text` with its input PII replaced by [KIND] (what mask mode sends to the model)."""
    return _mask(text, _pii_hits(policy, text, "input"))


def check_input(policy: Policy, text: str) -> Decision:
    """The request's text (prompt, or every message's content) before tokenization."""
    if policy.max_prompt_chars is not None and len(text) > policy.max_prompt_chars:
        return Decision("block", "max_prompt_chars")
    for r in policy.rules:
        if r.applies("input") and r.regex.search(text):
            return Decision("block", r.name)
    hits = _pii_hits(policy, text, "input")
    if hits:
        rule = f"pii:{hits[0][0]}"
        if policy.pii_mode == "block":
            return Decision("block", rule)
        if policy.pii_mode == "mask":
            return Decision("mask", rule, text=_mask(text, hits))
        return Decision("log", rule)
    return Decision("allow")


class OutputGuard:
    """Checks generated text as it streams. `feed(delta)` returns the text safe to send now;
    after a block it returns "" and `decision` says which rule fired. `finish()` returns the rest."""

    def __init__(self, policy: Policy, *, skip_until: str | None = None):
        self.p = policy
        self.rules = [r for r in policy.rules if r.applies("output")]
        self.hold = max([r.span for r in self.rules] + [policy.holdback if policy.pii_mode != "off" else 0, 0])
        self.buf = ""  # generated, not yet sent
        self.checked_from = 0 if skip_until is None else None  # None: inside reasoning that is not checked
        self.skip_until = skip_until
        self.text = ""  # everything generated so far
        self.decision: Decision | None = None
        self.audited = False  # the server has written `decision` to the audit log
        self.logged: list[str] = []  # pii rules seen in log mode

    def feed(self, delta: str) -> str:
        if self.decision is not None and self.decision.blocked:
            return ""
        self.text += delta
        self.buf += delta
        return self._release(final=False)

    def finish(self) -> str:
        if self.decision is not None and self.decision.blocked:
            return ""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.checked_from is None:  # reasoning exempt: start checking after its end tag
            at = self.text.find(self.skip_until)
            if at < 0:
                out, self.buf = self.buf, ""
                return out
            self.checked_from = at + len(self.skip_until)
        sent = len(self.text) - len(self.buf)
        window_start = max(self.checked_from, sent - self.hold)
        window = self.text[window_start:]
        for r in self.rules:
            m = r.regex.search(window)
            if m:
                self.decision = Decision("block", r.name, where="output")
                cut = max(0, window_start + m.start() - sent)
                out, self.buf = self.buf[:cut], ""
                return out
        hits = _pii_hits(self.p, window, "output")
        if hits:
            rule = f"pii:{hits[0][0]}"
            if self.p.pii_mode == "block":
                self.decision = Decision("block", rule, where="output")
                cut = max(0, window_start + min(m.start() for _, m in hits) - sent)
                out, self.buf = self.buf[:cut], ""
                return out
            if self.p.pii_mode == "mask":
                # Mask what is complete in the unsent text. A match that reaches the end of what was
                # generated may still grow ("a@b.co" of "a@b.com"): nothing from its start on is sent yet.
                local = _pii_hits(self.p, self.buf, "output")
                done = [(k, m) for k, m in local if final or m.end() < len(self.buf)]
                growing = [m.start() for k, m in local if not (final or m.end() < len(self.buf))]
                if done:
                    self.buf = _mask(self.buf, done)
                    self.text = self.text[:sent] + self.buf
                    self.decision = self.decision or Decision("mask", rule, where="output")
                if growing and not final:
                    keep = max(min(len(self.buf), self.hold), len(self.buf) - min(growing))
                    out = self.buf[: len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
            elif rule not in self.logged:
                self.logged.append(rule)
                self.decision = self.decision or Decision("log", rule, where="output")
        if final:
            out, self.buf = self.buf, ""
            return out
        keep = min(len(self.buf), self.hold)
        out = self.buf[: len(self.buf) - keep]
        self.buf = self.buf[len(self.buf) - keep:]
        return out


def load_plugin(spec: str) -> Callable[[str, str], object]:
    """`module:function`: called as function(text, where) in a worker thread; True/None allows,
    False or a string (the reason) blocks."""
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise UsageError(f"--guard-plugin {spec!r}: expected module:function", hint="e.g. mycheck:classify")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--guard-plugin {spec}: {e}", hint="is the module on PYTHONPATH?") from None
    if not callable(f):
        raise UsageError(f"--guard-plugin {spec} is not callable")
    return f
