"""xLSTM kernels on the GPU: the mLSTM (matrix memory) and sLSTM (scalar memory) recurrences, the
block-diagonal (headwise) projections and the small gates around them. Same op names and signatures
as kernels_numba/xlstm.py, with device arrays; states updated in place.

Both cells run one block per head and walk the chunk's tokens in order inside one launch (T == 1
decode, T > 1 prefill). The mLSTM prefill is therefore the recurrence, not the CPU's chunkwise
form (equal to float tolerance, tested on the CPU): a thread per value column c updates C[:, c]
(coalesced) and produces h[c] in the same pass. The sLSTM's recurrent matrices are
block-diagonal per head, so a head needs only its own previous y: a warp per output row o, lanes
along the inputs, y kept in shared memory (head size <= 1024).

One difference from the CPU: the sLSTM's first-step rule (m = i while n is all zero) looks at the
head's own n, not the whole vector's; all heads start and stay non-zero together.
"""
import math

import numpy as np
from numba import cuda

from ._launch import go
from ._common import BLOCK, F32, block_sum, blocks, warp_sum

WARPS = BLOCK // 32
MAX_HEAD = 1024                  # sLSTM: a head's y in shared memory

X_SIGMOID_MUL, X_SILU_MUL, X_GELU_MUL, X_SKIP_SILU, X_SOFTCAP = range(5)


@cuda.jit(device=True, inline=True)
def _sig(x):
    return np.float32(1.0) / (np.float32(1.0) + math.exp(-x))


@cuda.jit(device=True, inline=True)
def _softcap(x, cap):
    if cap > 0:
        return cap * math.tanh(x / cap)
    return x


@cuda.jit(device=True, inline=True)
def _logsigmoid(x):
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


# ------------------------------------------------------------------ mLSTM

@cuda.jit(fastmath=True)
def mlstm_kernel(q, k, v, ig, fg, ib, fb, cap, C, n, m, eps, nw, norm_eps, out):
    """One block per head over all T tokens; every thread carries the (identical) stabiliser m."""
    red = cuda.shared.array(BLOCK, F32)
    part = cuda.shared.array(32, F32)
    hh = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    _, DK, DV = C.shape
    scale = np.float32(1.0) / math.sqrt(np.float32(DK))
    qo, vo = hh * DK, hh * DV
    m_cur = m[hh]
    for t in range(q.shape[0]):
        i = _softcap(ig[t, hh] + ib[hh], cap)
        lf = _logsigmoid(_softcap(fg[t, hh] + fb[hh], cap))
        m_new = max(lf + m_cur, i)
        fa = math.exp(lf + m_cur - m_new)
        ia = math.exp(i - m_new)
        m_cur = m_new
        qn = np.float32(0.0)
        for r in range(tid, DK, BLOCK):
            nr = fa * n[hh, r] + ia * k[t, qo + r]
            n[hh, r] = nr
            qn += q[t, qo + r] * scale * nr
        qn = block_sum(qn, red, part)
        inv = np.float32(1.0) / (max(abs(qn), math.exp(-m_new)) + eps)
        mean = np.float32(0.0)
        for c in range(tid, DV, BLOCK):
            vc = ia * v[t, vo + c]
            acc = np.float32(0.0)
            for r in range(DK):
                x = fa * C[hh, r, c] + k[t, qo + r] * vc
                C[hh, r, c] = x
                acc += q[t, qo + r] * x
            hc = acc * scale * inv
            out[t, vo + c] = hc
            mean += hc
        mean = block_sum(mean, red, part) / DV
        var = np.float32(0.0)
        for c in range(tid, DV, BLOCK):
            dv = out[t, vo + c] - mean
            var += dv * dv
        rs = np.float32(1.0) / math.sqrt(block_sum(var, red, part) / DV + norm_eps)
        for c in range(tid, DV, BLOCK):
            out[t, vo + c] = (out[t, vo + c] - mean) * rs * nw[vo + c]
    if tid == 0:
        m[hh] = m_cur


