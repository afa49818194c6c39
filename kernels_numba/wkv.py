"""RWKV kernels: the WKV recurrences of RWKV v4, v5/v6 and v7, LayerNorm and the ln_x GroupNorm.

Each WKV kernel takes a whole sequence (T, C) and the layer's state, walks the tokens in order
and updates the state in place: T == 1 is the decode step, T > 1 prefill, one compiled call
either way. Channels (v4) or heads (v5-v7) are independent: ``wkv*`` splits them across
threads, ``wkv*_serial`` (the same loop body) runs them on one, for decode steps too small to
pay for waking threads. Norms and the token shift are cheap and always serial.
rwkv7_layer_decode / rwkv6_layer_decode run a whole layer for one token in one call (decode).

State layouts (float32, owned by edgerun.cache.RecurrentState):
    v4     aa, bb, pp (C,)        numerator, denominator and their shared exponent; bb == 0
                                   means "no history" (the zeroed state), whatever pp holds
    v5/v6  s (H, N, N)            s[h, j, i]: key channel j, value channel i (BlinkDL's layout)
    v7     s (H, N, N)            s[h, i, j]: value channel i, key channel j (BlinkDL's layout)

Inner loops index slices with the loop counter (see linear.py): head slices are taken once per
(head, token) so LLVM vectorises the loops over a head's channels.
"""
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ._common import FASTMATH, JIT
from .fused import quantize_both, row_dot
from .ssm import _bits_as_f32, fast_exp

# numpy's error model: a float division is not checked for zero, so loops holding one vectorise
JIT = dict(JIT, error_model="numpy")


# ------------------------------------------------------------------ v4

@njit(inline="always")
def _wkv4_channel(c, k, v, u, w, aa, bb, pp, out):
    a, b, p = aa[c], bb[c], pp[c]
    if b == 0.0:                          # empty history: its exponent is -inf
        p = np.float32(-1e38)
    uc, wc = u[c], w[c]
    for t in range(k.shape[0]):
        kk, vv = k[t, c], v[t, c]
        ww = uc + kk
        q = max(p, ww)
        e1, e2 = np.exp(p - q), np.exp(ww - q)
        out[t, c] = (e1 * a + e2 * vv) / (e1 * b + e2)
        ww = p + wc
        q = max(ww, kk)
        e1, e2 = np.exp(ww - q), np.exp(kk - q)
        a = e1 * a + e2 * vv
        b = e1 * b + e2
        p = q
    aa[c], bb[c], pp[c] = a, b, p


@njit(parallel=True, **JIT)
def wkv4(k, v, u, w, aa, bb, pp, out):
    """RWKV-4 with the stable exponent trick.  k, v, out (T, C); u = time_first, w = -exp(time_decay) (C,)."""
    for c in prange(k.shape[1]):
        _wkv4_channel(c, k, v, u, w, aa, bb, pp, out)


@njit(**JIT)
def wkv4_serial(k, v, u, w, aa, bb, pp, out):
    """wkv4 on one thread (decode: too little work to pay for waking threads)."""
    for c in range(k.shape[1]):
        _wkv4_channel(c, k, v, u, w, aa, bb, pp, out)


# ------------------------------------------------------------------ v5 / v6

@njit(inline="always", fastmath=FASTMATH)
def _wkv6_head(h, r, k, v, w, u, s, out):
    N = s.shape[1]
    sh = s[h]
    lo, hi = h * N, (h + 1) * N
    for t in range(r.shape[0]):
        rt, kt, vt, wt, ut = r[t, lo:hi], k[t, lo:hi], v[t, lo:hi], w[t, lo:hi], u[lo:hi]
        ot = out[t, lo:hi]
        for i in range(N):
            ot[i] = 0.0
        for j in range(N):
            row = sh[j]
            kj, rj, uj, wj = kt[j], rt[j], ut[j], wt[j]
            for i in range(N):
                kv = kj * vt[i]
                ot[i] += rj * (uj * kv + row[i])
                row[i] = kv + wj * row[i]


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def wkv6(r, k, v, w, u, s, out):
    """RWKV-5/6 per-head matrix state.  r, k, v, w, out (T, C); u (C,); s (H, N, N) [key, value].

        out_t[i] = sum_j r_t[j] (u[j] k_t[j] v_t[i] + s[j, i]);   s[j, i] = k_t[j] v_t[i] + w_t[j] s[j, i]
    w is the per-step decay in (0, 1): constant over t for v5 (pass it repeated), data-dependent for v6.
    """
    for h in prange(s.shape[0]):
        _wkv6_head(h, r, k, v, w, u, s, out)


@njit(fastmath=FASTMATH, **JIT)
def wkv6_serial(r, k, v, w, u, s, out):
    for h in range(s.shape[0]):
        _wkv6_head(h, r, k, v, w, u, s, out)


# ------------------------------------------------------------------ v7

