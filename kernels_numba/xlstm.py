"""xLSTM kernels: the mLSTM (matrix memory) recurrent step for decode and its chunkwise-parallel
form for prefill, the sLSTM (scalar memory) recurrence, and the small fused pieces around them.

mLSTM, per head, with q scaled by 1/sqrt(d_qk) and the max-stabiliser m (Beck et al. 2024, eq. 15-27):

    i~ = softcap(i_raw + b_i)       f~ = softcap(f_raw + b_f)      (cap <= 0: no capping)
    m_t = max(logsigmoid(f~) + m_{t-1}, i~)
    f' = exp(logsigmoid(f~) + m_{t-1} - m_t)      i' = exp(i~ - m_t)
    C_t = f' C_{t-1} + i' k v^T        n_t = f' n_{t-1} + i' k
    h_t = (q C_t) / (max(|q . n_t|, exp(-m_t)) + eps)
    out = LayerNorm_per_head(h_t) * w

The state (C (H, d_qk, d_v), n (H, d_qk), m (H,)) starts at zero (m = 0, as transformers and
NX-AI's step functions do) and is updated in place. The chunkwise form gives the same numbers:
within a chunk of L tokens it computes the outputs from the chunk's start state plus an L x L
decay-weighted attention (intra-chunk parallel), then carries C, n, m to the next chunk
(inter-chunk recurrent). Every exponent it takes is <= 0 (stabilised by the running max).

sLSTM, per head with block-diagonal recurrent weights R (H_heads, 4, d, d) and state (y, c, n, m):

    raw_g = Wx_g + R_g y_{t-1} + b_g        g in (i, f, z, o)
    m_t = max(logsigmoid(f) + m_{t-1}, i)   (m_t = i while n is all zero, as NX-AI's vanilla cell)
    i' = min(exp(i - m_t), 1)   f' = min(exp(logsigmoid(f) + m_{t-1} - m_t), 1)
    c_t = f' c + i' tanh(z)     n_t = f' n + i'     y_t = sigmoid(o) c_t / n_t

Each kernel writes into a caller-given ``out`` and uses caller-given scratch, so a decode step
allocates nothing. Plain NumPy twins (``*_ref``) sit at the end of the file.
"""
import math

import numpy as np
from numba import njit, prange

from ._common import FASTMATH, JIT
from .ssm import fast_exp

# divisions by zero give inf/nan as in NumPy instead of raising: the check Numba adds by default
# keeps LLVM from vectorising any loop that divides
_JIT = dict(JIT, error_model="numpy")


@njit(inline="always", fastmath=FASTMATH)
def _softcap(x, cap):
    if cap > 0:
        return cap * np.tanh(x / cap)
    return x


@njit(inline="always", fastmath=FASTMATH)
def _logsigmoid(x):
    if x >= 0:
        return -np.log1p(np.exp(-x))
    return x - np.log1p(np.exp(x))


@njit(inline="always", fastmath=FASTMATH)
def _head_layer_norm(h, w, eps):
    """In place: (h - mean) / sqrt(var + eps) * w over one head's vector."""
    d = h.shape[0]
    mean = np.float32(0.0)
    for c in range(d):
        mean += h[c]
    mean /= d
    var = np.float32(0.0)
    for c in range(d):
        x = h[c] - mean
        var += x * x
    r = np.float32(1.0) / np.sqrt(var / d + eps)
    for c in range(d):
        h[c] = (h[c] - mean) * r * w[c]