def mlstm_step(q, k, v, ig, fg, ib, fb, cap, C, n, m, eps, nw, norm_eps, out):
    """q, k (T, H*d_qk), v (T, H*d_v), ig, fg (T, H) raw gate pre-activations, ib, fb (H,) their
    biases, cap the gate soft-cap (<= 0: none); C (H, d_qk, d_v), n (H, d_qk), m (H,) updated;
    out (T, H*d_v) = per-head LayerNorm(h) * nw. Any T (the recurrence, token by token)."""
    go(mlstm_kernel, C.shape[0], BLOCK, 0, 0, (q, k, v, ig, fg, ib, fb, np.float32(cap), C, n, m, np.float32(eps),
                                              nw, np.float32(norm_eps), out))


def mlstm_chunkwise(q, k, v, ig, fg, ib, fb, cap, C, n, m, eps, nw, norm_eps, chunk, out):
    """kernels_numba's prefill signature; on the GPU the recurrence (chunk is not used)."""
    mlstm_step(q, k, v, ig, fg, ib, fb, cap, C, n, m, eps, nw, norm_eps, out)


# ------------------------------------------------------------------ sLSTM

@cuda.jit(fastmath=True)
def slstm_kernel(wx, R, b, state, nw, norm_eps, out):
    red = cuda.shared.array(BLOCK, F32)
    part = cuda.shared.array(32, F32)
    y_s = cuda.shared.array(MAX_HEAD, F32)
    yn_s = cuda.shared.array(MAX_HEAD, F32)
    hh = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    lane, warp = tid % 32, tid // 32
    NH, G, d, _ = R.shape
    D = NH * d
    lo = hh * d
    for o in range(tid, d, BLOCK):
        y_s[o] = state[0, lo + o]
    for t in range(wx.shape[0]):
        nz = np.float32(0.0)
        for o in range(tid, d, BLOCK):
            if state[2, lo + o] != 0.0:
                nz += np.float32(1.0)
        first = block_sum(nz, red, part) == 0.0       # its barriers also publish y_s
        for o0 in range(0, d, WARPS):
            o = o0 + warp
            oc = min(o, d - 1)
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for r in range(lane, d, 32):
                yr = y_s[r]
                a0 += R[hh, 0, oc, r] * yr
                a1 += R[hh, 1, oc, r] * yr
                a2 += R[hh, 2, oc, r] * yr
                a3 += R[hh, 3, oc, r] * yr
            a0 = warp_sum(a0, red)
            a1 = warp_sum(a1, red)
            a2 = warp_sum(a2, red)
            a3 = warp_sum(a3, red)
            if o < d and lane == 0:
                j = lo + o
                iraw = a0 + wx[t, j] + b[j]
                fraw = a1 + wx[t, D + j] + b[D + j]
                zraw = a2 + wx[t, 2 * D + j] + b[2 * D + j]
                oraw = a3 + wx[t, 3 * D + j] + b[3 * D + j]
                lfm = state[3, j] + _logsigmoid(fraw)
                m_new = iraw if first else max(iraw, lfm)
                ia = min(math.exp(iraw - m_new), np.float32(1.0))
                fa = min(math.exp(lfm - m_new), np.float32(1.0))
                c_new = fa * state[1, j] + ia * math.tanh(zraw)
                n_new = fa * state[2, j] + ia
                y = c_new / n_new * _sig(oraw)
                state[0, j], state[1, j], state[2, j], state[3, j] = y, c_new, n_new, m_new
                yn_s[o] = y
        cuda.syncthreads()
        mean = np.float32(0.0)
        for o in range(tid, d, BLOCK):
            y_s[o] = yn_s[o]
            mean += yn_s[o]
        mean = block_sum(mean, red, part) / d
        var = np.float32(0.0)
        for o in range(tid, d, BLOCK):
            dv = y_s[o] - mean
            var += dv * dv
        rs = np.float32(1.0) / math.sqrt(block_sum(var, red, part) / d + norm_eps)
        for o in range(tid, d, BLOCK):
            out[t, lo + o] = (y_s[o] - mean) * rs * nw[lo + o]


