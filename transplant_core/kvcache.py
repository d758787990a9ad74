"""A KV cache layer that grows into spare room instead of concatenating on every token.

transformers' `DynamicLayer` appends a decode step's keys and values with `torch.cat`,
which copies the whole cache each step: for a 300M Llama with 8 rows at ~100 positions,
48 tensors of 3 MB per step, 15% of a decode step on CPU. `SpareLayer` keeps each
layer's keys and values in buffers with room for `SPARE` more positions; a step writes
its column in place and the layer's `keys`/`values` are views of the filled part (what
attention reads, as before). When the room runs out the buffers are reallocated with
`SPARE` positions to spare again, so the copy happens once per `SPARE` steps.

The continuous batch (`transplant_core.generation.DecodeBatch`) builds these layers
itself when rows join (`assemble`: several row groups, each left-padded with zeros to
one length, one copy) or leave (`select`: the kept rows, columns from `start` on, one
copy). DynamicLayer's own methods (crop, reorder_cache, batch_select_indices, reset, ...)
still work: they replace `keys`/`values`, which the next `update` or `select` takes as the
data. Needs transformers >= 4.56 (cache layers); older versions keep `DynamicCache`.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE = 32      # positions of room: one reallocation per 32 decode steps


class SpareLayer(DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        """Over buffers [rows, heads, capacity, dim] of which the first `length` positions hold data."""
        super().__init__()
        self._use(keys, values, length)

    def _use(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        self._k, self._v, self._n = k, v, length
        self.dtype, self.device, self.is_initialized = k.dtype, k.device, True
        self.keys, self.values = self._views = k[:, :, :length], v[:, :, :length]

    @staticmethod
    def _buffer(like: torch.Tensor, rows: int, length: int) -> torch.Tensor:
        return like.new_empty((rows, like.shape[1], length + SPARE, like.shape[3]))

    @classmethod
    def assemble(cls, parts: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> "SpareLayer":
        """The rows of every (keys, values) part [rows_i, heads, length_i, dim], in order, each
        left-padded with zeros to `length` (padding is masked, but must not be NaN)."""
        return cls(*cls._stack(parts, length), length)

    @classmethod
    def _stack(cls, parts: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> list[torch.Tensor]:
        rows = sum(k.shape[0] for k, _ in parts)
        bufs = []
        for which in (0, 1):
            buf, r = cls._buffer(parts[0][which], rows, length), 0
            for part in parts:
                t = part[which]
                b, pad = t.shape[0], length - t.shape[2]
                if pad:
                    buf[r:r + b, :, :pad].zero_()
                buf[r:r + b, :, pad:length].copy_(t)
                r += b
            bufs.append(buf)
        return bufs

    def select(self, rows: list[int], start: int) -> "SpareLayer":
        """A new layer of rows `rows` (indices), positions `start` on."""
        self._sync(self._k, self._v)
        length = self._n - start
        bufs = []
        for src in (self._k, self._v):
            buf = self._buffer(src, len(rows), length)
            for j, i in enumerate(rows):
                buf[j, :, :length].copy_(src[i, :, start:self._n])
            bufs.append(buf)
        return SpareLayer(bufs[0], bufs[1], length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._sync(key_states, value_states)
        n = self._n + key_states.shape[-2]
        if n > self._k.shape[2]:
            k, v = self._buffer(self._k, self._k.shape[0], n), self._buffer(self._v, self._v.shape[0], n)
            k[:, :, :self._n].copy_(self.keys)
            v[:, :, :self._n].copy_(self.values)
            self._k, self._v = k, v
        self._k[:, :, self._n:n].copy_(key_states)
        self._v[:, :, self._n:n].copy_(value_states)
        self._use(self._k, self._v, n)
        return self.keys, self.values

    def _sync(self, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        """Where `keys`/`values` were replaced by one of transformers' own methods (crop,
        reorder_cache, batch_select_indices, batch_repeat_interleave, reset, offload,
        prefetch, all inherited from DynamicLayer), take them as the data."""
        if self.keys is self._views[0] and self.values is self._views[1]:
            return
        k, v = self.keys, self.values
        if k is None or v is None or k.numel() == 0:                 # reset: start again from nothing
            rows = like_k.shape[0]
            self._use(self._buffer(like_k, rows, 0), self._buffer(like_v, rows, 0), 0)
            return
        self._use(*self._stack([(k, v)], k.shape[2]), k.shape[2])


def cache(layers: list[SpareLayer]) -> DynamicCache:
    """A transformers cache over these layers."""
    c = DynamicCache()
    c.layers = list(layers)
    return c
