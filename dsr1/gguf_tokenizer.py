"""Make a tokenizer converted from GGUF agree with the file's own token table, or refuse it.

A GGUF stores every token at its id, with a type per token (llama.cpp's
llama_token_type: 1 normal, 3 control, 4 user-defined, 5 unused). transformers
5.24 rebuilds a `tokenizers` BPE from that, but for byte-level (gpt2) vocabularies
it adds a control token only when it is spelled in the byte alphabet, taking any
other for a llama.cpp mislabel. R1's control tokens are spelled with fullwidth bars
and U+2581 (`<｜User｜>`, `<｜begin▁of▁sentence｜>`), so all of them are dropped:
`<｜User｜>` encodes as 5 ordinary pieces, and BOS/EOS are appended as new tokens
152065/152066 past the model's 152,064 embedding rows (IndexError on the first
request). Qwen's `<|endoftext|>` is appended at 152064 as well.

The repair edits the saved tokenizer.json: each control and user-defined token's
vocabulary entry is spelled as the file spells it, at the file's id; added tokens
are the file's control (special) and user-defined (not special) tokens at their ids
and nothing past the table; the post-processor's BOS takes the file's id. `check`
then reloads the result and compares it with the table, as the server will load it:
every control/user-defined token encodes to its one id, BOS/EOS/PAD ids are the
file's, nothing lies past the embedding, the chat template is the file's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsr1.gguf_meta import Header

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id",
                "unk_token": "unknown_token_id"}


@dataclass
class TokenTable:
    """The tokenizer as the GGUF file states it."""

    tokens: list[str]
    types: list[int]
    special_ids: dict[str, int]  # bos_token/eos_token/pad_token/unk_token -> id, where the file names one
    chat_template: str | None

    @classmethod
    def from_header(cls, h: Header) -> "TokenTable":
        tokens = h.get("tokenizer.ggml.tokens") or []
        types = h.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        ids = {name: h.get(f"tokenizer.ggml.{key}") for name, key in _SPECIAL_IDS.items()}
        return cls(list(tokens), list(types), {k: v for k, v in ids.items() if v is not None},
                   h.get("tokenizer.chat_template"))

    def added(self) -> list[tuple[int, str, bool]]:
        """(id, text, special) of the tokens llama.cpp matches whole in text: control and user-defined."""
        return [(i, t, ty == CONTROL) for i, (t, ty) in enumerate(zip(self.tokens, self.types))
                if ty in (CONTROL, USER_DEFINED)]


def repair(tokenizer_json: dict[str, Any], table: TokenTable) -> list[str]:
    """Edit a tokenizer.json (as dict) in place to match the table. Returns what was changed."""
    changed: list[str] = []
    model = tokenizer_json["model"]
    vocab: dict[str, int] | None = model.get("vocab") if isinstance(model.get("vocab"), dict) else None
    n = len(table.tokens)
    want = table.added()
    by_text = {t: i for i, t, _ in want}
    if vocab is not None:
        spelled = {i: k for k, i in vocab.items() if i in {w[0] for w in want}}
        for i, text, _ in want:
            if vocab.get(text) == i:
                continue
            old = spelled.get(i)
            if old is not None:
                del vocab[old]
            if text in vocab:  # the same text at another id: the table contradicts itself
                raise ValueError(f"token {text!r} is at id {vocab[text]} and at id {i}")
            vocab[text] = i
            changed.append(f"{text} -> {i}")
    kept = []
    for a in tokenizer_json.get("added_tokens", []):
        if a["id"] >= n or (a["content"] in by_text and by_text[a["content"]] != a["id"]):
            changed.append(f"dropped added token {a['content']} at {a['id']}")
            continue
        if a["id"] in {w[0] for w in want} and a["content"] != table.tokens[a["id"]]:
            changed.append(f"dropped added token {a['content']} at {a['id']}")
            continue
        kept.append(a)
    have = {a["id"] for a in kept}
    for i, text, special in want:
        if i not in have:
            kept.append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                         "normalized": False, "special": special})
    kept.sort(key=lambda a: a["id"])
    tokenizer_json["added_tokens"] = kept
    _fix_post_processor(tokenizer_json.get("post_processor"), by_text, changed)
    return changed


def _fix_post_processor(node: Any, by_text: dict[str, int], changed: list[str]) -> None:
    """TemplateProcessing names its special tokens with their ids (`special_tokens: {text: {ids: [..]}}`)."""
    if isinstance(node, dict):
        for text, spec in (node.get("special_tokens") or {}).items():
            ids = [by_text[t] for t in spec.get("tokens", []) if t in by_text]
            if ids and len(ids) == len(spec.get("tokens", [])) and spec.get("ids") != ids:
                changed.append(f"post-processor {text} -> {ids}")
                spec["ids"] = ids
        for v in node.values():
            if isinstance(v, (dict, list)):
                _fix_post_processor(v, by_text, changed)
    elif isinstance(node, list):
        for v in node:
            _fix_post_processor(v, by_text, changed)


def repair_saved(model_dir: Path, table: TokenTable) -> list[str]:
    """Repair the tokenizer.json that save_pretrained wrote in model_dir (atomically)."""
    from dsr1.fsutil import atomic_write_bytes

    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    changed = repair(data, table)
    if changed:
        atomic_write_bytes(path, json.dumps(data, ensure_ascii=False).encode("utf-8"))
    return changed


def check(tok: Any, table: TokenTable, embedding_rows: int) -> list[str]:
    """Where a loaded transformers tokenizer disagrees with the table (empty: it agrees)."""
    problems = []
    for i, text, _ in table.added():
        got = tok.encode(text, add_special_tokens=False)
        if got != [i]:
            problems.append(f"{text!r} encodes as {got[:8]}, the file says [{i}]")
    for name, i in table.special_ids.items():
        got = getattr(tok, f"{name}_id", None)
        if got != i:
            problems.append(f"{name} id is {got}, the file says {i} ({table.tokens[i]!r})")
    if len(tok) > embedding_rows:
        problems.append(f"the tokenizer has {len(tok)} tokens, the model's embedding {embedding_rows} rows")
    if table.chat_template and tok.chat_template != table.chat_template:
        problems.append("the chat template differs from the file's")
    return problems
