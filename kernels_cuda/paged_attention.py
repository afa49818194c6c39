"""Attention over the paged KV cache on the GPU (layouts as in kernels_numba/paged_attention.py).

    q, out      (T, n_heads, head_dim)          queries at positions start .. start+T-1
    k_pool      (n_blocks, n_kv_heads, block, head_dim), v_pool the same (float32)
    table       (n_logical,) int32               logical block -> physical block

paged_attention: one block of 4 warps per (query, head), for decode (T = 1) and prefill
alike. Each warp takes chunks of 32 keys, one key per lane (the lane reads the key row and
dots it with q from shared memory), so a chunk's scores come at once; the warp keeps an
online softmax (running max, sum and a head_dim accumulator spread over its lanes), and
the 4 warps are merged at the end. A window w > 0 limits query p to keys (p - w, p].

rope_store: the step between the fused QKV matmul and attention: QK-norm (when the
model has it), RoPE on q and k, and k, v written into their blocks, one launch for every
head of every token.
"""
import math

import numpy as np
from numba import cuda

from ._launch import go
from ._common import F32, device, warp_max, warp_sum

ATT_WARPS = 4
MAX_HEAD_DIM = 256
ATT_THREADS = ATT_WARPS * 32
PS_SHAPE, ACC_SHAPE, ACC_LOCAL = (ATT_WARPS, 32), (ATT_WARPS, MAX_HEAD_DIM), MAX_HEAD_DIM // 32


