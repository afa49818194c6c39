"""State-space kernels: causal depthwise conv1d with carried state, the Mamba-1 selective
scan, Mamba-2's SSD (chunked for prefill, one step for decode) and its gated RMSNorm.

Every kernel updates the recurrent state in place and writes into a caller-given ``out``,
so decoding allocates nothing. Prefill variants run the sequence inside compiled code,
parallel over channels (Mamba-1) or heads (Mamba-2); decode variants are the same loop
bodies compiled serial (T == 1 is too little work to share between threads).

Exponentials go through ``fast_exp``: the vector libraries LLVM would use for ``exp`` are not
available to Numba here, so a scalar libm call per element would block vectorisation of the
scan's inner loops; ``fast_exp`` is arithmetic only (rel. error < 3e-7) and vectorises.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._common import FASTMATH, JIT

# Python's error model checks every float division for zero, and that branch keeps LLVM from
# vectorising silu's x / (1 + e**-x) in serial loops (measured: the decode conv 2x slower, T=256 10x)
JIT = dict(JIT, error_model="numpy")

CHANNEL_BLOCK = 128       # Mamba-1 prefill: channels per parallel work item


@intrinsic
def _bits_as_f32(typingctx, i):
    """Reinterpret int32 bits as float32 (a vectorisable bitcast)."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = context.cast(builder, args[0], signature.args[0], types.int32)
        return builder.bitcast(v, ir.FloatType())
    return types.float32(i), codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)          # few mantissa bits: k * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)