@njit(inline="always", fastmath=FASTMATH)
def _mlstm_step_head(q, k, v, ig, fg, ib, fb, cap, C, n, m, eps, nw, norm_eps, out, t, hh):
    """One token of one head: state (C[hh], n[hh], m[hh]) updated, normed output into out[t]."""
    _, DK, DV = C.shape
    scale = np.float32(1.0 / math.sqrt(DK))
    i = _softcap(ig[t, hh] + ib[hh], cap)
    lf = _logsigmoid(_softcap(fg[t, hh] + fb[hh], cap))
    m_old = m[hh]
    m_new = max(lf + m_old, i)
    fa = np.float32(np.exp(lf + m_old - m_new))
    ia = np.float32(np.exp(i - m_new))
    m[hh] = m_new
    qh = q[t, hh * DK:(hh + 1) * DK]
    kh = k[t, hh * DK:(hh + 1) * DK]
    vh = v[t, hh * DV:(hh + 1) * DV]
    oh = out[t, hh * DV:(hh + 1) * DV]
    Ch, nh = C[hh], n[hh]
    for c in range(DV):
        oh[c] = 0.0
    qn = np.float32(0.0)
    for r in range(DK):
        kr = ia * kh[r]
        nr = fa * nh[r] + kr
        nh[r] = nr
        qr = qh[r] * scale
        qn += qr * nr
        Cr = Ch[r]
        for c in range(DV):
            x = fa * Cr[c] + kr * vh[c]
            Cr[c] = x
            oh[c] += qr * x
    inv = np.float32(1.0) / (max(abs(qn), np.float32(np.exp(-m_new))) + eps)
    for c in range(DV):
        oh[c] *= inv
    _head_layer_norm(oh, nw[hh * DV:(hh + 1) * DV], norm_eps)


@njit(fastmath=FASTMATH, **_JIT)
def mlstm_step(q, k, v, ig, fg, ib, fb, cap, C, n, m, eps, nw, norm_eps, out):
    """Decode: q, k (1, H*d_qk), v (1, H*d_v), ig, fg (1, H) raw gate pre-activations, ib, fb (H,)
    their biases, cap the gate soft-cap (<= 0: none); C, n, m updated; out (1, H*d_v) = the
    per-head LayerNorm of h times nw (H*d_v,)."""
    for t in range(q.shape[0]):
        for hh in range(C.shape[0]):
            _mlstm_step_head(q, k, v, ig, fg, ib, fb, cap, C, n, m, eps, nw, norm_eps, out, t, hh)


@njit(parallel=True, fastmath=FASTMATH, **_JIT)
def mlstm_chunkwise(q, k, v, ig, fg, ib, fb, cap, C, n, m, eps, nw, norm_eps, chunk, out):
    """Prefill: the same arguments as mlstm_step for T tokens, in chunks of ``chunk`` tokens (the
    last chunk may be shorter); parallel over heads."""
    T = q.shape[0]
    NH, DK, DV = C.shape
    scale = np.float32(1.0 / math.sqrt(DK))
    L = min(chunk, T)
    for hh in prange(NH):
        b = np.empty(L, np.float32)            # cumulative logsigmoid(f) within the chunk
        iv = np.empty(L, np.float32)           # stabilised input gates
        coef = np.empty(L, np.float32)
        Ch, nh = C[hh], n[hh]
        for t0 in range(0, T, L):
            Lc = min(L, T - t0)
            acc = np.float32(0.0)
            for s in range(Lc):
                iv[s] = _softcap(ig[t0 + s, hh] + ib[hh], cap)
                acc += _logsigmoid(_softcap(fg[t0 + s, hh] + fb[hh], cap))
                b[s] = acc
            m_prev = m[hh]
            # outputs: the chunk's start state (inter) plus the causal decay-weighted part (intra)
            for t in range(Lc):
                mt = b[t] + m_prev
                for s in range(t + 1):
                    mt = max(mt, b[t] - b[s] + iv[s])
                w_inter = fast_exp(b[t] + m_prev - mt) * scale
                qt = q[t0 + t, hh * DK:(hh + 1) * DK]
                oh = out[t0 + t, hh * DV:(hh + 1) * DV]
                for c in range(DV):
                    oh[c] = 0.0
                den = np.float32(0.0)
                for r in range(DK):
                    qr = qt[r] * w_inter
                    den += qr * nh[r]
                    Cr = Ch[r]
                    for c in range(DV):
                        oh[c] += qr * Cr[c]
                for s in range(t + 1):
                    ks = k[t0 + s, hh * DK:(hh + 1) * DK]
                    qk = np.float32(0.0)
                    for r in range(DK):
                        qk += qt[r] * ks[r]
                    coef[s] = fast_exp(b[t] - b[s] + iv[s] - mt) * scale * qk
                    den += coef[s]
                for s in range(t + 1):
                    vs = v[t0 + s, hh * DV:(hh + 1) * DV]
                    cs = coef[s]
                    for c in range(DV):
                        oh[c] += cs * vs[c]
                inv = np.float32(1.0) / (max(abs(den), np.float32(np.exp(-mt))) + eps)
                for c in range(DV):
                    oh[c] *= inv
                _head_layer_norm(oh, nw[hh * DV:(hh + 1) * DV], norm_eps)
            # carry the state to the chunk's end
            g = b[Lc - 1]
            m_next = g + m_prev
            for s in range(Lc):
                m_next = max(m_next, g - b[s] + iv[s])
            decay = np.float32(np.exp(g + m_prev - m_next))
            for r in range(DK):
                nh[r] *= decay
                Cr = Ch[r]
                for c in range(DV):
                    Cr[c] *= decay
            for s in range(Lc):
                w = np.float32(np.exp(g - b[s] + iv[s] - m_next))
                ks = k[t0 + s, hh * DK:(hh + 1) * DK]
                vs = v[t0 + s, hh * DV:(hh + 1) * DV]
                for r in range(DK):
                    kr = w * ks[r]
                    nh[r] += kr
                    Cr = Ch[r]
                    for c in range(DV):
                        Cr[c] += kr * vs[c]
            m[hh] = m_next


