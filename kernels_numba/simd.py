"""Integer dot products of packed weight rows with int8-quantized activations, in explicit SIMD.

Why this module exists: LLVM does not vectorise a per-group int4 or int8 dot product written as a
Numba loop well (measured on Zen 4: 1.3 GB/s of int4 weights per thread through an integer loop,
3.2 GB/s through a float one, against ~22 GB/s of memory bandwidth). llama.cpp gets there by
quantizing the activations to int8 in blocks of 32 and using the CPU's byte dot products
(VNNI ``vpdpbusd``, or AVX2 ``pmaddubsw``); Numba has no SIMD types, so the row loops below are
emitted as LLVM IR from ``@intrinsic``s and inlined into ordinary ``@njit`` kernels (linear.py).

Activations (one vector of n = 32 * nb floats) are quantized per block b of 32 as
``xq = round(x / xs[b])``, ``xs[b] = max|x_block| / 127``, with ``xsum[b] = xs[b] * sum(xq_block)``
(see ``quantize_act``). A row then gives

    int8 weights q (scale w[g] per group of G):  sum_b w[g(b)] * xs[b] * (q_b . xq_b)
    int4 nibbles u (scale w[g], min m[g] or -8 w[g]):  sum_b w[g(b)] * xs[b] * (u_b . xq_b) + c[g(b)] * xsum[b]

Three instruction sets, chosen once from the host CPU (``EDGERUN_SIMD=vnni|avx2|generic``
overrides it; the choice is compiled into the cached kernels, so change NUMBA_CACHE_DIR too):

- ``vnni``: ``vpdpbusd`` (unsigned x signed bytes, 4 per int32 lane). int8 weights are made
  unsigned by adding 128 (``q ^ 0x80``), and ``128 * sum(xq)`` is taken off through xsum.
- ``avx2``: ``pmaddubsw`` + ``pmaddwd``; int8 weights through the sign trick (|q|, x * sign q),
  which keeps every 16-bit pair sum in range.
- ``generic``: widen to int32 and multiply; LLVM lowers it for any target (NEON on aarch64).
"""
from __future__ import annotations

import os

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._common import FASTMATH, JIT

BLOCK = 32   # activation quantization block


def _host_isa() -> str:
    forced = os.environ.get("EDGERUN_SIMD", "").strip().lower()
    if forced:
        if forced not in ("vnni", "avx2", "generic"):
            raise ValueError(f"EDGERUN_SIMD={forced!r}: choose vnni, avx2 or generic")
        return forced
    try:
        feats = llvm.get_host_cpu_features()
    except RuntimeError:          # not an x86 host (LLVM reports features only there)
        return "generic"
    if feats.get("avx512vnni") and feats.get("avx512vl") or feats.get("avxvnni"):
        return "vnni"
    if feats.get("avx2"):
        return "avx2"
    return "generic"


ISA = _host_isa()

_i8, _i16, _i32, _i64, _f32, _f16 = (ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64),
                                     ir.FloatType(), ir.HalfType())
_v16i8, _v32i8 = ir.VectorType(_i8, 16), ir.VectorType(_i8, 32)
_v16i16, _v8i32, _v8f32 = ir.VectorType(_i16, 16), ir.VectorType(_i32, 8), ir.VectorType(_f32, 8)
_v32i32 = ir.VectorType(_i32, 32)


def _splat(vty, value):
    return ir.Constant(vty, [value] * vty.count)


def _intr(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _byte_dot(builder, u, s, signed_u):
    """<8 x i32> lane sums of u (32 bytes; unsigned nibbles, or signed int8 if signed_u) times s
    (32 signed bytes), 4 consecutive products per lane."""
    if ISA == "vnni" and not signed_u:
        return _intr(builder, "llvm.x86.avx512.vpdpbusd.256", _v8i32,
                     [ir.Constant(_v8i32, None), builder.bitcast(u, _v8i32), builder.bitcast(s, _v8i32)])
    if ISA == "avx2":
        if signed_u:     # sign trick: |q| . (x * sign q) == q . x, pairs stay within int16
            s = _intr(builder, "llvm.x86.avx2.psign.b", _v32i8, [s, u])
            u = _intr(builder, "llvm.abs.v32i8", _v32i8, [u, ir.Constant(ir.IntType(1), 0)])
        p16 = _intr(builder, "llvm.x86.avx2.pmadd.ub.sw", _v16i16, [u, s])
        return _intr(builder, "llvm.x86.avx2.pmadd.wd", _v8i32, [p16, _splat(_v16i16, 1)])
    ext = builder.sext if signed_u else builder.zext
    prod = builder.mul(ext(u, _v32i32), builder.sext(s, _v32i32))
    lanes = None
    for k in range(4):     # lane l sums products 4l..4l+3, as vpdpbusd does
        part = builder.shuffle_vector(prod, prod, ir.Constant(ir.VectorType(_i32, 8), [4 * l + k for l in range(8)]))
        lanes = part if lanes is None else builder.add(lanes, part)
    return lanes


def _load(builder, base, offset, ty):
    """Unaligned load of ty at byte address base + offset (i64 values)."""
    ptr = builder.inttoptr(builder.add(base, offset), ty.as_pointer())
    ld = builder.load(ptr)
    ld.align = 1
    return ld


def _scale(builder, base, idx, half):
    """Element idx of a float32 (or float16-bits) array at address base, as float."""
    if half:
        h = _load(builder, base, builder.mul(idx, ir.Constant(_i64, 2)), _f16)
        return builder.fpext(h, _f32)
    return _load(builder, base, builder.mul(idx, ir.Constant(_i64, 4)), _f32)


def _addr(context, builder, aty, aval):
    arr = context.make_array(aty)(context, builder, aval)
    return builder.ptrtoint(arr.data, _i64)


def _fma_acc(builder, acc, d, s):
    """acc + float(d) * s for <8 x i32> d and a float (or <8 x float>) s, contracted."""
    df = builder.sitofp(d, _v8f32)
    sv = s if isinstance(s.type, ir.VectorType) else _splat_f(builder, s)
    return _intr(builder, "llvm.fma.v8f32", _v8f32, [df, sv, acc])


def _tree_sum(builder, v):
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _contiguous(*tys):
    """The intrinsics read raw memory: every array argument must be C-contiguous (1-D)."""
    return all(isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" for t in tys)


def _is_half(ty):
    return isinstance(ty.dtype, types.Integer)


class _Accs:
    """Two independent vector accumulators and a vector of xsum corrections. One fma chain would
    make the fma latency the limit (~15 GB/s of int4 on Zen 4); alternating two doubles it."""

    def __init__(self, builder):
        self.b = builder
        self.vec = [cgutils.alloca_once_value(builder, ir.Constant(_v8f32, None)) for _ in range(2)]
        self.corr = cgutils.alloca_once_value(builder, ir.Constant(_v8f32, None))
        self.sca = cgutils.alloca_once_value(builder, ir.Constant(_f32, 0.0))

    def add(self, i, d, s):
        """vec[i] += float(d) * s, d: <8 x i32> lane sums, s: float or <8 x float>."""
        b = self.b
        b.store(_fma_acc(b, b.load(self.vec[i]), d, s), self.vec[i])

    def add_corr(self, c, xsum):
        """corr += c * xsum, both <8 x float> (8 blocks) or both float (one block)."""
        b = self.b
        if isinstance(c.type, ir.VectorType):
            b.store(_intr(b, "llvm.fma.v8f32", _v8f32, [c, xsum, b.load(self.corr)]), self.corr)
        else:
            b.store(b.fadd(b.load(self.sca), b.fmul(c, xsum)), self.sca)

    def total(self):
        b = self.b
        v = b.fadd(b.fadd(b.load(self.vec[0]), b.load(self.vec[1])), b.load(self.corr))
        return b.fadd(_tree_sum(b, v), b.load(self.sca))


def _loop(builder, start, stop, body):
    """body(index) for index in range(start, stop) (i64 values)."""
    with cgutils.for_range(builder, builder.sub(stop, start)) as loop:
        body(builder.add(start, loop.index))


def _splat_f(builder, s, n=8):
    """A float value in every lane of an <n x float>."""
    vty = ir.VectorType(_f32, n)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), s, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), [0] * n))


