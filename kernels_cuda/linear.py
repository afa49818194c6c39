"""Matrix products of activations with packed weights on the GPU: y = x @ W.T (+ bias, + residual).

Same op names and signatures as kernels_numba/linear.py (``gemm_int8(x, q, scales, group, out)``…),
with device arrays. Two kernels stand behind each name:

- T == 1 (decode): a GEMV. A block of 8 warps owns 32 output rows, 4 per warp, so each x value
  loaded serves 4 rows. x is staged once per block in shared memory (RMS-normalised first when
  a norm weight is given: norm and matmul in one launch), permuted so that lane l reading word k
  finds the x values of that word at k, k + n/4, … (no bank conflicts). Weights are read as
  uint32 words (4 int8 or 8 int4 values) and turned into exact floats with the 2**23 magic
  number (bits 0x4B000000 | byte is the float 2**23 + byte): a shift, a logic op and a
  subtraction instead of a slow integer-to-float conversion. The epilogue adds a bias or the
  residual, or applies silu / gelu_tanh to interleaved (gate, up) row pairs.
- T > 1 (prefill) or a group that is not a power of two: a tiled GEMM, 64 rows x 32 tokens per
  block, each weight tile dequantised once into shared memory and used by every token.

Device layouts (edgerun/backend_cuda.py uploads them): int8 q (rows, in) int8 plus its uint64
view (rows, in/8); int4 qs (rows, in/2) uint8 plus its uint64 view (rows, in/16), low nibble
first as in edgerun/packed.py; scales and mins float32 or float16; dense f32, float16, or
bfloat16 as uint16 bits.
"""
import math

import numpy as np
from numba import cuda

from ._launch import go
from ._common import BLOCK, F32, U32, bits_to_f32, block_sum, blocks, device, log2_exact, warp_sum4

GEMV_SPLIT = 1                    # int8/int4 GEMV: warps sharing 4 rows, splitting the inputs (1 measured best)
MIN_GEMV_BLOCKS = 256             # below this many blocks a GEMV splits its inputs over more warps
DENSE_ROWS = BLOCK // 32 * 4      # output rows per dense GEMV block: 4 per warp
RED4 = 4 * BLOCK                  # shared scratch of warp_sum4 (a compile-time constant)
PART = (BLOCK // 32, 32)          # per-warp partial sums (4 rows + sum of squares); row 0 doubles as block_sum's
MAX_SMEM_X = 12 * 1024            # x values a GEMV stages in shared memory (48 KiB)
PER_ROW = 31                      # gshift meaning "one scale per row"

ACT_NONE, ACT_SILU, ACT_GELU = 0, 1, 2

_M23 = U32(0x4B000000)
_B8 = U32(0xFF)
_B4 = U32(0xF)
_S4, _S8, _S12, _S16, _S20, _S24, _S28 = (U32(s) for s in (4, 8, 12, 16, 20, 24, 28))


# ------------------------------------------------------------------ element helpers

@device
def _i8(b):
    """A byte (low 8 bits of a uint32) as a signed int8 value, exactly, as float32."""
    return bits_to_f32((b & _B8) ^ U32(0x4B000080)) - np.float32(8388736.0)


@device
def _nib(b, off):
    """A nibble (low 4 bits) minus off - 2**23, exactly, as float32 (off = 2**23 + 8: symmetric int4)."""
    return bits_to_f32((b & _B4) | _M23) - off


@device
def _act(kind, g):
    if kind == 1:
        return g / (np.float32(1.0) + math.exp(-g))
    inner = np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)
    return np.float32(0.5) * g * (np.float32(1.0) + math.tanh(inner))


@device
def _epilogue(out, res, act, r0, rows, a0, a1, a2, a3):
    """Lane 0 of a warp stores its 4 rows: + res (bias or residual), or act(gate) * up pairs."""
    if act == 0:
        has_res = res.shape[0] > 0
        if r0 < rows:
            out[r0] = a0 + res[r0] if has_res else a0
        if r0 + 1 < rows:
            out[r0 + 1] = a1 + res[r0 + 1] if has_res else a1
        if r0 + 2 < rows:
            out[r0 + 2] = a2 + res[r0 + 2] if has_res else a2
        if r0 + 3 < rows:
            out[r0 + 3] = a3 + res[r0 + 3] if has_res else a3
    else:
        if r0 + 1 < rows:
            out[r0 >> 1] = _act(act, a0) * a1
        if r0 + 3 < rows:
            out[(r0 >> 1) + 1] = _act(act, a2) * a3


