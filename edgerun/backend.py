"""Device selection and the ops table models call.

Models never import a kernel module: they call ``ops.linear(x, w)``, ``ops.rms_norm``…
and the backend picks the kernel by packed kind (and, later, device).
"""
from __future__ import annotations

import numpy as np

from .errors import EdgerunError, InputError
from .packed import DenseWeight, Int4Weight, Int8Weight, Sparse24Weight


class CPUBackend:
    name = "cpu"

    def __init__(self, act_quant: bool = True):
        from edgerun.kernels_numba import linear, ops, paged_attention
        self.act_quant = act_quant
        self._lin, self._ops, self._attn = linear, ops, paged_attention

    # ---- matmuls
    @staticmethod
    def _kernel_args(w) -> tuple[str, tuple]:
        """A packed weight -> (kind suffix of its kernels, the fields they take)."""
        if isinstance(w, Int4Weight):
            return "int4", (w.qs, w.scales, w.mins, w.group)
        if isinstance(w, Int8Weight):
            return "int8", (w.q, w.scales, w.group)
        if isinstance(w, DenseWeight):
            return w.dtype, (w.w,)
        return _lowbit_args(w)

    def _kernel(self, name: str):
        """A gemm_/embed_ kernel by name: kernels_numba/linear.py, else lowbit.py (ternary, binary, sparse)."""
        f = getattr(self._lin, name, None)
        if f is None:
            from edgerun.kernels_numba import lowbit
            f = getattr(lowbit, name)
        return f

    def linear(self, x: np.ndarray, w, out: np.ndarray | None = None) -> np.ndarray:
        """x (T, in) float32 @ W.T -> (T, out), by gemm_<kind>. Against int8/int4 weights,
        gemm_<kind>_q8 (activations quantized to int8 per block of 32, integer SIMD dots) unless
        the backend was made with act_quant=False."""
        kind, fields = self._kernel_args(w)
        if self.act_quant and kind in ("int8", "int4"):
            kind += "_q8"
        if out is None:
            out = np.empty((x.shape[0], fields[0].shape[0]), np.float32)
        self._kernel(f"gemm_{kind}")(x, *fields, out)
        return out

    def embed(self, ids: np.ndarray, w, dim: int) -> np.ndarray:
        """Rows ids of an embedding table -> (len(ids), dim) float32, by embed_<kind>."""
        kind, fields = self._kernel_args(w)
        out = np.empty((ids.shape[0], dim), np.float32)
        self._kernel(f"embed_{kind}")(ids, *fields, out)
        return out

    # ---- a whole decoder layer for one token (kernels_numba/fused.py)
    def prepare_decoder_layer(self, *, norms, eps, q, k, v, o, gate, up, down, biases, qk_norms,
                              inv_freq, rope_scale, n_heads, n_kv, head_dim, scale, window, softcap):
        """A Llama-style layer (pre-norm attention + SwiGLU MLP) -> a plan for decoder_layer_step,
        with its scratch allocated once; None when it can't run fused (act_quant off, or a weight
        kind or shape without a row kernel: then the model goes op by op)."""
        from edgerun.kernels_numba import fused
        from edgerun.kernels_numba.simd import BLOCK
        if not self.act_quant:
            return None
        mats = [fused.rows_of(w) for w in (q, k, v, o, gate, up, down)]
        if any(m is None for m in mats):
            return None
        hidden, nq = norms[0].shape[0], n_heads * head_dim
        inter = (down.q.shape[1] if isinstance(down, Int8Weight) else
                 down.qs.shape[1] * 2 if isinstance(down, Int4Weight) else
                 down.vals.shape[1] * 2 if isinstance(down, Sparse24Weight) else
                 down.n if hasattr(down, "n") else down.w.shape[1])
        if any(m is None for m in mats) or hidden % BLOCK or nq % BLOCK or inter % BLOCK:
            return None
        per_token = any(isinstance(m, (fused.TernaryRows, fused.Sparse24Rows)) for m in mats)
        quad = any(isinstance(m, fused.Int4G32Rows) for m in mats)
        block = any(isinstance(m, (Int8Weight, fused.Int4Rows, fused.Int4G32Rows)) for m in mats)

        def act(n):
            return fused.activations(n, per_token, quad, block)

        def ro(a):
            """A read-only view: norms, biases and placeholders alike (mapped from the file or made
            here), so that layers with and without biases or q/k norms share one compiled
            signature (Numba types writability; mixed flags cost a compile of ~10 s each)."""
            v = (a if a is not None else np.zeros(0, np.float32)).view()
            v.flags.writeable = False
            return v

        blocks = fused.has_blocks(mats, nq, n_kv * head_dim, hidden, inter)
        if blocks:          # int4 g32 rows repacked 4 to a tile for row_block (a copy in memory)
            mats = fused.tiled(mats)
        positions = np.zeros(1, np.int64)
        # the call's arguments around the per-step KV cache, built once: decoder_layer_step only
        # splices in the cache and the position
        head = (tuple(ro(a) for a in norms), tuple(ro(a) for a in qk_norms), np.float32(eps), *mats,
                tuple(ro(b) for b in biases), positions, ro(inv_freq), float(rope_scale))
        tail = (np.float32(scale), int(window), np.float32(softcap),
                np.empty((1, n_heads, head_dim), np.float32), np.empty((1, n_kv, head_dim), np.float32),
                np.empty((1, n_kv, head_dim), np.float32), np.empty((1, n_heads, head_dim), np.float32),
                np.empty(hidden, np.float32), act(hidden), act(nq), act(inter), np.empty(inter, np.float32),
                blocks)
        return _LayerPlan(fused.llama_layer_decode, positions, head, tail)

    def decoder_layer_step(self, plan, x, state, layer):
        """x (1, hidden) through one layer in one compiled call (in place); the token's K and V go
        to state's cache at position state.length (reserved by the caller)."""
        kp, vp, ks, vs, table = state.layer(layer)
        plan.positions[0] = state.length
        args = (x[0], *plan.head, kp, vp, ks, vs, kp.dtype == np.int8, table, *plan.tail)
        if plan.entry is None or plan.entry[0] is not kp.dtype:
            plan.fn(*args)
            # later calls go straight to the compiled entry point of this signature: the dispatcher
            # re-derives the 30-odd argument types on every call, ~7 us a layer (benchmarks/dispatch.py)
            from numba import typeof
            plan.entry = kp.dtype, plan.fn.overloads[tuple(typeof(a) for a in args)].entry_point
        else:
            plan.entry[1](*args)
        return x

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
        kp, vp, ks, vs, table = state.layer(layer)
        start = state.length
        quantized = kp.dtype == np.int8
        if quantized:
            self._attn.store_kv_paged_int8(k, v, kp, vp, ks, vs, table, start)
        else:
            self._attn.store_kv_paged(k, v, kp, vp, table, start)
        out = np.empty_like(q)
        self._attn.paged_attention(q, kp, vp, ks, vs, quantized, table, start, np.float32(scale), int(window),
                                   np.float32(softcap), out)
        return out

    # ---- RWKV (kernels_numba/wkv.py); WKV states are updated in place
    @property
    def _wkv(self):
        from edgerun.kernels_numba import wkv
        return wkv

    def layer_norm(self, x, weight, bias, eps, out=None):
        out = np.empty_like(x) if out is None else out
        self._wkv.layer_norm(x, weight, bias, float(eps), out)
        return out

    def group_norm(self, x, groups, weight, bias, eps):
        """RWKV ln_x: LayerNorm over each of ``groups`` equal slices of the rows of x (T, C)."""
        out = np.empty_like(x)
        self._wkv.group_norm(x, int(groups), weight, bias, float(eps), out)
        return out

    def shift_mix(self, x, prev, mix, out=None):
        """Token shift + lerp: (M, T, C) with out[m, t] = x[t] + (x[t-1] - x[t]) * mix[m], x[-1] = prev."""
        out = np.empty((mix.shape[0], *x.shape), np.float32) if out is None else out
        self._wkv.shift_mix(x, prev, mix, out)
        return out

    def shift_mix_dyn(self, x, prev, mix, dyn):
        """RWKV-6 lerps with data-dependent amounts: out[m, t] = x[t] + (x[t-1] - x[t]) * (mix[m] + dyn[m, t])."""
        out = np.empty((mix.shape[0], *x.shape), np.float32)
        self._wkv.shift_mix_dyn(x, prev, mix, np.ascontiguousarray(dyn), out)
        return out

    # below this many multiply-adds a WKV call runs on one thread (waking threads costs more)
    WKV_PARALLEL_WORK = 1 << 20

    def wkv4(self, k, v, u, w, aa, bb, pp):
        out = np.empty_like(k)
        f = self._wkv.wkv4 if k.size * 16 >= self.WKV_PARALLEL_WORK else self._wkv.wkv4_serial
        f(k, v, u, w, aa, bb, pp, out)
        return out

    def wkv6(self, r, k, v, w, u, s):
        """RWKV-5/6 (w: per-step decay (T, C)); s (H, N, N) updated in place."""
        out = np.empty_like(r)
        f = self._wkv.wkv6 if r.size * s.shape[1] >= self.WKV_PARALLEL_WORK else self._wkv.wkv6_serial
        f(r, k, v, np.ascontiguousarray(w), u, s, out)
        return out

    def wkv7(self, r, w, k, v, a, b, s):
        out = np.empty_like(r)
        f = self._wkv.wkv7 if r.size * s.shape[1] >= self.WKV_PARALLEL_WORK else self._wkv.wkv7_serial
        f(r, w, k, v, a, b, s, out)
        return out

    def v7_tail(self, r, wl, k, v, al, vl, vfirst, g, p, eps, s, out=None):
        """RWKV-7 time mixing from the projections to the output matrix's input, fused (see
        kernels_numba/wkv.py v7_tail); p = (w0, a0, v0, k_k, k_a, r_k, lnx_w, lnx_b). k, v updated in place."""
        out = np.empty_like(r) if out is None else out
        f = self._wkv.v7_tail if r.size * s.shape[1] >= self.WKV_PARALLEL_WORK else self._wkv.v7_tail_serial
        f(r, wl, k, v, al, vl, vfirst, g, *p, float(eps), s, out)
        return out

    def v7_lora(self, mixed, m, out=None):
        """RWKV-7's four low-rank projections (decay, iclr, value residual, gate) of shift_mix's
        output mixed (6, T, C) in one call -> (4, T, C); m = (w1, w2t, a1, a2t, v1, v2t, g1, g2t)
        float32 (D, C), see kernels_numba/wkv.py v7_lora. Own kernels, not BLAS: BLAS brings its
        own threads, which spin against ours."""
        out = np.empty((4, *mixed.shape[1:]), np.float32) if out is None else out
        work = mixed.shape[1] * mixed.shape[2] * sum(x.shape[0] for x in m)
        if work >= self.WKV_PARALLEL_WORK:
            self._wkv.v7_lora(mixed, *m, out)
        else:
            self._wkv.v7_lora_span(mixed, 0, mixed.shape[1], *m, out)
        return out

    def v6_mix(self, x, prev, p):
        """RWKV-6's token shift with data-dependent lerps, and its per-step decay, in one call
        (kernels_numba/wkv.py v6_mix): (5, T, C) = w, xk, xv, xr, xg;
        p = (maa_x, maa, maa_w1, maa_w2, decay, decay_w1, decay_w2t)."""
        out = np.empty((5, *x.shape), np.float32)
        work = x.size * (p[2].shape[0] + p[5].shape[0]) * 2
        if work >= self.WKV_PARALLEL_WORK:
            self._wkv.v6_mix(x, prev, *p, out)
        else:
            self._wkv.v6_mix_span(x, prev, *p, 0, x.shape[0], out)
        return out

    def group_norm_silu(self, x, gate, groups, weight, bias, eps):
        """RWKV-5.2/6 ln_x and its silu gate in one pass: group_norm(x) * gate * sigmoid(gate)."""
        out = np.empty_like(x)
        self._wkv.group_norm_silu(x, gate, int(groups), weight, bias, float(eps), out)
        return out

    def relu_square_(self, x):
        """x = max(x, 0)^2 in place (RWKV's channel-mix key)."""
        self._wkv.relu_square_(x)
        return x

    def mul_sigmoid_(self, x, r):
        """x *= sigmoid(r) in place (RWKV v4-v6 channel-mix gate)."""
        self._wkv.mul_sigmoid_(x, r)
        return x

    def prepare_rwkv_layer(self, version: str, *, ln, eps, att, ffn_mix, mats):
        """An RWKV-6/7 layer -> a plan for rwkv_layer_step (one compiled call a layer per decode
        token: kernels_numba/wkv.py rwkv7_layer_decode / rwkv6_layer_decode), its scratch allocated
        once; None when the layer can't go fused (act_quant off, a matrix not int8 or int4 with
        groups of 32): then the model goes op by op.
        ln = (ln1 w, b, ln2 w, b); ffn_mix (1 or 2, C): the channel mix's lerps;
        "7": att = (mix (6, C), lora (8), tail (8), lnx_eps), mats = (r, k, v, o, ffn key, ffn value);
        "6": att = (mix6 (7), u, lnx_w, lnx_b, heads, lnx_eps), mats = (r, k, v, g, o, ffn key,
        ffn receptance, ffn value)."""
        from edgerun.kernels_numba import fused
        if not self.act_quant:
            return None
        rows = [fused.rows_of(w) for w in mats]
        if not all(isinstance(r, (Int8Weight, fused.Int4G32Rows)) for r in rows):
            return None
        C, F = ln[0].shape[0], rows[-1].q.shape[1] if isinstance(rows[-1], Int8Weight) else rows[-1].qs.shape[1] * 2

        def act(n, consumer):            # quad-order copy only for an int4 consumer
            return fused.activations(n, False, isinstance(consumer, fused.Int4G32Rows))

        f32, ln = np.float32, tuple(ln)
        if version == "7":
            mix, lora, tail, lnx_eps = att
            wr, wk, wv, wo, wfk, wfv = rows
            p = (ln, float(eps), mix, tuple(lora), tuple(tail), float(lnx_eps), ffn_mix)
            sc = (np.empty((1, C), f32), np.empty((6, 1, C), f32), np.empty((3, 1, C), f32), np.empty((4, 1, C), f32),
                  np.empty((1, C), f32), np.empty((1, 1, C), f32), np.empty(F, f32), np.zeros((0, 0), f32),
                  act(C, wr), act(C, wk), act(C, wv), act(C, wo), act(C, wfk), act(F, wfv))
            return _LayerPlan(self._wkv.rwkv7_layer_decode, None, (p, *rows), sc)
        mix6, u, lnx_w, lnx_b, heads, lnx_eps = att
        wr, wk, wv, wg, wo, wfk, wfr, wfv = rows
        p = (ln, float(eps), tuple(mix6), u, lnx_w, lnx_b, int(heads), float(lnx_eps), ffn_mix)
        sc = (np.empty((1, C), f32), np.empty((5, 1, C), f32), np.empty((4, 1, C), f32), np.empty((1, C), f32),
              np.empty((1, C), f32), np.empty((2, 1, C), f32), np.empty(F, f32), np.empty(C, f32),
              act(C, wr), act(C, wk), act(C, wv), act(C, wg), act(C, wo), act(C, wfk), act(C, wfr), act(F, wfv))
        return _LayerPlan(self._wkv.rwkv6_layer_decode, None, (p, *rows), sc)

    def rwkv_layer_step(self, plan, x, state, layer, vfirst):
        """x (1, C) through one RWKV layer in one compiled call (in place), with the layer's state;
        vfirst (1, C): RWKV-7's value of layer 0, written there by layer 0 (unused by v6)."""
        s, ap, fp = state["wkv"][layer], state["att_x"][layer], state["ffn_x"][layer]
        args = (x, s, ap, fp, vfirst, layer == 0, *plan.head, plan.tail)
        if plan.entry is None:
            plan.fn(*args)
            # later calls go straight to the compiled entry point (see decoder_layer_step)
            from numba import typeof
            plan.entry = plan.fn.overloads[tuple(typeof(a) for a in args)].entry_point
        else:
            plan.entry(*args)
        return x


    # ---- state-space models (kernels_numba/ssm.py): states are updated in place; with ``out``
    # given nothing is allocated, so a decode loop runs in constant memory
    @property
    def _ssm(self):
        from edgerun.kernels_numba import ssm
        return ssm

    def rms_norm_into(self, x, weight, eps, out):
        """rms_norm writing into out (T, d)."""
        self._ops.rms_norm(x, weight, np.float32(eps), out)
        return out

    def causal_conv1d(self, x, conv_state, weight, bias, out=None, silu=True):
        """Depthwise causal conv over x (T, C) continuing conv_state (K-1, C) (updated); weight (K, C)."""
        out = np.empty(x.shape, np.float32) if out is None else out
        fn = self._ssm.causal_conv1d if x.shape[0] < 8 else self._ssm.causal_conv1d_parallel
        fn(x, conv_state, weight, bias if bias is not None else _EMPTY, bool(silu), out)
        return out

    def selective_scan(self, x, dt, A, B, C, D, z, dt_bias, ssm_state, out=None, ws=None):
        """Mamba-1: x, dt (raw, before bias and softplus), z (T, d_inner); A (d_state, d_inner);
        B, C (T, d_state); D, dt_bias (d_inner,); ssm_state (d_state, d_inner) updated.
        -> (C.h + D*x) * silu(z), (T, d_inner). ws: (2, d_inner) scratch for the one-token path."""
        out = np.empty(x.shape, np.float32) if out is None else out
        if x.shape[0] == 1:
            ws = np.empty((2, x.shape[1]), np.float32) if ws is None else ws
            self._ssm.selective_scan(x, dt, A, B, C, D, z, dt_bias, ssm_state, ws, out)
        else:
            self._ssm.selective_scan_parallel(x, dt, A, B, C, D, z, dt_bias, ssm_state, out)
        return out

    def rms_norm_segments_(self, x, bounds, eps):
        """In place, weightless RMSNorm over column segments [bounds[i], bounds[i+1]) of each row."""
        self._ssm.rms_norm_segments(x, bounds, np.float32(eps))
        return x

    def ssd(self, xbc, dt, A, D, dt_bias, ssm_state, n_groups, chunk_size, dt_limit=(0.0, np.inf), out=None):
        """Mamba-2: xbc (T, H*P + 2*G*N) = x | B | C after the conv; dt (T, H) raw; A, D, dt_bias (H,);
        ssm_state (H, P, N) updated. -> C.h + D*x (T, H*P), ungated. One token: the recurrence
        step; more: the chunked SSD algorithm."""
        H, P, _ = ssm_state.shape
        out = np.empty((xbc.shape[0], H * P), np.float32) if out is None else out
        lo, hi = np.float32(dt_limit[0]), np.float32(dt_limit[1])
        if xbc.shape[0] == 1:
            self._ssm.ssd_step(xbc, dt, A, D, dt_bias, ssm_state, int(n_groups), lo, hi, out)
        else:
            self._ssm.ssd_chunked(xbc, dt, A, D, dt_bias, ssm_state, int(n_groups), int(chunk_size), lo, hi, out)
        return out

    def gated_rms_norm(self, y, z, weight, group_size, eps, out=None):
        """Mamba-2's norm: weight * RMSNorm over groups of group_size columns of y * silu(z)."""
        out = np.empty(y.shape, np.float32) if out is None else out
        fn = self._ssm.gated_rms_norm_serial if y.shape[0] < 8 else self._ssm.gated_rms_norm
        fn(y, z, weight, int(group_size), np.float32(eps), out)
        return out

    # ---- xLSTM (kernels_numba/xlstm.py): states updated in place; with ``out`` (and ``ws``)
    # given nothing is allocated
    @property
    def _xlstm(self):
        from edgerun.kernels_numba import xlstm
        return xlstm

    def mlstm(self, q, k, v, ig, fg, ib, fb, C, n, m, norm_w, *, cap=0.0, eps=1e-6, norm_eps=1e-6,
              chunk_size=64, out=None):
        """mLSTM over T tokens: q, k (T, H*d_qk), v (T, H*d_v), ig, fg (T, H) raw gate pre-activations
        (biases ib, fb (H,) and soft-cap ``cap`` applied inside); C (H, d_qk, d_v), n (H, d_qk), m (H,)
        updated. -> per-head LayerNorm(h) * norm_w, (T, H*d_v). One token: the recurrent step;
        more: the chunkwise-parallel form in chunks of chunk_size."""
        out = np.empty(v.shape, np.float32) if out is None else out
        a = (q, k, v, ig, fg, ib, fb, np.float32(cap), C, n, m, np.float32(eps), norm_w, np.float32(norm_eps))
        if q.shape[0] == 1:
            self._xlstm.mlstm_step(*a, out)
        else:
            self._xlstm.mlstm_chunkwise(*a, int(chunk_size), out)
        return out

    def slstm(self, wx, R, b, state, norm_w, norm_eps, out=None, ws=None):
        """sLSTM over T tokens: wx (T, 4*D) gate inputs (i | f | z | o); R (heads, 4, d, d); b (4*D,);
        state (4, D) = y, c, n, m updated. -> per-head LayerNorm(y) * norm_w, (T, D)."""
        out = np.empty((wx.shape[0], state.shape[1]), np.float32) if out is None else out
        ws = np.empty((4, R.shape[2]), np.float32) if ws is None else ws
        self._xlstm.slstm(wx, R, b, state, norm_w, np.float32(norm_eps), ws, out)
        return out

    def small_linear(self, x, w, out=None):
        """x @ W.T on one thread for a few-row float32 weight (the gate projections: a parallel
        region costs more than their work); any other weight goes to linear."""
        if getattr(w, "dtype", None) != "f32" or not isinstance(getattr(w, "w", None), np.ndarray):
            return self.linear(x, w, out)
        out = np.empty((x.shape[0], w.w.shape[0]), np.float32) if out is None else out
        self._xlstm.small_gemm(x, w.w, out)
        return out

    def headwise_linear(self, x, w, out=None):
        """Block-diagonal projection x (T, nb*i) by w (nb, o, i) -> (T, nb*o)."""
        out = np.empty((x.shape[0], w.shape[0] * w.shape[1]), np.float32) if out is None else out
        self._xlstm.headwise_linear(x, w, out)
        return out

    def silu_mul_into(self, gate, up, out):
        """out = silu(gate) * up on one thread (the one-token FFN: waking threads costs more)."""
        self._xlstm.silu_mul(gate, up, out)
        return out

    def sigmoid_mul_(self, h, o):
        self._xlstm.sigmoid_mul(h, o)
        return h

    def skip_silu_gate_(self, h, skip, xc, z):
        """h = (h + skip * xc) * silu(z), in place."""
        self._xlstm.skip_silu_gate(h, skip, xc, z)
        return h

    def gelu_mul(self, gate, up, out=None):
        """Exact (erf) GELU(gate) * up."""
        out = np.empty(gate.shape, np.float32) if out is None else out
        self._xlstm.gelu_mul(gate, up, out)
        return out

    def softcap_(self, x, cap):
        if cap and cap > 0:
            self._xlstm.softcap_(x, np.float32(cap))
        return x

    def layer_norm_into(self, x, weight, bias, eps, out):
        """LayerNorm writing into out (T, d)."""
        self._wkv.layer_norm(x, weight, bias, float(eps), out)
        return out


