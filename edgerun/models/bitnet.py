"""BitNet b1.58 (BitNetForCausalLM): Llama's block with two extra sub-norms and a ReLU² MLP.

    h = x + o_proj(attn_sub_norm(attn(input_layernorm(x))))
    y = h + down_proj(ffn_sub_norm(relu(gate_proj(h))**2 * up_proj(h)))
The projections are ternary (converters/quant.py ternarizes an unquantized checkpoint by
absmean; converters/bitnet.py repacks microsoft's 2-bit checkpoints): the ternary kernels
quantize each token's activations to int8 by absmax, as BitLinear does, so the model needs no
code of its own for that. Converted with a float --quant it runs as transformers'
unquantized BitNetForCausalLM does (plain linears).
"""
from __future__ import annotations

import numpy as np

from . import llama

ARCHITECTURES = ("BitNetForCausalLM",)
MODEL_TYPES = ("bitnet",)
KEEP_FLOAT: tuple[str, ...] = ()
ModelArgs = llama.ModelArgs


class Attention(llama.Attention):
    """Llama's attention; its output is RMS-normed (attn_sub_norm) before o_proj."""

    def __init__(self, args, w, p: str, ops, layer: int):
        super().__init__(args, w, p, ops, layer)
        self.sub_norm = w[f"{p}.attn_sub_norm.weight"]
        self.eps = args.rms_norm_eps

    def _proj(self, x, w, b):
        if w is self.o:                      # the only projection of the attention output
            x = self.ops.rms_norm(x, self.sub_norm, self.eps)
        return super()._proj(x, w, b)


class MLP:
    def __init__(self, args, w, p: str, ops):
        self.ops, self.eps = ops, args.rms_norm_eps
        self.gate, self.up, self.down = (w[f"{p}.{n}_proj.weight"] for n in ("gate", "up", "down"))
        self.sub_norm = w[f"{p}.ffn_sub_norm.weight"]

    def __call__(self, x):
        ops = self.ops
        g = ops.linear(x, self.gate)                                     # (T, intermediate)
        np.maximum(g, 0.0, out=g)
        g *= g                                                           # relu(g) ** 2
        g *= ops.linear(x, self.up)
        return ops.linear(ops.rms_norm(g, self.sub_norm, self.eps), self.down)


class Block(llama.Block):
    def __init__(self, args, w, i, ops):
        p = f"model.layers.{i}"
        self.ops, self.eps, self.i = ops, args.rms_norm_eps, i
        self.attn_norm = w[f"{p}.input_layernorm.weight"]
        self.mlp_norm = w[f"{p}.post_attention_layernorm.weight"]
        self.attn = Attention(args, w, f"{p}.self_attn", ops, i)
        self.mlp = MLP(args, w, f"{p}.mlp", ops)


class Model(llama.Model):
    block_cls = Block

    @staticmethod
    def sanitize(config: dict) -> dict:
        c = dict(config)
        act = c.get("hidden_act", "relu2")
        if act != "relu2":
            from ..errors import UnsupportedArchitectureError
            raise UnsupportedArchitectureError(f"BitNet with hidden_act {act!r}: only relu2 is supported")
        c.pop("max_window_layers", None)
        return c
