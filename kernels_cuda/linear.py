"""Matrix products of activations with packed weights on the GPU: y = x @ W.T (+ bias, + residual).

Same op names and signatures as kernels_numba/linear.py (``gemm_int8(x, q, scales, group, out)``…),
with device arrays. Two kernels stand behind each name:

- T == 1 (decode): a GEMV: the weights are read once, 16 bytes a load (PTX
  ``ld.global.nc.v4`` through an inline-asm intrinsic, numba has no vector loads). A warp owns 4
  output rows and loads the next 16-byte chunk of each while it computes this one; KS warps of a
  block split a row's inputs only where the grid would not fill the GPU otherwise; partial sums
  meet through warp shuffles and one shared-memory step. x is read with 16-byte loads too (L1 serves the
  other warps); the RMS norm is fused without a pass of its own: y = W (x * w_norm) / rms(x).
  Weight bytes become exact floats by bit operations, no int-to-float conversion: a byte u
  (int8 + 128) moved to mantissa bits 15..22 of 1.0 is 1 + u/256, a nibble q at bits 19..22 is
  1 + q/16; then sum b x = 256 (sum (1 + u/256) x - 1.5 sum x), sum (q - 8) x = 16 (... - 1.5 sum x).
  The epilogue adds a bias or the residual, or applies silu / gelu_tanh to (gate, up) row pairs.
- T > 1 (prefill), or a shape the GEMV does not take: a tiled GEMM, 64 rows x 32 tokens per
  block, each weight tile dequantised once into shared memory and used by every token.

With int8 activations (the backend's act_quant, its default as on the CPU) x is quantized per block
of 32 as kernels_numba/simd.py does and the dot products run on dp4a, in one launch: on sm_80 and
later ``_gemv_fq8s_kernel`` (512 threads, one block an SM): each lane streams its 4 rows' 16-byte
chunks through its own shared-memory slots with cp.async, FQ8_STAGES - 1 chunks ahead, holding no
registers for them; the first of them are issued before the kernel waits for the one before it
(PDL), then x is quantized into shared memory (coalesced, all of x's loads at once). Before sm_80
``_gemv_fq8_kernel`` (the same with the next chunk in registers). For inputs wider than FQ8_MAX_N
``quantize_act_kernel`` + ``_gemv_q8_kernel``. The GEMVs are launched with programmatic dependent
launch where recorded (_launch.pdl, _common.grid_wait). H100, 8192 x 8192, weight bytes over time
against the device-to-device copy: int8 94% / 93% (per row / groups of 32), int4 groups of 32 83%
(a kernel that only reads those bytes: 92% / 84%).

Device layouts (edgerun/backend_cuda.py uploads them): int8 q (rows, in) int8 plus its uint32
view (rows, in/4); int4 qs (rows, in/2) uint8 plus its uint32 view (rows, in/8), low nibble
first as in edgerun/packed.py; scales and mins float32 or float16; dense f32, float16, or
bfloat16 as uint16 bits.
"""
import math

import numpy as np
from numba import cuda

from ._launch import _cc_major, big_smem, go, pdl
from ._common import (BLOCK, F32, FULL, SIM, U32, bits_to_f32, block_sum, blocks, device, grid_wait, launch_dependents,
                      log2_exact, warp_max, warp_sum, warp_sum4)

DENSE_ROWS = BLOCK // 32 * 4      # output rows per dense GEMV block: 4 per warp
RED4 = 4 * BLOCK                  # shared scratch of warp_sum4 (a compile-time constant)
MAX_SMEM_X = 12 * 1024            # x values the dense GEMV stages in shared memory (48 KiB)

ACT_NONE, ACT_SILU, ACT_GELU = 0, 1, 2

_S16 = U32(16)


# ------------------------------------------------------------------ element helpers

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


# ------------------------------------------------------------------ 16-byte loads

# weights are streamed once: kept out of L1 (where x and the norm weight stay for the other warps)
LD_W = "ld.global.nc.L1::no_allocate"
LD_X = "ld.global.nc"

if SIM:
    def make_ld4(op, side_effect=False):
        """ld4(a, i) -> (a[i], a[i+1], a[i+2], a[i+3]); on the GPU one 16-byte load (i a multiple of 4)."""
        def ld4(a, i):
            return a[i], a[i + 1], a[i + 2], a[i + 3]
        return ld4
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    def make_ld4(op, side_effect=False):
        """ld4(a, i) -> the 4 elements a[i:i+4] of a 1-D array of 32-bit values in one 16-byte load
        (`op`.v4: PTX through inline asm, since numba has no vector loads); i a multiple of 4 and
        the array 16-byte aligned. LLVM takes such an asm for a pure function and may hoist it out
        of the branch that guards it: side_effect=True for loads whose array may be a dummy."""
        @intrinsic
        def ld4(typingctx, arr, idx):
            dt = arr.dtype
            sig = types.UniTuple(dt, 4)(arr, idx)

            def codegen(context, builder, sig, args):
                aty, ity = sig.args
                ary = context.make_array(aty)(context, builder, value=args[0])
                i = context.cast(builder, args[1], ity, types.intp)
                ptr = cgutils.get_item_pointer(context, builder, aty, ary, [i])
                elt = context.get_value_type(dt)
                is_f = isinstance(dt, types.Float)
                c = "f" if is_f else "r"
                fnty = ir.FunctionType(ir.LiteralStructType([elt] * 4), [ptr.type])
                asm = ir.InlineAsm(fnty, f"{op}.v4.{'f32' if is_f else 'u32'} {{$0, $1, $2, $3}}, [$4];",
                                   f"={c},={c},={c},={c},l", side_effect=side_effect)
                r = builder.call(asm, [ptr])
                return context.make_tuple(builder, sig.return_type, [builder.extract_value(r, k) for k in range(4)])
            return sig, codegen
        return ld4

ldx4 = make_ld4(LD_X)
ldx4g = make_ld4(LD_X, side_effect=True)    # guarded loads (never speculated)

if SIM:
    def pf_l2(a, i):
        """(GPU) prefetch.global.L2 of the line holding a[i]."""
        pass
else:
    @intrinsic
    def pf_l2(typingctx, arr, idx):
        """prefetch.global.L2 of the cache line holding arr[idx] (1-D): a load issued later hits L2;
        unlike a load it holds no register."""
        sig = types.void(arr, idx)

        def codegen(context, builder, sig, args):
            aty, ity = sig.args
            ary = context.make_array(aty)(context, builder, value=args[0])
            i = context.cast(builder, args[1], ity, types.intp)
            ptr = cgutils.get_item_pointer(context, builder, aty, ary, [i])
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type])
            builder.call(ir.InlineAsm(fnty, "prefetch.global.L2 [$0];", "l", side_effect=True), [ptr])
            return context.get_dummy_value()
        return sig, codegen

if SIM:
    def prefetch_l2(a, r, nbytes):
        """(GPU) the bulk copy engine pulls nbytes from &a[r, 0] into L2: no registers, no waiting."""
        pass
else:
    @intrinsic
    def prefetch_l2(typingctx, arr, r, nbytes):
        """cp.async.bulk.prefetch.L2 of nbytes (a multiple of 16, the address 16-byte aligned) from
        &arr[r, 0] of a 2-D array (sm_90): rows that a warp will stream, fetched ahead into L2 without
        holding registers."""
        sig = types.void(arr, r, nbytes)

        def codegen(context, builder, sig, args):
            aty, rty, nty = sig.args
            ary = context.make_array(aty)(context, builder, value=args[0])
            i = context.cast(builder, args[1], rty, types.intp)
            z = context.get_constant(types.intp, 0)
            ptr = cgutils.get_item_pointer(context, builder, aty, ary, [i, z])
            i32 = ir.IntType(32)
            nb = args[2]
            nb = builder.trunc(nb, i32) if nb.type.width > 32 else nb
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32])
            builder.call(ir.InlineAsm(fnty, "cp.async.bulk.prefetch.L2.global [$0], $1;", "l,r",
                                      side_effect=True), [ptr, nb])
            return context.get_dummy_value()
        return sig, codegen

if SIM:
    def _dp4a(a, b, c, sa, sb):
        av = np.array([int(a) & 0xFFFFFFFF], np.uint32).view(np.int8 if sa else np.uint8).astype(np.int64)
        bv = np.array([int(b) & 0xFFFFFFFF], np.uint32).view(np.int8 if sb else np.uint8).astype(np.int64)
        return np.int32(int(c) + int((av * bv).sum()))

    def dp4a_ss(a, b, c):
        """c + the dot product of the 4 signed bytes of a and of b (PTX dp4a.s32.s32)."""
        return _dp4a(a, b, c, True, True)

    def dp4a_us(a, b, c):
        """c + the dot product of the 4 unsigned bytes of a and the 4 signed bytes of b (dp4a.u32.s32)."""
        return _dp4a(a, b, c, False, True)
else:
    def _make_dp4a(form):
        @intrinsic
        def dp4a(typingctx, a, b, c):
            sig = types.int32(a, b, c)

            def codegen(context, builder, sig, args):
                i32 = ir.IntType(32)
                vals = [builder.trunc(v, i32) if v.type.width > 32 else v for v in args]
                fnty = ir.FunctionType(i32, [i32, i32, i32])
                return builder.call(ir.InlineAsm(fnty, f"dp4a.{form} $0, $1, $2, $3;", "=r,r,r,r"), vals)
            return sig, codegen
        return dp4a

    dp4a_ss = _make_dp4a("s32.s32")
    dp4a_us = _make_dp4a("u32.s32")


