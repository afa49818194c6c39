"""RWKV kernels on the GPU: the WKV recurrences of RWKV v4, v5/v6 and v7 (and v7's fused time-mix
tail), LayerNorm, the ln_x GroupNorm, token shift + lerps, and the small elementwise gates.
Same op names and signatures as kernels_numba/wkv.py, with device arrays; states updated in place.

Each WKV kernel walks the chunk's tokens in order inside one launch (T == 1 decode, T > 1
prefill), parallel over what the recurrence leaves independent:

    v4     a thread per channel                         state aa, bb, pp (C,)
    v5/v6  a thread per value channel i of a head        s[h, j, i]: reads along i coalesced
    v7     a warp per value row i of a head, lanes on j  s[h, i, j]: the row's two dot products
                                                         (s.a and s.r) are warp sums
    v7_tail  one block per head: the per-head norms (removal key, ln_x) are block sums, the
           WKV rows as in v7; per-key vectors of the token staged in shared memory (N <= 256)
"""
import math

import numpy as np
from numba import cuda

from ._launch import go
from ._common import BLOCK, F32, block_sum, blocks, warp_sum

WARPS = BLOCK // 32
MAX_HEAD = 256                   # v7_tail: a head's key vectors live in shared memory

# elementwise ops of ``ew`` (x updated in place; y the second operand, same shape, or unused)
EW_SIGMOID_MUL, EW_RELU_SQ, EW_SILU_MUL, EW_TANH, EW_SIGMOID, EW_DECAY = range(6)


@cuda.jit(device=True, inline=True)
def _sig(x):
    return np.float32(1.0) / (np.float32(1.0) + math.exp(-x))


# ------------------------------------------------------------------ v4

@cuda.jit
def wkv4_kernel(k, v, u, w, aa, bb, pp, out):
    """One thread per channel: the stable exponent trick, as kernels_numba's _wkv4_channel."""
    c = cuda.grid(1)
    if c >= k.shape[1]:
        return
    a, b, p = aa[c], bb[c], pp[c]
    if b == 0.0:                          # empty history: its exponent is -inf
        p = np.float32(-1e38)
    uc, wc = u[c], w[c]
    for t in range(k.shape[0]):
        kk, vv = k[t, c], v[t, c]
        ww = uc + kk
        q = max(p, ww)
        e1, e2 = math.exp(p - q), math.exp(ww - q)
        out[t, c] = (e1 * a + e2 * vv) / (e1 * b + e2)
        ww = p + wc
        q = max(ww, kk)
        e1, e2 = math.exp(ww - q), math.exp(kk - q)
        a = e1 * a + e2 * vv
        b = e1 * b + e2
        p = q
    aa[c], bb[c], pp[c] = a, b, p


def wkv4(k, v, u, w, aa, bb, pp, out):
    """RWKV-4. k, v, out (T, C); u = time_first, w = -exp(time_decay) (C,); aa, bb, pp (C,) updated."""
    go(wkv4_kernel, blocks(k.shape[1], BLOCK), BLOCK, 0, 0, (k, v, u, w, aa, bb, pp, out))


wkv4_serial = wkv4


# ------------------------------------------------------------------ v5 / v6

@cuda.jit(fastmath=True)
def wkv6_kernel(r, k, v, w, u, s, out):
    """Grid (value-channel blocks, heads): thread i keeps column i of its head's state."""
    h = cuda.blockIdx.y
    N = s.shape[1]
    i = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
    if i >= N:
        return
    lo = h * N
    for t in range(r.shape[0]):
        tw = min(t, w.shape[0] - 1)              # a (1, C) w: the same decay every token (v5)
        vi = v[t, lo + i]
        acc = np.float32(0.0)
        for j in range(N):
            kv = k[t, lo + j] * vi
            sji = s[h, j, i]
            acc += r[t, lo + j] * (u[lo + j] * kv + sji)
            s[h, j, i] = kv + w[tw, lo + j] * sji
        out[t, lo + i] = acc