@cuda.jit(device=True, inline=True)
def _norm_scale(x, norm_w, eps, red, part):
    """1 / rms(x) when a norm weight is given (norm_w.shape[0] > 0), else 1."""
    n = x.shape[0]
    if norm_w.shape[0] == 0:          # uniform over the block, so no thread skips the block_sum barrier alone
        return np.float32(1.0)
    ss = np.float32(0.0)
    for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
        ss += x[i] * x[i]
    ss = block_sum(ss, red, part)
    return np.float32(1.0) / math.sqrt(ss / np.float32(n) + eps)


# ------------------------------------------------------------------ GEMV (one token)

@device
def _dot4(w, x0, x1, x2, x3):
    return _i8(w) * x0 + _i8(w >> _S8) * x1 + _i8(w >> _S16) * x2 + _i8(w >> _S24) * x3


@device
def _dot8(w, x0, x1, x2, x3, x4, x5, x6, x7, off):
    return (_nib(w, off) * x0 + _nib(w >> _S8, off) * x1 + _nib(w >> _S16, off) * x2 + _nib(w >> _S24, off) * x3
            + _nib(w >> _S4, off) * x4 + _nib(w >> _S12, off) * x5 + _nib(w >> _S20, off) * x6
            + _nib(w >> _S28, off) * x7)


_M19 = U32(0x00780000)            # a nibble moved to mantissa bits 19..22 ...
_ONE = U32(0x3F800000)            # ... of 1.0: the float 1 + q / 16, exactly
_S1, _S3, _S5, _S7, _S9, _S11, _S15, _S19 = (U32(s) for s in (1, 3, 5, 7, 9, 11, 15, 19))


@device
def _u(v):
    """1 + q / 16 for the nibble q already shifted to bits 19..22 of v."""
    return bits_to_f32((v & _M19) | _ONE)


@device
def _dot8u(w, x0, x1, x2, x3, x4, x5, x6, x7):
    """sum (1 + q_c / 16) x_c over the 8 nibbles of w (low nibbles of bytes 0..3 -> x0..x3, high -> x4..x7):
    a shift, a logic op and an FMA per value (no int-to-float conversion, no subtraction)."""
    return (_u(w << _S19) * x0 + _u(w << _S11) * x1 + _u(w << _S3) * x2 + _u(w >> _S5) * x3
            + _u(w << _S15) * x4 + _u(w << _S7) * x5 + _u(w >> _S1) * x6 + _u(w >> _S9) * x7)


@device
def _dot4s(w, x0, x1, x2, x3):
    return _i8(w) * x0 + _i8(w >> _S8) * x1 + _i8(w >> _S16) * x2 + _i8(w >> _S24) * x3


_LO32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


@device
def _dot8s(w, x0, x1, x2, x3, x4, x5, x6, x7):
    """8 int8 values of a uint64 word against x0..x7."""
    return _dot4s(U32(w & _LO32), x0, x1, x2, x3) + _dot4s(U32(w >> _S32), x4, x5, x6, x7)


@device
def _col8(qa, qb, qc, qd, sa, sb, sc, sd, k, gs, per_row, xs, nw):
    """Int8 uint64-word column k of 4 rows against its 8 staged x values (scaled unless per_row)."""
    return _col8w(qa[k], qb[k], qc[k], qd[k], sa, sb, sc, sd, k, gs, per_row, xs, nw)


@device
def _col8w(wa, wb, wc, wd, sa, sb, sc, sd, k, gs, per_row, xs, nw):
    """_col8 on words already loaded (the unrolled loop loads all 16 first, so they are in flight together)."""
    x0, x1, x2, x3 = xs[k], xs[nw + k], xs[U32(2) * nw + k], xs[U32(3) * nw + k]
    x4, x5, x6, x7 = xs[U32(4) * nw + k], xs[U32(5) * nw + k], xs[U32(6) * nw + k], xs[U32(7) * nw + k]
    d0 = _dot8s(wa, x0, x1, x2, x3, x4, x5, x6, x7)
    d1 = _dot8s(wb, x0, x1, x2, x3, x4, x5, x6, x7)
    d2 = _dot8s(wc, x0, x1, x2, x3, x4, x5, x6, x7)
    d3 = _dot8s(wd, x0, x1, x2, x3, x4, x5, x6, x7)
    if per_row:
        return d0, d1, d2, d3
    g = (k << U32(3)) >> gs
    return d0 * np.float32(sa[g]), d1 * np.float32(sb[g]), d2 * np.float32(sc[g]), d3 * np.float32(sd[g])