# ------------------------------------------------------------------ GEMV (one token)

_M15 = U32(0x007F8000)            # a byte moved to mantissa bits 15..22 ...
_M19 = U32(0x00780000)            # ... or a nibble to bits 19..22 ...
_ONE = U32(0x3F800000)            # ... of 1.0: the float 1 + u/256 (1 + q/16), exactly
_FLIP = U32(0x80808080)           # int8 b -> unsigned u = b + 128, four bytes at once
_S1, _S3, _S5, _S7, _S9, _S11, _S15, _S19 = (U32(s) for s in (1, 3, 5, 7, 9, 11, 15, 19))


@device
def _ub(v):
    """1 + u/256 for the byte u already shifted to bits 15..22 of v."""
    return bits_to_f32((v & _M15) | _ONE)


@device
def _u(v):
    """1 + q/16 for the nibble q already shifted to bits 19..22 of v."""
    return bits_to_f32((v & _M19) | _ONE)


@device
def _dot4b(acc, w, x0, x1, x2, x3):
    """acc + sum (1 + u_k/256) x_k over the 4 flipped bytes of w: a shift, a logic op and an FMA a value."""
    return acc + _ub(w << _S15) * x0 + _ub(w << _S7) * x1 + _ub(w >> _S1) * x2 + _ub(w >> _S9) * x3


@device
def _dot8u(acc, w, x0, x1, x2, x3, x4, x5, x6, x7):
    """acc + sum (1 + q/16) x over the 8 nibbles of w (low nibbles of bytes 0..3 -> x0..x3, high -> x4..x7)."""
    return (acc + _u(w << _S19) * x0 + _u(w << _S11) * x1 + _u(w << _S3) * x2 + _u(w >> _S5) * x3
            + _u(w << _S15) * x4 + _u(w << _S7) * x5 + _u(w >> _S1) * x6 + _u(w >> _S9) * x7)


@device
def _d16(w, xv):
    """sum (1 + u/256) x over the 16 int8 values of a 16-byte chunk (w: its 4 words) against xv (16,)."""
    d = _dot4b(np.float32(0.0), w[0] ^ _FLIP, xv[0], xv[1], xv[2], xv[3])
    d = _dot4b(d, w[1] ^ _FLIP, xv[4], xv[5], xv[6], xv[7])
    d = _dot4b(d, w[2] ^ _FLIP, xv[8], xv[9], xv[10], xv[11])
    return _dot4b(d, w[3] ^ _FLIP, xv[12], xv[13], xv[14], xv[15])


@device
def _d32(w, lo, hi):
    """sum (1 + q/16) x over the 32 nibbles of a 16-byte int4 chunk: low nibbles against lo (16,), high against hi."""
    d = _dot8u(np.float32(0.0), w[0], lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3])
    d = _dot8u(d, w[1], lo[4], lo[5], lo[6], lo[7], hi[4], hi[5], hi[6], hi[7])
    d = _dot8u(d, w[2], lo[8], lo[9], lo[10], lo[11], hi[8], hi[9], hi[10], hi[11])
    return _dot8u(d, w[3], lo[12], lo[13], lo[14], lo[15], hi[12], hi[13], hi[14], hi[15])


@device
def _x16(x, nw, i, has_norm, ss):
    """x[i:i+16] in four 16-byte loads, times the norm weight when given; ss += their squares."""
    a0, a1, a2, a3 = ldx4(x, i)
    b0, b1, b2, b3 = ldx4(x, i + 4)
    c0, c1, c2, c3 = ldx4(x, i + 8)
    d0, d1, d2, d3 = ldx4(x, i + 12)
    if has_norm:
        ss += (((a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)) + ((b0 * b0 + b1 * b1) + (b2 * b2 + b3 * b3))) \
            + (((c0 * c0 + c1 * c1) + (c2 * c2 + c3 * c3)) + ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)))
        e0, e1, e2, e3 = ldx4(nw, i)
        f0, f1, f2, f3 = ldx4(nw, i + 4)
        g0, g1, g2, g3 = ldx4(nw, i + 8)
        h0, h1, h2, h3 = ldx4(nw, i + 12)
        a0, a1, a2, a3 = a0 * e0, a1 * e1, a2 * e2, a3 * e3
        b0, b1, b2, b3 = b0 * f0, b1 * f1, b2 * f2, b3 * f3
        c0, c1, c2, c3 = c0 * g0, c1 * g1, c2 * g2, c3 * g3
        d0, d1, d2, d3 = d0 * h0, d1 * h1, d2 * h2, d3 * h3
    return (a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3), ss


@device
def _sum16(v):
    return ((((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])))
            + (((v[8] + v[9]) + (v[10] + v[11])) + ((v[12] + v[13]) + (v[14] + v[15]))))


@device
def _int8_chunk(c, x, nw, has_norm, ss, wa, wb, wc, wd, sa, sb, sc, sd, gs, per_row, a0, a1, a2, a3):
    """One 16-byte chunk c (inputs 16c..16c+15) of 4 int8 rows added to a0..a3:
    sum b x = 256 (d - 1.5 sum x) with d = sum (1 + u/256) x (the 256 is applied at the end)."""
    xv, ss = _x16(x, nw, c << U32(4), has_norm, ss)
    xs = np.float32(1.5) * _sum16(xv)
    da, db, dc, dd = _d16(wa, xv) - xs, _d16(wb, xv) - xs, _d16(wc, xv) - xs, _d16(wd, xv) - xs
    if per_row:
        return a0 + da, a1 + db, a2 + dc, a3 + dd, ss
    g = (c << U32(4)) >> gs
    return (a0 + np.float32(sa[g]) * da, a1 + np.float32(sb[g]) * db, a2 + np.float32(sc[g]) * dc,
            a3 + np.float32(sd[g]) * dd, ss)


@device
def _int4_chunk(c, x, nw, has_norm, ss, wa, wb, wc, wd, sa, sb, sc, sd, mins, ra, rb, rc, rd, has_mins, gshift,
                a0, a1, a2, a3):
    """One 16-byte chunk c of 4 int4 rows (32 inputs: byte j of the chunk holds input lo + j and hi + j)
    added to a0..a3 over 16: sum (q - 8) x = 16 (d - 1.5 sum x), with mins s q + m: 16 s (d - sum x) + m sum x."""
    byte = c << U32(4)
    hs = gshift - U32(1)
    g = byte >> hs
    lo = (g << gshift) + (byte & ((U32(1) << hs) - U32(1)))
    xl, ss = _x16(x, nw, lo, has_norm, ss)
    xh, ss = _x16(x, nw, lo + (U32(1) << hs), has_norm, ss)
    xs = _sum16(xl) + _sum16(xh)
    da, db, dc, dd = _d32(wa, xl, xh), _d32(wb, xl, xh), _d32(wc, xl, xh), _d32(wd, xl, xh)
    if has_mins:
        xm = xs * np.float32(0.0625)
        return (a0 + np.float32(sa[g]) * (da - xs) + np.float32(mins[ra, g]) * xm,
                a1 + np.float32(sb[g]) * (db - xs) + np.float32(mins[rb, g]) * xm,
                a2 + np.float32(sc[g]) * (dc - xs) + np.float32(mins[rc, g]) * xm,
                a3 + np.float32(sd[g]) * (dd - xs) + np.float32(mins[rd, g]) * xm, ss)
    xs = np.float32(1.5) * xs
    return (a0 + np.float32(sa[g]) * (da - xs), a1 + np.float32(sb[g]) * (db - xs),
            a2 + np.float32(sc[g]) * (dc - xs), a3 + np.float32(sd[g]) * (dd - xs), ss)


@cuda.jit(device=True, inline=True)
def _finish4(part, red, a0, a1, a2, a3, ss, has_norm, ks, KS, mul, n, eps):
    """Warp sums of the 4 rows (and of x's squares), then over the KS warps sharing the rows;
    returns the 4 results (times mul and 1/rms) valid in lane 0 of the first of those warps."""
    t = cuda.threadIdx.x
    w, lane = t >> 5, t & 31
    a0, a1, a2, a3 = warp_sum4(a0, a1, a2, a3, red)
    if has_norm:
        ss = warp_sum(ss, red)
    if KS > 1:
        if lane == 0:
            part[w, 0], part[w, 1], part[w, 2], part[w, 3], part[w, 4] = a0, a1, a2, a3, ss
        cuda.syncthreads()
        if lane == 0 and ks == 0:
            for s in range(1, KS):
                a0 += part[w + s, 0]
                a1 += part[w + s, 1]
                a2 += part[w + s, 2]
                a3 += part[w + s, 3]
                ss += part[w + s, 4]
    if has_norm:
        mul = mul / math.sqrt(ss / np.float32(n) + eps)
    return a0 * mul, a1 * mul, a2 * mul, a3 * mul


WPB = BLOCK // 32                 # warps per block
GEMV_KS = 0                       # warps sharing 4 rows (splitting the inputs); 0: chosen per shape
GEMV_PIPE = True                  # software-pipelined loop (else: two chunks loaded, then computed)
GEMV_MAXREG = 0                   # register cap of the quantized GEMVs (0: the compiler's choice)
MIN_GEMV_BLOCKS = 256             # below this many blocks a GEMV splits its inputs over more warps
_GEMV = {}


