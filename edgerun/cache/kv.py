"""A contiguous KV cache per sequence.

This is the simple cache the paged KV cache will replace: one (n_kv_heads, capacity,
head_dim) float32 array per layer for keys and one for values. The arrays come from
np.zeros, i.e. calloc: pages the sequence never reaches are never touched, so a
capacity of the whole context costs only what is used.
"""
from __future__ import annotations

import numpy as np


class KVState:
    """Keys and values of one sequence. ``length`` tokens are cached."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.k = [np.zeros((n_kv_heads, capacity, head_dim), np.float32) for _ in range(n_layers)]
        self.v = [np.zeros((n_kv_heads, capacity, head_dim), np.float32) for _ in range(n_layers)]
        self.tokens: list[int] = []

    def fork(self) -> "KVState":
        """An independent copy (copies the used part of the cache)."""
        other = KVState.__new__(KVState)
        other.capacity, other.length, other.tokens = self.capacity, self.length, list(self.tokens)
        other.k = [np.zeros_like(a) for a in self.k]
        other.v = [np.zeros_like(a) for a in self.v]
        for src, dst in zip(self.k + self.v, other.k + other.v):
            dst[:, :self.length] = src[:, :self.length]
        return other

    def rollback(self, n: int) -> None:
        """Forget the last n tokens."""
        n = min(n, self.length)
        self.length -= n
        del self.tokens[len(self.tokens) - n:]

    @property
    def nbytes_used(self) -> int:
        per_tok = sum(a.shape[0] * a.shape[2] * a.itemsize for a in self.k + self.v)
        return per_tok * self.length