@njit(inline="always", fastmath=FASTMATH)
def fast_exp(x):
    """exp(x) for float32 x: 2**k * e**r, |r| <= ln2/2, e**r by its degree-7 Taylor polynomial.
    Inputs below -87 give ~1e-38 instead of 0 (harmless where it multiplies a state)."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    k = np.floor(x * _LOG2E + np.float32(0.5))
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _bits_as_f32((np.int32(k) + np.int32(127)) << np.int32(23))


@njit(inline="always", fastmath=FASTMATH)
def softplus(x):
    """log(1 + e**x) = max(x, 0) + log1p(u), u = e**-|x| in (0, 1]; log1p(u) = 2 atanh(s), s = u / (2 + u)
    <= 1/3, by its odd series to s**15: arithmetic only, so it vectorises (rel. error < 5e-7)."""
    u = fast_exp(-abs(x))
    s = u / (np.float32(2.0) + u)
    s2 = s * s
    p = np.float32(1.0 / 15.0)
    p = p * s2 + np.float32(1.0 / 13.0)
    p = p * s2 + np.float32(1.0 / 11.0)
    p = p * s2 + np.float32(1.0 / 9.0)
    p = p * s2 + np.float32(1.0 / 7.0)
    p = p * s2 + np.float32(1.0 / 5.0)
    p = p * s2 + np.float32(1.0 / 3.0)
    p = p * s2 + np.float32(1.0)
    return max(x, np.float32(0.0)) + np.float32(2.0) * s * p


@njit(inline="always", fastmath=FASTMATH)
def silu(x):
    return x / (np.float32(1.0) + fast_exp(-x))


# ------------------------------------------------------------------ causal depthwise conv1d

@njit(inline="always", fastmath=FASTMATH)
def _conv_rows(x, state, w, b, has_bias, apply_silu, out, t0, t1):
    """Output rows t0:t1, all channels: out[t, c] = act(b[c] + sum_k w[k, c] * u[t + k - (K-1), c]),
    u = state ++ x. Rows are independent (the state is only read); inner loops run along channels."""
    K = w.shape[0]
    S = K - 1
    C = x.shape[1]
    if K == 4:                                                # every Mamba checkpoint: one fused pass a row
        w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
        for t in range(max(t0, S), t1):
            o, u0, u1, u2, u3 = out[t], x[t - 3], x[t - 2], x[t - 1], x[t]
            if has_bias and apply_silu:
                for j in range(C):
                    o[j] = silu(b[j] + w0[j] * u0[j] + w1[j] * u1[j] + w2[j] * u2[j] + w3[j] * u3[j])
            else:
                for j in range(C):
                    v = w0[j] * u0[j] + w1[j] * u1[j] + w2[j] * u2[j] + w3[j] * u3[j]
                    if has_bias:
                        v += b[j]
                    o[j] = silu(v) if apply_silu else v
        t1 = min(t1, S)                                       # the first rows (reading the state) below
    for t in range(t0, t1):
        o = out[t]
        if has_bias:
            for j in range(C):
                o[j] = b[j]
        else:
            for j in range(C):
                o[j] = np.float32(0.0)
        for k in range(K):
            wk = w[k]
            i = t + k - S
            if i < 0:
                src = state[S + i]
                for j in range(C):
                    o[j] += wk[j] * src[j]
            else:
                xs = x[i]
                for j in range(C):
                    o[j] += wk[j] * xs[j]
        if apply_silu:
            for j in range(C):
                o[j] = silu(o[j])


@njit(inline="always", fastmath=FASTMATH)
def _conv_shift_state(x, state):
    """state <- the last K-1 rows of state ++ x."""
    T, C = x.shape
    S = state.shape[0]
    if T >= S:
        for r in range(S):
            xs, dst = x[T - S + r], state[r]
            for j in range(C):
                dst[j] = xs[j]
    else:
        for r in range(S - T):
            src, dst = state[r + T], state[r]
            for j in range(C):
                dst[j] = src[j]
        for r in range(T):
            xs, dst = x[r], state[S - T + r]
            for j in range(C):
                dst[j] = xs[j]


@njit(fastmath=FASTMATH, **JIT)
def causal_conv1d(x, state, w, b, apply_silu, out):
    """x (T, C); state (K-1, C) the last K-1 inputs, oldest first, updated; w (K, C); b (C,) or (0,).
    out (T, C) = silu(depthwise causal conv of state ++ x)."""
    _conv_rows(x, state, w, b, b.shape[0] > 0, apply_silu, out, 0, x.shape[0])
    _conv_shift_state(x, state)


CONV_ROWS = 16            # conv prefill: output rows per parallel work item


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def causal_conv1d_parallel(x, state, w, b, apply_silu, out):
    """The same, blocks of CONV_ROWS output rows in parallel (each reads the state, none writes it)."""
    T = x.shape[0]
    for blk in prange((T + CONV_ROWS - 1) // CONV_ROWS):
        t0 = blk * CONV_ROWS
        _conv_rows(x, state, w, b, b.shape[0] > 0, apply_silu, out, t0, min(t0 + CONV_ROWS, T))
    _conv_shift_state(x, state)


# ------------------------------------------------------------------ Mamba-1 selective scan

@njit(inline="always", fastmath=FASTMATH)
def _scan_block(x, dt, A, B, C, D, z, dt_bias, h, out, d0, d1, delta, y):
    """Channels d0:d1 over all T tokens. delta, y: scratch of length >= d1 - d0.
    h, A: (N, d_inner), so the inner loops run along contiguous channels."""
    T = x.shape[0]
    N = A.shape[0]
    nd = d1 - d0
    Db = D[d0:d1]
    bias = dt_bias[d0:d1]
    for t in range(T):
        xt = x[t, d0:d1]
        for j in range(nd):
            delta[j] = softplus(dt[t, d0 + j] + bias[j])
            y[j] = Db[j] * xt[j]
        for n in range(N):
            bn = B[t, n]
            cn = C[t, n]
            An = A[n, d0:d1]
            hn = h[n, d0:d1]
            for j in range(nd):
                dl = delta[j]
                v = fast_exp(dl * An[j]) * hn[j] + dl * bn * xt[j]
                hn[j] = v
                y[j] += v * cn
        for j in range(nd):
            out[t, d0 + j] = y[j] * silu(z[t, d0 + j])


@njit(fastmath=FASTMATH, **JIT)
def selective_scan(x, dt, A, B, C, D, z, dt_bias, h, ws, out):
    """Decode (and short inputs): the scan over T tokens on one thread. ws: (2, d_inner) scratch."""
    _scan_block(x, dt, A, B, C, D, z, dt_bias, h, out, 0, x.shape[1], ws[0], ws[1])


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def selective_scan_parallel(x, dt, A, B, C, D, z, dt_bias, h, out):
    """Prefill: the same scan, blocks of CHANNEL_BLOCK channels in parallel, each over all T."""
    d_inner = x.shape[1]
    nb = (d_inner + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    for b in prange(nb):
        d0 = b * CHANNEL_BLOCK
        d1 = min(d0 + CHANNEL_BLOCK, d_inner)
        ws = np.empty((2, d1 - d0), np.float32)
        _scan_block(x, dt, A, B, C, D, z, dt_bias, h, out, d0, d1, ws[0], ws[1])


@njit(fastmath=FASTMATH, **JIT)
def rms_norm_segments(x, bounds, eps):
    """In place, weightless RMSNorm of each column segment bounds[i]:bounds[i+1] of every row
    (FalconMamba's norms on dt, B and C)."""
    for t in range(x.shape[0]):
        for i in range(bounds.shape[0] - 1):
            seg = x[t, bounds[i]:bounds[i + 1]]
            ss = np.float32(0.0)
            for j in range(seg.shape[0]):
                ss += seg[j] * seg[j]
            inv = np.float32(1.0 / np.sqrt(ss / seg.shape[0] + eps))
            for j in range(seg.shape[0]):
                seg[j] = seg[j] * inv


# ------------------------------------------------------------------ Mamba-2 SSD

@njit(inline="always", fastmath=FASTMATH)
def _dt(raw, bias, dt_min, dt_max):
    return min(max(softplus(raw + bias), dt_min), dt_max)


@njit(inline="always", fastmath=FASTMATH)
def _ssd_step_head(xbc, dt, A, D, dt_bias, h, G, dt_min, dt_max, out, hh):
    H, P, N = h.shape
    d_inner = H * P
    g = hh // (H // G)
    delta = _dt(dt[0, hh], dt_bias[hh], dt_min, dt_max)
    dA = fast_exp(delta * A[hh])
    x = xbc[0, hh * P:(hh + 1) * P]
    Bg = xbc[0, d_inner + g * N:d_inner + (g + 1) * N]
    Cg = xbc[0, d_inner + (G + g) * N:d_inner + (G + g + 1) * N]
    for p in range(P):
        hp = h[hh, p]
        coef = delta * x[p]
        acc = np.float32(0.0)
        for n in range(N):
            v = hp[n] * dA + coef * Bg[n]
            hp[n] = v
            acc += v * Cg[n]
        out[0, hh * P + p] = acc + D[hh] * x[p]


@njit(fastmath=FASTMATH, **JIT)
def ssd_step(xbc, dt, A, D, dt_bias, h, G, dt_min, dt_max, out):
    """One token. xbc (1, H*P + 2*G*N) = x | B | C after the conv; dt (1, H) raw; A, D, dt_bias (H,);
    h (H, P, N) updated; out (1, H*P) = C.h + D*x (ungated)."""
    for hh in range(h.shape[0]):
        _ssd_step_head(xbc, dt, A, D, dt_bias, h, G, dt_min, dt_max, out, hh)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def ssd_step_parallel(xbc, dt, A, D, dt_bias, h, G, dt_min, dt_max, out):
    for hh in prange(h.shape[0]):
        _ssd_step_head(xbc, dt, A, D, dt_bias, h, G, dt_min, dt_max, out, hh)


# ------------------------------------------------------------------ small float32 GEMM tiles
# The SSD's chunk products are (64 x 128) @ (128 x 64)-sized GEMMs. Numba loops that update output
# rows in memory reach ~50 GFLOPS on Zen 4 (every product also loads and stores its output); these
# tiles keep a (rows x 16 * vecs) block of the output in vector registers over the whole inner
# dimension, so each step is vecs loads, rows broadcasts and rows * vecs fused multiply-adds.

_VW = 16                                              # float32 lanes per vector (one zmm, two ymm)
_f32t = ir.FloatType()
_vf = ir.VectorType(_f32t, _VW)


def _row_ptr(builder, arr, row, col):
    """Address (i64) of arr[row, col] of a C-contiguous 2-D float32 array struct."""
    base = builder.ptrtoint(arr.data, ir.IntType(64))
    rs = builder.extract_value(arr.strides, 0)
    return builder.add(base, builder.add(builder.mul(row, rs), builder.mul(col, ir.Constant(ir.IntType(64), 4))))


def _make_tile(rows, vecs):
    @intrinsic
    def tile(typingctx, Y, A, R, i, k, p0, alpha):
        """Y[i:i+rows, p0:p0+16*vecs] = alpha * Y[...] + A[i:i+rows, :k] @ R[:k, p0:p0+16*vecs]
        (Y is not read when alpha == 0); 2-D C-contiguous float32."""
        if not all(isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" and t.dtype == types.float32
                   for t in (Y, A, R)):
            return None
        sig = types.void(Y, A, R, types.intp, types.intp, types.intp, types.float32)

        def codegen(context, builder, sig_, args):
            i64 = ir.IntType(64)
            ya, aa, ra = (context.make_array(t)(context, builder, v) for t, v in zip(sig_.args[:3], args[:3]))
            i, k, p0 = args[3], args[4], args[5]
            alpha = context.cast(builder, args[6], sig_.args[6], types.float32)
            zero = ir.Constant(i64, 0)
            arow = [_row_ptr(builder, aa, builder.add(i, ir.Constant(i64, r)), zero) for r in range(rows)]
            rbase = _row_ptr(builder, ra, zero, p0)
            rstride = builder.extract_value(ra.strides, 0)
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(_vf, None)) for _ in range(vecs)]
                    for _ in range(rows)]
            with cgutils.for_range(builder, k) as loop:
                j = loop.index
                rp = builder.add(rbase, builder.mul(j, rstride))
                rv = []
                for v in range(vecs):
                    ld = builder.load(builder.inttoptr(builder.add(rp, ir.Constant(i64, 4 * _VW * v)),
                                                       _vf.as_pointer()))
                    ld.align = 4
                    rv.append(ld)
                for r in range(rows):
                    a = builder.load(builder.inttoptr(builder.add(arow[r], builder.mul(j, ir.Constant(i64, 4))),
                                                      _f32t.as_pointer()))
                    av = builder.insert_element(ir.Constant(_vf, ir.Undefined), a, ir.Constant(ir.IntType(32), 0))
                    av = builder.shuffle_vector(av, av, ir.Constant(ir.VectorType(ir.IntType(32), _VW), [0] * _VW))
                    for v in range(vecs):
                        acc = accs[r][v]
                        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_vf, [_vf] * 3),
                                                            f"llvm.fma.v{_VW}f32")
                        builder.store(builder.call(fn, [av, rv[v], builder.load(acc)]), acc)
            keep = builder.fcmp_unordered("!=", alpha, ir.Constant(_f32t, 0.0))
            av = builder.insert_element(ir.Constant(_vf, ir.Undefined), alpha, ir.Constant(ir.IntType(32), 0))
            av = builder.shuffle_vector(av, av, ir.Constant(ir.VectorType(ir.IntType(32), _VW), [0] * _VW))
            for r in range(rows):
                yp = _row_ptr(builder, ya, builder.add(i, ir.Constant(i64, r)), p0)
                for v in range(vecs):
                    ptr = builder.inttoptr(builder.add(yp, ir.Constant(i64, 4 * _VW * v)), _vf.as_pointer())
                    acc = builder.load(accs[r][v])
                    with builder.if_then(keep):
                        old = builder.load(ptr)
                        old.align = 4
                        builder.store(builder.fadd(acc, builder.fmul(av, old)), accs[r][v])
                    st = builder.store(builder.load(accs[r][v]), ptr)
                    st.align = 4
            return context.get_dummy_value()

        return sig, codegen
    return tile


