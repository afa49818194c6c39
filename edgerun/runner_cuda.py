"""Device-resident forward of the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM) and Gemma 3.

The host model object keeps what it is good at (config, paged-KV block bookkeeping, prefix
cache); this runner keeps every weight, the KV blocks and the activations on the GPU.
A decode step is one embedding launch, then per layer

    qkv  = [norm + fused QKV matmul (+ bias)]            one GEMV launch
    q, k, v -> [QK-norm, RoPE, store k, v in blocks]     one launch
    att  = [paged attention]                             one launch
    x   += [o_proj]          (Gemma: + [post-norm add])  one (two) launches
    act  = [norm + fused gate/up matmul + act(g) * u]    one GEMV launch
    x   += [down_proj]       (Gemma: + [post-norm add])  one (two) launches

and [final norm + head]: 6 launches per layer (8 for Gemma 3) + 2. Only the token id goes in
(as a kernel argument) and the logits come out. Prefill (T > 1) runs the same steps with the
tiled GEMM and separate norm / activation launches.
"""
from __future__ import annotations

import time

import numpy as np

from .backend_cuda import DevWeight
from .errors import EdgerunError
from .packed import DenseWeight, Int4Weight, Int8Weight, TernaryWeight


# ------------------------------------------------------------------ fusing host weights before upload

def _same_layout(ws) -> bool:
    t = type(ws[0])
    if not all(type(w) is t for w in ws):
        return False
    if t is DenseWeight:
        return len({w.dtype for w in ws}) == 1
    if t is TernaryWeight:
        return len({w.n for w in ws}) == 1
    if t not in (Int8Weight, Int4Weight):
        return False
    if len({w.group for w in ws}) != 1 or len({w.scales.dtype for w in ws}) != 1:
        return False
    return t is not Int4Weight or len({w.mins.size > 0 for w in ws}) == 1


def concat_rows(ws):
    """Packed weights of one layout stacked along their output rows (fused QKV); None if layouts differ."""
    if not _same_layout(ws):
        return None
    w0 = ws[0]
    if isinstance(w0, DenseWeight):
        return DenseWeight(np.concatenate([w.w for w in ws]), w0.dtype)
    if isinstance(w0, TernaryWeight):
        return TernaryWeight(np.concatenate([w.codes for w in ws]), np.concatenate([_row_scales(w) for w in ws]), w0.n)
    if isinstance(w0, Int8Weight):
        return Int8Weight(np.concatenate([w.q for w in ws]), np.concatenate([w.scales for w in ws]), w0.group)
    mins = np.concatenate([w.mins for w in ws]) if w0.mins.size else w0.mins
    return Int4Weight(np.concatenate([w.qs for w in ws]), np.concatenate([w.scales for w in ws]), mins, w0.group)


def _row_scales(w: TernaryWeight) -> np.ndarray:
    """A ternary weight's scales one per row (a per-tensor scale repeated), float32."""
    s = np.asarray(w.scales, np.float32)
    return np.full(w.codes.shape[0], s[0], np.float32) if s.shape[0] == 1 else s


def interleave_rows(g, u):
    """Rows g0, u0, g1, u1, ... (fused gate/up: the GEMV's act epilogue reads pairs); None if layouts differ."""
    if not _same_layout([g, u]) or isinstance(g, DenseWeight) and g.w.ndim != 2:
        return None

    def il(a, b):
        return np.ascontiguousarray(np.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:]))
    if isinstance(g, DenseWeight):
        return DenseWeight(il(g.w, u.w), g.dtype)
    if isinstance(g, TernaryWeight):
        return TernaryWeight(il(g.codes, u.codes), il(_row_scales(g), _row_scales(u)), g.n)
    if isinstance(g, Int8Weight):
        return Int8Weight(il(g.q, u.q), il(g.scales, u.scales), g.group)
    mins = il(g.mins, u.mins) if g.mins.size else g.mins
    return Int4Weight(il(g.qs, u.qs), il(g.scales, u.scales), mins, g.group)