def _gemv_q_kernel(kind, KS, flag, ldw=None, pipe=None, maxreg=None):
    """The int8 (flag: per-row scales) or int4 (flag: has mins) GEMV with KS warps sharing 4 rows,
    compiled once per variant (KS, the flag, the weight load's PTX, the loop's form and a register
    cap are constants of the code). pipe: each lane loads the next chunk of its 4 rows while it
    computes this one; else it loads two chunks, then does the math of both."""
    ldw = ldw or LD_W
    pipe = GEMV_PIPE if pipe is None else pipe
    maxreg = GEMV_MAXREG if maxreg is None else maxreg
    key = (kind, KS, flag, ldw, pipe, maxreg)
    if key in _GEMV:
        return _GEMV[key]
    RG = WPB // KS                # row groups (4 rows each) per block
    ld4 = make_ld4(ldw)
    int8 = kind == "int8"
    PSHAPE = (WPB, 8)

    opts = {"max_registers": maxreg} if maxreg and not SIM else {}

    @cuda.jit(fastmath=True, **opts)
    def kernel(x, norm_w, eps, qw, scales, mins, gshift, res, act, out):
        """out (rows,) = [rmsnorm](x (n,)) @ W.T [+ res] | act on (gate, up) row pairs.
        int8: qw (rows, n/4) uint32 words (4 int8 each), scales (rows, n >> gshift) or (rows, 1);
        int4: qw (rows, n/8) uint32 (8 nibbles each), scales / mins (rows, n >> gshift), mins (0, 0)
        when symmetric. A warp owns 4 rows, KS warps split a row's 16-byte chunks; each lane has
        8 16-byte weight loads in flight (2 chunks of 4 rows) before any math, and reads the x
        values of its chunks with 16-byte loads (L1 hits after the first warp). The norm needs
        no extra pass: y = (W (x * w_norm)) / rms(x), sum x^2 gathered along."""
        red = cuda.shared.array(RED4, F32)
        part = cuda.shared.array(PSHAPE, F32)
        t = cuda.threadIdx.x
        w, lane = t >> 5, t & 31
        rg, ks = w // KS, w % KS
        rows = qw.shape[0]
        n = x.shape[0]
        r0 = (cuda.blockIdx.x * RG + rg) * 4
        ra, rb, rc, rd = min(r0, rows - 1), min(r0 + 1, rows - 1), min(r0 + 2, rows - 1), min(r0 + 3, rows - 1)
        qa, qb, qc, qd = qw[ra], qw[rb], qw[rc], qw[rd]
        sa, sb, sc, sd = scales[ra], scales[rb], scales[rc], scales[rd]
        has_norm = norm_w.shape[0] > 0
        has_mins = mins.shape[0] > 0
        gs = U32(gshift)
        nc = U32(n >> 4) if int8 else U32(n >> 5)
        step = U32(32 * KS)
        c = U32(ks * 32 + lane)
        a0 = a1 = a2 = a3 = ss = np.float32(0.0)
        launch_dependents()
        if not pipe:
            grid_wait()
        if pipe:                                  # next chunk's 4 loads in flight while this one is computed
            i = min(c, nc - U32(1)) << U32(2)
            wa, wb, wc, wd = ld4(qa, i), ld4(qb, i), ld4(qc, i), ld4(qd, i)
            grid_wait()                           # (PDL) x may come from the kernel before: read after it
            while c < nc:
                c2 = c + step
                if c2 < nc:
                    j = c2 << U32(2)
                    va, vb, vc, vd = ld4(qa, j), ld4(qb, j), ld4(qc, j), ld4(qd, j)
                else:
                    va, vb, vc, vd = wa, wb, wc, wd
                if int8:
                    a0, a1, a2, a3, ss = _int8_chunk(c, x, norm_w, has_norm, ss, wa, wb, wc, wd, sa, sb, sc, sd,
                                                     gs, flag, a0, a1, a2, a3)
                else:
                    a0, a1, a2, a3, ss = _int4_chunk(c, x, norm_w, has_norm, ss, wa, wb, wc, wd, sa, sb, sc, sd,
                                                     mins, ra, rb, rc, rd, flag, gs, a0, a1, a2, a3)
                wa, wb, wc, wd = va, vb, vc, vd
                c = c2
        while c < nc:                             # pairs: 8 loads, then the math of both chunks
            i = c << U32(2)
            wa, wb, wc, wd = ld4(qa, i), ld4(qb, i), ld4(qc, i), ld4(qd, i)
            c2 = c + step
            cb = c2 if c2 < nc else c             # the second chunk of the pair (repeated at the end, unused)
            j = cb << U32(2)
            va, vb, vc, vd = ld4(qa, j), ld4(qb, j), ld4(qc, j), ld4(qd, j)
            if int8:
                a0, a1, a2, a3, ss = _int8_chunk(c, x, norm_w, has_norm, ss, wa, wb, wc, wd, sa, sb, sc, sd,
                                                 gs, flag, a0, a1, a2, a3)
                if c2 < nc:
                    a0, a1, a2, a3, ss = _int8_chunk(c2, x, norm_w, has_norm, ss, va, vb, vc, vd, sa, sb, sc, sd,
                                                     gs, flag, a0, a1, a2, a3)
            else:
                a0, a1, a2, a3, ss = _int4_chunk(c, x, norm_w, has_norm, ss, wa, wb, wc, wd, sa, sb, sc, sd,
                                                 mins, ra, rb, rc, rd, flag, gs, a0, a1, a2, a3)
                if c2 < nc:
                    a0, a1, a2, a3, ss = _int4_chunk(c2, x, norm_w, has_norm, ss, va, vb, vc, vd, sa, sb, sc, sd,
                                                     mins, ra, rb, rc, rd, flag, gs, a0, a1, a2, a3)
            c = c2 + step
        mul = np.float32(256.0) if int8 else np.float32(16.0)
        a0, a1, a2, a3 = _finish4(part, red, a0, a1, a2, a3, ss, has_norm, ks, KS, mul, n, eps)
        if lane == 0 and ks == 0:
            if int8 and flag:
                a0, a1, a2, a3 = (a0 * np.float32(sa[0]), a1 * np.float32(sb[0]), a2 * np.float32(sc[0]),
                                  a3 * np.float32(sd[0]))
            _epilogue(out, res, act, r0, rows, a0, a1, a2, a3)

    _GEMV[key] = pdl(kernel)
    return kernel


# ------------------------------------------------------------------ int8 activations (act_quant)

if SIM:
    def _rint(v):
        return np.float32(np.rint(v))
else:
    from numba.cuda import libdevice as _libdevice

    @cuda.jit(device=True, inline=True)
    def _rint(v):
        return _libdevice.rintf(v)


@cuda.jit
def quantize_act_kernel(x, norm_w, eps, xq, xs, xsum16):
    """x (n,) [RMS-normed by norm_w] -> int8 per block of 32, as kernels_numba/simd.quantize_act:
    xq (n,) int8 = rint(x * 127 / amax), xs (n/32,) = amax / 127, xsum16 (n/16,) = xs * sum(xq) over
    each 16 inputs. A warp per block of 32; with a norm every block first sums x^2 over all of x.
    Not fastmath: 127 / amax and rint round as on the CPU."""
    red = cuda.shared.array(RED4, F32)
    part = cuda.shared.array(32, F32)
    launch_dependents()
    grid_wait()
    t = cuda.threadIdx.x
    lane = t & 31
    n = x.shape[0]
    inv = np.float32(1.0)
    has_norm = norm_w.shape[0] > 0
    if has_norm:
        ss = np.float32(0.0)
        for i in range(t, n, BLOCK):
            ss += x[i] * x[i]
        ss = block_sum(ss, red, part)
        inv = np.float32(1.0) / math.sqrt(ss / np.float32(n) + eps)
    b = cuda.blockIdx.x * WPB + (t >> 5)
    i = min(b * 32 + lane, n - 1)
    v = x[i] * inv
    if has_norm:
        v = v * norm_w[i]
    amax = warp_max(abs(v), red)
    d = amax / np.float32(127.0)
    q = _rint(v * (np.float32(127.0) / amax)) if amax > np.float32(0.0) else np.float32(0.0)
    lo = warp_sum(q if lane < 16 else np.float32(0.0), red)
    hi = warp_sum(q if lane >= 16 else np.float32(0.0), red)
    if b * 32 < n:
        xq[i] = np.int8(q)
        if lane == 0:
            xs[b] = d
            xsum16[2 * b] = d * lo
            xsum16[2 * b + 1] = d * hi


pdl(quantize_act_kernel)


