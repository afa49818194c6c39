"""Matrix products of activations with packed weights: y = x @ W.T.

One kernel per packed kind, all with the signature ``(x, <weight fields>, out)``:
x is float32 (T, in), out float32 (T, out). T == 1 (decode) walks the packed rows
directly; T > 1 (prefill) unpacks a block of rows into a small float buffer once
and reuses it for every token. Rows are split across threads with prange.

Inner loops index group-sized slices (views) with the loop counter, never
``base + j``: Numba must assume a computed index may be negative and wraps it,
and that per-element check kept LLVM from vectorising (5x slower, measured).
"""
import numpy as np
from numba import njit, prange

from ._common import FASTMATH, JIT, as_float, half_to_float
from .simd import (BLOCK, dot_half_row, dot_int4_row, dot_int4_row4_quad, dot_int4_row_quad,
                   dot_int8_row, dot_int8_row4, quad_order, quantize_act)
from .simd_gemm import TILED, gemm_int4_tiled, gemm_int8_tiled

# prefill of at least this many tokens goes to simd_gemm's tiles of 16 rows x 8 (or 4) tokens
# (measured against the row kernels, 1 thread: T = 4 1.1-1.4x, T = 3 0.97-1.2x, T = 2 0.7-0.9x)
TILE_MIN_T = 4

ROW_BLOCK = 16


@njit(inline="always", fastmath=FASTMATH)
def _dot(a, b, n):
    acc = np.float32(0.0)
    for j in range(n):
        acc += a[j] * b[j]
    return acc


@njit(inline="always", fastmath=FASTMATH)
def _block_dots(buf, nr, x, out, r0):
    """out[t, r0 + i] = buf[i] . x[t] for the nr unpacked rows in buf."""
    T, n = x.shape
    for t in range(T):
        for i in range(nr):
            out[t, r0 + i] = _dot(buf[i], x[t], n)


# ------------------------------------------------------------------ dense

@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_f32(x, w, out):
    T, n = x.shape
    rows = w.shape[0]
    for b in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        r0 = b * ROW_BLOCK
        for t in range(T):
            for r in range(r0, min(r0 + ROW_BLOCK, rows)):
                out[t, r] = _dot(w[r], x[t], n)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_bf16(x, w, out):
    T, n = x.shape
    rows = w.shape[0]
    if T == 1:          # decode: convert in registers (simd.dot_half_row)
        for r in prange(rows):
            out[0, r] = dot_half_row(w[r], x[0], True)
        return
    for b in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        r0 = b * ROW_BLOCK
        nr = min(ROW_BLOCK, rows - r0)
        bits = np.empty((nr, n), np.uint32)
        for i in range(nr):
            for j in range(n):
                bits[i, j] = np.uint32(w[r0 + i, j]) << 16
        _block_dots(bits.view(np.float32), nr, x, out, r0)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_f16(x, w, out):
    T, n = x.shape
    rows = w.shape[0]
    if T == 1:
        for r in prange(rows):
            out[0, r] = dot_half_row(w[r], x[0], False)
        return
    for b in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        r0 = b * ROW_BLOCK
        nr = min(ROW_BLOCK, rows - r0)
        buf = np.empty((nr, n), np.float32)
        for i in range(nr):
            for j in range(n):
                buf[i, j] = half_to_float(w[r0 + i, j])
        _block_dots(buf, nr, x, out, r0)


# ------------------------------------------------------------------ int8

@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_int8(x, q, scales, group, out):
    T, n = x.shape
    rows = q.shape[0]
    ng = n // group
    if T == 1:
        for r in prange(rows):
            acc = np.float32(0.0)
            for g in range(ng):
                qg = q[r, g * group:(g + 1) * group]
                xg = x[0, g * group:(g + 1) * group]
                s = np.float32(0.0)
                for j in range(group):
                    s += np.float32(qg[j]) * xg[j]
                acc += as_float(scales[r, g]) * s
            out[0, r] = acc
        return
    for b in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        r0 = b * ROW_BLOCK
        nr = min(ROW_BLOCK, rows - r0)
        buf = np.empty((nr, n), np.float32)
        for i in range(nr):
            for g in range(ng):
                s = as_float(scales[r0 + i, g])
                qg = q[r0 + i, g * group:(g + 1) * group]
                bg = buf[i, g * group:(g + 1) * group]
                for j in range(group):
                    bg[j] = s * np.float32(qg[j])
        _block_dots(buf, nr, x, out, r0)


# ------------------------------------------------------------------ int4

