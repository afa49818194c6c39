"""Attention over a paged KV cache: keys and values live in fixed-size blocks of a pool,
found through the sequence's block table.

    q, out      (T, n_heads, head_dim)          the new queries, at positions start .. start+T-1
    k_pool      (n_blocks, n_kv_heads, block, head_dim), v_pool the same
    table       (n_logical,) int32               logical block -> physical block

One kernel serves decode (T = 1) and prefill: work items are (kv head, tile of queries), so
each K/V block is read once for every query head sharing it (GQA) and every query of the
tile; the softmax is online, one rescale per block (flash-attention style), and no (T, L)
score matrix exists. A window w > 0 limits query p to keys (p - w, p]; softcap > 0 applies
softcap * tanh(score / softcap) (Gemma 2 style).

int8 KV: the pools hold int8 and k_scale / v_scale (n_blocks, n_kv_heads, block) one float32
scale per token per head (quantized=True); a float32 pool passes quantized=False and
scales of shape (1, 1, 1), never read.
"""
import numpy as np
from numba import njit, prange

from ._common import FASTMATH, JIT

Q_TILE = 8


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def paged_attention(q, k_pool, v_pool, k_scale, v_scale, quantized, table, start, scale, window, softcap, out):
    T, H, d = q.shape
    n_kv, bs = k_pool.shape[1], k_pool.shape[2]
    group = H // n_kv
    n_tiles = (T + Q_TILE - 1) // Q_TILE
    for job in prange(n_kv * n_tiles):
        kv = job // n_tiles
        t0 = (job % n_tiles) * Q_TILE
        nt = min(T, t0 + Q_TILE) - t0
        rows = nt * group
        m = np.full(rows, -np.inf, np.float32)
        den = np.zeros(rows, np.float32)
        acc = np.zeros((rows, d), np.float32)
        s = np.empty((rows, bs), np.float32)
        p_first, p_last = start + t0, start + t0 + nt - 1
        k_lo = 0 if window <= 0 else max(0, p_first - window + 1)
        for lb in range(k_lo // bs, p_last // bs + 1):
            b = table[lb]
            kb = k_pool[b, kv]                     # (bs, d)
            vb = v_pool[b, kv]
            for qi in range(nt):
                p = start + t0 + qi
                lo = 0 if window <= 0 else p - window + 1
                for hh in range(group):
                    r = qi * group + hh
                    qv = q[t0 + qi, kv * group + hh]
                    mb = np.float32(-np.inf)
                    for j in range(bs):
                        pos = lb * bs + j
                        if pos > p or pos < lo:
                            s[r, j] = -np.inf
                            continue
                        kr = kb[j]
                        x = np.float32(0.0)
                        for c in range(d):
                            x += qv[c] * np.float32(kr[c])
                        x *= scale
                        if quantized:
                            x *= k_scale[b, kv, j]
                        if softcap > 0:
                            x = softcap * np.tanh(x / softcap)
                        s[r, j] = x
                        mb = max(mb, x)
                    if mb == -np.inf:
                        continue
                    if mb > m[r]:
                        corr = np.float32(np.exp(m[r] - mb))
                        den[r] *= corr
                        for c in range(d):
                            acc[r, c] *= corr
                        m[r] = mb
                    ar = acc[r]
                    for j in range(bs):
                        if s[r, j] == -np.inf:
                            continue
                        e = np.float32(np.exp(s[r, j] - m[r]))
                        den[r] += e
                        vr = vb[j]
                        if quantized:
                            e *= v_scale[b, kv, j]
                        for c in range(d):
                            ar[c] += e * np.float32(vr[c])
        for qi in range(nt):
            for hh in range(group):
                r = qi * group + hh
                o = out[t0 + qi, kv * group + hh]
                for c in range(d):
                    o[c] = acc[r, c] / den[r]


@njit(**JIT)
def store_kv_paged(k, v, k_pool, v_pool, table, start):
    """Write new keys/values (T, n_kv, d) at positions start.. through the block table."""
    T, n_kv, d = k.shape
    bs = k_pool.shape[2]
    for t in range(T):
        b = table[(start + t) // bs]
        j = (start + t) % bs
        for h in range(n_kv):
            k_pool[b, h, j] = k[t, h]
            v_pool[b, h, j] = v[t, h]


@njit(**JIT)
def store_kv_paged_int8(k, v, k_pool, v_pool, k_scale, v_scale, table, start):
    """Quantize new keys/values (T, n_kv, d) per token and head (absmax / 127) into int8 pools."""
    T, n_kv, d = k.shape
    bs = k_pool.shape[2]
    for t in range(T):
        b = table[(start + t) // bs]
        j = (start + t) % bs
        for h in range(n_kv):
            _quantize_row(k[t, h], k_pool[b, h, j], k_scale, b, h, j)
            _quantize_row(v[t, h], v_pool[b, h, j], v_scale, b, h, j)


@njit(inline="always")
def _quantize_row(x, q, scales, b, h, j):
    amax = np.float32(0.0)
    for c in range(x.shape[0]):
        amax = max(amax, abs(x[c]))
    s = amax / np.float32(127.0)
    scales[b, h, j] = s
    inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
    for c in range(x.shape[0]):
        q[c] = np.int8(min(127.0, max(-127.0, np.rint(x[c] * inv))))


def gather_ref(pool, table, length, scales=None):
    """NumPy: the (length, n_kv, d) keys or values of a sequence, in position order."""
    bs = pool.shape[2]
    if scales is not None:
        pool = pool.astype(np.float32) * scales[..., None]
    blocks = [pool[table[i]].transpose(1, 0, 2) for i in range(-(-length // bs))]   # (bs, n_kv, d) each
    return np.concatenate(blocks, axis=0)[:length]
