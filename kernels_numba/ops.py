"""Elementwise and normalisation kernels: RMSNorm, RoPE, SwiGLU, residual adds."""
import numpy as np
from numba import njit, prange

from ._common import FASTMATH, JIT


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def rms_norm(x, weight, eps, out):
    """out[t] = x[t] / rms(x[t]) * weight.   x, out: (T, d); weight: (d,)"""
    T, d = x.shape
    for t in prange(T):
        ss = np.float32(0.0)
        for j in range(d):
            ss += x[t, j] * x[t, j]
        inv = np.float32(1.0 / np.sqrt(ss / d + eps))
        for j in range(d):
            out[t, j] = x[t, j] * inv * weight[j]


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def rms_norm_heads(x, weight, eps):
    """In place, per head: x (T, n_heads, head_dim) normalised over head_dim (QK-norm)."""
    T, H, d = x.shape
    for t in prange(T):
        for h in range(H):
            ss = np.float32(0.0)
            for j in range(d):
                ss += x[t, h, j] * x[t, h, j]
            inv = np.float32(1.0 / np.sqrt(ss / d + eps))
            for j in range(d):
                x[t, h, j] = x[t, h, j] * inv * weight[j]


@njit(fastmath=FASTMATH, **JIT)
def _cos_sin(p, f, attn_scale):
    """cos and sin of the angle p * f (in float64, as HF computes it) times attn_scale, float32."""
    ang = np.float64(p) * np.float64(f)
    return np.float32(np.cos(ang) * attn_scale), np.float32(np.sin(ang) * attn_scale)


@njit(fastmath=FASTMATH, **JIT)
def _rotate(x, t, i, half, c, s):
    """Pair (i, i + half) of every head of x[t] turned by (c, s). A call, not inlined: rope calls it
    from a prange body, where inlined in-place stores have gone wrong (the parfor pass; see
    fused._add4)."""
    for h in range(x.shape[1]):
        a = x[t, h, i]
        b = x[t, h, i + half]
        x[t, h, i] = a * c - b * s
        x[t, h, i + half] = b * c + a * s


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def rope(x, positions, inv_freq, attn_scale):
    """In place, HF 'rotate_half' convention: pairs (j, j + rot/2) of the first rot dims.
    x: (T, n_heads, head_dim); positions: (T,) int64; inv_freq: (rot/2,) float32."""
    half = inv_freq.shape[0]
    for t in prange(x.shape[0]):
        for i in range(half):
            c, s = _cos_sin(positions[t], inv_freq[i], attn_scale)
            _rotate(x, t, i, half, c, s)


@njit(fastmath=FASTMATH, **JIT)
def rope_qk(q, k, positions, inv_freq, attn_scale):
    """rope on q and k of the same tokens in one serial call, each angle once for both (the fused
    decode layer: no parallel region for one token's 40-odd heads)."""
    half = inv_freq.shape[0]
    for t in range(q.shape[0]):
        for i in range(half):
            c, s = _cos_sin(positions[t], inv_freq[i], attn_scale)
            _rotate(q, t, i, half, c, s)
            _rotate(k, t, i, half, c, s)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def silu_mul(gate, up, out):
    """out = silu(gate) * up, all (T, d)."""
    T, d = gate.shape
    for t in prange(T):
        for j in range(d):
            g = gate[t, j]
            out[t, j] = g / (np.float32(1.0) + np.exp(-g)) * up[t, j]


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def gelu_tanh_mul(gate, up, out):
    """out = gelu(gate) * up with the tanh approximation (gelu_pytorch_tanh), all (T, d)."""
    T, d = gate.shape
    for t in prange(T):
        for j in range(d):
            g = gate[t, j]
            inner = np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)
            out[t, j] = np.float32(0.5) * g * (np.float32(1.0) + np.tanh(inner)) * up[t, j]


@njit(fastmath=FASTMATH, **JIT)
def add_inplace(x, y):
    """x += y for (T, d) arrays."""
    T, d = x.shape
    for t in range(T):
        for j in range(d):
            x[t, j] += y[t, j]


# ------------------------------------------------------------------ references

def rms_norm_ref(x, weight, eps):
    x = x.astype(np.float64)
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight).astype(np.float32)


def rope_ref(x, positions, inv_freq, attn_scale=1.0):
    half = inv_freq.shape[0]
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :].astype(np.float64)   # (T, half)
    c, s = (np.cos(ang) * attn_scale)[:, None, :], (np.sin(ang) * attn_scale)[:, None, :]
    a, b = x[..., :half].astype(np.float64), x[..., half:2 * half].astype(np.float64)
    y = x.astype(np.float64).copy()
    y[..., :half] = a * c - b * s
    y[..., half:2 * half] = b * c + a * s
    return y.astype(np.float32)


def gelu_tanh_mul_ref(gate, up):
    g = gate.astype(np.float64)
    return (0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * up).astype(np.float32)


def silu_mul_ref(gate, up):
    g = gate.astype(np.float64)
    return (g / (1 + np.exp(-g)) * up).astype(np.float32)


@njit(parallel=True, fastmath=FASTMATH, **JIT)
def stream_sum(buf):
    """Sum of a float64 buffer in one parallel streaming pass: the memory-bandwidth probe of
    `edgerun bench` (each thread reads a contiguous share, 8 independent partial sums)."""
    nt = 64
    chunk = (buf.shape[0] + nt - 1) // nt
    parts = np.zeros(nt, np.float64)
    for t in prange(nt):
        seg = buf[t * chunk:min((t + 1) * chunk, buf.shape[0])]
        acc = 0.0
        for j in range(seg.shape[0]):
            acc += seg[j]
        parts[t] = acc
    return parts.sum()