_tile4x4, _tile1x4, _tile4x1, _tile1x1 = _make_tile(4, 4), _make_tile(1, 4), _make_tile(4, 1), _make_tile(1, 1)


@njit(fastmath=FASTMATH, **JIT)
def _gemm(Y, A, R, m, k, alpha):
    """Y[:m] = alpha * Y[:m] + A[:m, :k] @ R[:k] (Y not read when alpha == 0): Y (>= m, P), A (>= m, >= k),
    R (>= k, P), all C-contiguous float32. Register tiles over columns in multiples of 16; the last
    P % 16 columns by plain loops."""
    P = Y.shape[1]
    alpha = np.float32(alpha)
    i = 0
    while i < m:
        four = i + 4 <= m
        p0 = 0
        while p0 + 4 * _VW <= P:
            if four:
                _tile4x4(Y, A, R, i, k, p0, alpha)
            else:
                _tile1x4(Y, A, R, i, k, p0, alpha)
            p0 += 4 * _VW
        while p0 + _VW <= P:
            if four:
                _tile4x1(Y, A, R, i, k, p0, alpha)
            else:
                _tile1x1(Y, A, R, i, k, p0, alpha)
            p0 += _VW
        for r in range(i, i + 4 if four else i + 1):
            yr, ar = Y[r], A[r]
            for p in range(p0, P):
                yr[p] = alpha * yr[p] if alpha != 0 else np.float32(0.0)
            for j in range(k):
                a, rj = ar[j], R[j]
                for p in range(p0, P):
                    yr[p] += a * rj[p]
        i += 4 if four else 1


