"""Low-bit and sparse weights: ternary (2-bit and base-3), binary, 2:4 sparse and CSR.

Signatures follow kernels_numba/linear.py: ``gemm_<kind>(x, <weight fields>, out)`` with
x float32 (T, in), out float32 (T, out); ``embed_<kind>(ids, <fields>, out)``.

Ternary and binary weights multiply int8 activations, as BitNet's BitLinear does: each token's
row is quantized by absmax (scale 127 / max|x|, round half to even, clip to -128..127,
``quantize_rows_int8``) and the products accumulate in int32; the float scales are applied
once per row (per group for binary). Codes are stored as t + 1 (0, 1, 2), so
sum(t * x) = sum(code * x) - sum(x): the inner loops are unsigned-by-signed byte products
that LLVM turns into vpdpbusd (AVX512-VNNI) / vpmaddubsw-class code.
Sparse kinds take float32 activations (weight-only quantization), except 2:4 with int8 values,
whose activations are quantized to int8 per token as for the ternary kinds. 2:4 rows are put
back in place by AVX512-VBMI2's vpexpandb straight from their position masks.

T == 1 (decode) walks the packed rows directly with prange over rows. T > 1 (prefill): ternary
and binary run the same row dots for every token over a block of rows that stays in cache; the
sparse kinds unpack a block of rows once into a small float buffer reused for every token.
Inner loops index block-sized slices with the loop counter (never ``base + j``, see linear.py).
"""
import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._common import FASTMATH, JIT, half_to_float

ROW_BLOCK = 16
TB = 128          # ternary 2-bit: inputs per block (32 bytes)
TB3 = 160         # ternary base-3: inputs per block (32 bytes)
KB = 32           # bytes per ternary block


def as_value(v):
    """A stored sparse value -> float32: uint16 is float16 bits, int8 is itself."""


@overload(as_value, jit_options=JIT)
def _as_value(v):
    if v == types.uint16:
        return lambda v: half_to_float(v)
    return lambda v: np.float32(v)


def is_int8(a):
    """True for an int8 array (a compile-time constant: nopython cannot compare dtypes)."""


@overload(is_int8, jit_options=JIT)
def _is_int8(a):
    flag = a.dtype == types.int8
    return lambda a: flag


# ------------------------------------------------------------------ activations

@intrinsic
def _rint(typingctx, v):
    """np.rint of a float32 as llvm.rint (round half to even), which the loop vectoriser widens;
    Numba's np.rint stays a scalar call."""
    if v != types.float32:
        return None

    def codegen(context, builder, sig_, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32]), "llvm.rint.f32")
        return builder.call(fn, [args[0]])

    return types.float32(v), codegen


@njit(**JIT)
def _absmax(x):
    """max |x| of a float32 vector, as the largest of its bit patterns with the sign cleared
    (non-negative floats order as their bits): an integer max that vectorises, where a float max
    (even fastmath) stays scalar here."""
    xi = np.ascontiguousarray(x).view(np.int32)
    m = np.int32(0)
    for j in range(xi.shape[0]):
        m = max(m, xi[j] & np.int32(0x7FFFFFFF))
    return np.array([m], np.int32).view(np.float32)[0]


@njit(**JIT)
def quantize_rows_int8(x, xq, xs, xsum):
    """BitLinear's per-token absmax quantization. x (T, n) float32 -> xq (T, npad) int8 (zeros
    past n), xs (T,) float32 = max|x| / 127 (the dequantization factor), xsum (T,) int32 = sum of xq.
    Not fastmath: 127 / m must be a true division to round exactly as transformers does. With
    _absmax and _rint both loops vectorise: 3x faster a token (8192 wide)."""
    T, n = x.shape
    for t in range(T):
        xr = x[t]
        scale = np.float32(127.0) / max(_absmax(xr), np.float32(1e-5))
        qr = xq[t]
        s = np.int32(0)
        for j in range(n):
            v = min(max(np.int32(_rint(xr[j] * scale)), np.int32(-128)), np.int32(127))
            qr[j] = np.int8(v)
            s += v
        for j in range(n, qr.shape[0]):
            qr[j] = 0
        xs[t] = np.float32(1.0) / scale
        xsum[t] = s


@njit(inline="always")
def _quantized(x, npad):
    T = x.shape[0]
    xq = np.empty((T, npad), np.int8)
    xs = np.empty(T, np.float32)
    xsum = np.empty(T, np.int32)
    quantize_rows_int8(x, xq, xs, xsum)
    return xq, xs, xsum


# ------------------------------------------------------------------ ternary, 2 bits

