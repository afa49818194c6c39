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

Device layouts (kernels_cuda/backend.py uploads them): int8 q (rows, in) int8 plus its uint32
view (rows, in/4); int4 qs (rows, in/2) uint8 plus its uint32 view (rows, in/8), low nibble
first as in edgerun/packed.py; scales and mins float32 or float16; dense f32, float16, or
bfloat16 as uint16 bits.
"""
import math

import numpy as np
from numba import cuda

from ._launch import go
from ._common import BLOCK, F32, U32, bits_to_f32, block_sum, blocks, device, log2_exact, warp_sum4

GEMV_ROWS = BLOCK // 32 * 4       # output rows per GEMV block: 4 per warp
RED4 = 4 * BLOCK                  # shared scratch of warp_sum4 (a compile-time constant)
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
    return np.float32(1.0) / math.sqrt(ss / n + eps)


# ------------------------------------------------------------------ GEMV (one token)

@device
def _dot4(w, x0, x1, x2, x3):
    return _i8(w) * x0 + _i8(w >> _S8) * x1 + _i8(w >> _S16) * x2 + _i8(w >> _S24) * x3


@device
def _col_int8(qw, scales, ra, rb, rc, rd, k, gshift, xs, nwd):
    """Word column k of rows ra..rd (4 int8 each) against its 4 staged x values, scaled."""
    x0, x1, x2, x3 = xs[k], xs[nwd + k], xs[2 * nwd + k], xs[3 * nwd + k]
    g = (k << 2) >> gshift
    return (_dot4(qw[ra, k], x0, x1, x2, x3) * np.float32(scales[ra, g]),
            _dot4(qw[rb, k], x0, x1, x2, x3) * np.float32(scales[rb, g]),
            _dot4(qw[rc, k], x0, x1, x2, x3) * np.float32(scales[rc, g]),
            _dot4(qw[rd, k], x0, x1, x2, x3) * np.float32(scales[rd, g]))


@cuda.jit(fastmath=True)
def gemv_int8_kernel(x, norm_w, eps, qw, scales, gshift, res, act, out):
    """x (n,) f32; norm_w (n,) or (0,); qw (rows, n/4) uint32; scales (rows, n >> gshift);
    res (rows,) or (0,); out (rows,) or, with act, (rows/2,)."""
    xs = cuda.shared.array(0, F32)
    red = cuda.shared.array(RED4, F32)
    part = cuda.shared.array(32, F32)
    t = cuda.threadIdx.x
    n = x.shape[0]
    nwd = n >> 2
    inv = _norm_scale(x, norm_w, eps, red, part)
    for i in range(t, n, BLOCK):
        v = x[i] * inv
        if norm_w.shape[0] > 0:
            v *= norm_w[i]
        xs[(i & 3) * nwd + (i >> 2)] = v
    cuda.syncthreads()
    rows = qw.shape[0]
    lane = t & 31
    r0 = cuda.blockIdx.x * GEMV_ROWS + (t >> 5) * 4
    ra, rb, rc, rd = min(r0, rows - 1), min(r0 + 1, rows - 1), min(r0 + 2, rows - 1), min(r0 + 3, rows - 1)
    a0 = a1 = a2 = a3 = np.float32(0.0)
    k = lane
    while k + 96 < nwd:              # 4 word columns a step: 16 independent loads in flight per lane
        p0, p1, p2, p3 = _col_int8(qw, scales, ra, rb, rc, rd, k, gshift, xs, nwd)
        q0, q1, q2, q3 = _col_int8(qw, scales, ra, rb, rc, rd, k + 32, gshift, xs, nwd)
        u0, u1, u2, u3 = _col_int8(qw, scales, ra, rb, rc, rd, k + 64, gshift, xs, nwd)
        v0, v1, v2, v3 = _col_int8(qw, scales, ra, rb, rc, rd, k + 96, gshift, xs, nwd)
        a0 += (p0 + q0) + (u0 + v0)
        a1 += (p1 + q1) + (u1 + v1)
        a2 += (p2 + q2) + (u2 + v2)
        a3 += (p3 + q3) + (u3 + v3)
        k += 128
    while k < nwd:
        p0, p1, p2, p3 = _col_int8(qw, scales, ra, rb, rc, rd, k, gshift, xs, nwd)
        a0 += p0
        a1 += p1
        a2 += p2
        a3 += p3
        k += 32
    a0, a1, a2, a3 = warp_sum4(a0, a1, a2, a3, red)
    if lane == 0:
        _epilogue(out, res, act, r0, rows, a0, a1, a2, a3)


@device
def _dot8(w, x0, x1, x2, x3, x4, x5, x6, x7, off):
    return (_nib(w, off) * x0 + _nib(w >> _S8, off) * x1 + _nib(w >> _S16, off) * x2 + _nib(w >> _S24, off) * x3
            + _nib(w >> _S4, off) * x4 + _nib(w >> _S12, off) * x5 + _nib(w >> _S20, off) * x6
            + _nib(w >> _S28, off) * x7)


@device
def _col_int4(qw, scales, mins, has_mins, off, ra, rb, rc, rd, k, hshift, xs, nwd):
    """Word column k of rows ra..rd (8 int4 each) against its 8 staged x values, scaled (+ mins)."""
    x0, x1, x2, x3 = xs[k], xs[nwd + k], xs[2 * nwd + k], xs[3 * nwd + k]
    x4, x5, x6, x7 = xs[4 * nwd + k], xs[5 * nwd + k], xs[6 * nwd + k], xs[7 * nwd + k]
    g = (k << 2) >> hshift
    s0 = _dot8(qw[ra, k], x0, x1, x2, x3, x4, x5, x6, x7, off) * np.float32(scales[ra, g])
    s1 = _dot8(qw[rb, k], x0, x1, x2, x3, x4, x5, x6, x7, off) * np.float32(scales[rb, g])
    s2 = _dot8(qw[rc, k], x0, x1, x2, x3, x4, x5, x6, x7, off) * np.float32(scales[rc, g])
    s3 = _dot8(qw[rd, k], x0, x1, x2, x3, x4, x5, x6, x7, off) * np.float32(scales[rd, g])
    if has_mins:
        xsum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        s0 += xsum * np.float32(mins[ra, g])
        s1 += xsum * np.float32(mins[rb, g])
        s2 += xsum * np.float32(mins[rc, g])
        s3 += xsum * np.float32(mins[rd, g])
    return s0, s1, s2, s3


@cuda.jit(fastmath=True)
def gemv_int4_kernel(x, norm_w, eps, qw, scales, mins, gshift, res, act, out):
    """x (n,) f32; qw (rows, n/8) uint32 (Int4Weight bytes, 4 per word); scales, mins (rows, n >> gshift),
    mins (0, 0) when symmetric; gshift = log2(group), group a power of two >= 8."""
    xs = cuda.shared.array(0, F32)
    red = cuda.shared.array(RED4, F32)
    part = cuda.shared.array(32, F32)
    t = cuda.threadIdx.x
    n = x.shape[0]
    nwd = n >> 3
    group = 1 << gshift
    hshift = gshift - 1
    half = group >> 1
    inv = _norm_scale(x, norm_w, eps, red, part)
    for i in range(t, n, BLOCK):
        v = x[i] * inv
        if norm_w.shape[0] > 0:
            v *= norm_w[i]
        j = i & (group - 1)
        byte = (i >> gshift) * half + (j & (half - 1))
        xs[((byte & 3) + 4 * (j >> hshift)) * nwd + (byte >> 2)] = v
    cuda.syncthreads()
    has_mins = mins.shape[0] > 0
    off = np.float32(8388608.0) if has_mins else np.float32(8388616.0)
    rows = qw.shape[0]
    lane = t & 31
    r0 = cuda.blockIdx.x * GEMV_ROWS + (t >> 5) * 4
    ra, rb, rc, rd = min(r0, rows - 1), min(r0 + 1, rows - 1), min(r0 + 2, rows - 1), min(r0 + 3, rows - 1)
    a0 = a1 = a2 = a3 = np.float32(0.0)
    k = lane
    while k + 96 < nwd:              # 4 word columns a step, as in the int8 GEMV
        p0, p1, p2, p3 = _col_int4(qw, scales, mins, has_mins, off, ra, rb, rc, rd, k, hshift, xs, nwd)
        q0, q1, q2, q3 = _col_int4(qw, scales, mins, has_mins, off, ra, rb, rc, rd, k + 32, hshift, xs, nwd)
        u0, u1, u2, u3 = _col_int4(qw, scales, mins, has_mins, off, ra, rb, rc, rd, k + 64, hshift, xs, nwd)
        v0, v1, v2, v3 = _col_int4(qw, scales, mins, has_mins, off, ra, rb, rc, rd, k + 96, hshift, xs, nwd)
        a0 += (p0 + q0) + (u0 + v0)
        a1 += (p1 + q1) + (u1 + v1)
        a2 += (p2 + q2) + (u2 + v2)
        a3 += (p3 + q3) + (u3 + v3)
        k += 128
    while k < nwd:
        p0, p1, p2, p3 = _col_int4(qw, scales, mins, has_mins, off, ra, rb, rc, rd, k, hshift, xs, nwd)
        a0 += p0
        a1 += p1
        a2 += p2
        a3 += p3
        k += 32
    a0, a1, a2, a3 = warp_sum4(a0, a1, a2, a3, red)
    if lane == 0:
        _epilogue(out, res, act, r0, rows, a0, a1, a2, a3)


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
        r0 = cuda.blockIdx.x * GEMV_ROWS + (t >> 5) * 4
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
    if n > MAX_SMEM_X:
        return False
    if kind == "int8":
        return n % 4 == 0 and (group == n or (log2_exact(group) >= 2 and n % group == 0))
    if kind == "int4":
        return log2_exact(group) >= 3 and n % group == 0
    return True


def launch_gemv(kind, x, fields, group, out, norm_w=None, eps=0.0, res=None, act=ACT_NONE, stream=0):
    """One token: out (rows,) [or (rows/2,) with act] = act/res(x (n,) [normed] @ W.T).
    fields: int8 (words, scales); int4 (words, scales, mins); dense (w,)."""
    n = x.shape[0]
    rows = fields[0].shape[0]
    grid = blocks(rows, GEMV_ROWS)
    nw = dummy() if norm_w is None else norm_w
    rs = dummy() if res is None else res
    smem = 4 * n
    if kind == "int8":
        gs = PER_ROW if group == n else log2_exact(group)
        go(gemv_int8_kernel, grid, BLOCK, stream, smem, (x, nw, np.float32(eps), fields[0], fields[1], gs, rs, act, out))
    elif kind == "int4":
        go(gemv_int4_kernel, grid, BLOCK, stream, smem, (x, nw, np.float32(eps), fields[0], fields[1], fields[2],
                                                          log2_exact(group), rs, act, out))
    else:
        go(GEMV_DENSE[kind], grid, BLOCK, stream, smem, (x, nw, np.float32(eps), fields[0], rs, act, out))


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
