"""Paged KV cache: one preallocated pool of fixed-size blocks, block tables per sequence.

    pool.k, pool.v      (n_layers, n_blocks, n_kv_heads, block_size, head_dim) float32
    state.tables[g]     logical block i of the sequence -> physical block in pool g (-1: freed)

Layers are grouped by their attention window (0 = full attention); each group has its own
pool, so the blocks of a windowed group can be freed as decoding moves past the window
while the full-attention layers keep theirs (Gemma 3's 5 local : 1 global layers).

Blocks are reference-counted: ``fork`` shares every block, and a write into a shared block
copies it first (copy-on-write; only a sequence's last, partly filled block is ever written).
A full block is registered in its pool's prefix cache under a hash of its tokens and of
everything before it; a new sequence whose prompt starts with cached blocks reuses them and
skips their prefill. Freed blocks that carry a hash stay cached until the pool needs them
(least recently used first). When no block is left, ``KVCacheFullError`` says how much
memory the cache has and how to raise it.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..errors import EdgerunError, InputError

DEFAULT_BLOCK = 16


class KVCacheFullError(EdgerunError):
    """The KV pool has no free block left (raise max_kv_bytes / --kv-memory, or run fewer sequences)."""


def _lazy_zeros(shape, dtype) -> np.ndarray:
    """np.zeros whose pages stay 4 KiB: NumPy asks for transparent huge pages on every array over
    4 MiB, and then a sequence's first KV block in each layer commits and zero-fills 2 MiB
    (measured on SmolLM2: +236 MB RSS and 0.55 s of kernel time for the first token). KV blocks
    are filled a few KiB at a time, so the pool opts out (MADV_NOHUGEPAGE) before any page is
    touched."""
    a = np.zeros(shape, dtype)
    if a.nbytes >= 4 << 20:
        _no_huge_pages(a)
    return a


def _no_huge_pages(a: np.ndarray) -> None:
    import ctypes
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    start = -(-a.ctypes.data // 4096) * 4096                  # the whole pages inside the array
    end = (a.ctypes.data + a.nbytes) // 4096 * 4096
    if end > start:
        madvise(start, end - start, 15)                       # MADV_NOHUGEPAGE; harmless if refused


class BlockPool:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, block_size: int, n_blocks: int,
                 dtype: str = "f32"):
        shape = (n_layers, n_blocks, n_kv_heads, block_size, head_dim)
        # np.zeros maps untouched pages lazily: an unused pool costs address space, not memory
        self.k = _lazy_zeros(shape, np.int8 if dtype == "int8" else np.float32)
        self.v = _lazy_zeros(shape, self.k.dtype)       # not zeros_like: that writes every page
        # int8 blocks: one float32 scale per token per head; float pools carry a (1, 1, 1) stand-in
        sshape = shape[:-1] if dtype == "int8" else (n_layers, 1, 1, 1)
        self.k_scale = np.zeros(sshape, np.float32)
        self.v_scale = np.zeros(sshape, np.float32)
        self.block_size, self.n_blocks = block_size, n_blocks
        self.refs = np.zeros(n_blocks, np.int32)
        self.free = list(range(n_blocks - 1, -1, -1))    # a stack: recently freed (warm) blocks first
        self.cached: OrderedDict[int, int] = OrderedDict()  # hash -> block, for free blocks still holding KV
        self.hash_of: dict[int, int] = {}                 # block -> hash, for every registered block
        self.by_hash: dict[int, int] = {}                 # hash -> block, registered blocks (live or cached)
        self.hits = self.queries = 0

    @property
    def bytes_per_block(self) -> int:
        scales = 2 * self.k_scale[:, 0].nbytes if self.k.dtype == np.int8 else 0
        return 2 * self.k[:, 0].nbytes + scales

    @property
    def used_blocks(self) -> int:
        return int((self.refs > 0).sum())

    def allocate(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.cached:
            h, b = self.cached.popitem(last=False)        # evict the least recently used cached block
            self.by_hash.pop(h, None)
            self.hash_of.pop(b, None)
        else:
            raise KVCacheFullError(
                f"KV cache is full: all {self.n_blocks} blocks of {self.block_size} tokens "
                f"({self.n_blocks * self.bytes_per_block / 2**20:.0f} MiB) are in use; "
                f"raise max_kv_bytes (--kv-memory) or run fewer/shorter sequences")
        self.refs[b] = 1
        return b

    def retain(self, b: int) -> None:
        self.refs[b] += 1

    def release(self, b: int) -> None:
        self.refs[b] -= 1
        if self.refs[b] == 0:
            h = self.hash_of.get(b)
            if h is None:
                self.free.append(b)
            else:
                self.cached[h] = b

    def register(self, b: int, h: int) -> None:
        """Block b now holds the full block whose prefix hash is h."""
        if h in self.by_hash or b in self.hash_of:
            return
        self.by_hash[h], self.hash_of[b] = b, h

    def unregister(self, b: int) -> None:
        """Block b leaves the prefix cache (its release then returns it to the free list)."""
        h = self.hash_of.pop(b, None)
        if h is not None:
            self.by_hash.pop(h, None)

    def lookup(self, h: int) -> int | None:
        """A block holding the prefix h, retained for the caller; None if not cached."""
        self.queries += 1
        b = self.by_hash.get(h)
        if b is None:
            return None
        self.hits += 1
        if self.refs[b] == 0:
            del self.cached[h]
        self.refs[b] += 1
        return b

    def copy_block(self, src: int) -> int:
        dst = self.allocate()
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        if self.k.dtype == np.int8:
            self.k_scale[:, dst] = self.k_scale[:, src]
            self.v_scale[:, dst] = self.v_scale[:, src]
        return dst


class PagedKV:
    """The KV pools of one model: one per group of layers sharing an attention window."""

    def __init__(self, windows: list[int], n_kv_heads: int, head_dim: int, max_context: int,
                 max_kv_bytes: int | None = None, block_size: int = DEFAULT_BLOCK,
                 free_out_of_window: bool = True, dtype: str = "f32"):
        if block_size <= 0:
            raise InputError(f"block_size must be positive, got {block_size}")
        if dtype not in ("f32", "int8"):
            raise InputError(f"KV cache dtype must be f32 or int8, got {dtype!r}")
        self.dtype = dtype
        self.block_size, self.max_context = block_size, max_context
        self.free_out_of_window = free_out_of_window     # False: keep every block (to measure the saving)
        self.windows = list(windows)
        self.group_windows = sorted(set(windows))
        # layer -> (its group, its index among the group's layers)
        self.layer_slot = [(self.group_windows.index(w), windows[:j].count(w)) for j, w in enumerate(windows)]
        per_token = head_dim * 4 if dtype == "f32" else head_dim + 4          # int8 values + a float32 scale
        per_block = [2 * windows.count(w) * n_kv_heads * block_size * per_token for w in self.group_windows]
        ctx_blocks = -(-max_context // block_size)
        if max_kv_bytes is None:
            # default: one sequence of the full context in every group. The pools are mapped lazily
            # and freed blocks are reused first, so a windowed group touches only about
            # window + one prefill chunk of it.
            blocks = [ctx_blocks] * len(self.group_windows)
        else:
            share = max_kv_bytes / sum(per_block)                    # same block count in every group
            blocks = [max(int(share), 1)] * len(self.group_windows)
        self.pools = [BlockPool(windows.count(w), n_kv_heads, head_dim, block_size, n, dtype)
                      for w, n in zip(self.group_windows, blocks)]

    def new_state(self) -> "PagedState":
        return PagedState(self)

    @property
    def nbytes(self) -> int:
        return sum(p.n_blocks * p.bytes_per_block for p in self.pools)

    def stats(self) -> dict:
        bs = self.block_size
        return {"block_size": bs, "blocks": [p.n_blocks for p in self.pools],
                "used_blocks": [p.used_blocks for p in self.pools],
                "prefix_hits": sum(p.hits for p in self.pools), "prefix_queries": sum(p.queries for p in self.pools)}


def _block_hash(parent: int, tokens) -> int:
    return hash((parent, tuple(tokens)))


class PagedState:
    """One sequence's view of the paged KV cache."""

    def __init__(self, kv: PagedKV):
        self.kv = kv
        self.length = 0
        self.tokens: list[int] = []
        self.tables = [np.full(16, -1, np.int32) for _ in kv.pools]
        self.hashes: list[int] = []          # prefix hash of each full logical block

    # ---- what the attention kernels see
    def layer(self, layer: int):
        """(k pool, v pool, k scales, v scales, block table) of a layer:
        (n_blocks, n_kv, block, head_dim) x2, (n_blocks, n_kv, block) x2 (int8) or (1, 1, 1), (n_logical,)."""
        g, i = self.kv.layer_slot[layer]
        pool = self.kv.pools[g]
        return pool.k[i], pool.v[i], pool.k_scale[i], pool.v_scale[i], self.tables[g]

    @property
    def n_logical(self) -> int:
        return -(-self.length // self.kv.block_size)

    # ---- growth
    def reserve(self, n_new: int) -> None:
        """Blocks for positions [length, length + n_new) in every group; copy shared ones first."""
        bs = self.kv.block_size
        first, last = self.length // bs, (self.length + n_new - 1) // bs
        for g, pool in enumerate(self.kv.pools):
            t = self._table(g, last + 1)
            for lb in range(first, last + 1):
                b = t[lb]
                if b < 0:
                    t[lb] = pool.allocate()
                elif pool.refs[b] > 1:                  # shared with a fork: copy before writing
                    t[lb] = pool.copy_block(b)
                    pool.release(b)
                elif b in pool.hash_of:                 # rewriting a registered block (after a rollback)
                    pool.by_hash.pop(pool.hash_of.pop(b), None)

    def _table(self, g: int, n: int) -> np.ndarray:
        t = self.tables[g]
        if n > t.size:
            grown = np.full(max(n, 2 * t.size), -1, np.int32)
            grown[:t.size] = t
            self.tables[g] = t = grown
        return t

    def advance(self, ids) -> None:
        """After the model wrote ids' keys and values: count them, register full blocks, free
        blocks that every layer of a windowed group has moved past."""
        bs = self.kv.block_size
        self.tokens.extend(ids)
        self.length += len(ids)
        while len(self.hashes) < self.length // bs:
            i = len(self.hashes)
            h = _block_hash(self.hashes[-1] if self.hashes else 0, self.tokens[i * bs:(i + 1) * bs])
            self.hashes.append(h)
            for g, pool in enumerate(self.kv.pools):
                if self.tables[g][i] >= 0:
                    pool.register(int(self.tables[g][i]), h)
        for g, w in enumerate(self.kv.group_windows):
            if w and self.kv.free_out_of_window:
                # the next query sits at position length and sees keys > length - w
                dead = max(0, (self.length - w + 1) // bs)
                t, pool = self.tables[g], self.kv.pools[g]
                for lb in range(dead):
                    if t[lb] >= 0:
                        # not kept for prefix reuse: the next allocation takes this (warm) block back
                        # instead of touching a fresh one, which is what bounds the memory
                        pool.unregister(int(t[lb]))
                        pool.release(int(t[lb]))
                        t[lb] = -1

    def match_prefix(self, ids: list[int]) -> int:
        """Reuse cached blocks for a prompt given to an empty state; returns how many of its tokens
        are already in the cache (whole blocks, always leaving at least one token to compute)."""
        if self.length:
            return 0
        bs, n, parent = self.kv.block_size, 0, 0
        while (n + 1) * bs < len(ids):
            h = _block_hash(parent, ids[n * bs:(n + 1) * bs])
            if not all(h in p.by_hash for p in self.kv.pools):
                break
            for g, pool in enumerate(self.kv.pools):
                self._table(g, n + 1)[n] = pool.lookup(h)
            self.hashes.append(h)
            parent, n = h, n + 1
        self.length = n * bs
        self.tokens = list(ids[:self.length])
        if n:
            self.advance([])             # frees windowed blocks the matched prefix has moved past
        return self.length

    # ---- fork, rollback, release
    def fork(self) -> "PagedState":
        """A new sequence sharing every block of this one (copy-on-write)."""
        other = PagedState(self.kv)
        other.length, other.tokens, other.hashes = self.length, list(self.tokens), list(self.hashes)
        other.tables = [t.copy() for t in self.tables]
        for g, pool in enumerate(self.kv.pools):
            for b in other.tables[g][:self.n_logical]:
                if b >= 0:
                    pool.retain(int(b))
        return other

    def rollback(self, n: int) -> None:
        """Forget the last n tokens (their blocks are reused or released)."""
        if n < 0 or n > self.length:
            raise InputError(f"cannot roll back {n} tokens of a {self.length}-token sequence")
        bs = self.kv.block_size
        target = self.length - n
        if any(w and target < self.length - w for w in self.kv.group_windows):
            raise InputError(f"cannot roll back {n} tokens: windowed layers keep only their last "
                             f"{min(w for w in self.kv.group_windows if w)} tokens")
        keep = -(-target // bs)
        for g, pool in enumerate(self.kv.pools):
            t = self.tables[g]
            for lb in range(keep, self.n_logical):
                if t[lb] >= 0:
                    pool.release(int(t[lb]))
                    t[lb] = -1
        self.length = target
        del self.tokens[target:]
        del self.hashes[target // bs:]

    def release(self) -> None:
        """Give every block back to the pool (the state is empty afterwards)."""
        for g, pool in enumerate(self.kv.pools):
            t = self.tables[g]
            for lb in range(self.n_logical):
                if t[lb] >= 0:
                    pool.release(int(t[lb]))
            t[:] = -1
        self.length, self.tokens, self.hashes = 0, [], []

    def __del__(self):
        try:
            self.release()
        except Exception:        # interpreter shutdown: the pools may be gone already
            pass

    @property
    def nbytes(self) -> int:
        """KV memory this sequence holds (its blocks)."""
        return sum(int((t[:self.n_logical] >= 0).sum()) * p.bytes_per_block
                   for t, p in zip(self.tables, self.kv.pools))