def _lane(builder, v, i):
    """<8 x float> with every lane = lane i of v."""
    return builder.shuffle_vector(v, v, ir.Constant(_v8i32, [i] * 8))


def _scales8(builder, base, b0, half):
    """Elements b0..b0+7 of a float32 (or float16-bits) array at address base, as <8 x float>."""
    if half:
        h = _load(builder, base, builder.mul(b0, ir.Constant(_i64, 2)), ir.VectorType(_f16, 8))
        return builder.fpext(h, _v8f32)
    return _load(builder, base, builder.mul(b0, ir.Constant(_i64, 4)), _v8f32)


class _Tok:
    """One token's quantized activations (addresses of xq, xs, xsum) and its accumulators."""

    def __init__(self, builder, xq, xs, xsum):
        self.xq, self.xs, self.xsum, self.acc = xq, xs, xsum, _Accs(builder)


def _row_dot(builder, nb, weights, toks, signed, wscale8, wscale1, coef8, coef1):
    """The loop shared by every row kind, over nb activation blocks, for one or more tokens.

    weights(b) -> the 32 weight bytes of block b (<32 x i8>, unsigned unless ``signed``), unpacked
    once for all toks; wscale8(b0) / wscale1(b): the weight scales of blocks b0..b0+7 (<8 x float>)
    / of block b; coef8 / coef1: the same for the xsum coefficient, or None (no correction).
    Blocks go 8 at a time so that scales are loaded and converted as vectors; the tail one by one."""
    eight = ir.Constant(_i64, 8)
    ntiles = builder.sdiv(nb, eight)

    def dot(u, tok, b):
        return _byte_dot(builder, u, _load(builder, tok.xq, builder.mul(b, ir.Constant(_i64, BLOCK)), _v32i8),
                         signed_u=signed)

    with cgutils.for_range(builder, ntiles) as t:
        b0 = builder.mul(t.index, eight)
        w8, c8 = wscale8(b0), coef8(b0) if coef8 else None
        svs = []
        for tok in toks:
            svs.append(builder.fmul(w8, _scales8(builder, tok.xs, b0, False)))
            if c8 is not None:
                tok.acc.add_corr(c8, _scales8(builder, tok.xsum, b0, False))
        for i in range(8):
            b = builder.add(b0, ir.Constant(_i64, i))
            u = weights(b)
            for tok, sv in zip(toks, svs):
                tok.acc.add(i % 2, dot(u, tok, b), _lane(builder, sv, i))

    def tail(b):
        u, w1, c1 = weights(b), wscale1(b), coef1(b) if coef1 else None
        for tok in toks:
            tok.acc.add(0, dot(u, tok, b), builder.fmul(w1, _scale(builder, tok.xs, b, False)))
            if c1 is not None:
                tok.acc.add_corr(c1, _scale(builder, tok.xsum, b, False))

    _loop(builder, builder.mul(ntiles, eight), nb, tail)


def _toks(context, builder, sig_, args, first, t0=None, count=1):
    """_Tok objects for activations args[first:first+3] = (xq, xs, xsum): 1-D arrays, or rows
    t0..t0+count-1 of 2-D ones."""
    addrs = [_addr(context, builder, t, a) for t, a in zip(sig_.args[first:first + 3], args[first:first + 3])]
    if t0 is None:
        return [_Tok(builder, *addrs)]
    toks = []
    for k in range(count):
        row = builder.add(t0, ir.Constant(_i64, k))
        moved = []
        for aty, aval, base in zip(sig_.args[first:first + 3], args[first:first + 3], addrs):
            arr = context.make_array(aty)(context, builder, aval)
            stride = builder.extract_value(arr.strides, 0)
            moved.append(builder.add(base, builder.mul(row, stride)))
        toks.append(_Tok(builder, *moved))
    return toks


