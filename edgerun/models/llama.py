"""Llama family: Llama, Mistral, Qwen2, Qwen3 (and SmolLM), chosen by config.

    h = x + attn(attn_norm(x))          attention: GQA, RoPE, optional bias and QK-norm
    y = h + mlp(mlp_norm(h))            mlp: down(silu(gate(h)) * up(h))
Tensor names are the Hugging Face checkpoint names.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..cache.paged import PagedKV, PagedState
from .rope import inv_freq

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# tensors kept in float32 whatever --quant says (all vectors are, by the converter's rule)
KEEP_FLOAT: tuple[str, ...] = ()


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list | None = None         # per layer "full_attention" | "sliding_attention"
    max_window_layers: int | None = None    # Qwen2: layers from this index on use the window

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in d.items() if k in known and v is not None})
        args.num_key_value_heads = args.num_key_value_heads or args.num_attention_heads
        args.head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
        return args


def window_of(args: ModelArgs, layer: int) -> int:
    """The sliding window of a layer, 0 for full attention. The whole sequence stays cached
    either way until the paged KV cache lands, so a window saves compute, not memory."""
    if not args.sliding_window:
        return 0
    if args.layer_types:
        return args.sliding_window if args.layer_types[layer] == "sliding_attention" else 0
    if args.max_window_layers is not None and layer < args.max_window_layers:
        return 0
    return args.sliding_window


class Attention:
    def __init__(self, args: ModelArgs, w, p: str, ops, layer: int):
        self.ops, self.args = ops, args
        self.q, self.k, self.v, self.o = (w[f"{p}.{n}_proj.weight"] for n in "qkvo")
        self.q_bias, self.k_bias, self.v_bias, self.o_bias = (w.get(f"{p}.{n}_proj.bias") for n in "qkvo")
        self.q_norm = w.get(f"{p}.q_norm.weight")
        self.k_norm = w.get(f"{p}.k_norm.weight")
        self.inv_freq, self.rope_scale = inv_freq(args.head_dim, args.rope_theta, args.rope_scaling,
                                                  args.partial_rotary_factor)
        self.scale = args.head_dim ** -0.5
        self.window = window_of(args, layer)
        self.softcap = 0.0                   # attention logit soft-capping (Gemma 2 style), 0 = off

    def _proj(self, x, w, b):
        y = self.ops.linear(x, w)
        if b is not None:
            y += b
        return y

    def __call__(self, x, positions, state: PagedState, layer: int):
        a, ops = self.args, self.ops
        T = x.shape[0]
        q = self._proj(x, self.q, self.q_bias).reshape(T, a.num_attention_heads, a.head_dim)
        k = self._proj(x, self.k, self.k_bias).reshape(T, a.num_key_value_heads, a.head_dim)
        v = self._proj(x, self.v, self.v_bias).reshape(T, a.num_key_value_heads, a.head_dim)
        if self.q_norm is not None:
            ops.rms_norm_heads(q, self.q_norm, a.rms_norm_eps)
            ops.rms_norm_heads(k, self.k_norm, a.rms_norm_eps)
        ops.rope(q, positions, self.inv_freq, self.rope_scale)
        ops.rope(k, positions, self.inv_freq, self.rope_scale)
        o = ops.attention(q, k, v, state, layer, self.scale, self.window, self.softcap)
        return self._proj(o.reshape(T, -1), self.o, self.o_bias)


class MLP:
    def __init__(self, w, p: str, ops):
        self.ops = ops
        self.gate, self.up, self.down = (w[f"{p}.{n}_proj.weight"] for n in ("gate", "up", "down"))

    def __call__(self, x):
        ops = self.ops
        return ops.linear(ops.silu_mul(ops.linear(x, self.gate), ops.linear(x, self.up)), self.down)


class Block:
    fused = None        # the backend's one-call decode plan (subclasses with other layers keep None)

    def __init__(self, args, w, i, ops):
        p = f"model.layers.{i}"
        self.ops, self.eps, self.i = ops, args.rms_norm_eps, i
        self.attn_norm = w[f"{p}.input_layernorm.weight"]
        self.mlp_norm = w[f"{p}.post_attention_layernorm.weight"]
        self.attn = Attention(args, w, f"{p}.self_attn", ops, i)
        self.mlp = MLP(w, f"{p}.mlp", ops)
        at = self.attn
        # one token goes through the whole layer in one compiled call where the backend can
        self.fused = ops.prepare_decoder_layer(
            norms=(self.attn_norm, self.mlp_norm), eps=args.rms_norm_eps, q=at.q, k=at.k, v=at.v, o=at.o,
            gate=self.mlp.gate, up=self.mlp.up, down=self.mlp.down, biases=(at.q_bias, at.k_bias, at.v_bias, at.o_bias),
            qk_norms=(at.q_norm, at.k_norm), inv_freq=at.inv_freq, rope_scale=at.rope_scale,
            n_heads=args.num_attention_heads, n_kv=args.num_key_value_heads, head_dim=args.head_dim,
            scale=at.scale, window=at.window, softcap=at.softcap) if hasattr(ops, "prepare_decoder_layer") else None

    def __call__(self, x, positions, state):
        ops = self.ops
        if self.fused is not None and x.shape[0] == 1:
            return ops.decoder_layer_step(self.fused, x, state, self.i)
        h = ops.add_(x, self.attn(ops.rms_norm(x, self.attn_norm, self.eps), positions, state, self.i))
        return ops.add_(h, self.mlp(ops.rms_norm(h, self.mlp_norm, self.eps)))


class Model:
    """The decoder. ``weights`` maps HF tensor names to packed containers; 1-D tensors as float32 arrays.
    Families that change the block (Gemma 3) set ``block_cls``."""
    block_cls = Block

    def __init__(self, args: ModelArgs, weights: dict, ops):
        self.args, self.ops = args, ops
        self.embed = weights["model.embed_tokens.weight"]
        self.layers = [self.block_cls(args, weights, i, ops) for i in range(args.num_hidden_layers)]
        self.norm = weights["model.norm.weight"]
        self.head = weights.get("lm_head.weight", self.embed) if not args.tie_word_embeddings else self.embed
        self.kv: PagedKV | None = None
        self.kv_options: dict = {}          # max_kv_bytes, block_size (edgerun.load passes them)

    @property
    def max_context(self) -> int:
        return self.args.max_position_embeddings

    def new_state(self) -> PagedState:
        if self.kv is None:
            a = self.args
            self.kv = PagedKV([window_of(a, i) for i in range(a.num_hidden_layers)], a.num_key_value_heads,
                              a.head_dim, self.max_context, **self.kv_options)
        return self.kv.new_state()

    PREFILL_CHUNK = 512

    def __call__(self, ids: np.ndarray, state: PagedState, last_only: bool = False) -> np.ndarray:
        """ids (T,) int64 appended to state -> logits (T, vocab) float32, or (1, vocab) if last_only.
        With last_only, a prompt given to an empty state reuses prefix-cached blocks. Long inputs
        run in chunks of PREFILL_CHUNK tokens: activations stay small, and sliding-window layers
        free their old blocks between chunks, so their KV memory stays about window + chunk."""
        if last_only and state.length == 0:
            ids = ids[state.match_prefix(ids.tolist()):]
        c = self.PREFILL_CHUNK
        if ids.shape[0] > c:
            parts = [self._forward(ids[i:i + c], state, last_only) for i in range(0, ids.shape[0], c)]
            return parts[-1] if last_only else np.concatenate(parts)
        return self._forward(ids, state, last_only)

    def _forward(self, ids: np.ndarray, state: PagedState, last_only: bool) -> np.ndarray:
        T = ids.shape[0]
        state.reserve(T)
        positions = np.arange(state.length, state.length + T, dtype=np.int64)
        x = self.embed_tokens(ids)                                     # (T, hidden)
        for layer in self.layers:
            x = layer(x, positions, state)
        state.advance(ids.tolist())
        return self.logits(x[-1:] if last_only else x)

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return self.ops.embed(ids, self.embed, self.args.hidden_size)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.ops.linear(self.ops.rms_norm(x, self.norm, self.args.rms_norm_eps), self.head)

    @staticmethod
    def sanitize(config: dict) -> dict:
        """Normalise a family's config into ModelArgs keys (Qwen3 and others flag QK-norm by type)."""
        c = dict(config)
        if c.get("model_type") == "qwen3":
            c["qk_norm"] = True
        if c.get("model_type") in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
            c["sliding_window"] = None
        if c.get("model_type") not in ("qwen2", "qwen3"):
            c.pop("max_window_layers", None)
        return c
