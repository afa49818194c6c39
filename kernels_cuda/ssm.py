"""State-space kernels on the GPU: causal depthwise conv1d with carried state, the Mamba-1
selective scan, Mamba-2's SSD recurrence and its gated RMSNorm. Same op names and signatures
as kernels_numba/ssm.py, with device arrays; states are updated in place.

Each kernel takes the whole chunk of tokens and walks them in order inside one launch (T == 1 is
the decode step, T > 1 prefill), parallel over what is independent: channels (conv, Mamba-1),
(head, row of the state) pairs (Mamba-2). Mamba-2's prefill therefore runs the exact recurrence,
not the CPU's chunked SSD form: one launch per layer either way, and the recurrence moves the
state through registers once per token instead of materialising the chunk's L x L matrices.

Layouts (as on the CPU): conv state (K-1, C) oldest first, w (K, C); Mamba-1 h and A (N, d_inner),
so a thread per channel reads them coalesced; Mamba-2 h (H, P, N), one warp per (head, p) with
its lanes along N.
"""
import math

import numpy as np
from numba import cuda

from ._launch import go
from ._common import BLOCK, F32, block_sum, blocks, warp_sum

WARPS = BLOCK // 32


@cuda.jit(device=True, inline=True)
def _softplus(x):
    return max(x, np.float32(0.0)) + math.log1p(math.exp(-abs(x)))


@cuda.jit(device=True, inline=True)
def _silu(x):
    return x / (np.float32(1.0) + math.exp(-x))


# ------------------------------------------------------------------ causal depthwise conv1d

@cuda.jit(fastmath=True)
def causal_conv1d_kernel(x, state, w, b, apply_silu, out):
    """One thread per channel c over all T tokens: out[t, c] = act(b[c] + sum_k w[k, c] u[t+k-(K-1), c]),
    u = state ++ x; then the last K-1 inputs become the state."""
    c = cuda.grid(1)
    T, C = x.shape
    if c >= C:
        return
    K = w.shape[0]
    S = K - 1
    for t in range(T):
        acc = b[c] if b.shape[0] > 0 else np.float32(0.0)
        for k in range(K):
            i = t + k - S
            u = state[S + i, c] if i < 0 else x[i, c]
            acc += w[k, c] * u
        out[t, c] = _silu(acc) if apply_silu else acc
    if T >= S:
        for r in range(S):
            state[r, c] = x[T - S + r, c]
    else:
        for r in range(S - T):
            state[r, c] = state[r + T, c]
        for r in range(T):
            state[S - T + r, c] = x[r, c]


def causal_conv1d(x, state, w, b, apply_silu, out):
    """x (T, C) (any strides); state (K-1, C) updated; w (K, C); b (C,) or (0,); out (T, C)."""
    go(causal_conv1d_kernel, blocks(x.shape[1], BLOCK), BLOCK, 0, 0, (x, state, w, b, bool(apply_silu), out))


causal_conv1d_parallel = causal_conv1d


# ------------------------------------------------------------------ Mamba-1 selective scan

@cuda.jit(fastmath=True)
def selective_scan_kernel(x, dt, A, B, C, D, z, dt_bias, h, out):
    """One thread per channel j over all T tokens; h[:, j] stays in global memory (N reads and
    writes per token, coalesced across the warp)."""
    j = cuda.grid(1)
    T, d = x.shape
    if j >= d:
        return
    N = A.shape[0]
    bias, Dj = dt_bias[j], D[j]
    for t in range(T):
        xt = x[t, j]
        delta = _softplus(dt[t, j] + bias)
        y = Dj * xt
        dx = delta * xt
        for n in range(N):
            v = math.exp(delta * A[n, j]) * h[n, j] + dx * B[t, n]
            h[n, j] = v
            y += v * C[t, n]
        out[t, j] = y * _silu(z[t, j])


def selective_scan(x, dt, A, B, C, D, z, dt_bias, h, ws, out):
    """Mamba-1: x, dt (raw), z (T, d); A, h (N, d); B, C (T, N); D, dt_bias (d,); h updated.
    out (T, d) = (C.h + D x) * silu(z). ws: the CPU kernel's scratch, unused here (may be None)."""
    go(selective_scan_kernel, blocks(x.shape[1], BLOCK), BLOCK, 0, 0, (x, dt, A, B, C, D, z, dt_bias, h, out))


def selective_scan_parallel(x, dt, A, B, C, D, z, dt_bias, h, out):
    selective_scan(x, dt, A, B, C, D, z, dt_bias, h, None, out)