@njit(fastmath=FASTMATH, **_JIT)
def slstm(wx, R, b, state, nw, norm_eps, ws, out):
    """sLSTM over T tokens. wx (T, 4*D) gate inputs gate-major (i | f | z | o, each D = heads*d);
    R (heads, 4, d, d) recurrent weights [head, gate, out, in]; b (4*D,); state (4, D) = y, c, n, m
    updated; nw (D,) per-head LayerNorm weight; ws (4, d) scratch; out (T, D) normed y."""
    T = wx.shape[0]
    NH, G, d, _ = R.shape
    D = NH * d
    y, c, n, m = state[0], state[1], state[2], state[3]
    for t in range(T):
        first = True
        for j in range(D):
            if n[j] != 0.0:
                first = False
                break
        for hh in range(NH):
            yh = y[hh * d:(hh + 1) * d]
            for gi in range(G):
                Rg = R[hh, gi]
                off = gi * D + hh * d
                for o in range(d):
                    acc = wx[t, off + o] + b[off + o]
                    Ro = Rg[o]
                    for r in range(d):
                        acc += Ro[r] * yh[r]
                    ws[gi, o] = acc
            for o in range(d):
                j = hh * d + o
                iraw, fraw, zraw, oraw = ws[0, o], ws[1, o], ws[2, o], ws[3, o]
                lfm = m[j] + _logsigmoid(fraw)
                m_new = iraw if first else max(iraw, lfm)
                ia = min(np.float32(np.exp(iraw - m_new)), np.float32(1.0))
                fa = min(np.float32(np.exp(lfm - m_new)), np.float32(1.0))
                c_new = fa * c[j] + ia * np.tanh(zraw)
                n_new = fa * n[j] + ia
                c[j], n[j], m[j] = c_new, n_new, m_new
                y[j] = c_new / n_new / (np.float32(1.0) + np.exp(-oraw))
        for j in range(D):
            out[t, j] = y[j]
        for hh in range(NH):
            _head_layer_norm(out[t, hh * d:(hh + 1) * d], nw[hh * d:(hh + 1) * d], norm_eps)


# ---------------------------------------------------------------- small fused pieces

@njit(fastmath=FASTMATH, **_JIT)
def small_gemm(x, w, out):
    """out = x @ w.T on one thread, for the few-row gate projections (x (T, n), w (rows, n))."""
    for t in range(x.shape[0]):
        xt = x[t]
        for r in range(w.shape[0]):
            wr = w[r]
            acc = np.float32(0.0)
            for j in range(xt.shape[0]):
                acc += wr[j] * xt[j]
            out[t, r] = acc