@device
def _dot16u(w, x):
    """sum (1 + q/16) x over the 16 nibbles of a uint64 word (bytes 0..7: low nibbles -> x[0..7], high -> x[8..15])."""
    lo, hi = U32(w & _LO32), U32(w >> _S32)
    return (_dot8u(lo, x[0], x[1], x[2], x[3], x[8], x[9], x[10], x[11])
            + _dot8u(hi, x[4], x[5], x[6], x[7], x[12], x[13], x[14], x[15]))


@device
def _col4u(qa, qb, qc, qd, sa, sb, sc, sd, mins, has_mins, ra, rb, rc, rd, k, hs, xs, nw):
    """Int4 uint64-word column k of 4 rows (see _col4uw)."""
    return _col4uw(qa[k], qb[k], qc[k], qd[k], sa, sb, sc, sd, mins, has_mins, ra, rb, rc, rd, k, hs, xs, nw)


@device
def _col4uw(wa, wb, wc, wd, sa, sb, sc, sd, mins, has_mins, ra, rb, rc, rd, k, hs, xs, nw):
    """Int4 words of column k of 4 rows, already loaded: sum (q - 8) x = 16 sum (1 + q/16) x - 24 sum x,
    times the scale (with mins: 16 s (d - sum x) + m sum x)."""
    x = (xs[k], xs[nw + k], xs[U32(2) * nw + k], xs[U32(3) * nw + k], xs[U32(4) * nw + k], xs[U32(5) * nw + k],
         xs[U32(6) * nw + k], xs[U32(7) * nw + k], xs[U32(8) * nw + k], xs[U32(9) * nw + k], xs[U32(10) * nw + k],
         xs[U32(11) * nw + k], xs[U32(12) * nw + k], xs[U32(13) * nw + k], xs[U32(14) * nw + k],
         xs[U32(15) * nw + k])
    xsum = (((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]))) \
        + (((x[8] + x[9]) + (x[10] + x[11])) + ((x[12] + x[13]) + (x[14] + x[15])))
    g = (k << U32(3)) >> hs
    d0, d1, d2, d3 = _dot16u(wa, x), _dot16u(wb, x), _dot16u(wc, x), _dot16u(wd, x)
    c16 = np.float32(16.0)
    if has_mins:
        return (c16 * np.float32(sa[g]) * (d0 - xsum) + np.float32(mins[ra, g]) * xsum,
                c16 * np.float32(sb[g]) * (d1 - xsum) + np.float32(mins[rb, g]) * xsum,
                c16 * np.float32(sc[g]) * (d2 - xsum) + np.float32(mins[rc, g]) * xsum,
                c16 * np.float32(sd[g]) * (d3 - xsum) + np.float32(mins[rd, g]) * xsum)
    c24 = np.float32(-24.0) * xsum
    return (np.float32(sa[g]) * (c16 * d0 + c24), np.float32(sb[g]) * (c16 * d1 + c24),
            np.float32(sc[g]) * (c16 * d2 + c24), np.float32(sd[g]) * (c16 * d3 + c24))


@device
def _slot8(i, nwd, gshift, hshift, group, half):
    """Where x[i] goes in the int8 GEMV's shared copy: value c of uint64 word k at c * n/8 + k."""
    return (i & 7) * nwd + (i >> 3)


@device
def _slot4(i, nwd, gshift, hshift, group, half):
    """Where x[i] goes for the int4 GEMV: low nibbles of bytes 8k+c at c * n/16 + k, high ones at (8 + c) * n/16 + k."""
    j = i & (group - 1)
    byte = (i >> gshift) * half + (j & (half - 1))
    return ((byte & 7) + 8 * (j >> hshift)) * nwd + (byte >> 3)


