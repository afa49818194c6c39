"""Device-resident forward of the recurrent families: Mamba / FalconMamba, Mamba-2, RWKV v4-v7,
xLSTM (transformers' xLSTMForCausalLM) and NX-AI's mixed mLSTM/sLSTM xLSTMLMModel.

The host model object keeps its config and weights' containers; this runner uploads every weight
once, keeps the recurrent state on the GPU (``DeviceState``: the host RecurrentState's contract,
with device arrays) and mirrors the host model's forward with kernels_cuda launches. Only the
token ids go in and the logits come out. Norms fold into the next matmul where the model has an
RMSNorm before it (one fused GEMV), residual adds into the matmul that produces them.

One-token steps run from preallocated buffers, so the launches of a step are recorded once per
state (kernels_cuda/_launch.py: compiled once, arguments marshalled once, then raw cuLaunchKernel
calls) and replayed with the token id patched in. Prefill (T > 1) launches the same kernels
directly, in chunks of PREFILL_CHUNK tokens; each recurrence kernel walks its chunk inside
one launch.
"""
from __future__ import annotations

import time

import numpy as np

from .cache import RecurrentState
from .cache.recurrent import run_in_chunks
from .errors import InputError
from .packed import DenseWeight
from .runner_cuda import concat_rows, interleave_rows


# ------------------------------------------------------------------ the state on the device

class DeviceState(RecurrentState):
    """A RecurrentState whose arrays live on the GPU: fork, save / restore, checkpoints and
    rollback work as on the host (fork and checkpoints copy on the device)."""

    def __init__(self, spec: dict, n_layers: int, ops, model_hash: str = ""):
        self.ops = ops
        super().__init__(spec, n_layers, model_hash)

    def _zeros(self, shape):
        return self.ops.zeros(shape)

    def _blank(self) -> "DeviceState":
        return DeviceState(self.spec, self.n_layers, self.ops, self.model_hash)

    @staticmethod
    def _copy(dst, src) -> None:
        dst.copy_to_device(src)

    def _fill0(self, a) -> None:
        self.ops._ops.zero(a)

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * 4 for a in self.arrays.values())

    def to_host(self) -> RecurrentState:
        h = RecurrentState(self.spec, self.n_layers, self.model_hash)
        h.length = self.length
        for k, a in self.arrays.items():
            h.arrays[k][...] = a.copy_to_host()
        return h

    def save(self, path) -> None:
        self.to_host().save(path)

    def restore(self, path) -> None:
        h = RecurrentState(self.spec, self.n_layers, self.model_hash)
        h.restore(path)
        for k, a in self.arrays.items():
            a.copy_to_device(np.ascontiguousarray(h.arrays[k]))
        self.length = h.length
        self._ring_pos = [-1] * len(self._ring)


# ------------------------------------------------------------------ shared runner machinery

def _dense_t(a) -> DenseWeight | object:
    """A float32 LoRA matrix the host keeps as NumPy (in, out) -> a DenseWeight (out, in); packed ones as they are."""
    if isinstance(a, np.ndarray):
        return DenseWeight(np.ascontiguousarray(np.asarray(a, np.float32).T), "f32")
    return a