@njit(inline="always")
def _to_planes(xrow, planes):
    """Activations in the order the codes are read: planes[i, b*32 + j] = xrow[b*P*32 + i*32 + j],
    P = planes.shape[0] codes a byte. The dot is then one long loop over a row's bytes (vector
    accumulators, one reduction at the end) instead of a reduction per 32-byte block. Copied 8
    bytes at a time (2.7x faster than byte by byte at 8192 inputs)."""
    # inlined: names distinct from the callers' (an inlined assignment would overwrite theirs)
    np_ = planes.shape[0]
    nb_ = planes.shape[1] // KB
    x8_ = xrow[:nb_ * np_ * KB].view(np.int64).reshape((nb_, np_, KB // 8))
    for i_ in range(np_):
        pl_ = planes[i_].view(np.int64).reshape((nb_, KB // 8))
        for b_ in range(nb_):
            for j_ in range(KB // 8):
                pl_[b_, j_] = x8_[b_, i_, j_]


# ------------------------------------------------------------------ explicit SIMD row dots
# LLVM vectorises a Numba loop over the codes (acc += (c & 3) * x0[k] + ...) with 16-bit lanes
# (vpmaddwd): ~2.5 weights an instruction, slower than int4 (measured 0.70 ms vs 0.19 ms here). The codes are unsigned bytes (0, 1, 2 after a shift and a
# mask) and the activations signed bytes: exactly VNNI's vpdpbusd (4 products per int32 lane,
# 32 per instruction on ymm) or AVX2's pmaddubsw + pmaddwd. LLVM does not form them from a loop,
# so the row loop is emitted as IR here (as kernels_numba/simd.py does for int4/int8).

from .simd import ISA, PREFETCH, _prefetch_l2  # noqa: E402  one instruction-set choice for every kernel module (EDGERUN_SIMD)
_FEATURES = {}
try:
    _FEATURES = llvm.get_host_cpu_features()
except RuntimeError:
    pass
# 64-byte steps with zmm vpdpbusd (AVX512-VNNI proper, not AVX-VNNI's 256-bit only)
WIDE = ISA == "vnni" and bool(_FEATURES.get("avx512vnni")) and bool(_FEATURES.get("avx512bw"))
_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_v64i8, _v16i32, _v64i1 = ir.VectorType(_i8, 64), ir.VectorType(_i32, 16), ir.VectorType(ir.IntType(1), 64)
_v32i8, _v32i16, _v16i16, _v8i32, _v32i32 = (ir.VectorType(_i8, 32), ir.VectorType(_i16, 32),
                                             ir.VectorType(_i16, 16), ir.VectorType(_i32, 8),
                                             ir.VectorType(_i32, 32))


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _udot_acc(builder, acc, u, s):
    """acc (<8 x i32>) + lane sums of 4 consecutive products u * s (32 unsigned, 32 signed bytes)."""
    if ISA == "vnni":
        return _call(builder, "llvm.x86.avx512.vpdpbusd.256", _v8i32,
                     [acc, builder.bitcast(u, _v8i32), builder.bitcast(s, _v8i32)])
    if ISA == "avx2":         # u <= 2: the 16-bit pair sums of pmaddubsw cannot saturate
        p16 = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _v16i16, [u, s])
        return builder.add(acc, _call(builder, "llvm.x86.avx2.pmadd.wd", _v8i32,
                                      [p16, ir.Constant(_v16i16, [1] * 16)]))
    prod = builder.mul(builder.zext(u, _v32i32), builder.sext(s, _v32i32))
    for k in range(4):
        acc = builder.add(acc, builder.shuffle_vector(prod, prod, ir.Constant(_v8i32, [4 * l + k for l in range(8)])))
    return acc


def _data(context, builder, aty, aval):
    a = context.make_array(aty)(context, builder, aval)
    return builder.ptrtoint(a.data, _i64), builder.extract_value(a.shape, 0)


def _load32(builder, base, off):
    ld = builder.load(builder.inttoptr(builder.add(base, off), _v32i8.as_pointer()))
    ld.align = 1
    return ld


def _load64(builder, base, off):
    ld = builder.load(builder.inttoptr(builder.add(base, off), _v64i8.as_pointer()))
    ld.align = 1
    return ld


def _planes_sum8(builder, accs, shifts):
    """<16 x i32> plane accumulators -> <8 x i32>: each shifted right by its plane's factor
    (exact: every product in it is a multiple of 2**shift), summed, the two halves added."""
    w = None
    for a, sh in zip(accs, shifts):
        v = builder.load(a)
        if sh:
            v = builder.ashr(v, ir.Constant(_v16i32, [sh] * 16))
        w = v if w is None else builder.add(w, v)
    lo = builder.shuffle_vector(w, w, ir.Constant(_v8i32, list(range(8))))
    hi = builder.shuffle_vector(w, w, ir.Constant(_v8i32, list(range(8, 16))))
    return builder.add(lo, hi)


def _hsum(builder, v):
    r = builder.extract_element(v, ir.Constant(_i32, 0))
    for i in range(1, 8):
        r = builder.add(r, builder.extract_element(v, ir.Constant(_i32, i)))
    return r


def _digits_t2(builder, c):
    """<W x i8> codes -> the 4 code planes (0..2) as <W x i8>."""
    w = c.type.count
    three = ir.Constant(ir.VectorType(_i8, w), [3] * w)
    return [builder.and_(builder.lshr(c, ir.Constant(ir.VectorType(_i8, w), [2 * i] * w)), three) if i < 3
            else builder.lshr(c, ir.Constant(ir.VectorType(_i8, w), [6] * w)) for i in range(4)]


def _digits_t3(builder, q):
    """<32 x i8> base-3 bytes -> the 5 trit planes (0..2): ((q * 3**i) & 255) * 3 >> 8."""
    out = []
    # q in the high byte of 16-bit lanes: mullo by 3**i leaves ((q * 3**i) & 255) << 8 (the mask
    # for free), and mulhi_u by 3 then gives ((q * 3**i) & 255) * 3 >> 8: two multiplies a digit
    qh = builder.shl(builder.zext(q, _v32i16), ir.Constant(_v32i16, [8] * 32))
    for m in (1, 3, 9, 27, 81):
        t = builder.mul(qh, ir.Constant(_v32i16, [m] * 32)) if m > 1 else qh
        d = builder.lshr(builder.mul(builder.zext(t, _v32i32), ir.Constant(_v32i32, [3] * 32)),
                         ir.Constant(_v32i32, [16] * 32))          # LLVM selects vpmulhuw
        out.append(builder.trunc(d, _v32i8))
    return out


def _masked_t2(builder, c):
    """<W x i8> codes -> the 4 code planes left in place, c & (3 << 2i) = 4**i * plane i: one
    and a plane and no shift (vpdpbusd takes them as they are, the sums are 4**i too large)."""
    w = c.type.count
    return [builder.and_(c, ir.Constant(ir.VectorType(_i8, w), [3 << 2 * i] * w)) for i in range(4)]


def _planes_dot(digits, nplanes, wide=False, masked=None):
    """An intrinsic (codes row, plane 0, ..., plane P-1) -> int32 sum(code * x): the row's bytes
    in steps of 32 (or 64 with ``wide``: zmm vpdpbusd, half the instructions; a 32-byte tail);
    digits(builder, <W x i8>) gives the P code planes of W bytes. masked (wide steps only): planes
    as (function like digits, each plane's power-of-two factor as a shift), the factor taken off
    each plane's int32 sum at the end (exact: every product is a multiple of it)."""
    def impl(typingctx, codes, *planes):
        if len(planes) != nplanes or codes.layout != "C" or any(p.layout != "C" for p in planes):
            return None
        sig = types.int32(codes, *planes)

        def codegen(context, builder, sig_, args):
            cbase, nbytes = _data(context, builder, sig_.args[0], args[0])
            pbase = [_data(context, builder, sig_.args[i + 1], args[i + 1])[0] for i in range(nplanes)]
            # one accumulator per plane: a single vpdpbusd chain would wait on its 5-cycle latency
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_v8i32, None)) for _ in range(nplanes)]

            def step32(off):
                for i, d in enumerate(digits(builder, _load32(builder, cbase, off))):
                    builder.store(_udot_acc(builder, builder.load(accs[i]), d, _load32(builder, pbase[i], off)),
                                  accs[i])

            if not wide:
                with cgutils.for_range(builder, builder.udiv(nbytes, ir.Constant(_i64, 32))) as loop:
                    step32(builder.mul(loop.index, ir.Constant(_i64, 32)))
                total = None
            else:
                wacc = [cgutils.alloca_once_value(builder, ir.Constant(_v16i32, None)) for _ in range(nplanes)]
                with cgutils.for_range(builder, builder.udiv(nbytes, ir.Constant(_i64, 64))) as loop:
                    off = builder.mul(loop.index, ir.Constant(_i64, 64))
                    # hints ahead into L2, as int4 rows do (ternary 1B, 1 thread: 19-21 -> 17-18 ms a token)
                    _prefetch_l2(builder, cbase, off, PREFETCH)
                    planes = (masked[0] if masked else digits)(builder, _load64(builder, cbase, off))
                    for i, d in enumerate(planes):
                        xv = _load64(builder, pbase[i], off)
                        builder.store(_call(builder, "llvm.x86.avx512.vpdpbusd.512", _v16i32,
                                            [builder.load(wacc[i]), builder.bitcast(d, _v16i32),
                                             builder.bitcast(xv, _v16i32)]), wacc[i])
                tail = builder.icmp_unsigned("!=", builder.urem(nbytes, ir.Constant(_i64, 64)), ir.Constant(_i64, 0))
                with builder.if_then(tail):
                    step32(builder.sub(nbytes, ir.Constant(_i64, 32)))
                total = _planes_sum8(builder, wacc, masked[1] if masked else [0] * nplanes)
            for a in accs:
                total = builder.load(a) if total is None else builder.add(total, builder.load(a))
            return _hsum(builder, total)
        return sig, codegen
    return impl


def _t2_dot(typingctx, codes, x0, x1, x2, x3):
    return _planes_dot(_digits_t2, 4, WIDE, (_masked_t2, (0, 2, 4, 6)))(typingctx, codes, x0, x1, x2, x3)


def _t3_dot(typingctx, codes, x0, x1, x2, x3, x4):
    return _planes_dot(_digits_t3, 5)(typingctx, codes, x0, x1, x2, x3, x4)


dot_t2_simd = intrinsic(_t2_dot)


@intrinsic
def dot_t2_rows4(typingctx, codes, r0, x0, x1, x2, x3):
    """dot_t2_simd for the 4 rows r0..r0+3 of 2-D codes (512-bit VNNI only): each step's 4
    activation planes are loaded once for the 4 rows (a row alone loads 4 planes a 64-byte step
    of codes, so loads, not vpdpbusd, were its limit), the planes masked in place (_masked_t2).
    Rows whose byte count is not a multiple of 64 end with a 32-byte step per row."""
    planes = (x0, x1, x2, x3)
    if not (WIDE and isinstance(codes, types.Array) and codes.ndim == 2 and codes.layout == "C"
            and all(p.layout == "C" for p in planes)):
        return None
    sig = types.UniTuple(types.int32, 4)(codes, r0, x0, x1, x2, x3)

    def codegen(context, builder, sig_, args):
        arr = context.make_array(sig_.args[0])(context, builder, args[0])
        stride = builder.extract_value(arr.strides, 0)
        nbytes = builder.extract_value(arr.shape, 1)
        r = context.cast(builder, args[1], sig_.args[1], types.int64)
        rbase = [builder.add(builder.ptrtoint(arr.data, _i64), builder.mul(builder.add(r, ir.Constant(_i64, k)), stride))
                 for k in range(4)]
        pbase = [_data(context, builder, sig_.args[i + 2], args[i + 2])[0] for i in range(4)]
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(_v16i32, None)) for _ in range(4)] for _ in range(4)]
        with cgutils.for_range(builder, builder.udiv(nbytes, ir.Constant(_i64, 64))) as loop:
            off = builder.mul(loop.index, ir.Constant(_i64, 64))
            for base in rbase:
                _prefetch_l2(builder, base, off, PREFETCH)
            xs = [builder.bitcast(_load64(builder, pb, off), _v16i32) for pb in pbase]
            for base, acc in zip(rbase, accs):
                for i, d in enumerate(_masked_t2(builder, _load64(builder, base, off))):
                    builder.store(_call(builder, "llvm.x86.avx512.vpdpbusd.512", _v16i32,
                                        [builder.load(acc[i]), builder.bitcast(d, _v16i32), xs[i]]), acc[i])
        tails = [cgutils.alloca_once_value(builder, ir.Constant(_v8i32, None)) for _ in range(4)]
        with builder.if_then(builder.icmp_unsigned("!=", builder.urem(nbytes, ir.Constant(_i64, 64)),
                                                   ir.Constant(_i64, 0))):
            off = builder.sub(nbytes, ir.Constant(_i64, 32))
            for base, tail in zip(rbase, tails):
                t = builder.load(tail)
                for i, d in enumerate(_digits_t2(builder, _load32(builder, base, off))):
                    t = _udot_acc(builder, t, d, _load32(builder, pbase[i], off))
                builder.store(t, tail)
        totals = [_hsum(builder, builder.add(_planes_sum8(builder, acc, (0, 2, 4, 6)), builder.load(tail)))
                  for acc, tail in zip(accs, tails)]
        return context.make_tuple(builder, sig_.return_type, totals)

    return sig, codegen
