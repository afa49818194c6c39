"""Mamba-2: multi-head SSD with B/C shared by head groups, gated RMSNorm.

    h = x + mixer(norm(x))
    mixer:  z, xBC, dt = in_proj(h)                  (T, d_inner), (T, d_inner + 2GN), (T, H)
            xBC = silu(conv1d(xBC))                  depthwise, causal, window carried in the state
            y = ssd(x, dt, A, B, C, D)               per head: scalar decay exp(dt * A_h)
            out_proj(norm(y * silu(z)))              RMSNorm per group of d_inner / G channels
Prefill runs the chunked SSD algorithm (chunk_size from the config), decode its one-step
recurrence. The state per layer is the conv window (K-1, conv_dim) and the SSM state (H, P, N).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..cache import RecurrentState
from ..errors import ModelFileError
from .mamba import Backbone, Scratch, f32

ARCHITECTURES = ("Mamba2ForCausalLM",)
MODEL_TYPES = ("mamba2",)
KEEP_FLOAT: tuple[str, ...] = ()          # A_log, D, dt_bias are vectors: float32 by the converter's rule
# SSD chunk on the CPU: any chunk gives the same result; the config's (256, sized for GPUs) costs more
# here: the in-chunk part grows with the chunk (T * L * P per head); 32 measured fastest (5% over 64)
CPU_CHUNK = 32


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_heads: int
    head_dim: int = 64
    state_size: int = 128
    n_groups: int = 1
    expand: int = 2
    conv_kernel: int = 4
    chunk_size: int = 256
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    time_step_limit: tuple | list = (0.0, float("inf"))
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in d.items() if k in known and v is not None})
        if args.hidden_act != "silu":
            raise ModelFileError(f"Mamba-2 with hidden_act {args.hidden_act!r} is not supported (only silu)")
        if args.num_heads * args.head_dim != args.d_inner or args.num_heads % args.n_groups:
            raise ModelFileError(f"Mamba-2 config: num_heads * head_dim ({args.num_heads} * {args.head_dim}) must "
                                 f"equal expand * hidden_size ({args.d_inner}) and n_groups divide num_heads")
        args.time_step_limit = tuple(_number(v) for v in args.time_step_limit)
        return args

    @property
    def d_inner(self) -> int:
        return int(self.expand * self.hidden_size)

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.state_size


def _number(v) -> float:
    """transformers 5 writes infinities in config.json as {"__float__": "Infinity"}."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


class Mixer:
    def __init__(self, args: ModelArgs, w, p: str, ops):
        self.ops, self.args = ops, args
        self.in_proj, self.out_proj = w[f"{p}.in_proj.weight"], w[f"{p}.out_proj.weight"]
        self.in_bias, self.out_bias = w.get(f"{p}.in_proj.bias"), w.get(f"{p}.out_proj.bias")
        self.conv_w = np.ascontiguousarray(f32(w[f"{p}.conv1d.weight"]).reshape(args.conv_dim, -1).T)  # (K, conv_dim)
        self.conv_b = f32(w[f"{p}.conv1d.bias"]) if f"{p}.conv1d.bias" in w else None
        self.A = -np.exp(f32(w[f"{p}.A_log"]))                                  # (H,)
        self.D, self.dt_bias = f32(w[f"{p}.D"]), f32(w[f"{p}.dt_bias"])         # (H,)
        self.norm = f32(w[f"{p}.norm.weight"])                                   # (d_inner,)

    def __call__(self, h, conv_state, ssm_state, s: Scratch | None):
        """h (T, hidden) normed -> (T, hidden). s: one-token scratch (None for prefill)."""
        a, ops = self.args, self.ops
        d, cd = a.d_inner, a.conv_dim
        zxbcdt = ops.linear(h, self.in_proj, out=s and s.zxbcdt)                # (T, d + conv_dim + H)
        if self.in_bias is not None:
            zxbcdt += self.in_bias
        z, xbc, dt = zxbcdt[:, :d], zxbcdt[:, d:d + cd], zxbcdt[:, d + cd:]
        if s is None:         # prefill: contiguous copies let the conv and norm kernels vectorise (2.5x, 8x)
            z, xbc = np.ascontiguousarray(z), np.ascontiguousarray(xbc)
        xbc = ops.causal_conv1d(xbc, conv_state, self.conv_w, self.conv_b, out=s and s.xbc)   # (T, conv_dim)
        y = ops.ssd(xbc, dt, self.A, self.D, self.dt_bias, ssm_state, a.n_groups, min(a.chunk_size, CPU_CHUNK),
                    a.time_step_limit, out=s and s.y)                           # (T, d)
        y = ops.gated_rms_norm(y, z, self.norm, d // a.n_groups, a.layer_norm_epsilon, out=s and s.yn)
        o = ops.linear(y, self.out_proj, out=s and s.o)
        if self.out_bias is not None:
            o += self.out_bias
        return o


class Model(Backbone):
    """The Mamba-2 stack. ``weights`` maps HF names to packed containers; vectors as float32 arrays."""
    mixer_cls = Mixer

    def __init__(self, args: ModelArgs, weights: dict, ops):
        d, H = args.d_inner, args.hidden_size
        super().__init__(args, weights, ops, dict(h=(1, H), zxbcdt=(1, d + args.conv_dim + args.num_heads),
                                                  xbc=(1, args.conv_dim), y=(1, d), yn=(1, d), o=(1, H), f=(1, H)))

    def new_state(self) -> RecurrentState:
        a = self.args
        return RecurrentState({"conv": (a.conv_kernel - 1, a.conv_dim),
                               "ssm": (a.num_heads, a.head_dim, a.state_size)}, a.num_hidden_layers)

    @staticmethod
    def sanitize(config: dict) -> dict:
        return dict(config)