@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_int4(x, qs, scales, mins, group, out):
    """Int4Weight layout: in group g, byte j = input j (low nibble) | input j + group/2 (high)."""
    T, n = x.shape
    rows = qs.shape[0]
    ng = n // group
    half = group // 2
    has_mins = mins.shape[0] > 0
    if T == 1:
        xsum = np.empty(ng, np.float32)          # per-group sums of x fold in the offset or min
        for g in range(ng):
            xg = x[0, g * group:(g + 1) * group]
            acc = np.float32(0.0)
            for j in range(group):
                acc += xg[j]
            xsum[g] = acc
        for r in prange(rows):
            acc = np.float32(0.0)
            for g in range(ng):
                qg = qs[r, g * half:(g + 1) * half]
                xlo = x[0, g * group:g * group + half]
                xhi = x[0, g * group + half:(g + 1) * group]
                s = np.float32(0.0)
                for j in range(half):
                    byte = qg[j]
                    s += np.float32(byte & 15) * xlo[j] + np.float32(byte >> 4) * xhi[j]
                if has_mins:
                    acc += as_float(scales[r, g]) * s + as_float(mins[r, g]) * xsum[g]
                else:
                    acc += as_float(scales[r, g]) * (s - 8.0 * xsum[g])
            out[0, r] = acc
        return
    for b in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        r0 = b * ROW_BLOCK
        nr = min(ROW_BLOCK, rows - r0)
        buf = np.empty((nr, n), np.float32)
        for i in range(nr):
            _unpack_int4_row(qs[r0 + i], scales[r0 + i], mins[r0 + i] if has_mins else scales[r0 + i],
                             has_mins, group, buf[i])
        _block_dots(buf, nr, x, out, r0)