@njit(fastmath=FASTMATH, **_JIT)
def headwise_linear(x, w, out):
    """Block-diagonal projection: x (T, nb*i) , w (nb, o, i) -> out (T, nb*o)."""
    T = x.shape[0]
    nb, O, I = w.shape
    for t in range(T):
        for bb in range(nb):
            xb = x[t, bb * I:(bb + 1) * I]
            for o in range(O):
                wo = w[bb, o]
                acc = np.float32(0.0)
                for i in range(I):
                    acc += wo[i] * xb[i]
                out[t, bb * O + o] = acc


@njit(inline="always", fastmath=FASTMATH)
def _sigmoid(x):
    return np.float32(1.0) / (np.float32(1.0) + fast_exp(-x))


@njit(fastmath=FASTMATH, **_JIT)
def sigmoid_mul(h, o):
    """In place h *= sigmoid(o) (transformers' output gate)."""
    for t in range(h.shape[0]):
        hr, orow = h[t], o[t]
        for c in range(hr.shape[0]):
            hr[c] *= _sigmoid(orow[c])


@njit(fastmath=FASTMATH, **_JIT)
def silu_mul(gate, up, out):
    """out = silu(gate) * up, serial with a vectorisable exp: one token's FFN costs microseconds
    (waking threads for it costs more than the work)."""
    for t in range(gate.shape[0]):
        gr, ur, orow = gate[t], up[t], out[t]
        for c in range(gr.shape[0]):
            g = gr[c]
            orow[c] = g * _sigmoid(g) * ur[c]


@njit(fastmath=FASTMATH, **_JIT)
def skip_silu_gate(h, skip, xc, z):
    """In place h = (h + skip * xc) * silu(z) (NX-AI's mLSTM layer output)."""
    for t in range(h.shape[0]):
        for c in range(h.shape[1]):
            zz = z[t, c]
            h[t, c] = (h[t, c] + skip[c] * xc[t, c]) * zz * _sigmoid(zz)


@njit(fastmath=FASTMATH, **_JIT)
def gelu_mul(gate, up, out):
    """out = gelu(gate) * up, exact (erf) GELU as torch's default."""
    for t in range(gate.shape[0]):
        for c in range(gate.shape[1]):
            g = gate[t, c]
            out[t, c] = np.float32(0.5) * g * (np.float32(1.0) + math.erf(g * np.float32(0.7071067811865476))) * up[t, c]


@njit(fastmath=FASTMATH, **_JIT)
def softcap_(x, cap):
    """In place x = cap * tanh(x / cap), tanh(y) = 1 - 2 / (e^2y + 1) with the vectorisable exp
    (the logits row is 50k wide: a libm tanh per element would cost a millisecond a token)."""
    for t in range(x.shape[0]):
        xr = x[t]
        for c in range(xr.shape[0]):
            y = xr[c] / cap
            xr[c] = cap * (np.float32(1.0) - np.float32(2.0) / (fast_exp(np.float32(2.0) * y) + np.float32(1.0)))


# ---------------------------------------------------------------- NumPy references (plain, float64)

def _logsigmoid_ref(x):
    return -np.logaddexp(0.0, -x)


def _softcap_ref(x, cap):
    return cap * np.tanh(x / cap) if cap > 0 else x


def _head_ln_ref(h, w, eps):
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(var + eps) * w