@cuda.jit(fastmath=True)
def rope_store_kernel(qkv, n_heads, q_norm, k_norm, eps, start, inv_freq, rope_scale, k_pool, v_pool, table, q_out):
    """qkv (T, (H + 2 KV) * d) -> q_out (T, H, d) normed and rotated; k (normed, rotated) and v into the pools.
    Grid (T, H + KV), one warp each."""
    sh = cuda.shared.array(MAX_HEAD_DIM, F32)
    red = cuda.shared.array(32, F32)
    t, hh = cuda.blockIdx.x, cuda.blockIdx.y
    lane = cuda.threadIdx.x
    H = n_heads
    n_kv, bs, d = k_pool.shape[1], k_pool.shape[2], k_pool.shape[3]
    p = start + t
    is_q = hh < H
    kv = hh - H
    base = hh * d
    nw = q_norm if is_q else k_norm
    ss = np.float32(0.0)
    for j in range(lane, d, 32):
        v = qkv[t, base + j]
        sh[j] = v
        ss += v * v
    ss = warp_sum(ss, red)
    cuda.syncthreads()
    if nw.shape[0] > 0:
        inv = np.float32(1.0) / math.sqrt(ss / d + eps)
        for j in range(lane, d, 32):
            sh[j] = sh[j] * inv * nw[j]
    cuda.syncthreads()
    b = table[p // bs]
    slot = p % bs
    if is_q:
        dst = q_out[t, hh]
    else:
        dst = k_pool[b, kv, slot]
        vsrc = (H + n_kv + kv) * d
        for j in range(lane, d, 32):
            v_pool[b, kv, slot, j] = qkv[t, vsrc + j]
    half = inv_freq.shape[0]
    for i in range(lane, half, 32):
        ang = np.float64(p) * np.float64(inv_freq[i])
        c = np.float32(math.cos(ang) * rope_scale)
        s = np.float32(math.sin(ang) * rope_scale)
        a0 = sh[i]
        a1 = sh[i + half]
        dst[i] = a0 * c - a1 * s
        dst[i + half] = a1 * c + a0 * s
    for j in range(2 * half + lane, d, 32):
        dst[j] = sh[j]


@device
def _dot_row(qs, kr, d):
    """q . k over head_dim, 8 loads of the key row at a time (a plain loop waited out each load)."""
    x = np.float32(0.0)
    c = 0
    while c + 8 <= d:
        k0, k1, k2, k3, k4, k5, k6, k7 = kr[c], kr[c + 1], kr[c + 2], kr[c + 3], kr[c + 4], kr[c + 5], kr[c + 6], kr[c + 7]
        x += ((qs[c] * k0 + qs[c + 1] * k1) + (qs[c + 2] * k2 + qs[c + 3] * k3)) \
            + ((qs[c + 4] * k4 + qs[c + 5] * k5) + (qs[c + 6] * k6 + qs[c + 7] * k7))
        c += 8
    while c < d:
        x += qs[c] * kr[c]
        c += 1
    return x


@device
def _acc_rows4(v0, v1, v2, v3, p0, p1, p2, p3, lane, d, a0, a1, a2, a3, a4, a5, a6, a7):
    """acc[i] += sum_r p_r v_r[lane + 32 i] for the dims this lane holds (head_dim <= 256)."""
    c = lane
    if c < d:
        a0 += (p0 * v0[c] + p1 * v1[c]) + (p2 * v2[c] + p3 * v3[c])
    c += 32
    if c < d:
        a1 += (p0 * v0[c] + p1 * v1[c]) + (p2 * v2[c] + p3 * v3[c])
    c += 32
    if c < d:
        a2 += (p0 * v0[c] + p1 * v1[c]) + (p2 * v2[c] + p3 * v3[c])
    c += 32
    if c < d:
        a3 += (p0 * v0[c] + p1 * v1[c]) + (p2 * v2[c] + p3 * v3[c])
    c += 32
    if c < d:
        a4 += (p0 * v0[c] + p1 * v1[c]) + (p2 * v2[c] + p3 * v3[c])
    c += 32
    if c < d:
        a5 += (p0 * v0[c] + p1 * v1[c]) + (p2 * v2[c] + p3 * v3[c])
    c += 32
    if c < d:
        a6 += (p0 * v0[c] + p1 * v1[c]) + (p2 * v2[c] + p3 * v3[c])
    c += 32
    if c < d:
        a7 += (p0 * v0[c] + p1 * v1[c]) + (p2 * v2[c] + p3 * v3[c])
    return a0, a1, a2, a3, a4, a5, a6, a7


@cuda.jit(fastmath=True)
def paged_attention_kernel(q, k_pool, v_pool, table, start, scale, window, softcap, out):
    """Grid (T, H), ATT_WARPS warps per block."""
    qs = cuda.shared.array(MAX_HEAD_DIM, F32)
    ps = cuda.shared.array(PS_SHAPE, F32)
    red = cuda.shared.array(ATT_THREADS, F32)
    ms = cuda.shared.array(ATT_WARPS, F32)
    ls = cuda.shared.array(ATT_WARPS, F32)
    accs = cuda.shared.array(ACC_SHAPE, F32)
    t, h = cuda.blockIdx.x, cuda.blockIdx.y
    tid = cuda.threadIdx.x
    w, lane = tid // 32, tid % 32
    H, d = q.shape[1], q.shape[2]
    n_kv, bs = k_pool.shape[1], k_pool.shape[2]
    kv = h // (H // n_kv)
    p = start + t
    lo = 0 if window <= 0 else max(0, p - window + 1)
    for j in range(tid, d, ATT_WARPS * 32):
        qs[j] = q[t, h, j] * scale
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)      # dims lane + 32 i of the value sum
    cuda.syncthreads()
    m = np.float32(-math.inf)
    l = np.float32(0.0)
    n_chunks = (p - lo + 32) // 32
    rounds = (n_chunks + ATT_WARPS - 1) // ATT_WARPS
    for r in range(rounds):
        ch = r * ATT_WARPS + w
        j0 = lo + ch * 32
        j = j0 + lane
        s = np.float32(-math.inf)
        if ch < n_chunks and j <= p:
            kr = k_pool[table[j // bs], kv, j % bs]
            x = _dot_row(qs, kr, d)
            if softcap > 0:
                x = softcap * math.tanh(x / softcap)
            s = x
        cm = warp_max(s, red)
        m_new = max(m, cm)
        pj = np.float32(0.0)
        corr = np.float32(1.0)
        if m_new > -math.inf:
            if s > -math.inf:
                pj = math.exp(s - m_new)
            corr = math.exp(m - m_new)
        l = l * corr + warp_sum(pj, red)
        ps[w, lane] = pj
        cuda.syncthreads()
        a0, a1, a2, a3, a4, a5, a6, a7 = a0 * corr, a1 * corr, a2 * corr, a3 * corr, a4 * corr, a5 * corr, \
            a6 * corr, a7 * corr
        nvalid = min(32, p + 1 - j0) if ch < n_chunks else 0
        jj = 0
        while jj + 4 <= nvalid:           # 4 value rows a step, their loads in flight together
            jk = j0 + jj
            v0 = v_pool[table[jk // bs], kv, jk % bs]
            v1 = v_pool[table[(jk + 1) // bs], kv, (jk + 1) % bs]
            v2 = v_pool[table[(jk + 2) // bs], kv, (jk + 2) % bs]
            v3 = v_pool[table[(jk + 3) // bs], kv, (jk + 3) % bs]
            a0, a1, a2, a3, a4, a5, a6, a7 = _acc_rows4(v0, v1, v2, v3, ps[w, jj], ps[w, jj + 1], ps[w, jj + 2],
                                                        ps[w, jj + 3], lane, d, a0, a1, a2, a3, a4, a5, a6, a7)
            jj += 4
        while jj < nvalid:
            jk = j0 + jj
            v0 = v_pool[table[jk // bs], kv, jk % bs]
            a0, a1, a2, a3, a4, a5, a6, a7 = _acc_rows4(v0, v0, v0, v0, ps[w, jj], np.float32(0.0), np.float32(0.0),
                                                        np.float32(0.0), lane, d, a0, a1, a2, a3, a4, a5, a6, a7)
            jj += 1
        m = m_new
        cuda.syncthreads()
    if lane == 0:
        ms[w] = m
        ls[w] = l
    for i, a in enumerate((a0, a1, a2, a3, a4, a5, a6, a7)):
        c = lane + 32 * i
        if c < d:
            accs[w, c] = a
    cuda.syncthreads()
    mm = ms[0]
    for i in range(1, ATT_WARPS):
        mm = max(mm, ms[i])
    den = np.float32(0.0)
    for i in range(ATT_WARPS):
        if ms[i] > -math.inf:
            den += ls[i] * math.exp(ms[i] - mm)
    for c in range(tid, d, ATT_WARPS * 32):
        num = np.float32(0.0)
        for i in range(ATT_WARPS):
            if ms[i] > -math.inf:
                num += accs[i, c] * math.exp(ms[i] - mm)
        out[t, h, c] = num / den


@cuda.jit
def store_kv_kernel(k, v, k_pool, v_pool, table, start):
    """k, v (T, n_kv, d) written at positions start..; grid (T, n_kv)."""
    t, h = cuda.blockIdx.x, cuda.blockIdx.y
    bs = k_pool.shape[2]
    b = table[(start + t) // bs]
    j = (start + t) % bs
    for c in range(cuda.threadIdx.x, k.shape[2], 32):
        k_pool[b, h, j, c] = k[t, h, c]
        v_pool[b, h, j, c] = v[t, h, c]


@cuda.jit
def copy_block_kernel(k_pool, v_pool, src, dst):
    """Copy-on-write of one block in every layer: pools (n_layers, n_blocks, n_kv, block, d); grid (n_layers, n_kv)."""
    li, h = cuda.blockIdx.x, cuda.blockIdx.y
    bs, d = k_pool.shape[3], k_pool.shape[4]
    for e in range(cuda.threadIdx.x, bs * d, 32):
        k_pool[li, dst, h, e // d, e % d] = k_pool[li, src, h, e // d, e % d]
        v_pool[li, dst, h, e // d, e % d] = v_pool[li, src, h, e // d, e % d]


# ------------------------------------------------------------------ launchers / kernels_numba names

def launch_attention(q, k_pool, v_pool, table, start, scale, window, softcap, out, stream=0):
    T, H, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} > {MAX_HEAD_DIM} is not supported by the CUDA attention kernel")
    go(paged_attention_kernel, (T, H), ATT_THREADS, stream, 0, (q, k_pool, v_pool, table, start, np.float32(scale),
                                                                int(window), np.float32(softcap), out))


def paged_attention(q, k_pool, v_pool, k_scale, v_scale, quantized, table, start, scale, window, softcap, out):
    if quantized:
        raise NotImplementedError("int8 KV blocks are not on the GPU yet")
    launch_attention(q, k_pool, v_pool, table, start, scale, window, softcap, out)


def store_kv_paged(k, v, k_pool, v_pool, table, start):
    store_kv_kernel[(k.shape[0], k.shape[1]), 32](k, v, k_pool, v_pool, table, int(start))