dot_t3_simd = intrinsic(_t3_dot)


@njit(inline="always")
def _unpack_t2_row(crow, dst):
    """codes -> int8 trits (padded length)."""
    for b in range(crow.shape[0] // KB):
        cb = crow[b * KB:(b + 1) * KB]
        d0 = dst[b * TB:b * TB + 32]
        d1 = dst[b * TB + 32:b * TB + 64]
        d2 = dst[b * TB + 64:b * TB + 96]
        d3 = dst[b * TB + 96:(b + 1) * TB]
        for j in range(KB):
            c = np.int32(cb[j])
            d0[j] = np.int8((c & 3) - 1)
            d1[j] = np.int8(((c >> 2) & 3) - 1)
            d2[j] = np.int8(((c >> 4) & 3) - 1)
            d3[j] = np.int8((c >> 6) - 1)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_ternary(x, codes, scales, n, out):
    """TernaryWeight (codes (out, nb*32) uint8, scales (1,)|(out,) float32) with int8 activations."""
    T = x.shape[0]
    rows, nbytes = codes.shape
    nb = nbytes // KB
    xq, xs, xsum = _quantized(x, nb * TB)
    per_row = scales.shape[0] > 1
    if T == 1:
        xp = np.empty((4, nbytes), np.int8)
        _to_planes(xq[0], xp)
        x0, x1, x2, x3 = xp[0], xp[1], xp[2], xp[3]
        f, bias = xs[0], xsum[0]
        for r in prange(rows):
            s = scales[r] if per_row else scales[0]
            out[0, r] = np.float32(dot_t2_simd(codes[r], x0, x1, x2, x3) - bias) * f * s
        return
    # prefill: every token's activations in planes once; a block of rows is reused for all tokens
    # while one token's planes stay in L1 across the block
    xp = np.empty((T, 4, nbytes), np.int8)
    for t in range(T):
        _to_planes(xq[t], xp[t])
    for blk in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        r0 = blk * ROW_BLOCK
        for t in range(T):
            p = xp[t]
            f = xs[t]
            for r in range(r0, min(r0 + ROW_BLOCK, rows)):
                s = scales[r] if per_row else scales[0]
                out[t, r] = np.float32(dot_t2_simd(codes[r], p[0], p[1], p[2], p[3]) - xsum[t]) * f * s


@njit(parallel=True, **JIT)
def embed_ternary(ids, codes, scales, n, out):
    per_row = scales.shape[0] > 1
    for i in prange(ids.shape[0]):
        r = ids[i]
        t = np.empty(codes.shape[1] * 4, np.int8)
        _unpack_t2_row(codes[r], t)
        s = scales[r] if per_row else scales[0]
        for j in range(out.shape[1]):
            out[i, j] = np.float32(t[j]) * s


# ------------------------------------------------------------------ ternary, base 3 (1.6 bits)

@njit(inline="always")
def _unpack_t3_row(crow, dst):
    for b in range(crow.shape[0] // KB):
        cb = crow[b * KB:(b + 1) * KB]
        d0 = dst[b * TB3:b * TB3 + 32]
        d1 = dst[b * TB3 + 32:b * TB3 + 64]
        d2 = dst[b * TB3 + 64:b * TB3 + 96]
        d3 = dst[b * TB3 + 96:b * TB3 + 128]
        d4 = dst[b * TB3 + 128:(b + 1) * TB3]
        for j in range(KB):
            q = np.int32(cb[j])
            d0[j] = np.int8(((q * 3) >> 8) - 1)
            d1[j] = np.int8(((((q * 3) & 255) * 3) >> 8) - 1)
            d2[j] = np.int8(((((q * 9) & 255) * 3) >> 8) - 1)
            d3[j] = np.int8(((((q * 27) & 255) * 3) >> 8) - 1)
            d4[j] = np.int8(((((q * 81) & 255) * 3) >> 8) - 1)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_ternary_b3(x, codes, scales, n, out):
    """TernaryB3Weight with int8 activations."""
    T = x.shape[0]
    rows, nbytes = codes.shape
    nb = nbytes // KB
    xq, xs, xsum = _quantized(x, nb * TB3)
    per_row = scales.shape[0] > 1
    if T == 1:
        xp = np.empty((5, nbytes), np.int8)
        _to_planes(xq[0], xp)
        f, bias = xs[0], xsum[0]
        for r in prange(rows):
            s = scales[r] if per_row else scales[0]
            out[0, r] = np.float32(dot_t3_simd(codes[r], xp[0], xp[1], xp[2], xp[3], xp[4]) - bias) * f * s
        return
    xp = np.empty((T, 5, nbytes), np.int8)           # as gemm_ternary's prefill
    for t in range(T):
        _to_planes(xq[t], xp[t])
    for blk in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        r0 = blk * ROW_BLOCK
        for t in range(T):
            p = xp[t]
            f = xs[t]
            for r in range(r0, min(r0 + ROW_BLOCK, rows)):
                s = scales[r] if per_row else scales[0]
                out[t, r] = np.float32(dot_t3_simd(codes[r], p[0], p[1], p[2], p[3], p[4]) - xsum[t]) * f * s


@njit(parallel=True, **JIT)
def embed_ternary_b3(ids, codes, scales, n, out):
    per_row = scales.shape[0] > 1
    for i in prange(ids.shape[0]):
        r = ids[i]
        t = np.empty(codes.shape[1] // KB * TB3, np.int8)
        _unpack_t3_row(codes[r], t)
        s = scales[r] if per_row else scales[0]
        for j in range(out.shape[1]):
            out[i, j] = np.float32(t[j]) * s


# ------------------------------------------------------------------ binary

@njit(inline="always")
def _dot_bits(bg, xg, gb):
    """sum over the set bits of one group: bit i of byte j <-> xg[i * gb + j]; int32."""
    acc = np.int32(0)
    x0 = xg[0:gb]
    x1 = xg[gb:2 * gb]
    x2 = xg[2 * gb:3 * gb]
    x3 = xg[3 * gb:4 * gb]
    x4 = xg[4 * gb:5 * gb]
    x5 = xg[5 * gb:6 * gb]
    x6 = xg[6 * gb:7 * gb]
    x7 = xg[7 * gb:8 * gb]
    for j in range(gb):
        c = bg[j]
        acc = np.int32(acc + (c & 1) * x0[j] + ((c >> 1) & 1) * x1[j] + ((c >> 2) & 1) * x2[j]
                       + ((c >> 3) & 1) * x3[j] + ((c >> 4) & 1) * x4[j] + ((c >> 5) & 1) * x5[j]
                       + ((c >> 6) & 1) * x6[j] + (c >> 7) * x7[j])
    return acc


@njit(inline="always")
def _unpack_bits_row(brow, group, dst):
    """bits -> int8 signs (+1 / -1), padded length."""
    gb = group // 8
    for g in range(brow.shape[0] // gb):
        bg = brow[g * gb:(g + 1) * gb]
        dg = dst[g * group:(g + 1) * group]
        for i in range(8):
            di = dg[i * gb:(i + 1) * gb]
            for j in range(gb):
                di[j] = np.int8(((np.int32(bg[j]) >> i) & 1) * 2 - 1)


@njit(inline="always")
def _to_planes_binary128(xrow, planes):
    """Activations in the order a 32-byte chunk of bits (groups 2k, 2k+1 of 128) is read:
    planes[i, 32k + 16h + j] = xrow[(2k + h) * 128 + 16i + j]."""
    for k in range(planes.shape[1] // 32):
        for h in range(2):
            xg = xrow[(2 * k + h) * 128:(2 * k + h + 1) * 128]
            for i in range(8):
                pl = planes[i, 32 * k + 16 * h:32 * k + 16 * h + 16]
                xi = xg[16 * i:16 * i + 16]
                for j in range(16):
                    pl[j] = xi[j]


@intrinsic
def dot_binary128(typingctx, bits, scales, planes):
    """sum_g scale_g * sum(x where bit) over the first 2 * planes.shape[1] / 32 groups of 128 of a
    binary row: per 32-byte chunk, 8 bit planes ((b >> i) & 1) times the activation planes by byte
    dot products; int32 lanes 0-3 hold group 2k, lanes 4-7 group 2k+1, so one fma with the
    two scales (float16, spread over 4 lanes each) finishes the chunk."""
    if not (isinstance(bits, types.Array) and bits.layout == "C" and isinstance(planes, types.Array)
            and planes.layout == "C" and planes.ndim == 2 and isinstance(scales, types.Array)):
        return None
    sig = types.float32(bits, scales, planes)
    f32, v8f32, v2f16 = ir.FloatType(), ir.VectorType(ir.FloatType(), 8), ir.VectorType(ir.HalfType(), 2)

    def codegen(context, builder, sig_, args):
        bbase = _data(context, builder, sig_.args[0], args[0])[0]
        sarr = context.make_array(sig_.args[1])(context, builder, args[1])
        sbase = builder.ptrtoint(sarr.data, _i64)
        parr = context.make_array(sig_.args[2])(context, builder, args[2])
        pbase = builder.ptrtoint(parr.data, _i64)
        stride = builder.extract_value(parr.shape, 1)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v8f32, None)) for _ in range(2)]
        one = ir.Constant(_v32i8, [1] * 32)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f32, [v8f32] * 3), "llvm.fma.v8f32")

        def chunk(k, acc):
            off = builder.mul(k, ir.Constant(_i64, 32))
            b = _load32(builder, bbase, off)
            parts = [ir.Constant(_v8i32, None), ir.Constant(_v8i32, None)]
            for i in range(8):
                u = builder.and_(builder.lshr(b, ir.Constant(_v32i8, [i] * 32)), one) if i else builder.and_(b, one)
                xi = _load32(builder, builder.add(pbase, builder.mul(stride, ir.Constant(_i64, i))), off)
                parts[i % 2] = _udot_acc(builder, parts[i % 2], u, xi)
            d = builder.sitofp(builder.add(parts[0], parts[1]), v8f32)
            sp = builder.inttoptr(builder.add(sbase, builder.mul(k, ir.Constant(_i64, 4))), v2f16.as_pointer())
            sh = builder.load(sp)
            sh.align = 2
            s2 = builder.fpext(sh, ir.VectorType(f32, 2))
            s8 = builder.shuffle_vector(s2, s2, ir.Constant(_v8i32, [0, 0, 0, 0, 1, 1, 1, 1]))
            builder.store(builder.call(fma, [d, s8, builder.load(acc)]), acc)

        nch = builder.udiv(stride, ir.Constant(_i64, 32))
        two = ir.Constant(_i64, 2)
        with cgutils.for_range(builder, builder.udiv(nch, two)) as loop:
            chunk(builder.mul(loop.index, two), accs[0])
            chunk(builder.add(builder.mul(loop.index, two), ir.Constant(_i64, 1)), accs[1])
        with builder.if_then(builder.icmp_unsigned("!=", builder.urem(nch, two), ir.Constant(_i64, 0))):
            chunk(builder.sub(nch, ir.Constant(_i64, 1)), accs[0])
        v = builder.fadd(builder.load(accs[0]), builder.load(accs[1]))
        r = builder.extract_element(v, ir.Constant(_i32, 0))
        for i in range(1, 8):
            r = builder.fadd(r, builder.extract_element(v, ir.Constant(_i32, i)))
        return r
    return sig, codegen


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_binary(x, bits, scales, group, n, out):
    """BinaryWeight (bits (out, ng*group/8) uint8, scales (out, ng) f16 bits) with int8 activations:
    per group, sum(sign * x) = 2 * sum(x where bit) - sum(x)."""
    T = x.shape[0]
    rows = bits.shape[0]
    ng = scales.shape[1]
    xq, xs, xsum = _quantized(x, ng * group)
    gsum = np.empty((T, ng), np.int32)              # per-group sums of the quantized activations
    for t in range(T):
        for g in range(ng):
            gsum[t, g] = _isum(xq[t, g * group:(g + 1) * group], group)
    nch = ng // 2 if group == 128 else 0              # SIMD path: two groups of 128 a 32-byte chunk
    planes = np.empty((T, 8, nch * 32), np.int8)
    if nch:
        for t in range(T):
            _to_planes_binary128(xq[t], planes[t])
    if T == 1:
        for r in prange(rows):
            out[0, r] = _binary_row(bits[r], scales[r], xq[0], planes[0], gsum[0], nch, group) * xs[0]
        return
    # prefill: the decode row dots per token over a block of rows that stays in cache
    for blk in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        r0 = blk * ROW_BLOCK
        for t in range(T):
            for r in range(r0, min(r0 + ROW_BLOCK, rows)):
                out[t, r] = _binary_row(bits[r], scales[r], xq[t], planes[t], gsum[t], nch, group) * xs[t]


