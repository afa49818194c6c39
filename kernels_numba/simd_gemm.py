"""Register-tiled prefill GEMM for int8 / int4 weights against int8 activations (AVX512-VNNI).

Why: the row kernels of simd.py give one weight row x 4 tokens per call, and every 32-block of
every (row, token) pair costs a vpdpbusd whose 8 int32 lanes all belong to that pair, then a
convert and an fma: ~5 instructions per 32 multiply-adds, ~50 GMAC/s a thread, a quarter of the
peak of vpdpbusd (64 multiply-adds a cycle on Zen 4).

Here the 16 lanes of a vector are 16 weight rows (one output each), as in llama.cpp's repacked
kernels: a panel of 16 rows is transposed once per call into a scratch buffer whose dword k holds
bytes 4k..4k+3 of each of the 16 rows (``pack_panel_*``: 16 loads and 64 shuffles per 1 KiB), and
the micro-kernel (``tile_*``) takes 8 (or 4) tokens at a time: per 4 inputs, one 64-byte panel load
and 8 vpdpbusd with each token's 4 activation bytes broadcast from memory (``{1to16}``); per block
of 32 inputs and token, one convert, one multiply (weight scales x the token's scale) and one fma
for all 16 rows. Per block, 64 vpdpbusd share Zen 4's two FMA pipes with 16 multiplies and fmas
(24 with mins), so this schedule tops out near 64 / 80 of vpdpbusd's rate: measured ~185 GMAC/s a
thread in the tile alone, 145-185 for the whole GEMM (panel transposes, activation quantization,
stores) at T = 64..512 (benchmarks/gemm_bench.py), against ~50 for the row kernels.

Unsigned x signed: vpdpbusd multiplies unsigned bytes (the panel) by signed ones (the broadcast
activations), so int8 weights are stored as q + 128 (q ^ 0x80); int4 panels keep the packed bytes
as they are and the tile splits the nibbles (u = 0..15: low nibbles are inputs 4c.., high ones
16+4c..). The int32 accumulator of block b starts at ``ioff[t, b] = -c * sum(xq[t, b])`` (c = 128
for int8, 8 for symmetric int4, 0 with mins), which takes the offset off exactly, in integers; int4
with mins adds ``m[r, b] * xsum[t, b]`` per block.

The weight file keeps its layout (edgerun/packed.py): the transposed panel is scratch (16 x n
bytes for int8, 16 x n / 2 for int4), rebuilt on each call and reused by all T tokens.
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._common import JIT, as_float
from .simd import BLOCK, WIDE, _addr, _i32, _i64, _intr, _load, _splat

LANES = 16          # weight rows per panel (int32 lanes of a 512-bit vector)
NT = 8              # tokens per micro-kernel call
# The tiled path needs 512-bit VNNI; other CPUs keep simd.py's row kernels. EDGERUN_GEMM_TILES=0
# turns it off (A/B runs; compiled into the cached kernels like EDGERUN_SIMD: change NUMBA_CACHE_DIR too).
TILED = WIDE and os.environ.get("EDGERUN_GEMM_TILES", "1").strip() != "0"

_f32 = ir.FloatType()
_i8 = ir.IntType(8)
_v16i32, _v16f32 = ir.VectorType(_i32, 16), ir.VectorType(_f32, 16)
_v64i8 = ir.VectorType(_i8, 64)


def _array(context, builder, ty, val):
    return context.make_array(ty)(context, builder, val)


def _stride0(context, builder, ty, val):
    return builder.extract_value(_array(context, builder, ty, val).strides, 0)


def _store(builder, base, offset, value):
    ptr = builder.inttoptr(builder.add(base, offset), value.type.as_pointer())
    st = builder.store(value, ptr)
    st.align = 1
    return st


# ------------------------------------------------------------------ panel: 16 rows transposed

def _transpose16(builder, rows):
    """16 vectors of 16 dwords (row i = rows[i]) -> their transpose, by swapping off-diagonal
    blocks of 8, 4, 2 and 1 dwords (64 two-source shuffles)."""
    v = list(rows)
    m = 8
    while m:
        lo_mask = [c if not c & m else 16 + c - m for c in range(16)]
        hi_mask = [c + m if not c & m else 16 + c for c in range(16)]
        for i in range(16):
            if i & m:
                continue
            a, b = v[i], v[i + m]
            v[i] = builder.shuffle_vector(a, b, ir.Constant(_v16i32, lo_mask))
            v[i + m] = builder.shuffle_vector(a, b, ir.Constant(_v16i32, hi_mask))
        m //= 2
    return v


def _panel_codegen(flip):
    def codegen(context, builder, sig_, args):
        qty, dty = sig_.args[0], sig_.args[2]
        qa = _addr(context, builder, qty, args[0])
        stride = _stride0(context, builder, qty, args[0])
        r0 = context.cast(builder, args[1], sig_.args[1], types.int64)
        da = _addr(context, builder, dty, args[2])
        nsteps = context.cast(builder, args[3], sig_.args[3], types.int64)
        base = builder.add(qa, builder.mul(r0, stride))
        with cgutils.for_range(builder, nsteps) as loop:
            j = loop.index
            rows = []
            for i in range(LANES):
                row = builder.add(base, builder.mul(ir.Constant(_i64, i), stride))
                v = _load(builder, row, builder.mul(j, ir.Constant(_i64, 64)), _v64i8)
                if flip:        # int8 q -> q + 128 (unsigned for vpdpbusd)
                    v = builder.xor(v, _splat(_v64i8, -128))
                rows.append(builder.bitcast(v, _v16i32))
            for k, col in enumerate(_transpose16(builder, rows)):
                off = builder.mul(builder.add(builder.mul(j, ir.Constant(_i64, 16)), ir.Constant(_i64, k)),
                                  ir.Constant(_i64, 64))
                _store(builder, da, off, col)
        return context.get_dummy_value()
    return codegen


def _panel_typer(q, dst):
    return (isinstance(q, types.Array) and q.ndim == 2 and q.layout == "C" and q.dtype.bitwidth == 8
            and isinstance(dst, types.Array) and dst.layout == "C")


@intrinsic
def _panel_int8_simd(typingctx, q, r0, dst, nsteps):
    """dst[(16 j + k) * 16 + i] = dword k of bytes 64 j.. of row r0 + i of q, xor 0x80 in each
    byte, for j < nsteps (q: (rows, n) int8, C order; dst: uint32)."""
    if not _panel_typer(q, dst):
        return None
    return types.void(q, r0, dst, nsteps), _panel_codegen(True)


@intrinsic
def _panel_raw_simd(typingctx, q, r0, dst, nsteps):
    """The same without the xor (int4: the packed bytes as they are)."""
    if not _panel_typer(q, dst):
        return None
    return types.void(q, r0, dst, nsteps), _panel_codegen(False)


def _prefetch_codegen(context, builder, sig_, args):
    qty = sig_.args[0]
    arr = _array(context, builder, qty, args[0])
    rows = builder.extract_value(arr.shape, 0)
    nbytes = builder.mul(builder.extract_value(arr.shape, 1), ir.Constant(_i64, qty.dtype.bitwidth // 8))
    stride = _stride0(context, builder, qty, args[0])
    r0 = context.cast(builder, args[1], sig_.args[1], types.int64)
    qa = _addr(context, builder, qty, args[0])
    nr = builder.sub(rows, r0)
    nr = builder.select(builder.icmp_signed("<", nr, ir.Constant(_i64, LANES)), nr, ir.Constant(_i64, LANES))
    lines = builder.sdiv(builder.add(nbytes, ir.Constant(_i64, 63)), ir.Constant(_i64, 64))
    with cgutils.for_range(builder, nr) as i:
        row = builder.add(qa, builder.mul(builder.add(r0, i.index), stride))
        with cgutils.for_range(builder, lines) as k:
            ptr = builder.inttoptr(builder.add(row, builder.mul(k.index, ir.Constant(_i64, 64))), _i8.as_pointer())
            _intr(builder, "llvm.prefetch.p0", ir.VoidType(),
                  [ptr, ir.Constant(_i32, 0), ir.Constant(_i32, 2), ir.Constant(_i32, 1)])
    return context.get_dummy_value()


@intrinsic
def prefetch_panel(typingctx, q, r0):
    """Prefetch rows r0..r0+15 (those that exist) of a 2-D C array toward L2. Weights that come
    from memory (a model larger than the caches) made a 576 x 1536 int8 GEMM 1.9x slower at T = 16
    and 1.1x at T = 128 than with the weights in cache; prefetching the next panel while this one's
    tiles run took back about half of it at T = 16 (246 -> 198 us, 1 thread)."""
    if not (isinstance(q, types.Array) and q.ndim == 2 and q.layout == "C"):
        return None
    return types.void(q, r0), _prefetch_codegen


@njit(inline="always")
def _dword(b0, b1, b2, b3):
    return np.uint32(b0) | (np.uint32(b1) << 8) | (np.uint32(b2) << 16) | (np.uint32(b3) << 24)


@njit(**JIT)
def pack_panel_int8(q, r0, dst):
    """Rows r0..r0+15 of int8 q (rows, n) -> dst (n // 4 * 16,) uint32, dword (k, i) = bytes
    4k..4k+3 of row r0 + i, each + 128 (xor 0x80); rows past the end are zero."""
    rows, n = q.shape
    nr = min(LANES, rows - r0)
    nsteps = n // 64 if nr == LANES else 0
    _panel_int8_simd(q, r0, dst, nsteps)
    for k in range(nsteps * 16, n // 4):
        for i in range(LANES):
            if i < nr:
                qr = q[r0 + i, 4 * k:4 * k + 4]
                dst[k * LANES + i] = _dword(np.uint8(qr[0]) ^ 128, np.uint8(qr[1]) ^ 128,
                                            np.uint8(qr[2]) ^ 128, np.uint8(qr[3]) ^ 128)
            else:
                dst[k * LANES + i] = 0


@njit(**JIT)
def pack_panel_int4(qs, r0, dst):
    """Rows r0..r0+15 of int4 groups of 32 (qs (rows, n // 2) uint8, Int4Weight layout) -> dst
    (n // 8 * 16,) uint32, dword (k, i) = packed bytes 4k..4k+3 of row r0 + i as they are: in group
    g = k // 4, c = k % 4, their low nibbles are inputs 4c..4c+3 and their high ones 16+4c..16+4c+3
    (the tile unpacks them); rows past the end are zero."""
    rows, nbytes = qs.shape
    nr = min(LANES, rows - r0)
    nsteps = nbytes // 64 if nr == LANES else 0
    _panel_raw_simd(qs, r0, dst, nsteps)
    for k in range(nsteps * 16, nbytes // 4):
        for i in range(LANES):
            if i < nr:
                qr = qs[r0 + i, 4 * k:4 * k + 4]
                dst[k * LANES + i] = _dword(qr[0], qr[1], qr[2], qr[3])
            else:
                dst[k * LANES + i] = 0


def _scales_codegen(context, builder, sig_, args):
    sty, dty = sig_.args[0], sig_.args[2]
    half = isinstance(sty.dtype, types.Integer)
    sa = _addr(context, builder, sty, args[0])
    stride = _stride0(context, builder, sty, args[0])
    r0 = context.cast(builder, args[1], sig_.args[1], types.int64)
    da = _addr(context, builder, dty, args[2])
    base = builder.add(sa, builder.mul(r0, stride))
    with cgutils.for_range(builder, context.cast(builder, args[3], sig_.args[3], types.int64)) as loop:
        j = loop.index
        rows = []
        for i in range(LANES):
            row = builder.add(base, builder.mul(ir.Constant(_i64, i), stride))
            if half:    # float16 bits -> float32 (vcvtph2ps: exact, subnormals and inf included)
                h = _load(builder, row, builder.mul(j, ir.Constant(_i64, 32)), ir.VectorType(ir.HalfType(), 16))
                v = builder.fpext(h, _v16f32)
            else:
                v = _load(builder, row, builder.mul(j, ir.Constant(_i64, 64)), _v16f32)
            rows.append(builder.bitcast(v, _v16i32))
        for k, col in enumerate(_transpose16(builder, rows)):
            off = builder.mul(builder.add(builder.mul(j, ir.Constant(_i64, 16)), ir.Constant(_i64, k)),
                              ir.Constant(_i64, 64))
            _store(builder, da, off, col)
    return context.get_dummy_value()


@intrinsic
def _panel_scales_simd(typingctx, s, r0, dst, nsteps):
    """dst[(16 j + k) * 16 + i] = float(s[r0 + i, 16 j + k]) for j < nsteps."""
    if not (isinstance(s, types.Array) and s.ndim == 2 and s.layout == "C" and isinstance(dst, types.Array)
            and dst.layout == "C" and dst.dtype == types.float32):
        return None
    return types.void(s, r0, dst, nsteps), _scales_codegen


@njit(**JIT)
def pack_panel_scales(s, r0, dst):
    """Rows r0..r0+15 of scales s (rows, nb) float32 or float16 bits -> dst (nb * 16,) float32,
    element (b, i) = s[r0 + i, b]; rows past the end are zero."""
    rows, nb = s.shape
    nr = min(LANES, rows - r0)
    nsteps = nb // LANES if nr == LANES else 0
    _panel_scales_simd(s, r0, dst, nsteps)
    for b in range(nsteps * LANES, nb):
        for i in range(LANES):
            dst[b * LANES + i] = as_float(s[r0 + i, b]) if i < nr else np.float32(0.0)


# ------------------------------------------------------------------ micro-kernel: 16 rows x NT tokens

def _tile_codegen(nt, per_row, mins, nib):
    def codegen(context, builder, sig_, args):
        (wp, ws, ms, xq, xs, ioff, xsum, t0, out) = args[:9]
        tys = sig_.args
        wpa, wsa, msa = (_addr(context, builder, tys[i], args[i]) for i in range(3))
        t0 = context.cast(builder, t0, tys[7], types.int64)
        n = builder.extract_value(_array(context, builder, tys[3], xq).shape, 1)
        nb = builder.sdiv(n, ir.Constant(_i64, BLOCK))
        toks = []
        for k in range(nt):
            row = builder.add(t0, ir.Constant(_i64, k))
            toks.append([builder.add(_addr(context, builder, tys[i], args[i]),
                                     builder.mul(row, _stride0(context, builder, tys[i], args[i])))
                         for i in (3, 4, 5, 6)])
        facc = [cgutils.alloca_once_value(builder, ir.Constant(_v16f32, None)) for _ in range(nt)]
        zero = ir.Constant(_i64, 0)

        def bcast_i32(base, off):
            v = _load(builder, base, off, _i32)
            return builder.shuffle_vector(builder.insert_element(ir.Constant(_v16i32, ir.Undefined), v,
                                                                 ir.Constant(_i32, 0)),
                                          ir.Constant(_v16i32, ir.Undefined), ir.Constant(_v16i32, [0] * 16))

        def bcast_f32(base, off):
            v = _load(builder, base, off, _f32)
            return builder.shuffle_vector(builder.insert_element(ir.Constant(_v16f32, ir.Undefined), v,
                                                                 ir.Constant(_i32, 0)),
                                          ir.Constant(_v16f32, ir.Undefined), ir.Constant(_v16i32, [0] * 16))

        def weights(b):
            """(vector of 16 rows x 4 weight bytes, input chunk j of the block) for j = 0..7."""
            if not nib:
                for j in range(8):
                    yield _load(builder, wpa, builder.mul(builder.add(builder.mul(b, ir.Constant(_i64, 8)),
                                                                      ir.Constant(_i64, j)), ir.Constant(_i64, 64)), _v16i32), j
                return
            mask = _splat(_v16i32, 0x0F0F0F0F)
            for c in range(4):      # packed int4: low nibbles are chunk c, high ones chunk c + 4
                v = _load(builder, wpa, builder.mul(builder.add(builder.mul(b, ir.Constant(_i64, 4)),
                                                                ir.Constant(_i64, c)), ir.Constant(_i64, 64)), _v16i32)
                yield builder.and_(v, mask), c
                yield builder.and_(builder.lshr(v, _splat(_v16i32, 4)), mask), c + 4

        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            b4 = builder.mul(b, ir.Constant(_i64, 4))
            acc = [bcast_i32(tok[2], b4) for tok in toks]           # -c * sum(xq) of the block
            for w, j in weights(b):
                xoff = builder.add(builder.mul(b, ir.Constant(_i64, BLOCK)), ir.Constant(_i64, 4 * j))
                for k, tok in enumerate(toks):
                    acc[k] = _intr(builder, "llvm.x86.avx512.vpdpbusd.512", _v16i32,
                                   [acc[k], w, bcast_i32(tok[0], xoff)])
            if per_row:
                for k, tok in enumerate(toks):
                    builder.store(_intr(builder, "llvm.fma.v16f32", _v16f32,
                                        [builder.sitofp(acc[k], _v16f32), bcast_f32(tok[1], b4),
                                         builder.load(facc[k])]), facc[k])
            else:
                wsv = _load(builder, wsa, builder.mul(b, ir.Constant(_i64, 64)), _v16f32)
                msv = _load(builder, msa, builder.mul(b, ir.Constant(_i64, 64)), _v16f32) if mins else None
                for k, tok in enumerate(toks):
                    s = builder.fmul(wsv, bcast_f32(tok[1], b4))
                    f = _intr(builder, "llvm.fma.v16f32", _v16f32,
                              [builder.sitofp(acc[k], _v16f32), s, builder.load(facc[k])])
                    if mins:
                        f = _intr(builder, "llvm.fma.v16f32", _v16f32, [msv, bcast_f32(tok[3], b4), f])
                    builder.store(f, facc[k])
        ostride = _stride0(context, builder, tys[8], out)
        ot0 = context.cast(builder, args[9], tys[9], types.int64)
        or0 = context.cast(builder, args[10], tys[10], types.int64)
        oa = builder.add(_addr(context, builder, tys[8], out),
                         builder.add(builder.mul(ot0, ostride), builder.mul(or0, ir.Constant(_i64, 4))))
        wrow = _load(builder, wsa, zero, _v16f32) if per_row else None
        for k in range(nt):
            f = builder.load(facc[k])
            if per_row:
                f = builder.fmul(f, wrow)
            _store(builder, oa, builder.mul(ir.Constant(_i64, k), ostride), f)
        return context.get_dummy_value()
    return codegen


def _make_tile(nt, per_row, mins, nib=False):
    def tile(typingctx, wp, ws, ms, xq, xs, ioff, xsum, t0, out, ot0, or0):
        one_d = all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in (wp, ws, ms))
        two_d = all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in (xq, xs, ioff, xsum))
        if not (one_d and two_d and isinstance(out, types.Array) and out.ndim == 2):   # out: rows unit-stride
            return None
        return (types.void(wp, ws, ms, xq, xs, ioff, xsum, t0, out, ot0, or0),
                _tile_codegen(nt, per_row, mins, nib))
    tile.__name__ = f"tile_{nt}_{'int4' if nib else 'int8'}_{'row' if per_row else 'g32'}{'_mins' if mins else ''}"
    tile.__doc__ = (f"out[ot0 + k, or0 + i] = dot of panel row i with token t0 + k, k < {nt}, i < 16: panel "
                    "wp (n // 4 * 16,) uint32 (pack_panel_*), scales ws (nb * 16,) (per_row: (16,)), mins ms; "
                    "activations xq (T, n) int8, xs (T, nb), ioff (T, nb) int32, xsum (T, nb); out float32 "
                    "(any row stride; the 16 outputs of a token are stored as one vector).")
    return intrinsic(tile)


tile_g32 = _make_tile(NT, False, False)
tile_row = _make_tile(NT, True, False)
tile_int4 = _make_tile(NT, False, False, nib=True)
tile_int4_mins = _make_tile(NT, False, True, nib=True)
# 4-token twins for the last 1..4 tokens (T is padded to a multiple of 4, not 8)
tile_g32_4 = _make_tile(4, False, False)
tile_row_4 = _make_tile(4, True, False)
tile_int4_4 = _make_tile(4, False, False, nib=True)
tile_int4_mins_4 = _make_tile(4, False, True, nib=True)


# ------------------------------------------------------------------ activations

def _quantize_codegen(context, builder, sig_, args):
    x, xq, xs, ioff, xsum = (_addr(context, builder, t, a) for t, a in zip(sig_.args[:5], args[:5]))
    c = context.cast(builder, args[5], sig_.args[5], types.int32)
    n = builder.extract_value(_array(context, builder, sig_.args[0], args[0]).shape, 0)
    v16i8 = ir.VectorType(_i8, 16)
    with cgutils.for_range(builder, builder.sdiv(n, ir.Constant(_i64, BLOCK))) as loop:
        b = loop.index
        halves = [_load(builder, x, builder.mul(builder.add(builder.mul(b, ir.Constant(_i64, 2)), ir.Constant(_i64, h)),
                                                 ir.Constant(_i64, 64)), _v16f32) for h in range(2)]
        bits = [builder.and_(builder.bitcast(v, _v16i32), _splat(_v16i32, 0x7FFFFFFF)) for v in halves]
        # max |x| as integers: for non-negative floats the bit patterns order as the values do
        m = _intr(builder, "llvm.vector.reduce.umax.v16i32", _i32,
                  [_intr(builder, "llvm.umax.v16i32", _v16i32, bits)])
        amax = builder.bitcast(m, _f32)
        d = builder.fmul(amax, ir.Constant(_f32, float(np.float32(1.0) / np.float32(127.0))))   # quantize_act under arcp
        inv = builder.select(builder.fcmp_ordered(">", amax, ir.Constant(_f32, 0.0)),
                             builder.fdiv(ir.Constant(_f32, 127.0), amax), ir.Constant(_f32, 0.0))
        invv = builder.shuffle_vector(builder.insert_element(ir.Constant(_v16f32, ir.Undefined), inv, ir.Constant(_i32, 0)),
                                      ir.Constant(_v16f32, ir.Undefined), ir.Constant(_v16i32, [0] * 16))
        total = ir.Constant(_v16i32, None)
        for h, v in enumerate(halves):
            q = builder.fptosi(_intr(builder, "llvm.rint.v16f32", _v16f32, [builder.fmul(v, invv)]), _v16i32)
            total = builder.add(total, q)
            _store(builder, xq, builder.add(builder.mul(b, ir.Constant(_i64, BLOCK)), ir.Constant(_i64, 16 * h)),
                   builder.trunc(q, v16i8))
        sm = _intr(builder, "llvm.vector.reduce.add.v16i32", _i32, [total])
        b4 = builder.mul(b, ir.Constant(_i64, 4))
        _store(builder, xs, b4, d)
        _store(builder, xsum, b4, builder.fmul(d, builder.sitofp(sm, _f32)))
        _store(builder, ioff, b4, builder.mul(builder.neg(c), sm))
    return context.get_dummy_value()


@intrinsic
def _quantize_row(typingctx, x, xq, xs, ioff, xsum, c):
    """simd.quantize_act for one row (same codes, scales and sums, bit for bit, for finite x),
    in 512-bit vectors, plus ioff[b] = -c * sum of block b's codes."""
    if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in (x, xq, xs, ioff, xsum)):
        return None
    return types.void(x, xq, xs, ioff, xsum, c), _quantize_codegen


@njit(parallel=True, **JIT)
def quantize_tokens(x, c, tpad):
    """x (T, n) -> xq (tpad, n) int8, xs, ioff (int32, = -c * sum of the block's codes), xsum
    (tpad, n // 32), per token and block of 32 as simd.quantize_act; rows past T are zero."""
    T, n = x.shape
    nb = n // BLOCK
    xq = np.empty((tpad, n), np.int8)
    xs = np.empty((tpad, nb), np.float32)
    ioff = np.empty((tpad, nb), np.int32)
    xsum = np.empty((tpad, nb), np.float32)
    for t in prange(T):
        _quantize_row(np.ascontiguousarray(x[t]), xq[t], xs[t], ioff[t], xsum[t], c)
    xq[T:] = 0
    xs[T:] = 0
    ioff[T:] = 0
    xsum[T:] = 0
    return xq, xs, ioff, xsum


# ------------------------------------------------------------------ the GEMMs

@njit(inline="always")
def _tiles_of_panel(tile8, tile4, panel, ws, ms, xq, xs, ioff, xsum, out, r0, tile):
    """Every token of the padded activations against one panel: tiles of 8 tokens, the last 4 (if
    the padded count is not a multiple of 8) as one of 4. Whole tiles are stored straight into out,
    edge ones through the small tile buffer. tile8 / tile4: the kind's tiles (inlined, constant)."""
    T, rows = out.shape
    tpad = xq.shape[0]
    unit = out.strides[1] == 4           # the tiles store 16 outputs of a token as one vector
    t0 = 0
    while t0 < tpad:
        nt = NT if t0 + NT <= tpad else 4
        whole = unit and t0 + nt <= T and r0 + LANES <= rows
        dst, ot0, or0 = (out, t0, r0) if whole else (tile, 0, 0)
        if nt == NT:
            tile8(panel, ws, ms, xq, xs, ioff, xsum, t0, dst, ot0, or0)
        else:
            tile4(panel, ws, ms, xq, xs, ioff, xsum, t0, dst, ot0, or0)
        if not whole:
            for k in range(min(nt, T - t0)):
                for i in range(min(LANES, rows - r0)):
                    out[t0 + k, r0 + i] = tile[k, i]
        t0 += nt


# one compiled function per kind (cold JIT: each holds only its own two tiles)
@njit(**JIT)
def _panel_int8_g32(panel, ws, ms, xq, xs, ioff, xsum, out, r0, tile):
    _tiles_of_panel(tile_g32, tile_g32_4, panel, ws, ms, xq, xs, ioff, xsum, out, r0, tile)


@njit(**JIT)
def _panel_int8_row(panel, ws, ms, xq, xs, ioff, xsum, out, r0, tile):
    _tiles_of_panel(tile_row, tile_row_4, panel, ws, ms, xq, xs, ioff, xsum, out, r0, tile)


@njit(**JIT)
def _panel_int4(panel, ws, ms, xq, xs, ioff, xsum, out, r0, tile):
    _tiles_of_panel(tile_int4, tile_int4_4, panel, ws, ms, xq, xs, ioff, xsum, out, r0, tile)


@njit(**JIT)
def _panel_int4_mins(panel, ws, ms, xq, xs, ioff, xsum, out, r0, tile):
    _tiles_of_panel(tile_int4_mins, tile_int4_mins_4, panel, ws, ms, xq, xs, ioff, xsum, out, r0, tile)


@njit(**JIT)
def _all_scales(s):
    """Scales (rows, nb) float32 or float16 bits -> (panels, nb * 16) float32, panel p's block b
    at [p, 16 b:16 b + 16] (pack_panel_scales)."""
    rows, nb = s.shape
    npan = (rows + LANES - 1) // LANES
    out = np.empty((npan, nb * LANES), np.float32)
    for p in range(npan):
        pack_panel_scales(s, p * LANES, out[p])
    return out


@njit(parallel=True, **JIT)
def _int8_panels(q, ws, per_row, xq, xs, ioff, xsum, out):
    # compiled once per weight / output type: the scales' dtype stays outside (cold JIT)
    rows, n = q.shape
    for p in prange(ws.shape[0]):
        r0 = p * LANES
        panel = np.empty(n // 4 * LANES, np.uint32)
        tile = np.empty((NT, LANES), np.float32)
        pack_panel_int8(q, r0, panel)
        prefetch_panel(q, r0 + LANES)    # the next panel's rows stream in while these tiles run
        if per_row:
            _panel_int8_row(panel, ws[p], ws[p], xq, xs, ioff, xsum, out, r0, tile)
        else:
            _panel_int8_g32(panel, ws[p], ws[p], xq, xs, ioff, xsum, out, r0, tile)


@njit(parallel=True, **JIT)
def _int4_panels(qs, ws, ms, xq, xs, ioff, xsum, out):
    rows, nbytes = qs.shape
    for p in prange(ws.shape[0]):
        r0 = p * LANES
        panel = np.empty(nbytes // 4 * LANES, np.uint32)
        tile = np.empty((NT, LANES), np.float32)
        pack_panel_int4(qs, r0, panel)
        prefetch_panel(qs, r0 + LANES)
        if ms.shape[0] > 0:
            _panel_int4_mins(panel, ws[p], ms[p], xq, xs, ioff, xsum, out, r0, tile)
        else:
            _panel_int4(panel, ws[p], ws[p], xq, xs, ioff, xsum, out, r0, tile)


@njit(**JIT)
def gemm_int8_tiled(x, q, scales, group, out):
    """out (T, rows) = x (T, n) @ int8 q (rows, n).T with x quantized per block of 32; scales
    (rows, n // group) per group of 32 or per row (group == n); n a multiple of 32."""
    T, n = x.shape
    xq, xs, ioff, xsum = quantize_tokens(x, 128, (T + 3) // 4 * 4)
    per_row = group == n and n != BLOCK
    _int8_panels(q, _all_scales(scales), per_row, xq, xs, ioff, xsum, out)


@njit(**JIT)
def gemm_int4_tiled(x, qs, scales, mins, out):
    """out (T, rows) = x (T, n) @ W.T for int4 groups of 32 (Int4Weight; symmetric when mins is
    empty) with x quantized per block of 32; n a multiple of 32."""
    T, n = x.shape
    has_mins = mins.shape[0] > 0
    xq, xs, ioff, xsum = quantize_tokens(x, 0 if has_mins else 8, (T + 3) // 4 * 4)
    ws = _all_scales(scales)
    ms = _all_scales(mins) if has_mins else np.empty((0, 0), np.float32)
    _int4_panels(qs, ws, ms, xq, xs, ioff, xsum, out)


# ------------------------------------------------------------------ references

def pack_panel_ref(u: np.ndarray, r0: int) -> np.ndarray:
    """NumPy twin of pack_panel_*: u (rows, nbytes) uint8 weight bytes as the panel holds them
    (int8 q + 128, or int4's packed bytes) -> (nbytes // 4 * 16,) uint32 for rows r0..r0+15."""
    rows, n = u.shape
    block = np.zeros((LANES, n), np.uint8)
    block[:min(LANES, rows - r0)] = u[r0:r0 + LANES]
    return np.ascontiguousarray(block.view(np.uint32).T).reshape(-1)