@njit(inline="always")
def _unpack_int4_row(qrow, srow, mrow, has_mins, group, dst):
    half = group // 2
    for g in range(dst.shape[0] // group):
        s = as_float(srow[g])
        m = as_float(mrow[g]) if has_mins else -8.0 * s
        qg = qrow[g * half:(g + 1) * half]
        lo = dst[g * group:g * group + half]
        hi = dst[g * group + half:(g + 1) * group]
        for j in range(half):
            byte = qg[j]
            lo[j] = s * np.float32(byte & 15) + m
            hi[j] = s * np.float32(byte >> 4) + m


# ------------------------------------------------------------------ decode with int8 activations

@njit(parallel=True, **JIT)
def _quantized_rows(x):
    """x (T, n) -> (xq (T, n) int8, xs, xsum (T, n // 32)) per token and block of 32."""
    T, n = x.shape
    xq = np.empty((T, n), np.int8)
    xs = np.empty((T, n // BLOCK), np.float32)
    xsum = np.empty((T, n // BLOCK), np.float32)
    for t in prange(T):
        quantize_act(x[t], xq[t], xs[t], xsum[t])
    return xq, xs, xsum


@njit(inline="always")
def _quantized(x):
    """x (n,) -> (xq int8, xs, xsum) per block of 32 (simd.quantize_act)."""
    nb = x.shape[0] // BLOCK
    xq = np.empty(x.shape[0], np.int8)
    xs = np.empty(nb, np.float32)
    xsum = np.empty(nb, np.float32)
    quantize_act(x, xq, xs, xsum)
    return xq, xs, xsum


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_int8_q8(x, q, scales, group, out):
    """gemm_int8 for one token with x quantized to int8 per block of 32, integer dot products in
    SIMD (simd.dot_int8_row), as llama.cpp's Q8_0 x Q8_0; prefill (T >= TILE_MIN_T) in register
    tiles of 16 rows x 8 tokens (simd_gemm.py). Shapes the row kernel can't take
    (in not a multiple of 32, or groups other than 32 or a whole row) use gemm_int8."""
    T, n = x.shape
    if n % BLOCK or (group != BLOCK and group != n):
        gemm_int8(x, q, scales, group, out)
        return
    if T == 1:
        xq, xs, xsum = _quantized(x[0])
        for r in prange(q.shape[0]):
            out[0, r] = dot_int8_row(q[r], scales[r], xq, xs, xsum, group)
        return
    if TILED and T >= TILE_MIN_T:         # prefill: 16 rows x 8 tokens per register tile
        gemm_int8_tiled(x, q, scales, group, out)
        return
    gemm_int8_q8_rows(x, q, scales, group, out)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_int8_q8_rows(x, q, scales, group, out):
    """Prefill without tiles (CPUs without 512-bit VNNI, or few tokens): each weight row, read
    once, meets every token, four at a time (converted once for the four)."""
    T = x.shape[0]
    xq, xs, xsum = _quantized_rows(x)
    T4 = T - T % 4
    for r in prange(q.shape[0]):
        for t in range(0, T4, 4):
            out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = dot_int8_row4(q[r], scales[r], xq, xs, xsum,
                                                                                   t, group)
        for t in range(T4, T):
            out[t, r] = dot_int8_row(q[r], scales[r], xq[t], xs[t], xsum[t], group)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_int4_q8(x, qs, scales, mins, group, out):
    """gemm_int4 for one token with x quantized to int8 per block of 32 (simd.dot_int4_row);
    prefill with groups of 32 in register tiles (simd_gemm.py)."""
    T, n = x.shape
    if n % BLOCK or group % BLOCK:
        gemm_int4(x, qs, scales, mins, group, out)
        return
    has_mins = mins.shape[0] > 0
    if T == 1 and group == BLOCK:         # activations in the order the nibbles unpack to
        xq, xs, xsum = _quantized(x[0])
        xo = np.empty_like(xq)
        quad_order(xq, xo)
        for r in prange(qs.shape[0]):
            out[0, r] = dot_int4_row_quad(qs[r], scales[r], mins[r] if has_mins else scales[r], has_mins, xo, xs, xsum)
        return
    if T == 1:
        xq, xs, xsum = _quantized(x[0])
        for r in prange(qs.shape[0]):
            out[0, r] = dot_int4_row(qs[r], scales[r], mins[r] if has_mins else scales[r], has_mins, xq, xs, xsum, group)
        return
    if TILED and T >= TILE_MIN_T and group == BLOCK:    # prefill: 16 rows x 8 tokens per register tile
        gemm_int4_tiled(x, qs, scales, mins, out)
        return
    gemm_int4_q8_rows(x, qs, scales, mins, group, out)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_int4_q8_rows(x, qs, scales, mins, group, out):
    """Prefill without tiles (CPUs without 512-bit VNNI, few tokens, groups of 64 or 128)."""
    T = x.shape[0]
    has_mins = mins.shape[0] > 0
    xq, xs, xsum = _quantized_rows(x)
    if group == BLOCK:                    # each row, unpacked once, meets 4 tokens at a time
        xo = np.empty_like(xq)
        for t in range(T):
            quad_order(xq[t], xo[t])
        T4 = T - T % 4
        for r in prange(qs.shape[0]):
            m = mins[r] if has_mins else scales[r]
            for t in range(0, T4, 4):
                out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = dot_int4_row4_quad(
                    qs[r], scales[r], m, has_mins, xo, xs, xsum, t)
            for t in range(T4, T):
                out[t, r] = dot_int4_row_quad(qs[r], scales[r], m, has_mins, xo[t], xs[t], xsum[t])
        return
    for r in prange(qs.shape[0]):
        m = mins[r] if has_mins else scales[r]
        for t in range(T):
            out[t, r] = dot_int4_row(qs[r], scales[r], m, has_mins, xq[t], xs[t], xsum[t], group)


def gemm_q8_ref(x: np.ndarray, w_f32: np.ndarray) -> np.ndarray:
    """NumPy twin of gemm_*_q8: x quantized as simd.quantize_act does, then gemm_ref."""
    from .simd import quantize_act_ref
    xs_ = []
    for row in x:
        xq, xs, _ = quantize_act_ref(row)
        xs_.append((xq.reshape(-1, BLOCK).astype(np.float64) * xs[:, None]).reshape(-1))
    return gemm_ref(np.array(xs_), w_f32)


# ------------------------------------------------------------------ row gather (embeddings)

@njit(parallel=True, **JIT)
def embed_f32(ids, w, out):
    for i in prange(ids.shape[0]):
        out[i] = w[ids[i]]


@njit(parallel=True, **JIT)
def embed_f16(ids, w, out):
    for i in prange(ids.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = half_to_float(w[ids[i], j])


@njit(parallel=True, **JIT)
def embed_bf16(ids, w, out):
    for i in prange(ids.shape[0]):
        bits = np.empty(out.shape[1], np.uint32)
        for j in range(out.shape[1]):
            bits[j] = np.uint32(w[ids[i], j]) << 16
        out[i] = bits.view(np.float32)


@njit(parallel=True, **JIT)
def embed_int8(ids, q, scales, group, out):
    for i in prange(ids.shape[0]):
        r = ids[i]
        for j in range(out.shape[1]):
            out[i, j] = as_float(scales[r, j // group]) * np.float32(q[r, j])


@njit(parallel=True, **JIT)
def embed_int4(ids, qs, scales, mins, group, out):
    has_mins = mins.shape[0] > 0
    for i in prange(ids.shape[0]):
        r = ids[i]
        _unpack_int4_row(qs[r], scales[r], mins[r] if has_mins else scales[r], has_mins, group, out[i])


# ------------------------------------------------------------------ references

def gemm_ref(x: np.ndarray, w_f32: np.ndarray) -> np.ndarray:
    """Plain NumPy twin of every gemm_*: x (T, in) @ unpacked W (out, in).T, in float64."""
    return (x.astype(np.float64) @ w_f32.astype(np.float64).T).astype(np.float32)


def embed_ref(ids: np.ndarray, w_f32: np.ndarray) -> np.ndarray:
    return w_f32[ids].astype(np.float32)
