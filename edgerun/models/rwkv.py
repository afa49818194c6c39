"""RWKV v4, v5 (5.0 / 5.1 / 5.2), v6 and v7, chosen by config["version"].

    x = ln0(emb[ids])
    per layer:  x = x + time_mix(ln1(x), state)      token shift, r/k/v(/g/w/a) projections, WKV, (ln_x,) output
                x = x + channel_mix(ln2(x), state)   token shift, relu(k)^2, value (gated by sigmoid(r) before v7)
    logits = head(ln_out(x))

Tensor names are BlinkDL's (blocks.{i}.att.key.weight ...), with the converter's canonical forms
(converters/rwkv.py): mixing vectors and time_* flattened to (C,) / (H,); time_first of v5/v6
stored as the real bonus ``time_faaaa``; LoRA matrices (v6 time_maa_w1, time_decay_w1/w2, v7
w1/w2, a1/a2, v1/v2, g1/g2) stored as linear weights (out, in); v6 time_maa_w2 as (5, D, C).
Decays are turned into their per-step form here, in float64, once at load.

State (RecurrentState, per layer): att_x and ffn_x (the last ln1 / ln2 output, for the token
shift) and the WKV state: aa, bb, pp (C,) for v4; wkv (H, N, N) for v5-v7.

Kernels (backend ops, kernels_numba/wkv.py): shift_mix (token shift + every lerp of a layer in one
pass), wkv4 / wkv6 (v5 and v6) / v7_tail (v7's whole time mixing between its projections, WKV
included), layer_norm, group_norm (ln_x). Each takes the whole chunk of tokens: prefill and decode
are the same call. Small float32 LoRA matrices go through BLAS. Decode (one token) of v6/v7 with
int8 / int4 matrices goes one compiled call per layer (ops.rwkv_layer_step: the same kernels
called from compiled code, about 15 fewer crossings from Python per layer).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..cache import RecurrentState
from ..cache.recurrent import run_in_chunks

ARCHITECTURES = ("RwkvForCausalLM", "Rwkv5ForCausalLM", "Rwkv6ForCausalLM", "Rwkv7ForCausalLM")
MODEL_TYPES = ("rwkv", "rwkv4", "rwkv5", "rwkv6", "rwkv7")
# LoRA matrices of v6/v7 are small and sensitive: they stay float32 whatever --quant says
KEEP_FLOAT: tuple[str, ...] = ("att.w1", "att.w2", "att.a1", "att.a2", "att.v1", "att.v2", "att.g1",
                               "att.g2", "time_maa_w", "time_decay_w")
VERSIONS = ("4", "5", "5.1", "5.2", "6", "7")
ARCH_OF_VERSION = {"4": "RwkvForCausalLM", "5": "Rwkv5ForCausalLM", "5.1": "Rwkv5ForCausalLM",
                   "5.2": "Rwkv5ForCausalLM", "6": "Rwkv6ForCausalLM", "7": "Rwkv7ForCausalLM"}


@dataclass
class ModelArgs:
    version: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    head_size: int = 0                    # 0 for v4
    attention_hidden_size: int | None = None   # v4 may use an attention width != hidden_size
    layer_norm_epsilon: float = 1e-5
    lnx_eps: float = 64e-5                # ln_x GroupNorm epsilon (BlinkDL 64e-5; rwkv.cpp v5 1e-5)
    max_context: int = 1 << 30            # a recurrent model has no context limit; this bounds positions only

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in d.items() if k in known and v is not None})
        args.version = str(args.version)
        if args.version not in VERSIONS:
            raise ValueError(f"unknown RWKV version {args.version!r} (known: {', '.join(VERSIONS)})")
        return args

    @property
    def n_heads(self) -> int:
        return self.hidden_size // self.head_size if self.head_size else 0


def _own(x) -> np.ndarray:
    """A writable float32 C copy of a (small) parameter: kernels compile once per argument type, and
    a read-only view of the file mapping would be another type than the arrays made here."""
    return np.array(x, np.float32, order="C")


def _sigmoid(x):
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


def _lora(w):
    """A small float32 LoRA matrix (out, in) as a NumPy (in, out) array: BLAS beats waking the
    kernel threads for matrices this small. Quantized ones stay packed for ops.linear."""
    if getattr(w, "dtype", None) == "f32" and hasattr(w, "w"):
        return np.ascontiguousarray(np.asarray(w.w).T)
    return w


def _mm(ops, x, w):
    return x @ w if isinstance(w, np.ndarray) else ops.linear(x, w)


class TimeMix:
    scratch = None                       # Model sets its _Scratch

    def __init__(self, args: ModelArgs, w: dict, i: int, ops):
        self.args, self.ops, self.i = args, ops, i
        p = f"blocks.{i}.att."
        v = args.version
        self.r, self.k, self.v, self.o = (w[p + n + ".weight"] for n in ("receptance", "key", "value", "output"))
        self.g = w.get(p + "gate.weight")
        C = args.hidden_size
        if v in ("4", "5", "5.1", "5.2"):
            names = ["time_mix_r", "time_mix_k", "time_mix_v"] + (["time_mix_g"] if self.g is not None else [])
            # BlinkDL: x*mix + sx*(1-mix) == x + (sx-x)*(1-mix)
            self.mix = np.stack([1.0 - w[p + n] for n in names]).astype(np.float32)      # (M, C)
        if v == "4":
            self.u = _own(w[p + "time_first"])
            self.w = (-np.exp(w[p + "time_decay"].astype(np.float64))).astype(np.float32)
        elif v in ("5", "5.1", "5.2"):
            N = args.head_size
            rep = 1 if w[p + "time_decay"].size == C else N      # 5.0/5.1: one decay per head
            self.u = np.repeat(np.asarray(w[p + "time_faaaa"], np.float32), rep)
            self.w = np.exp(-np.exp(np.repeat(w[p + "time_decay"].astype(np.float64), rep))).astype(np.float32)
        elif v == "6":
            self.u = _own(w[p + "time_faaaa"])
            self.maa_x = _own(w[p + "time_maa_x"])
            self.maa = np.stack([w[p + f"time_maa_{n}"] for n in "wkvrg"]).astype(np.float32)   # (5, C)
            self.maa_w1, self.maa_w2 = _lora(w[p + "time_maa_w1"]), w[p + "time_maa_w2"]  # (5D, C) ; (5, D, C)
            self.decay = _own(w[p + "time_decay"])
            self.decay_w1, self.decay_w2 = _lora(w[p + "time_decay_w1"]), _lora(w[p + "time_decay_w2"])
            self.mix6 = _v6_mix_params(w, p, self.maa_x, self.maa, self.decay)
        elif v == "7":
            self.mix = np.stack([w[p + "x_" + n] for n in "rwkvag"]).astype(np.float32)  # (6, C)
            self.w0, self.a0, self.k_k, self.k_a, self.r_k = (w[p + n] for n in ("w0", "a0", "k_k", "k_a", "r_k"))
            # packed containers, used only when --rules quantized them (else self.lora below)
            self.w1, self.w2, self.a1, self.a2, self.g1, self.g2 = (w[p + n] for n in ("w1", "w2", "a1", "a2", "g1", "g2"))
            self.v0 = w.get(p + "v0")
            self.v1, self.v2 = (w.get(p + n) for n in ("v1", "v2"))
        if v != "4":
            self.lnx_w, self.lnx_b = _own(w[p + "ln_x.weight"]), _own(w[p + "ln_x.bias"])
        if v == "7":
            self.tail_params = tuple(_own(x) for x in (
                self.w0, self.a0, self.v0 if self.v0 is not None else np.zeros(C, np.float32),
                self.k_k, self.k_a, self.r_k, self.lnx_w, self.lnx_b))
            self.lora = _v7_lora_params(w, p, C, with_v=i > 0)

    def __call__(self, xx, state: RecurrentState, v_first):
        """xx: ln1 output (T, C). Returns (the block's time-mix output (T, C), v_first)."""
        a, ops, i = self.args, self.ops, self.i
        prev = state["att_x"][i]
        ver = a.version
        if ver == "6":
            out = self._v6(xx, prev, state)
        elif ver == "7":
            out, v_first = self._v7(xx, prev, state, v_first)
        else:
            mixed = ops.shift_mix(xx, prev, self.mix)                     # (M, T, C): r, k, v(, g)
            r = ops.linear(mixed[0], self.r)
            k = ops.linear(mixed[1], self.k)
            v = ops.linear(mixed[2], self.v)
            if ver == "4":
                y = ops.wkv4(k, v, self.u, self.w, state["aa"][i], state["bb"][i], state["pp"][i])
                out = ops.linear(_sigmoid(r) * y, self.o)
            else:
                T = xx.shape[0]
                w = np.empty((T, a.hidden_size), np.float32)
                w[:] = self.w
                y = ops.wkv6(r, k, v, w, self.u, state["wkv"][i])
                y = ops.group_norm(y, a.n_heads, self.lnx_w, self.lnx_b, a.lnx_eps)
                if self.g is not None:
                    g = ops.linear(mixed[3], self.g)
                    y *= g * _sigmoid(g)                                   # silu gate
                out = ops.linear(y, self.o)
        prev[...] = xx[-1]
        return out, v_first

    def _v6(self, xx, prev, state):
        a, ops = self.args, self.ops
        if self.mix6 is not None:                 # float32 LoRA: shift, lerps and decay in one kernel
            w, kx, vx, rx, gx = ops.v6_mix(xx, prev, self.mix6)
            r = ops.linear(rx, self.r)
            k = ops.linear(kx, self.k)
            v = ops.linear(vx, self.v)
            g = ops.linear(gx, self.g)
            y = ops.wkv6(r, k, v, w, self.u, state["wkv"][self.i])
            return ops.linear(ops.group_norm_silu(y, g, a.n_heads, self.lnx_w, self.lnx_b, a.lnx_eps), self.o)
        T, C = xx.shape
        D = self.maa_w2.shape[1]
        base = ops.shift_mix(xx, prev, self.maa_x[None])[0]                    # xx + (x[t-1] - xx) * maa_x
        lora = np.tanh(_mm(ops, base, self.maa_w1)).reshape(T, 5, D)           # (T, 5, D)
        dyn = np.matmul(lora.transpose(1, 0, 2), self.maa_w2)                 # (5, T, C)
        wx, kx, vx, rx, gx = ops.shift_mix_dyn(xx, prev, self.maa, dyn)        # (5, T, C)
        r = ops.linear(rx, self.r)
        k = ops.linear(kx, self.k)
        v = ops.linear(vx, self.v)
        g = ops.linear(gx, self.g)
        d = self.decay + _mm(ops, np.tanh(_mm(ops, wx, self.decay_w1)), self.decay_w2)
        w = np.exp(-np.exp(d))
        y = ops.wkv6(r, k, v, w, self.u, state["wkv"][self.i])
        y = ops.group_norm(y, a.n_heads, self.lnx_w, self.lnx_b, a.lnx_eps)
        y *= g * _sigmoid(g)
        return ops.linear(y, self.o)

    def _v7(self, xx, prev, state, v_first):
        a, ops, sc = self.args, self.ops, self.scratch
        T, C = xx.shape
        mixed = ops.shift_mix(xx, prev, self.mix, out=_buf(sc, "mix", 6, T, C))     # (6, T, C)
        xr, xw, xk, xv, xa, xg = mixed
        r = ops.linear(xr, self.r, out=_buf(sc, "r", T, C))
        k = ops.linear(xk, self.k, out=_buf(sc, "k", T, C))
        v = ops.linear(xv, self.v, out=_buf(sc, "v" if v_first is not None else "v_first", T, C))
        if self.lora is not None:          # float32 LoRA: tanh(xw w1) w2, xa a1 a2, xv v1 v2, sigmoid(xg g1) g2
            wl, al, vl, g = ops.v7_lora(mixed, self.lora, out=_buf(sc, "lora", 4, T, C))
        else:                              # LoRA matrices quantized by --rules: through ops.linear
            wl = _mm(ops, np.tanh(_mm(ops, xw, self.w1)), self.w2)
            al = _mm(ops, _mm(ops, xa, self.a1), self.a2)
            g = _mm(ops, _sigmoid(_mm(ops, xg, self.g1)), self.g2)
            vl = _mm(ops, _mm(ops, xv, self.v1), self.v2) if v_first is not None else None
        if v_first is None:                                   # layer 0: its v is every layer's v_first
            vl = vfirst = _EMPTY
        else:
            vfirst = v_first
        # decay, iclr, removal key, k/v updates, WKV, ln_x, bonus and gate in one kernel call
        y = ops.v7_tail(r, wl, k, v, al, vl, vfirst, g, self.tail_params, a.lnx_eps, state["wkv"][self.i],
                        out=_buf(sc, "y", T, C))
        return ops.linear(y, self.o, out=_buf(sc, "o", T, C)), (v if v_first is None else v_first)


_EMPTY = np.zeros((0, 0), np.float32)


class _Scratch:
    """Prefill activations reused from layer to layer and call to call, by name: fresh arrays of a
    few MB each were a page fault per 4 KB every time (glibc hands large freed blocks back to the
    OS), ~15% of a 256-token prefill's CPU time."""

    def __init__(self):
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, *shape: int) -> np.ndarray:
        n = int(np.prod(shape))
        buf = self._bufs.get(name)
        if buf is None or buf.size < n:
            buf = self._bufs[name] = np.empty(n, np.float32)
        return buf[:n].reshape(shape)