@cuda.jit(fastmath=True)
def rms_norm_segments_kernel(x, bounds, eps):
    """Block per (row, segment): in place weightless RMSNorm."""
    red = cuda.shared.array(BLOCK, F32)
    part = cuda.shared.array(32, F32)
    t, s = cuda.blockIdx.x, cuda.blockIdx.y
    lo, hi = bounds[s], bounds[s + 1]
    ss = np.float32(0.0)
    for j in range(lo + cuda.threadIdx.x, hi, BLOCK):
        ss += x[t, j] * x[t, j]
    ss = block_sum(ss, red, part)
    inv = np.float32(1.0) / math.sqrt(ss / (hi - lo) + eps)
    for j in range(lo + cuda.threadIdx.x, hi, BLOCK):
        x[t, j] = x[t, j] * inv


def rms_norm_segments(x, bounds, eps):
    """In place, weightless RMSNorm of each column segment bounds[i]:bounds[i+1] of every row
    (FalconMamba's dt, B, C norms). bounds: a device int64 array."""
    go(rms_norm_segments_kernel, (x.shape[0], bounds.shape[0] - 1), BLOCK, 0, 0, (x, bounds, np.float32(eps)))


# ------------------------------------------------------------------ Mamba-2 SSD

@cuda.jit(fastmath=True)
def ssd_scan_kernel(xbc, dt, A, D, dt_bias, h, G, dt_min, dt_max, out):
    """One warp per (head, p): lanes along N hold h[hh, p, n]; over all T tokens."""
    red = cuda.shared.array(BLOCK, F32)
    H, P, N = h.shape
    hh = cuda.blockIdx.y
    lane = cuda.threadIdx.x % 32
    p = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // 32
    ok = p < P
    pc = min(p, P - 1)
    d_inner = H * P
    g = hh // (H // G)
    b0, c0 = d_inner + g * N, d_inner + (G + g) * N
    for t in range(xbc.shape[0]):
        delta = min(max(_softplus(dt[t, hh] + dt_bias[hh]), dt_min), dt_max)
        dA = math.exp(delta * A[hh])
        xp = xbc[t, hh * P + pc]
        coef = delta * xp
        acc = np.float32(0.0)
        for n in range(lane, N, 32):
            v = h[hh, pc, n] * dA + coef * xbc[t, b0 + n]
            if ok:
                h[hh, pc, n] = v
            acc += v * xbc[t, c0 + n]
        acc = warp_sum(acc, red)          # every warp calls it (the simulator's version syncs the block)
        if ok and lane == 0:
            out[t, hh * P + pc] = acc + D[hh] * xp


def ssd_scan(xbc, dt, A, D, dt_bias, h, G, dt_min, dt_max, out):
    """Mamba-2 over T tokens by its recurrence. xbc (T, H*P + 2*G*N) = x | B | C after the conv;
    dt (T, H) raw; A, D, dt_bias (H,); h (H, P, N) updated; out (T, H*P) = C.h + D*x (ungated)."""
    H, P, _ = h.shape
    go(ssd_scan_kernel, (blocks(P, WARPS), H), BLOCK, 0, 0,
       (xbc, dt, A, D, dt_bias, h, int(G), np.float32(dt_min), np.float32(dt_max), out))


def ssd_step(xbc, dt, A, D, dt_bias, h, G, dt_min, dt_max, out):
    """One token (kernels_numba's name): ssd_scan with T == 1."""
    ssd_scan(xbc, dt, A, D, dt_bias, h, G, dt_min, dt_max, out)


def ssd_chunked(xbc, dt, A, D, dt_bias, h, G, chunk, dt_min, dt_max, out):
    """kernels_numba's prefill signature; on the GPU the recurrence (chunk is not used)."""
    ssd_scan(xbc, dt, A, D, dt_bias, h, G, dt_min, dt_max, out)


@cuda.jit(fastmath=True)
def gated_rms_norm_kernel(y, z, weight, group, eps, out):
    """Block per (row, group): out = weight * rmsnorm(y * silu(z)) over the group's columns."""
    red = cuda.shared.array(BLOCK, F32)
    part = cuda.shared.array(32, F32)
    t, g0 = cuda.blockIdx.x, cuda.blockIdx.y * group
    ss = np.float32(0.0)
    for j in range(g0 + cuda.threadIdx.x, g0 + group, BLOCK):
        v = y[t, j] * _silu(z[t, j])
        out[t, j] = v
        ss += v * v
    ss = block_sum(ss, red, part)
    inv = np.float32(1.0) / math.sqrt(ss / group + eps)
    for j in range(g0 + cuda.threadIdx.x, g0 + group, BLOCK):
        out[t, j] = out[t, j] * inv * weight[j]


def gated_rms_norm(y, z, weight, group, eps, out):
    """out = weight * rmsnorm_per_group(y * silu(z)); y, z, out (T, d); groups of ``group`` columns."""
    go(gated_rms_norm_kernel, (y.shape[0], y.shape[1] // int(group)), BLOCK, 0, 0,
       (y, z, weight, int(group), np.float32(eps), out))


gated_rms_norm_serial = gated_rms_norm
