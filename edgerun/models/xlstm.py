"""xLSTM-7B layout (transformers' xLSTMForCausalLM): a stack of mLSTM blocks, each

    h = rms_norm(x)
    q, k (T, H*d_qk); v, o (T, H*d_v); i, f (T, H) = projections of h      gates soft-capped
    y = mLSTM(q, k, v, i, f; C, n, m)        multi-head matrix memory, per-head LayerNorm
    x = x + out_proj(sigmoid(o) * y)
    x = x + proj_down(silu(proj_up_gate(rms_norm(x))) * proj_up(rms_norm(x)))
    logits = softcap(lm_head(rms_norm(x)), 30)

The state per block is the matrix memory C (H, d_qk, d_v), its normaliser n (H, d_qk) and the
stabiliser m (H,), float32 whatever the weights: constant size however long the sequence. One
token runs the recurrent step, a prompt the chunkwise-parallel form (backend op ``mlstm``).
Tensor names are the Hugging Face checkpoint names. NX-AI's mixed mLSTM/sLSTM xLSTMLMModel is in
xlstm_lm.py.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..cache import RecurrentState
from ..cache.recurrent import run_in_chunks
from ..errors import ModelFileError
from .mamba import UNBOUNDED_CONTEXT, Scratch, f32

ARCHITECTURES = ("xLSTMForCausalLM",)
MODEL_TYPES = ("xlstm",)
# the gate projections (H rows) are tiny and feed exponentials: they stay float32
KEEP_FLOAT: tuple[str, ...] = ("igate_preact", "fgate_preact")


def round_up(x: float, multiple: int) -> int:
    return int(((x + multiple - 1) // multiple) * multiple)


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_heads: int = 8
    use_bias: bool = False
    add_out_norm: bool = True
    norm_eps: float = 1e-6
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    chunk_size: int = 64
    eps: float = 1e-6
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    gate_soft_cap: float = 15.0
    output_logit_soft_cap: float = 30.0
    weight_mode: str = "single"
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in d.items() if k in known and v is not None})
        if args.use_bias:
            raise ModelFileError("xLSTM with use_bias=true is not supported yet (xLSTM-7B has no biases)")
        if args.weight_mode != "single":
            raise ModelFileError(f"xLSTM weight_mode {args.weight_mode!r} is not supported yet (only 'single')")
        return args

    # as transformers' xLSTMLayer sizes them (int, not rounded)
    @property
    def qk_dim(self) -> int:
        return int(self.hidden_size * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.hidden_size * self.v_dim_factor)

    @property
    def ffn_dim(self) -> int:
        return round_up(self.hidden_size * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)


class Block:
    def __init__(self, args: ModelArgs, w: dict, i: int, ops):
        p = f"backbone.blocks.{i}"
        L = f"{p}.mlstm_layer"
        self.args, self.ops, self.i = args, ops, i
        self.norm_mlstm, self.norm_ffn = f32(w[f"{p}.norm_mlstm.weight"]), f32(w[f"{p}.norm_ffn.weight"])
        self.q, self.k, self.v = w[f"{L}.q.weight"], w[f"{L}.k.weight"], w[f"{L}.v.weight"]
        self.o, self.out_proj = w[f"{L}.ogate_preact.weight"], w[f"{L}.out_proj.weight"]
        self.ig, self.fg = w[f"{L}.igate_preact.weight"], w[f"{L}.fgate_preact.weight"]   # (H, hidden)
        self.ib, self.fb = f32(w[f"{L}.igate_preact.bias"]), f32(w[f"{L}.fgate_preact.bias"])
        self.mh_norm = f32(w[f"{L}.multihead_norm.weight"])                       # (H*d_v,)
        F = f"{p}.ffn"
        self.up_gate, self.up, self.down = (w[f"{F}.{n}.weight"] for n in ("proj_up_gate", "proj_up", "proj_down"))

    def __call__(self, x, state: RecurrentState, s: Scratch | None):
        a, ops, i = self.args, self.ops, self.i
        lin = ops.linear
        h = ops.rms_norm_into(x, self.norm_mlstm, a.norm_eps, s.h) if s else ops.rms_norm(x, self.norm_mlstm, a.norm_eps)
        q, k = lin(h, self.q, out=s and s.q), lin(h, self.k, out=s and s.k)
        v, o = lin(h, self.v, out=s and s.v), lin(h, self.o, out=s and s.o)
        ig, fg = ops.small_linear(h, self.ig, out=s and s.ig), ops.small_linear(h, self.fg, out=s and s.fg)
        y = ops.mlstm(q, k, v, ig, fg, self.ib, self.fb, state["C"][i], state["n"][i], state["m"][i], self.mh_norm,
                      cap=a.gate_soft_cap, eps=a.eps, norm_eps=a.norm_eps, chunk_size=a.chunk_size,
                      out=s and s.y)                                               # (T, H*d_v)
        ops.add_(x, lin(ops.sigmoid_mul_(y, o), self.out_proj, out=s and s.a))
        h = ops.rms_norm_into(x, self.norm_ffn, a.norm_eps, s.h) if s else ops.rms_norm(x, self.norm_ffn, a.norm_eps)
        gate, up = lin(h, self.up_gate, out=s and s.gate), lin(h, self.up, out=s and s.up)
        gate = ops.silu_mul_into(gate, up, s.act if s else np.empty_like(gate))   # not in place: vectorises
        return ops.add_(x, lin(gate, self.down, out=s and s.a))


class Model:
    """xLSTMForCausalLM. ``weights`` maps HF names to packed containers; vectors as float32 arrays.
    One-token steps run in preallocated scratch (one decode at a time per model object)."""

    # long prompts run in chunks: exact for a recurrence, and activations stay (chunk, width)
    PREFILL_CHUNK = 512

    def __init__(self, args: ModelArgs, weights: dict, ops):
        self.args, self.ops = args, ops
        w = weights
        self.embed = w["backbone.embeddings.weight"]
        self.layers = [Block(args, w, i, ops) for i in range(args.num_hidden_layers)]
        self.out_norm = f32(w["backbone.out_norm.weight"]) if args.add_out_norm else None
        self.head = self.embed if args.tie_word_embeddings else w.get("lm_head.weight", self.embed)
        H, NH = args.hidden_size, args.num_heads
        qk, v, F = args.qk_dim, args.v_dim, args.ffn_dim
        self.scratch = Scratch(dict(h=(1, H), q=(1, qk), k=(1, qk), v=(1, v), o=(1, v), ig=(1, NH), fg=(1, NH),
                                    y=(1, v), a=(1, H), gate=(1, F), up=(1, F), act=(1, F), f=(1, H)))

    @property
    def max_context(self) -> int:
        return UNBOUNDED_CONTEXT

    def new_state(self) -> RecurrentState:
        a = self.args
        NH = a.num_heads
        dk, dv = a.qk_dim // NH, a.v_dim // NH
        return RecurrentState({"C": (NH, dk, dv), "n": (NH, dk), "m": (NH,)}, a.num_hidden_layers)

    def __call__(self, ids: np.ndarray, state: RecurrentState, last_only: bool = False) -> np.ndarray:
        """ids (T,) int64 appended to state -> logits (T, vocab) float32, or (1, vocab) if last_only."""
        return run_in_chunks(self._run, ids, state, last_only, self.PREFILL_CHUNK)

    def _run(self, ids, state, last_only):
        a, ops = self.args, self.ops
        s = self.scratch if ids.shape[0] == 1 else None
        x = ops.embed(ids, self.embed, a.hidden_size)                              # (T, hidden)
        for layer in self.layers:
            x = layer(x, state, s)
        state.length += ids.shape[0]
        if last_only:
            x = x[-1:]
        if self.out_norm is not None:
            x = ops.rms_norm_into(x, self.out_norm, a.norm_eps, s.f) if s else ops.rms_norm(x, self.out_norm, a.norm_eps)
        return ops.softcap_(ops.linear(x, self.head), a.output_logit_soft_cap)

    @staticmethod
    def sanitize(config: dict) -> dict:
        c = dict(config)
        c["num_hidden_layers"] = c.get("num_hidden_layers") or c.get("num_blocks")
        c["hidden_size"] = c.get("hidden_size") or c.get("embedding_dim")
        return c