@device
def _q8_int8_chunk(c, xq32, xs, wa, wb, wc, wd, sa, sb, sc, sd, gs, per_row, a0, a1, a2, a3):
    """A 16-byte chunk of 4 int8 rows against its 16 int8 activations (4 dp4a a row), times the
    activation block's scale (and the weight group's)."""
    xw = ldx4(xq32, c << U32(2))
    d = xs[c >> U32(1)]
    da = np.float32(dp4a_ss(wa[3], xw[3], dp4a_ss(wa[2], xw[2], dp4a_ss(wa[1], xw[1], dp4a_ss(wa[0], xw[0], 0)))))
    db = np.float32(dp4a_ss(wb[3], xw[3], dp4a_ss(wb[2], xw[2], dp4a_ss(wb[1], xw[1], dp4a_ss(wb[0], xw[0], 0)))))
    dc = np.float32(dp4a_ss(wc[3], xw[3], dp4a_ss(wc[2], xw[2], dp4a_ss(wc[1], xw[1], dp4a_ss(wc[0], xw[0], 0)))))
    dd = np.float32(dp4a_ss(wd[3], xw[3], dp4a_ss(wd[2], xw[2], dp4a_ss(wd[1], xw[1], dp4a_ss(wd[0], xw[0], 0)))))
    if per_row:
        return a0 + d * da, a1 + d * db, a2 + d * dc, a3 + d * dd
    g = (c << U32(4)) >> gs
    return (a0 + np.float32(sa[g]) * d * da, a1 + np.float32(sb[g]) * d * db, a2 + np.float32(sc[g]) * d * dc,
            a3 + np.float32(sd[g]) * d * dd)


_LO4 = U32(0x0F0F0F0F)


@device
def _nib_dot(w, xl, xh):
    """(low nibbles . xl, high nibbles . xh) over a 16-byte int4 chunk (8 dp4a)."""
    lo = dp4a_us(w[0] & _LO4, xl[0], 0)
    hi = dp4a_us((w[0] >> U32(4)) & _LO4, xh[0], 0)
    lo = dp4a_us(w[1] & _LO4, xl[1], lo)
    hi = dp4a_us((w[1] >> U32(4)) & _LO4, xh[1], hi)
    lo = dp4a_us(w[2] & _LO4, xl[2], lo)
    hi = dp4a_us((w[2] >> U32(4)) & _LO4, xh[2], hi)
    lo = dp4a_us(w[3] & _LO4, xl[3], lo)
    hi = dp4a_us((w[3] >> U32(4)) & _LO4, xh[3], hi)
    return np.float32(lo), np.float32(hi)


@device
def _q8_int4_chunk(c, xq32, xs, xsum16, wa, wb, wc, wd, sa, sb, sc, sd, mins, ra, rb, rc, rd, has_mins, gshift,
                   a0, a1, a2, a3):
    """A 16-byte chunk of 4 int4 rows (inputs lo..lo+15 in the low nibbles, hi..hi+15 in the high
    ones) against int8 activations: s (xs_lo u_lo.x_lo + xs_hi u_hi.x_hi) + c (xsum_lo + xsum_hi),
    c = -8 s, or the group's min."""
    byte = c << U32(4)
    hs = gshift - U32(1)
    g = byte >> hs
    lo = (g << gshift) + (byte & ((U32(1) << hs) - U32(1)))
    hi = lo + (U32(1) << hs)
    xl, xh = ldx4(xq32, lo >> U32(2)), ldx4(xq32, hi >> U32(2))
    dl, dh = xs[lo >> U32(5)], xs[hi >> U32(5)]
    xsm = xsum16[lo >> U32(4)] + xsum16[hi >> U32(4)]
    la, ha = _nib_dot(wa, xl, xh)
    lb, hb = _nib_dot(wb, xl, xh)
    lc, hc = _nib_dot(wc, xl, xh)
    ld, hd = _nib_dot(wd, xl, xh)
    if has_mins:
        return (a0 + np.float32(sa[g]) * (dl * la + dh * ha) + np.float32(mins[ra, g]) * xsm,
                a1 + np.float32(sb[g]) * (dl * lb + dh * hb) + np.float32(mins[rb, g]) * xsm,
                a2 + np.float32(sc[g]) * (dl * lc + dh * hc) + np.float32(mins[rc, g]) * xsm,
                a3 + np.float32(sd[g]) * (dl * ld + dh * hd) + np.float32(mins[rd, g]) * xsm)
    m8 = np.float32(8.0) * xsm
    return (a0 + np.float32(sa[g]) * (dl * la + dh * ha - m8), a1 + np.float32(sb[g]) * (dl * lb + dh * hb - m8),
            a2 + np.float32(sc[g]) * (dl * lc + dh * hc - m8), a3 + np.float32(sd[g]) * (dl * ld + dh * hd - m8))


def _gemv_q8_kernel(kind, KS, flag, ldw=None):
    """The int8-activation GEMV (dp4a): the same shape of work as _gemv_q_kernel (a warp owns 4 rows,
    KS warps split them, the next chunk's loads in flight while this one is computed)."""
    ldw = ldw or LD_W
    key = ("q8", kind, KS, flag, ldw)
    if key in _GEMV:
        return _GEMV[key]
    RG = WPB // KS
    ld4 = make_ld4(ldw)
    int8 = kind == "int8"
    PSHAPE = (WPB, 8)

    @cuda.jit(fastmath=True)
    def kernel(xq32, xs, xsum16, qw, scales, mins, gshift, res, act, out):
        """out (rows,) = x @ W.T [+ res] | act on row pairs, x given as quantize_act_kernel's xq (as
        int32 words), xs, xsum16; qw, scales, mins as in _gemv_q_kernel."""
        red = cuda.shared.array(RED4, F32)
        part = cuda.shared.array(PSHAPE, F32)
        t = cuda.threadIdx.x
        w, lane = t >> 5, t & 31
        rg, ks = w // KS, w % KS
        rows = qw.shape[0]
        n = xq32.shape[0] * 4
        r0 = (cuda.blockIdx.x * RG + rg) * 4
        ra, rb, rc, rd = min(r0, rows - 1), min(r0 + 1, rows - 1), min(r0 + 2, rows - 1), min(r0 + 3, rows - 1)
        qa, qb, qc, qd = qw[ra], qw[rb], qw[rc], qw[rd]
        sa, sb, sc, sd = scales[ra], scales[rb], scales[rc], scales[rd]
        gs = U32(gshift)
        nc = U32(n >> 4) if int8 else U32(n >> 5)
        step = U32(32 * KS)
        c = U32(ks * 32 + lane)
        a0 = a1 = a2 = a3 = np.float32(0.0)
        launch_dependents()
        i = min(c, nc - U32(1)) << U32(2)
        wa, wb, wc, wd = ld4(qa, i), ld4(qb, i), ld4(qc, i), ld4(qd, i)
        grid_wait()
        while c < nc:
            c2 = c + step
            if c2 < nc:
                j = c2 << U32(2)
                va, vb, vc, vd = ld4(qa, j), ld4(qb, j), ld4(qc, j), ld4(qd, j)
            else:
                va, vb, vc, vd = wa, wb, wc, wd
            if int8:
                a0, a1, a2, a3 = _q8_int8_chunk(c, xq32, xs, wa, wb, wc, wd, sa, sb, sc, sd, gs, flag,
                                                a0, a1, a2, a3)
            else:
                a0, a1, a2, a3 = _q8_int4_chunk(c, xq32, xs, xsum16, wa, wb, wc, wd, sa, sb, sc, sd, mins,
                                                ra, rb, rc, rd, flag, gs, a0, a1, a2, a3)
            wa, wb, wc, wd = va, vb, vc, vd
            c = c2
        a0, a1, a2, a3 = _finish4(part, red, a0, a1, a2, a3, np.float32(0.0), False, ks, KS, np.float32(1.0), n,
                                  np.float32(0.0))
        if lane == 0 and ks == 0:
            if int8 and flag:
                a0, a1, a2, a3 = (a0 * np.float32(sa[0]), a1 * np.float32(sb[0]), a2 * np.float32(sc[0]),
                                  a3 * np.float32(sd[0]))
            _epilogue(out, res, act, r0, rows, a0, a1, a2, a3)

    _GEMV[key] = pdl(kernel)
    return kernel