def wkv6(r, k, v, w, u, s, out):
    """RWKV-5/6: r, k, v, out (T, C); w the per-step decay (T, C), or (1, C) for every token (v5);
    u (C,); s (H, N, N) [key, value] updated."""
    H, N, _ = s.shape
    go(wkv6_kernel, (blocks(N, BLOCK), H), BLOCK, 0, 0, (r, k, v, w, u, s, out))


wkv6_serial = wkv6


# ------------------------------------------------------------------ v7

@cuda.jit(device=True, inline=True)
def _wkv7_row(sh, i, ok, N, lane, wt, at, bt, kt, rt, vi, red, lo_a, lo_b, lo_w, lo_k, lo_r):
    """One value row i of a head's state s[i, :] (lanes along j): s.a, the update, s.r.
    The per-key vectors are passed as arrays with an offset (device arrays or shared)."""
    ic = min(i, N - 1)
    sa = np.float32(0.0)
    for j in range(lane, N, 32):
        sa += sh[ic, j] * at[lo_a + j]
    sa = warp_sum(sa, red)
    y = np.float32(0.0)
    for j in range(lane, N, 32):
        x = sh[ic, j] * wt[lo_w + j] + sa * bt[lo_b + j] + vi * kt[lo_k + j]
        if ok:
            sh[ic, j] = x
        y += x * rt[lo_r + j]
    return warp_sum(y, red)


@cuda.jit(fastmath=True)
def wkv7_kernel(r, w, k, v, a, b, s, out):
    """Grid (row blocks, heads): a warp per value row i; every warp runs the same iterations."""
    red = cuda.shared.array(BLOCK, F32)
    h = cuda.blockIdx.y
    N = s.shape[1]
    lane = cuda.threadIdx.x % 32
    i = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // 32
    ok = i < N
    lo = h * N
    sh = s[h]
    for t in range(r.shape[0]):
        vi = v[t, lo + min(i, N - 1)]
        y = _wkv7_row(sh, i, ok, N, lane, w[t], a[t], b[t], k[t], r[t], vi, red, lo, lo, lo, lo, lo)
        if ok and lane == 0:
            out[t, lo + i] = y


def wkv7(r, w, k, v, a, b, s, out):
    """RWKV-7: s = s diag(w) + (s a) b^T + v k^T, out = s r. r, w, k, v, a, b, out (T, C); s (H, N, N)
    [value, key] updated."""
    H, N, _ = s.shape
    go(wkv7_kernel, (blocks(N, WARPS), H), BLOCK, 0, 0, (r, w, k, v, a, b, s, out))


wkv7_serial = wkv7