@njit(inline="always", fastmath=FASTMATH)
def _wkv7_head(h, r, w, k, v, a, b, s, out):
    N = s.shape[1]
    sh = s[h]
    lo, hi = h * N, (h + 1) * N
    for t in range(r.shape[0]):
        rt, wt, kt, at, bt = r[t, lo:hi], w[t, lo:hi], k[t, lo:hi], a[t, lo:hi], b[t, lo:hi]
        vt, ot = v[t, lo:hi], out[t, lo:hi]
        for i in range(N):
            row = sh[i]
            sa = np.float32(0.0)
            for j in range(N):
                sa += row[j] * at[j]
            vi = vt[i]
            y = np.float32(0.0)
            for j in range(N):
                x = row[j] * wt[j] + sa * bt[j] + vi * kt[j]
                row[j] = x
                y += x * rt[j]
            ot[i] = y


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def wkv7(r, w, k, v, a, b, s, out):
    """RWKV-7 generalised delta rule.  r, w, k, v, a, b, out (T, C); s (H, N, N) [value, key].

        s = s diag(w_t) + (s a_t) b_t^T + v_t k_t^T;   out_t = s r_t
    with a = -kk (the normalised removal key) and b = kk * iclr, as in BlinkDL's RWKV7_OP.
    """
    for h in prange(s.shape[0]):
        _wkv7_head(h, r, w, k, v, a, b, s, out)


@njit(fastmath=FASTMATH, **JIT)
def wkv7_serial(r, w, k, v, a, b, s, out):
    for h in range(s.shape[0]):
        _wkv7_head(h, r, w, k, v, a, b, s, out)


# ------------------------------------------------------------------ v7, fused time-mix tail

@njit(inline="always", fastmath=FASTMATH)
def _sigm(x):
    """sigmoid by ssm.fast_exp: arithmetic only, so loops over a head's channels vectorise."""
    return np.float32(1.0) / (np.float32(1.0) + fast_exp(-x))


@njit(inline="always", fastmath=FASTMATH)
def _tanh(x):
    return np.float32(1.0) - np.float32(2.0) / (fast_exp(np.float32(2.0) * x) + np.float32(1.0))


@njit(inline="always", fastmath=FASTMATH)
def _v7_tail_head(h, r, wl, k, v, al, vl, vfirst, g, w0, a0, v0, k_k, k_a, r_k, lnx_w, lnx_b, eps, s, out):
    N = s.shape[1]
    sh = s[h]
    lo, hi = h * N, (h + 1) * N
    mix_v = vfirst.shape[0] > 0
    w = np.empty(N, np.float32)
    a = np.empty(N, np.float32)
    b = np.empty(N, np.float32)
    w0h, a0h, v0h, kkh, kah, rkh = w0[lo:hi], a0[lo:hi], v0[lo:hi], k_k[lo:hi], k_a[lo:hi], r_k[lo:hi]
    lw, lb = lnx_w[lo:hi], lnx_b[lo:hi]
    for t in range(r.shape[0]):
        rt, kt, vt, gt, ot = r[t, lo:hi], k[t, lo:hi], v[t, lo:hi], g[t, lo:hi], out[t, lo:hi]
        wlt, alt = wl[t, lo:hi], al[t, lo:hi]
        nrm = np.float32(0.0)
        for j in range(N):
            kk = kt[j] * kkh[j]
            a[j] = kk
            nrm += kk * kk
        nrm = max(np.sqrt(nrm), np.float32(1e-12))
        bonus = np.float32(0.0)
        for j in range(N):
            iclr = _sigm(a0h[j] + alt[j])
            kk = a[j] / nrm
            a[j] = -kk
            b[j] = kk * iclr
            w[j] = fast_exp(np.float32(-0.606531) * _sigm(w0h[j] + wlt[j]))
            kt[j] = kt[j] * (np.float32(1.0) + (iclr - np.float32(1.0)) * kah[j])
            bonus += rt[j] * kt[j] * rkh[j]
        if mix_v:
            vft, vlt = vfirst[t, lo:hi], vl[t, lo:hi]
            for i in range(N):
                vt[i] = vt[i] + (vft[i] - vt[i]) * _sigm(v0h[i] + vlt[i])
        for i in range(N):                         # the WKV step, out = s r
            row = sh[i]
            sa = np.float32(0.0)
            for j in range(N):
                sa += row[j] * a[j]
            vi = vt[i]
            y = np.float32(0.0)
            for j in range(N):
                x = row[j] * w[j] + sa * b[j] + vi * kt[j]
                row[j] = x
                y += x * rt[j]
            ot[i] = y
        m = 0.0                                    # ln_x over the head, bonus, gate
        for i in range(N):
            m += ot[i]
        m /= N
        var = 0.0
        for i in range(N):
            var += (ot[i] - m) ** 2
        inv = 1.0 / np.sqrt(var / N + eps)
        for i in range(N):
            y = np.float32((ot[i] - m) * inv) * lw[i] + lb[i]
            ot[i] = (y + bonus * vt[i]) * gt[i]


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def v7_tail(r, wl, k, v, al, vl, vfirst, g, w0, a0, v0, k_k, k_a, r_k, lnx_w, lnx_b, eps, s, out):
    """Everything of RWKV-7's time mixing between the projections and the output matrix, per head:
    decay exp(-e^-0.5 sigmoid(w0 + wl)), iclr sigmoid(a0 + al), the normalised removal key, the
    k and v (value residual, when vfirst is non-empty) updates, the WKV step, ln_x, the r.k.r_k
    bonus and the gate.  k and v are updated in place (v is the layer's v_first at layer 0).
    All (T, C) but the (C,) parameters; vl, vfirst may be (0, 0) at layer 0; s (H, N, N)."""
    for h in prange(s.shape[0]):
        _v7_tail_head(h, r, wl, k, v, al, vl, vfirst, g, w0, a0, v0, k_k, k_a, r_k, lnx_w, lnx_b, eps, s, out)