@njit(inline="always")
def _binary_row(brow, srow, xrow, planes, gsum, nch, group):
    """sum_g scale_g * sum(sign * x) of one row: SIMD over the first 2 * nch groups, loop over the rest."""
    gb = group // 8
    acc = np.float32(0.0)
    if nch:
        acc = 2 * dot_binary128(brow, srow, planes)
        for g in range(2 * nch):
            acc -= half_to_float(srow[g]) * np.float32(gsum[g])
    for g in range(2 * nch, srow.shape[0]):
        s = _dot_bits(brow[g * gb:(g + 1) * gb], xrow[g * group:(g + 1) * group], gb)
        acc += half_to_float(srow[g]) * np.float32(2 * s - gsum[g])
    return acc


@njit(inline="always")
def _isum(a, n):
    s = np.int32(0)
    for j in range(n):
        s = np.int32(s + a[j])
    return s


@njit(parallel=True, **JIT)
def embed_binary(ids, bits, scales, group, n, out):
    for i in prange(ids.shape[0]):
        r = ids[i]
        t = np.empty(scales.shape[1] * group, np.int8)
        _unpack_bits_row(bits[r], group, t)
        for j in range(out.shape[1]):
            out[i, j] = np.float32(t[j]) * half_to_float(scales[r, j // group])


# ------------------------------------------------------------------ 2:4 sparse

# a group's 4-bit mask -> the positions of its two kept values
_P0 = np.array([(m & -m).bit_length() - 1 if m else 0 for m in range(16)], np.int64)
_P1 = np.array([m.bit_length() - 1 if m else 0 for m in range(16)], np.int64)


def _host_features():
    try:
        return llvm.get_host_cpu_features()
    except RuntimeError:
        return {}


# vpexpandb puts a row's kept int8 values back at their inputs straight from the meta bits
EXPAND = ISA == "vnni" and bool(_host_features().get("avx512vbmi2")) and bool(_host_features().get("avx512vnni"))
_v64i32_idx = ir.VectorType(_i32, 64)


@intrinsic
def dot_24_expand(typingctx, vals, meta, xq, nchunks):
    """sum(w * xq) + 128 * sum(xq) over the first 64 * nchunks inputs of a 2:4 row with int8
    values: per 64 inputs, the 8 meta bytes are the mask of vpexpandb (masked.expandload), which
    scatters the next 32 values into a zeroed 64-byte vector; XOR 0x80 makes every weight unsigned
    (w + 128, dropped weights 128) for vpdpbusd against the signed activations. Two accumulators
    alternate (vpdpbusd's latency would otherwise bound the loop)."""
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in (vals, meta, xq)):
        return None
    sig = types.int32(vals, meta, xq, nchunks)

    def codegen(context, builder, sig_, args):
        vbase = _data(context, builder, sig_.args[0], args[0])[0]
        mbase = _data(context, builder, sig_.args[1], args[1])[0]
        xbase = _data(context, builder, sig_.args[2], args[2])[0]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_v16i32, None)) for _ in range(2)]
        flip = ir.Constant(_v64i8, [-128] * 64)
        def chunk(k, acc):
            mp = builder.inttoptr(builder.add(mbase, builder.mul(k, ir.Constant(_i64, 8))), _i64.as_pointer())
            m = builder.load(mp)
            m.align = 1
            # register-form expand of a plain 32-byte load (the memory form is microcoded on Zen 4)
            v32 = _load32(builder, vbase, builder.mul(k, ir.Constant(_i64, 32)))
            v64 = builder.shuffle_vector(v32, ir.Constant(_v32i8, None), ir.Constant(_v64i32_idx, list(range(64))))
            w = _call(builder, "llvm.x86.avx512.mask.expand.v64i8", _v64i8,
                      [v64, ir.Constant(_v64i8, None), builder.bitcast(m, _v64i1)])
            wu = builder.bitcast(builder.xor(w, flip), _v16i32)
            xp = builder.inttoptr(builder.add(xbase, builder.mul(k, ir.Constant(_i64, 64))), _v64i8.as_pointer())
            xv = builder.load(xp)
            xv.align = 1
            builder.store(_call(builder, "llvm.x86.avx512.vpdpbusd.512", _v16i32,
                                [builder.load(acc), wu, builder.bitcast(xv, _v16i32)]), acc)

        two = ir.Constant(_i64, 2)
        with cgutils.for_range(builder, builder.udiv(args[3], two)) as loop:
            chunk(builder.mul(loop.index, two), accs[0])
            chunk(builder.add(builder.mul(loop.index, two), ir.Constant(_i64, 1)), accs[1])
        odd = builder.icmp_unsigned("!=", builder.urem(args[3], two), ir.Constant(_i64, 0))
        with builder.if_then(odd):
            chunk(builder.sub(args[3], ir.Constant(_i64, 1)), accs[0])
        v = builder.add(builder.load(accs[0]), builder.load(accs[1]))
        r = builder.extract_element(v, ir.Constant(_i32, 0))
        for i in range(1, 16):
            r = builder.add(r, builder.extract_element(v, ir.Constant(_i32, i)))
        return r
    return sig, codegen