@cuda.jit(fastmath=True)
def v7_tail_kernel(r, wl, k, v, al, vl, vfirst, g, w0, a0, v0, k_k, k_a, r_k, lnx_w, lnx_b, eps, s, out):
    """One block per head, over all T tokens (see v7_tail)."""
    red = cuda.shared.array(BLOCK, F32)
    part = cuda.shared.array(32, F32)
    a_s = cuda.shared.array(MAX_HEAD, F32)
    b_s = cuda.shared.array(MAX_HEAD, F32)
    w_s = cuda.shared.array(MAX_HEAD, F32)
    k_s = cuda.shared.array(MAX_HEAD, F32)
    r_s = cuda.shared.array(MAX_HEAD, F32)
    v_s = cuda.shared.array(MAX_HEAD, F32)
    o_s = cuda.shared.array(MAX_HEAD, F32)
    h = cuda.blockIdx.x
    N = s.shape[1]
    lo = h * N
    tid = cuda.threadIdx.x
    lane, warp = tid % 32, tid // 32
    mix_v = vfirst.shape[0] > 0
    sh = s[h]
    for t in range(r.shape[0]):
        nrm = np.float32(0.0)
        for j in range(tid, N, BLOCK):
            kk = k[t, lo + j] * k_k[lo + j]
            a_s[j] = kk
            nrm += kk * kk
        nrm = max(math.sqrt(block_sum(nrm, red, part)), np.float32(1e-12))
        bonus = np.float32(0.0)
        for j in range(tid, N, BLOCK):
            c = lo + j
            iclr = _sig(a0[c] + al[t, c])
            kk = a_s[j] / nrm
            a_s[j] = -kk
            b_s[j] = kk * iclr
            w_s[j] = math.exp(np.float32(-0.606531) * _sig(w0[c] + wl[t, c]))
            kn = k[t, c] * (np.float32(1.0) + (iclr - np.float32(1.0)) * k_a[c])
            k[t, c] = kn
            k_s[j] = kn
            rj = r[t, c]
            r_s[j] = rj
            bonus += rj * kn * r_k[c]
            vv = v[t, c]
            if mix_v:
                vv = vv + (vfirst[t, c] - vv) * _sig(v0[c] + vl[t, c])
                v[t, c] = vv
            v_s[j] = vv
        bonus = block_sum(bonus, red, part)          # its barriers also publish the shared vectors
        for i0 in range(0, N, WARPS):
            i = i0 + warp
            ok = i < N
            y = _wkv7_row(sh, i, ok, N, lane, w_s, a_s, b_s, k_s, r_s, v_s[min(i, N - 1)], red, 0, 0, 0, 0, 0)
            if ok and lane == 0:
                o_s[i] = y
        cuda.syncthreads()
        m = np.float32(0.0)
        for i in range(tid, N, BLOCK):
            m += o_s[i]
        m = block_sum(m, red, part) / N
        var = np.float32(0.0)
        for i in range(tid, N, BLOCK):
            dv = o_s[i] - m
            var += dv * dv
        inv = np.float32(1.0) / math.sqrt(block_sum(var, red, part) / N + eps)
        for i in range(tid, N, BLOCK):
            c = lo + i
            y = (o_s[i] - m) * inv * lnx_w[c] + lnx_b[c]
            out[t, c] = (y + bonus * v_s[i]) * g[t, c]
        cuda.syncthreads()


def v7_tail(r, wl, k, v, al, vl, vfirst, g, w0, a0, v0, k_k, k_a, r_k, lnx_w, lnx_b, eps, s, out):
    """RWKV-7's time mixing between the projections and the output matrix, per head (see
    kernels_numba/wkv.py v7_tail). k and v updated in place; vl, vfirst (0, 0) at layer 0."""
    H, N, _ = s.shape
    if N > MAX_HEAD:
        raise ValueError(f"v7_tail: head size {N} > {MAX_HEAD}")
    go(v7_tail_kernel, H, BLOCK, 0, 0, (r, wl, k, v, al, vl, vfirst, g, w0, a0, v0, k_k, k_a, r_k, lnx_w, lnx_b,
                                        np.float32(eps), s, out))


v7_tail_serial = v7_tail


# ------------------------------------------------------------------ norms

@cuda.jit(fastmath=True)
def group_norm_kernel(x, group, weight, bias, eps, out):
    """Block per (row, group of ``group`` columns): two-pass mean and variance."""
    red = cuda.shared.array(BLOCK, F32)
    part = cuda.shared.array(32, F32)
    t, g0 = cuda.blockIdx.x, cuda.blockIdx.y * group
    m = np.float32(0.0)
    for j in range(g0 + cuda.threadIdx.x, g0 + group, BLOCK):
        m += x[t, j]
    m = block_sum(m, red, part) / group
    var = np.float32(0.0)
    for j in range(g0 + cuda.threadIdx.x, g0 + group, BLOCK):
        dv = x[t, j] - m
        var += dv * dv
    inv = np.float32(1.0) / math.sqrt(block_sum(var, red, part) / group + eps)
    for j in range(g0 + cuda.threadIdx.x, g0 + group, BLOCK):
        out[t, j] = (x[t, j] - m) * inv * weight[j] + bias[j]


def layer_norm(x, weight, bias, eps, out):
    """out[t] = (x[t] - mean) / sqrt(var + eps) * weight + bias.   x, out (T, d)."""
    go(group_norm_kernel, (x.shape[0], 1), BLOCK, 0, 0, (x, int(x.shape[1]), weight, bias, np.float32(eps), out))


