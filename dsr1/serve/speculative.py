"""Speculative decoding, greedy-exact: drafts by prompt lookup (n-gram) or by a small draft model.

Reasoning models repeat themselves: R1 quotes the question, restates numbers, copies code from
the prompt. Prompt lookup (Saxena 2023; vLLM's `ngram` method) proposes, for each running
request, the tokens that followed the last earlier occurrence of its newest 1-3 tokens in its
own prompt and output. One forward then checks the proposal: the model's greedy choice at every
drafted position is computed at once, drafted tokens are kept while they equal it, and the first
disagreement is replaced by the model's own token. Output is therefore token for token what
plain greedy decoding gives; only the number of forwards changes. Requests that sample
(temperature > 0) are not drafted for and take their one token from the same forward.

A draft model (DraftProposer) proposes instead by running a smaller model of the same tokenizer
greedily for k tokens (R1-Distill-Qwen-1.5B for the larger Qwen distills, as vLLM's and SGLang's
draft-model methods do). It keeps its own slot cache, row for row with the target's, and
catches up on whatever the target accepted since its last proposal in one forward per step.

A proposer has `propose_batch(batch, limits)` (draft tokens per running row) and `move(req, src,
dst)` (the scheduler compacted rows; a proposer with its own cache moves it too).
"""

from __future__ import annotations

import os
from pathlib import Path


class NgramProposer:
    """Per-request index of n-grams (n = 1..max_n) to the end of their latest occurrence."""

    name = "ngram"

    def __init__(self, k: int = 4, max_n: int = 3):
        self.k = k
        self.max_n = max_n

    def propose_batch(self, batch, limits: list[int]) -> list[list[int]]:
        return [self.propose(r, n) if n > 0 else [] for r, n in zip(batch, limits)]

    def move(self, req, src: int, dst: int) -> None:
        pass  # the index lives on the request

    def propose(self, req, limit: int) -> list[int]:
        """Up to min(k, limit) draft tokens for `req` (its prompt_ids + out_ids), or []."""
        limit = min(self.k, limit)
        if limit <= 0:
            return []
        seq = req.prompt_ids + req.out_ids if req.out_ids else req.prompt_ids
        state = req.spec_state
        if state is None:
            state = req.spec_state = [{} for _ in range(self.max_n)], 0
        index, upto = state
        end = len(seq) - 1  # the newest token: looked up, indexed only next time (not matching itself)
        for i in range(upto, end):
            for n in range(1, self.max_n + 1):
                if i + 1 >= n:
                    index[n - 1][tuple(seq[i + 1 - n : i + 1])] = i
        req.spec_state = index, max(upto, end)
        for n in range(self.max_n, 0, -1):
            if end + 1 < n:
                continue
            j = index[n - 1].get(tuple(seq[end + 1 - n :]))
            if j is not None:
                return seq[j + 1 : j + 1 + limit]
        return []


class DraftProposer:
    """Greedy drafts from a smaller model that shares the target's tokenizer (fast path only).

    `req.spec_state` holds how many of the request's positions (prompt + output) have their K/V in
    the draft's cache; the drafted tokens past that are written too but recomputed next time,
    since the target may reject them."""

    name = "draft"
    CHUNK = 512  # prompt tokens per draft prefill forward (a new request's prompt)

    def __init__(self, draft, target, slots: int, max_len: int, k: int = 4):
        from dsr1.errors import ConfigError

        if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise ConfigError("the draft model's tokenizer differs from the served model's",
                              hint="pick a draft of the same family (R1-Distill-Qwen-1.5B drafts for the Qwen "
                                   "distills; the Llama distills need a Llama-3 tokenizer draft)")
        self.draft = draft
        self.cache = draft.make_cache(slots, max_len)
        if draft.fast is None:
            raise ConfigError(f"the draft model cannot take the fast path: {draft.fast_reason}",
                              hint="use a Llama or Qwen2 draft whose weights sit on one device")
        self.max_len = max_len
        self.vocab = target.vocab
        self.k = k

    def move(self, req, src: int, dst: int) -> None:
        self.cache.move(src, dst, req.spec_state or 0)

    def propose_batch(self, batch, limits: list[int]) -> list[list[int]]:
        """Rows 0..n-1 of `batch` are the target's running rows (slot i = batch[i])."""
        import torch

        limits = [min(self.k, n) for n in limits]  # the scheduler's limits are room left, not draft length
        if not any(n > 0 for n in limits):
            return [[] for _ in batch]
        fast = self.draft.fast
        feed, starts, ends = [], [], []
        for i, r in enumerate(batch):
            seq = r.prompt_ids + r.out_ids
            done = min(r.spec_state or 0, len(seq) - 1)
            # a new request, or one the draft fell behind on: its prompt in chunks, then the last
            # token joins the others in one forward
            while len(seq) - 1 - done > self.k:
                chunk = seq[done : min(done + self.CHUNK, len(seq) - 1)]
                fast.prefill(self.cache, i, chunk, done)
                done += len(chunk)
            feed.append(seq[done:])
            starts.append(done)
            ends.append(len(seq))
        with torch.inference_mode():
            logits = fast.verify(self.cache, feed, starts)
            last = torch.tensor([len(f) - 1 for f in feed])
            tok = logits[torch.arange(len(batch)), last, : self.vocab].argmax(-1)
            drafts = [tok]
            pos = torch.tensor(ends)
            for _ in range(1, max(limits)):
                pos_now = pos.clamp(max=self.max_len - 1).tolist()
                tok = fast.decode(self.cache, tok.tolist(), pos_now)[:, : self.vocab].argmax(-1)
                drafts.append(tok)
                pos = pos + 1
        for r, e in zip(batch, ends):
            r.spec_state = e
        cols = torch.stack(drafts, 1).tolist()
        return [row[:n] if n > 0 else [] for row, n in zip(cols, limits)]


def save_layer_draft(model_dir: str | Path, layers: int, out: Path) -> Path:
    """Write a layer-skip draft of `model_dir` to `out`: its first `layers` decoder layers with its
    own embeddings, final norm and head, and its tokenizer (so DraftProposer accepts it).

    For a model with no smaller sibling of the same tokenizer (the demo model) this is the draft
    there is; it shares the target's early computation, so its guesses are weak but real. The
    directory appears whole or not at all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsr1.fsutil import replace_dir

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):  # per-layer attention kinds, newer configs
        model.config.layer_types = model.config.layer_types[:layers]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    replace_dir(tmp, out)
    return out