@njit(fastmath=FASTMATH, **JIT)
def v7_tail_serial(r, wl, k, v, al, vl, vfirst, g, w0, a0, v0, k_k, k_a, r_k, lnx_w, lnx_b, eps, s, out):
    for h in range(s.shape[0]):
        _v7_tail_head(h, r, wl, k, v, al, vl, vfirst, g, w0, a0, v0, k_k, k_a, r_k, lnx_w, lnx_b, eps, s, out)


# ------------------------------------------------------------------ v7 low-rank projections

def _wf(x):
    """A LoRA weight element as float32: float32 as is, uint16 as bfloat16 bits."""


@overload(_wf, jit_options=JIT)
def _wf_impl(x):
    if isinstance(x, types.Integer):                 # bf16: the high half of a float32
        return lambda x: _bits_as_f32(np.int32(x) << np.int32(16))
    return lambda x: np.float32(x)


def lora_weight_f32(a: np.ndarray) -> np.ndarray:
    """The float32 values of a LoRA weight: float32 as is, bf16 bits (uint16) widened."""
    return (a.astype(np.uint32) << 16).view(np.float32) if a.dtype == np.uint16 else a

@njit(inline="always", fastmath=FASTMATH)
def _lora_act(h, nt, act):
    for i in range(nt):
        hi = h[i]
        if act == 1:
            for d in range(hi.shape[0]):
                hi[d] = _tanh(hi[d])
        elif act == 2:
            for d in range(hi.shape[0]):
                hi[d] = _sigm(hi[d])


@njit(fastmath=FASTMATH, **JIT)
def lora_rows(x, t0, nt, down, up_t, act, h, spare, out):
    """out[t] = act(x[t] @ down.T) @ up_t for tokens t0 .. t0+nt-1 (nt <= 4): the down projection as
    dot products of four tokens with two rows of ``down`` (D, C) at a time, the up one as rows of
    ``up_t`` (D, C), four at a time, scaled and added to four token rows (one loaded and stored
    per four multiply-adds). Weights float32 or bf16 bits (uint16). act: 0 none, 1 tanh,
    2 sigmoid.  h (4, D), spare (3, C) scratch.

    A rank D that the steps don't divide takes no remainder loops: the last down step repeats its
    last row (writing the same sum twice), the last up step adds rows with coefficient 0.  A
    compiled function of its own, called per block of four tokens: inlined into each caller (four
    projections of v7, two of v6, in a parallel and a serial kernel, for two weight dtypes) it
    made the first run compile for minutes; the call costs nothing measurable."""
    D = down.shape[0]
    if nt == 1:                                   # decode: one token, no wasted lanes
        xt, ot, ht = x[t0], out[t0], h[0]
        for d in range(0, D, 2):
            d1 = min(d + 1, D - 1)
            da, db = down[d], down[d1]
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            for c in range(da.shape[0]):
                s0 += xt[c] * _wf(da[c])
                s1 += xt[c] * _wf(db[c])
            ht[d], ht[d1] = s0, s1
        _lora_act(h, 1, act)
        for c in range(ot.shape[0]):
            ot[c] = 0.0
        for d in range(0, D, 4):
            ua, ub, uc, ud = up_t[d], up_t[min(d + 1, D - 1)], up_t[min(d + 2, D - 1)], up_t[min(d + 3, D - 1)]
            h0 = ht[d]
            h1 = ht[d + 1] if d + 1 < D else np.float32(0.0)
            h2 = ht[d + 2] if d + 2 < D else np.float32(0.0)
            h3 = ht[d + 3] if d + 3 < D else np.float32(0.0)
            for c in range(ua.shape[0]):
                ot[c] += h0 * _wf(ua[c]) + h1 * _wf(ub[c]) + h2 * _wf(uc[c]) + h3 * _wf(ud[c])
        return
    x0, x1, x2, x3 = x[t0], x[t0 + min(1, nt - 1)], x[t0 + min(2, nt - 1)], x[t0 + min(3, nt - 1)]
    for d in range(0, D, 2):
        d1 = min(d + 1, D - 1)
        da, db = down[d], down[d1]
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        q0 = np.float32(0.0)
        q1 = np.float32(0.0)
        q2 = np.float32(0.0)
        q3 = np.float32(0.0)
        for c in range(da.shape[0]):
            wa, wb = _wf(da[c]), _wf(db[c])
            s0 += x0[c] * wa
            s1 += x1[c] * wa
            s2 += x2[c] * wa
            s3 += x3[c] * wa
            q0 += x0[c] * wb
            q1 += x1[c] * wb
            q2 += x2[c] * wb
            q3 += x3[c] * wb
        h[0, d], h[1, d], h[2, d], h[3, d] = s0, s1, s2, s3
        h[0, d1], h[1, d1], h[2, d1], h[3, d1] = q0, q1, q2, q3
    _lora_act(h, nt, act)
    # a short chunk (nt < 4) sends its unused lanes to scratch rows
    o0 = out[t0]
    o1 = out[t0 + 1] if nt > 1 else spare[0]
    o2 = out[t0 + 2] if nt > 2 else spare[1]
    o3 = out[t0 + 3] if nt > 3 else spare[2]
    for c in range(o0.shape[0]):
        o0[c] = 0.0
        o1[c] = 0.0
        o2[c] = 0.0
        o3[c] = 0.0
    for d in range(0, D, 4):
        ua, ub, uc, ud = up_t[d], up_t[min(d + 1, D - 1)], up_t[min(d + 2, D - 1)], up_t[min(d + 3, D - 1)]
        a0, a1, a2, a3 = h[0, d], h[1, d], h[2, d], h[3, d]
        b0 = b1 = b2 = b3 = c0 = c1 = c2 = c3 = e0 = e1 = e2 = e3 = np.float32(0.0)
        if d + 1 < D:
            b0, b1, b2, b3 = h[0, d + 1], h[1, d + 1], h[2, d + 1], h[3, d + 1]
        if d + 2 < D:
            c0, c1, c2, c3 = h[0, d + 2], h[1, d + 2], h[2, d + 2], h[3, d + 2]
        if d + 3 < D:
            e0, e1, e2, e3 = h[0, d + 3], h[1, d + 3], h[2, d + 3], h[3, d + 3]
        for c in range(ua.shape[0]):
            wa, wb, wc, wd = _wf(ua[c]), _wf(ub[c]), _wf(uc[c]), _wf(ud[c])
            o0[c] += a0 * wa + b0 * wb + c0 * wc + e0 * wd
            o1[c] += a1 * wa + b1 * wb + c1 * wc + e1 * wd
            o2[c] += a2 * wa + b2 * wb + c2 * wc + e2 * wd
            o3[c] += a3 * wa + b3 * wb + c3 * wc + e3 * wd