class DeviceRecurrent:
    """Shared by the families: buffers, launches, the chunked call contract and the decode plan."""

    PREFILL_CHUNK = 512
    MAX_PLANS = 4                      # decode plans kept (one per state; recording one costs a few ms)

    def __init__(self, host, ops):
        self.host, self.ops, self.cuda = host, ops, ops.cuda
        self.args = host.args
        self._bufs: dict = {}
        self._plans: dict = {}
        self.use_plan = True
        self.launches = 0                  # kernel launches issued (prefill and decode)
        self.timing = False
        self.launch_seconds = 0.0

    # -- the model contract (what edgerun.api.LLM calls)
    @property
    def max_context(self) -> int:
        return self.host.max_context

    def new_state(self) -> DeviceState:
        h = self.host.new_state()
        return DeviceState(h.spec, h.n_layers, self.ops, h.model_hash)

    def __call__(self, ids: np.ndarray, state, last_only: bool = False) -> np.ndarray:
        """ids (T,) int64 appended to state -> logits (T, vocab) float32, or (1, vocab) if last_only."""
        if not isinstance(state, DeviceState):
            raise InputError("this model runs on the GPU: use a state from its new_state()")
        return run_in_chunks(self._run, np.asarray(ids, np.int64), state, last_only, self.PREFILL_CHUNK)

    def _run(self, ids, state, last_only):
        T = ids.shape[0]
        if T == 1 and self.use_plan:
            logits = self._decode(int(ids[0]), state)
        else:
            logits = self.forward(ids, None, state, last_only).copy_to_host()
        state.length += T
        return logits

    def _decode(self, tok: int, state) -> np.ndarray:
        from edgerun.kernels_cuda._launch import Dyn, recording
        hit = self._plans.pop(id(state), None)
        if hit is None or hit[0] is not state:
            n0 = self.launches
            with recording() as plan:
                out = self.forward(None, Dyn("tok"), state, False)
            self.launches = n0                             # recorded, not launched
            hit = (state, plan, [p for p in plan if "tok" in p.dyn
                                 or any(getattr(a, "name", "") == "tok" for a in p.args)], out)
        self._plans[id(state)] = hit                       # most recent last; a plan holds its state:
        while len(self._plans) > self.MAX_PLANS:           # keep a few, so finished states can be freed
            self._plans.pop(next(iter(self._plans)))
        _, plan, tok_launches, out = hit
        t0 = time.perf_counter() if self.timing else 0.0
        for p in tok_launches:
            p.set("tok", tok)
        for p in plan:
            p()
        self.launches += len(plan)
        if self.timing:
            self.launch_seconds += time.perf_counter() - t0
        host = self._bufs.get("logits_host")
        if host is None or host.shape != out.shape:
            host = self._bufs["logits_host"] = self.cuda.pinned_array(out.shape, np.float32)
        out.copy_to_host(host)
        return np.array(host)

    # -- buffers: one-token steps reuse named buffers (a recorded plan holds their addresses)
    def buf(self, name: str, T: int, *shape):
        if T != 1:
            return self.ops.empty((T, *shape))
        key = (name, shape)
        b = self._bufs.get(key)
        if b is None:
            b = self._bufs[key] = self.ops.empty((1, *shape))
        return b

    def buf3(self, name: str, M: int, T: int, C: int):
        if T != 1:
            return self.ops.empty((M, T, C))
        key = (name, M, C)
        b = self._bufs.get(key)
        if b is None:
            b = self._bufs[key] = self.ops.empty((M, 1, C))
        return b

    # -- weights
    def w(self, container):
        return None if container is None else self.ops.upload(container)

    def v(self, a):
        return None if a is None else self.ops.vector(np.asarray(a, np.float32))

    def empty_vec(self):
        return self.ops._lin.dummy()

    # -- launches
    def count(self, n: int = 1):
        self.launches += n

    def embed(self, ids, tok, w, dim: int, T: int):
        x = self.buf("x", T, dim)
        ids_dev = None if ids is None else self.ops.to_device(ids.astype(np.int64))
        self.ops._lin.launch_embed(w.kind, ids_dev, w.a, w.b, w.c, w.group, x, 1.0, 0, 0 if tok is None else tok)
        self.count()
        return x

    def mm(self, x, w, out, norm_w=None, eps=0.0, bias=None, res=None):
        self.ops.matmul(x, w, out, norm_w=norm_w, eps=eps, bias=bias, res=res)
        self.count(1 + (x.shape[0] > 1 and norm_w is not None) + (bias is not None and res is not None))
        return out

    def lin(self, name, x, w, norm_w=None, eps=0.0, bias=None):
        """out = [norm](x) @ W.T [+ bias] into the named buffer."""
        return self.mm(x, w, self.buf(name, x.shape[0], w.rows), norm_w=norm_w, eps=eps, bias=bias)

    def _split(self, x, name, parts, norm_w, eps, widths):
        """[norm](x) times one fused weight (or its parts, one matmul each) -> column views of the given widths."""
        T = x.shape[0]
        out = self.buf(name, T, sum(widths))
        off = 0
        for w in parts:
            self.mm(x, w, self.cols(out, off, off + w.rows) if len(parts) > 1 else out, norm_w=norm_w, eps=eps)
            off += w.rows
        views, off = [], 0
        for n in widths:
            views.append(out[:, off:off + n])
            off += n
        return views

    @staticmethod
    def cols(a, lo: int, hi: int):
        """Columns lo:hi of a (T, n) activation; one token: as a contiguous (1, hi - lo) row, which the GEMV reads."""
        if a.shape[0] == 1:
            return a.reshape(a.size)[lo:hi].reshape(1, hi - lo)
        return a[:, lo:hi]

    def head(self, x, last_only: bool, norm_w=None, eps=0.0, ln=None):
        """Logits of the (last) token(s): RMSNorm folded into the head's matmul, or a LayerNorm (ln = (w, b, eps)) first."""
        T = x.shape[0]
        xs = x[T - 1:T] if last_only else x
        n = xs.shape[0]
        if ln is not None:
            from edgerun.kernels_cuda import wkv
            xn = self.buf("head_in", n, xs.shape[1])
            wkv.layer_norm(xs, ln[0], ln[1], ln[2], xn)
            self.count()
            xs = xn
        return self.mm(xs, self.head_w, self.buf("logits", n, self.head_w.rows), norm_w=norm_w, eps=eps)

    def forward(self, ids, tok, state, last_only):
        """ids (T,) host int64 (tok: the one-token id, a plan's Dyn, when ids is None) -> device logits."""
        raise NotImplementedError