def _make_stage(slot):
    @cuda.jit(device=True, inline=True)
    def stage(x, norm_w, eps, red, part, xs, nwd, gshift):
        """x (normalised when norm_w is given) into shared memory at slot(i); 8 loads in flight per
        thread (a plain loop waited out one L2 round trip per element: microseconds per block)."""
        t = cuda.threadIdx.x
        n = x.shape[0]
        has_norm = norm_w.shape[0] > 0
        inv = np.float32(1.0)
        if has_norm:                      # uniform: every thread reaches block_sum
            ss = np.float32(0.0)
            for i in range(t, n, 8 * BLOCK):
                for j in range(8):
                    if i + j * BLOCK < n:
                        v = x[i + j * BLOCK]
                        ss += v * v
            ss = block_sum(ss, red, part)
            inv = np.float32(1.0) / math.sqrt(ss / np.float32(n) + eps)
        group = 1 << gshift
        hshift = gshift - 1
        half = group >> 1
        for i in range(t, n, 8 * BLOCK):
            v0 = x[i]
            v1 = x[i + BLOCK] if i + BLOCK < n else np.float32(0.0)
            v2 = x[i + 2 * BLOCK] if i + 2 * BLOCK < n else np.float32(0.0)
            v3 = x[i + 3 * BLOCK] if i + 3 * BLOCK < n else np.float32(0.0)
            v4 = x[i + 4 * BLOCK] if i + 4 * BLOCK < n else np.float32(0.0)
            v5 = x[i + 5 * BLOCK] if i + 5 * BLOCK < n else np.float32(0.0)
            v6 = x[i + 6 * BLOCK] if i + 6 * BLOCK < n else np.float32(0.0)
            v7 = x[i + 7 * BLOCK] if i + 7 * BLOCK < n else np.float32(0.0)
            for j, v in enumerate((v0, v1, v2, v3, v4, v5, v6, v7)):
                ii = i + j * BLOCK
                if ii < n:
                    if has_norm:
                        v = v * inv * norm_w[ii]
                    xs[slot(ii, nwd, gshift, hshift, group, half)] = v
        cuda.syncthreads()
    return stage


_stage8, _stage4 = _make_stage(_slot8), _make_stage(_slot4)


@cuda.jit(device=True, inline=True)
def _reduce_rows(part, red, a0, a1, a2, a3, out, res, act, r0, rows, split):
    """Warp sums of the 4 rows, then the split warps sharing them; the first stores."""
    t = cuda.threadIdx.x
    w, lane = t >> 5, t & 31
    a0, a1, a2, a3 = warp_sum4(a0, a1, a2, a3, red)
    if lane == 0:
        part[w, 0], part[w, 1], part[w, 2], part[w, 3] = a0, a1, a2, a3
    cuda.syncthreads()
    if lane == 0 and w % split == 0:
        for s in range(1, split):
            a0 += part[w + s, 0]
            a1 += part[w + s, 1]
            a2 += part[w + s, 2]
            a3 += part[w + s, 3]
        _epilogue(out, res, act, r0, rows, a0, a1, a2, a3)