@njit(fastmath=FASTMATH, **JIT)
def v7_lora_span(mixed, t_lo, t_hi, w1, w2t, a1, a2t, v1, v2t, g1, g2t, out):
    """v7_lora for tokens t_lo .. t_hi-1 on the calling thread (decode, short prompts)."""
    D = max(w1.shape[0], a1.shape[0], v1.shape[0], g1.shape[0])
    h = np.empty((4, D), np.float32)
    spare = np.empty((3, out.shape[2]), np.float32)
    for t0 in range(t_lo, t_hi, 4):
        nt = min(4, t_hi - t0)
        lora_rows(mixed[1], t0, nt, w1, w2t, 1, h, spare, out[0])           # decay:  tanh(xw w1) w2
        lora_rows(mixed[4], t0, nt, a1, a2t, 0, h, spare, out[1])           # iclr:   xa a1 a2
        if v1.shape[0] > 0:
            lora_rows(mixed[3], t0, nt, v1, v2t, 0, h, spare, out[2])       # value residual: xv v1 v2
        lora_rows(mixed[5], t0, nt, g1, g2t, 2, h, spare, out[3])           # gate:   sigmoid(xg g1) g2


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def v7_lora(mixed, w1, w2t, a1, a2t, v1, v2t, g1, g2t, out):
    """RWKV-7's four low-rank projections of a layer in one call: out[0] = tanh(xw w1) w2,
    out[1] = xa a1 a2, out[2] = xv v1 v2 (left alone when v1 has no rows: layer 0),
    out[3] = sigmoid(xg g1) g2.  mixed (6, T, C): shift_mix's xr, xw, xk, xv, xa, xg;
    w1, a1, v1, g1 (D, C) as stored (out, in); w2t, a2t, v2t, g2t (D, C) the up matrices
    transposed; out (4, T, C).  Tokens split in spans of 32 over the threads (v7_lora_span
    runs one span on the calling thread)."""
    T = mixed.shape[1]
    span = 32
    for p in prange((T + span - 1) // span):
        v7_lora_span(mixed, p * span, min(T, (p + 1) * span), w1, w2t, a1, a2t, v1, v2t, g1, g2t, out)


# ------------------------------------------------------------------ v6 data-dependent mixing

@njit(fastmath=FASTMATH, **JIT)
def v6_mix_span(x, prev, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2t, t_lo, t_hi, out):
    """v6_mix for tokens t_lo .. t_hi-1 on the calling thread (decode, short prompts)."""
    T, C = x.shape
    M, D = maa_w2.shape[0], maa_w2.shape[1]
    n = t_hi - t_lo
    base = np.empty((n, C), np.float32)
    h = np.empty((4, max(D, decay_w1.shape[0])), np.float32)
    spare = np.empty((3, C), np.float32)
    for t in range(t_lo, t_hi):                   # xx + (x[t-1] - xx) * maa_x
        xt, bt = x[t], base[t - t_lo]
        st = prev if t == 0 else x[t - 1]
        for c in range(C):
            bt[c] = xt[c] + (st[c] - xt[c]) * maa_x[c]
    for m in range(M):                            # out[m] = tanh(base maa_w1[m]) maa_w2[m], then the lerp
        om = out[m]
        for t0 in range(0, n, 4):
            lora_rows(base, t0, min(4, n - t0), maa_w1[m * D:(m + 1) * D], maa_w2[m], 1, h, spare,
                       om[t_lo:t_hi])
        mm = maa[m]
        for t in range(t_lo, t_hi):
            xt, ot = x[t], om[t]
            st = prev if t == 0 else x[t - 1]
            for c in range(C):
                ot[c] = xt[c] + (st[c] - xt[c]) * (mm[c] + ot[c])
    # the decay: w = exp(-exp(decay + tanh(xw decay_w1) decay_w2)), written over xw (out[0]) token
    # block by token block: a block's xw rows are read before its w rows are written
    o0 = out[0]
    wblk = np.empty((4, C), np.float32)
    for t0 in range(t_lo, t_hi, 4):
        nt = min(4, t_hi - t0)
        lora_rows(o0[t0:t0 + nt], 0, nt, decay_w1, decay_w2t, 1, h, spare, wblk)
        for i in range(nt):
            wi, ot = wblk[i], o0[t0 + i]
            for c in range(C):
                ot[c] = fast_exp(-fast_exp(decay[c] + wi[c]))


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def v6_mix(x, prev, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2t, out):
    """RWKV-6's token shift with data-dependent lerps and its decay, in one call:
        base = x + (x[t-1] - x) * maa_x;   dyn[m] = tanh(base maa_w1[m]) maa_w2[m]
        out[m] = x + (x[t-1] - x) * (maa[m] + dyn[m])          m = w, k, v, r, g
        out[0] = exp(-exp(decay + tanh(out[0] decay_w1) decay_w2))    (the per-step decay, in place of xw)
    x (T, C); prev (C,) the previous call's last row; maa_x (C,); maa (5, C); maa_w1 (5 D, C) and
    decay_w1 (Dd, C) as stored (out, in); maa_w2 (5, D, C); decay_w2t (Dd, C) the transposed up
    matrix; out (5, T, C).  Tokens split in spans of 32 over the threads (v6_mix_span runs one
    span on the calling thread)."""
    T = x.shape[0]
    span = 32
    for p in prange((T + span - 1) // span):
        v6_mix_span(x, prev, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2t, p * span,
                    min(T, (p + 1) * span), out)


@njit(fastmath=FASTMATH, **JIT)
def group_norm_silu(x, gate, groups, weight, bias, eps, out):
    """ln_x then the silu gate: out = group_norm(x) * gate * sigmoid(gate).  x, gate, out (T, C)."""
    T, C = x.shape
    n = C // groups
    for t in range(T):
        for g in range(groups):
            xg, og, gg = x[t, g * n:(g + 1) * n], out[t, g * n:(g + 1) * n], gate[t, g * n:(g + 1) * n]
            wg, bg = weight[g * n:(g + 1) * n], bias[g * n:(g + 1) * n]
            m = np.float32(0.0)
            for j in range(n):
                m += xg[j]
            m /= n
            var = np.float32(0.0)
            for j in range(n):
                var += (xg[j] - m) ** 2
            inv = np.float32(1.0) / np.sqrt(var / n + np.float32(eps))
            for j in range(n):
                og[j] = ((xg[j] - m) * inv * wg[j] + bg[j]) * gg[j] * _sigm(gg[j])


# ------------------------------------------------------------------ one-token layer steps (decode)

@njit(**JIT)
def _copy(src, dst):
    """dst[:] = src as a call: in a parallel=True function an array expression outside prange is
    a parallel region of its own (~1 us each; measured in paged_attention.decode_attention)."""
    for i in range(src.shape[0]):
        dst[i] = src[i]


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def rwkv7_layer_decode(x, s, att_prev, ffn_prev, vfirst, first, p, wr, wk, wv, wo, wfk, wfv, sc):
    """One token through one RWKV-7 layer in one compiled call; x (1, C) updated in place.

    The same ops as the model's op-by-op path (layer_norm, shift_mix, the r/k/v rows, v7_lora_span,
    v7_tail_serial, the output rows, the channel mix), with each matrix's activations quantized
    once (fused.quantize_both) and rows taken by fused.row_dot; residuals added as the output and
    value rows are stored.  s (H, N, N), att_prev, ffn_prev (C,): the layer's state.  vfirst (1, C):
    layer 0 (first) writes its v there, later layers mix it in.  p: (ln (ln1 w, b, ln2 w, b), eps,
    mix (6, C), lora (v7_lora's 8), tail (v7_tail's 8), lnx_eps, ffn_mix (1, C)).  wr, wk, wv, wo,
    wfk (ffn key), wfv (ffn value): row containers (fused.rows_of), arguments of their own (Numba's
    parfor lowering finds a named tuple used in a prange only as an argument).  sc: scratch
    (CPUBackend.prepare_rwkv_layer)."""
    ln, eps, mix, lora, tail, lnx_eps, ffn_mix = p
    xx, mixed, rkv, lout, y, mixed2, hid, empty, act_r, act_k, act_v, act_y, act_f, act_h = sc
    C = x.shape[1]
    xrow = x[0]
    # ---- time mixing
    layer_norm(x, ln[0], ln[1], eps, xx)
    shift_mix(xx, att_prev, mix, mixed)                     # xr, xw, xk, xv, xa, xg
    _copy(xx[0], att_prev)
    # views one per statement: a tuple assignment of four views left one unwritten in a prange
    # below (Numba 0.68 parfor lowering; see tests/test_rwkv.py test_fused_decode_equals_op_by_op)
    xr = mixed[0, 0]
    xk = mixed[2, 0]
    xv = mixed[3, 0]
    quantize_both(xr, act_r)
    quantize_both(xk, act_k)
    quantize_both(xv, act_v)
    rr = rkv[0, 0]
    kr = rkv[1, 0]
    vr = rkv[2, 0]
    for i in prange(3 * C):
        if i < C:
            rr[i] = row_dot(wr, i, xr, act_r)
        elif i < 2 * C:
            kr[i - C] = row_dot(wk, i - C, xk, act_k)
        else:
            vr[i - 2 * C] = row_dot(wv, i - 2 * C, xv, act_v)
    v7_lora_span(mixed, 0, 1, lora[0], lora[1], lora[2], lora[3], lora[4], lora[5], lora[6], lora[7], lout)
    if first:
        v7_tail_serial(rkv[0], lout[0], rkv[1], rkv[2], lout[1], empty, empty, lout[3], tail[0], tail[1],
                       tail[2], tail[3], tail[4], tail[5], tail[6], tail[7], lnx_eps, s, y)
        vfirst[0, :] = vr
    else:
        v7_tail_serial(rkv[0], lout[0], rkv[1], rkv[2], lout[1], lout[2], vfirst, lout[3], tail[0], tail[1],
                       tail[2], tail[3], tail[4], tail[5], tail[6], tail[7], lnx_eps, s, y)
    yr = y[0]
    quantize_both(yr, act_y)
    for i in prange(C):
        xrow[i] += row_dot(wo, i, yr, act_y)
    # ---- channel mixing: relu(k)^2 rows, then the value rows
    layer_norm(x, ln[2], ln[3], eps, xx)
    shift_mix(xx, ffn_prev, ffn_mix, mixed2)
    _copy(xx[0], ffn_prev)
    xf = mixed2[0, 0]
    quantize_both(xf, act_f)
    for i in prange(hid.shape[0]):
        t = max(row_dot(wfk, i, xf, act_f), np.float32(0.0))
        hid[i] = t * t
    quantize_both(hid, act_h)
    for i in prange(C):
        xrow[i] += row_dot(wfv, i, hid, act_h)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def rwkv6_layer_decode(x, s, att_prev, ffn_prev, vfirst, first, p, wr, wk, wv, wg, wo, wfk, wfr, wfv, sc):
    """One token through one RWKV-6 layer in one compiled call (as rwkv7_layer_decode); x (1, C)
    updated in place; vfirst and first unused (the arguments of both versions are the same).  p: (ln, eps, mix6 (v6_mix's 7), u (C,), lnx_w, lnx_b, heads, lnx_eps,
    ffn_mix (2, C)); the matrices' row containers; sc: scratch (CPUBackend.prepare_rwkv_layer)."""
    ln, eps, m6, u, lnx_w, lnx_b, heads, lnx_eps, ffn_mix = p
    xx, m5, rkvg, y, yg, mixed2, hid, rf, act_r, act_k, act_v, act_g, act_y, act_f, act_fr, act_h = sc
    C = x.shape[1]
    F = hid.shape[0]
    xrow = x[0]
    # ---- time mixing
    layer_norm(x, ln[0], ln[1], eps, xx)
    v6_mix_span(xx, att_prev, m6[0], m6[1], m6[2], m6[3], m6[4], m6[5], m6[6], 0, 1, m5)  # w, xk, xv, xr, xg
    _copy(xx[0], att_prev)
    xk = m5[1, 0]                               # views one per statement (see rwkv7_layer_decode)
    xv = m5[2, 0]
    xr = m5[3, 0]
    xg = m5[4, 0]
    quantize_both(xr, act_r)
    quantize_both(xk, act_k)
    quantize_both(xv, act_v)
    quantize_both(xg, act_g)
    rr = rkvg[0, 0]
    kr = rkvg[1, 0]
    vr = rkvg[2, 0]
    gr = rkvg[3, 0]
    for i in prange(4 * C):
        if i < C:
            rr[i] = row_dot(wr, i, xr, act_r)
        elif i < 2 * C:
            kr[i - C] = row_dot(wk, i - C, xk, act_k)
        elif i < 3 * C:
            vr[i - 2 * C] = row_dot(wv, i - 2 * C, xv, act_v)
        else:
            gr[i - 3 * C] = row_dot(wg, i - 3 * C, xg, act_g)
    wkv6_serial(rkvg[0], rkvg[1], rkvg[2], m5[0], u, s, y)
    group_norm_silu(y, rkvg[3], heads, lnx_w, lnx_b, lnx_eps, yg)
    ygr = yg[0]
    quantize_both(ygr, act_y)
    for i in prange(C):
        xrow[i] += row_dot(wo, i, ygr, act_y)
    # ---- channel mixing: relu(k)^2 and r rows together, then the value rows gated by sigmoid(r)
    layer_norm(x, ln[2], ln[3], eps, xx)
    shift_mix(xx, ffn_prev, ffn_mix, mixed2)
    _copy(xx[0], ffn_prev)
    xf = mixed2[0, 0]
    xfr = mixed2[1, 0]
    quantize_both(xf, act_f)
    quantize_both(xfr, act_fr)
    for i in prange(F + C):
        if i < F:
            t = max(row_dot(wfk, i, xf, act_f), np.float32(0.0))
            hid[i] = t * t
        else:
            rf[i - F] = row_dot(wfr, i - F, xfr, act_fr)
    quantize_both(hid, act_h)
    for i in prange(C):
        xrow[i] += row_dot(wfv, i, hid, act_h) / (np.float32(1.0) + np.exp(-rf[i]))


# ------------------------------------------------------------------ channel-mix activations

@njit(fastmath=FASTMATH, **JIT)
def relu_square_(x):
    """x = max(x, 0)^2 in place (the channel mix's key), one pass.  x (T, F)."""
    for t in range(x.shape[0]):
        xt = x[t]
        for j in range(xt.shape[0]):
            v = max(xt[j], np.float32(0.0))
            xt[j] = v * v


@njit(fastmath=FASTMATH, **JIT)
def mul_sigmoid_(x, r):
    """x *= sigmoid(r) in place (the v4-v6 channel mix's receptance gate), one pass.  x, r (T, C)."""
    for t in range(x.shape[0]):
        xt, rt = x[t], r[t]
        for j in range(xt.shape[0]):
            xt[j] = xt[j] / (np.float32(1.0) + np.exp(-rt[j]))


# ------------------------------------------------------------------ norms

@njit(fastmath=FASTMATH, **JIT)
def layer_norm(x, weight, bias, eps, out):
    """out[t] = (x[t] - mean) / sqrt(var + eps) * weight + bias.   x, out (T, d).  Sums in float64,
    reassociated (fastmath) so that they vectorise: in order they were a latency chain per element."""
    T, d = x.shape
    for t in range(T):
        xt, ot = x[t], out[t]
        m = 0.0
        for j in range(d):
            m += xt[j]
        m /= d
        var = 0.0
        for j in range(d):
            var += (xt[j] - m) ** 2
        inv = 1.0 / np.sqrt(var / d + eps)
        for j in range(d):
            ot[j] = np.float32((xt[j] - m) * inv) * weight[j] + bias[j]


@njit(fastmath=FASTMATH, **JIT)
def group_norm(x, groups, weight, bias, eps, out):
    """ln_x: LayerNorm over each of ``groups`` equal slices of a row (torch.nn.functional.group_norm
    on a (T, C) input).  x, out (T, C); weight, bias (C,)."""
    T, C = x.shape
    n = C // groups
    for t in range(T):
        for g in range(groups):
            xg, og = x[t, g * n:(g + 1) * n], out[t, g * n:(g + 1) * n]
            wg, bg = weight[g * n:(g + 1) * n], bias[g * n:(g + 1) * n]
            m = 0.0
            for j in range(n):
                m += xg[j]
            m /= n
            var = 0.0
            for j in range(n):
                var += (xg[j] - m) ** 2
            inv = 1.0 / np.sqrt(var / n + eps)
            for j in range(n):
                og[j] = np.float32((xg[j] - m) * inv) * wg[j] + bg[j]


# ------------------------------------------------------------------ token shift + mixing

@njit(fastmath=FASTMATH, **JIT)
def shift_mix(x, prev, mix, out):
    """Token shift and lerp in one pass: out[m, t] = x[t] + (x[t-1] - x[t]) * mix[m], x[-1] = prev.

    x (T, C); prev (C,) the last row of the previous call; mix (M, C); out (M, T, C).
    BlinkDL's v4/v5 ``x*mix + sx*(1-mix)`` is this with mix' = 1 - mix (the caller passes it)."""
    T, C = x.shape
    M = mix.shape[0]
    for t in range(T):
        xt = x[t]
        st = prev if t == 0 else x[t - 1]
        for m in range(M):
            mm, ot = mix[m], out[m, t]
            for c in range(C):
                ot[c] = xt[c] + (st[c] - xt[c]) * mm[c]


@njit(fastmath=FASTMATH, **JIT)
def shift_mix_dyn(x, prev, mix, dyn, out):
    """RWKV-6's data-dependent lerps: out[m, t] = x[t] + (x[t-1] - x[t]) * (mix[m] + dyn[m, t]).
    x (T, C); prev (C,); mix (M, C); dyn, out (M, T, C)."""
    T, C = x.shape
    for t in range(T):
        xt = x[t]
        st = prev if t == 0 else x[t - 1]
        for m in range(mix.shape[0]):
            mm, dt, ot = mix[m], dyn[m, t], out[m, t]
            for c in range(C):
                ot[c] = xt[c] + (st[c] - xt[c]) * (mm[c] + dt[c])


# ------------------------------------------------------------------ references

def wkv4_ref(k, v, u, w, aa, bb, pp):
    """NumPy twin of wkv4 in float64 without the exponent trick's state: returns (out, aa, bb, pp)."""
    k, v = k.astype(np.float64), v.astype(np.float64)
    a, b, p = aa.astype(np.float64), bb.astype(np.float64), pp.astype(np.float64).copy()
    p = np.where(b == 0, -1e300, p)
    out = np.empty_like(k)
    for t in range(k.shape[0]):
        ww = u + k[t]
        q = np.maximum(p, ww)
        e1, e2 = np.exp(p - q), np.exp(ww - q)
        out[t] = (e1 * a + e2 * v[t]) / (e1 * b + e2)
        ww = p + w
        q = np.maximum(ww, k[t])
        e1, e2 = np.exp(ww - q), np.exp(k[t] - q)
        a, b, p = e1 * a + e2 * v[t], e1 * b + e2, q
    return out.astype(np.float32), a.astype(np.float32), b.astype(np.float32), p.astype(np.float32)


def wkv6_ref(r, k, v, w, u, s):
    """NumPy twin of wkv6 (BlinkDL's att_one_v5/v6 per token): returns (out, s)."""
    T, C = r.shape
    H, N = s.shape[:2]
    s = s.astype(np.float64).copy()
    out = np.empty((T, C))
    uh = u.reshape(H, N, 1)
    for t in range(T):
        rt, kt, vt = r[t].reshape(H, 1, N), k[t].reshape(H, N, 1), v[t].reshape(H, 1, N)
        kv = kt @ vt                                              # (H, N, N)
        out[t] = (rt @ (uh * kv + s)).reshape(C)
        s = kv + w[t].reshape(H, N, 1) * s
    return out.astype(np.float32), s.astype(np.float32)


def wkv7_ref(r, w, k, v, a, b, s):
    """NumPy twin of wkv7 (rwkv_v7_numpy's state update per token): returns (out, s)."""
    T, C = r.shape
    H, N = s.shape[:2]
    s = s.astype(np.float64).copy()
    out = np.empty((T, C))
    for t in range(T):
        rt, wt, kt, vt, at, bt = (z[t].reshape(H, N, 1).astype(np.float64) for z in (r, w, k, v, a, b))
        s = s * wt.transpose(0, 2, 1) + (s @ at) @ bt.transpose(0, 2, 1) + vt @ kt.transpose(0, 2, 1)
        out[t] = (s @ rt).reshape(C)
    return out.astype(np.float32), s.astype(np.float32)


def layer_norm_ref(x, weight, bias, eps):
    x = x.astype(np.float64)
    m = x.mean(-1, keepdims=True)
    return ((x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * weight + bias).astype(np.float32)


def group_norm_ref(x, groups, weight, bias, eps):
    T, C = x.shape
    g = x.astype(np.float64).reshape(T, groups, C // groups)
    m = g.mean(-1, keepdims=True)
    y = (g - m) / np.sqrt(((g - m) ** 2).mean(-1, keepdims=True) + eps)
    return (y.reshape(T, C) * weight + bias).astype(np.float32)


def shift_mix_ref(x, prev, mix):
    sx = np.concatenate([prev[None], x[:-1]])
    return np.stack([x + (sx - x) * m for m in mix]).astype(np.float32)


def v7_tail_ref(r, wl, k, v, al, vl, vfirst, g, w0, a0, v0, k_k, k_a, r_k, lnx_w, lnx_b, eps, s):
    """NumPy twin of v7_tail (BlinkDL's RWKV_x070_TMix after the projections): returns (out, k, v, s)."""
    T, C = r.shape
    H, N = s.shape[:2]
    f = np.float64
    sig = lambda x: 1 / (1 + np.exp(-x))
    w = np.exp(-np.exp(-0.5) * sig(w0 + wl.astype(f)))
    iclr = sig(a0 + al.astype(f))
    kk = (k * k_k).astype(f).reshape(T, H, N)
    kk = (kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)).reshape(T, C)
    k = k * (1 + (iclr - 1) * k_a)
    if vfirst.shape[0]:
        v = v + (vfirst - v) * sig(v0 + vl.astype(f))
    y, s = wkv7_ref(r, w.astype(np.float32), k.astype(np.float32), v.astype(np.float32),
                    (-kk).astype(np.float32), (kk * iclr).astype(np.float32), s)
    y = group_norm_ref(y, H, lnx_w, lnx_b, eps).astype(f)
    y += ((r * k * r_k).reshape(T, H, N).sum(-1, keepdims=True) * v.reshape(T, H, N)).reshape(T, C)
    return (y * g).astype(np.float32), k.astype(np.float32), v.astype(np.float32), s


def shift_mix_dyn_ref(x, prev, mix, dyn):
    sx = np.concatenate([prev[None], x[:-1]])
    return np.stack([x + (sx - x) * (m + d) for m, d in zip(mix, dyn)]).astype(np.float32)


def v7_lora_ref(mixed, w1, w2t, a1, a2t, v1, v2t, g1, g2t):
    """NumPy twin of v7_lora: (4, T, C) float32 (out[2] zero when v1 has no rows)."""
    f = np.float64
    w1, w2t, a1, a2t, v1, v2t, g1, g2t = (lora_weight_f32(a) for a in (w1, w2t, a1, a2t, v1, v2t, g1, g2t))
    x = mixed.astype(f)
    out = np.zeros((4, *mixed.shape[1:]))
    out[0] = np.tanh(x[1] @ w1.T.astype(f)) @ w2t.astype(f)
    out[1] = (x[4] @ a1.T.astype(f)) @ a2t.astype(f)
    if v1.shape[0]:
        out[2] = (x[3] @ v1.T.astype(f)) @ v2t.astype(f)
    out[3] = 1 / (1 + np.exp(-(x[5] @ g1.T.astype(f)))) @ g2t.astype(f)
    return out.astype(np.float32)


def v6_mix_ref(x, prev, maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2t):
    """NumPy twin of v6_mix (BlinkDL's RWKV_Tmix_x060 up to the projections): (5, T, C) float32."""
    f = np.float64
    maa_w1, maa_w2, decay_w1, decay_w2t = (lora_weight_f32(a) for a in (maa_w1, maa_w2, decay_w1, decay_w2t))
    x = x.astype(f)
    sx = np.concatenate([prev[None].astype(f), x[:-1]]) - x
    M, D = maa_w2.shape[:2]
    lora = np.tanh((x + sx * maa_x) @ maa_w1.T.astype(f))                  # (T, 5 D)
    out = np.stack([x + sx * (maa[m] + lora[:, m * D:(m + 1) * D] @ maa_w2[m].astype(f)) for m in range(M)])
    out[0] = np.exp(-np.exp(decay + np.tanh(out[0] @ decay_w1.T.astype(f)) @ decay_w2t.astype(f)))
    return out.astype(np.float32)


def group_norm_silu_ref(x, gate, groups, weight, bias, eps):
    g = gate.astype(np.float64)
    return (group_norm_ref(x, groups, weight, bias, eps) * g / (1 + np.exp(-g))).astype(np.float32)
