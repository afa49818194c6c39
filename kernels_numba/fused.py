"""One decode step of a Llama-family decoder layer in one compiled call.

Op by op, one token crosses from Python into compiled code 16 times per layer (norm, three
projections, two RoPEs, KV store, attention, output projection, residual, norm, gate, up, SiLU,
down, residual), each crossing paying Python-side work (method calls, output allocation, argument
typing) on top of the kernel. Here a layer is one call (measured: see benchmarks/dispatch.py), and
the passes over memory that fusion saves are saved too:

- RMSNorm -> int8 quantization of the activations, once for Q, K and V together, once for gate
  and up together;
- Q, K and V rows in one parallel loop; gate and up rows in one loop that applies SiLU(gate) * up
  as it goes; residual additions folded into the output and down projections' stores;
- scratch buffers come from the caller (allocated once per layer at load): the decode loop
  allocates nothing.

Weights are the packed containers (Int8Weight named tuples as they are; Int4Rows, TernaryRows,
F32Rows, F16Rows, BF16Rows wrappers made by rows_of); ``row_dot`` picks each kind's row
kernel at compile time, so a layer with mixed kinds compiles once for its combination.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from numba import njit, prange
from numba.extending import overload

from edgerun.packed import DenseWeight, Int4Weight, Int8Weight, Sparse24Weight, TernaryWeight

from ._common import FASTMATH, JIT
from .ops import rms_norm_heads, rope_qk
from .paged_attention import paged_attention, prefetch_kv_share, store_kv_paged, store_kv_paged_int8
from .lowbit import EXPAND, KB, TB, WIDE, _to_planes, dot_24_expand, dot_t2_rows4, dot_t2_simd, quantize_rows_int8
from .simd import (BLOCK, dot_half_row, dot_int4_row, dot_int4_row_quad, dot_int4_tiles4, dot_int8_row, int4_tile_bytes,
                   quad_order, quantize_act, repack_int4_tiles)


class Int4Rows(NamedTuple):
    """An Int4Weight with its mins resolved: the scales themselves when it has none (then unused),
    so that the row kernel takes no branch (a conditional inside the IR-inlined row_dot trips
    Numba's parfor pass, and a call per row measured 3x slower)."""
    qs: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    has_mins: bool
    group: int


class Int4G32Rows(NamedTuple):
    """Int4Rows with groups of 32: its row dot reads the activations in quad order (a_[7])."""
    qs: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    has_mins: bool


class Int4Tiles(NamedTuple):
    """Int4G32Rows with float16 scales repacked 4 rows to a tile (simd.repack_int4_tiles) for the
    decode layer's 4-row blocks (row_block): one stream per thread instead of one per row. A copy
    in memory (the file's rows stay for prefill); made by tiled() when a whole layer runs in blocks."""
    tiles: np.ndarray       # (rows // 4, simd.int4_tile_bytes(nb, has_mins)) uint8
    has_mins: bool
    nb: int                 # blocks of 32 a row


class TernaryRows(NamedTuple):
    """A TernaryWeight (2-bit codes, BitNet b1.58) for row_dot: step is 1 with a scale per row, 0
    with one per tensor, so that the row's scale is scales[row * step] without a branch."""
    codes: np.ndarray
    scales: np.ndarray
    step: int


class Sparse24Rows(NamedTuple):
    """A Sparse24Weight with int8 values whose rows are whole 64-input chunks for vpexpandb
    (nch = in / 64): its row dot takes the per-token int8 activations, as gemm_sparse24 does."""
    vals: np.ndarray
    meta: np.ndarray
    scales: np.ndarray
    nch: int


class F32Rows(NamedTuple):
    w: np.ndarray          # float32 (out, in)


class F16Rows(NamedTuple):
    w: np.ndarray          # uint16 float16 bits (out, in)


class BF16Rows(NamedTuple):
    w: np.ndarray          # uint16 bfloat16 bits (out, in)


def rows_of(c):
    """A packed container as row_dot takes it (dense weights wrapped by dtype), or None when the
    kind has no row kernel here or the shape does not suit int8 activations."""
    if isinstance(c, DenseWeight):
        return {"f32": F32Rows, "f16": F16Rows, "bf16": BF16Rows}[c.dtype](c.w) if c.w.ndim == 2 else None
    if isinstance(c, TernaryWeight):
        return TernaryRows(c.codes, c.scales, int(c.scales.shape[0] > 1))
    if isinstance(c, Sparse24Weight):
        n = c.vals.shape[1] * 2
        ok = EXPAND and c.vals.dtype == np.int8 and n % 64 == 0
        return Sparse24Rows(c.vals, c.meta, c.scales, n // 64) if ok else None
    n = c.qs.shape[1] * 2 if isinstance(c, Int4Weight) else getattr(c, "q", np.empty((0, 0))).shape[1]
    if isinstance(c, Int4Weight) and n % BLOCK == 0 and c.group % BLOCK == 0:
        has_mins = c.mins.shape[0] > 0
        if c.group == BLOCK:
            return Int4G32Rows(c.qs, c.scales, c.mins if has_mins else c.scales, has_mins)
        return Int4Rows(c.qs, c.scales, c.mins if has_mins else c.scales, has_mins, c.group)
    if isinstance(c, Int8Weight) and n % BLOCK == 0 and c.group in (BLOCK, n):
        return c
    return None


@njit(fastmath=FASTMATH, **JIT)
def _dot_f32(a, b):
    """A function of its own: a loop inside the IR-inlined row_dot trips the parfor pass."""
    acc = np.float32(0.0)
    for j in range(a.shape[0]):
        acc += a[j] * b[j]
    return acc


def row_dot(w_, row_, x_, a_):
    """Row row_ of weight w_ times the activations: x_ (float32) for dense kinds; a_ = the
    quantized forms made by quantize_both: (xq, xs, xsum) per block of 32 (simd.quantize_act) for
    int8 and int4, (xq, scale, sum) per token (ternary, 2:4), xq in code order (lowbit) for
    ternary, and xq in quad order (simd.quad_order) for int4 with groups of 32."""
    raise NotImplementedError


@overload(row_dot, jit_options=JIT, inline="always")
def _row_dot(w_, row_, x_, a_):
    # inlined at the Numba IR level (a call per row measured 3x slower); no conditionals or loops
    # in the bodies (they trip the parfor pass when inlined), parameter names distinct from the
    # callers' loop variables, which an inlined assignment would overwrite
    cls = getattr(w_, "instance_class", None)
    if cls is Int4Rows:
        return lambda w_, row_, x_, a_: dot_int4_row(
            w_.qs[row_], w_.scales[row_], w_.mins[row_], w_.has_mins, a_[0], a_[1], a_[2], w_.group)
    if cls is Int4G32Rows:
        return lambda w_, row_, x_, a_: dot_int4_row_quad(
            w_.qs[row_], w_.scales[row_], w_.mins[row_], w_.has_mins, a_[7], a_[1], a_[2])
    if cls is Int4Tiles:           # one row of a 4-row tile (layers with tiles run in blocks)
        return lambda w_, row_, x_, a_: dot_int4_tiles4(
            w_.tiles, row_ // 4, w_.has_mins, w_.nb, a_[7], a_[1], a_[2])[row_ % 4]
    if cls is Int8Weight:
        return lambda w_, row_, x_, a_: dot_int8_row(w_.q[row_], w_.scales[row_], a_[0], a_[1], a_[2], w_.group)
    if cls is TernaryRows:
        return lambda w_, row_, x_, a_: (np.float32(dot_t2_simd(w_.codes[row_], a_[6][0], a_[6][1], a_[6][2],
                                                                a_[6][3]) - a_[5][0])
                                         * a_[4][0] * w_.scales[row_ * w_.step])
    if cls is Sparse24Rows:       # dot_24_expand adds 128 * sum(xq) (its weights are made unsigned)
        return lambda w_, row_, x_, a_: (np.float32(dot_24_expand(w_.vals[row_], w_.meta[row_], a_[3][0], w_.nch)
                                                    - np.int32(128) * a_[5][0]) * a_[4][0] * w_.scales[row_])
    if cls is F16Rows:
        return lambda w_, row_, x_, a_: dot_half_row(w_.w[row_], x_, False)
    if cls is BF16Rows:
        return lambda w_, row_, x_, a_: dot_half_row(w_.w[row_], x_, True)
    if cls is F32Rows:
        return lambda w_, row_, x_, a_: _dot_f32(w_.w[row_], x_)
    return None


def row_block(w_, blk_, x_, a_):
    """Rows 4 blk_ .. 4 blk_ + 3 of w_ times the activations, as a 4-tuple, for kinds with a
    multi-row kernel: ternary on 512-bit VNNI (lowbit.dot_t2_rows4, which loads each step of
    activation planes once for the 4 rows). A layer runs in blocks only when all seven of its
    matrices have one (has_blocks); the other kinds compile a stub that is never called."""
    raise NotImplementedError


@overload(row_block, jit_options=JIT, inline="always")
def _row_block(w_, blk_, x_, a_):
    if getattr(w_, "instance_class", None) is TernaryRows and WIDE:
        def impl(w_, blk_, x_, a_):
            rb_ = 4 * blk_
            d0_, d1_, d2_, d3_ = dot_t2_rows4(w_.codes, rb_, a_[6][0], a_[6][1], a_[6][2], a_[6][3])
            f_, b_ = a_[4][0], a_[5][0]
            return (np.float32(d0_ - b_) * f_ * w_.scales[rb_ * w_.step],
                    np.float32(d1_ - b_) * f_ * w_.scales[(rb_ + 1) * w_.step],
                    np.float32(d2_ - b_) * f_ * w_.scales[(rb_ + 2) * w_.step],
                    np.float32(d3_ - b_) * f_ * w_.scales[(rb_ + 3) * w_.step])
        return impl
    if getattr(w_, "instance_class", None) is Int4Tiles:
        return lambda w_, blk_, x_, a_: dot_int4_tiles4(w_.tiles, blk_, w_.has_mins, w_.nb, a_[7], a_[1], a_[2])
    zero = np.float32(0.0)
    return lambda w_, blk_, x_, a_: (zero, zero, zero, zero)


def has_blocks(mats, *widths) -> bool:
    """Every matrix has a 4-row kernel (row_block), given tiled(), and every output width is a
    multiple of 4."""
    return (WIDE and all(isinstance(m, (TernaryRows, Int4Tiles)) or _tileable(m) for m in mats)
            and all(n % 4 == 0 for n in widths))


def _tileable(m) -> bool:
    return (isinstance(m, Int4G32Rows) and m.scales.dtype == np.uint16 and m.qs.shape[0] % 4 == 0
            and os.environ.get("EDGERUN_INT4_TILES", "1").strip() != "0")


def huge_empty(shape) -> np.ndarray:
    """An uninitialised uint8 array in anonymous memory advised to transparent huge pages where
    the OS has them (Linux, THP "madvise" or "always"). The file's weights are mapped from the page
    cache, here in 2 MB pages; the tiles in 4 KB pages read ~10% slower than the rows they were
    made from (a TLB miss every 4 KB of a stream)."""
    import mmap
    n = int(np.prod(shape))
    huge = 2 << 20
    if not hasattr(mmap, "MADV_HUGEPAGE") or n < huge:
        return np.empty(shape, np.uint8)
    m = mmap.mmap(-1, n + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = np.frombuffer(m, np.uint8)
    start = -buf.ctypes.data % huge        # the first 2 MB boundary inside the mapping
    m.madvise(mmap.MADV_HUGEPAGE, start, n)
    return buf[start:start + n].reshape(shape)


def tiled(mats):
    """A layer's seven matrices (q, k, v, o, gate, up, down) with every Int4G32Rows of float16
    scales as Int4Tiles (a repacked copy); other kinds as they are. Gate and up, read together a
    block of 4 rows each, share one array, each group's gate tiles then its up tiles, so that the
    MLP's first region is one stream a thread too (separately: 2). EDGERUN_INT4_TILES=0 keeps the
    rows (for comparisons: benchmarks/roofline_1b.py int4-rows)."""
    def repack(m, out):
        repack_int4_tiles(m.qs, m.scales, m.mins, m.has_mins, out)
        return Int4Tiles(out, m.has_mins, m.scales.shape[1])

    def size(m):
        return m.qs.shape[0] // 4, int4_tile_bytes(m.scales.shape[1], m.has_mins)

    out = list(mats)
    g, u = mats[4], mats[5]
    paired = _tileable(g) and _tileable(u) and size(g) == size(u) and g.has_mins == u.has_mins
    if paired:
        n, tb = size(g)
        both = huge_empty((n, 2 * tb))     # views with unit inner stride, as the kernel reads them
        out[4], out[5] = repack(g, both[:, :tb]), repack(u, both[:, tb:])
    for i, m in enumerate(mats):
        if _tileable(m) and not (paired and i in (4, 5)):
            out[i] = repack(m, huge_empty(size(m)))
    return out


@njit(fastmath=FASTMATH, **JIT)
def quantize_both(x, a):
    """x (n,) -> a's quantized forms: per block of 32 when the layer has int8 or int4 rows (a[0]
    not empty); also in quad order when it has int4 g32 rows (a[7] not empty); per token (and in
    code order) when it has ternary or 2:4 rows (a[6] not empty)."""
    if a[0].shape[0]:
        quantize_act(x, a[0], a[1], a[2])
    if a[7].shape[0]:
        quad_order(a[0], a[7])
    if a[6].shape[1]:
        quantize_rows_int8(x.reshape((1, x.shape[0])), a[3], a[4], a[5])
        _to_planes(a[3][0], a[6])


def activations(n: int, per_token: bool, quad: bool, block: bool = True):
    """Scratch for quantize_both of an n-vector; per_token: the layer has ternary or 2:4 rows;
    quad: int4 rows with groups of 32 (activations also in quad order); block: int8 or int4 rows
    (activations per block of 32; a ternary-only layer skips that pass, 15 us a 1B layer)."""
    nb = n // BLOCK if block or quad else 0
    npad = -(-n // TB) * TB if per_token else 0
    return (np.empty(n if nb else 0, np.int8), np.empty(nb, np.float32), np.empty(nb, np.float32),
            np.zeros((1, npad), np.int8), np.empty(1, np.float32), np.empty(1, np.int32),
            np.empty((4, npad // 4), np.int8), np.empty(n if quad else 0, np.int8))


@njit(inline="always", fastmath=FASTMATH)
def _norm_into(x, weight, eps, out):
    """out = x / rms(x) * weight, one vector."""
    ss = np.float32(0.0)
    for j in range(x.shape[0]):
        ss += x[j] * x[j]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(x.shape[0]) + eps)
    for j in range(x.shape[0]):
        out[j] = x[j] * inv * weight[j]


# inlined into the layer at the IR level: names distinct from the layer's own variables, which an
# inlined assignment would overwrite

@njit(inline="always", fastmath=FASTMATH)
def _silu(g_):
    return g_ / (np.float32(1.0) + np.exp(-g_))


@njit(fastmath=FASTMATH, **JIT)
def _store4(dst_, r4_, vals_, bias_):
    """dst_[r4_ + j] = vals_[j] (+ bias_[r4_ + j] when there is a bias)."""
    z_ = np.float32(0.0)
    has_ = bias_.shape[0] > 0
    dst_[r4_] = vals_[0] + (bias_[r4_] if has_ else z_)
    dst_[r4_ + 1] = vals_[1] + (bias_[r4_ + 1] if has_ else z_)
    dst_[r4_ + 2] = vals_[2] + (bias_[r4_ + 2] if has_ else z_)
    dst_[r4_ + 3] = vals_[3] + (bias_[r4_ + 3] if has_ else z_)


@njit(fastmath=FASTMATH, **JIT)
def _add4(dst_, r4_, vals_, bias_):
    """dst_[r4_ + j] += vals_[j] (+ bias_[r4_ + j] when there is a bias): a residual add. Calls
    (one per 4 rows), not inlined: inlined into a prange body, these in-place adds gave wrong
    sums (the parfor pass)."""
    z_ = np.float32(0.0)
    has_ = bias_.shape[0] > 0
    dst_[r4_] += vals_[0] + (bias_[r4_] if has_ else z_)
    dst_[r4_ + 1] += vals_[1] + (bias_[r4_ + 1] if has_ else z_)
    dst_[r4_ + 2] += vals_[2] + (bias_[r4_ + 2] if has_ else z_)
    dst_[r4_ + 3] += vals_[3] + (bias_[r4_ + 3] if has_ else z_)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def llama_layer_decode(x, norms, qk_norms, eps, wq, wk, wv, wo, wg, wu, wd, biases,
                       positions, inv_freq, rope_scale,
                       kp, vp, ks, vs, quantized, table, scale, window, softcap,
                       q, k, v, att, xn, act_h, act_a, act_i, h, blocks):
    """One token through one layer; x (hidden,) float32 is updated in place.

    norms: (attention norm, MLP norm) (hidden,); qk_norms: (q_norm, k_norm) (head_dim,) or
    empty; biases: (q, k, v, o) biases or empty arrays. positions (1,) int64: this token's
    position (also where its K and V go). kp, vp, ks, vs, table: the layer's paged KV cache
    (edgerun/cache/paged.py; int8 when quantized). Scratch: q (1, H, d), k and v (1, Hk, d),
    att (1, H, d), xn (hidden,), act_* = activations() for the hidden, attention and MLP widths,
    h (inter,). blocks: every matrix runs 4 rows at a time (row_block; see has_blocks)."""
    H, d = q.shape[1], q.shape[2]
    Hk = k.shape[1]
    nq, nk = H * d, Hk * d
    qf, kf, vf = q.reshape(nq), k.reshape(nk), v.reshape(nk)
    bq, bk, bv, bo = biases
    # ---- attention: norm -> int8 once -> Q, K, V rows in one loop
    _norm_into(x, norms[0], eps, xn)
    quantize_both(xn, act_h)
    g4 = 4 if blocks else 1
    n_qkv = (nq + 2 * nk) // g4
    for ib in prange(n_qkv):
        prefetch_kv_share(kp, vp, table, positions[0], window, ib, n_qkv)
        if blocks:          # 4 rows of one matrix (nq and nk are multiples of 4)
            i = 4 * ib
            if i < nq:
                _store4(qf, i, row_block(wq, i // 4, xn, act_h), bq)
            elif i < nq + nk:
                _store4(kf, i - nq, row_block(wk, (i - nq) // 4, xn, act_h), bk)
            else:
                _store4(vf, i - nq - nk, row_block(wv, (i - nq - nk) // 4, xn, act_h), bv)
        elif ib < nq:
            qf[ib] = row_dot(wq, ib, xn, act_h) + (bq[ib] if bq.shape[0] else np.float32(0.0))
        elif ib < nq + nk:
            r = ib - nq
            kf[r] = row_dot(wk, r, xn, act_h) + (bk[r] if bk.shape[0] else np.float32(0.0))
        else:
            r = ib - nq - nk
            vf[r] = row_dot(wv, r, xn, act_h) + (bv[r] if bv.shape[0] else np.float32(0.0))
    if qk_norms[0].shape[0]:
        rms_norm_heads(q, qk_norms[0], eps)
        rms_norm_heads(k, qk_norms[1], eps)
    rope_qk(q, k, positions, inv_freq, rope_scale)
    start = positions[0]
    if quantized:
        store_kv_paged_int8(k, v, kp, vp, ks, vs, table, start)
    else:
        store_kv_paged(k, v, kp, vp, table, start)
    paged_attention(q, kp, vp, ks, vs, quantized, table, start, scale, window, softcap, att)
    # ---- output projection, residual added in place
    af = att.reshape(nq)
    quantize_both(af, act_a)
    for rb in prange(x.shape[0] // g4):
        if blocks:
            _add4(x, 4 * rb, row_block(wo, rb, af, act_a), bo)
        else:
            x[rb] += row_dot(wo, rb, af, act_a) + (bo[rb] if bo.shape[0] else np.float32(0.0))
    # ---- MLP: norm -> int8 once -> gate and up rows together, SiLU(gate) * up -> down (+ residual)
    _norm_into(x, norms[1], eps, xn)
    quantize_both(xn, act_h)
    for rb in prange(h.shape[0] // g4):
        if blocks:
            g0, g1, g2, g3 = row_block(wg, rb, xn, act_h)
            u0, u1, u2, u3 = row_block(wu, rb, xn, act_h)
            h[4 * rb] = _silu(g0) * u0
            h[4 * rb + 1] = _silu(g1) * u1
            h[4 * rb + 2] = _silu(g2) * u2
            h[4 * rb + 3] = _silu(g3) * u3
        else:
            g = row_dot(wg, rb, xn, act_h)
            u = row_dot(wu, rb, xn, act_h)
            h[rb] = _silu(g) * u
    quantize_both(h, act_i)
    for rb in prange(x.shape[0] // g4):
        if blocks:
            _add4(x, 4 * rb, row_block(wd, rb, h, act_i), bo[:0])
        else:
            x[rb] += row_dot(wd, rb, h, act_i)
