"""Attention over a paged KV cache: keys and values live in fixed-size blocks of a pool,
found through the sequence's block table.

    q, out      (T, n_heads, head_dim)          the new queries, at positions start .. start+T-1
    k_pool      (n_blocks, n_kv_heads, block, head_dim), v_pool the same
    table       (n_logical,) int32               logical block -> physical block

tiled_attention serves prefill (and decode when head_dim is not a multiple of 16): work items
are (kv head, tile of queries), so each K/V block is read once for every query head sharing it
(GQA) and every query of the tile; the softmax is online, one rescale per block (flash-attention
style), and no (T, L) score matrix exists. decode_attention serves one query (T = 1, head_dim a
multiple of 16): per kv head, the group's scores over all positions, a vectorised exp, then the
weighted values, the dot products in explicit 16-float vectors (3x faster at 64 and 512
positions; benchmarks/decode_attention.py). A window w > 0 limits query p to keys (p - w, p];
softcap > 0 applies softcap * tanh(score / softcap) (Gemma 2 style).

int8 KV: the pools hold int8 and k_scale / v_scale (n_blocks, n_kv_heads, block) one float32
scale per token per head (quantized=True); a float32 pool passes quantized=False and
scales of shape (1, 1, 1), never read.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._common import FASTMATH, JIT
from .simd import _f32, _i32, _i64, _intr, _load, _prefetch_l2, _splat_f
from .ssm import _bits_as_f32, fast_exp

Q_TILE = 8


@njit(**JIT)
def paged_attention(q, k_pool, v_pool, k_scale, v_scale, quantized, table, start, scale, window, softcap, out):
    """out = attention of q over the cache (see the module's docstring): decode_attention for
    one query with head_dim a multiple of 16, tiled_attention otherwise."""
    if q.shape[0] == 1 and q.shape[2] % 16 == 0:
        decode_attention(q, k_pool, v_pool, k_scale, v_scale, quantized, table, start, scale, window, softcap, out)
    else:
        tiled_attention(q, k_pool, v_pool, k_scale, v_scale, quantized, table, start, scale, window, softcap, out)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def tiled_attention(q, k_pool, v_pool, k_scale, v_scale, quantized, table, start, scale, window, softcap, out):
    """Any number of queries: (kv head, tile of Q_TILE queries) a job, online softmax a block."""
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


# ------------------------------------------------------------------ decode (T = 1)
# Numba's loops for one query left the decode attention 3-4x short of the FPU (measured at 64
# and 512 positions, 32 query / 8 KV heads of 64 on Zen 4: 17 and 110 us): a dot product of 64
# reloads the query from L1 and ends in its own horizontal sum, the weighted sum of values goes
# through memory at every position (no register accumulators: the output may alias the values),
# and np.exp is a scalar call. Below, the two dot-product phases are LLVM vector IR (any target
# lowers <16 x float>: zmm, 2 ymm, or NEON) and exp is a polynomial the loop vectoriser widens.

_v16f32 = ir.VectorType(_f32, 16)
_v4f32 = ir.VectorType(_f32, 4)
_v16i8 = ir.VectorType(ir.IntType(8), 16)
HEADS = 4      # query heads a call (one GQA group, or part of one)
POS = 4        # positions a step of the scores: HEADS x POS vector accumulators
# lane l of the 4-level transposed sum below holds accumulator bitrev4(l); this puts k in lane k
_UNREV = [int(f"{k:04b}"[::-1], 2) for k in range(16)]
_HALVES = ([list(range(8)) + list(range(16, 24)), list(range(8, 16)) + list(range(24, 32))],
           [[0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27],
            [4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31]],
           [[0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29],
            [2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31]],
           [[0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30],
            [1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31]])


def _i(v):
    return ir.Constant(_i64, v)


def _shape(context, builder, aty, aval):
    """(data address, shape[0], shape[1]) of a 2-D C array, i64 values."""
    a = context.make_array(aty)(context, builder, aval)
    return (builder.ptrtoint(a.data, _i64), builder.extract_value(a.shape, 0),
            builder.extract_value(a.shape, 1))


def _chunk(builder, base, row, c, d, int8):
    """16 floats from row `row`, column 16c of a (rows, d) float32 or int8 array at base."""
    off = builder.add(builder.mul(row, d), builder.mul(c, _i(16)))
    if int8:
        return builder.sitofp(_load(builder, base, off, _v16i8), _v16f32)
    return _load(builder, base, builder.mul(off, _i(4)), _v16f32)


def _fma(builder, a, b, acc):
    return _intr(builder, "llvm.fma.v16f32", _v16f32, [a, b, acc])


def _min(builder, a, b):
    return builder.select(builder.icmp_signed("<", a, b), a, b)


def _sum16x16(builder, accs):
    """16 vectors -> one whose lane k is the sum of accs[k]: 15 adds and 30 shuffles in 4 levels
    (pairs of vectors folded into halves), instead of a 4-level horizontal sum for each."""
    v = accs
    for lo, hi in _HALVES:
        v = [builder.fadd(builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, 16), lo)),
                          builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, 16), hi)))
             for a, b in zip(v[::2], v[1::2])]
    return builder.shuffle_vector(v[0], v[0], ir.Constant(ir.VectorType(_i32, 16), _UNREV))


def _arrays_ok(a, block, b) -> bool:
    """The typing both kernels below accept: 2-D C arrays, float32 but for the cache block
    (float32 or int8)."""
    return (all(isinstance(x, types.Array) and x.ndim == 2 and x.layout == "C" for x in (a, block, b))
            and a.dtype == b.dtype == types.float32 and block.dtype in (types.float32, types.int8))


def _heads(builder, G, g0):
    """The HEADS query rows of a call from g0 (past the group's last: the last again, computed
    and not stored) and how many are real (G - g0, HEADS or more for a full call)."""
    return ([_min(builder, builder.add(g0, _i(h)), builder.sub(G, _i(1))) for h in range(HEADS)],
            builder.sub(G, g0))


@intrinsic
def qk_scores(typingctx, qs, kb, j0, n, s, t0, g0):
    """s[g0 + h, t0 + i] = qs[g0 + h] . kb[j0 + i] for h < min(4, G - g0), i < n, from qs (G, d)
    float32 and a block's keys kb (bs, d) float32 or int8 (d a multiple of 16). Positions go 4 at
    a time: s gets up to 3 values past t0 + n (its rows need that much room), which the next
    block's call overwrites."""
    if not _arrays_ok(qs, kb, s):
        return None
    int8 = kb.dtype == types.int8
    sig = types.void(qs, kb, types.int64, types.int64, s, types.int64, types.int64)

    def codegen(context, builder, sig_, args):
        qa, G, d = _shape(context, builder, sig_.args[0], args[0])
        ka = _shape(context, builder, sig_.args[1], args[1])[0]
        sa, _, ls = _shape(context, builder, sig_.args[4], args[4])
        j0_, n_, t0_, g0_ = args[2], args[3], args[5], args[6]
        heads, nh = _heads(builder, G, g0_)
        dc = builder.udiv(d, _i(16))
        accs = [cgutils.alloca_once(builder, _v16f32) for _ in range(HEADS * POS)]
        steps = builder.udiv(builder.add(n_, _i(POS - 1)), _i(POS))
        with cgutils.for_range(builder, steps) as step:
            i0 = builder.mul(step.index, _i(POS))
            rows = [builder.add(j0_, _min(builder, builder.add(i0, _i(p)), builder.sub(n_, _i(1)))) for p in range(POS)]
            for a in accs:
                builder.store(ir.Constant(_v16f32, None), a)
            with cgutils.for_range(builder, dc) as ch:
                qv = [_chunk(builder, qa, h, ch.index, d, False) for h in heads]
                kv = [_chunk(builder, ka, r, ch.index, d, int8) for r in rows]
                for h in range(HEADS):
                    for p in range(POS):
                        a = accs[h * POS + p]
                        builder.store(_fma(builder, qv[h], kv[p], builder.load(a)), a)
            tot = _sum16x16(builder, [builder.load(a) for a in accs])
            for h in range(HEADS):
                with builder.if_then(builder.icmp_signed(">", nh, _i(h))):
                    part = builder.shuffle_vector(tot, tot, ir.Constant(ir.VectorType(_i32, 4), [h * POS + p for p in range(POS)]))
                    off = builder.add(builder.mul(builder.add(g0_, _i(h)), ls), builder.add(t0_, i0))
                    st = builder.store(part, builder.inttoptr(builder.add(sa, builder.mul(off, _i(4))), _v4f32.as_pointer()))
                    st.align = 4
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def pv_accumulate(typingctx, p, vb, j0, n, t0, g0, o):
    """o[g0 + h] += sum_i p[g0 + h, t0 + i] * vb[j0 + i] for h < min(4, G - g0), i < n: weights p
    (G, L) float32, a block's values vb (bs, d) float32 or int8, o (G, d) float32 (d a multiple
    of 16); the sums stay in registers over the block, 4 heads x 4 chunks of 16 at a time."""
    if not _arrays_ok(p, vb, o):
        return None
    int8 = vb.dtype == types.int8
    sig = types.void(p, vb, types.int64, types.int64, types.int64, types.int64, o)

    def codegen(context, builder, sig_, args):
        pa, _, ls = _shape(context, builder, sig_.args[0], args[0])
        va = _shape(context, builder, sig_.args[1], args[1])[0]
        oa, G, d = _shape(context, builder, sig_.args[6], args[6])
        j0_, n_, t0_, g0_ = args[2], args[3], args[4], args[5]
        heads, nh = _heads(builder, G, g0_)
        dc = builder.udiv(d, _i(16))
        accs = [cgutils.alloca_once(builder, _v16f32) for _ in range(HEADS * 4)]

        def chunks(c0, width):
            for a in accs[:HEADS * width]:
                builder.store(ir.Constant(_v16f32, None), a)
            with cgutils.for_range(builder, n_) as it:
                row = builder.add(j0_, it.index)
                vv = [_chunk(builder, va, row, builder.add(c0, _i(c)), d, int8) for c in range(width)]
                for h, hr in enumerate(heads):
                    off = builder.add(builder.mul(hr, ls), builder.add(t0_, it.index))
                    w = _splat_f(builder, _load(builder, pa, builder.mul(off, _i(4)), _f32), 16)
                    for c in range(width):
                        a = accs[h * width + c]
                        builder.store(_fma(builder, w, vv[c], builder.load(a)), a)
            for h in range(HEADS):
                with builder.if_then(builder.icmp_signed(">", nh, _i(h))):
                    for c in range(width):
                        off = builder.mul(builder.add(builder.mul(builder.add(g0_, _i(h)), d),
                                                      builder.mul(builder.add(c0, _i(c)), _i(16))), _i(4))
                        ptr = builder.inttoptr(builder.add(oa, off), _v16f32.as_pointer())
                        old = builder.load(ptr)
                        old.align = 4
                        st = builder.store(builder.fadd(old, builder.load(accs[h * width + c])), ptr)
                        st.align = 4

        with cgutils.for_range(builder, builder.udiv(dc, _i(4))) as cg:
            chunks(builder.mul(cg.index, _i(4)), 4)
        with cgutils.for_range(builder, builder.urem(dc, _i(4))) as cr:
            chunks(builder.add(builder.mul(builder.udiv(dc, _i(4)), _i(4)), cr.index), 1)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", fastmath=FASTMATH)
def exp_shifted(x, m):
    """x[:] = exp(x - m) for x <= m with ssm.fast_exp (arithmetic only, so the loop vectorises:
    np.exp is a scalar call here, no SVML)."""
    for j_ in range(x.shape[0]):
        x[j_] = fast_exp(x[j_] - m)


@njit(inline="always")
def _max(x):
    """max of a float32 vector (no NaN) through integers that order as the floats do (the bits of
    a negative float with its magnitude bits flipped): an integer max vectorises, a float max
    stays scalar here (4x slower at 512 values)."""
    xi_ = x.view(np.int32)
    m_ = np.int32(-2147483648)
    for j_ in range(xi_.shape[0]):
        v_ = xi_[j_]
        m_ = max(m_, v_ ^ ((v_ >> 31) & np.int32(0x7FFFFFFF)))
    return _bits_as_f32(m_ ^ ((m_ >> 31) & np.int32(0x7FFFFFFF)))


AHEAD = 8     # half-blocks hinted ahead of the one being read (below)


@njit(inline="always")
def _prefetch_ahead(k_pool, v_pool, table, kv, first, last, step):
    """Hint half-block `step` of a kv head's reads: its K blocks first..last, then its V blocks,
    each as two halves. A block of one head is 1-4 KB (a page of its own, 32 KB from the next
    block of that head), where the hardware prefetcher starts cold each time: at 1000 positions
    the in-place attention read its KV at ~12 GB/s without hints."""
    nb_ = last + 1 - first
    if step < 4 * nb_:
        v_ = step >= 2 * nb_
        r_ = step - 2 * nb_ if v_ else step
        half_ = k_pool.shape[2] * k_pool.shape[3] * k_pool.itemsize // 2
        off_ = (np.int64(table[first + r_ // 2]) * k_pool.shape[1] + kv) * 2 * half_ + (r_ % 2) * half_
        prefetch_lines(v_pool if v_ else k_pool, off_, max(1, half_ // 64))


SPLIT_MIN = 256   # positions a job at least, when a long context is split between jobs
JOBS = 16         # jobs a long context is split into, about (a constant: numba.get_num_threads()
                  # inside a kernel keeps it out of the cache)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def decode_attention(q, k_pool, v_pool, k_scale, v_scale, quantized, table, start, scale, window, softcap, out):
    """paged_attention for one query (T = 1) and head_dim a multiple of 16. A job is a kv head
    and a run of blocks: its GQA group's scores over the run's positions in one (G, n) buffer,
    softmax, then the weighted values accumulated block by block. A long context is split into
    runs of at least SPLIT_MIN positions (flash-decoding) when there are fewer kv heads than
    JOBS (SmolLM2: 3 kv heads on 2 threads, one idle a third of the time unsplit), each run's
    output weighted by its share of the softmax at the end."""
    H, d = q.shape[1], q.shape[2]
    n_kv, bs = k_pool.shape[1], k_pool.shape[2]
    G = H // n_kv
    lo = 0 if window <= 0 else max(0, start - window + 1)
    first, last = lo // bs, start // bs
    n_blocks = last + 1 - first
    want = -(-JOBS // n_kv)
    n_split = max(1, min(want, (start + 1 - lo) // SPLIT_MIN, n_blocks))
    per = -(-n_blocks // n_split)
    n_split = -(-n_blocks // per)
    part = np.empty((n_kv, n_split if n_split > 1 else 0, G, d), np.float32)
    m_den = np.empty((n_kv, n_split, 2, G), np.float32)
    for job in prange(n_kv * n_split):
        kv, sp = job // n_split, job % n_split
        b_lo = first + sp * per
        b_hi = min(last, b_lo + per - 1)
        p_lo = max(lo, b_lo * bs)
        L = min(start, b_hi * bs + bs - 1) + 1 - p_lo
        qg = q[0][kv * G:(kv + 1) * G]
        s = np.empty((G, L + POS), np.float32)
        for h2 in range(AHEAD):
            _prefetch_ahead(k_pool, v_pool, table, kv, b_lo, b_hi, h2)
        for lb in range(b_lo, b_hi + 1):
            for h2 in range(2):
                _prefetch_ahead(k_pool, v_pool, table, kv, b_lo, b_hi, 2 * (lb - b_lo) + AHEAD + h2)
            b = table[lb]
            j0 = max(p_lo - lb * bs, 0)
            n = min(start - lb * bs + 1, bs) - j0
            t0 = lb * bs + j0 - p_lo
            for g0 in range(0, G, HEADS):
                qk_scores(qg, k_pool[b, kv], j0, n, s, t0, g0)
            if quantized:
                for hh in range(G):
                    for i in range(n):
                        s[hh, t0 + i] *= k_scale[b, kv, j0 + i]
        for hh in range(G):
            sr = s[hh, :L]
            for t in range(L):
                sr[t] *= scale
            if softcap > 0:
                for t in range(L):
                    sr[t] = softcap * np.tanh(sr[t] / softcap)
            m = _max(sr)
            exp_shifted(sr, m)
            den = np.float32(0.0)
            for t in range(L):
                den += sr[t]
            inv = np.float32(1.0) / den
            for t in range(L):
                sr[t] *= inv
            m_den[kv, sp, 0, hh] = m
            m_den[kv, sp, 1, hh] = den
        o = part[kv, sp] if n_split > 1 else out[0][kv * G:(kv + 1) * G]
        o[:] = 0
        for lb in range(b_lo, b_hi + 1):
            for h2 in range(2):
                _prefetch_ahead(k_pool, v_pool, table, kv, b_lo, b_hi, 2 * (b_hi + 1 + lb - 2 * b_lo) + AHEAD + h2)
            b = table[lb]
            j0 = max(p_lo - lb * bs, 0)
            n = min(start - lb * bs + 1, bs) - j0
            t0 = lb * bs + j0 - p_lo
            if quantized:
                for hh in range(G):
                    for i in range(n):
                        s[hh, t0 + i] *= v_scale[b, kv, j0 + i]
            for g0 in range(0, G, HEADS):
                pv_accumulate(s, v_pool[b, kv], j0, n, t0, g0, o)
    if n_split > 1:
        for kv in range(n_kv):
            for hh in range(G):
                m = m_den[kv, 0, 0, hh]
                for sp in range(1, n_split):
                    m = max(m, m_den[kv, sp, 0, hh])
                tot = np.float32(0.0)
                for sp in range(n_split):           # each run's weight: its den * exp(its max - m)
                    w = m_den[kv, sp, 1, hh] * np.float32(np.exp(m_den[kv, sp, 0, hh] - m))
                    m_den[kv, sp, 1, hh] = w
                    tot += w
                o = out[0, kv * G + hh]
                w = m_den[kv, 0, 1, hh] / tot
                for c in range(d):              # loops, not o[:] = ...: in this (parallel) function
                    o[c] = w * part[kv, 0, hh, c]   # an array expression is a parallel region of its own
                for sp in range(1, n_split):
                    w = m_den[kv, sp, 1, hh] / tot
                    for c in range(d):
                        o[c] += w * part[kv, sp, hh, c]


@intrinsic
def prefetch_lines(typingctx, arr, offset, n):
    """Hint n cache lines of arr's buffer, from byte offset on, into L2 (reads; no fault)."""
    if not isinstance(arr, types.Array):
        return None
    sig = types.void(arr, types.int64, types.int64)

    def codegen(context, builder, sig_, args):
        base = builder.add(builder.ptrtoint(context.make_array(sig_.args[0])(context, builder, args[0]).data, _i64), args[1])
        with cgutils.for_range(builder, args[2]) as line:
            _prefetch_l2(builder, base, builder.mul(line.index, _i(64)), 0)
        return context.get_dummy_value()

    return sig, codegen


PREFETCH_KV = 256 << 10    # bytes of a layer's K and V hinted ahead at most (blocks in order)


@njit(inline="always")
def prefetch_kv_share(kp, vp, table, start, window, job, n_jobs):
    """Job `job` of n_jobs hints its share of the K and V blocks that a decode attention at
    position start will read (up to PREFETCH_KV bytes). Called from the jobs of the QKV region
    before it: the KV of a layer was last read a whole token ago and is back in memory, so the
    attention waited on it (64 positions, 1B shape: 25 of its 28 us in place, 7 us warm);
    spread over the region's jobs, the lines arrive while the weights stream (28 -> 12 us)."""
    bs_ = kp.shape[2]
    blk_ = kp.shape[1] * bs_ * kp.shape[3] * kp.itemsize        # bytes of a block, all kv heads
    per_blk_ = blk_ // 64
    lb0_ = 0 if window <= 0 else max(0, start - window + 1) // bs_
    nblk_ = min(start // bs_ + 1 - lb0_, max(1, PREFETCH_KV // (2 * blk_)))
    total_ = 2 * nblk_ * per_blk_
    share_ = (total_ + n_jobs - 1) // n_jobs
    l0_ = job * share_
    l1_ = min(total_, l0_ + share_)
    while l0_ < l1_:
        kv_ = l0_ // (nblk_ * per_blk_)                        # 0: K, 1: V
        r_ = l0_ - kv_ * nblk_ * per_blk_
        lb_ = r_ // per_blk_
        li_ = r_ - lb_ * per_blk_
        cnt_ = min(l1_ - l0_, per_blk_ - li_)
        off_ = np.int64(table[lb0_ + lb_]) * blk_ + li_ * 64
        if kv_ == 0:
            prefetch_lines(kp, off_, cnt_)
        else:
            prefetch_lines(vp, off_, cnt_)
        l0_ += cnt_