def _int8_codegen(multi):
    """dot_int8_row (multi=False) or dot_int8_row4 (4 tokens of 2-D activations from t0)."""
    def codegen(context, builder, sig_, args):
        qa, wa = (_addr(context, builder, t, a) for t, a in zip(sig_.args[:2], args[:2]))
        half = _is_half(sig_.args[1])
        grp = context.cast(builder, args[-1], sig_.args[-1], types.int64)
        n = builder.extract_value(context.make_array(sig_.args[0])(context, builder, args[0]).shape, 0)
        nb = builder.sdiv(n, ir.Constant(_i64, BLOCK))
        t0 = context.cast(builder, args[5], sig_.args[5], types.int64) if multi else None
        toks = _toks(context, builder, sig_, args, 2, t0, 4 if multi else 1)
        unsigned_trick = ISA == "vnni"      # (q + 128) . x  -  128 * sum(x)

        def weights(b):
            qv = _load(builder, qa, builder.mul(b, ir.Constant(_i64, BLOCK)), _v32i8)
            return builder.xor(qv, _splat(_v32i8, -128)) if unsigned_trick else qv

        def run(ws8, ws1):
            m128 = ir.Constant(_f32, -128.0)
            _row_dot(builder, nb, weights, toks, not unsigned_trick, ws8, ws1,
                     (lambda b0: builder.fmul(ws8(b0), _splat_f(builder, m128))) if unsigned_trick else None,
                     (lambda b: builder.fmul(ws1(b), m128)) if unsigned_trick else None)

        with builder.if_else(builder.icmp_signed("==", grp, ir.Constant(_i64, BLOCK))) as (per_block, per_row):
            with per_block:
                run(lambda b0: _scales8(builder, wa, b0, half), lambda b: _scale(builder, wa, b, half))
            with per_row:
                w0 = _scale(builder, wa, ir.Constant(_i64, 0), half)
                w8 = _splat_f(builder, w0)
                run(lambda b0: w8, lambda b: w0)
        totals = [tok.acc.total() for tok in toks]
        return totals[0] if not multi else context.make_tuple(builder, sig_.return_type, totals)
    return codegen


@intrinsic
def dot_int8_row(typingctx, q, w, xq, xs, xsum, group):
    """sum over 32-blocks b of w[b // (group/32)] * xs[b] * (q_b . xq_b) for one int8 weight row
    q (n,), its scales w (n // group,) float32 or float16 bits; n and group multiples of 32,
    group == 32 or group == n (one scale per row)."""
    if not _contiguous(q, w, xq, xs, xsum):
        return None
    return types.float32(q, w, xq, xs, xsum, group), _int8_codegen(False)


@intrinsic
def dot_int8_row4(typingctx, q, w, xq, xs, xsum, t0, group):
    """dot_int8_row for the 4 tokens t0..t0+3 of 2-D activations xq (T, n), xs, xsum (T, n // 32):
    the weight row is loaded and converted once for all four (prefill)."""
    if not (_contiguous(q, w) and _rows_contiguous(xq, xs, xsum)):
        return None
    return types.UniTuple(types.float32, 4)(q, w, xq, xs, xsum, t0, group), _int8_codegen(True)