class ActQ8:
    """Scratch of the int8 activations of one x (n,): xq (n,) int8 and its int32 view, xs, xsum16."""

    def __init__(self, n: int):
        self.xq = cuda.device_array(n, np.int8)
        self.xq32 = self.xq.view(np.int32)
        self.xs = cuda.device_array(n // 32, np.float32)
        self.xsum16 = cuda.device_array(n // 16, np.float32)


def launch_quantize_act(x, q: ActQ8, norm_w=None, eps=0.0, stream=0):
    """x (n,) (n % 32 == 0) [RMS-normed] -> q's int8 activations."""
    go(quantize_act_kernel, blocks(x.shape[0] // 32, WPB), BLOCK, stream, 0,
       (x, dummy() if norm_w is None else norm_w, np.float32(eps), q.xq, q.xs, q.xsum16))


def launch_gemv_q8(kind, q: ActQ8, fields, group, out, res=None, act=ACT_NONE, stream=0):
    """One token against int8 activations already in q (launch_quantize_act): out = act/res(x @ W.T)."""
    n = q.xq.shape[0]
    rows = fields[0].shape[0]
    ks = gemv_split(kind, n, rows)
    rs = dummy() if res is None else res
    if kind == "int8":
        per_row = group == n
        args = (q.xq32, q.xs, q.xsum16, fields[0], fields[1], dummy(2), 0 if per_row else log2_exact(group), rs, act,
                out)
        k = _gemv_q8_kernel("int8", ks, per_row)
    else:
        args = (q.xq32, q.xs, q.xsum16, fields[0], fields[1], fields[2], log2_exact(group), rs, act, out)
        k = _gemv_q8_kernel("int4", ks, fields[2].shape[0] > 0)
    go(k, blocks(rows, WPB // ks * 4), BLOCK, stream, 0, args)


def gemv_q8_fits(kind: str, n: int, group: int) -> bool:
    """The int8-activation GEMV: the float GEMV's shapes with n a multiple of 32 (activation blocks)
    and int8 weight groups of 32 or more (one activation block per weight group... or per row)."""
    return n % 32 == 0 and gemv_fits(kind, n, group) and (kind != "int8" or group == n or group >= 16)


def gemv_split(kind: str, n: int, rows: int, wpb: int = WPB) -> int:
    """Warps sharing 4 rows: one (a warp streams whole rows, its loop pipelined: measured best on an
    H100, 8192 x 8192 int8 85% of the copy bandwidth vs 72% with 4), more when that leaves fewer
    than MIN_GEMV_BLOCKS blocks (o_proj, down_proj of small models), as long as every lane keeps
    a chunk."""
    if GEMV_KS:
        return min(GEMV_KS, wpb)
    nc = n // (16 if kind == "int8" else 32)
    ks = 1
    if not GEMV_PIPE:                          # pairs: 2 chunks of a row a lane
        while ks < wpb and nc >= 64 * ks * 2:
            ks *= 2
    min_blocks = MIN_GEMV_BLOCKS * WPB // wpb   # (the same number of warps)
    while ks < wpb and nc >= 32 * ks * 2 and blocks(rows, wpb // ks * 4) < min_blocks:
        ks *= 2
    return ks


# ------------------------------------------------------------------ int8 activations, quantized inside the GEMV

FQ8_MAX_N = 16384                 # inputs the fused kernel quantizes into shared memory (1.75 bytes each)
FQ8_DEPTH = 1                     # chunks of each row a lane has in flight while it computes one (H100: 1 > 2 > 3)
FQ8_MAXREG = 128                  # register cap: 2 blocks of 256 threads an SM (130 registers halved that)
FQ8_PREFETCH = False              # each warp's rows prefetched into L2 by the bulk copy engine first
FQ8_L2AHEAD = 0                   # chunks a lane prefetches into L2 beyond those it holds in registers
FQ8_L2AHEAD_PER_ROW = 2           # ... for int8 with one scale a row (H100 8192^2: 80% -> 84% of copy; with
                                  # group scales, and int4, prefetching measured 1-5 points slower)
lds4 = make_ld4("ld")             # 16 bytes of shared memory (generic address)
_QW = U32(255)


def _fq8_nmax(n: int) -> int:
    m = 1024
    while m < n:
        m *= 2
    return m


@device
def _qbyte(v, iq):
    """rint(v * iq) as an int32 and as its byte (two's complement) in a uint32."""
    q = np.int32(_rint(v * iq))
    return q, U32((q + np.int32(256)) & np.int32(255))


@cuda.jit(device=True, inline=True)
def _quantize_into(x, norm_w, eps, xw, xf, s16, red, part):
    """Every block: x (n,) [RMS-normed as kernels_numba/ops.rms_norm: x * inv * w] -> int8 per block of
    32 into shared memory as kernels_numba/simd.quantize_act does: xw (n/4,) words of 4 int8,
    xf[b] = amax / 127, xf[s16 + 2b (+1)] = that times the sum of the first (second) 16 int8.
    A thread per block of 32 (two passes over it: max, then quantize; the second hits L1)."""
    t = cuda.threadIdx.x
    n = x.shape[0]
    nb = n >> 5
    has_norm = norm_w.shape[0] > 0
    inv = np.float32(1.0)
    if has_norm:
        ss = np.float32(0.0)
        for i in range(t * 4, n, BLOCK * 4):
            a0, a1, a2, a3 = ldx4(x, i)
            ss += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)
        ss = block_sum(ss, red, part)
        inv = np.float32(1.0) / math.sqrt(ss / np.float32(n) + eps)
    for b in range(t, nb, BLOCK):
        base = b * 32
        amax = np.float32(0.0)
        for k in range(8):
            a0, a1, a2, a3 = ldx4(x, base + 4 * k)
            if has_norm:
                e0, e1, e2, e3 = ldx4(norm_w, base + 4 * k)
                a0, a1, a2, a3 = a0 * inv * e0, a1 * inv * e1, a2 * inv * e2, a3 * inv * e3
            amax = max(amax, max(max(abs(a0), abs(a1)), max(abs(a2), abs(a3))))
        d = amax / np.float32(127.0)
        iq = np.float32(127.0) / amax if amax > np.float32(0.0) else np.float32(0.0)
        slo = np.int32(0)
        shi = np.int32(0)
        for k in range(8):
            a0, a1, a2, a3 = ldx4(x, base + 4 * k)
            if has_norm:
                e0, e1, e2, e3 = ldx4(norm_w, base + 4 * k)
                a0, a1, a2, a3 = a0 * inv * e0, a1 * inv * e1, a2 * inv * e2, a3 * inv * e3
            q0, u0 = _qbyte(a0, iq)
            q1, u1 = _qbyte(a1, iq)
            q2, u2 = _qbyte(a2, iq)
            q3, u3 = _qbyte(a3, iq)
            xw[b * 8 + k] = u0 | (u1 << U32(8)) | (u2 << U32(16)) | (u3 << U32(24))
            if k < 4:
                slo += (q0 + q1) + (q2 + q3)
            else:
                shi += (q0 + q1) + (q2 + q3)
        xf[b] = d
        xf[s16 + 2 * b] = d * np.float32(slo)
        xf[s16 + 2 * b + 1] = d * np.float32(shi)
    cuda.syncthreads()


@device
def _dp16(w, xv):
    """The int32 dot product of 16 int8 weights (4 words) and 16 int8 activations (4 words)."""
    return dp4a_ss(w[3], xv[3], dp4a_ss(w[2], xv[2], dp4a_ss(w[1], xv[1], dp4a_ss(w[0], xv[0], 0))))


@device
def _nib32(w, xl, xh):
    """The int32 dot product of a chunk's 32 nibbles (unsigned) and their activations (one block)."""
    s = dp4a_us(w[0] & _LO4, xl[0], 0)
    s = dp4a_us((w[0] >> U32(4)) & _LO4, xh[0], s)
    s = dp4a_us(w[1] & _LO4, xl[1], s)
    s = dp4a_us((w[1] >> U32(4)) & _LO4, xh[1], s)
    s = dp4a_us(w[2] & _LO4, xl[2], s)
    s = dp4a_us((w[2] >> U32(4)) & _LO4, xh[2], s)
    s = dp4a_us(w[3] & _LO4, xl[3], s)
    return dp4a_us((w[3] >> U32(4)) & _LO4, xh[3], s)


@device
def _fq8_int8(xw, xf, c, P, a0, a1, a2, a3):
    """Chunk c (16 inputs) of 4 int8 rows, P = (4 x 4 words, 4 group scales), against shared xw / xf."""
    wa, wb, wc, wd, s0, s1, s2, s3 = P
    xv = lds4(xw, c << U32(2))
    d = xf[c >> U32(1)]
    return (a0 + (s0 * d) * np.float32(_dp16(wa, xv)), a1 + (s1 * d) * np.float32(_dp16(wb, xv)),
            a2 + (s2 * d) * np.float32(_dp16(wc, xv)), a3 + (s3 * d) * np.float32(_dp16(wd, xv)))


@device
def _fq8_int4(xw, xf, s16, c, P, gsh, mins, ra, rb, rc, rd, a0, a1, a2, a3):
    """Chunk c of 4 int4 rows (inputs lo..lo+15 in the low nibbles, hi..hi+15 in the high ones),
    P = (4 x 4 words, 4 group scales): s (d u.x) + c sum(x), c = -8 s or the group's min. With
    groups of 32 a chunk is one activation block: one dp4a chain and one conversion a row."""
    wa, wb, wc, wd, s0, s1, s2, s3 = P
    byte = c << U32(4)
    hs = gsh - U32(1)
    g = byte >> hs
    lo = (g << gsh) + (byte & ((U32(1) << hs) - U32(1)))
    hi = lo + (U32(1) << hs)
    xl, xh = lds4(xw, lo >> U32(2)), lds4(xw, hi >> U32(2))
    xsm = xf[s16 + (lo >> U32(4))] + xf[s16 + (hi >> U32(4))]
    if gsh == U32(5):
        d = xf[lo >> U32(5)]
        da, db = d * np.float32(_nib32(wa, xl, xh)), d * np.float32(_nib32(wb, xl, xh))
        dc, dd = d * np.float32(_nib32(wc, xl, xh)), d * np.float32(_nib32(wd, xl, xh))
    else:
        dl, dh = xf[lo >> U32(5)], xf[hi >> U32(5)]
        la, ha = _nib_dot(wa, xl, xh)
        lb, hb = _nib_dot(wb, xl, xh)
        lc, hc = _nib_dot(wc, xl, xh)
        ld, hd = _nib_dot(wd, xl, xh)
        da, db, dc, dd = dl * la + dh * ha, dl * lb + dh * hb, dl * lc + dh * hc, dl * ld + dh * hd
    if mins.shape[0] > 0:
        return (a0 + s0 * da + np.float32(mins[ra, g]) * xsm, a1 + s1 * db + np.float32(mins[rb, g]) * xsm,
                a2 + s2 * dc + np.float32(mins[rc, g]) * xsm, a3 + s3 * dd + np.float32(mins[rd, g]) * xsm)
    m8 = np.float32(8.0) * xsm
    return a0 + s0 * (da - m8), a1 + s1 * (db - m8), a2 + s2 * (dc - m8), a3 + s3 * (dd - m8)


def _gemv_fq8_kernel(kind, KS, NMAX, depth=None, maxreg=None, prefetch=None, ahead=None):
    """The int8-activation GEMV with the quantization inside: each block first issues its lanes'
    first weight loads, then quantizes x (normed) into shared memory while they are in flight
    (x is 32 KB at most and an L2 hit for all blocks but the first), then streams its rows with
    `depth` chunks (16 bytes of 4 rows, and their group scales) in flight a lane. One launch per
    matmul, as the float GEMV; the dot products on dp4a (int4: about 1 instruction per 8
    nibbles... 2.5 a word). Compiled per (kind, KS, shared size, depth)."""
    depth = depth or FQ8_DEPTH
    maxreg = FQ8_MAXREG if maxreg is None else maxreg
    PF = FQ8_PREFETCH if prefetch is None else prefetch
    AHEAD = FQ8_L2AHEAD if ahead is None else ahead
    key = ("fq8", kind, KS, NMAX, depth, maxreg, PF, AHEAD)
    if key in _GEMV:
        return _GEMV[key]
    RG = WPB // KS
    ld4 = make_ld4(LD_W)
    int8 = kind == "int8"
    PSHAPE = (WPB, 8)
    XW, XF, S16 = NMAX // 4, NMAX // 32 + NMAX // 16, NMAX // 32
    D1, D3 = depth == 1, depth >= 3
    A16 = 16
    opts = {"max_registers": maxreg} if maxreg and not SIM else {}

    @device
    def ldc(qa, qb, qc, qd, sa, sb, sc, sd, c, gsh):
        """The 16-byte chunk c of 4 rows and the group scale of each."""
        i = c << U32(2)
        g = (c << U32(4)) >> gsh
        return (ld4(qa, i), ld4(qb, i), ld4(qc, i), ld4(qd, i),
                np.float32(sa[g]), np.float32(sb[g]), np.float32(sc[g]), np.float32(sd[g]))

    @cuda.jit(fastmath=True, **opts)
    def kernel(x, norm_w, eps, qw, scales, mins, gshift, res, act, out):
        """out (rows,) = [rmsnorm](x (n,)) @ W.T [+ res] | act on (gate, up) row pairs, x quantized to
        int8 per block of 32 first. int8: qw (rows, n/4) words, scales (rows, groups), gshift log2
        of the group (31: one scale a row); int4: qw (rows, n/8) words, scales / mins (rows, groups)."""
        xw = cuda.shared.array(XW, U32, alignment=A16) if not SIM else cuda.shared.array(XW, U32)
        xf = cuda.shared.array(XF, F32)
        red = cuda.shared.array(RED4, F32)
        part = cuda.shared.array(PSHAPE, F32)
        part1 = cuda.shared.array(32, F32)
        t = cuda.threadIdx.x
        w, lane = t >> 5, t & 31
        rg, ks = w // KS, w % KS
        rows = qw.shape[0]
        n = x.shape[0]
        r0 = (cuda.blockIdx.x * RG + rg) * 4
        ra, rb, rc, rd = min(r0, rows - 1), min(r0 + 1, rows - 1), min(r0 + 2, rows - 1), min(r0 + 3, rows - 1)
        qa, qb, qc, qd = qw[ra], qw[rb], qw[rc], qw[rd]
        sa, sb, sc, sd = scales[ra], scales[rb], scales[rc], scales[rd]
        gsh = U32(gshift)
        gsc = gsh if int8 else gsh - U32(1)              # chunk byte -> group: int4 has 2 inputs a byte
        nc = U32(n >> 4) if int8 else U32(n >> 5)
        last = nc - U32(1)
        step = U32(32 * KS)
        c = U32(ks * 32 + lane)
        launch_dependents()
        if PF and ks == 0 and lane < 2 and r0 < rows:     # the warp's 4 rows (and their scales) into L2
            nr = min(4, rows - r0)
            if lane == 0:
                prefetch_l2(qw, r0, nr * qw.strides[0])
            elif scales.strides[0] % 16 == 0:
                prefetch_l2(scales, r0, nr * scales.strides[0])
        P0 = ldc(qa, qb, qc, qd, sa, sb, sc, sd, min(c, last), gsc)
        P1 = P0
        if not D1:
            P1 = ldc(qa, qb, qc, qd, sa, sb, sc, sd, min(c + step, last), gsc)
        P2 = P1
        if D3:
            P2 = ldc(qa, qb, qc, qd, sa, sb, sc, sd, min(c + step + step, last), gsc)
        ahead = step * U32(3 if D3 else 1 if D1 else 2)
        if AHEAD > 0:                     # the AHEAD chunks after those into L2 (no registers held)
            for k in range(AHEAD):
                ck = c + ahead + U32(k) * step
                if ck < nc:
                    j = ck << U32(2)
                    pf_l2(qa, j)
                    pf_l2(qb, j)
                    pf_l2(qc, j)
                    pf_l2(qd, j)
        grid_wait()                       # (PDL) x may come from the kernel before: read after it
        _quantize_into(x, norm_w, eps, xw, xf, S16, red, part1)
        a0 = a1 = a2 = a3 = np.float32(0.0)
        pfa = ahead + step * U32(AHEAD)
        while c < nc:
            cn = c + ahead
            PN = P0
            if cn < nc:
                PN = ldc(qa, qb, qc, qd, sa, sb, sc, sd, cn, gsc)
            if AHEAD > 0:
                cp = c + pfa
                if cp < nc:
                    j = cp << U32(2)
                    pf_l2(qa, j)
                    pf_l2(qb, j)
                    pf_l2(qc, j)
                    pf_l2(qd, j)
            if int8:
                a0, a1, a2, a3 = _fq8_int8(xw, xf, c, P0, a0, a1, a2, a3)
            else:
                a0, a1, a2, a3 = _fq8_int4(xw, xf, S16, c, P0, gsh, mins, ra, rb, rc, rd, a0, a1, a2, a3)
            if D3:
                P0, P1, P2 = P1, P2, PN
            elif D1:
                P0 = PN
            else:
                P0, P1 = P1, PN
            c += step
        a0, a1, a2, a3 = _finish4(part, red, a0, a1, a2, a3, np.float32(0.0), False, ks, KS, np.float32(1.0), n,
                                  np.float32(0.0))
        if lane == 0 and ks == 0:
            _epilogue(out, res, act, r0, rows, a0, a1, a2, a3)

    _GEMV[key] = pdl(kernel)
    return kernel


# ------------------------------------------------------------------ int8 activations, weights staged through shared memory

# cp.async stages of the one-launch int8-activation GEMV per weight kind (0: the register-pipelined
# kernel above). A stage is one 16-byte chunk of each of a lane's 4 rows (32 KB a block of 512); S
# stages keep S - 1 chunks a lane in flight without holding registers. H100 8192^2 (256 threads):
# int4 S=3..5 77-78%, 6 80%; int8 S=3 87%, 4 89% (the register kernel: 68%, 84/85%); 512 threads:
# int4 82-83%, int8 94-95% / 92-93%. Tried and not kept: 3-4 blocks an SM (64-80 registers, spills;
# 47-58% vs 65%, measured with an earlier, slower quantization), L2 bulk prefetch of the rows beyond
# the stages (1-9 points slower), quantizing only x's first window before the loop and the rest
# inside its first iteration (a barrier in the loop: 48%).
FQ8_STAGES = {"int8": 4, "int4": 4}
FQ8_QUANT = "coalesced"           # the in-kernel quantization of the staged kernel: "coalesced" | "thread"
                                  # (one thread a block of 32 as _gemv_fq8_kernel: equal without a norm,
                                  # with one int4 49% vs 69% at 256 threads)
FQ8_THREADS = 512                 # threads a block of the staged GEMV: one block an SM (H100, 8192^2: int4 78% -> 82%
                                  # of copy, int8 89% -> 95%/92% vs 256), so x is quantized once an SM, not twice
_U32D = np.dtype(np.uint32)       # (the simulator's dynamic shared arrays need a dtype object)

if SIM:
    def cp_async16(dst, di, src, si):
        """(GPU) cp.async.cg of the 16 bytes src[si:si+4] into the shared dst[di:di+4] (32-bit elements)."""
        dst[di], dst[di + 1], dst[di + 2], dst[di + 3] = src[si], src[si + 1], src[si + 2], src[si + 3]

    def cp_commit():
        pass

    def _make_cp_wait(n):
        def cp_wait():
            pass
        return cp_wait
else:
    @intrinsic
    def cp_async16(typingctx, dst, di, src, si):
        """cp.async.cg.shared.global of 16 bytes: &src[si] (global, 16-byte aligned) -> &dst[di] (a
        1-D shared array): the copy runs while the thread goes on, no registers held (sm_80+)."""
        sig = types.void(dst, di, src, si)

        def codegen(context, builder, sig, args):
            dty, dity, sty, sity = sig.args
            dary = context.make_array(dty)(context, builder, value=args[0])
            sary = context.make_array(sty)(context, builder, value=args[2])
            dp = cgutils.get_item_pointer(context, builder, dty, dary, [context.cast(builder, args[1], dity, types.intp)])
            sp = cgutils.get_item_pointer(context, builder, sty, sary, [context.cast(builder, args[3], sity, types.intp)])
            fnty = ir.FunctionType(ir.VoidType(), [dp.type, sp.type])
            asm = ("{ .reg .u64 %cpa; .reg .u32 %cpb; cvta.to.shared.u64 %cpa, $0; cvt.u32.u64 %cpb, %cpa; "
                   "cp.async.cg.shared.global [%cpb], [$1], 16; }")
            builder.call(ir.InlineAsm(fnty, asm, "l,l,~{memory}", side_effect=True), [dp, sp])
            return context.get_dummy_value()
        return sig, codegen

    def _asm_void(text):
        @intrinsic
        def op(typingctx):
            def codegen(context, builder, sig, args):
                builder.call(ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), text, "~{memory}", side_effect=True), [])
                return context.get_dummy_value()
            return types.void(), codegen
        return op

    cp_commit = _asm_void("cp.async.commit_group;")

    def _make_cp_wait(n):
        """cp.async.wait_group n: all but the newest n committed groups of this thread have landed."""
        return _asm_void(f"cp.async.wait_group {int(n)};")

_CP_WAIT = {}


def cp_wait_fn(n):
    if n not in _CP_WAIT:
        _CP_WAIT[n] = _make_cp_wait(n)
    return _CP_WAIT[n]


if SIM:
    from ._common import group_max

    @cuda.jit(device=True)
    def _group_max8(v, red):
        return group_max(v, red, 8)

    @cuda.jit(device=True)
    def _group_sum4(v, red):
        t = cuda.threadIdx.x
        red[t] = np.float32(v)
        cuda.syncthreads()
        b = t - t % 4
        s = red[b] + red[b + 1] + red[b + 2] + red[b + 3]
        cuda.syncthreads()
        return np.int32(s)
else:
    @cuda.jit(device=True, inline=True)
    def _group_max8(v, red):
        """max over the 8 lanes t & ~7 .. t | 7 (every lane of the warp calls it)."""
        v = max(v, cuda.shfl_xor_sync(FULL, v, 1))
        v = max(v, cuda.shfl_xor_sync(FULL, v, 2))
        return max(v, cuda.shfl_xor_sync(FULL, v, 4))

    @cuda.jit(device=True, inline=True)
    def _group_sum4(v, red):
        """sum over the 4 lanes t & ~3 .. t | 3."""
        v += cuda.shfl_xor_sync(FULL, v, 1)
        return v + cuda.shfl_xor_sync(FULL, v, 2)


def _make_quantize_coalesced(NMAX, TB):
    """_quantize_into for TB threads with coalesced loads: 8 lanes a block of 32 inputs, 4 inputs a
    lane, max and sums over the 8 lanes by shuffles, one word of 4 int8 a lane into shared memory.
    All of a thread's x (NMAX / TB values) is loaded into registers at once (the rounds are
    unrolled), so it waits for one round trip to L2 (two with a norm: x, then the norm weight
    after the sum of squares), not one a round. The same arithmetic as
    kernels_numba/simd.quantize_act on x * inv * w."""
    R = max(1, NMAX // (4 * TB))
    STRIDE = 4 * TB
    RX = 4 * R

    @cuda.jit(device=True, inline=True)
    def quantize(x, norm_w, eps, xw, xf, s16, red, part):
        t = cuda.threadIdx.x
        n = x.shape[0]
        xv = cuda.local.array(RX, F32)
        for k in range(R):
            a0, a1, a2, a3 = ldx4(x, min(k * STRIDE + 4 * t, n - 4))
            xv[4 * k], xv[4 * k + 1], xv[4 * k + 2], xv[4 * k + 3] = a0, a1, a2, a3
        if norm_w.shape[0] > 0:
            ss = np.float32(0.0)
            for k in range(R):
                if k * STRIDE + 4 * t < n:
                    ss += (xv[4 * k] * xv[4 * k] + xv[4 * k + 1] * xv[4 * k + 1]) \
                        + (xv[4 * k + 2] * xv[4 * k + 2] + xv[4 * k + 3] * xv[4 * k + 3])
            ss = block_sum(ss, red, part)
            inv = np.float32(1.0) / math.sqrt(ss / np.float32(n) + eps)
            for k in range(R):
                e0, e1, e2, e3 = ldx4g(norm_w, min(k * STRIDE + 4 * t, n - 4))
                xv[4 * k] = xv[4 * k] * inv * e0
                xv[4 * k + 1] = xv[4 * k + 1] * inv * e1
                xv[4 * k + 2] = xv[4 * k + 2] * inv * e2
                xv[4 * k + 3] = xv[4 * k + 3] * inv * e3
        j = t & 7
        for k in range(R):
            if k * STRIDE < n:                # uniform over the block
                base = k * STRIDE + 4 * t
                a0, a1, a2, a3 = xv[4 * k], xv[4 * k + 1], xv[4 * k + 2], xv[4 * k + 3]
                amax = _group_max8(max(max(abs(a0), abs(a1)), max(abs(a2), abs(a3))), red)
                d = amax / np.float32(127.0)
                iq = np.float32(127.0) / amax if amax > np.float32(0.0) else np.float32(0.0)
                q0, u0 = _qbyte(a0, iq)
                q1, u1 = _qbyte(a1, iq)
                q2, u2 = _qbyte(a2, iq)
                q3, u3 = _qbyte(a3, iq)
                s = _group_sum4((q0 + q1) + (q2 + q3), red)
                if base < n:
                    xw[base >> 2] = u0 | (u1 << U32(8)) | (u2 << U32(16)) | (u3 << U32(24))
                    b = base >> 5
                    if j == 0:
                        xf[b] = d
                        xf[s16 + 2 * b] = d * np.float32(s)
                    elif j == 4:
                        xf[s16 + 2 * b + 1] = d * np.float32(s)
        cuda.syncthreads()
    return quantize


_QUANT_C = {}


def _gemv_fq8s_kernel(kind, KS, NMAX, S, maxreg=None, quant=None, TB=None):
    """The one-launch int8-activation GEMV (as _gemv_fq8_kernel: a warp owns 4 rows, KS warps split
    them, x quantized into shared memory inside) with the weights staged through shared memory by
    cp.async: each lane copies the 16-byte chunk of its 4 rows S - 1 chunks ahead into its own slots
    (no other thread reads them, so no barrier), and its group scales ride S - 1 chunks ahead in
    registers. The first S - 1 chunks are in flight while x is quantized. Dynamic shared memory:
    S * 16 KB for 256 threads (launch with fq8s_smem). TB threads a block (fq8s_threads)."""
    maxreg = FQ8_MAXREG if maxreg is None else maxreg
    quant = quant or FQ8_QUANT
    TB = TB or fq8s_threads()
    key = ("fq8s", kind, KS, NMAX, S, maxreg, quant, TB)
    if key in _GEMV:
        return _GEMV[key]
    assert 2 <= S <= 6
    W8 = TB // 32                     # warps a block
    RG = W8 // KS
    int8 = kind == "int8"
    PSHAPE = (W8, 8)
    RED = 4 * TB
    XW, XF = NMAX // 4, NMAX // 32 + NMAX // 16
    SW = W8 * 4 * 128                 # words a stage: 4 rows x 32 lanes x 4 words a warp
    cp_wait = cp_wait_fn(S - 1)
    if quant == "coalesced":
        if (NMAX, TB) not in _QUANT_C:
            _QUANT_C[(NMAX, TB)] = _make_quantize_coalesced(NMAX, TB)
        qfn = _QUANT_C[(NMAX, TB)]
    else:
        assert TB == BLOCK
        qfn = _quantize_into
    opts = {"max_registers": maxreg} if maxreg and not SIM else {}

    @device
    def scl(sa, sb, sc, sd, c, gsc):
        g = (c << U32(4)) >> gsc
        return sa[g], sb[g], sc[g], sd[g]

    @device
    def issue(stg, slot, qa, qb, qc, qd, c):
        i = c << U32(2)
        cp_async16(stg, slot, qa, i)
        cp_async16(stg, slot + 128, qb, i)
        cp_async16(stg, slot + 256, qc, i)
        cp_async16(stg, slot + 384, qd, i)

    @cuda.jit(fastmath=True, **opts)
    def kernel(x, norm_w, eps, qw, scales, mins, gshift, res, act, out):
        """As _gemv_fq8_kernel's kernel."""
        xw = cuda.shared.array(XW, U32, alignment=16) if not SIM else cuda.shared.array(XW, U32)
        xf = cuda.shared.array(XF, F32)
        red = cuda.shared.array(RED, F32)
        part = cuda.shared.array(PSHAPE, F32)
        part1 = cuda.shared.array(32, F32)
        stg = cuda.shared.array(0, U32, alignment=16) if not SIM else cuda.shared.array(0, _U32D)
        t = cuda.threadIdx.x
        w, lane = t >> 5, t & 31
        rg, ks = w // KS, w % KS
        rows = qw.shape[0]
        n = x.shape[0]
        r0 = (cuda.blockIdx.x * RG + rg) * 4
        ra, rb, rc, rd = min(r0, rows - 1), min(r0 + 1, rows - 1), min(r0 + 2, rows - 1), min(r0 + 3, rows - 1)
        qa, qb, qc, qd = qw[ra], qw[rb], qw[rc], qw[rd]
        sa, sb, sc, sd = scales[ra], scales[rb], scales[rc], scales[rd]
        gsh = U32(gshift)
        gsc = gsh if int8 else gsh - U32(1)
        nc = U32(n >> 4) if int8 else U32(n >> 5)
        step = U32(32 * KS)
        c = U32(ks * 32 + lane)
        slot = w * 512 + lane * 4
        launch_dependents()
        Q0 = scl(sa, sb, sc, sd, min(c, nc - U32(1)), gsc)
        Q1 = Q2 = Q3 = Q4 = Q0
        if c < nc:
            issue(stg, slot, qa, qb, qc, qd, c)
        cp_commit()
        ck = c + step
        if S > 2:
            if ck < nc:
                Q1 = scl(sa, sb, sc, sd, ck, gsc)
                issue(stg, SW + slot, qa, qb, qc, qd, ck)
            cp_commit()
            ck += step
        if S > 3:
            if ck < nc:
                Q2 = scl(sa, sb, sc, sd, ck, gsc)
                issue(stg, 2 * SW + slot, qa, qb, qc, qd, ck)
            cp_commit()
            ck += step
        if S > 4:
            if ck < nc:
                Q3 = scl(sa, sb, sc, sd, ck, gsc)
                issue(stg, 3 * SW + slot, qa, qb, qc, qd, ck)
            cp_commit()
            ck += step
        if S > 5:
            if ck < nc:
                Q4 = scl(sa, sb, sc, sd, ck, gsc)
                issue(stg, 4 * SW + slot, qa, qb, qc, qd, ck)
            cp_commit()
        grid_wait()                       # (PDL) x may come from the kernel before: read after it
        qfn(x, norm_w, eps, xw, xf, U32(NMAX // 32), red, part1)
        a0 = a1 = a2 = a3 = np.float32(0.0)
        sr = 0                            # the stage of chunk c
        ahead = step * U32(S - 1)
        while c < nc:
            cn = c + ahead
            sw = sr - 1 if sr > 0 else S - 1
            QN = Q0
            if cn < nc:
                QN = scl(sa, sb, sc, sd, cn, gsc)
                issue(stg, sw * SW + slot, qa, qb, qc, qd, cn)
            cp_commit()
            cp_wait()                     # chunk c's group (the oldest) has landed
            o = sr * SW + slot
            P = (lds4(stg, o), lds4(stg, o + 128), lds4(stg, o + 256), lds4(stg, o + 384),
                 np.float32(Q0[0]), np.float32(Q0[1]), np.float32(Q0[2]), np.float32(Q0[3]))
            if int8:
                a0, a1, a2, a3 = _fq8_int8(xw, xf, c, P, a0, a1, a2, a3)
            else:
                a0, a1, a2, a3 = _fq8_int4(xw, xf, U32(NMAX // 32), c, P, gsh, mins, ra, rb, rc, rd,
                                           a0, a1, a2, a3)
            if S == 2:
                Q0 = QN
            elif S == 3:
                Q0, Q1 = Q1, QN
            elif S == 4:
                Q0, Q1, Q2 = Q1, Q2, QN
            elif S == 5:
                Q0, Q1, Q2, Q3 = Q1, Q2, Q3, QN
            else:
                Q0, Q1, Q2, Q3, Q4 = Q1, Q2, Q3, Q4, QN
            sr = sr + 1 if sr < S - 1 else 0
            c += step
        a0, a1, a2, a3 = _finish4(part, red, a0, a1, a2, a3, np.float32(0.0), False, ks, KS, np.float32(1.0), n,
                                  np.float32(0.0))
        if lane == 0 and ks == 0:
            _epilogue(out, res, act, r0, rows, a0, a1, a2, a3)

    _GEMV[key] = big_smem(pdl(kernel))
    return kernel


def fq8s_threads() -> int:
    """Threads a block of the staged GEMV (FQ8_THREADS; the simulator's BLOCK)."""
    return BLOCK if SIM else FQ8_THREADS


def fq8s_smem(S: int, TB: int | None = None) -> int:
    """Dynamic shared memory of the staged GEMV: S stages of 4 rows x 16 bytes a thread."""
    return S * (TB or fq8s_threads()) * 4 * 16


def gemv_fq8_fits(kind: str, n: int, group: int) -> bool:
    """The fused int8-activation GEMV: gemv_q8_fits's shapes with x small enough for shared memory."""
    return n <= FQ8_MAX_N and gemv_q8_fits(kind, n, group)


def launch_gemv_fq8(kind, x, fields, group, out, norm_w=None, eps=0.0, res=None, act=ACT_NONE, stream=0,
                    depth=None, stages=None):
    """One token, one launch: out = act/res(int8(x [normed]) @ W.T) (the backend's act_quant decode
    matmul). fields: int8 (words, scales); int4 (words, scales, mins). Returns False (nothing
    launched) when x or the norm weight is not 16-byte aligned."""
    n = x.shape[0]
    rows = fields[0].shape[0]
    nw = dummy() if norm_w is None else norm_w
    if not _aligned(x, nw):
        return False
    S = FQ8_STAGES.get(kind, 0) if stages is None else stages
    if S and not SIM and _cc_major() < 8:           # cp.async: sm_80 and later
        S = 0
    tb = fq8s_threads() if S else BLOCK
    ks = gemv_split(kind, n, rows, tb // 32)
    ahead = None
    if kind == "int8":
        gshift = 31 if group == n else log2_exact(group)
        mins = dummy(2)
        if group == n and FQ8_L2AHEAD == 0:
            ahead = FQ8_L2AHEAD_PER_ROW
    else:
        gshift, mins = log2_exact(group), fields[2]
    if S:
        k, smem = _gemv_fq8s_kernel(kind, ks, _fq8_nmax(n), S, TB=tb), fq8s_smem(S, tb)
    else:
        k, smem = _gemv_fq8_kernel(kind, ks, _fq8_nmax(n), depth, ahead=ahead), 0
    go(k, blocks(rows, tb // 32 // ks * 4), tb, stream, smem,
       (x, nw, np.float32(eps), fields[0], fields[1], mins, gshift, dummy() if res is None else res, act, out))
    return True


@cuda.jit
def fake_quant_kernel(x, out):
    """out (T, n) = x quantized to int8 per block of 32 and back (d * q, as simd.quantize_act): the
    activations that the CPU's q8 GEMMs see, for the GPU's float GEMM (prefill with act_quant)."""
    b = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
    t = cuda.blockIdx.y
    if b >= x.shape[1] >> 5:
        return
    base = b * 32
    amax = np.float32(0.0)
    for j in range(32):
        amax = max(amax, abs(x[t, base + j]))
    d = amax / np.float32(127.0)
    iq = np.float32(127.0) / amax if amax > np.float32(0.0) else np.float32(0.0)
    for j in range(32):
        out[t, base + j] = d * _rint(x[t, base + j] * iq)


def launch_fake_quant(x, out, stream=0):
    go(fake_quant_kernel, (blocks(x.shape[1] // 32, BLOCK), x.shape[0]), BLOCK, stream, 0, (x, out))


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
    """Whether the one-token GEMV kernel takes this shape (else the tiled GEMM does): int8 with
    16-byte chunks (n % 16) and one scale per chunk (per row, or groups of 16 or more); int4 with
    32-input chunks inside one group (groups of 32 or more, powers of two)."""
    if kind == "int8":
        return n % 16 == 0 and (group == n or (log2_exact(group) >= 4 and n % group == 0))
    if kind == "int4":
        return n % 32 == 0 and log2_exact(group) >= 5 and n % group == 0
    return n <= MAX_SMEM_X                 # the dense GEMV stages x in shared memory


def _aligned(*arrays) -> bool:
    """16-byte aligned device arrays (the GEMV's vector loads); always under the simulator."""
    return SIM or all(a.__cuda_array_interface__["data"][0] % 16 == 0 for a in arrays if a.size)


def launch_gemv(kind, x, fields, group, out, norm_w=None, eps=0.0, res=None, act=ACT_NONE, stream=0):
    """One token: out (rows,) [or (rows/2,) with act] = act/res(x (n,) [normed] @ W.T).
    fields: int8 (uint32 words, scales); int4 (uint32 words, scales, mins); dense (w,).
    Returns False (nothing launched) when x or the norm weight is not 16-byte aligned."""
    n = x.shape[0]
    rows = fields[0].shape[0]
    nw = dummy() if norm_w is None else norm_w
    rs = dummy() if res is None else res
    if kind in ("int8", "int4"):
        if not _aligned(x, nw):
            return False
        ks = gemv_split(kind, n, rows)
        grid = blocks(rows, WPB // ks * 4)
        if kind == "int8":
            per_row = group == n
            k = _gemv_q_kernel("int8", ks, per_row)
            args = (x, nw, np.float32(eps), fields[0], fields[1], dummy(2), 0 if per_row else log2_exact(group),
                    rs, act, out)
        else:
            k = _gemv_q_kernel("int4", ks, fields[2].shape[0] > 0)
            args = (x, nw, np.float32(eps), fields[0], fields[1], fields[2], log2_exact(group), rs, act, out)
        go(k, grid, BLOCK, stream, 0, args)
    else:
        go(GEMV_DENSE[kind], blocks(rows, DENSE_ROWS), BLOCK, stream, 4 * n, (x, nw, np.float32(eps), fields[0], rs, act, out))
    return True


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
            f = (a.view(np.uint32), b)
        elif kind == "int4":
            f = (a.view(np.uint32), b, c if c.shape[0] > 0 else dummy(2))
        else:
            f = (a,)
        if launch_gemv(kind, x.reshape(n), f, group, out.reshape(out.shape[1])):
            return
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