def _buf(scratch, name: str, *shape: int) -> np.ndarray:
    return np.empty(shape, np.float32) if scratch is None else scratch.get(name, *shape)


def _v6_mix_params(w: dict, p: str, maa_x, maa, decay):
    """Arguments of ops.v6_mix, float32; None if --rules quantized a LoRA matrix."""
    m1, m2, d1, d2 = (w[p + n] for n in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"))
    def dense(x):
        return isinstance(x, np.ndarray) and x.dtype == np.float32 or getattr(x, "dtype", None) == "f32"
    if not all(dense(x) for x in (m1, m2, d1, d2)):
        return None
    f = lambda x: _own(getattr(x, "w", x))                                              # noqa: E731
    lora = _bf16_all([f(m1), f(m2), f(d1), np.ascontiguousarray(f(d2).T)])
    return (f(maa_x), f(maa), lora[0], lora[1], f(decay), lora[2], lora[3])


def _bf16_all(mats: list) -> list:
    """All of a layer's LoRA matrices as bf16 bits if every one is exactly bf16 (a bf16 checkpoint:
    half the bytes per decode step), else all float32 as given."""
    bits = [np.ascontiguousarray(m, np.float32).view(np.uint32) for m in mats]
    if any((b & 0xFFFF).any() for b in bits):
        return mats
    return [(b >> 16).astype(np.uint16) for b in bits]


def _v7_lora_params(w: dict, p: str, C: int, with_v: bool):
    """(w1, w2t, a1, a2t, v1, v2t, g1, g2t) float32 (D, C) for ops.v7_lora: down matrices as stored
    (out, in), up ones transposed; v1/v2t with no rows at layer 0. None if any is not float32."""
    out = []
    for n in "wavg":
        if n == "v" and not with_v:                       # layer 0 uses no value-residual LoRA
            out += [np.zeros((0, C), np.float32)] * 2
            continue
        down, up = w[p + n + "1"], w[p + n + "2"]
        if getattr(down, "dtype", None) != "f32" or getattr(up, "dtype", None) != "f32":
            return None
        out += [_own(down.w), _own(np.asarray(up.w).T)]
    return tuple(_bf16_all(out))


class ChannelMix:
    scratch = None                       # Model sets its _Scratch

    def __init__(self, args: ModelArgs, w: dict, i: int, ops):
        self.args, self.ops, self.i = args, ops, i
        p = f"blocks.{i}.ffn."
        self.k, self.v = w[p + "key.weight"], w[p + "value.weight"]
        self.r = w.get(p + "receptance.weight")
        self.F = next((a.shape[0] for a in (getattr(self.k, f, None) for f in ("q", "qs", "w"))
                       if isinstance(a, np.ndarray) and a.ndim == 2), None)          # rows of key, if known
        ver = args.version
        if ver == "7":
            self.mix = _own(w[p + "x_k"])[None]                                  # (1, C)
        elif ver == "6":
            self.mix = np.stack([w[p + "time_maa_k"], w[p + "time_maa_r"]]).astype(np.float32)
        else:
            self.mix = np.stack([1.0 - w[p + "time_mix_k"], 1.0 - w[p + "time_mix_r"]]).astype(np.float32)

    def __call__(self, xx, state: RecurrentState):
        ops, sc = self.ops, self.scratch
        T, C = xx.shape
        prev = state["ffn_x"][self.i]
        mixed = ops.shift_mix(xx, prev, self.mix, out=_buf(sc, "ffn_mix", self.mix.shape[0], T, C))
        prev[...] = xx[-1]
        k = ops.relu_square_(ops.linear(mixed[0], self.k, out=_buf(sc, "ffn_k", T, self.F) if self.F else None))
        out = ops.linear(k, self.v, out=_buf(sc, "ffn_v", T, C))
        if self.r is not None:
            out = ops.mul_sigmoid_(out, ops.linear(mixed[1], self.r))
        return out


class Block:
    scratch = None                       # Model sets its _Scratch

    def __init__(self, args, w, i, ops):
        p = f"blocks.{i}."
        self.ops, self.eps = ops, args.layer_norm_epsilon
        self.ln1 = (_own(w[p + "ln1.weight"]), _own(w[p + "ln1.bias"]))
        self.ln2 = (_own(w[p + "ln2.weight"]), _own(w[p + "ln2.bias"]))
        self.att = TimeMix(args, w, i, ops)
        self.ffn = ChannelMix(args, w, i, ops)

    def decode_plan(self, prepare):
        """This layer as one compiled call per decode token (ops.prepare_rwkv_layer), or None."""
        att, ffn, a = self.att, self.ffn, self.att.args
        ln = (*self.ln1, *self.ln2)
        if a.version == "7" and att.lora is not None:
            return prepare("7", ln=ln, eps=self.eps, att=(att.mix, att.lora, att.tail_params, a.lnx_eps),
                           ffn_mix=ffn.mix, mats=(att.r, att.k, att.v, att.o, ffn.k, ffn.v))
        if a.version == "6" and att.mix6 is not None:
            return prepare("6", ln=ln, eps=self.eps, att=(att.mix6, att.u, att.lnx_w, att.lnx_b, a.n_heads, a.lnx_eps),
                           ffn_mix=ffn.mix, mats=(att.r, att.k, att.v, att.g, att.o, ffn.k, ffn.r, ffn.v))
        return None

    def __call__(self, x, state, v_first):
        ops, sc = self.ops, self.scratch
        h, v_first = self.att(ops.layer_norm(x, *self.ln1, self.eps, out=_buf(sc, "ln", *x.shape)), state, v_first)
        x = ops.add_(x, h)
        x = ops.add_(x, self.ffn(ops.layer_norm(x, *self.ln2, self.eps, out=_buf(sc, "ln", *x.shape)), state))
        return x, v_first


class Model:
    """RWKV. ``weights`` maps BlinkDL names to packed containers; vectors as float32 arrays."""

    def __init__(self, args: ModelArgs, weights: dict, ops):
        self.args, self.ops = args, ops
        w = weights
        self.emb = w["emb.weight"]
        self.ln0 = (_own(w["blocks.0.ln0.weight"]), _own(w["blocks.0.ln0.bias"]))
        self.layers = [Block(args, w, i, ops) for i in range(args.num_hidden_layers)]
        self.scratch = _Scratch()                 # one sequence at a time, as the decode plans
        for layer in self.layers:
            layer.scratch = layer.att.scratch = layer.ffn.scratch = self.scratch
        self.ln_out = (_own(w["ln_out.weight"]), _own(w["ln_out.bias"]))
        self.head = w["head.weight"]
        # decode (one token): a compiled call per layer where the backend can (v6/v7, int8 or int4
        # matrices); the plans own scratch, so one model decodes one sequence at a time
        prepare = getattr(ops, "prepare_rwkv_layer", None)
        plans = [layer.decode_plan(prepare) for layer in self.layers] if prepare else [None]
        self.decode_plans = plans if all(p is not None for p in plans) else None
        self._vfirst = np.zeros((1, args.hidden_size), np.float32)

    @property
    def max_context(self) -> int:
        return self.args.max_context

    def state_spec(self) -> dict:
        a = self.args
        C = a.hidden_size
        spec = {"att_x": (C,), "ffn_x": (C,)}
        if a.version == "4":
            A = a.attention_hidden_size or C
            spec.update(aa=(A,), bb=(A,), pp=(A,))
        else:
            spec["wkv"] = (a.n_heads, a.head_size, a.head_size)
        return spec

    def new_state(self) -> RecurrentState:
        return RecurrentState(self.state_spec(), self.args.num_hidden_layers)

    # long prompts run in chunks: exact for a recurrence, and activations stay (chunk, width)
    PREFILL_CHUNK = 512

    def __call__(self, ids: np.ndarray, state: RecurrentState, last_only: bool = False) -> np.ndarray:
        """ids (T,) int64 appended to state -> logits (T, vocab) float32, or (1, vocab) if last_only."""
        return run_in_chunks(self._run, ids, state, last_only, self.PREFILL_CHUNK)

    def _run(self, ids, state, last_only):
        ops, a = self.ops, self.args
        x = ops.layer_norm(ops.embed(ids, self.emb, a.hidden_size), *self.ln0, a.layer_norm_epsilon)  # (T, C)
        if ids.shape[0] == 1 and self.decode_plans is not None:
            for i, plan in enumerate(self.decode_plans):
                ops.rwkv_layer_step(plan, x, state, i, self._vfirst)
        else:
            v_first = None
            for layer in self.layers:
                x, v_first = layer(x, state, v_first)
        state.length += ids.shape[0]
        if last_only:
            x = x[-1:]
        return ops.linear(ops.layer_norm(x, *self.ln_out, a.layer_norm_epsilon), self.head)

    @staticmethod
    def sanitize(config: dict) -> dict:
        return dict(config)

