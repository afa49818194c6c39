"""Token sampling on the GPU: logits stay on the device, only the sampled token id comes back.

One block of SAMPLE_THREADS threads does the whole draw (a vocabulary is at most a few
hundred thousand floats, L1/L2-resident); the same steps as edgerun/generate/sampling.py:

- greedy (temperature 0): argmax, the lowest index among equal maxima;
- temperature -> top-k -> top-p -> draw: logits become order-preserving uint32 keys; the
  top-k threshold is the key of the k-th most likely token, found by a radix select (8 bits a
  pass: a 256-bin histogram in shared memory, 4 passes); probabilities exp((l - max) / T) over
  the kept set; the top-p threshold is the key where the running mass from the most likely
  down first reaches top_p of the total (the same radix select on mass histograms).
- the draw takes a uniform u from the host's Sampler stream (one per token, as on the CPU) and
  walks the kept tokens in the CPU sampler's order, so the same seed picks the same token: in
  descending probability when top-p is on (one more radix select, on the running mass), otherwise
  in ascending id (a block prefix sum over contiguous slices, then one thread walks its slice).

Ties at the top-k threshold keep every tied token (the CPU keeps exactly k, picked by
argpartition); the kept set otherwise equals ``candidate_probs``' (float32 here, float64 there).
"""
import math

import numba
import numpy as np
from numba import cuda

from ._common import F32, SIM, U32, bits_to_f32, block_sum, device

SAMPLE_THREADS = 64 if SIM else 512          # 512: the kernel takes up to 128 registers a thread
_NEG = np.float32(-np.inf)
I32 = np.dtype(np.int32) if SIM else numba.int32

if SIM:
    def _f32_bits(v):
        return U32(np.float32(v).view(np.uint32))
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _f32_bits(v):
        return U32(libdevice.float_as_int(v) & 0xFFFFFFFF)


@device
def _key(v):
    """float32 -> uint32 whose unsigned order is the float order (NaN below everything)."""
    if v != v:
        return U32(0)
    b = _f32_bits(v)
    return (b ^ U32(0xFFFFFFFF)) if b >> U32(31) else (b | U32(0x80000000))


@cuda.jit(device=True, inline=True)
def _block_max_arg(v, i, sv, si):
    """(max v, lowest i holding it) over the block; sv, si shared (SAMPLE_THREADS,)."""
    t = cuda.threadIdx.x
    sv[t], si[t] = v, i
    cuda.syncthreads()
    s = SAMPLE_THREADS // 2
    while s > 0:
        if t < s:
            ov, oi = sv[t + s], si[t + s]
            if ov > sv[t] or (ov == sv[t] and oi < si[t]):
                sv[t], si[t] = ov, oi
        cuda.syncthreads()
        s //= 2
    v, i = sv[0], si[0]
    cuda.syncthreads()
    return v, i


@cuda.jit(device=True, inline=True)
def _block_total(v, red, part):
    return block_sum(v, red, part)


@device
def _pm(v, lo_key, m, inv_t):
    """exp((v - m) / T) when v's key is kept (>= lo_key), else 0."""
    return math.exp((v - m) * inv_t) if _key(v) >= lo_key else np.float32(0.0)


@cuda.jit(device=True, inline=True)
def _mass(logits, n, lo_key, m, inv_t, red, part):
    """Block sum of exp((l - m) / T) over the tokens with key >= lo_key; 4 loads in flight a thread
    (a pass is bound by the loads' latency, not the arithmetic)."""
    S = SAMPLE_THREADS
    s = np.float32(0.0)
    for i in range(cuda.threadIdx.x, n, 4 * S):
        v0 = logits[i]
        v1 = logits[min(i + S, n - 1)]
        v2 = logits[min(i + 2 * S, n - 1)]
        v3 = logits[min(i + 3 * S, n - 1)]
        s += _pm(v0, lo_key, m, inv_t)
        if i + S < n:
            s += _pm(v1, lo_key, m, inv_t)
        if i + 2 * S < n:
            s += _pm(v2, lo_key, m, inv_t)
        if i + 3 * S < n:
            s += _pm(v3, lo_key, m, inv_t)
    return _block_total(s, red, part)


@cuda.jit(device=True, inline=True)
def _radix(logits, n, lo, m, inv_t, want, mass, strict, hist, sv, si):
    """Radix select over the keys, 8 bits a pass (4 passes, not 32): the key K where the running
    count (mass False) or probability mass of the kept tokens (key >= lo), taken from the most likely
    down, first reaches want (> want if strict). Histograms in shared memory by atomics; one thread
    scans the 256 bins of a level."""
    t = cuda.threadIdx.x
    prefix = U32(0)
    for level in range(4):
        shift = U32(24 - 8 * level)
        for j in range(t, 256, SAMPLE_THREADS):
            hist[j] = np.float32(0.0)
        cuda.syncthreads()
        for i in range(t, n, SAMPLE_THREADS):
            v = logits[i]
            k = _key(v)
            if k >= lo and (level == 0 or ((k >> shift) >> U32(8)) == prefix):
                d = (k >> shift) & U32(255)
                cuda.atomic.add(hist, d, math.exp((v - m) * inv_t) if mass else np.float32(1.0))
        cuda.syncthreads()
        if t == 0:
            cum = np.float32(0.0)
            chosen = np.int32(-1)
            last = np.int32(0)
            for dd in range(255, -1, -1):
                h = hist[dd]
                if h > np.float32(0.0):
                    last = np.int32(dd)
                    if (cum + h > want) if strict else (cum + h >= want):
                        chosen = np.int32(dd)
                        break
                    cum += h
            if chosen < 0:                      # rounding left want above the total: the least likely
                chosen = last
                cum -= hist[last]
            sv[0] = want - cum
            si[0] = chosen
        cuda.syncthreads()
        want = sv[0]
        prefix = (prefix << U32(8)) | U32(si[0])
        cuda.syncthreads()
    return prefix


