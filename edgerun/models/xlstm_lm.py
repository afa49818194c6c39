"""NX-AI's xLSTMLMModel (the `xlstm` package): a stack mixing mLSTM and sLSTM blocks (slstm_at).

    x = emb[ids]
    mLSTM block:  x = x + mlstm_layer(LN(x))
        xm, z = proj_up(h)                       (T, inner) each
        xc = silu(conv1d(xm))                    depthwise causal, window carried in the state
        q, k = headwise(xc); v = headwise(xm)    block-diagonal (qkv_proj_blocksize)
        i, f = igate/fgate([q, k, v])            (T, heads)
        y = (mLSTM(q, k, v, i, f) + skip * xc) * silu(z)     mLSTM output group-normed per head
        out = proj_down(y)
    sLSTM block:  x = x + slstm_layer(LN(x));  x = x + ffn(LN(x))
        xc = silu(conv1d(h))
        gates i, f from xc and z, o from h (headwise; NX-AI's igate/fgate weights feed f/i)
        y = sLSTM(gates; y, c, n, m)             block-diagonal recurrent weights, group-normed per head
        ffn = proj_down(gelu(gate) * up),  gate, up = proj_up(LN(x))
    logits = lm_head(LN(x))

LayerNorms have no bias and weight 1 + w (NX-AI's residual weight); eps 1e-5. Sizes come from the
weights; converters/xlstm.py writes the sLSTM kernel canonical (R (heads, 4, d, d), gate-major b).

State (RecurrentState, one "layer" holding stacks): mLSTM blocks' C, n, m and conv windows,
sLSTM blocks' (y, c, n, m) and conv windows, float32 and constant in size.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..cache import RecurrentState
from ..cache.recurrent import run_in_chunks
from ..errors import ModelFileError
from .mamba import UNBOUNDED_CONTEXT, Scratch, f32

ARCHITECTURES = ("xLSTMLMModel",)
MODEL_TYPES = ("xlstm_lm",)
KEEP_FLOAT: tuple[str, ...] = ("mlstm_cell.igate", "mlstm_cell.fgate")
LN_EPS = 1e-5
P = "xlstm_block_stack.blocks."


@dataclass
class ModelArgs:
    vocab_size: int
    embedding_dim: int
    num_blocks: int
    block_map: list
    add_post_blocks_norm: bool = True
    tie_weights: bool = False
    ffn_act_fn: str = "gelu"
    slstm_layout: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in d.items() if k in known and v is not None})
        if args.ffn_act_fn not in ("gelu", "swish"):
            raise ModelFileError(f"xLSTM feed-forward activation {args.ffn_act_fn!r} is not supported "
                                 f"(gelu, swish)")
        return args

    @property
    def hidden_size(self) -> int:
        return self.embedding_dim


def _ln_weight(w, name, n) -> np.ndarray:
    """NX-AI LayerNorm weight: 1 + w (ones when the norm has no weight)."""
    return (1.0 + f32(w[name])) if name in w else np.ones(n, np.float32)


def _conv(w, p):
    """nn.Conv1d depthwise weight (C, 1, K) -> (K, C), its bias; (None, None) without a conv."""
    if p + ".conv.weight" not in w:
        return None, None
    cw = f32(w[p + ".conv.weight"])
    return np.ascontiguousarray(cw.reshape(cw.shape[0], -1).T), f32(w[p + ".conv.bias"]) if p + ".conv.bias" in w else None


class MLSTMBlock:
    def __init__(self, args, w, i, j, ops):
        p = f"{P}{i}.xlstm"
        self.ops, self.j = ops, j                                      # j: index among mLSTM blocks
        E = args.embedding_dim
        self.norm = _ln_weight(w, f"{P}{i}.xlstm_norm.weight", E)
        self.up, self.down = w[f"{p}.proj_up.weight"], w[f"{p}.proj_down.weight"]
        self.up_b, self.down_b = w.get(f"{p}.proj_up.bias"), w.get(f"{p}.proj_down.bias")
        self.wq, self.wk, self.wv = (f32(w[f"{p}.{n}_proj.weight"]) for n in "qkv")   # (nb, o, i)
        self.bq, self.bk, self.bv = (w.get(f"{p}.{n}_proj.bias") for n in "qkv")
        self.conv_w, self.conv_b = _conv(w, f"{p}.conv1d")
        if self.conv_w is None:
            raise ModelFileError(f"{p}: mLSTM blocks without a conv1d are not supported")
        c = f"{p}.mlstm_cell"
        self.ig, self.fg = w[f"{c}.igate.weight"], w[f"{c}.fgate.weight"]           # (heads, 3*inner)
        self.ib, self.fb = f32(w[f"{c}.igate.bias"]), f32(w[f"{c}.fgate.bias"])
        self.inner = self.wq.shape[0] * self.wq.shape[1]
        self.heads = self.ib.shape[0]
        self.outnorm = _ln_weight(w, f"{c}.outnorm.weight", self.inner)
        self.skip = f32(w[f"{p}.learnable_skip"])
        self.zero = np.zeros(E, np.float32)

    def __call__(self, x, state, s):
        ops, j, d = self.ops, self.j, self.inner
        T = x.shape[0]
        h = ops.layer_norm_into(x, self.norm, self.zero, LN_EPS, s.h if s else np.empty_like(x))
        xz = _lin(ops, h, self.up, self.up_b, s and s.xz)                            # (T, 2*inner)
        xm, z = xz[:, :d], xz[:, d:]
        xc = ops.causal_conv1d(xm, state["conv_m"][0][j], self.conv_w, self.conv_b, out=s and s.xc)
        qkv = s.qkv if s else np.empty((T, 3 * d), np.float32)                      # gates read [q, k, v]
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        for dst, src, wt, b in ((q, xc, self.wq, self.bq), (k, xc, self.wk, self.bk), (v, xm, self.wv, self.bv)):
            ops.headwise_linear(src, wt, out=dst)
            if b is not None:
                dst += b
        ig, fg = ops.small_linear(qkv, self.ig, out=s and s.ig), ops.small_linear(qkv, self.fg, out=s and s.fg)
        y = ops.mlstm(q, k, v, ig, fg, self.ib, self.fb, state["C"][0][j], state["n"][0][j], state["m"][0][j],
                      self.outnorm, cap=0.0, eps=1e-6, norm_eps=LN_EPS, out=s and s.y)
        ops.skip_silu_gate_(y, self.skip, xc, z)
        return ops.add_(x, _lin(ops, y, self.down, self.down_b, s and s.o))


class SLSTMBlock:
    def __init__(self, args, w, i, j, ops):
        p = f"{P}{i}.xlstm"
        self.ops, self.j, self.args = ops, j, args
        E = args.embedding_dim
        self.norm = _ln_weight(w, f"{P}{i}.xlstm_norm.weight", E)
        self.conv_w, self.conv_b = _conv(w, f"{p}.conv1d")
        # NX-AI's sLSTMLayer feeds fgate(x) in as i and igate(x) as f: keep its semantics
        self.gates = [f32(w[f"{p}.{n}gate.weight"]) for n in "fizo"]               # (heads, d, d) each
        self.R, self.b = f32(w[f"{p}.slstm_cell.R"]), f32(w[f"{p}.slstm_cell.b"])
        self.gn = _ln_weight(w, f"{p}.group_norm.weight", E)
        self.ffn = f"{P}{i}.ffn.proj_up.weight" in w
        if self.ffn:
            self.ffn_norm = _ln_weight(w, f"{P}{i}.ffn_norm.weight", E)
            self.f_up, self.f_down = w[f"{P}{i}.ffn.proj_up.weight"], w[f"{P}{i}.ffn.proj_down.weight"]
            self.f_up_b, self.f_down_b = w.get(f"{P}{i}.ffn.proj_up.bias"), w.get(f"{P}{i}.ffn.proj_down.bias")
            self.F = self.f_up[0].shape[0] // 2                 # rows of any packed kind
        self.zero = np.zeros(E, np.float32)

    def __call__(self, x, state, s):
        ops, j = self.ops, self.j
        T, E = x.shape
        h = ops.layer_norm_into(x, self.norm, self.zero, LN_EPS, s.h if s else np.empty_like(x))
        xc = h if self.conv_w is None else ops.causal_conv1d(h, state["conv_s"][0][j], self.conv_w, self.conv_b,
                                                             out=s and s.xs)
        wx = s.wx if s else np.empty((T, 4 * E), np.float32)
        for g, (src, wt) in enumerate(zip((xc, xc, h, h), self.gates)):
            ops.headwise_linear(src, wt, out=wx[:, g * E:(g + 1) * E])
        y = ops.slstm(wx, self.R, self.b, state["slstm"][0][j], self.gn, LN_EPS, out=s and s.ys, ws=s and s.ws)
        x = ops.add_(x, y)
        if not self.ffn:
            return x
        h = ops.layer_norm_into(x, self.ffn_norm, self.zero, LN_EPS, s.h if s else np.empty_like(x))
        gu = _lin(ops, h, self.f_up, self.f_up_b, s and s.gu)                     # (T, 2F): gate | up
        F = self.F
        if self.args.ffn_act_fn == "gelu":
            g = ops.gelu_mul(gu[:, :F], gu[:, F:], out=s and s.g)
        else:
            g = ops.silu_mul(np.ascontiguousarray(gu[:, :F]), gu[:, F:])
        return ops.add_(x, _lin(ops, g, self.f_down, self.f_down_b, s and s.o))


def _lin(ops, x, w, b, out):
    y = ops.linear(x, w, out=out)
    if b is not None:
        y += b
    return y


class Model:
    """xLSTMLMModel. ``weights`` maps NX-AI names (canonical sLSTM kernels) to packed containers."""

    PREFILL_CHUNK = 512

    def __init__(self, args: ModelArgs, weights: dict, ops):
        self.args, self.ops = args, ops
        w = weights
        self.embed = w["token_embedding.weight"]
        self.layers, nm, ns = [], 0, 0
        for i, kind in enumerate(args.block_map):
            if kind == 0:
                self.layers.append(MLSTMBlock(args, w, i, nm, ops))
                nm += 1
            else:
                self.layers.append(SLSTMBlock(args, w, i, ns, ops))
                ns += 1
        E = args.embedding_dim
        self.post_norm = _ln_weight(w, "xlstm_block_stack.post_blocks_norm.weight", E) \
            if args.add_post_blocks_norm else None
        self.zero = np.zeros(E, np.float32)
        self.head = self.embed if args.tie_weights else w.get("lm_head.weight", self.embed)
        self.spec = self._spec()
        m = next((b for b in self.layers if isinstance(b, MLSTMBlock)), None)
        sb = next((b for b in self.layers if isinstance(b, SLSTMBlock)), None)
        d = m.inner if m else 1
        shapes = dict(h=(1, E), o=(1, E), f=(1, E), xz=(1, 2 * d), xc=(1, d), qkv=(1, 3 * d), y=(1, d),
                      ig=(1, m.heads if m else 1), fg=(1, m.heads if m else 1), xs=(1, E), wx=(1, 4 * E), ys=(1, E),
                      ws=(4, sb.R.shape[2] if sb else 1))
        F = max((b.F for b in self.layers if isinstance(b, SLSTMBlock) and b.ffn), default=1)
        shapes.update(gu=(1, 2 * F), g=(1, F))
        self.scratch = Scratch(shapes)

    def _spec(self) -> dict:
        ms = [b for b in self.layers if isinstance(b, MLSTMBlock)]
        ss = [b for b in self.layers if isinstance(b, SLSTMBlock)]
        spec = {}
        if ms:
            b = ms[0]
            dh = b.inner // b.heads
            spec.update(C=(len(ms), b.heads, dh, dh), n=(len(ms), b.heads, dh), m=(len(ms), b.heads),
                        conv_m=(len(ms), b.conv_w.shape[0] - 1, b.inner))
        if ss:
            E = self.args.embedding_dim
            spec["slstm"] = (len(ss), 4, E)
            if ss[0].conv_w is not None:
                spec["conv_s"] = (len(ss), ss[0].conv_w.shape[0] - 1, E)
        return spec

    @property
    def max_context(self) -> int:
        return UNBOUNDED_CONTEXT

    def new_state(self) -> RecurrentState:
        return RecurrentState(self.spec, 1)

    def __call__(self, ids: np.ndarray, state: RecurrentState, last_only: bool = False) -> np.ndarray:
        """ids (T,) int64 appended to state -> logits (T, vocab) float32, or (1, vocab) if last_only."""
        return run_in_chunks(self._run, ids, state, last_only, self.PREFILL_CHUNK)

    def _run(self, ids, state, last_only):
        ops, a = self.ops, self.args
        s = self.scratch if ids.shape[0] == 1 else None
        x = ops.embed(ids, self.embed, a.embedding_dim)
        for layer in self.layers:
            x = layer(x, state, s)
        state.length += ids.shape[0]
        if last_only:
            x = x[-1:]
        if self.post_norm is not None:
            x = ops.layer_norm_into(x, self.post_norm, self.zero, LN_EPS, s.f if s else np.empty_like(x))
        return ops.linear(x, self.head)

    @staticmethod
    def sanitize(config: dict) -> dict:
        return dict(config)
