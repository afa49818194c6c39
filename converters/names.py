"""The one name table: tensor names of other formats -> Hugging Face checkpoint names.

Models use HF names, so an HF directory needs no table. GGUF (llama.cpp's
convert_hf_to_gguf naming) is mapped here, one entry per tensor role.
"""
from __future__ import annotations

import re

# llama, mistral, qwen2, qwen3 GGUF files
GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",     # qwen3
    "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}

# Gemma 3: four norms per block; llama.cpp's ffn_norm is the pre-feed-forward norm there
GGUF_TO_HF_GEMMA3 = {
    **GGUF_TO_HF,
    "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
    "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
}


def _compile(table):
    return [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + r"\.(weight|bias)$"), v)
            for k, v in table.items()]


_PATTERNS = {"default": _compile(GGUF_TO_HF), "gemma3_text": _compile(GGUF_TO_HF_GEMMA3)}


def gguf_to_hf(name: str, model_type: str = "llama") -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown."""
    for pat, hf in _PATTERNS.get(model_type, _PATTERNS["default"]):
        m = pat.match(name)
        if m:
            *idx, suffix = m.groups()
            return hf.format(i=idx[0]) + "." + suffix if idx else hf + "." + suffix
    return None