def _make_gemv_int8(per_row, split):
    rows_per_block = BLOCK // 32 // split * 4

    @cuda.jit(fastmath=True)
    def gemv_int8_kernel(x, norm_w, eps, qw, scales, gshift, res, act, out):
        """out (rows,) = [rmsnorm](x (n,)) @ W.T [+ res] | act on (gate, up) row pairs, for Int8Weight:
        qw (rows, n/8) uint64 words (8 int8 each), scales (rows, n >> gshift) (gshift PER_ROW: one per row).
        x is normalised and staged once per block in shared memory, permuted so that word column k
        finds its 8 values at k + c * n/8 (conflict-free). `split` warps share 4 rows, each taking
        every split-th run of 32 words; 4 columns are loaded per step (16 x 8 bytes in flight per lane).
        Row views and unsigned indices keep the index arithmetic out of the inner loop."""
        xs = cuda.shared.array(0, F32)
        red = cuda.shared.array(RED4, F32)
        part = cuda.shared.array(PART, F32)
        t = cuda.threadIdx.x
        n = x.shape[0]
        nwd = n >> 3
        _stage8(x, norm_w, eps, red, part[0], xs, nwd, gshift if gshift != PER_ROW else 2)
        rows = qw.shape[0]
        w, lane = t >> 5, t & 31
        r0 = cuda.blockIdx.x * rows_per_block + (w // split) * 4
        qa, qb, qc, qd = qw[min(r0, rows - 1)], qw[min(r0 + 1, rows - 1)], qw[min(r0 + 2, rows - 1)], qw[min(r0 + 3, rows - 1)]
        sa, sb, sc, sd = (scales[min(r0, rows - 1)], scales[min(r0 + 1, rows - 1)], scales[min(r0 + 2, rows - 1)],
                          scales[min(r0 + 3, rows - 1)])
        a0 = a1 = a2 = a3 = np.float32(0.0)
        nw = U32(nwd)
        step = U32(32 * split)
        k = U32((w % split) * 32 + lane)
        gs = U32(0 if per_row else gshift)
        while k + U32(3) * step < nw:         # 4 word columns a step: 16 weight loads in flight per lane
            k1, k2, k3 = k + step, k + U32(2) * step, k + U32(3) * step
            wa0, wb0, wc0, wd0 = qa[k], qb[k], qc[k], qd[k]
            wa1, wb1, wc1, wd1 = qa[k1], qb[k1], qc[k1], qd[k1]
            wa2, wb2, wc2, wd2 = qa[k2], qb[k2], qc[k2], qd[k2]
            wa3, wb3, wc3, wd3 = qa[k3], qb[k3], qc[k3], qd[k3]
            p0, p1, p2, p3 = _col8w(wa0, wb0, wc0, wd0, sa, sb, sc, sd, k, gs, per_row, xs, nw)
            q0, q1, q2, q3 = _col8w(wa1, wb1, wc1, wd1, sa, sb, sc, sd, k1, gs, per_row, xs, nw)
            u0, u1, u2, u3 = _col8w(wa2, wb2, wc2, wd2, sa, sb, sc, sd, k2, gs, per_row, xs, nw)
            v0, v1, v2, v3 = _col8w(wa3, wb3, wc3, wd3, sa, sb, sc, sd, k3, gs, per_row, xs, nw)
            a0 += (p0 + q0) + (u0 + v0)
            a1 += (p1 + q1) + (u1 + v1)
            a2 += (p2 + q2) + (u2 + v2)
            a3 += (p3 + q3) + (u3 + v3)
            k += U32(4) * step
        while k < nw:
            p0, p1, p2, p3 = _col8(qa, qb, qc, qd, sa, sb, sc, sd, k, gs, per_row, xs, nw)
            a0 += p0
            a1 += p1
            a2 += p2
            a3 += p3
            k += step
        if per_row:
            a0 *= np.float32(sa[0])
            a1 *= np.float32(sb[0])
            a2 *= np.float32(sc[0])
            a3 *= np.float32(sd[0])
        _reduce_rows(part, red, a0, a1, a2, a3, out, res, act, r0, rows, split)
    return gemv_int8_kernel


# per_row: one scale per row, applied once at the end (a compile-time constant: no branch in the loop)
SPLITS = tuple(sp for sp in (1, 2, 4) if sp <= BLOCK // 32)
GEMV_INT8 = {(pr, sp): _make_gemv_int8(pr, sp) for pr in (False, True) for sp in SPLITS}
gemv_int8_kernel = GEMV_INT8[False, GEMV_SPLIT]


def _make_gemv_int4(has_mins, split):
    rows_per_block = BLOCK // 32 // split * 4

    @cuda.jit(fastmath=True)
    def gemv_int4_kernel(x, norm_w, eps, qw, scales, mins, gshift, res, act, out):
        """As gemv_int8_kernel for Int4Weight: qw (rows, n/16) uint64 (bytes 8k..8k+7 of a row, 16 values),
        scales / mins (rows, n >> gshift), mins (0, 0) when symmetric; gshift = log2(group), group a power
        of two >= 16. Each nibble becomes the float 1 + q/16 by bit operations; per word column
        sum (q - 8) x = 16 sum (1 + q/16) x - 24 sum x (sum x shared by the 4 rows)."""
        xs = cuda.shared.array(0, F32)
        red = cuda.shared.array(RED4, F32)
        part = cuda.shared.array(PART, F32)
        t = cuda.threadIdx.x
        n = x.shape[0]
        nwd = n >> 4
        hshift = gshift - 1
        _stage4(x, norm_w, eps, red, part[0], xs, nwd, gshift)
        rows = qw.shape[0]
        w, lane = t >> 5, t & 31
        r0 = cuda.blockIdx.x * rows_per_block + (w // split) * 4
        ra, rb, rc, rd = min(r0, rows - 1), min(r0 + 1, rows - 1), min(r0 + 2, rows - 1), min(r0 + 3, rows - 1)
        qa, qb, qc, qd = qw[ra], qw[rb], qw[rc], qw[rd]
        sa, sb, sc, sd = scales[ra], scales[rb], scales[rc], scales[rd]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        nw = U32(nwd)
        step = U32(32 * split)
        hs = U32(hshift)
        k = U32((w % split) * 32 + lane)
        while k + U32(3) * step < nw:
            k1, k2, k3 = k + step, k + U32(2) * step, k + U32(3) * step
            wa0, wb0, wc0, wd0 = qa[k], qb[k], qc[k], qd[k]
            wa1, wb1, wc1, wd1 = qa[k1], qb[k1], qc[k1], qd[k1]
            wa2, wb2, wc2, wd2 = qa[k2], qb[k2], qc[k2], qd[k2]
            wa3, wb3, wc3, wd3 = qa[k3], qb[k3], qc[k3], qd[k3]
            p0, p1, p2, p3 = _col4uw(wa0, wb0, wc0, wd0, sa, sb, sc, sd, mins, has_mins, ra, rb, rc, rd, k, hs, xs, nw)
            q0, q1, q2, q3 = _col4uw(wa1, wb1, wc1, wd1, sa, sb, sc, sd, mins, has_mins, ra, rb, rc, rd, k1, hs, xs, nw)
            u0, u1, u2, u3 = _col4uw(wa2, wb2, wc2, wd2, sa, sb, sc, sd, mins, has_mins, ra, rb, rc, rd, k2, hs, xs, nw)
            v0, v1, v2, v3 = _col4uw(wa3, wb3, wc3, wd3, sa, sb, sc, sd, mins, has_mins, ra, rb, rc, rd, k3, hs, xs, nw)
            a0 += (p0 + q0) + (u0 + v0)
            a1 += (p1 + q1) + (u1 + v1)
            a2 += (p2 + q2) + (u2 + v2)
            a3 += (p3 + q3) + (u3 + v3)
            k += U32(4) * step
        while k < nw:
            p0, p1, p2, p3 = _col4u(qa, qb, qc, qd, sa, sb, sc, sd, mins, has_mins, ra, rb, rc, rd, k, hs, xs, nw)
            a0 += p0
            a1 += p1
            a2 += p2
            a3 += p3
            k += step
        _reduce_rows(part, red, a0, a1, a2, a3, out, res, act, r0, rows, split)
    return gemv_int4_kernel


GEMV_INT4 = {(m, sp): _make_gemv_int4(m, sp) for m in (False, True) for sp in SPLITS}   # has_mins: constant
gemv_int4_kernel = GEMV_INT4[False, GEMV_SPLIT]


# ------------------------------------------------------------------ element loaders (GEMM, embed, dense GEMV)
# elem(a, b, c, group, r, col) -> float32 W[r, col]; a, b, c are the kind's fields (unused ones: dummies)

@device
def _elem_f32(a, b, c, group, r, col):
    return a[r, col]


@device
def _elem_f16(a, b, c, group, r, col):
    return np.float32(a[r, col])


@device
def _elem_bf16(a, b, c, group, r, col):
    return bits_to_f32(U32(a[r, col]) << _S16)


@device
def _elem_int8(a, b, c, group, r, col):
    return np.float32(a[r, col]) * np.float32(b[r, col // group])


@device
def _elem_int4(a, b, c, group, r, col):
    g = col // group
    j = col - g * group
    half = group // 2
    if j < half:
        q = np.float32(a[r, g * half + j] & 15)
    else:
        q = np.float32(a[r, g * half + j - half] >> 4)
    s = np.float32(b[r, g])
    if c.shape[0] > 0:
        return s * q + np.float32(c[r, g])
    return s * (q - np.float32(8.0))


ELEMS = {"f32": _elem_f32, "f16": _elem_f16, "bf16": _elem_bf16, "int8": _elem_int8, "int4": _elem_int4}


def _make_gemv_dense(elem):
    @cuda.jit(fastmath=True)
    def kernel(x, norm_w, eps, a, res, act, out):
        """Dense weight a (rows, n): x staged (normalised) in shared memory, 4 rows per warp."""
        xs = cuda.shared.array(0, F32)
        red = cuda.shared.array(RED4, F32)
        part = cuda.shared.array(32, F32)
        t = cuda.threadIdx.x
        n = x.shape[0]
        inv = _norm_scale(x, norm_w, eps, red, part)
        for i in range(t, n, BLOCK):
            v = x[i] * inv
            if norm_w.shape[0] > 0:
                v *= norm_w[i]
            xs[i] = v
        cuda.syncthreads()
        rows = a.shape[0]
        lane = t & 31
        r0 = cuda.blockIdx.x * DENSE_ROWS + (t >> 5) * 4
        ra, rb, rc, rd = min(r0, rows - 1), min(r0 + 1, rows - 1), min(r0 + 2, rows - 1), min(r0 + 3, rows - 1)
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for k in range(lane, n, 32):
            xv = xs[k]
            a0 += elem(a, a, a, 1, ra, k) * xv
            a1 += elem(a, a, a, 1, rb, k) * xv
            a2 += elem(a, a, a, 1, rc, k) * xv
            a3 += elem(a, a, a, 1, rd, k) * xv
        a0, a1, a2, a3 = warp_sum4(a0, a1, a2, a3, red)
        if lane == 0:
            _epilogue(out, res, act, r0, rows, a0, a1, a2, a3)
    return kernel


GEMV_DENSE = {k: _make_gemv_dense(ELEMS[k]) for k in ("f32", "f16", "bf16")}

# ------------------------------------------------------------------ tiled GEMM (many tokens)

TR, TK = 64, 32
TS = BLOCK // 16                  # token stride of a thread's two tokens
TT = 2 * TS                       # tokens per block (32 on a GPU)
W_TILE, X_TILE = (TK, TR), (TK, TT)


def _make_gemm(elem):
    @cuda.jit(fastmath=True)
    def kernel(x, a, b, c, group, bias, res, out):
        """out (T, rows) = x (T, n) @ W.T + bias (rows,) or (0,) + res (T, rows) or (0, 0); out may be res."""
        ws = cuda.shared.array(W_TILE, F32)
        xt = cuda.shared.array(X_TILE, F32)
        t = cuda.threadIdx.x
        rr, tt = t % 16, t // 16                  # rows rr + 16 i, tokens tt + TS j
        R0, T0 = cuda.blockIdx.x * TR, cuda.blockIdx.y * TT
        T, n = x.shape
        rows = out.shape[1]
        acc = cuda.local.array((4, 2), F32)
        for i in range(4):
            for j in range(2):
                acc[i, j] = np.float32(0.0)
        for k0 in range(0, n, TK):
            for e in range(t, TR * TK, BLOCK):    # weight tile, dequantised once
                r, kk = e // TK, e % TK
                v = np.float32(0.0)
                if R0 + r < rows and k0 + kk < n:
                    v = elem(a, b, c, group, R0 + r, k0 + kk)
                ws[kk, r] = v
            for e in range(t, TT * TK, BLOCK):
                tok, kk = e // TK, e % TK
                v = np.float32(0.0)
                if T0 + tok < T and k0 + kk < n:
                    v = x[T0 + tok, k0 + kk]
                xt[kk, tok] = v
            cuda.syncthreads()
            for kk in range(TK):
                x0, x1 = xt[kk, tt], xt[kk, tt + TS]
                for i in range(4):
                    wv = ws[kk, rr + 16 * i]
                    acc[i, 0] += wv * x0
                    acc[i, 1] += wv * x1
            cuda.syncthreads()
        for i in range(4):
            r = R0 + rr + 16 * i
            for j in range(2):
                tok = T0 + tt + TS * j
                if r < rows and tok < T:
                    v = acc[i, j]
                    if bias.shape[0] > 0:
                        v += bias[r]
                    if res.shape[0] > 0:
                        v += res[tok, r]
                    out[tok, r] = v
    return kernel


GEMM = {k: _make_gemm(e) for k, e in ELEMS.items()}


def _make_embed(elem):
    @cuda.jit
    def kernel(ids, tok, a, b, c, group, mul, out):
        """out[t] = W[ids[t]] * mul; with ids of size 0 (decode) the one id comes as the scalar tok,
        which saves a host-to-device copy per token."""
        t = cuda.blockIdx.y
        j = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
        if j < out.shape[1]:
            r = ids[t] if ids.shape[0] > 0 else tok
            out[t, j] = elem(a, b, c, group, r, j) * mul
    return kernel


EMBED = {k: _make_embed(e) for k, e in ELEMS.items()}


# ------------------------------------------------------------------ host-side launchers

_DUMMY = {}


def dummy(ndim: int = 1):
    """An empty float32 device array: 'no norm / no bias / no residual / no mins'."""
    if ndim not in _DUMMY:
        _DUMMY[ndim] = cuda.device_array((0,) * ndim, np.float32)
    return _DUMMY[ndim]


def gemv_fits(kind: str, n: int, group: int) -> bool:
    """Whether the one-token GEMV kernel takes this shape (else the tiled GEMM does)."""
    if n > MAX_SMEM_X:                     # the GEMVs stage x in shared memory
        return False
    if kind == "int8":
        return n % 8 == 0 and (group == n or (log2_exact(group) >= 3 and n % group == 0))
    if kind == "int4":
        return log2_exact(group) >= 4 and n % group == 0
    return True


def launch_gemv(kind, x, fields, group, out, norm_w=None, eps=0.0, res=None, act=ACT_NONE, stream=0):
    """One token: out (rows,) [or (rows/2,) with act] = act/res(x (n,) [normed] @ W.T).
    fields: int8 (uint64 words, scales); int4 (uint64 words, scales, mins); dense (w,)."""
    n = x.shape[0]
    rows = fields[0].shape[0]
    split = GEMV_SPLIT
    while split < SPLITS[-1] and blocks(rows, BLOCK // 32 // split * 4) < MIN_GEMV_BLOCKS:
        split *= 2                         # few rows (o_proj, down_proj): split the inputs to fill the GPU
    grid = blocks(rows, BLOCK // 32 // split * 4)
    nw = dummy() if norm_w is None else norm_w
    rs = dummy() if res is None else res
    smem = 4 * n
    if kind == "int8":
        gs = PER_ROW if group == n else log2_exact(group)
        go(GEMV_INT8[gs == PER_ROW, split], grid, BLOCK, stream, smem, (x, nw, np.float32(eps), fields[0], fields[1], gs, rs, act, out))
    elif kind == "int4":
        go(GEMV_INT4[fields[2].shape[0] > 0, split], grid, BLOCK, stream, smem, (x, nw, np.float32(eps), fields[0], fields[1], fields[2],
                                                          log2_exact(group), rs, act, out))
    else:
        go(GEMV_DENSE[kind], blocks(rows, DENSE_ROWS), BLOCK, stream, 4 * n, (x, nw, np.float32(eps), fields[0], rs, act, out))


def launch_gemm(kind, x, a, b, c, group, out, bias=None, res=None, stream=0):
    """out (T, rows) = x (T, n) @ W.T [+ bias (rows,)] [+ res (T, rows)]."""
    grid = (blocks(out.shape[1], TR), blocks(x.shape[0], TT))
    go(GEMM[kind], grid, BLOCK, stream, 0, (x, a, b, c, int(group), dummy() if bias is None else bias,
                                           dummy(2) if res is None else res, out))


_NO_IDS = {}


def launch_embed(kind, ids, a, b, c, group, out, mul=1.0, stream=0, tok=0):
    """out (T, dim) = rows ids of W * mul; ids None: the one row tok (T == 1)."""
    if ids is None:
        if "i" not in _NO_IDS:
            _NO_IDS["i"] = cuda.device_array(0, np.int64)
        ids = _NO_IDS["i"]
    grid = (blocks(out.shape[1], BLOCK), out.shape[0])
    go(EMBED[kind], grid, BLOCK, stream, 0, (ids, tok, a, b, c, int(group), np.float32(mul), out))


# ------------------------------------------------------------------ kernels_numba-compatible names
# (x, <weight fields as on the CPU, as device arrays>, out); used by the tests and by simple callers

def _gemm(kind, x, a, b, c, group, out):
    n = x.shape[1]
    if x.shape[0] == 1 and gemv_fits(kind, n, group):
        if kind == "int8":
            f = (a.view(np.uint64), b)
        elif kind == "int4":
            f = (a.view(np.uint64), b, c if c.shape[0] > 0 else dummy(2))
        else:
            f = (a,)
        launch_gemv(kind, x.reshape(n), f, group, out.reshape(out.shape[1]))
    else:
        launch_gemm(kind, x, a, b, c if c.shape[0] > 0 else dummy(2), group, out)


def gemm_f32(x, w, out):
    _gemm("f32", x, w, w, dummy(2), 1, out)


def gemm_f16(x, w, out):
    _gemm("f16", x, w, w, dummy(2), 1, out)


def gemm_bf16(x, w, out):
    _gemm("bf16", x, w, w, dummy(2), 1, out)


def gemm_int8(x, q, scales, group, out):
    _gemm("int8", x, q, scales, dummy(2), group, out)


def gemm_int4(x, qs, scales, mins, group, out):
    _gemm("int4", x, qs, scales, mins, group, out)


def embed_f32(ids, w, out):
    launch_embed("f32", ids, w, w, dummy(2), 1, out)


def embed_f16(ids, w, out):
    launch_embed("f16", ids, w, w, dummy(2), 1, out)


def embed_bf16(ids, w, out):
    launch_embed("bf16", ids, w, w, dummy(2), 1, out)


def embed_int8(ids, q, scales, group, out):
    launch_embed("int8", ids, q, scales, dummy(2), group, out)


def embed_int4(ids, qs, scales, mins, group, out):
    launch_embed("int4", ids, qs, scales, mins if mins.shape[0] > 0 else dummy(2), group, out)