def _rows_contiguous(*tys):
    return all(isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" for t in tys)


def _int4_g32(builder, qa, wa, ca, cf, half, nb, toks):
    """Int4 rows with groups of 32: block b = group b, 16 bytes, low nibbles then high ones."""
    def weights(b):
        v = _load(builder, qa, builder.mul(b, ir.Constant(_i64, 16)), _v16i8)
        lo = builder.and_(v, _splat(_v16i8, 15))
        hi = builder.lshr(v, _splat(_v16i8, 4))
        return builder.shuffle_vector(lo, hi, ir.Constant(_v32i32, list(range(32))))

    _row_dot(builder, nb, weights, toks, False,
             lambda b0: _scales8(builder, wa, b0, half), lambda b: _scale(builder, wa, b, half),
             lambda b0: builder.fmul(_splat_f(builder, cf), _scales8(builder, ca, b0, half)),
             lambda b: builder.fmul(cf, _scale(builder, ca, b, half)))


def _wide() -> bool:
    """512-bit vpdpbusd available (AVX512-VNNI proper, not AVX-VNNI's 256 bits)."""
    if ISA != "vnni" or os.environ.get("EDGERUN_SIMD", "").strip().lower():
        return False
    try:
        f = llvm.get_host_cpu_features()
    except RuntimeError:
        return False
    return bool(f.get("avx512vnni")) and bool(f.get("avx512bw"))


WIDE = _wide()
QUAD = 4 if WIDE else 2     # blocks per step of dot_int4_row_quad (512- or 256-bit vectors)
_v16f32, _v16i32, _v64i8 = ir.VectorType(_f32, 16), ir.VectorType(_i32, 16), ir.VectorType(_i8, 64)


def _int4_g32_wide(builder, qa, wa, ca, cf, half, nb, tok):
    """_int4_g32 for one token with 512-bit vectors: two blocks (32 bytes of nibbles) per
    vpdpbusd, convert and fma, half the instructions of the 256-bit loop, which ran out of issue
    slots on 2 cores (int4 decode was compute-bound at ~17 GB/s a thread). Tail blocks: _int4_g32."""
    eight = ir.Constant(_i64, 8)
    ntiles = builder.sdiv(nb, eight)
    acc = [cgutils.alloca_once_value(builder, ir.Constant(_v16f32, None)) for _ in range(2)]
    corr = cgutils.alloca_once_value(builder, ir.Constant(_v8f32, None))
    order = ir.Constant(ir.VectorType(_i32, 64), list(range(16)) + list(range(32, 48)) + list(range(16, 32))
                        + list(range(48, 64)))
    with cgutils.for_range(builder, ntiles) as t:
        b0 = builder.mul(t.index, eight)
        sv = builder.fmul(_scales8(builder, wa, b0, half), _scales8(builder, tok.xs, b0, False))
        c8 = builder.fmul(_splat_f(builder, cf), _scales8(builder, ca, b0, half))
        builder.store(_intr(builder, "llvm.fma.v8f32", _v8f32,
                            [c8, _scales8(builder, tok.xsum, b0, False), builder.load(corr)]), corr)
        for p in range(4):
            b = builder.add(b0, ir.Constant(_i64, 2 * p))
            v = _load(builder, qa, builder.mul(b, ir.Constant(_i64, 16)), _v32i8)
            u = builder.shuffle_vector(builder.and_(v, _splat(_v32i8, 15)), builder.lshr(v, _splat(_v32i8, 4)), order)
            x = _load(builder, tok.xq, builder.mul(b, ir.Constant(_i64, BLOCK)), _v64i8)
            d = _intr(builder, "llvm.x86.avx512.vpdpbusd.512", _v16i32,
                      [ir.Constant(_v16i32, None), builder.bitcast(u, _v16i32), builder.bitcast(x, _v16i32)])
            s16 = builder.shuffle_vector(sv, sv, ir.Constant(_v16i32, [2 * p] * 8 + [2 * p + 1] * 8))
            a = acc[p % 2]
            builder.store(_intr(builder, "llvm.fma.v16f32", _v16f32, [builder.sitofp(d, _v16f32), s16, builder.load(a)]), a)
    done = builder.mul(ntiles, eight)
    rest = builder.sub(nb, done)

    def at(base, size):
        return builder.add(base, builder.mul(done, ir.Constant(_i64, size)))

    tail = _Tok(builder, at(tok.xq, BLOCK), at(tok.xs, 4), at(tok.xsum, 4))
    _int4_g32(builder, at(qa, 16), at(wa, 2 if half else 4), at(ca, 2 if half else 4), cf, half, rest, [tail])
    wide = builder.fadd(builder.load(acc[0]), builder.load(acc[1]))
    lo = builder.shuffle_vector(wide, wide, ir.Constant(_v8i32, list(range(8))))
    hi = builder.shuffle_vector(wide, wide, ir.Constant(_v8i32, list(range(8, 16))))
    v = builder.fadd(builder.fadd(lo, hi), builder.load(corr))
    return builder.fadd(_tree_sum(builder, v), tail.acc.total())


# How far ahead (bytes of nibbles) _int4_g32_quad asks for its row into L2. The hardware
# prefetcher alone left one thread at ~24 GB/s of int4 from memory against ~30 for a plain read:
# the unpacking keeps the core busy and fewer lines are in flight. 16 KB ahead (a few rows of a
# 2048-wide matrix; past the row's end is the next row, which the same thread reads next):
# ~29 GB/s (measured 1 thread, 256 MB of int4, 2048 and 8192 columns; in cache -2%); the 1B
# int4 model's CPU time a token at 1 thread 40 -> 33 ms. The same hints on int8 rows (less work a
# byte, the hardware prefetcher keeps up) made them slower: they have none.
PREFETCH = 16384


def _prefetch_l2(builder, base, offset, *ahead):
    """Hint the lines at base + offset + each of ahead into L2 (a read, no fault if unmapped)."""
    for a in ahead:
        ptr = builder.inttoptr(builder.add(base, builder.add(offset, ir.Constant(_i64, a))), ir.IntType(8).as_pointer())
        _intr(builder, "llvm.prefetch.p0", ir.VoidType(), [ptr, ir.Constant(_i32, 0), ir.Constant(_i32, 1), ir.Constant(_i32, 1)])


def _quad_fma(builder, lo, hi, xlo, xhi, sv, idx, acc):
    """One quad-order step: acc += float(lo . xlo + hi . xhi, 4 bytes a lane) * sv[idx]; lo / hi
    the unpacked low / high nibbles of QUAD blocks, xlo / xhi their activations (<64 x i8> with
    512-bit VNNI, else <32 x i8>), idx each lane's block. Shared by _int4_g32_quad and
    dot_int4_tiles4."""
    dty, fty = (_v16i32, _v16f32) if WIDE else (_v8i32, _v8f32)
    if WIDE:
        d = _intr(builder, "llvm.x86.avx512.vpdpbusd.512", dty,
                  [ir.Constant(dty, None), builder.bitcast(lo, dty), builder.bitcast(xlo, dty)])
        d = _intr(builder, "llvm.x86.avx512.vpdpbusd.512", dty, [d, builder.bitcast(hi, dty), builder.bitcast(xhi, dty)])
    else:
        d = builder.add(_byte_dot(builder, lo, xlo, False), _byte_dot(builder, hi, xhi, False))
    s = builder.shuffle_vector(sv, sv, ir.Constant(ir.VectorType(_i32, len(idx)), idx))
    builder.store(_intr(builder, f"llvm.fma.v{fty.count}f32", fty, [builder.sitofp(d, fty), s, builder.load(acc)]), acc)


def _quad_total(builder, acc, corr, tail):
    """A quad-order row's float total: its two accumulators, the xsum corrections and the tail
    blocks' total (tail: the _Tok _int4_g32 ran on)."""
    v = builder.fadd(builder.load(acc[0]), builder.load(acc[1]))
    if WIDE:
        v = builder.fadd(builder.shuffle_vector(v, v, ir.Constant(_v8i32, list(range(8)))),
                         builder.shuffle_vector(v, v, ir.Constant(_v8i32, list(range(8, 16)))))
    return builder.fadd(_tree_sum(builder, builder.fadd(v, builder.load(corr))), tail.acc.total())


def _int4_g32_quad(builder, qa, wa, ca, cf, half, nb, toks):
    """Int4 rows with groups of 32 against activations in quad order (quad_order), for one or
    more tokens (each row step unpacked once for all of them) -> one float total per token.
    Per 4 blocks, the 64 nibble bytes' low nibbles are elements 0-15 of blocks 0..3 and the high
    nibbles elements 16-31, which is how the activations are laid out, so the unpacked nibbles meet
    their activations without a shuffle, and one convert + fma serves 4 blocks (4 int32 lanes
    each): 1.4x the throughput of _int4_g32_wide (measured 26 -> 36 GB/s of int4 a thread, in
    cache). Blocks past the last whole 8 (in natural order there): _int4_g32."""
    eight = ir.Constant(_i64, 8)
    ntiles = builder.sdiv(nb, eight)
    vty, fty = (_v64i8, _v16f32) if WIDE else (_v32i8, _v8f32)
    per = 4 if WIDE else 2                      # blocks per step
    nbytes = 16 * per
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(fty, None)) for _ in range(2)] for _ in toks]
    corrs = [cgutils.alloca_once_value(builder, ir.Constant(_v8f32, None)) for _ in toks]
    with cgutils.for_range(builder, ntiles) as t:
        b0 = builder.mul(t.index, eight)
        # the nibbles only: hinting the scales as well (a line every 4 steps, the other 3 hints
        # redundant) measured ~2% slower at 2 threads, in both memory regimes (one 450 MB region)
        _prefetch_l2(builder, qa, builder.mul(b0, ir.Constant(_i64, 16)), PREFETCH, PREFETCH + 64)
        w8 = _scales8(builder, wa, b0, half)
        c8 = builder.fmul(_splat_f(builder, cf), _scales8(builder, ca, b0, half))
        svs = []
        for tok, corr in zip(toks, corrs):
            svs.append(builder.fmul(w8, _scales8(builder, tok.xs, b0, False)))
            builder.store(_intr(builder, "llvm.fma.v8f32", _v8f32,
                                [c8, _scales8(builder, tok.xsum, b0, False), builder.load(corr)]), corr)
        for p in range(8 // per):
            b = builder.add(b0, ir.Constant(_i64, per * p))
            v = _load(builder, qa, builder.mul(b, ir.Constant(_i64, 16)), vty)
            lo = builder.and_(v, _splat(vty, 15))
            hi = builder.and_(builder.lshr(v, _splat(vty, 4)), _splat(vty, 15))
            idx = sum(([per * p + k] * 4 for k in range(per)), [])
            for tok, sv, acc in zip(toks, svs, accs):
                xo = builder.add(tok.xq, builder.mul(b, ir.Constant(_i64, BLOCK)))
                _quad_fma(builder, lo, hi, _load(builder, xo, ir.Constant(_i64, 0), vty),
                          _load(builder, xo, ir.Constant(_i64, nbytes), vty), sv, idx, acc[p % 2])
    done = builder.mul(ntiles, eight)

    def at(base, size):
        return builder.add(base, builder.mul(done, ir.Constant(_i64, size)))

    tails = [_Tok(builder, at(tok.xq, BLOCK), at(tok.xs, 4), at(tok.xsum, 4)) for tok in toks]
    _int4_g32(builder, at(qa, 16), at(wa, 2 if half else 4), at(ca, 2 if half else 4), cf, half,
              builder.sub(nb, done), tails)
    return [_quad_total(builder, acc, corr, tail) for acc, corr, tail in zip(accs, corrs, tails)]


@njit(**JIT)
def quad_order(xq, out):
    """Quantized activations (n,) in natural order -> the order dot_int4_row_quad reads: every
    whole 8 blocks of 32 (256 inputs) as steps of QUAD blocks, each step elements 0-15 of its
    blocks, then elements 16-31 of them; the inputs past the last whole 8 blocks as they are."""
    n8 = xq.shape[0] // 256 * 256
    for s in range(0, n8, QUAD * BLOCK):
        for b in range(QUAD):
            for h in range(2):
                src = xq[s + BLOCK * b + 16 * h:s + BLOCK * b + 16 * h + 16]
                dst = out[s + QUAD * 16 * h + 16 * b:s + QUAD * 16 * h + 16 * b + 16]
                for j in range(16):
                    dst[j] = src[j]
    for j in range(n8, xq.shape[0]):
        out[j] = xq[j]


def quad_order_ref(xq: np.ndarray) -> np.ndarray:
    """NumPy twin of quad_order."""
    n8 = xq.shape[0] // 256 * 256
    out = xq.copy()
    out[:n8] = xq[:n8].reshape(-1, QUAD, 2, 16).transpose(0, 2, 1, 3).reshape(-1)
    return out


@intrinsic
def dot_int4_row_quad(typingctx, qs, w, m, has_mins, xq, xs, xsum):
    """dot_int4_row for groups of 32 with xq in quad order (quad_order; xs and xsum as they are)."""
    if not _contiguous(qs, w, m, xq, xs, xsum):
        return None
    _check_int4_types(w, m)
    sig = types.float32(qs, w, m, has_mins, xq, xs, xsum)
    half = _is_half(w)

    def codegen(context, builder, sig_, args):
        qa, wa, ca, cf = _int4_args(context, builder, sig_, args)
        n = builder.extract_value(context.make_array(sig_.args[4])(context, builder, args[4]).shape, 0)
        tok = _Tok(builder, *(_addr(context, builder, t, a) for t, a in zip(sig_.args[4:7], args[4:7])))
        return _int4_g32_quad(builder, qa, wa, ca, cf, half, builder.sdiv(n, ir.Constant(_i64, BLOCK)), [tok])[0]

    return sig, codegen


@intrinsic
def dot_int4_row4_quad(typingctx, qs, w, m, has_mins, xq, xs, xsum, t0):
    """dot_int4_row_quad for the 4 tokens t0..t0+3 of 2-D activations (rows of xq in quad order):
    each row step is loaded and unpacked once for the four (prefill)."""
    if not (_contiguous(qs, w, m) and _rows_contiguous(xq, xs, xsum)):
        return None
    _check_int4_types(w, m)
    sig = types.UniTuple(types.float32, 4)(qs, w, m, has_mins, xq, xs, xsum, t0)
    half = _is_half(w)

    def codegen(context, builder, sig_, args):
        qa, wa, ca, cf = _int4_args(context, builder, sig_, args)
        n = builder.extract_value(context.make_array(sig_.args[4])(context, builder, args[4]).shape, 1)
        toks = _toks(context, builder, sig_, args, 4, context.cast(builder, args[7], sig_.args[7], types.int64), 4)
        totals = _int4_g32_quad(builder, qa, wa, ca, cf, half, builder.sdiv(n, ir.Constant(_i64, BLOCK)), toks)
        return context.make_tuple(builder, sig_.return_type, totals)

    return sig, codegen


# ---- int4 g32 rows repacked in tiles of 4 rows, for decode (the fused layer's row_block)
#
# A row kernel reads its row's nibbles and, for every 128 of them, 256 bytes of activations from
# L1: with 512-bit loads that is 6 loads a 128-byte step, and the load ports, not the byte dot
# products, were the limit (~40 GB/s of int4 a thread in cache). Rows taken 4 at a time share the
# activation loads, but 4 rows of the file's layout are 4 streams a thread, which the hardware
# prefetcher followed badly (a 4-row kernel on them: 0.68 of the streaming read against 0.78 for
# one row). Repacked so that the 4 rows' steps lie side by side, the 4 rows are one stream again:
# measured on one 450 MB region, 2 threads, against the streaming read around each run: 0.97-1.05
# (slow / fast memory regime) against 0.90 / 0.82-0.86 for the row kernel on the same bytes.
#
# Layout of one group of 4 rows (one row of the repacked (rows / 4, nbytes) uint8 array), for nb
# blocks of 32 a row: nb // 8 tiles, each the 4 rows' 8 float16 scales (64 bytes), their 8 mins
# (64 bytes, only with mins), then their 128 nibble bytes (512: row 0's, row 1's, ...); then the
# nb % 8 tail blocks row by row, each row's scales, mins (with mins) and nibbles. Nibble bytes
# are the file's (packed.Int4Weight), so the activations stay in quad order.

def int4_tile_bytes(nb: int, has_mins: bool) -> int:
    """Bytes of one group of 4 rows in the repacked layout."""
    per_block = 16 + (4 if has_mins else 2)
    return 4 * nb * per_block


@njit(parallel=True, **JIT)
def repack_int4_tiles(qs, scales, mins, has_mins, out):
    """Int4 g32 rows (qs (rows, nb * 16) uint8, scales and mins (rows, nb) float16 bits) -> out
    (rows // 4, int4_tile_bytes) in the tile layout above."""
    nb = scales.shape[1]
    nt, rem = nb // 8, nb % 8
    sb = 64 * (2 if has_mins else 1)
    tile = sb + 512
    sc, mn = scales.view(np.uint8), mins.view(np.uint8)      # float16 bits as 2 bytes each
    for g in prange(out.shape[0]):
        dst = out[g]
        for t in range(nt):
            o = t * tile
            for k in range(4):
                r = 4 * g + k
                dst[o + 16 * k:o + 16 * k + 16] = sc[r, 16 * t:16 * t + 16]
                if has_mins:
                    dst[o + 64 + 16 * k:o + 80 + 16 * k] = mn[r, 16 * t:16 * t + 16]
                dst[o + sb + 128 * k:o + sb + 128 * k + 128] = qs[r, 128 * t:128 * t + 128]
        o = nt * tile
        for k in range(4):
            r = 4 * g + k
            dst[o:o + 2 * rem] = sc[r, 16 * nt:]
            o += 2 * rem
            if has_mins:
                dst[o:o + 2 * rem] = mn[r, 16 * nt:]
                o += 2 * rem
            dst[o:o + 16 * rem] = qs[r, 128 * nt:]
            o += 16 * rem


def repack_int4_tiles_ref(qs: np.ndarray, scales: np.ndarray, mins: np.ndarray | None) -> np.ndarray:
    """NumPy twin of repack_int4_tiles (mins None: without mins)."""
    rows, nb = scales.shape
    nt, rem = nb // 8, nb % 8
    g = rows // 4

    def part(a, width):            # (rows, nb * width) bytes -> tiles (g, nt, 4 * 8 * width), tail (g, 4, rem * width)
        a = a.reshape(rows, nb, width)
        tiles = a[:, :8 * nt].reshape(g, 4, nt, 8 * width).transpose(0, 2, 1, 3).reshape(g, nt, 32 * width)
        return tiles, a[:, 8 * nt:].reshape(g, 4, rem * width)

    pieces = [part(scales.view(np.uint8), 2)]
    if mins is not None:
        pieces.append(part(mins.view(np.uint8), 2))
    pieces.append(part(qs, 16))
    tiles = np.concatenate([t for t, _ in pieces], axis=2).reshape(g, -1)
    tail = np.concatenate([t for _, t in pieces], axis=2).reshape(g, -1)
    return np.ascontiguousarray(np.concatenate([tiles, tail], axis=1))


@intrinsic
def dot_int4_tiles4(typingctx, tiles, g, has_mins, nb, xq, xs, xsum):
    """Rows 4 g .. 4 g + 3 of int4 g32 rows in the tile layout (repack_int4_tiles) against
    activations with xq in quad order: a 4-tuple of dot_int4_row_quad's totals (bit-identical:
    the same products, sums and order). 512-bit VNNI only (WIDE)."""
    # tiles: C-contiguous, or a column slice of such an array ("A": fused.tiled's gate / up
    # views); every row's bytes must be contiguous
    if not (WIDE and isinstance(tiles, types.Array) and tiles.ndim == 2 and tiles.layout in "CA"
            and _contiguous(xq, xs, xsum)):
        return None
    sig = types.UniTuple(types.float32, 4)(tiles, g, has_mins, nb, xq, xs, xsum)

    def codegen(context, builder, sig_, args):
        arr = context.make_array(sig_.args[0])(context, builder, args[0])
        grp = context.cast(builder, args[1], sig_.args[1], types.int64)
        base = builder.add(builder.ptrtoint(arr.data, _i64), builder.mul(grp, builder.extract_value(arr.strides, 0)))
        hm = context.cast(builder, args[2], sig_.args[2], types.boolean)
        nbv = context.cast(builder, args[3], sig_.args[3], types.int64)
        i64 = lambda v: ir.Constant(_i64, v)      # noqa: E731
        tok = _Tok(builder, *(_addr(context, builder, t, a) for t, a in zip(sig_.args[4:7], args[4:7])))
        sb = builder.select(hm, i64(128), i64(64))                  # scale (+ min) bytes of a tile
        moff = builder.select(hm, i64(64), i64(0))                  # mins: the scales again without
        cf = builder.select(hm, ir.Constant(_f32, 1.0), ir.Constant(_f32, -8.0))
        tile = builder.add(sb, i64(512))
        ntiles = builder.sdiv(nbv, i64(8))
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(_v16f32, None)) for _ in range(2)] for _ in range(4)]
        corrs = [cgutils.alloca_once_value(builder, ir.Constant(_v8f32, None)) for _ in range(4)]
        with cgutils.for_range(builder, ntiles) as t:
            off = builder.add(base, builder.mul(t.index, tile))
            # one stream: a line hinted a tile (measured best of 0, 1 and every line of the tile)
            _prefetch_l2(builder, off, i64(0), PREFETCH)
            b0 = builder.mul(t.index, i64(8))
            xs8, xsum8 = _scales8(builder, tok.xs, b0, False), _scales8(builder, tok.xsum, b0, False)
            svs = []
            for k in range(4):
                w8 = _scales8(builder, off, i64(8 * k), True)
                c8 = builder.fmul(_splat_f(builder, cf), _scales8(builder, builder.add(off, moff), i64(8 * k), True))
                svs.append(builder.fmul(w8, xs8))
                builder.store(_intr(builder, "llvm.fma.v8f32", _v8f32, [c8, xsum8, builder.load(corrs[k])]), corrs[k])
            for p in range(2):
                xo = builder.add(tok.xq, builder.mul(builder.add(b0, i64(4 * p)), i64(BLOCK)))
                xlo, xhi = _load(builder, xo, i64(0), _v64i8), _load(builder, xo, i64(64), _v64i8)
                idx = sum(([4 * p + j] * 4 for j in range(4)), [])
                for k in range(4):
                    v = _load(builder, builder.add(off, sb), i64(128 * k + 64 * p), _v64i8)
                    hi = builder.and_(builder.lshr(v, _splat(_v64i8, 4)), _splat(_v64i8, 15))
                    _quad_fma(builder, builder.and_(v, _splat(_v64i8, 15)), hi, xlo, xhi, svs[k], idx, accs[k][p])
        # the tail blocks, row by row, through the natural-order kernel (as dot_int4_row_quad's tail)
        done = builder.mul(ntiles, i64(8))
        rem = builder.sub(nbv, done)
        toff = builder.add(base, builder.mul(ntiles, tile))
        sbytes = builder.mul(rem, builder.select(hm, i64(4), i64(2)))
        totals = []
        for k in range(4):
            rbase = builder.add(toff, builder.mul(i64(k), builder.add(sbytes, builder.mul(rem, i64(16)))))
            mins = builder.select(hm, builder.add(rbase, builder.mul(rem, i64(2))), rbase)
            tail = _Tok(builder, builder.add(tok.xq, builder.mul(done, i64(BLOCK))),
                        builder.add(tok.xs, builder.mul(done, i64(4))), builder.add(tok.xsum, builder.mul(done, i64(4))))
            _int4_g32(builder, builder.add(rbase, sbytes), rbase, mins, cf, True, rem, [tail])
            totals.append(_quad_total(builder, accs[k], corrs[k], tail))
        return context.make_tuple(builder, sig_.return_type, totals)

    return sig, codegen