@cuda.jit
def sample_kernel(logits, temp_bits, top_k, top_p_bits, u_bits, out, probs):
    """out[0] = the sampled token id of logits (n,). temperature / top_p as float32 bits, u as
    u_bits / 2**32 (integers, so that a recorded launch can patch them per step); temperature 0
    is greedy. probs (n,) or (0,): when given, the kept distribution (normalised) is written there."""
    sv = cuda.shared.array(SAMPLE_THREADS, F32)
    si = cuda.shared.array(SAMPLE_THREADS, I32)
    red = cuda.shared.array(SAMPLE_THREADS, F32)
    part = cuda.shared.array(32, F32)
    t = cuda.threadIdx.x
    n = logits.shape[0]
    temp = bits_to_f32(temp_bits)
    top_p = bits_to_f32(top_p_bits)
    # max (greedy's answer; the softmax's shift)
    bv, bi = _NEG, np.int32(n)
    for i in range(t, n, SAMPLE_THREADS):
        v = logits[i]
        if v > bv:                                   # NaN never wins; the first of equal values stays
            bv, bi = v, np.int32(i)
    m, arg = _block_max_arg(bv, bi, sv, si)
    if temp <= np.float32(0.0):
        if t == 0:
            out[0] = arg if arg < n else 0
        return
    inv_t = np.float32(1.0) / temp
    hist = cuda.shared.array(256, F32)
    # top-k: the key of the k-th most likely token (ties at it all kept); key 0 (NaN) never kept
    lo = U32(1)
    if top_k > 0 and top_k < n:
        lo = _radix(logits, n, lo, m, inv_t, np.float32(top_k), False, False, hist, sv, si)
    total = _mass(logits, n, lo, m, inv_t, red, part)
    # top-p: the most likely tokens down to the one where the running mass first reaches top_p
    if top_p < np.float32(1.0):
        lo = max(lo, _radix(logits, n, lo, m, inv_t, top_p * total, True, False, hist, sv, si))
        total = _mass(logits, n, lo, m, inv_t, red, part)
    if probs.shape[0] == n:
        for i in range(t, n, SAMPLE_THREADS):
            v = logits[i]
            probs[i] = math.exp((v - m) * inv_t) / total if _key(v) >= lo else np.float32(0.0)
    target = np.float32(u_bits) * np.float32(2.0 ** -32) * total
    if top_p < np.float32(1.0):
        # descending probability: the key where the running mass first exceeds the target
        kk = _radix(logits, n, lo, m, inv_t, target, True, True, hist, sv, si)
        # kk: the largest key whose upper mass exceeds the target; its token (lowest id of equal keys)
        bv2, bi2 = _NEG, np.int32(n)
        for i in range(t, n, SAMPLE_THREADS):
            if _key(logits[i]) == kk and bi2 == n:
                bv2, bi2 = np.float32(1.0), np.int32(i)
        _, pick = _block_max_arg(bv2, bi2, sv, si)
        if t == 0:
            out[0] = pick if pick < n else arg
        return
    # ascending id: contiguous slices, a block prefix of their masses, one thread walks its slice
    per = (n + SAMPLE_THREADS - 1) // SAMPLE_THREADS
    i0 = t * per
    i1 = min(i0 + per, n)
    s = np.float32(0.0)
    for i in range(i0, i1):
        v = logits[i]
        if _key(v) >= lo:
            s += math.exp((v - m) * inv_t)
    red[t] = s
    cuda.syncthreads()
    if t == 0:                                   # serial prefix over the slices (a few µs for 1024)
        acc = np.float32(0.0)
        for j in range(SAMPLE_THREADS):
            c = red[j]
            red[j] = acc
            acc += c
        sv[0] = acc
        si[0] = arg
    cuda.syncthreads()
    before = red[t]
    after = red[t + 1] if t + 1 < SAMPLE_THREADS else sv[0]
    target = np.float32(u_bits) * np.float32(2.0 ** -32) * sv[0]
    if before <= target and target < after:      # exactly one slice holds the target
        c = before
        pick = np.int32(-1)
        for i in range(i0, i1):
            v = logits[i]
            if _key(v) >= lo:
                pick = np.int32(i)
                c += math.exp((v - m) * inv_t)
                if c > target:
                    break
        if pick >= 0:
            si[0] = pick
    cuda.syncthreads()
    if t == 0:
        out[0] = si[0]


def launch_sample(logits, temperature: float, top_k: int, top_p: float, u: float, out, probs=None, stream=0):
    """Sample one token of logits (n,) (device) into out[0] (device int32). u in [0, 1).
    Dyn arguments (a recorded plan) are passed as they are: already bits."""
    from ._launch import go
    from .linear import dummy
    f = [a if hasattr(a, "name") else b(a) for a, b in ((temperature, f32_bits), (top_k, int), (top_p, f32_bits),
                                                        (u, u_bits))]
    args = (logits, f[0], f[1], f[2], f[3], out, dummy() if probs is None else probs)
    go(sample_kernel, 1, SAMPLE_THREADS, stream, 0, args)


def f32_bits(v: float) -> int:
    return int(np.array(v, np.float32).view(np.int32))


def u_bits(u: float) -> int:
    """A uniform in [0, 1) as an integer in [0, 2**32) (float32 precision is what the kernel uses anyway)."""
    return min(int(u * 4294967296.0), 4294967295)