# ------------------------------------------------------------------ the runner

class LayerW:
    """One decoder layer's device weights and constants."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class DeviceLlama:
    """Forward of a Llama-family / Gemma 3 decoder on the GPU; the same call contract as llama.Model."""

    PREFILL_CHUNK = 512

    def __init__(self, args, ops, embed: DevWeight, layers: list[LayerW], norm, head: DevWeight, kv,
                 gemma: bool = False, embed_mul: float = 1.0, final_softcap: float | None = None, host=None):
        self.args, self.ops, self.cuda = args, ops, ops.cuda
        self.embed, self.layers, self.norm, self.head = embed, layers, norm, head
        self.kv = kv                       # the host PagedKV (block tables, prefix cache); pools mirrored on device
        self.gemma, self.embed_mul, self.final_softcap = gemma, float(embed_mul), final_softcap
        self.host = host                   # the host model (new_state, kv_options) when built from one
        self.kv_options: dict = host.kv_options if host is not None else {}
        a = args
        self.H, self.KV, self.d = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.eps = np.float32(a.rms_norm_eps)
        self.launches = 0                  # kernel launches issued (decode steps count theirs)
        self.launch_seconds = 0.0          # host time spent issuing them (measured when timing=True)
        self.timing = False
        self._bufs = None

    # -- the llama.Model contract
    @property
    def max_context(self) -> int:
        return self.host.max_context if self.host is not None else self.args.max_position_embeddings

    def new_state(self):
        st = self.host.new_state() if self.host is not None else self.kv.new_state()
        if self.host is not None:
            self.kv = self.host.kv
        self.ops.device_pools(self.kv)
        return st

    def __call__(self, ids: np.ndarray, state, last_only: bool = False) -> np.ndarray:
        if last_only and state.length == 0:
            ids = ids[state.match_prefix(ids.tolist()):]
        c = self.PREFILL_CHUNK
        if ids.shape[0] > c:
            parts = [self._forward(ids[i:i + c], state, last_only) for i in range(0, ids.shape[0], c)]
            return parts[-1] if last_only else np.concatenate(parts)
        return self._forward(ids, state, last_only)

    # -- buffers for one-token steps, made once
    def _decode_bufs(self):
        if self._bufs is None:
            a, e = self.args, self.ops.empty
            qkv_rows = (self.H + 2 * self.KV) * self.d
            self._bufs = dict(x=e((1, a.hidden_size)), qkv=e((1, qkv_rows)), q=e((1, self.H, self.d)),
                              att=e((1, self.H, self.d)), act=e((1, a.intermediate_size)),
                              up=e((1, a.intermediate_size)), tmp=e((1, a.hidden_size)),
                              logits=e((1, self.head.rows)))
        return self._bufs

    def _tables(self, state):
        """The state's block tables in fixed device buffers (a decode plan holds their addresses),
        copied over when they changed."""
        if getattr(self, "_dev_tables", None) is None:
            cap = -(-self.max_context // self.kv.block_size) + 1
            self._dev_tables = [self.cuda.to_device(np.full(cap, -1, np.int32)) for _ in self.kv.pools]
            self._last_tables = [None] * len(self.kv.pools)
        for g, host in enumerate(state.tables):
            n = min(host.shape[0], self._dev_tables[g].shape[0])
            last = self._last_tables[g]
            if last is None or last.shape[0] != n or not np.array_equal(last, host[:n]):
                self._dev_tables[g][:n].copy_to_device(np.ascontiguousarray(host[:n]))
                self._last_tables[g] = host[:n].copy()
        return self._dev_tables

    def _forward(self, ids: np.ndarray, state, last_only: bool) -> np.ndarray:
        T = ids.shape[0]
        state.reserve(T)
        start = state.length
        ops = self.ops
        pools = ops.device_pools(self.kv)
        tables = self._tables(state)
        if T == 1:
            logits = self._decode(int(ids[0]), start, pools, tables)
        else:
            x = ops.empty((T, self.args.hidden_size))
            self._embed(ops.to_device(ids.astype(np.int64)), 0, x)
            for L in self.layers:
                kp, vp = pools[L.g]
                self._layer(L, x, start, kp[L.i], vp[L.i], tables[L.g], None)
            xs = x[T - 1:T] if last_only else x
            out = ops.empty((xs.shape[0], self.head.rows))
            self._mm(xs, self.head, out, norm_w=self.norm)
            logits = out.copy_to_host()
        state.advance(ids.tolist())
        if self.final_softcap:
            cap = self.final_softcap
            logits = (np.tanh(logits / cap) * cap).astype(np.float32)
        return logits

    def _decode(self, tok: int, start: int, pools, tables, copy: bool = True) -> np.ndarray | None:
        """One token: the recorded plan of launches, with the token id and position patched in;
        the logits copied back unless copy is False."""
        plan = self._plan
        if plan is None or self._plan_pools is not pools:
            plan = self._record(pools, tables)
        t0 = time.perf_counter() if self.timing else 0.0
        for p in self._plan_tok:
            p.set("tok", tok)
        for p in self._plan_start:
            p.set("start", start)
        for p in plan:
            p()
        self.launches += len(plan)
        if self.timing:
            self.launch_seconds += time.perf_counter() - t0
        if not copy:
            return None
        b = self._bufs
        b["logits"].copy_to_host(b["logits_host"])
        return np.array(b["logits_host"])

    _plan = _plan_pools = None
    _sample_plan = None

    # -- sampling on the device: only the token id comes back
    def can_sample(self, params) -> bool:
        """Whether the device sampler takes these SamplingParams (temperature / top-k / top-p / greedy;
        the repetition penalty, min-p and Gemma's final soft-cap stay on the host)."""
        return params.repetition_penalty == 1.0 and params.min_p == 0.0 and not self.final_softcap

    def step_sample(self, ids: np.ndarray, state, sampler) -> int | None:
        """Append one token (the recorded decode plan) and draw the next one on the device with the
        Sampler's parameters and its random stream (one uniform a token, as on the host). Returns None,
        without touching the state, when this step can't (several tokens, parameters the device
        sampler does not take). The step's logits stay on the device: ``last_logits()``."""
        if ids.shape[0] != 1 or not self.can_sample(sampler.params):
            return None
        from edgerun.kernels_cuda.sampling import f32_bits, u_bits
        p = sampler.params
        state.reserve(1)
        start = state.length
        pools = self.ops.device_pools(self.kv)
        tables = self._tables(state)
        self._decode(int(ids[0]), start, pools, tables, copy=False)
        sp = self._sample_plan or self._record_sample()
        sp.set("temp", f32_bits(p.temperature))
        sp.set("topk", int(p.top_k))
        sp.set("topp", f32_bits(p.top_p))
        sp.set("u", 0 if p.greedy else u_bits(sampler.rng.random()))
        sp()
        self.launches += 1
        b = self._bufs
        b["tok"].copy_to_host(b["tok_host"])
        state.advance(ids.tolist())
        return int(b["tok_host"][0])

    def last_logits(self) -> np.ndarray:
        """The logits (1, vocab) of the last one-token step, copied from the device."""
        return self._bufs["logits"].copy_to_host()

    def _record_sample(self):
        from edgerun.kernels_cuda._launch import Dyn, recording
        from edgerun.kernels_cuda.sampling import launch_sample
        b = self._decode_bufs()
        b.setdefault("tok", self.cuda.device_array(1, np.int32))
        b.setdefault("tok_host", self.cuda.pinned_array(1, np.int32))
        with recording() as plan:
            launch_sample(b["logits"].reshape(self.head.rows), Dyn("temp"), Dyn("topk"), Dyn("topp"), Dyn("u"), b["tok"])
        self._sample_plan = plan[0]
        return self._sample_plan

    def _record(self, pools, tables):
        from edgerun.kernels_cuda._launch import Dyn, recording
        b = self._decode_bufs()
        b.setdefault("logits_host", self.cuda.pinned_array((1, self.head.rows), np.float32))
        x, start = b["x"], Dyn("start")
        n0 = self.launches
        with recording() as plan:
            self._embed(None, Dyn("tok"), x)
            for L in self.layers:
                kp, vp = pools[L.g]
                self._layer(L, x, start, kp[L.i], vp[L.i], tables[L.g], b)
            self._mm(x, self.head, b["logits"], norm_w=self.norm)
        self.launches = n0
        self._plan, self._plan_pools = plan, pools
        self._plan_tok = [p for p in plan if "tok" in p.dyn or any(getattr(a, "name", "") == "tok" for a in p.args)]
        self._plan_start = [p for p in plan if "start" in p.dyn or any(getattr(a, "name", "") == "start" for a in p.args)]
        return plan

    # -- launches (each counted; timed when self.timing)
    def _launch(self, fn, *a, **kw):
        if self.timing:
            t0 = time.perf_counter()
            fn(*a, **kw)
            self.launch_seconds += time.perf_counter() - t0
        else:
            fn(*a, **kw)
        self.launches += 1

    def _embed(self, ids, tok, x):
        w = self.embed
        self._launch(self.ops._lin.launch_embed, w.kind, ids, w.a, w.b, w.c, w.group, x, self.embed_mul, 0, tok)

    def _mm(self, x, w, out, norm_w=None, bias=None, res=None, act=0):
        self._launch(self.ops.matmul, x, w, out, norm_w=norm_w, eps=self.eps, bias=bias, res=res, act=act)
        if x.shape[0] > 1 and (norm_w is not None or act):
            self.launches += (norm_w is not None) + bool(act)

    def _layer(self, L: LayerW, x, start, kp, vp, table, b):
        ops, T = self.ops, x.shape[0]
        e = ops.empty
        H, KV, d = self.H, self.KV, self.d
        qkv = b["qkv"] if b else e((T, (H + 2 * KV) * d))
        for w, off, bias in L.qkv_parts:
            if len(L.qkv_parts) == 1:
                dst = qkv
            else:
                dst = qkv.reshape(qkv.size)[off:off + w.rows].reshape(1, w.rows) if T == 1 else qkv[:, off:off + w.rows]
            self._mm(x, w, dst, norm_w=L.attn_norm, bias=bias)
        q = b["q"] if b else e((T, H, d))
        self._launch(self._rope_store, qkv, L, start, kp, vp, table, q)
        att = b["att"] if b else e((T, H, d))
        self._launch(ops._attn.launch_attention, q, kp, vp, table, start, L.scale, L.window, L.softcap, att)
        att2 = att.reshape(T, H * d)
        if self.gemma:
            tmp = b["tmp"] if b else e(x.shape)
            self._mm(att2, L.wo, tmp, bias=L.o_bias)
            self._launch(ops._ops.add_rms_norm, x, tmp, L.post_attn_norm, self.eps)
        else:
            self._mm(att2, L.wo, x, norm_w=L.attn_sub_norm, bias=L.o_bias, res=x)
        inter = self.args.intermediate_size
        act = b["act"] if b else e((T, inter))
        if L.gu is not None:
            self._mm(x, L.gu, act, norm_w=L.mlp_norm, act=L.act)
        else:                                   # gate and up of different layouts: two matmuls, one act launch
            u = b["up"] if b else e((T, inter))
            self._mm(x, L.gate, act, norm_w=L.mlp_norm)
            self._mm(x, L.up, u, norm_w=L.mlp_norm)
            fn = ops._ops.silu_mul if L.act == 1 else ops._ops.gelu_tanh_mul
            if L.act == 3:
                raise EdgerunError("BitNet's gate and up projections must share one ternary layout on the GPU")
            self._launch(fn, act, u, act)
        if self.gemma:
            tmp = b["tmp"] if b else e(x.shape)
            self._mm(act, L.wdown, tmp)
            self._launch(ops._ops.add_rms_norm, x, tmp, L.post_ff_norm, self.eps)
        else:
            self._mm(act, L.wdown, x, norm_w=L.ffn_sub_norm, res=x)

    def _rope_store(self, qkv, L, start, kp, vp, table, q):
        from edgerun.kernels_cuda._launch import go
        from edgerun.kernels_cuda.paged_attention import rope_store_kernel
        T = qkv.shape[0]
        go(rope_store_kernel, (T, self.H + self.KV), 32, 0, 0, (qkv, self.H, L.q_norm, L.k_norm, self.eps, start,
                                                              L.inv_freq, np.float32(L.rope_scale), kp, vp, table, q))


# ------------------------------------------------------------------ building a runner from a host model

def runner_for(model, ops) -> DeviceLlama:
    from .models import bitnet, gemma3, llama
    if not isinstance(model, llama.Model) or type(model.layers[0]) not in (llama.Block, gemma3.Block, bitnet.Block) \
            or any(type(L.attn) not in (llama.Attention, gemma3.Attention, bitnet.Attention) for L in model.layers):
        raise EdgerunError(f"{type(model).__module__}.{type(model).__name__} is not on the GPU yet "
                           "(device 'cuda' runs the Llama family, Gemma 3 and BitNet); use --device cpu")
    is_bitnet = isinstance(model.layers[0], bitnet.Block)
    gemma = isinstance(model, gemma3.Model)
    if model.kv_options.get("dtype", "f32") != "f32":
        raise EdgerunError("int8 KV blocks (--kv-int8) are not on the GPU yet")
    model.kv_options.setdefault("max_kv_bytes", min(_full_kv_bytes(model.args), 2 << 30))
    vec = ops.vector
    dummy = ops._lin.dummy
    layers = []
    if model.kv is None:
        model.new_state().release()
    for i, blk in enumerate(model.layers):
        at, mlp = blk.attn, blk.mlp
        fused = concat_rows([at.q, at.k, at.v])
        biases = [at.q_bias, at.k_bias, at.v_bias]
        if fused is not None:
            bias = None
            if any(bb is not None for bb in biases):
                rows = [w[0].shape[0] for w in (at.q, at.k, at.v)]
                bias = np.concatenate([bb if bb is not None else np.zeros(r, np.float32) for bb, r in zip(biases, rows)])
            parts = [(ops.upload(fused), 0, vec(bias))]
        else:
            parts, off = [], 0
            for w, bb in zip((at.q, at.k, at.v), biases):
                dw = ops.upload(w)
                parts.append((dw, off, vec(bb)))
                off += dw.rows
        gu = interleave_rows(mlp.gate, mlp.up)
        g, slot = model.kv.layer_slot[i]
        layers.append(LayerW(
            qkv_parts=parts, q_norm=vec(at.q_norm) if at.q_norm is not None else dummy(),
            k_norm=vec(at.k_norm) if at.k_norm is not None else dummy(), inv_freq=vec(at.inv_freq),
            rope_scale=at.rope_scale, scale=at.scale, window=at.window, softcap=at.softcap,
            wo=ops.upload(at.o), o_bias=vec(at.o_bias),
            gu=ops.upload(gu) if gu is not None else None,
            gate=None if gu is not None else ops.upload(mlp.gate), up=None if gu is not None else ops.upload(mlp.up),
            wdown=ops.upload(mlp.down), act=3 if is_bitnet else 2 if gemma else 1,
            attn_sub_norm=vec(at.sub_norm) if is_bitnet else None,
            ffn_sub_norm=vec(mlp.sub_norm) if is_bitnet else None,
            attn_norm=vec(blk.input_norm if gemma else blk.attn_norm),
            mlp_norm=vec(blk.pre_ff_norm if gemma else blk.mlp_norm),
            post_attn_norm=vec(blk.post_attn_norm) if gemma else None,
            post_ff_norm=vec(blk.post_ff_norm) if gemma else None, g=g, i=slot))
    return DeviceLlama(model.args, ops, ops.upload(model.embed), layers, vec(model.norm), ops.upload(model.head),
                       model.kv, gemma=gemma, embed_mul=float(getattr(model, "embed_scale", 1.0)),
                       final_softcap=model.args.final_logit_softcapping if gemma else None, host=model)


def _full_kv_bytes(a) -> int:
    return 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 4 * a.max_position_embeddings


# ------------------------------------------------------------------ random weights made on the device (benchmarks)

def random_weight(ops, kind: str, rows: int, cols: int, seed: int, std: float = 0.02, group: int = 32) -> DevWeight:
    """A DevWeight of random values with about the given standard deviation, made on the device."""
    from edgerun.kernels_cuda.fill import rand_int, rand_uniform
    e = ops.empty
    if kind == "int8":
        q = rand_int(e((rows, cols), np.int8), -127, 127, seed)
        s = rand_uniform(e((rows, cols // group), np.float16), 0.5 * std / 73, 1.5 * std / 73, seed + 1)
        return DevWeight("int8", rows, cols, group, q, s, ops._lin.dummy(2), q.view(np.uint32))
    if kind == "int4":
        qs = rand_int(e((rows, cols // 2), np.uint8), 0, 255, seed)
        s = rand_uniform(e((rows, cols // group), np.float16), 0.5 * std / 4.6, 1.5 * std / 4.6, seed + 1)
        return DevWeight("int4", rows, cols, group, qs, s, ops._lin.dummy(2), qs.view(np.uint32))
    w = rand_uniform(e((rows, cols), np.float16 if kind == "f16" else np.float32), -1.7 * std, 1.7 * std, seed)
    return DevWeight(kind, rows, cols, 1, w, w, ops._lin.dummy(2), None)


def random_llama(args, ops, kind: str = "int8", group: int = 32, seed: int = 0, max_kv_bytes: int | None = None):
    """A DeviceLlama with random weights made on the GPU (for benchmarks of the Llama shape)."""
    from .cache.paged import PagedKV
    from .models.rope import inv_freq
    a = args
    H, KV, d, hid, inter = a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.hidden_size, a.intermediate_size
    ones = ops.to_device(np.ones(hid, np.float32))
    f, scale = inv_freq(d, a.rope_theta, a.rope_scaling)
    fdev = ops.to_device(f)
    dummy = ops._lin.dummy
    layers = []
    for i in range(a.num_hidden_layers):
        s = seed + 100 * i
        layers.append(LayerW(
            qkv_parts=[(random_weight(ops, kind, (H + 2 * KV) * d, hid, s + 1, group=group), 0, None)],
            q_norm=dummy(), k_norm=dummy(), inv_freq=fdev, rope_scale=scale, scale=d ** -0.5, window=0, softcap=0.0,
            wo=random_weight(ops, kind, hid, H * d, s + 3, group=group), o_bias=None,
            gu=random_weight(ops, kind, 2 * inter, hid, s + 5, group=group), gate=None, up=None,
            wdown=random_weight(ops, kind, hid, inter, s + 7, group=group), act=1,
            attn_norm=ones, mlp_norm=ones, post_attn_norm=None, post_ff_norm=None, g=0, i=i,
            attn_sub_norm=None, ffn_sub_norm=None))
    kv = PagedKV([0] * a.num_hidden_layers, KV, d, a.max_position_embeddings, max_kv_bytes=max_kv_bytes)
    embed = random_weight(ops, kind, a.vocab_size, hid, seed + 11, std=1.0, group=group)
    head = random_weight(ops, kind, a.vocab_size, hid, seed + 13, group=group)
    return DeviceLlama(a, ops, embed, layers, ones, head, kv)