def _int4_args(context, builder, sig_, args):
    qa, wa, ma = (_addr(context, builder, t, a) for t, a in zip(sig_.args[:3], args[:3]))
    hm = context.cast(builder, args[3], sig_.args[3], types.boolean)
    # the xsum coefficient: m[g] with mins, else -8 w[g]; chosen once, not per group
    return qa, wa, builder.select(hm, ma, wa), builder.select(hm, ir.Constant(_f32, 1.0), ir.Constant(_f32, -8.0))


def _check_int4_types(w, m):
    if _is_half(m) != _is_half(w):
        raise TypeError("dot_int4_row: mins and scales must have the same dtype")


@intrinsic
def dot_int4_row(typingctx, qs, w, m, has_mins, xq, xs, xsum, group):
    """One Int4Weight row (see edgerun/packed.py: in group g, byte j holds element j in its low
    nibble and element j + group/2 in its high one) against quantized activations:
    sum_b w[g] * xs[b] * (u_b . xq_b) + c[g] * xsum[b], c = m[g] if has_mins else -8 w[g].
    group is 32, 64 or 128."""
    if not _contiguous(qs, w, m, xq, xs, xsum):
        return None
    _check_int4_types(w, m)
    sig = types.float32(qs, w, m, has_mins, xq, xs, xsum, group)
    half = _is_half(w)

    def codegen(context, builder, sig_, args):
        qa, wa, ca, cf = _int4_args(context, builder, sig_, args)
        grp = context.cast(builder, args[7], sig_.args[7], types.int64)
        n = builder.extract_value(context.make_array(sig_.args[4])(context, builder, args[4]).shape, 0)
        nb = builder.sdiv(n, ir.Constant(_i64, BLOCK))
        toks = _toks(context, builder, sig_, args, 4)
        acc = toks[0].acc
        xqa, xsa, xsuma = toks[0].xq, toks[0].xs, toks[0].xsum
        with builder.if_else(builder.icmp_signed("==", grp, ir.Constant(_i64, 32))) as (g32, gbig):
            with g32:
                if WIDE:
                    acc.add_corr(ir.Constant(_f32, 1.0), _int4_g32_wide(builder, qa, wa, ca, cf, half, nb, toks[0]))
                else:
                    _int4_g32(builder, qa, wa, ca, cf, half, nb, toks)
            with gbig:      # 64 or 128: 32-byte chunks whose low nibbles are one block, high ones another
                chunks = builder.sdiv(grp, ir.Constant(_i64, 64))
                bpg = builder.sdiv(grp, ir.Constant(_i64, BLOCK))
                with cgutils.for_range(builder, builder.sdiv(n, grp)) as g:
                    wg = _scale(builder, wa, g.index, half)
                    cg = builder.fmul(cf, _scale(builder, ca, g.index, half))
                    gbytes = builder.mul(g.index, builder.sdiv(grp, ir.Constant(_i64, 2)))
                    with cgutils.for_range(builder, chunks) as c:
                        v = _load(builder, qa, builder.add(gbytes, builder.mul(c.index, ir.Constant(_i64, 32))), _v32i8)
                        b_lo = builder.add(builder.mul(g.index, bpg), c.index)
                        for k, (u, b) in enumerate(((builder.and_(v, _splat(_v32i8, 15)), b_lo),
                                                    (builder.lshr(v, _splat(_v32i8, 4)), builder.add(b_lo, chunks)))):
                            d = _byte_dot(builder, u, _load(builder, xqa, builder.mul(b, ir.Constant(_i64, BLOCK)), _v32i8),
                                          signed_u=False)
                            acc.add(k, d, builder.fmul(wg, _scale(builder, xsa, b, False)))
                            acc.add_corr(cg, _scale(builder, xsuma, b, False))
        return acc.total()

    return sig, codegen


