"""Elementwise and normalisation kernels on the GPU: RMSNorm, QK-norm, RoPE, SwiGLU / GeGLU,
residual adds. Same op names and signatures as kernels_numba/ops.py, with device arrays."""
import math

import numpy as np
from numba import cuda

from ._launch import go
from ._common import BLOCK, F32, block_sum, blocks, warp_sum


@cuda.jit(fastmath=True)
def rms_norm_kernel(x, weight, eps, out):
    """out[t] = x[t] / rms(x[t]) * weight; one block per row."""
    red = cuda.shared.array(BLOCK, F32)
    part = cuda.shared.array(32, F32)
    t = cuda.blockIdx.x
    d = x.shape[1]
    ss = np.float32(0.0)
    for j in range(cuda.threadIdx.x, d, BLOCK):
        ss += x[t, j] * x[t, j]
    ss = block_sum(ss, red, part)
    inv = np.float32(1.0) / math.sqrt(ss / d + eps)
    for j in range(cuda.threadIdx.x, d, BLOCK):
        out[t, j] = x[t, j] * inv * weight[j]


@cuda.jit(fastmath=True)
def add_rms_norm_kernel(x, a, weight, eps):
    """x[t] += a[t] / rms(a[t]) * weight (Gemma's post-norms before the residual add)."""
    red = cuda.shared.array(BLOCK, F32)
    part = cuda.shared.array(32, F32)
    t = cuda.blockIdx.x
    d = x.shape[1]
    ss = np.float32(0.0)
    for j in range(cuda.threadIdx.x, d, BLOCK):
        ss += a[t, j] * a[t, j]
    ss = block_sum(ss, red, part)
    inv = np.float32(1.0) / math.sqrt(ss / d + eps)
    for j in range(cuda.threadIdx.x, d, BLOCK):
        x[t, j] += a[t, j] * inv * weight[j]


@cuda.jit(fastmath=True)
def rms_norm_heads_kernel(x, weight, eps):
    """In place per head: x (T, H, d); one warp per (t, h)."""
    red = cuda.shared.array(32, F32)
    t, h = cuda.blockIdx.x, cuda.blockIdx.y
    d = x.shape[2]
    ss = np.float32(0.0)
    for j in range(cuda.threadIdx.x, d, 32):
        ss += x[t, h, j] * x[t, h, j]
    ss = warp_sum(ss, red)
    inv = np.float32(1.0) / math.sqrt(ss / d + eps)
    for j in range(cuda.threadIdx.x, d, 32):
        x[t, h, j] = x[t, h, j] * inv * weight[j]


@cuda.jit
def rope_kernel(x, positions, inv_freq, attn_scale):
    """In place, rotate_half pairs (i, i + rot/2); angles in float64 as on the CPU. One warp per (t, h)."""
    t, h = cuda.blockIdx.x, cuda.blockIdx.y
    half = inv_freq.shape[0]
    p = positions[t]
    for i in range(cuda.threadIdx.x, half, 32):
        ang = np.float64(p) * np.float64(inv_freq[i])
        c = np.float32(math.cos(ang) * attn_scale)
        s = np.float32(math.sin(ang) * attn_scale)
        a = x[t, h, i]
        b = x[t, h, i + half]
        x[t, h, i] = a * c - b * s
        x[t, h, i + half] = b * c + a * s


@cuda.jit(fastmath=True)
def act_mul_kernel(gate, up, act, out):
    """out = act(gate) * up, (T, d); act 1 = silu, 2 = gelu (tanh approximation)."""
    t = cuda.blockIdx.y
    j = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
    if j < out.shape[1]:
        g = gate[t, j]
        if act == 1:
            a = g / (np.float32(1.0) + math.exp(-g))
        else:
            inner = np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)
            a = np.float32(0.5) * g * (np.float32(1.0) + math.tanh(inner))
        out[t, j] = a * up[t, j]


@cuda.jit(fastmath=True)
def act_pairs_kernel(gu, act, out):
    """out[t, j] = act(gu[t, 2j]) * gu[t, 2j + 1]: the interleaved (gate, up) rows of a fused matmul."""
    t = cuda.blockIdx.y
    j = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
    if j < out.shape[1]:
        g = gu[t, 2 * j]
        if act == 1:
            a = g / (np.float32(1.0) + math.exp(-g))
        else:
            inner = np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)
            a = np.float32(0.5) * g * (np.float32(1.0) + math.tanh(inner))
        out[t, j] = a * gu[t, 2 * j + 1]


@cuda.jit
def axpy_kernel(x, y, alpha, beta):
    """x = alpha * x + beta * y, (T, d): residual adds (1, 1) and scaling (s, 0)."""
    t = cuda.blockIdx.y
    j = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
    if j < x.shape[1]:
        x[t, j] = alpha * x[t, j] + beta * y[t, j]


def _grid2(a):
    return (blocks(a.shape[1], BLOCK), a.shape[0])


# ------------------------------------------------------------------ kernels_numba-compatible names

def rms_norm(x, weight, eps, out):
    go(rms_norm_kernel, x.shape[0], BLOCK, 0, 0, (x, weight, np.float32(eps), out))


def rms_norm_heads(x, weight, eps):
    rms_norm_heads_kernel[(x.shape[0], x.shape[1]), 32](x, weight, np.float32(eps))


def rope(x, positions, inv_freq, attn_scale):
    rope_kernel[(x.shape[0], x.shape[1]), 32](x, positions, inv_freq, float(attn_scale))


def silu_mul(gate, up, out):
    go(act_mul_kernel, _grid2(out), BLOCK, 0, 0, (gate, up, 1, out))


def gelu_tanh_mul(gate, up, out):
    go(act_mul_kernel, _grid2(out), BLOCK, 0, 0, (gate, up, 2, out))


def add_inplace(x, y):
    go(axpy_kernel, _grid2(x), BLOCK, 0, 0, (x, y, np.float32(1.0), np.float32(1.0)))


def scale_inplace(x, s):
    axpy_kernel[_grid2(x), BLOCK](x, x, np.float32(s), np.float32(0.0))


def add_rms_norm(x, a, weight, eps):
    go(add_rms_norm_kernel, x.shape[0], BLOCK, 0, 0, (x, a, weight, np.float32(eps)))


def act_pairs(gu, act, out):
    go(act_pairs_kernel, _grid2(out), BLOCK, 0, 0, (gu, int(act), out))


@cuda.jit
def zero_kernel(a):
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] = 0


def zero(a):
    """Fill a contiguous device array with zeros (device pools: no host-side buffer of their size)."""
    flat = a.reshape(a.size)
    zero_kernel[blocks(a.size, BLOCK), BLOCK](flat)
