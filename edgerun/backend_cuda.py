"""The GPU backend: numba.cuda kernels (kernels_cuda/) behind the same ops as CPUBackend.

Weights are uploaded once (``upload``: packed containers -> DevWeight, cached per host
array) and stay on the device. The op methods take device arrays (host arrays are copied
in) and return device arrays. Whole models run through a device-resident runner
(``prepare(model)``, see runner_cuda.py) that keeps the decode step to a few fused launches
per layer; only token ids go in and logits come out.

Importing this module imports numba.cuda: edgerun.backend imports it only for
``get_backend('cuda')``, so the CPU path never needs numba-cuda.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import EdgerunError
from .packed import BinaryWeight, DenseWeight, Int4Weight, Int8Weight, Sparse24Weight, TernaryB3Weight, TernaryWeight


def _import_cuda():
    try:
        from numba import cuda
        from numba.cuda.core import config  # noqa: F401  (numba-cuda, not numba's old built-in target)
    except Exception as e:            # ImportError, or a broken CUDA install
        raise EdgerunError("device 'cuda' needs numba-cuda: pip install 'edgerun[cuda]' "
                           f"(importing numba.cuda failed: {e})") from None
    try:
        ok = cuda.is_available()
    except Exception as e:
        raise EdgerunError(f"device 'cuda': no usable CUDA driver ({e})") from None
    if not ok:
        raise EdgerunError("device 'cuda': no NVIDIA GPU or CUDA driver found "
                           "(numba.cuda.is_available() is False); use --device cpu")
    return cuda


LOWBIT = ("ternary", "ternary_b3", "binary", "sparse24")
ACT_RELU2 = 3          # relu(gate)**2 * up (BitNet), with the low-bit kinds


class DevWeight(NamedTuple):
    """A packed weight on the device. a, b, c: the kind's fields as the GEMM / embed kernels take
    them (int8: q, scales, -; int4: qs, scales, mins; dense: w, w, -; ternary / ternary_b3: codes,
    scales (float32), -; binary: bits, scales (float16), -; sparse24: vals (int8 | float16), meta,
    scales (float32, or empty)), unused ones empty; group: binary's group;
    words: the uint32 view of q / qs that the one-token GEMV reads (None if it can't)."""
    kind: str
    rows: int
    cols: int
    group: int
    a: object
    b: object
    c: object
    words: object


def _scales(s: np.ndarray) -> np.ndarray:
    """float16 bits (uint16) -> float16 values, which the kernels read natively; float32 as is."""
    return s.view(np.float16) if s.dtype == np.uint16 else np.ascontiguousarray(s, np.float32)


class CUDABackend:
    name = "cuda"

    def __init__(self):
        self.cuda = _import_cuda()
        from edgerun.kernels_cuda import linear, lowbit, ops, paged_attention
        self._lin, self._ops, self._attn, self._low = linear, ops, paged_attention, lowbit
        self._weights: dict[int, tuple] = {}     # id(host array) -> (host array, device copy)
        # int8/int4 matmuls with activations quantized to int8 per block of 32, as the CPU backend's
        # default: one token through the dp4a GEMV (the quantization inside it), more tokens through
        # the float GEMM on the int8-rounded activations; off: float32 activations
        self.act_quant = True
        self._q8: dict[int, object] = {}
        self._pools: dict[int, tuple] = {}

    # ---- memory
    def is_device(self, a) -> bool:
        return hasattr(a, "copy_to_host")          # a device array (the simulator has no is_cuda_array)

    def to_device(self, a):
        return a if self.is_device(a) else self.cuda.to_device(np.ascontiguousarray(a))

    @staticmethod
    def to_host(a) -> np.ndarray:
        return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)

    def empty(self, shape, dtype=np.float32):
        return self.cuda.device_array(shape, dtype)

    def zeros(self, shape, dtype=np.float32):
        a = self.cuda.device_array(shape, dtype)
        if a.size:
            self._ops.zero(a)
        return a

    def vector(self, v: np.ndarray | None):
        """A float32 vector (norm weight, bias, inv_freq) on the device, uploaded once."""
        if v is None:
            return None
        key = id(v)
        hit = self._weights.get(key)
        if hit is None or hit[0] is not v:
            hit = self._weights[key] = (v, self.cuda.to_device(np.ascontiguousarray(v, np.float32)))
        return hit[1]

    def upload(self, w) -> DevWeight:
        """A packed container -> DevWeight, uploaded once per container (cached by its first array)."""
        if isinstance(w, DevWeight):
            return w
        key = id(w[0])
        hit = self._weights.get(key)
        if hit is not None and hit[0] is w[0]:
            return hit[1]
        d = self._upload(w)
        self._weights[key] = (w[0], d)
        return d

    def _upload(self, w) -> DevWeight:
        cuda, dummy = self.cuda, self._lin.dummy
        if isinstance(w, Int8Weight):
            q = cuda.to_device(np.ascontiguousarray(w.q))
            words = q.view(np.uint32) if w.q.shape[1] % 16 == 0 else None
            return DevWeight("int8", w.q.shape[0], w.q.shape[1], int(w.group), q,
                             cuda.to_device(_scales(w.scales)), dummy(2), words)
        if isinstance(w, Int4Weight):
            qs = cuda.to_device(np.ascontiguousarray(w.qs))
            words = qs.view(np.uint32) if w.qs.shape[1] % 16 == 0 else None
            mins = cuda.to_device(_scales(w.mins)) if w.mins.size else dummy(2)
            return DevWeight("int4", w.qs.shape[0], w.qs.shape[1] * 2, int(w.group), qs,
                             cuda.to_device(_scales(w.scales)), mins, words)
        if isinstance(w, DenseWeight):
            a = w.w.view(np.float16) if w.dtype == "f16" else w.w
            dw = cuda.to_device(np.ascontiguousarray(a))
            return DevWeight(w.dtype, w.w.shape[0], w.w.shape[1], 1, dw, dw, dummy(2), None)
        if isinstance(w, (TernaryWeight, TernaryB3Weight)):
            kind = "ternary" if isinstance(w, TernaryWeight) else "ternary_b3"
            return DevWeight(kind, w.codes.shape[0], int(w.n), 1, cuda.to_device(np.ascontiguousarray(w.codes)),
                             cuda.to_device(np.ascontiguousarray(w.scales, np.float32)), dummy(2), None)
        if isinstance(w, BinaryWeight):
            return DevWeight("binary", w.bits.shape[0], int(w.n), int(w.group),
                             cuda.to_device(np.ascontiguousarray(w.bits)), cuda.to_device(_scales(w.scales)),
                             dummy(2), None)
        if isinstance(w, Sparse24Weight):
            vals = w.vals.view(np.float16) if w.vals.dtype == np.uint16 else w.vals
            return DevWeight("sparse24", w.vals.shape[0], w.vals.shape[1] * 2, 1,
                             cuda.to_device(np.ascontiguousarray(vals)), cuda.to_device(np.ascontiguousarray(w.meta)),
                             cuda.to_device(np.ascontiguousarray(w.scales, np.float32)) if w.scales.size else dummy(),
                             None)
        raise EdgerunError(f"packed kind {type(w).__name__} is not on the GPU yet")

    def _lowbit(self, x, w: DevWeight, out):
        """out (T, rows) = x (T, cols) @ W.T for the low-bit kinds (kernels_cuda/lowbit.py)."""
        low = self._low
        if w.kind == "ternary":
            low.gemm_ternary(x, w.a, w.b, w.cols, out)
        elif w.kind == "ternary_b3":
            low.gemm_ternary_b3(x, w.a, w.b, w.cols, out)
        elif w.kind == "binary":
            low.gemm_binary(x, w.a, w.b, w.group, w.cols, out)
        else:
            low.gemm_sparse24(x, w.a, w.b, w.c, out)

    # ---- matmuls
    def matmul(self, x, w: DevWeight, out, norm_w=None, eps=0.0, bias=None, res=None, act=0):
        """out = act/bias/res(x [RMS-normed by norm_w] @ W.T), x (T, in) -> out (T, rows) (or (T, rows/2) with
        act on interleaved gate/up rows). T == 1 runs the fused GEMV; T > 1 the tiled GEMM (and a
        separate norm / activation launch)."""
        lin = self._lin
        T = x.shape[0]
        if w.kind in LOWBIT:                     # norm, matmul, then bias / residual / act launches
            if norm_w is not None:
                xn = self.empty(x.shape)
                self._ops.rms_norm(x, norm_w, eps, xn)
                x = xn
            y = self.empty((T, w.rows)) if act or res is not None and res is out else out
            self._lowbit(x, w, y)
            if bias is not None:
                self._ops.add_inplace(y, bias.reshape(1, bias.shape[0]))
            if act == ACT_RELU2:
                self._low.relu2_pairs(y, out)
            elif act:
                self._ops.act_pairs(y, act, out)
            elif res is not None:               # out = y + res, or out (= res) += y
                self._ops.add_inplace(out, res if y is out else y)
            return out
        aq = self.act_quant and w.kind in ("int8", "int4")
        if aq and T == 1 and w.words is not None and lin.gemv_fq8_fits(w.kind, w.cols, w.group):
            fields = (w.words, w.b) if w.kind == "int8" else (w.words, w.b, w.c)
            if lin.launch_gemv_fq8(w.kind, x.reshape(w.cols), fields, w.group, out.reshape(out.shape[1]),
                                   norm_w=norm_w, eps=eps, res=bias if res is None else res.reshape(out.shape[1]),
                                   act=act):       # one launch: x quantized per block of 32 inside, dp4a
                if bias is not None and res is not None:
                    self._ops.add_inplace(out, bias.reshape(1, bias.shape[0]))
                return out
        if aq and T == 1 and w.words is not None and lin.gemv_q8_fits(w.kind, w.cols, w.group):
            q = self._act_q8(w.cols)                       # wide inputs: quantize launch, then dp4a
            lin.launch_quantize_act(x.reshape(w.cols), q, norm_w=norm_w, eps=eps)
            fields = (w.words, w.b) if w.kind == "int8" else (w.words, w.b, w.c)
            lin.launch_gemv_q8(w.kind, q, fields, w.group, out.reshape(out.shape[1]),
                               res=bias if res is None else res.reshape(out.shape[1]), act=act)
            if bias is not None and res is not None:
                self._ops.add_inplace(out, bias.reshape(1, bias.shape[0]))
            return out
        if aq and x.shape[1] % 32 == 0:                   # the float kernels on int8-rounded activations,
            xn = self.empty(x.shape)                       # as the CPU's q8 kernels see them
            if norm_w is not None:
                self._ops.rms_norm(x, norm_w, eps, xn)
                norm_w, x0 = None, xn
            else:
                x0 = x
            lin.launch_fake_quant(x0, xn)
            x = xn
        gemv = T == 1 and (w.words is not None or w.kind in ("f32", "f16", "bf16"))
        if gemv and lin.gemv_fits(w.kind, w.cols, w.group):
            fields = {"int8": (w.words, w.b), "int4": (w.words, w.b, w.c)}.get(w.kind, (w.a,))
            if lin.launch_gemv(w.kind, x.reshape(w.cols), fields, w.group, out.reshape(out.shape[1]), norm_w=norm_w,
                               eps=eps, res=bias if res is None else res.reshape(out.shape[1]), act=act):
                if bias is not None and res is not None:
                    self._ops.add_inplace(out, bias.reshape(1, bias.shape[0]))
                return out
        if norm_w is not None:
            xn = self.empty(x.shape)
            self._ops.rms_norm(x, norm_w, eps, xn)
            x = xn
        if act:
            gu = self.empty((T, w.rows))
            lin.launch_gemm(w.kind, x, w.a, w.b, w.c, w.group, gu, bias=bias)
            self._ops.act_pairs(gu, act, out)
        else:
            lin.launch_gemm(w.kind, x, w.a, w.b, w.c, w.group, out, bias=bias, res=res)
        return out

    def _act_q8(self, n: int):
        if n not in self._q8:
            self._q8[n] = self._lin.ActQ8(n)
        return self._q8[n]

    def linear(self, x, w, out=None):
        """x (T, in) float32 @ W.T -> (T, out) on the device."""
        w = self.upload(w)
        x = self.to_device(np.asarray(x, np.float32) if not self.is_device(x) else x)
        if out is None:
            out = self.empty((x.shape[0], w.rows))
        return self.matmul(x, w, out)

    def embed(self, ids, w, dim: int, mul: float = 1.0):
        w = self.upload(w)
        ids = self.to_device(np.asarray(ids, np.int64) if not self.is_device(ids) else ids)
        out = self.empty((ids.shape[0], dim))
        self._lin.launch_embed(w.kind, ids, w.a, w.b, w.c, w.group, out, mul)
        return out

    # ---- elementwise (device arrays in, device arrays out; in-place ones return their input)
    def rms_norm(self, x, weight, eps):
        x = self.to_device(x)
        out = self.empty(x.shape)
        self._ops.rms_norm(x, self.vector(weight), eps, out)
        return out

    def rms_norm_heads(self, x, weight, eps):
        self._ops.rms_norm_heads(x, self.vector(weight), eps)
        return x

    def rope(self, x, positions, inv_freq, attn_scale):
        self._ops.rope(x, self.to_device(np.asarray(positions, np.int64)), self.vector(inv_freq), attn_scale)
        return x

    def silu_mul(self, gate, up):
        self._ops.silu_mul(gate, up, gate)
        return gate

    def gelu_tanh_mul(self, gate, up):
        self._ops.gelu_tanh_mul(gate, up, gate)
        return gate

    def scale_(self, x, s):
        self._ops.scale_inplace(x, s)
        return x

    def add_(self, x, y):
        self._ops.add_inplace(x, y)
        return x

    # ---- attention over a PagedState whose pools are mirrored on the device
    def device_pools(self, kv):
        """(k pools, v pools) on the device for a PagedKV, made on first use; block copies (forks) follow."""
        hit = self._pools.get(id(kv))
        if hit is not None and hit[0] is kv:
            return hit[1]
        if kv.dtype != "f32":
            raise EdgerunError("int8 KV blocks (kv_dtype='int8') are not on the GPU yet; use the default f32")
        pools = []
        for pool in kv.pools:
            k, v = self.zeros(pool.k.shape), self.zeros(pool.v.shape)
            pools.append((k, v))
            self._follow_copies(pool, k, v)
        self._pools[id(kv)] = (kv, pools)
        return pools

    def _follow_copies(self, pool, k, v):
        from edgerun.kernels_cuda.paged_attention import copy_block_kernel
        host_copy = pool.copy_block

        def copy_block(src, _host=host_copy):
            dst = _host(src)
            copy_block_kernel[(k.shape[0], k.shape[2]), 32](k, v, int(src), int(dst))
            return dst
        pool.copy_block = copy_block

    def device_table(self, state, g: int):
        """The state's block table of group g on the device, uploaded when it changed."""
        cache = state.__dict__.setdefault("_cuda_tables", {})
        host = state.tables[g]
        dev, last = cache.get(g, (None, None))
        if dev is None or last.shape != host.shape or not np.array_equal(last, host):
            dev = self.cuda.to_device(host)
            cache[g] = (dev, host.copy())
        return dev

    def attention(self, q, k, v, state, layer, scale, window=0, softcap=0.0):
        """Store k, v (T, n_kv, d) at the state's length in its (device) paged cache; attend q (T, H, d)."""
        g, i = state.kv.layer_slot[layer]
        kp, vp = self.device_pools(state.kv)[g]
        table = self.device_table(state, g)
        start = state.length
        self._attn.store_kv_paged(self.to_device(k), self.to_device(v), kp[i], vp[i], table, start)
        q = self.to_device(q)
        out = self.empty(q.shape)
        self._attn.launch_attention(q, kp[i], vp[i], table, start, scale, window, softcap, out)
        return out

    # ---- whole models
    def prepare(self, model):
        """The device-resident runner for a model: Llama family and Gemma 3 (runner_cuda.py), Mamba,
        Mamba-2, RWKV and xLSTM (runner_cuda_recurrent.py); other families are refused."""
        from .runner_cuda_recurrent import recurrent_runner_for
        runner = recurrent_runner_for(model, self)
        if runner is not None:
            return runner
        from .runner_cuda import runner_for
        return runner_for(model, self)


_BACKENDS: dict[bool, CUDABackend] = {}


def cuda_backend(act_quant: bool = True) -> CUDABackend:
    """The CUDA ops table, one per act_quant setting (as the CPU's)."""
    if act_quant not in _BACKENDS:
        b = CUDABackend()
        b.act_quant = bool(act_quant)
        _BACKENDS[act_quant] = b
    return _BACKENDS[act_quant]
