"""The rollout KV cache: a fixed slot per sequence, a ring buffer on sliding-window layers.

Own code (not transformers' DynamicCache/StaticCache): the engine needs one preallocated tensor per layer
whose slots it can hand out, copy (prompt sharing) and move (compaction) while other sequences keep
decoding, with static shapes for CUDA graphs.

Layout per layer: keys/values [num_slots, kv_heads, capacity, head_dim], keys stored after RoPE.
- full-attention layers: capacity = max_len; the key of position p sits at index p.
- sliding-window layers: capacity = min(sliding_window, max_len); position p sits at index p % capacity,
  so the buffer always holds the last `capacity` positions -- exactly the keys a window of
  `sliding_window` lets a query see (query i attends key j iff i - j < sliding_window).
Which positions a ring holds is a function of the sequence length alone (`ring_positions`), so no
per-entry bookkeeping is stored.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        layer_types: list[str],
        sliding_window: int,
        num_kv_heads: int,
        head_dim: int,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"KVCache: num_slots and max_len must be >= 1, got {num_slots}, {max_len}")
        unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise ValueError(f"KVCache: unknown layer types {unknown}")
        self.num_slots, self.max_len = num_slots, max_len
        self.windows = [sliding_window if t == "sliding_attention" else None for t in layer_types]
        self.capacity = [max_len if w is None else min(w, max_len) for w in self.windows]
        shape = lambda cap: (num_slots, num_kv_heads, cap, head_dim)
        try:
            self.keys = [torch.zeros(shape(c), dtype=dtype, device=device) for c in self.capacity]
            self.values = [torch.zeros(shape(c), dtype=dtype, device=device) for c in self.capacity]
        except torch.OutOfMemoryError as e:
            need = self.bytes_for(layer_types, sliding_window, num_kv_heads, head_dim, num_slots, max_len, dtype)
            raise torch.OutOfMemoryError(
                f"KVCache: {num_slots} slots x {max_len} tokens need {need / 2**30:.2f} GiB; lower "
                f"rollout.max_batch or the phase's seq_len ({e})"
            ) from None

    @staticmethod
    def bytes_for(layer_types, sliding_window, num_kv_heads, head_dim, num_slots, max_len, dtype) -> int:
        per_token = 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        tokens = sum(max_len if t == "full_attention" else min(sliding_window, max_len) for t in layer_types)
        return num_slots * tokens * per_token

    def is_ring(self, layer: int) -> bool:
        return self.windows[layer] is not None

    def index_of(self, layer: int, positions: Tensor) -> Tensor:
        """Buffer index of each position on `layer`."""
        return positions % self.capacity[layer] if self.is_ring(layer) else positions

    def ring_positions(self, layer: int, lengths: Tensor) -> Tensor:
        """[B, capacity]: the position held by each ring entry of a sequence of `lengths[b]` cached
        tokens, -1 where the entry holds none yet. Entry r holds the latest position < length that is
        congruent to r modulo the capacity."""
        cap = self.capacity[layer]
        r = torch.arange(cap, device=lengths.device)
        last = lengths[:, None] - 1
        held = last - torch.remainder(last - r, cap)
        return torch.where(held >= 0, held, torch.full_like(held, -1))

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Give slot `dst` the cached keys/values of the first `length` positions of slot `src`."""
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            n = self.capacity[layer] if self.is_ring(layer) else length
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
