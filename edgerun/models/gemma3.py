"""Gemma 3 (text): Llama's attention with Gemma's differences.

    h = x + post_attn_norm(attn(input_norm(x)))       RMSNorm weights are offsets: x * (1 + w)
    y = h + post_ff_norm(mlp(pre_ff_norm(h)))         mlp: down(gelu_tanh(gate(h)) * up(h))
Embeddings are scaled by sqrt(hidden); queries by query_pre_attn_scalar ** -0.5; q and k get
RMSNorm per head; local (sliding-window) layers use rope_local_base_freq, global layers
rope_theta (and its scaling); final-logit soft-capping where configured.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import llama
from .rope import inv_freq

ARCHITECTURES = ("Gemma3ForCausalLM",)
MODEL_TYPES = ("gemma3", "gemma3_text")
KEEP_FLOAT: tuple[str, ...] = ()


@dataclass
class ModelArgs(llama.ModelArgs):
    query_pre_attn_scalar: float = 256.0
    rope_local_base_freq: float = 10000.0
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None


def _offset(w: np.ndarray) -> np.ndarray:
    return (1.0 + w.astype(np.float32)).astype(np.float32)


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs, w, p: str, ops, layer: int):
        super().__init__(args, w, p, ops, layer)
        self.q_norm, self.k_norm = _offset(self.q_norm), _offset(self.k_norm)
        self.scale = args.query_pre_attn_scalar ** -0.5
        # Gemma 3 configs carry attn_logit_softcapping, but the model does not apply it
        # (transformers passes no softcap to its attention); Gemma 2 did
        self.softcap = 0.0
        if self.window:       # local layers: their own rope base, no scaling
            self.inv_freq, self.rope_scale = inv_freq(args.head_dim, args.rope_local_base_freq, None)


class MLP(llama.MLP):
    def __call__(self, x):
        ops = self.ops
        return ops.linear(ops.gelu_tanh_mul(ops.linear(x, self.gate), ops.linear(x, self.up)), self.down)


class Block:
    def __init__(self, args, w, i, ops):
        p = f"model.layers.{i}"
        self.ops, self.eps, self.i = ops, args.rms_norm_eps, i
        self.input_norm = _offset(w[f"{p}.input_layernorm.weight"])
        self.post_attn_norm = _offset(w[f"{p}.post_attention_layernorm.weight"])
        self.pre_ff_norm = _offset(w[f"{p}.pre_feedforward_layernorm.weight"])
        self.post_ff_norm = _offset(w[f"{p}.post_feedforward_layernorm.weight"])
        self.attn = Attention(args, w, f"{p}.self_attn", ops, i)
        self.mlp = MLP(w, f"{p}.mlp", ops)

    def __call__(self, x, positions, state):
        ops, eps = self.ops, self.eps
        a = self.attn(ops.rms_norm(x, self.input_norm, eps), positions, state, self.i)
        h = ops.add_(x, ops.rms_norm(a, self.post_attn_norm, eps))
        f = self.mlp(ops.rms_norm(h, self.pre_ff_norm, eps))
        return ops.add_(h, ops.rms_norm(f, self.post_ff_norm, eps))


class Model(llama.Model):
    block_cls = Block

    def __init__(self, args: ModelArgs, weights: dict, ops):
        super().__init__(args, weights, ops)
        self.norm = _offset(self.norm)
        self.embed_scale = np.float32(args.hidden_size ** 0.5)

    def embed_tokens(self, ids):
        return self.ops.scale_(super().embed_tokens(ids), self.embed_scale)

    def logits(self, x):
        out = super().logits(x)
        cap = self.args.final_logit_softcapping
        if cap:
            out = (np.tanh(out / cap) * cap).astype(np.float32)
        return out

    @staticmethod
    def sanitize(config: dict) -> dict:
        c = dict(config)
        if not c.get("layer_types"):
            n = c.get("sliding_window_pattern", 6)
            c["layer_types"] = ["sliding_attention" if (i + 1) % n else "full_attention"
                                for i in range(c["num_hidden_layers"])]
        c.setdefault("tie_word_embeddings", True)
        c.setdefault("rope_theta", 1_000_000.0)
        return c
