"""The low-bit kinds on the GPU: ternary (2-bit and base-3), binary and 2:4 sparse matmuls.

Same names and signatures as kernels_numba/lowbit.py (``gemm_ternary(x, codes, scales, n, out)``…)
with device arrays, and the same arithmetic: activations quantized to int8 per token (BitLinear's
absmax, ``quantize_rows``), integer dot products (``dp4a`` through inline PTX for the 2-bit
ternary planes), then the activation and weight scales; float16 2:4 values multiply float
activations. Layouts are edgerun/packed.py's. One warp per (output row, token): a GEMV for one
token, and the same kernel over a grid of tokens for prefill (simple, not tiled).
"""
import math

import numba
import numpy as np
from numba import cuda

from ._common import BLOCK, F32, SIM, U32, blocks, device, warp_max, warp_sum
from ._launch import go

WPB = BLOCK // 32
I32 = np.dtype(np.int32) if SIM else numba.int32

if SIM:
    def _rint(v):
        return np.float32(np.rint(v))

    def dp4a_us(a, b, c):
        """c + sum over the 4 bytes of a (unsigned) times those of b (signed)."""
        ab = np.array([int(a) & 0xFFFFFFFF], np.uint32).view(np.uint8).astype(np.int64)
        bb = np.array([int(b) & 0xFFFFFFFF], np.uint32).view(np.int8).astype(np.int64)
        return np.int32(c + int((ab * bb).sum()))
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic

    @cuda.jit(device=True, inline=True)
    def _rint(v):
        return libdevice.rintf(v)

    @intrinsic
    def _dp4a(typingctx, a, b, c):
        sig = types.int32(types.uint32, types.int32, types.int32)

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(i32, [i32, i32, i32])
            asm = ir.InlineAsm(fnty, "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r")
            return builder.call(asm, args)
        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def dp4a_us(a, b, c):
        return _dp4a(U32(a), np.int32(b), np.int32(c))


# ------------------------------------------------------------------ activations