def slstm(wx, R, b, state, nw, norm_eps, ws, out):
    """sLSTM over T tokens. wx (T, 4*D) gate inputs (i | f | z | o); R (heads, 4, d, d); b (4*D,);
    state (4, D) = y, c, n, m updated; nw (D,); out (T, D) per-head normed y. ws: the CPU kernel's
    scratch, unused here (may be None)."""
    if R.shape[2] > MAX_HEAD:
        raise ValueError(f"slstm: head size {R.shape[2]} > {MAX_HEAD}")
    go(slstm_kernel, R.shape[0], BLOCK, 0, 0, (wx, R, b, state, nw, np.float32(norm_eps), out))


# ------------------------------------------------------------------ projections and gates

@cuda.jit(fastmath=True)
def headwise_kernel(x, w, bias, out):
    """Grid (output blocks, T): a warp per output column of the block-diagonal product."""
    red = cuda.shared.array(BLOCK, F32)
    t = cuda.blockIdx.y
    lane = cuda.threadIdx.x % 32
    nb, O, I = w.shape
    col = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // 32
    cc = min(col, nb * O - 1)
    bb, o = cc // O, cc % O
    acc = np.float32(0.0)
    for i in range(lane, I, 32):
        acc += w[bb, o, i] * x[t, bb * I + i]
    acc = warp_sum(acc, red)
    if col < nb * O and lane == 0:
        if bias.shape[0] > 0:
            acc += bias[col]
        out[t, col] = acc


def headwise_linear(x, w, out, bias=None):
    """Block-diagonal projection: x (T, nb*i), w (nb, o, i) [+ bias (nb*o,)] -> out (T, nb*o) (any strides)."""
    go(headwise_kernel, (blocks(w.shape[0] * w.shape[1], WARPS), x.shape[0]), BLOCK, 0, 0,
       (x, w, _none() if bias is None else bias, out))


def small_gemm(x, w, out):
    """out = x @ w.T for a few-row float32 w (rows, n) (the gate projections)."""
    headwise_linear(x, w.reshape(1, w.shape[0], w.shape[1]), out)


@cuda.jit(fastmath=True)
def xew_kernel(x, a, b, vec, cap, op):
    c = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
    t = cuda.blockIdx.y
    if c >= x.shape[1]:
        return
    if op == X_SIGMOID_MUL:
        x[t, c] = x[t, c] * _sig(a[t, c])
    elif op == X_SILU_MUL:
        g = a[t, c]
        x[t, c] = g * _sig(g) * b[t, c]
    elif op == X_GELU_MUL:
        g = a[t, c]
        x[t, c] = np.float32(0.5) * g * (np.float32(1.0) + math.erf(g * np.float32(0.7071067811865476))) * b[t, c]
    elif op == X_SKIP_SILU:
        z = b[t, c]
        x[t, c] = (x[t, c] + vec[c] * a[t, c]) * z * _sig(z)
    else:
        x[t, c] = cap * math.tanh(x[t, c] / cap)


_NONE = {}


def _none():
    if "v" not in _NONE:
        _NONE["v"] = cuda.device_array(0, np.float32)
    return _NONE["v"]


def _xew(x, a, b, vec, cap, op):
    go(xew_kernel, (blocks(x.shape[1], BLOCK), x.shape[0]), BLOCK, 0, 0,
       (x, x if a is None else a, x if b is None else b, _none() if vec is None else vec, np.float32(cap), int(op)))


def sigmoid_mul(h, o):
    """In place h *= sigmoid(o)."""
    _xew(h, o, None, None, 0.0, X_SIGMOID_MUL)


def silu_mul(gate, up, out):
    """out = silu(gate) * up."""
    _xew(out, gate, up, None, 0.0, X_SILU_MUL)


def gelu_mul(gate, up, out):
    """out = gelu(gate) * up, exact (erf) GELU."""
    _xew(out, gate, up, None, 0.0, X_GELU_MUL)


def skip_silu_gate(h, skip, xc, z):
    """In place h = (h + skip * xc) * silu(z)."""
    _xew(h, xc, z, skip, 0.0, X_SKIP_SILU)


def softcap_(x, cap):
    """In place x = cap * tanh(x / cap)."""
    _xew(x, None, None, None, cap, X_SOFTCAP)