@intrinsic
def dot_24_expand_f16(typingctx, vals, meta, x, nchunks):
    """sum(w * x) over the first 32 * nchunks inputs of a 2:4 row with float16 values, in float32:
    per 32 inputs, 4 meta bytes are the mask of vpexpandw, which puts the next 16 values at their
    inputs; vcvtph2ps and an fma with the activations finish it (no activation quantization)."""
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in (vals, meta, x)):
        return None
    sig = types.float32(vals, meta, x, nchunks)
    v16f32, v32i16 = ir.VectorType(ir.FloatType(), 16), ir.VectorType(_i16, 32)
    v16h = ir.VectorType(ir.HalfType(), 16)

    def codegen(context, builder, sig_, args):
        vbase = _data(context, builder, sig_.args[0], args[0])[0]
        mbase = _data(context, builder, sig_.args[1], args[1])[0]
        xbase = _data(context, builder, sig_.args[2], args[2])[0]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v16f32, None)) for _ in range(4)]
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f32, [v16f32] * 3), "llvm.fma.v16f32")

        def chunk(k, accs):
            mp = builder.inttoptr(builder.add(mbase, builder.mul(k, ir.Constant(_i64, 4))), _i32.as_pointer())
            m = builder.load(mp)
            m.align = 1
            # expand bytes, not words (vpexpandw is slow on Zen 4): each mask bit doubled by pdep
            v32 = _load32(builder, vbase, builder.mul(k, ir.Constant(_i64, 32)))
            v64 = builder.shuffle_vector(v32, ir.Constant(_v32i8, None), ir.Constant(_v64i32_idx, list(range(64))))
            m2 = _call(builder, "llvm.x86.bmi.pdep.64", _i64, [builder.zext(m, _i64), ir.Constant(_i64, 0x5555555555555555)])
            m2 = builder.or_(m2, builder.shl(m2, ir.Constant(_i64, 1)))
            w = builder.bitcast(_call(builder, "llvm.x86.avx512.mask.expand.v64i8", _v64i8,
                                      [v64, ir.Constant(_v64i8, None), builder.bitcast(m2, _v64i1)]), v32i16)
            for h in range(2):
                wh = builder.shuffle_vector(w, w, ir.Constant(ir.VectorType(_i32, 16), list(range(16 * h, 16 * h + 16))))
                wf = builder.fpext(builder.bitcast(wh, v16h), v16f32)
                xp = builder.inttoptr(builder.add(xbase, builder.add(builder.mul(k, ir.Constant(_i64, 128)),
                                                                    ir.Constant(_i64, 64 * h))), v16f32.as_pointer())
                xv = builder.load(xp)
                xv.align = 4
                builder.store(builder.call(fma, [wf, xv, builder.load(accs[h])]), accs[h])

        two = ir.Constant(_i64, 2)        # four independent fma chains: two chunks a step
        with cgutils.for_range(builder, builder.udiv(args[3], two)) as loop:
            chunk(builder.mul(loop.index, two), accs[:2])
            chunk(builder.add(builder.mul(loop.index, two), ir.Constant(_i64, 1)), accs[2:])
        with builder.if_then(builder.icmp_unsigned("!=", builder.urem(args[3], two), ir.Constant(_i64, 0))):
            chunk(builder.sub(args[3], ir.Constant(_i64, 1)), accs[:2])
        v = builder.fadd(builder.fadd(builder.load(accs[0]), builder.load(accs[1])),
                         builder.fadd(builder.load(accs[2]), builder.load(accs[3])))
        r = builder.extract_element(v, ir.Constant(_i32, 0))
        for i in range(1, 16):
            r = builder.fadd(r, builder.extract_element(v, ir.Constant(_i32, i)))
        return r
    return sig, codegen


