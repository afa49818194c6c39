"""Mamba-1 family: Mamba and FalconMamba (extra weightless RMS norms on dt, B and C).

    h = x + mixer(norm(x))
    mixer:  x, z = in_proj(h)                      x, z: (T, d_inner)
            x = silu(conv1d(x))                    depthwise, causal, window carried in the state
            dt, B, C = x_proj(x)                   (T, R), (T, N), (T, N)    FalconMamba: RMS-normed
            y = scan(x, dt_proj(dt), A, B, C, D) * silu(z)
            out_proj(y)
The state per layer is the conv window (K-1, d_inner) and the SSM state (N, d_inner): constant
size whatever the sequence length. Tensor names are the Hugging Face checkpoint names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from ..cache import RecurrentState
from ..errors import ModelFileError
from ..packed import DenseWeight, unpack

ARCHITECTURES = ("MambaForCausalLM", "FalconMambaForCausalLM")
MODEL_TYPES = ("mamba", "falcon_mamba")
# A_log (d_inner, d_state) is exponentiated, not multiplied: it stays float32 whatever --quant says
KEEP_FLOAT: tuple[str, ...] = ("A_log",)

# a recurrent state has no context limit; this is what `max_context` reports
UNBOUNDED_CONTEXT = 1 << 40


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    state_size: int = 16
    expand: int = 2
    intermediate_size: int | None = None
    conv_kernel: int = 4
    time_step_rank: int | str = "auto"
    layer_norm_epsilon: float = 1e-5
    mixer_rms_eps: float = 1e-6
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    tie_word_embeddings: bool = True
    falcon: bool = False                     # FalconMamba's B/C/dt norms (set by sanitize)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in d.items() if k in known and v is not None})
        args.intermediate_size = args.intermediate_size or args.expand * args.hidden_size
        if args.time_step_rank == "auto":
            args.time_step_rank = math.ceil(args.hidden_size / 16)
        args.time_step_rank = int(args.time_step_rank)
        if args.hidden_act != "silu":
            raise ModelFileError(f"Mamba with hidden_act {args.hidden_act!r} is not supported (only silu)")
        return args


def f32(w) -> np.ndarray:
    """A tensor the kernels read as plain float32 (vectors, convs, A_log), whatever container it came in."""
    if isinstance(w, np.ndarray):
        return np.ascontiguousarray(w, dtype=np.float32)
    if isinstance(w, DenseWeight) and w.dtype == "f32":
        return np.ascontiguousarray(w.w)
    return np.ascontiguousarray(unpack(w), dtype=np.float32)


class Scratch:
    """Buffers for one-token steps, allocated once per model: decoding allocates nothing."""

    def __init__(self, shapes: dict[str, tuple]):
        for name, shape in shapes.items():
            setattr(self, name, np.empty(shape, np.float32))


class Mixer:
    def __init__(self, args: ModelArgs, w, p: str, ops):
        self.ops, self.args = ops, args
        self.in_proj, self.x_proj = w[f"{p}.in_proj.weight"], w[f"{p}.x_proj.weight"]
        self.dt_proj, self.out_proj = w[f"{p}.dt_proj.weight"], w[f"{p}.out_proj.weight"]
        self.in_bias, self.out_bias = w.get(f"{p}.in_proj.bias"), w.get(f"{p}.out_proj.bias")
        self.dt_bias = f32(w[f"{p}.dt_proj.bias"])                             # (d_inner,)
        d = args.intermediate_size
        self.conv_w = np.ascontiguousarray(f32(w[f"{p}.conv1d.weight"]).reshape(d, -1).T)   # (K, d_inner)
        self.conv_b = f32(w[f"{p}.conv1d.bias"]) if f"{p}.conv1d.bias" in w else None
        self.A = np.ascontiguousarray(-np.exp(f32(w[f"{p}.A_log"])).T)          # (N, d_inner)
        self.D = f32(w[f"{p}.D"])                                                # (d_inner,)
        R, N = args.time_step_rank, args.state_size
        self.bounds = np.array([0, R, R + N, R + 2 * N], np.int64)

    def _linear(self, x, w, b, out):
        y = self.ops.linear(x, w, out=out)
        if b is not None:
            y += b
        return y

    def __call__(self, h, conv_state, ssm_state, s: Scratch | None):
        """h (T, hidden) normed -> (T, hidden). s: one-token scratch (None for prefill)."""
        a, ops = self.args, self.ops
        d, R, N = a.intermediate_size, a.time_step_rank, a.state_size
        xz = self._linear(h, self.in_proj, self.in_bias, s and s.xz)          # (T, 2 d_inner)
        x, z = xz[:, :d], xz[:, d:]
        if s is None:         # prefill: a contiguous x lets the conv kernel vectorise (10x at T=256)
            x = np.ascontiguousarray(x)
        x = ops.causal_conv1d(x, conv_state, self.conv_w, self.conv_b, out=s and s.xc)
        x_dbl = ops.linear(x, self.x_proj, out=s and s.x_dbl)                  # (T, R + 2N)
        if a.falcon:
            ops.rms_norm_segments_(x_dbl, self.bounds, a.mixer_rms_eps)
        dt_low = x_dbl[:, :R] if s else np.ascontiguousarray(x_dbl[:, :R])
        dt = ops.linear(dt_low, self.dt_proj, out=s and s.dt)                  # (T, d_inner), bias in the scan
        y = ops.selective_scan(x, dt, self.A, x_dbl[:, R:R + N], x_dbl[:, R + N:], self.D, z,
                               self.dt_bias, ssm_state, out=s and s.y, ws=s and s.ws)
        return self._linear(y, self.out_proj, self.out_bias, s and s.o)


class Block:
    """x + mixer(norm(x)); the mixer class is the family's (Mamba-1 here, Mamba-2 in mamba2.py)."""

    def __init__(self, args, w, i, ops, mixer_cls):
        p = f"backbone.layers.{i}"
        self.ops, self.eps, self.i = ops, args.layer_norm_epsilon, i
        self.norm = f32(w[f"{p}.norm.weight"])
        self.mixer = mixer_cls(args, w, f"{p}.mixer", ops)

    def __call__(self, x, state: RecurrentState, s: Scratch | None):
        ops = self.ops
        h = ops.rms_norm_into(x, self.norm, self.eps, s.h) if s else ops.rms_norm(x, self.norm, self.eps)
        return ops.add_(x, self.mixer(h, state["conv"][self.i], state["ssm"][self.i], s))


