"""Prefix caching for the embedded engine: prompts that share a beginning reuse its KV.

A system prompt or the earlier turns of a chat arrive again with every request; recomputing
their keys and values is most of the time to first token. After a prompt is prefilled, its full
blocks of `block` tokens are copied out of the request's slot row into a pool; a later prompt
whose first blocks carry the same tokens gets them copied back into its row and computes only
the rest (the scheme of vLLM's automatic prefix caching: blocks keyed by their tokens and by
everything before them, least recently used evicted first).

The pool is a fixed allocation beside the slot cache (`budget_bytes`), so memory stays bounded;
a block matches when its own tokens are equal and the 64-bit hash of its whole prefix is (as
vLLM's default hashing; a collision is as likely as 2^-64 per lookup), and at least one prompt
token is always computed, because the first output token needs its logits.
"""

from __future__ import annotations

import collections

import torch


class PrefixCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, devices: list[torch.device],
                 *, budget_bytes: int, block: int = 64):
        self.block = block
        per_block = 2 * layers * kv_heads * block * head_dim * torch.empty(0, dtype=dtype).element_size()
        self.capacity = max(0, budget_bytes // per_block)
        self.k = [torch.empty(self.capacity, kv_heads, block, head_dim, dtype=dtype, device=d) for d in devices]
        self.v = [torch.empty(self.capacity, kv_heads, block, head_dim, dtype=dtype, device=d) for d in devices]
        # (parent key, block tokens) -> pool index; ordered oldest use first
        self._index: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        self._free = list(range(self.capacity - 1, -1, -1))
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _keys(self, tokens: list[int], blocks: int):
        parent = None
        for i in range(blocks):
            key = (hash(parent), tuple(tokens[i * self.block : (i + 1) * self.block]))
            yield key
            parent = key

    def match(self, tokens: list[int]) -> list[int]:
        """Pool indices of the longest cached prefix of `tokens`, leaving at least one token."""
        if not self.capacity:
            return []
        hits = []
        for key in self._keys(tokens, (len(tokens) - 1) // self.block):
            idx = self._index.get(key)
            if idx is None:
                break
            self._index.move_to_end(key)
            hits.append(idx)
        return hits

    def load(self, cache, row: int, hits: list[int], prompt_tokens: int) -> int:
        """Copy the matched blocks into positions 0.. of cache row `row`; returns the tokens loaded.
        Counts the lookup for the hit rate (`prompt_tokens` asked, the returned number found)."""
        n = len(hits) * self.block
        if hits:
            idx = torch.tensor(hits, device=self.k[0].device)
            for li, (ck, cv) in enumerate(zip(cache.k, cache.v)):
                src_k = self.k[li].index_select(0, idx.to(ck.device))  # [h, kv, B, d]
                src_v = self.v[li].index_select(0, idx.to(cv.device))
                ck[row, :, :n] = src_k.permute(1, 0, 2, 3).reshape(ck.shape[1], n, -1)
                cv[row, :, :n] = src_v.permute(1, 0, 2, 3).reshape(cv.shape[1], n, -1)
        self.queried_tokens += prompt_tokens
        self.hit_tokens += n
        return n

    def count_miss(self, prompt_tokens: int) -> None:
        """A prompt prefilled from scratch (nothing matched): asked for, none found."""
        self.queried_tokens += prompt_tokens

    def store_rows(self, cache, rows: list[tuple[int, list[int]]]) -> None:
        """Keep the full blocks of prompts just prefilled, each (cache row, its tokens): every new block of
        all of them in one copy per layer for K and one for V, not one per block and layer (960 for a burst
        of four 256-token prompts on the demo model: 17-20 ms; this 11-16 ms, 2-core Xeon; the scheduler
        makes it after their first tokens).
        Why not huge pages for the pool, whose first writes fault per 4 KiB: with them the copy took 11 ms
        but now and then 250-280 ms, the kernel compacting memory for a 2 MiB page (THP defrag `madvise`)."""
        if not self.capacity:
            return
        dst: dict[int, tuple[int, int]] = {}  # pool slot -> (cache row, first position)
        for row, tokens in rows:
            for i, key in enumerate(self._keys(tokens, len(tokens) // self.block)):
                if key in self._index:
                    self._index.move_to_end(key)
                    continue
                if self._free:
                    idx = self._free.pop()
                else:  # evict the least recently used block (a child of it just becomes unreachable)
                    _, idx = self._index.popitem(last=False)
                # a pool smaller than what is stored evicts blocks stored a moment ago: a slot's last writer wins
                dst[idx] = (row, i * self.block)
                self._index[key] = idx
        if not dst:
            return
        B = self.block
        slots = torch.tensor(list(dst))
        where = torch.tensor(list(dst.values()))  # [n, 2]: (row, first position) of each block
        r = where[:, 0, None].expand(-1, B)  # [n, B]
        p = where[:, 1, None] + torch.arange(B)  # [n, B]
        for li, (ck, cv) in enumerate(zip(cache.k, cache.v)):
            for pool, src in ((self.k[li], ck), (self.v[li], cv)):
                # [n, B, kv, d] (the two indexed dimensions first) -> the pool's [n, kv, B, d]
                part = src[r.to(src.device), :, p.to(src.device)].transpose(1, 2)
                pool.index_copy_(0, slots.to(pool.device), part.to(pool.device))

    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