@njit(inline="always")
def _unpack_24_row(vrow, mrow, s, dst):
    """kept values -> dense float32 row (zeros elsewhere)."""
    dst[:] = 0.0
    for g in range(vrow.shape[0] // 2):
        nib = (np.int64(mrow[g >> 1]) >> ((g & 1) * 4)) & 15
        dst[4 * g + _P0[nib]] = s * as_value(vrow[2 * g])
        dst[4 * g + _P1[nib]] = s * as_value(vrow[2 * g + 1])


@njit(inline="always")
def _dot_24_int(vr, mr, xq, g0, ng):
    """sum(v * xq) over groups g0..ng-1 of a 2:4 row with int8 values, scalar, int32."""
    acc = np.int32(0)
    for g in range(g0, ng):
        nib = (np.int64(mr[g >> 1]) >> ((g & 1) * 4)) & 15
        acc = np.int32(acc + np.int32(vr[2 * g]) * np.int32(xq[4 * g + _P0[nib]])
                       + np.int32(vr[2 * g + 1]) * np.int32(xq[4 * g + _P1[nib]]))
    return acc


@njit(inline="always")
def _row_24_int(vr, mr, xq, nch, ng, head):
    """sum(v * xq) of a 2:4 int8 row: vpexpandb over 64 * nch inputs, the rest group by group."""
    acc = np.int32(0)
    if nch:
        acc = np.int32(dot_24_expand(vr, mr, xq, nch) - head)
    return np.int32(acc + _dot_24_int(vr, mr, xq, nch * 16, ng))


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_sparse24(x, vals, meta, scales, out):
    """Sparse24Weight: vals (out, n/2) int8 | f16 bits, meta (out, ceil(n/8)) uint8 (two 4-bit group
    masks a byte, low nibble first), scales (out,) float32 or empty (f16 values).
    int8 values multiply int8 activations (per-token absmax, like the ternary kinds; the int8/int4
    kernels quantize activations too): vpexpandb + vpdpbusd where the CPU has them. float16 values
    multiply float activations."""
    T, n = x.shape
    rows = vals.shape[0]
    has_scales = scales.shape[0] > 0
    ng = n // 4
    if is_int8(vals):
        xq, xs, xsum = _quantized(x, n)
        nch = n // 64 if EXPAND else 0
        head = np.empty(T, np.int32)                 # 128 * sum(xq) over the vectorised inputs
        for t in range(T):
            hs = np.int32(0)
            for j in range(nch * 64):
                hs = np.int32(hs + xq[t, j])
            head[t] = np.int32(hs * 128)
        if T == 1:
            for r in prange(rows):
                out[0, r] = np.float32(_row_24_int(vals[r], meta[r], xq[0], nch, ng, head[0])) * xs[0] * scales[r]
            return
        for blk in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):       # rows reused from cache per token
            r0 = blk * ROW_BLOCK
            for t in range(T):
                for r in range(r0, min(r0 + ROW_BLOCK, rows)):
                    out[t, r] = np.float32(_row_24_int(vals[r], meta[r], xq[t], nch, ng, head[t])) * xs[t] * scales[r]
        return
    if T == 1:
        x0 = x[0]
        nch = n // 32 if EXPAND and not has_scales else 0        # float16 values: vpexpandw + fma
        for r in prange(rows):
            vr = vals[r]
            mr = meta[r]
            acc = np.float32(0.0)
            if nch:
                acc = dot_24_expand_f16(vr, mr, x0, nch)
            for g in range(nch * 8, ng):
                nib = (np.int64(mr[g >> 1]) >> ((g & 1) * 4)) & 15
                acc += as_value(vr[2 * g]) * x0[4 * g + _P0[nib]] + as_value(vr[2 * g + 1]) * x0[4 * g + _P1[nib]]
            out[0, r] = acc * scales[r] if has_scales else acc
        return
    for blk in prange((rows + ROW_BLOCK - 1) // ROW_BLOCK):
        r0 = blk * ROW_BLOCK
        nr = min(ROW_BLOCK, rows - r0)
        buf = np.empty((nr, n), np.float32)
        for i in range(nr):
            _unpack_24_row(vals[r0 + i], meta[r0 + i], scales[r0 + i] if has_scales else np.float32(1.0), buf[i])
        for t in range(T):
            xt = x[t]
            for i in range(nr):
                bi = buf[i]
                acc = np.float32(0.0)
                for j in range(n):
                    acc += bi[j] * xt[j]
                out[t, r0 + i] = acc


@njit(parallel=True, **JIT)
def embed_sparse24(ids, vals, meta, scales, out):
    has_scales = scales.shape[0] > 0
    for i in prange(ids.shape[0]):
        r = ids[i]
        _unpack_24_row(vals[r], meta[r], scales[r] if has_scales else np.float32(1.0), out[i])


# ------------------------------------------------------------------ unstructured (CSR)

@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gemm_csr(x, scales, row_ptr, cols, vals, n, out):
    """CsrWeight: row r = vals[row_ptr[r]:row_ptr[r+1]] at cols[...]; w = scales[r] * value."""
    T = x.shape[0]
    rows = scales.shape[0]
    if T == 1:
        x0 = x[0]
        for r in prange(rows):
            a, b = row_ptr[r], row_ptr[r + 1]
            vr = vals[a:b]
            cr = cols[a:b]
            acc = np.float32(0.0)
            for k in range(b - a):
                acc += as_value(vr[k]) * x0[np.int64(cr[k])]
            out[0, r] = acc * scales[r]
        return
    xt = np.ascontiguousarray(x.T)                   # (n, T): each stored weight scales one row of it
    for r in prange(rows):
        acc = np.zeros(T, np.float32)
        for k in range(row_ptr[r], row_ptr[r + 1]):
            v = as_value(vals[k])
            xc = xt[np.int64(cols[k])]
            for t in range(T):
                acc[t] += v * xc[t]
        for t in range(T):
            out[t, r] = acc[t] * scales[r]


@njit(parallel=True, **JIT)
def embed_csr(ids, scales, row_ptr, cols, vals, n, out):
    for i in prange(ids.shape[0]):
        r = ids[i]
        out[i] = 0.0
        for k in range(row_ptr[r], row_ptr[r + 1]):
            out[i, np.int64(cols[k])] = scales[r] * as_value(vals[k])


# ------------------------------------------------------------------ references

def quantize_rows_int8_ref(x: np.ndarray):
    """NumPy twin of quantize_rows_int8 (as transformers' BitLinear): -> (xq (T, n) int8, xs (T,) float32)."""
    x = np.asarray(x, np.float32)
    m = np.maximum(np.abs(x).max(axis=1), np.float32(1e-5)).astype(np.float32)
    scale = (np.float32(127.0) / m).astype(np.float32)
    xq = np.clip(np.rint(x * scale[:, None]), -128, 127).astype(np.int8)
    return xq, (np.float32(1.0) / scale).astype(np.float32)


def gemm_int8act_ref(x: np.ndarray, t: np.ndarray, scales: np.ndarray, group: int | None = None) -> np.ndarray:
    """Ternary / binary GEMM reference: int8-quantized x (T, n) times integer weights t (out, n),
    exact in int64, times the activation scale and the weight scales: (1,) per tensor, (out,) per
    row, or (out, n // group) per group (then group is given)."""
    xq, xs = quantize_rows_int8_ref(x)
    xq, t = xq.astype(np.int64), t.astype(np.int64)
    if group is None:
        s = np.asarray(scales, np.float64).reshape(1, -1)
        return ((xq @ t.T) * s * xs[:, None].astype(np.float64)).astype(np.float32)
    out, n = t.shape
    acc = np.zeros((x.shape[0], out), np.float64)
    for g in range(scales.shape[1]):
        sl = slice(g * group, min((g + 1) * group, n))
        acc += (xq[:, sl] @ t[:, sl].T) * np.asarray(scales[:, g], np.float64)[None, :]
    return (acc * xs[:, None]).astype(np.float32)