def group_norm(x, groups, weight, bias, eps, out):
    """ln_x: LayerNorm over each of ``groups`` equal slices of a row.  x, out (T, C); weight, bias (C,)."""
    n = x.shape[1] // int(groups)
    go(group_norm_kernel, (x.shape[0], int(groups)), BLOCK, 0, 0, (x, n, weight, bias, np.float32(eps), out))


# ------------------------------------------------------------------ token shift + mixing, gates

@cuda.jit(fastmath=True)
def shift_mix_kernel(x, prev, mix, dyn, out):
    """Grid (channel blocks, T, M): out[m, t, c] = x + (x[t-1] - x) * (mix[m, c] (+ dyn[m, t, c]))."""
    c = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
    t, m = cuda.blockIdx.y, cuda.blockIdx.z
    if c >= x.shape[1]:
        return
    xt = x[t, c]
    st = prev[c] if t == 0 else x[t - 1, c]
    mm = mix[m, c]
    if dyn.shape[0] > 0:
        mm += dyn[m, t, c]
    out[m, t, c] = xt + (st - xt) * mm


_NO_DYN = {}


def _no_dyn():
    if "d" not in _NO_DYN:
        _NO_DYN["d"] = cuda.device_array((0, 0, 0), np.float32)
    return _NO_DYN["d"]


def shift_mix(x, prev, mix, out):
    """Token shift and lerp: out[m, t] = x[t] + (x[t-1] - x[t]) * mix[m], x[-1] = prev.
    x (T, C); prev (C,); mix (M, C); out (M, T, C)."""
    T, C = x.shape
    go(shift_mix_kernel, (blocks(C, BLOCK), T, mix.shape[0]), BLOCK, 0, 0, (x, prev, mix, _no_dyn(), out))


def shift_mix_dyn(x, prev, mix, dyn, out):
    """RWKV-6: out[m, t] = x[t] + (x[t-1] - x[t]) * (mix[m] + dyn[m, t]). dyn, out (M, T, C)."""
    T, C = x.shape
    go(shift_mix_kernel, (blocks(C, BLOCK), T, mix.shape[0]), BLOCK, 0, 0, (x, prev, mix, dyn, out))


@cuda.jit(fastmath=True)
def copy_row_kernel(src, t, dst):
    """dst (C,) = src[t] (the token shift's carried row)."""
    c = cuda.grid(1)
    if c < dst.shape[0]:
        dst[c] = src[t, c]


def copy_row(src, t, dst):
    go(copy_row_kernel, blocks(dst.shape[0], BLOCK), BLOCK, 0, 0, (src, int(t), dst))


@cuda.jit(fastmath=True)
def ew_kernel(x, y, op):
    c = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
    t = cuda.blockIdx.y
    if c >= x.shape[1]:
        return
    a = x[t, c]
    if op == EW_SIGMOID_MUL:
        a *= _sig(y[t, c])
    elif op == EW_RELU_SQ:
        a = max(a, np.float32(0.0))
        a *= a
    elif op == EW_SILU_MUL:
        g = y[t, c]
        a *= g * _sig(g)
    elif op == EW_TANH:
        a = math.tanh(a)
    elif op == EW_SIGMOID:
        a = _sig(a)
    else:                                              # EW_DECAY: RWKV-6's per-step decay
        a = math.exp(-math.exp(a))
    x[t, c] = a


def ew(x, y, op):
    """In place on x (T, C): EW_SIGMOID_MUL x *= sigmoid(y); EW_RELU_SQ x = relu(x)**2; EW_SILU_MUL
    x *= silu(y); EW_TANH, EW_SIGMOID x = f(x); EW_DECAY x = exp(-exp(x)). y: same shape, or x."""
    go(ew_kernel, (blocks(x.shape[1], BLOCK), x.shape[0]), BLOCK, 0, 0, (x, x if y is None else y, int(op)))