@njit(inline="always")
def _transpose(a, out):
    """out = a.T for 2-D arrays, in 16 x 16 blocks (a column-order sweep of a 32 KB state misses L1)."""
    R, C = a.shape
    for r0 in range(0, R, 16):
        for c0 in range(0, C, 16):
            for r in range(r0, min(r0 + 16, R)):
                ar = a[r]
                for c in range(c0, min(c0 + 16, C)):
                    out[c, r] = ar[c]


@njit(fastmath=FASTMATH, **JIT)
def _ssd_group_chunk(xbc, G, g, c0, Lc, Cg, Bt, cb):
    """Group g's C (Lc, N) and B^T (N, Lc) of the chunk starting at token c0, and C B^T (Lc, Lc)."""
    N = Cg.shape[1]
    d_inner = xbc.shape[1] - 2 * G * N
    for l in range(Lc):
        Cl = Cg[l]
        src = xbc[c0 + l, d_inner + (G + g) * N:d_inner + (G + g + 1) * N]
        for n in range(N):
            Cl[n] = src[n]
        Bl = xbc[c0 + l, d_inner + g * N:d_inner + (g + 1) * N]
        for n in range(N):
            Bt[n, l] = Bl[n]
    _gemm(cb, Cg, Bt, Lc, N, _ZERO)                           # only its lower triangle is read