def _float_row(builder, n, load8, load1, xa):
    """sum_j w[j] * x[j] over n elements; load8(j) / load1(j): <8 x float> / float weights at j."""
    acc = [cgutils.alloca_once_value(builder, ir.Constant(_v8f32, None)) for _ in range(2)]
    tail = cgutils.alloca_once_value(builder, ir.Constant(_f32, 0.0))
    sixteen = ir.Constant(_i64, 16)
    nfull = builder.mul(builder.sdiv(n, sixteen), sixteen)
    with cgutils.for_range(builder, builder.sdiv(n, sixteen)) as t:
        for k in range(2):
            j = builder.add(builder.mul(t.index, sixteen), ir.Constant(_i64, 8 * k))
            xv = _load(builder, xa, builder.mul(j, ir.Constant(_i64, 4)), _v8f32)
            builder.store(_intr(builder, "llvm.fma.v8f32", _v8f32, [load8(j), xv, builder.load(acc[k])]), acc[k])

    def one(j):
        xv = _load(builder, xa, builder.mul(j, ir.Constant(_i64, 4)), _f32)
        builder.store(builder.fadd(builder.load(tail), builder.fmul(load1(j), xv)), tail)

    _loop(builder, nfull, n, one)
    return builder.fadd(_tree_sum(builder, builder.fadd(builder.load(acc[0]), builder.load(acc[1]))),
                        builder.load(tail))