def mlstm_recurrent_ref(q, k, v, ig, fg, ib, fb, cap, C, n, m, eps, nw, norm_eps):
    """The mLSTM recurrence token by token, as the paper writes it. Returns (out (T, H*d_v), C, n, m)
    without touching the inputs."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    C, n, m = (np.array(a, np.float64) for a in (C, n, m))
    NH, DK, DV = C.shape
    T = q.shape[0]
    out = np.zeros((T, NH * DV))
    for t in range(T):
        for h in range(NH):
            i = _softcap_ref(ig[t, h] + ib[h], cap)
            lf = _logsigmoid_ref(_softcap_ref(fg[t, h] + fb[h], cap))
            m_new = max(lf + m[h], i)
            fa, ia = np.exp(lf + m[h] - m_new), np.exp(i - m_new)
            qh = q[t, h * DK:(h + 1) * DK] / np.sqrt(DK)
            kh, vh = k[t, h * DK:(h + 1) * DK], v[t, h * DV:(h + 1) * DV]
            C[h] = fa * C[h] + ia * np.outer(kh, vh)
            n[h] = fa * n[h] + ia * kh
            m[h] = m_new
            hv = qh @ C[h] / (max(abs(qh @ n[h]), np.exp(-m_new)) + eps)
            out[t, h * DV:(h + 1) * DV] = _head_ln_ref(hv, nw[h * DV:(h + 1) * DV], norm_eps)
    return out, C, n, m


def mlstm_parallel_ref(q, k, v, ig, fg, ib, fb, cap, C, n, m, eps, nw, norm_eps):
    """The mLSTM in its parallel (attention-like) form over the whole sequence, from a start state:
    D[t, s] = exp(F_t - F_s + i_s - m_t), m_t = max(F_t + m_0, max_s(F_t - F_s + i_s))."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    NH, DK, DV = C.shape
    T = q.shape[0]
    out = np.zeros((T, NH * DV))
    for h in range(NH):
        i = _softcap_ref(ig[:, h] + ib[h], cap)
        F = np.cumsum(_logsigmoid_ref(_softcap_ref(fg[:, h] + fb[h], cap)))
        logD = F[:, None] - F[None, :] + i[None, :]
        logD[np.triu_indices(T, 1)] = -np.inf
        mt = np.maximum(F + m[h], logD.max(1))
        qh = q[:, h * DK:(h + 1) * DK] / np.sqrt(DK)
        kh, vh = k[:, h * DK:(h + 1) * DK], v[:, h * DV:(h + 1) * DV]
        S = (qh @ kh.T) * np.exp(logD - mt[:, None])
        w0 = np.exp(F + m[h] - mt)[:, None]
        num = S @ vh + w0 * (qh @ np.asarray(C[h], np.float64))
        den = S.sum(1, keepdims=True) + w0 * (qh @ np.asarray(n[h], np.float64))[:, None]
        hv = num / (np.maximum(np.abs(den), np.exp(-mt)[:, None]) + eps)
        out[:, h * DV:(h + 1) * DV] = _head_ln_ref(hv, nw[h * DV:(h + 1) * DV], norm_eps)
    return out


def slstm_ref(wx, R, b, state, nw, norm_eps):
    """The sLSTM recurrence as the paper writes it (with NX-AI's first-step m = i). Returns
    (out (T, D), new state (4, D))."""
    NH, G, d, _ = R.shape
    D = NH * d
    y, c, n, m = (np.array(s, np.float64) for s in state)
    out = np.zeros((wx.shape[0], D))
    for t in range(wx.shape[0]):
        first = not n.any()
        raw = np.asarray(wx[t], np.float64) + b
        for h in range(NH):
            for g in range(G):
                raw[g * D + h * d:g * D + (h + 1) * d] += R[h, g] @ y[h * d:(h + 1) * d]
        i, f, z, o = raw[:D], raw[D:2 * D], raw[2 * D:3 * D], raw[3 * D:]
        lfm = m + _logsigmoid_ref(f)
        m_new = i if first else np.maximum(i, lfm)
        ia = np.minimum(np.exp(i - m_new), 1.0)
        fa = np.minimum(np.exp(lfm - m_new), 1.0)
        c = fa * c + ia * np.tanh(z)
        n = fa * n + ia
        m = m_new
        y = c / n / (1.0 + np.exp(-o))
        out[t] = np.concatenate([_head_ln_ref(y[h * d:(h + 1) * d], nw[h * d:(h + 1) * d], norm_eps)
                                 for h in range(NH)])
    return out, np.stack([y, c, n, m])


def headwise_linear_ref(x, w):
    nb, O, I = w.shape
    return np.einsum("tbi,boi->tbo", x.reshape(x.shape[0], nb, I), w).reshape(x.shape[0], nb * O)