@njit(fastmath=FASTMATH, **JIT)
def _ssd_head(xbc, dt, A, D, dt_bias, h, G, L, dt_min, dt_max, out, hh, Cs, BT, CB):
    """Head hh through every chunk (see ssd_chunked)."""
    T = xbc.shape[0]
    H, P, N = h.shape
    g = hh // (H // G)
    nch = Cs.shape[1]
    hT = np.empty((N, P), np.float32)                         # the state, transposed
    _transpose(h[hh], hT)
    X = np.empty((L, P), np.float32)                          # this chunk's x, then dt-weighted x
    Y = np.empty((L, P), np.float32)
    M = np.zeros((L, L), np.float32)                          # stays zero above the diagonal
    dtc = np.empty(L, np.float32)
    cum = np.empty(L, np.float64)                              # float64: differences stay exact
    Dh = D[hh]
    for c in range(nch):
        c0 = c * L
        Lc = min(L, T - c0)
        acc64 = 0.0
        for l in range(Lc):
            dtc[l] = _dt(dt[c0 + l, hh], dt_bias[hh], dt_min, dt_max)
            acc64 += np.float64(dtc[l]) * np.float64(A[hh])
            cum[l] = acc64
        for l in range(Lc):
            src, Xl = xbc[c0 + l, hh * P:(hh + 1) * P], X[l]
            for p in range(P):
                Xl[p] = src[p]
        cb = CB[g, c]
        for l in range(Lc):
            Ml, cbl = M[l], cb[l]
            for s in range(l + 1):
                Ml[s] = cbl[s] * fast_exp(np.float32(cum[l] - cum[s])) * dtc[s]
        _gemm(Y, Cs[g, c], hT, Lc, N, _ZERO)                      # C h^T
        for l in range(Lc):
            el = fast_exp(np.float32(cum[l]))
            Xl, Yl = X[l], Y[l]
            for p in range(P):
                Yl[p] = el * Yl[p] + Dh * Xl[p]
        # this chunk's own tokens: rows in blocks of 4 need M up to the block's last row (zeros above)
        for l0 in range(0, Lc, 4):
            m = min(4, Lc - l0)
            _gemm(Y[l0:], M[l0:], X, m, l0 + m, _ONE)
        for l in range(Lc):
            src, yl = Y[l], out[c0 + l, hh * P:(hh + 1) * P]
            for p in range(P):
                yl[p] = src[p]
        eL = fast_exp(np.float32(cum[Lc - 1]))
        for s in range(Lc):                                   # X <- (exp(cum_L - cum_s) dt_s) X
            ws = fast_exp(np.float32(cum[Lc - 1] - cum[s])) * dtc[s]
            Xs = X[s]
            for p in range(P):
                Xs[p] *= ws
        _gemm(hT, BT[g, c], X, N, Lc, eL)                         # h <- eL h + B^T X
    _transpose(hT, h[hh])