def _bf16_to_f32(builder, bits, vty):
    """uint16 bfloat16 bits (i16 or <8 x i16>) -> float32: the high half of a float's bits."""
    wide = ir.IntType(32) if vty is _f32 else _v8i32
    return builder.bitcast(builder.shl(builder.zext(bits, wide), _splat(wide, 16) if vty is not _f32
                                       else ir.Constant(_i32, 16)), vty)


@intrinsic
def dot_half_row(typingctx, w, x, bf16):
    """sum_j float(w[j]) * x[j] for a row of float16 (bf16=False) or bfloat16 (bf16=True) bits w
    (uint16, n) and float32 x (n); bf16 must be a compile-time constant (a literal)."""
    if not isinstance(bf16, types.BooleanLiteral) or not _contiguous(w, x):
        return None
    is_bf16 = bf16.literal_value
    sig = types.float32(w, x, bf16)

    def codegen(context, builder, sig_, args):
        wa, xa = _addr(context, builder, sig_.args[0], args[0]), _addr(context, builder, sig_.args[1], args[1])
        n = builder.extract_value(context.make_array(sig_.args[0])(context, builder, args[0]).shape, 0)
        two = ir.Constant(_i64, 2)
        v8i16 = ir.VectorType(_i16, 8)
        if is_bf16:
            load8 = lambda j: _bf16_to_f32(builder, _load(builder, wa, builder.mul(j, two), v8i16), _v8f32)  # noqa: E731
            load1 = lambda j: _bf16_to_f32(builder, _load(builder, wa, builder.mul(j, two), _i16), _f32)     # noqa: E731
        else:
            load8 = lambda j: builder.fpext(_load(builder, wa, builder.mul(j, two), ir.VectorType(_f16, 8)), _v8f32)  # noqa: E731
            load1 = lambda j: builder.fpext(_load(builder, wa, builder.mul(j, two), _f16), _f32)                   # noqa: E731
        return _float_row(builder, n, load8, load1, xa)

    return sig, codegen


# ------------------------------------------------------------------ activations

@njit(fastmath=FASTMATH, **JIT)
def quantize_act(x, xq, xs, xsum):
    """x (n,) float32 -> xq (n,) int8, xs, xsum (n // 32,) float32, per block of 32:
    xs = max|x| / 127, xq = round(x / xs), xsum = xs * sum(xq)."""
    for b in range(x.shape[0] // BLOCK):
        xb = x[b * BLOCK:(b + 1) * BLOCK]
        qb = xq[b * BLOCK:(b + 1) * BLOCK]
        amax = np.float32(0.0)
        for j in range(BLOCK):
            amax = max(amax, abs(xb[j]))
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        s = np.int32(0)
        for j in range(BLOCK):
            v = np.int32(np.rint(xb[j] * inv))
            qb[j] = v
            s += v
        xs[b] = d
        xsum[b] = d * np.float32(s)


def quantize_act_ref(x: np.ndarray):
    """NumPy twin of quantize_act."""
    xb = x.astype(np.float32).reshape(-1, BLOCK)
    amax = np.abs(xb).max(axis=1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xb * inv[:, None]).astype(np.int8)
    return q.reshape(-1), d, (d * q.astype(np.int32).sum(axis=1)).astype(np.float32)