class Backbone:
    """The stack both Mamba generations share: embeddings, blocks, final norm, head, and a
    forward that updates a RecurrentState in place (one token runs in preallocated scratch,
    so one decode at a time per model object)."""
    mixer_cls: type

    def __init__(self, args, weights: dict, ops, scratch: dict):
        self.args, self.ops = args, ops
        self.embed = weights.get("backbone.embeddings.weight", weights.get("backbone.embedding.weight"))
        self.layers = [Block(args, weights, i, ops, self.mixer_cls) for i in range(args.num_hidden_layers)]
        self.norm_f = f32(weights["backbone.norm_f.weight"])
        self.head = self.embed if args.tie_word_embeddings else weights.get("lm_head.weight", self.embed)
        self.scratch = Scratch(scratch)

    @property
    def max_context(self) -> int:
        return UNBOUNDED_CONTEXT

    def __call__(self, ids: np.ndarray, state: RecurrentState, last_only: bool = False) -> np.ndarray:
        """ids (T,) int64 appended to state -> logits (T, vocab) float32, or (1, vocab) if last_only."""
        s = self.scratch if ids.shape[0] == 1 else None
        x = self.ops.embed(ids, self.embed, self.args.hidden_size)            # (T, hidden)
        for layer in self.layers:
            x = layer(x, state, s)
        state.length += ids.shape[0]
        state.checkpoint()
        if last_only:
            x = x[-1:]
        eps = self.args.layer_norm_epsilon
        x = self.ops.rms_norm_into(x, self.norm_f, eps, s.f) if s else self.ops.rms_norm(x, self.norm_f, eps)
        return self.ops.linear(x, self.head)


class Model(Backbone):
    """The Mamba-1 stack. ``weights`` maps HF names to packed containers; vectors as float32 arrays."""
    mixer_cls = Mixer

    def __init__(self, args: ModelArgs, weights: dict, ops):
        R, N, d, H = args.time_step_rank, args.state_size, args.intermediate_size, args.hidden_size
        super().__init__(args, weights, ops, dict(f=(1, H), h=(1, H), xz=(1, 2 * d), xc=(1, d),
                                                  x_dbl=(1, R + 2 * N), dt=(1, d), y=(1, d), o=(1, H), ws=(2, d)))

    def new_state(self) -> RecurrentState:
        a = self.args
        return RecurrentState({"conv": (a.conv_kernel - 1, a.intermediate_size),
                               "ssm": (a.state_size, a.intermediate_size)}, a.num_hidden_layers)

    @staticmethod
    def sanitize(config: dict) -> dict:
        c = dict(config)
        c["falcon"] = c.get("model_type") == "falcon_mamba" or c.get("architecture") == "FalconMambaForCausalLM"
        return c
