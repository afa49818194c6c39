"""Device selection and the ops table models call.

Models never import a kernel module: they call ``ops.linear(x, w)``, ``ops.rms_norm``…
and the backend picks the kernel by packed kind (and, later, device).
"""
from __future__ import annotations

import numpy as np

from .errors import EdgerunError, InputError
from .packed import DenseWeight, Int4Weight, Int8Weight


class CPUBackend:
    name = "cpu"

    def __init__(self):
        from edgerun.kernels_numba import linear, ops, paged_attention
        self._lin, self._ops, self._attn = linear, ops, paged_attention

    # ---- matmuls
    def linear(self, x: np.ndarray, w, out: np.ndarray | None = None) -> np.ndarray:
        """x (T, in) float32 @ W.T -> (T, out)."""
        L = self._lin
        T = x.shape[0]
        rows = w.w.shape[0] if isinstance(w, DenseWeight) else (w.q.shape[0] if isinstance(w, Int8Weight) else w.qs.shape[0])
        if out is None:
            out = np.empty((T, rows), np.float32)
        if isinstance(w, Int4Weight):
            L.gemm_int4(x, w.qs, w.scales, w.mins, w.group, out)
        elif isinstance(w, Int8Weight):
            L.gemm_int8(x, w.q, w.scales, w.group, out)
        elif w.dtype == "f32":
            L.gemm_f32(x, w.w, out)
        elif w.dtype == "bf16":
            L.gemm_bf16(x, w.w, out)
        else:
            L.gemm_f16(x, w.w, out)
        return out

    def embed(self, ids: np.ndarray, w, dim: int) -> np.ndarray:
        L = self._lin
        out = np.empty((ids.shape[0], dim), np.float32)
        if isinstance(w, Int4Weight):
            L.embed_int4(ids, w.qs, w.scales, w.mins, w.group, out)
        elif isinstance(w, Int8Weight):
            L.embed_int8(ids, w.q, w.scales, w.group, out)
        elif w.dtype == "f32":
            L.embed_f32(ids, w.w, out)
        elif w.dtype == "bf16":
            L.embed_bf16(ids, w.w, out)
        else:
            L.embed_f16(ids, w.w, out)
        return out

    # ---- elementwise
    def rms_norm(self, x, weight, eps):
        out = np.empty_like(x)
        self._ops.rms_norm(x, weight, np.float32(eps), out)
        return out

    def rms_norm_heads(self, x, weight, eps):
        self._ops.rms_norm_heads(x, weight, np.float32(eps))
        return x

    def rope(self, x, positions, inv_freq, attn_scale):
        self._ops.rope(x, positions, inv_freq, float(attn_scale))
        return x

    def silu_mul(self, gate, up):
        self._ops.silu_mul(gate, up, gate)
        return gate

    def gelu_tanh_mul(self, gate, up):
        self._ops.gelu_tanh_mul(gate, up, gate)
        return gate

    def scale_(self, x, s):
        x *= np.float32(s)
        return x

    def add_(self, x, y):
        self._ops.add_inplace(x, y)
        return x

    # ---- attention
    def attention(self, q, k, v, state, layer, scale, window=0, softcap=0.0):
        """Store k, v (T, n_kv, d) at the state's current length in its paged cache; attend q (T, H, d)."""
        kp, vp, table = state.layer(layer)
        start = state.length
        self._attn.store_kv_paged(k, v, kp, vp, table, start)
        out = np.empty_like(q)
        self._attn.paged_attention(q, kp, vp, table, start, np.float32(scale), int(window),
                                   np.float32(softcap), out)
        return out


_BACKENDS: dict[str, object] = {}


def get_backend(device: str = "cpu"):
    """The ops table for a device. 'cuda' arrives with the GPU backend issue."""
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}: choose cpu or cuda")
    if device == "cuda":
        raise EdgerunError("device 'cuda' is not available yet in this edgerun (CPU only for now)")
    if device not in _BACKENDS:
        _BACKENDS[device] = CPUBackend()
    return _BACKENDS[device]
