"""Speculative decoding by prompt lookup (n-gram drafts), greedy-exact.

Reasoning models repeat themselves: R1 quotes the question, restates numbers, copies code from
the prompt. Prompt lookup (Saxena 2023; vLLM's `ngram` method) proposes, for each running
request, the tokens that followed the last earlier occurrence of its newest 1-3 tokens in its
own prompt and output. One forward then checks the proposal: the model's greedy choice at every
drafted position is computed at once, drafted tokens are kept while they equal it, and the first
disagreement is replaced by the model's own token. Output is therefore token for token what
plain greedy decoding gives; only the number of forwards changes. Requests that sample
(temperature > 0) are not drafted for and take their one token from the same forward.
"""

from __future__ import annotations


class NgramProposer:
    """Per-request index of n-grams (n = 1..max_n) to the end of their latest occurrence."""

    def __init__(self, k: int = 4, max_n: int = 3):
        self.k = k
        self.max_n = max_n

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