_ZERO, _ONE = np.float32(0.0), np.float32(1.0)      # one float32 alpha type: _gemm compiles once


@njit(fastmath=FASTMATH, **JIT)
def _ssd_shared(xbc, G, N, L):
    """Per group and chunk, shared by the group's heads: C (L, N), B^T (N, L) and C B^T (L, L).
    Serial (a few % of the SSD's work) and outside ssd_chunked, where parallel=True would make each
    np.zeros and loop a parallel region of its own to compile (cold compile 18 -> 7 s)."""
    T = xbc.shape[0]
    nch = (T + L - 1) // L
    Cs = np.zeros((G, nch, L, N), np.float32)
    BT = np.zeros((G, nch, N, L), np.float32)
    CB = np.zeros((G, nch, L, L), np.float32)
    for g in range(G):
        for c in range(nch):
            _ssd_group_chunk(xbc, G, g, c * L, min(L, T - c * L), Cs[g, c], BT[g, c], CB[g, c])
    return Cs, BT, CB


@njit(parallel=True, **JIT)
def ssd_chunked(xbc, dt, A, D, dt_bias, h, G, chunk, dt_min, dt_max, out):
    """The SSD algorithm over T tokens in chunks of ``chunk`` (same arguments as ssd_step, T tokens).
    Per chunk of L tokens and head, with cum = cumsum(dt * A) inside the chunk, X (L, P), C, B (L, N):

        M = tril(C B^T * exp(cum_l - cum_s) * dt_s)                    (L, L)
        Y = exp(cum) * (C h^T) + M X + D X                             (L, P)
        h = exp(cum_L) h + ((exp(cum_L - cum) * dt) X)^T B             (P, N)

    three small GEMMs (``_gemm``, register tiles); the state is kept transposed (N, P) while a
    head runs through its chunks. Heads run in parallel, each through a function of its own (a
    small parallel region compiles much faster); nothing is allocated per chunk."""
    T = xbc.shape[0]
    H, P, N = h.shape
    L = min(chunk, T)
    nch = (T + L - 1) // L
    Cs, BT, CB = _ssd_shared(xbc, G, N, L)
    for hh in prange(H):
        _ssd_head(xbc, dt, A, D, dt_bias, h, G, L, dt_min, dt_max, out, np.int64(hh), Cs, BT, CB)


@njit(inline="always", fastmath=FASTMATH)
def _gated_rms_norm_row(y, z, weight, group, eps, out, t):
    yt, zt, ot = y[t], z[t], out[t]
    for g0 in range(0, yt.shape[0], group):
        ys, zs, os, ws = yt[g0:g0 + group], zt[g0:g0 + group], ot[g0:g0 + group], weight[g0:g0 + group]
        ss = np.float32(0.0)
        for j in range(group):
            v = ys[j] * silu(zs[j])
            os[j] = v
            ss += v * v
        inv = np.float32(1.0 / np.sqrt(ss / group + eps))
        for j in range(group):
            os[j] = os[j] * inv * ws[j]


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gated_rms_norm(y, z, weight, group, eps, out):
    """out = weight * rmsnorm_per_group(y * silu(z)); y, z, out (T, d); groups of ``group`` columns."""
    for t in prange(y.shape[0]):
        _gated_rms_norm_row(y, z, weight, group, eps, out, t)


@njit(fastmath=FASTMATH, **JIT)
def gated_rms_norm_serial(y, z, weight, group, eps, out):
    """The same, on one thread (decode: waking threads costs more than the work)."""
    for t in range(y.shape[0]):
        _gated_rms_norm_row(y, z, weight, group, eps, out, t)


# ------------------------------------------------------------------ references (NumPy, float64)

def _softplus_ref(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _silu_ref(x):
    return x / (1.0 + np.exp(-x))


def causal_conv1d_ref(x, state, w, b=None, apply_silu=True):
    """x (T, C), state (K-1, C), w (K, C) -> (out (T, C), new state); nothing is modified."""
    u = np.concatenate([state.astype(np.float64), x.astype(np.float64)])          # (K-1 + T, C)
    T = x.shape[0]
    out = np.zeros((T, x.shape[1]))
    for k in range(w.shape[0]):
        out += w[k].astype(np.float64) * u[k:k + T]
    if b is not None and len(b):
        out += b
    if apply_silu:
        out = _silu_ref(out)
    return out.astype(np.float32), u[T:].astype(np.float32).copy()


def selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, h):
    """Mamba-1, token by token. x, dt, z (T, d); A, h (N, d); B, C (T, N); D, dt_bias (d,).
    -> (out (T, d), new h); nothing is modified."""
    x, z = x.astype(np.float64), z.astype(np.float64)
    delta = _softplus_ref(dt.astype(np.float64) + dt_bias)
    h = h.astype(np.float64).copy()
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        h = np.exp(delta[t] * A) * h + delta[t] * B[t][:, None] * x[t]
        out[t] = (C[t] @ h + D * x[t]) * _silu_ref(z[t])
    return out.astype(np.float32), h.astype(np.float32)


