"""A slot KV cache that the scheduler owns, plugged into transformers' attention.

Every running request owns one row ("slot") of a fixed [slots, kv_heads, max_len,
head_dim] buffer per layer, allocated once at start-up, so memory is bounded by
`slots x max_len` and never grows under load. transformers' attention layers call
`cache.update(k, v, layer_idx)` and attend over what it returns; we write the new
keys/values at each row's own position and return the rows and columns in use.

Why not transformers' own caches: DynamicCache needs left padding and re-padding
whenever a request joins, and its continuous-batching paged cache sizes itself as
0.6 x system RAM unless told otherwise (issue 4). This class is the only place
that knows the cache layout.
"""

from __future__ import annotations

import torch


class SlotCache:
    """Duck-typed `transformers.Cache`: only `update` and `get_seq_length` are used
    when the caller passes position_ids and a prepared attention mask."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, devices: list[torch.device]):
        self.slots, self.max_len, self.layers = slots, max_len, layers
        # zeros, not empty: masked-out columns are still multiplied, and garbage NaNs
        # would survive an additive -inf mask.
        # One column more than any request uses: the longest span attended is then still a strict slice
        # of a row, so one compiled step (dsr1.serve.aotstep) covers every span with one layout.
        self.k = [torch.zeros(slots, kv_heads, max_len + 1, head_dim, dtype=dtype, device=d) for d in devices]
        self.v = [torch.zeros(slots, kv_heads, max_len + 1, head_dim, dtype=dtype, device=d) for d in devices]
        self._mode = "decode"
        self._rows = 0
        self._pos: torch.Tensor | None = None
        self._span = 0
        self._slot = 0
        self._start = 0

    # -- set by the model runner before each forward -------------------------------------------
    def for_decode(self, rows: int, positions: torch.Tensor, span: int) -> None:
        """Rows 0..rows-1 each append one token at `positions[i]`; attend over `span` columns."""
        self._mode, self._rows, self._pos, self._span = "decode", rows, positions, span

    def for_prefill(self, slot: int, start: int) -> None:
        """One row appends a chunk of prompt tokens at `start`."""
        self._mode, self._slot, self._start = "prefill", slot, start

    def for_prefill_rows(self, first: int, rows: int) -> None:
        """Rows first..first+rows-1 each get a whole (right-padded) prompt from position 0."""
        self._mode, self._slot, self._rows = "rows", first, rows

    # -- transformers' Cache protocol ------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self._mode == "decode":
            n = self._rows
            rows = torch.arange(n, device=k.device)
            pos = self._pos.to(k.device)
            k[rows, :, pos] = key_states[:, :, 0].to(k.dtype)
            v[rows, :, pos] = value_states[:, :, 0].to(v.dtype)
            return k[:n, :, : self._span], v[:n, :, : self._span]
        if self._mode == "rows":
            a, b = self._slot, self._slot + self._rows
            L = key_states.shape[2]
            k[a:b, :, :L] = key_states.to(k.dtype)
            v[a:b, :, :L] = value_states.to(v.dtype)
            return k[a:b, :, :L], v[a:b, :, :L]
        s, a = self._slot, self._start
        b = a + key_states.shape[2]
        k[s, :, a:b] = key_states[0].to(k.dtype)
        v[s, :, a:b] = value_states[0].to(v.dtype)
        return k[s : s + 1, :, :b], v[s : s + 1, :, :b]

    # -- slot bookkeeping ----------------------------------------------------------------------
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (compaction)."""
        if src == dst or length <= 0:
            return
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    @property
    def capacity_tokens(self) -> int:
        return self.slots * self.max_len

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)  # what was allocated