_EMPTY = np.zeros(0, np.float32)


class _LayerPlan:
    """CPUBackend.prepare_decoder_layer's result: the kernel, the arguments fixed at load and the
    compiled entry point once known."""
    __slots__ = ("fn", "positions", "head", "tail", "entry")

    def __init__(self, fn, positions, head, tail):
        self.fn, self.positions, self.head, self.tail, self.entry = fn, positions, head, tail, None


def _lowbit_args(w) -> tuple[str, tuple]:
    """Ternary, binary and sparse kinds: kernels in kernels_numba/lowbit.py, whose functions
    CPUBackend._kernel finds as gemm_<kind> / embed_<kind>."""
    from . import packed as P
    if isinstance(w, (P.TernaryWeight, P.TernaryB3Weight)):
        return P.kind_of(w), (w.codes, w.scales, w.n)
    if isinstance(w, P.BinaryWeight):
        return "binary", (w.bits, w.scales, w.group, w.n)
    if isinstance(w, P.Sparse24Weight):
        return "sparse24", (w.vals, w.meta, w.scales)
    if isinstance(w, P.CsrWeight):
        return "csr", (w.scales, w.row_ptr, w.cols, w.vals, w.n)
    raise EdgerunError(f"no CPU kernel for packed weight {type(w).__name__}")


_BACKENDS: dict[tuple, object] = {}


def get_backend(device: str = "cpu", act_quant: bool = True):
    """The ops table for a device. act_quant=False keeps decode activations in float32 against
    int8/int4 weights (slower; logits then equal a float reference to float tolerance)."""
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}: choose cpu or cuda")
    if device == "cuda":
        from .backend_cuda import cuda_backend      # numba-cuda is imported only here (the `cuda` extra)
        return cuda_backend(act_quant)
    if (device, act_quant) not in _BACKENDS:
        _BACKENDS[device, act_quant] = CPUBackend(act_quant)
    return _BACKENDS[device, act_quant]