# ------------------------------------------------------------------ Mamba-1 / FalconMamba and Mamba-2

class DeviceMamba(DeviceRecurrent):
    def __init__(self, host, ops):
        super().__init__(host, ops)
        from .models import mamba2
        self.v2 = isinstance(host, mamba2.Model)
        a = self.args
        self.embed_w, self.head_w = self.w(host.embed), self.w(host.head)
        self.norm_f = self.v(host.norm_f)
        self.layers = []
        for blk in host.layers:
            m = blk.mixer
            L = dict(norm=self.v(blk.norm), in_proj=self.w(m.in_proj), out_proj=self.w(m.out_proj),
                     in_bias=self.v(m.in_bias), out_bias=self.v(m.out_bias), conv_w=self.v(m.conv_w),
                     conv_b=self.v(m.conv_b) if m.conv_b is not None else self.empty_vec(),
                     A=self.v(m.A), D=self.v(m.D), dt_bias=self.v(m.dt_bias))
            if self.v2:
                L["gnorm"] = self.v(m.norm)
            else:
                L.update(x_proj=self.w(m.x_proj), dt_proj=self.w(m.dt_proj),
                         bounds=ops.to_device(np.asarray(m.bounds, np.int64)))
            self.layers.append(L)

    def forward(self, ids, tok, state, last_only):
        from edgerun.kernels_cuda import ssm
        a = self.args
        T = 1 if ids is None else ids.shape[0]
        x = self.embed(ids, tok, self.embed_w, a.hidden_size, T)
        eps = a.layer_norm_epsilon
        for i, L in enumerate(self.layers):
            conv_state, h = state["conv"][i], state["ssm"][i]
            if self.v2:
                d, cd, G = a.d_inner, a.conv_dim, a.n_groups
                zxbcdt = self.lin("zxbcdt", x, L["in_proj"], norm_w=L["norm"], eps=eps, bias=L["in_bias"])
                xbc = self.buf("xbc", T, cd)
                ssm.causal_conv1d(zxbcdt[:, d:d + cd], conv_state, L["conv_w"], L["conv_b"], True, xbc)
                y = self.buf("y", T, d)
                lo, hi = a.time_step_limit
                ssm.ssd_scan(xbc, zxbcdt[:, d + cd:], L["A"], L["D"], L["dt_bias"], h, G, lo, hi, y)
                yn = self.buf("yn", T, d)
                ssm.gated_rms_norm(y, zxbcdt[:, :d], L["gnorm"], d // G, eps, yn)
                self.count(3)
            else:
                d, R, N = a.intermediate_size, a.time_step_rank, a.state_size
                xz = self.lin("xz", x, L["in_proj"], norm_w=L["norm"], eps=eps, bias=L["in_bias"])
                xc = self.buf("xc", T, d)
                ssm.causal_conv1d(xz[:, :d], conv_state, L["conv_w"], L["conv_b"], True, xc)
                x_dbl = self.lin("x_dbl", xc, L["x_proj"])
                if a.falcon:
                    ssm.rms_norm_segments(x_dbl, L["bounds"], a.mixer_rms_eps)
                    self.count()
                dt = self.lin("dt", self.cols(x_dbl, 0, R), L["dt_proj"])
                yn = self.buf("y", T, d)
                ssm.selective_scan(xc, dt, L["A"], x_dbl[:, R:R + N], x_dbl[:, R + N:], L["D"], xz[:, d:],
                                   L["dt_bias"], h, None, yn)
                self.count(2)
            self.mm(yn, L["out_proj"], x, bias=L["out_bias"], res=x)
        return self.head(x, last_only, norm_w=self.norm_f, eps=eps)


# ------------------------------------------------------------------ RWKV v4 - v7

class DeviceRWKV(DeviceRecurrent):
    def __init__(self, host, ops):
        super().__init__(host, ops)
        a = self.args
        self.ver = a.version
        v, w = self.v, self.w
        self.embed_w, self.head_w = w(host.emb), w(host.head)
        self.ln0 = (v(host.ln0[0]), v(host.ln0[1]))
        self.ln_out = (v(host.ln_out[0]), v(host.ln_out[1]))
        self.layers = []
        for blk in host.layers:
            t, f = blk.att, blk.ffn
            L = dict(ln1=(v(blk.ln1[0]), v(blk.ln1[1])), ln2=(v(blk.ln2[0]), v(blk.ln2[1])),
                     r=w(t.r), k=w(t.k), v=w(t.v), o=w(t.o), g=w(t.g),
                     fk=w(f.k), fv=w(f.v), fr=w(f.r), fmix=v(f.mix))
            if self.ver in ("4", "5", "5.1", "5.2"):
                L["mix"] = v(t.mix)
                L["u"] = v(t.u)
                L["w"] = v(t.w if self.ver == "4" else np.asarray(t.w, np.float32).reshape(1, -1))
            elif self.ver == "6":
                D = t.maa_w2.shape[1]
                L.update(u=v(t.u), maa_x=v(np.asarray(t.maa_x).reshape(1, -1)), maa=v(t.maa),
                         maa_w1=w(_dense_t(t.maa_w1)), D=D,
                         maa_w2=[w(DenseWeight(np.ascontiguousarray(np.asarray(t.maa_w2[m], np.float32).T), "f32"))
                                 for m in range(t.maa_w2.shape[0])],
                         decay=v(t.decay), decay_w1=w(_dense_t(t.decay_w1)), decay_w2=w(_dense_t(t.decay_w2)))
            elif self.ver == "7":
                L.update(mix=v(t.mix), tail=[v(p) for p in t.tail_params],
                         **{n: w(_dense_t(getattr(t, n))) for n in ("w1", "w2", "a1", "a2", "g1", "g2")},
                         v1=w(_dense_t(t.v1)) if t.v1 is not None else None,
                         v2=w(_dense_t(t.v2)) if t.v2 is not None else None)
            if self.ver != "4":
                L["lnx"] = (v(t.lnx_w), v(t.lnx_b))
            self.layers.append(L)

    def ln(self, name, x, p):
        from edgerun.kernels_cuda import wkv
        out = self.buf(name, x.shape[0], x.shape[1])
        wkv.layer_norm(x, p[0], p[1], self.args.layer_norm_epsilon, out)
        self.count()
        return out

    def forward(self, ids, tok, state, last_only):
        from edgerun.kernels_cuda import wkv
        a = self.args
        C = a.hidden_size
        T = 1 if ids is None else ids.shape[0]
        e = self.embed(ids, tok, self.embed_w, C, T)
        x = self.ln("x0", e, self.ln0)
        v_first = None
        for i, L in enumerate(self.layers):
            xx = self.ln("xx", x, L["ln1"])
            v_first = self._time_mix(i, L, xx, x, state, v_first, T)
            wkv.copy_row(xx, T - 1, state["att_x"][i])
            xx = self.ln("xx", x, L["ln2"])
            mixed = self.buf3("fmixed", L["fmix"].shape[0], T, C)
            wkv.shift_mix(xx, state["ffn_x"][i], L["fmix"], mixed)
            wkv.copy_row(xx, T - 1, state["ffn_x"][i])
            k = self.lin("fk", mixed[0], L["fk"])
            wkv.ew(k, None, wkv.EW_RELU_SQ)
            self.count(3)
            if L["fr"] is None:                                  # v7: no receptance gate
                self.mm(k, L["fv"], x, res=x)
            else:
                out = self.lin("fout", k, L["fv"])
                wkv.ew(out, self.lin("frr", mixed[1], L["fr"]), wkv.EW_SIGMOID_MUL)
                self.ops._ops.add_inplace(x, out)
                self.count(2)
        return self.head(x, last_only, ln=(*self.ln_out, a.layer_norm_epsilon))

    def _time_mix(self, i, L, xx, x, state, v_first, T):
        """x += the time mix of xx (ln1 output); returns v_first (v7)."""
        from edgerun.kernels_cuda import wkv
        a, ver = self.args, self.ver
        C, prev = a.hidden_size, state["att_x"][i]
        if ver == "6":
            base = self.buf3("base", 1, T, C)
            wkv.shift_mix(xx, prev, L["maa_x"], base)
            lora = self.lin("lora", base[0], L["maa_w1"])
            wkv.ew(lora, None, wkv.EW_TANH)
            D = L["D"]
            dyn = self.buf3("dyn", 5, T, C)
            for m in range(5):
                self.mm(self.cols(lora, m * D, (m + 1) * D), L["maa_w2"][m], dyn[m])
            mixed = self.buf3("mixed", 5, T, C)
            wkv.shift_mix_dyn(xx, prev, L["maa"], dyn, mixed)            # w, k, v, r, g
            self.count(3)
            r, k, v = self.lin("r", mixed[3], L["r"]), self.lin("k", mixed[1], L["k"]), self.lin("v", mixed[2], L["v"])
            g = self.lin("g", mixed[4], L["g"])
            d1 = self.lin("d1", mixed[0], L["decay_w1"])
            wkv.ew(d1, None, wkv.EW_TANH)
            w = self.lin("wdec", d1, L["decay_w2"], bias=L["decay"])
            wkv.ew(w, None, wkv.EW_DECAY)
            y = self.buf("y", T, C)
            wkv.wkv6(r, k, v, w, L["u"], state["wkv"][i], y)
            yn = self.buf("yn", T, C)
            wkv.group_norm(y, a.n_heads, L["lnx"][0], L["lnx"][1], a.lnx_eps, yn)
            wkv.ew(yn, g, wkv.EW_SILU_MUL)
            self.count(5)
            self.mm(yn, L["o"], x, res=x)
            return v_first
        if ver == "7":
            mixed = self.buf3("mixed", 6, T, C)
            wkv.shift_mix(xx, prev, L["mix"], mixed)                     # r, w, k, v, a, g
            r = self.lin("r", mixed[0], L["r"])
            wl = self.lin("w1", mixed[1], L["w1"])
            wkv.ew(wl, None, wkv.EW_TANH)
            wl = self.lin("wl", wl, L["w2"])
            k = self.lin("k", mixed[2], L["k"])
            v = self.lin("vfirst" if v_first is None else "v", mixed[3], L["v"])
            al = self.lin("al", self.lin("a1", mixed[4], L["a1"]), L["a2"])
            g1 = self.lin("g1", mixed[5], L["g1"])
            wkv.ew(g1, None, wkv.EW_SIGMOID)
            g = self.lin("g", g1, L["g2"])
            self.count(3)
            if v_first is None:
                vl = vfirst = self.ops._lin.dummy(2)
            else:
                vl, vfirst = self.lin("vl", self.lin("v1", mixed[3], L["v1"]), L["v2"]), v_first
            y = self.buf("y", T, C)
            wkv.v7_tail(r, wl, k, v, al, vl, vfirst, g, *L["tail"], a.lnx_eps, state["wkv"][i], y)
            self.count()
            self.mm(y, L["o"], x, res=x)
            return v if v_first is None else v_first
        M = L["mix"].shape[0]
        mixed = self.buf3("mixed", M, T, C)
        wkv.shift_mix(xx, prev, L["mix"], mixed)                         # r, k, v(, g)
        self.count()
        r, k, v = self.lin("r", mixed[0], L["r"]), self.lin("k", mixed[1], L["k"]), self.lin("v", mixed[2], L["v"])
        y = self.buf("y", T, k.shape[1])
        if ver == "4":
            wkv.wkv4(k, v, L["u"], L["w"], state["aa"][i], state["bb"][i], state["pp"][i], y)
            wkv.ew(y, r, wkv.EW_SIGMOID_MUL)
            self.count(2)
            self.mm(y, L["o"], x, res=x)
            return v_first
        wkv.wkv6(r, k, v, L["w"], L["u"], state["wkv"][i], y)
        yn = self.buf("yn", T, C)
        wkv.group_norm(y, a.n_heads, L["lnx"][0], L["lnx"][1], a.lnx_eps, yn)
        self.count(2)
        if L["g"] is not None:
            wkv.ew(yn, self.lin("g", mixed[3], L["g"]), wkv.EW_SILU_MUL)
            self.count()
        self.mm(yn, L["o"], x, res=x)
        return v_first


# ------------------------------------------------------------------ xLSTM (transformers' xLSTM-7B layout)

class DeviceXLSTM(DeviceRecurrent):
    def __init__(self, host, ops):
        super().__init__(host, ops)
        v, w = self.v, self.w
        self.embed_w, self.head_w = w(host.embed), w(host.head)
        self.out_norm = v(host.out_norm)
        self.layers = []
        for b in host.layers:
            # q, k, v, o (and the two gate rows) in one matmul each where their layouts agree; gate and up
            # interleaved so that the GEMV's epilogue applies silu(gate) * up (runner_cuda's helpers)
            qkvo, gates, gu = concat_rows([b.q, b.k, b.v, b.o]), concat_rows([b.ig, b.fg]), interleave_rows(b.up_gate, b.up)
            self.layers.append(dict(
                norm_mlstm=v(b.norm_mlstm), norm_ffn=v(b.norm_ffn), ib=v(b.ib), fb=v(b.fb), mh_norm=v(b.mh_norm),
                parts=[w(qkvo)] if qkvo is not None else [w(x) for x in (b.q, b.k, b.v, b.o)],
                gates=[w(gates)] if gates is not None else [w(b.ig), w(b.fg)],
                gu=w(gu) if gu is not None else None, up_gate=w(b.up_gate), up=w(b.up),
                out_proj=w(b.out_proj), down=w(b.down)))

    def forward(self, ids, tok, state, last_only):
        from edgerun.kernels_cuda import xlstm
        a = self.args
        T = 1 if ids is None else ids.shape[0]
        x = self.embed(ids, tok, self.embed_w, a.hidden_size, T)
        ne = a.norm_eps
        qk, vd, NH = a.qk_dim, a.v_dim, a.num_heads
        for i, L in enumerate(self.layers):
            nm = L["norm_mlstm"]
            q, k, v, o = self._split(x, "qkvo", L["parts"], nm, ne, (qk, qk, vd, vd))
            ig, fg = self._split(x, "gates", L["gates"], nm, ne, (NH, NH))
            y = self.buf("y", T, vd)
            xlstm.mlstm_step(q, k, v, ig, fg, L["ib"], L["fb"], a.gate_soft_cap, state["C"][i], state["n"][i],
                             state["m"][i], a.eps, L["mh_norm"], ne, y)
            xlstm.sigmoid_mul(y, o)
            self.count(2)
            self.mm(y, L["out_proj"], x, res=x)
            F = L["up"].rows
            act = self.buf("act", T, F)
            if L["gu"] is not None:
                self.ops.matmul(x, L["gu"], act, norm_w=L["norm_ffn"], eps=ne, act=1)
                self.count(1 if T == 1 else 3)
            else:
                gate = self.lin("gate", x, L["up_gate"], L["norm_ffn"], ne)
                xlstm.silu_mul(gate, self.lin("up", x, L["up"], L["norm_ffn"], ne), act)
                self.count()
            self.mm(act, L["down"], x, res=x)
        logits = self.head(x, last_only, norm_w=self.out_norm, eps=ne)
        if a.output_logit_soft_cap and a.output_logit_soft_cap > 0:
            xlstm.softcap_(logits, a.output_logit_soft_cap)
            self.count()
        return logits


# ------------------------------------------------------------------ NX-AI's xLSTMLMModel (mixed mLSTM / sLSTM)

class DeviceXLSTMLM(DeviceRecurrent):
    def __init__(self, host, ops):
        super().__init__(host, ops)
        from .models import xlstm_lm
        v, w = self.v, self.w
        self.embed_w, self.head_w = w(host.embed), w(host.head)
        self.post_norm = v(host.post_norm)
        self.zero = v(host.zero)
        self.blocks = []
        for b in host.layers:
            if isinstance(b, xlstm_lm.MLSTMBlock):
                self.blocks.append(("m", dict(
                    j=b.j, inner=b.inner, norm=v(b.norm), up=w(b.up), down=w(b.down), up_b=v(b.up_b),
                    down_b=v(b.down_b), wq=v(b.wq), wk=v(b.wk), wv=v(b.wv), bq=v(b.bq), bk=v(b.bk), bv=v(b.bv),
                    conv_w=v(b.conv_w), conv_b=v(b.conv_b) if b.conv_b is not None else self.empty_vec(),
                    ig=w(b.ig), fg=w(b.fg), ib=v(b.ib), fb=v(b.fb), outnorm=v(b.outnorm), skip=v(b.skip))))
            else:
                blk = dict(j=b.j, norm=v(b.norm), gates=[v(g) for g in b.gates], R=v(b.R), b=v(b.b), gn=v(b.gn),
                           conv_w=v(b.conv_w) if b.conv_w is not None else None,
                           conv_b=v(b.conv_b) if b.conv_b is not None else self.empty_vec(), ffn=b.ffn)
                if b.ffn:
                    blk.update(ffn_norm=v(b.ffn_norm), f_up=w(b.f_up), f_down=w(b.f_down), f_up_b=v(b.f_up_b),
                               f_down_b=v(b.f_down_b), F=b.F)
                self.blocks.append(("s", blk))

    def ln(self, name, x, weight, eps):
        from edgerun.kernels_cuda import wkv
        out = self.buf(name, x.shape[0], x.shape[1])
        wkv.layer_norm(x, weight, self.zero, eps, out)
        self.count()
        return out

    def forward(self, ids, tok, state, last_only):
        from edgerun.kernels_cuda import ssm, xlstm
        from .models.xlstm_lm import LN_EPS
        a = self.args
        E = a.embedding_dim
        T = 1 if ids is None else ids.shape[0]
        x = self.embed(ids, tok, self.embed_w, E, T)
        for kind, B in self.blocks:
            j = B["j"]
            h = self.ln("h", x, B["norm"], LN_EPS)
            if kind == "m":
                d = B["inner"]
                xz = self.lin("xz", h, B["up"], bias=B["up_b"])
                xc = self.buf("xc", T, d)
                ssm.causal_conv1d(xz[:, :d], state["conv_m"][0][j], B["conv_w"], B["conv_b"], True, xc)
                qkv = self.buf("qkv", T, 3 * d)
                xlstm.headwise_linear(xc, B["wq"], qkv[:, :d], B["bq"])
                xlstm.headwise_linear(xc, B["wk"], qkv[:, d:2 * d], B["bk"])
                xlstm.headwise_linear(xz[:, :d], B["wv"], qkv[:, 2 * d:], B["bv"])
                ig, fg = self.lin("ig", qkv, B["ig"]), self.lin("fg", qkv, B["fg"])
                y = self.buf("y", T, d)
                xlstm.mlstm_step(qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:], ig, fg, B["ib"], B["fb"], 0.0,
                                 state["C"][0][j], state["n"][0][j], state["m"][0][j], 1e-6, B["outnorm"], LN_EPS, y)
                xlstm.skip_silu_gate(y, B["skip"], xc, xz[:, d:])
                self.count(6)
                self.mm(y, B["down"], x, bias=B["down_b"], res=x)
                continue
            if B["conv_w"] is not None:
                xc = self.buf("xs", T, E)
                ssm.causal_conv1d(h, state["conv_s"][0][j], B["conv_w"], B["conv_b"], True, xc)
                self.count()
            else:
                xc = h
            wx = self.buf("wx", T, 4 * E)
            for g, src in enumerate((xc, xc, h, h)):
                xlstm.headwise_linear(src, B["gates"][g], wx[:, g * E:(g + 1) * E])
            y = self.buf("ys", T, E)
            xlstm.slstm(wx, B["R"], B["b"], state["slstm"][0][j], B["gn"], LN_EPS, None, y)
            self.ops._ops.add_inplace(x, y)
            self.count(6)
            if not B["ffn"]:
                continue
            h = self.ln("h", x, B["ffn_norm"], LN_EPS)
            gu = self.lin("gu", h, B["f_up"], bias=B["f_up_b"])
            F = B["F"]
            g = self.buf("g", T, F)
            (xlstm.gelu_mul if a.ffn_act_fn == "gelu" else xlstm.silu_mul)(gu[:, :F], gu[:, F:], g)
            self.count()
            self.mm(g, B["f_down"], x, bias=B["f_down_b"], res=x)
        if self.post_norm is not None:
            return self.head(x, last_only, ln=(self.post_norm, self.zero, LN_EPS))
        return self.head(x, last_only)


# ------------------------------------------------------------------ choosing a runner

def recurrent_runner_for(model, ops):
    """The device runner for a recurrent host model, or None if the model is not recurrent."""
    from .models import mamba, rwkv, xlstm, xlstm_lm
    if isinstance(model, mamba.Backbone):
        return DeviceMamba(model, ops)
    if isinstance(model, rwkv.Model):
        return DeviceRWKV(model, ops)
    if isinstance(model, xlstm.Model):
        return DeviceXLSTM(model, ops)
    if isinstance(model, xlstm_lm.Model):
        return DeviceXLSTMLM(model, ops)
    return None