def ssd_scan_ref(xbc, dt, A, D, dt_bias, h, G, dt_limit=(0.0, np.inf)):
    """Mamba-2 as its recurrence, token by token (what ssd_step does T times).
    -> (out (T, H*P) ungated, new h (H, P, N)); nothing is modified."""
    H, P, N = h.shape
    d = H * P
    x = xbc[:, :d].reshape(-1, H, P).astype(np.float64)
    B = np.repeat(xbc[:, d:d + G * N].reshape(-1, G, N), H // G, axis=1).astype(np.float64)
    C = np.repeat(xbc[:, d + G * N:].reshape(-1, G, N), H // G, axis=1).astype(np.float64)
    delta = np.clip(_softplus_ref(dt.astype(np.float64) + dt_bias), *dt_limit)        # (T, H)
    h = h.astype(np.float64).copy()
    out = np.empty((xbc.shape[0], H, P))
    for t in range(xbc.shape[0]):
        dA = np.exp(delta[t] * A)[:, None, None]
        h = h * dA + (delta[t][:, None] * x[t])[:, :, None] * B[t][:, None, :]
        out[t] = np.einsum("hpn,hn->hp", h, C[t]) + D[:, None] * x[t]
    return out.reshape(-1, d).astype(np.float32), h.astype(np.float32)


def ssd_chunked_ref(xbc, dt, A, D, dt_bias, h, G, chunk, dt_limit=(0.0, np.inf)):
    """Mamba-2's chunked SSD written with whole-chunk matrices (the algorithm ssd_chunked runs).
    -> (out, new h) like ssd_scan_ref."""
    H, P, N = h.shape
    d = H * P
    T = xbc.shape[0]
    x = xbc[:, :d].reshape(T, H, P).astype(np.float64)
    B = np.repeat(xbc[:, d:d + G * N].reshape(T, G, N), H // G, axis=1).astype(np.float64)
    C = np.repeat(xbc[:, d + G * N:].reshape(T, G, N), H // G, axis=1).astype(np.float64)
    delta = np.clip(_softplus_ref(dt.astype(np.float64) + dt_bias), *dt_limit)
    h = h.astype(np.float64).copy()
    out = np.empty((T, H, P))
    for c0 in range(0, T, chunk):
        sl = slice(c0, min(c0 + chunk, T))
        L = sl.stop - c0
        cum = np.cumsum(delta[sl] * A, axis=0)                                     # (L, H)
        seg = cum[:, None, :] - cum[None, :, :]                                    # (l, s, H)
        decay = np.where(np.tril(np.ones((L, L), bool))[:, :, None], np.exp(np.minimum(seg, 0)), 0.0)
        CB = np.einsum("lhn,shn->lsh", C[sl], B[sl])
        Mx = delta[sl][:, :, None] * x[sl]                                          # (s, H, P)
        y_diag = np.einsum("lsh,shp->lhp", CB * decay, Mx)
        y_off = np.einsum("lhn,hpn->lhp", C[sl], h) * np.exp(cum)[:, :, None]
        out[sl] = y_diag + y_off + D[None, :, None] * x[sl]
        to_end = np.exp(cum[-1][None, :] - cum)                                    # (s, H)
        h = h * np.exp(cum[-1])[:, None, None] + np.einsum("sh,shp,shn->hpn", to_end, Mx, B[sl])
    return out.reshape(T, d).astype(np.float32), h.astype(np.float32)


def gated_rms_norm_ref(y, z, weight, group, eps):
    v = y.astype(np.float64) * _silu_ref(z.astype(np.float64))
    T, d = v.shape
    g = v.reshape(T, d // group, group)
    g = g / np.sqrt((g * g).mean(-1, keepdims=True) + eps)
    return (g.reshape(T, d) * weight).astype(np.float32)