@cuda.jit
def quantize_rows_kernel(x, xq, xs, xsum):
    """One block per token: x (T, n) -> xq (T, npad) int8 (zeros past n), xs (T,) = max|x| / 127,
    xsum (T,) int32 = sum of xq. 127 / m is a true division (no fastmath), as on the CPU."""
    red = cuda.shared.array(BLOCK, F32)
    part = cuda.shared.array(32, F32)
    t, tok = cuda.threadIdx.x, cuda.blockIdx.x
    n, npad = x.shape[1], xq.shape[1]
    m = np.float32(0.0)
    for j in range(t, n, BLOCK):
        m = max(m, abs(x[tok, j]))
    m = warp_max(m, red)
    if t % 32 == 0:
        part[t // 32] = m
    cuda.syncthreads()
    mm = np.float32(0.0)
    for i in range(WPB):
        mm = max(mm, part[i])
    cuda.syncthreads()
    mm = max(mm, np.float32(1e-5))
    scale = np.float32(127.0) / mm
    s = np.float32(0.0)
    for j in range(t, npad, BLOCK):
        q = np.int32(0)
        if j < n:
            q = np.int32(min(max(_rint(x[tok, j] * scale), np.float32(-128.0)), np.float32(127.0)))
        xq[tok, j] = q
        s += np.float32(q)
    s = warp_sum(s, red)
    if t % 32 == 0:
        part[t // 32] = s
    cuda.syncthreads()
    if t == 0:
        tot = np.float32(0.0)
        for i in range(WPB):
            tot += part[i]
        xs[tok] = np.float32(1.0) / scale
        xsum[tok] = np.int32(tot)


def quantize_rows(x, npad: int):
    """(xq (T, npad) int8, xs (T,) float32, xsum (T,) int32) on the device."""
    T = x.shape[0]
    xq = cuda.device_array((T, npad), np.int8)
    xs = cuda.device_array(T, np.float32)
    xsum = cuda.device_array(T, np.int32)
    go(quantize_rows_kernel, T, BLOCK, 0, 0, (x, xq, xs, xsum))
    return xq, xs, xsum


# ------------------------------------------------------------------ kernels: a warp per (row, token)

@cuda.jit(fastmath=True)
def ternary_kernel(xq32, xs, xsum, codes32, scales, out):
    """TernaryWeight: codes32 (rows, nb*8) uint32 view of the codes (block b: words 8b..8b+7, byte j
    of the block holds inputs b*128 + j + 32 i in bits 2i..2i+1), xq32 (T, nb*32) int32 view of the
    int8 activations. sum (c - 1) x = sum c x - sum x, four dp4a a code word."""
    red = cuda.shared.array(BLOCK, F32)
    t = cuda.threadIdx.x
    lane = t & 31
    r = cuda.blockIdx.x * WPB + (t >> 5)
    tok = cuda.blockIdx.y
    rows = codes32.shape[0]
    rr = min(r, rows - 1)
    cw = codes32[rr]
    xr = xq32[tok]
    acc = np.int32(0)
    for k in range(lane, cw.shape[0], 32):
        w = U32(cw[k])
        b, j4 = k >> 3, k & 7                       # block, word in the block (bytes 4 j4 .. 4 j4 + 3)
        base = b * 32 + j4                          # int32 index of inputs b*128 + 4 j4 .. + 3
        acc = dp4a_us(w & U32(0x03030303), xr[base], acc)
        acc = dp4a_us((w >> U32(2)) & U32(0x03030303), xr[base + 8], acc)
        acc = dp4a_us((w >> U32(4)) & U32(0x03030303), xr[base + 16], acc)
        acc = dp4a_us((w >> U32(6)) & U32(0x03030303), xr[base + 24], acc)
    v = warp_sum(np.float32(acc), red)              # exact: |acc| < 2**24 for rows up to ~130k inputs
    if lane == 0 and r < rows:
        s = scales[r] if scales.shape[0] > 1 else scales[0]
        out[tok, r] = (v - np.float32(xsum[tok])) * xs[tok] * s


@device
def _trit(byte, i):
    """Digit i of a base-3 byte: ((byte * 3**i) & 255) * 3 >> 8 (packed.py's TernaryB3 layout)."""
    p = (1, 3, 9, 27, 81)[i]
    return (((byte * p) & 255) * 3) >> 8


@cuda.jit(fastmath=True)
def ternary_b3_kernel(xq, xs, xsum, codes, scales, out):
    """TernaryB3Weight: codes (rows, nb*32) uint8, block b of 160 inputs: byte j holds the trits of
    inputs b*160 + 32 i + j, i = 0..4."""
    red = cuda.shared.array(BLOCK, F32)
    t = cuda.threadIdx.x
    lane = t & 31
    r = cuda.blockIdx.x * WPB + (t >> 5)
    tok = cuda.blockIdx.y
    rows = codes.shape[0]
    cr = codes[min(r, rows - 1)]
    xr = xq[tok]
    acc = np.int32(0)
    for k in range(lane, cr.shape[0], 32):
        byte = np.int32(cr[k])
        base = (k >> 5) * 160 + (k & 31)
        acc += (np.int32(_trit(byte, 0)) * np.int32(xr[base]) + np.int32(_trit(byte, 1)) * np.int32(xr[base + 32])
                + np.int32(_trit(byte, 2)) * np.int32(xr[base + 64]) + np.int32(_trit(byte, 3)) * np.int32(xr[base + 96])
                + np.int32(_trit(byte, 4)) * np.int32(xr[base + 128]))
    v = warp_sum(np.float32(acc), red)
    if lane == 0 and r < rows:
        s = scales[r] if scales.shape[0] > 1 else scales[0]
        out[tok, r] = (v - np.float32(xsum[tok])) * xs[tok] * s


@cuda.jit(fastmath=True)
def binary_kernel(xq, xs, bits, scales, group, out):
    """BinaryWeight: bits (rows, ng*group/8) uint8 (in group g, bit i of byte j is input
    g*group + i*group/8 + j), scales (rows, ng) float16; per group sum(sign x) = 2 sum(x where
    bit) - sum(x), times the group's scale. A lane takes whole groups."""
    red = cuda.shared.array(BLOCK, F32)
    t = cuda.threadIdx.x
    lane = t & 31
    r = cuda.blockIdx.x * WPB + (t >> 5)
    tok = cuda.blockIdx.y
    rows = bits.shape[0]
    rr = min(r, rows - 1)
    br, sr = bits[rr], scales[rr]
    xr = xq[tok]
    gb = group // 8
    acc = np.float32(0.0)
    for g in range(lane, sr.shape[0], 32):
        on = np.int32(0)
        tot = np.int32(0)
        for j in range(gb):
            byte = np.int32(br[g * gb + j])
            for i in range(8):
                xv = np.int32(xr[g * group + i * gb + j])
                tot += xv
                if (byte >> i) & 1:
                    on += xv
        acc += np.float32(sr[g]) * np.float32(2 * on - tot)
    v = warp_sum(acc, red)
    if lane == 0 and r < rows:
        out[tok, r] = v * xs[tok]


@device
def _p0(nib):
    return 0 if nib & 1 else (1 if nib & 2 else (2 if nib & 4 else 3))


@device
def _p1(nib):
    return 3 if nib & 8 else (2 if nib & 4 else (1 if nib & 2 else 0))


def _make_sparse24(int8):
    @cuda.jit(fastmath=True)
    def kernel(x, xs, vals, meta, scales, out):
        """Sparse24Weight: vals (rows, n/2) int8 (x: int8 activations, xs their scales) or float16
        (x: float activations), meta (rows, ceil(n/8)) uint8 (group 2k in the low nibble of byte k,
        2k+1 in the high one; a group's mask has the bits of its two kept positions)."""
        red = cuda.shared.array(BLOCK, F32)
        t = cuda.threadIdx.x
        lane = t & 31
        r = cuda.blockIdx.x * WPB + (t >> 5)
        tok = cuda.blockIdx.y
        rows = vals.shape[0]
        rr = min(r, rows - 1)
        vr, mr = vals[rr], meta[rr]
        xr = x[tok]
        ng = vals.shape[1] // 2
        acc = np.float32(0.0)
        iacc = np.int32(0)
        for g in range(lane, ng, 32):
            nib = (np.int32(mr[g >> 1]) >> ((g & 1) * 4)) & 15
            i0, i1 = 4 * g + _p0(nib), 4 * g + _p1(nib)
            if int8:
                iacc += np.int32(vr[2 * g]) * np.int32(xr[i0]) + np.int32(vr[2 * g + 1]) * np.int32(xr[i1])
            else:
                acc += np.float32(vr[2 * g]) * xr[i0] + np.float32(vr[2 * g + 1]) * xr[i1]
        if int8:
            acc = np.float32(iacc)
        v = warp_sum(acc, red)
        if lane == 0 and r < rows:
            if int8:
                v = v * xs[tok]
            if scales.shape[0] > 0:
                v = v * scales[r]
            out[tok, r] = v
    return kernel


SPARSE24 = {True: _make_sparse24(True), False: _make_sparse24(False)}


@cuda.jit(fastmath=True)
def relu2_pairs_kernel(gu, out):
    """out[t, j] = relu(gu[t, 2j]) ** 2 * gu[t, 2j + 1]: BitNet's MLP on interleaved (gate, up) rows."""
    t = cuda.blockIdx.y
    j = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
    if j < out.shape[1]:
        g = max(gu[t, 2 * j], np.float32(0.0))
        out[t, j] = g * g * gu[t, 2 * j + 1]


def relu2_pairs(gu, out):
    go(relu2_pairs_kernel, (blocks(out.shape[1], BLOCK), out.shape[0]), BLOCK, 0, 0, (gu, out))


# ------------------------------------------------------------------ kernels_numba-compatible names

def _grid(rows, T):
    return (blocks(rows, WPB), T)


def gemm_ternary(x, codes, scales, n, out):
    """TernaryWeight fields as device arrays; x (T, n) float32 -> out (T, rows)."""
    rows, nbytes = codes.shape
    xq, xs, xsum = quantize_rows(x, nbytes * 4)
    go(ternary_kernel, _grid(rows, x.shape[0]), BLOCK, 0, 0,
       (xq.view(np.int32), xs, xsum, codes.view(np.uint32), scales, out))


def gemm_ternary_b3(x, codes, scales, n, out):
    rows, nbytes = codes.shape
    xq, xs, xsum = quantize_rows(x, nbytes // 32 * 160)
    go(ternary_b3_kernel, _grid(rows, x.shape[0]), BLOCK, 0, 0, (xq, xs, xsum, codes, scales, out))


def gemm_binary(x, bits, scales, group, n, out):
    """scales: float16 (rows, ng) (the host's uint16 bits viewed as float16)."""
    rows = bits.shape[0]
    xq, xs, _ = quantize_rows(x, scales.shape[1] * group)
    go(binary_kernel, _grid(rows, x.shape[0]), BLOCK, 0, 0, (xq, xs, bits, scales, int(group), out))


def gemm_sparse24(x, vals, meta, scales, out):
    """vals int8 (int8 activations) or float16 (float activations); scales (rows,) or (0,)."""
    rows = vals.shape[0]
    int8 = vals.dtype == np.int8
    if int8:
        xa, xs, _ = quantize_rows(x, x.shape[1])
    else:
        from .linear import dummy
        xa, xs = x, dummy()
    go(SPARSE24[int8], _grid(rows, x.shape[0]), BLOCK, 0, 0, (xa, xs, vals, meta, scales, out))


# ------------------------------------------------------------------ references (NumPy)

def gemm_lowbit_ref(x: np.ndarray, w) -> np.ndarray:
    """Any low-bit container through its codec's unpack and the CPU's activation rule (int8 for
    ternary, binary and int8 2:4; float for float16 2:4)."""
    from edgerun.kernels_numba.lowbit import quantize_rows_int8_ref
    from edgerun.packed import BinaryWeight, CODECS, Sparse24Weight, TernaryB3Weight, TernaryWeight
    kind = {TernaryWeight: "ternary", TernaryB3Weight: "ternary_b3", BinaryWeight: "binary",
            Sparse24Weight: "sparse24"}[type(w)]
    W = CODECS[kind].unpack(w).astype(np.float64)
    if kind == "sparse24" and w.vals.dtype != np.int8:
        return (np.asarray(x, np.float64) @ W.T).astype(np.float32)
    xq, xs = quantize_rows_int8_ref(x)
    return ((xq.astype(np.float64) * xs[:, None]) @ W.T).astype(np.float32)
