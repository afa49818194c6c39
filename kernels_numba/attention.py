"""Causal attention of T new queries against a sequence's cached keys and values.

Keys and values live in a contiguous per-layer cache (n_kv_heads, capacity, head_dim)
until the paged KV cache lands; positions [0, start + T) are valid. GQA: query head h
reads kv head h // (n_heads // n_kv_heads). A window w > 0 limits query p to keys
(p - w, p]. Softmax is computed in one pass with a running max (online softmax), so
no (T, L) score matrix is ever built.
"""
import numpy as np
from numba import njit, prange

from ._common import FASTMATH, JIT


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def attention(q, k_cache, v_cache, start, scale, window, out):
    """q, out: (T, n_heads, head_dim); k_cache, v_cache: (n_kv_heads, capacity, head_dim)."""
    T, H, d = q.shape
    group = H // k_cache.shape[0]
    for th in prange(T * H):
        t = th // H
        h = th % H
        kv = h // group
        p = start + t
        lo = 0 if window <= 0 else max(0, p - window + 1)
        m = -np.inf
        denom = np.float32(0.0)
        acc = np.zeros(d, np.float32)
        for s in range(lo, p + 1):
            score = np.float32(0.0)
            for j in range(d):
                score += q[t, h, j] * k_cache[kv, s, j]
            score *= scale
            if score > m:
                corr = np.float32(np.exp(m - score))
                denom *= corr
                for j in range(d):
                    acc[j] *= corr
                m = score
            e = np.float32(np.exp(score - m))
            denom += e
            for j in range(d):
                acc[j] += e * v_cache[kv, s, j]
        for j in range(d):
            out[t, h, j] = acc[j] / denom


@njit(parallel=True, **JIT)
def store_kv(k, v, k_cache, v_cache, start):
    """Copy the new keys/values (T, n_kv_heads, head_dim) into the caches at [start, start + T)."""
    T, Hk, d = k.shape
    for h in prange(Hk):
        for t in range(T):
            for j in range(d):
                k_cache[h, start + t, j] = k[t, h, j]
                v_cache[h, start + t, j] = v[t, h, j]


def attention_ref(q, k, v, start, scale, window=0):
    """NumPy twin: q (T, H, d); k, v (L, Hk, d) holding positions 0..L-1, L = start + T."""
    T, H, d = q.shape
    L, Hk, _ = k.shape
    kk = np.repeat(k.astype(np.float64), H // Hk, axis=1)        # (L, H, d)
    vv = np.repeat(v.astype(np.float64), H // Hk, axis=1)
    s = np.einsum("thd,lhd->htl", q.astype(np.float64), kk) * scale
    pos_q = start + np.arange(T)[:, None]
    pos_k = np.arange(L)[None, :]
    mask = pos_k <= pos_q
    if window > 0:
        mask &= pos_k > pos_q - window
    s = np.where(mask[None], s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.einsum("htl,lhd->thd", s, vv).astype(np.float32)
