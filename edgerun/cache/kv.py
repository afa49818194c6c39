"""A contiguous KV cache per sequence.

This is the simple cache the paged KV cache will replace: one (n_kv_heads, capacity,
head_dim) float32 array per layer for keys and one for values. Capacity starts small
and doubles as the sequence grows (up to the model's context), so a short chat does
not hold a whole context's worth of memory: numpy backs large arrays with huge pages,
so even untouched-looking zeros cost 2 MiB per head once a single token lands there.
"""
from __future__ import annotations

import numpy as np

INITIAL_CAPACITY = 256


class KVState:
    """Keys and values of one sequence. ``length`` tokens are cached."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_context: int,
                 capacity: int = INITIAL_CAPACITY):
        self.max_context = max_context
        self.capacity = min(capacity, max_context)
        self.length = 0
        self.tokens: list[int] = []
        shape = (n_kv_heads, self.capacity, head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(n_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(n_layers)]

    def reserve(self, n_new: int) -> None:
        """Make room for n_new more tokens (the caller has checked the context limit)."""
        need = self.length + n_new
        if need <= self.capacity:
            return
        cap = min(max(need, 2 * self.capacity), self.max_context)
        for arrays in (self.k, self.v):
            for i, a in enumerate(arrays):
                b = np.zeros((a.shape[0], cap, a.shape[2]), np.float32)
                b[:, :self.length] = a[:, :self.length]
                arrays[i] = b
        self.capacity = cap

    def fork(self) -> "KVState":
        """An independent copy of this sequence's state."""
        other = KVState.__new__(KVState)
        other.max_context, other.capacity = self.max_context, self.capacity
        other.length, other.tokens = self.length, list(self.tokens)
        other.k = [a.copy() for a in self.k]
        other.v = [a.copy() for a in self.v]
        return other

    def rollback(self, n: int) -> None:
        """Forget the last n tokens."""
        n = min(n, self.length)
        self.length -= n
        del self.tokens[len(self.tokens) - n:]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)
