"""BitNet b1.58 checkpoints (BitNetForCausalLM) -> ternary packed tensors.

Two sources:
- unquantized (or transformers' online-quantization ``autobitlinear``) weights: ternarized at
  conversion by absmean, per tensor (packed.ternarize), by the ordinary QuantPlan with --quant
  ternary (the default for this architecture);
- the packed layout microsoft/bitnet-b1.58-2B-4T ships (quantization_config: quant_method
  "bitnet", mode "offline"): each projection's ``weight`` is uint8 (out / 4, in) holding 4
  ternary rows per stored row, code = t + 1 in 2 bits: stored row r, bits 2i..2i+1 hold
  output row i * (out / 4) + r (transformers' integrations/bitnet.py unpack_weights); and
  ``weight_scale`` (1,). BitLinear computes y = (xq . t) / (x_scale * weight_scale), so the
  weight's scale is 1 / weight_scale; AutoBitLinear ("autobitlinear", offline) multiplies
  by weight_scale instead. The trits are repacked into edgerun's TernaryWeight layout
  unchanged: no requantization.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from edgerun import packed
from edgerun.errors import ConversionError
from edgerun.format import PackedTensor

from . import hf
from .quant import QuantPlan


def packed_mode(cfg: dict) -> str | None:
    """'bitlinear' | 'autobitlinear' for an offline-packed BitNet checkpoint, else None."""
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "bitnet" or q.get("quantization_mode", "offline") != "offline":
        return None
    return q.get("linear_class", "bitlinear")


def unpack_hf_ternary(w: np.ndarray) -> np.ndarray:
    """transformers' packed uint8 (R, in) -> trits (4R, in) int8: row i*R + r = bits 2i of row r, minus 1."""
    return np.concatenate([((w >> (2 * i)) & 3).astype(np.int8) - 1 for i in range(4)], axis=0)


def pack_hf_ternary(t: np.ndarray) -> np.ndarray:
    """Inverse of unpack_hf_ternary (for tests that build a checkpoint as the 2B-4T model ships)."""
    R = t.shape[0] // 4
    c = (t + 1).astype(np.uint8)
    return c[:R] | c[R:2 * R] << 2 | c[2 * R:3 * R] << 4 | c[3 * R:] << 6


def iter_packed(src: Path, cfg: dict, plan: QuantPlan) -> Iterator[tuple[str, PackedTensor]]:
    """(HF name, PackedTensor) for an offline-packed BitNet checkpoint."""
    mode = packed_mode(cfg)
    files = hf.open_weights(src)
    names = [n for n in files if not n.endswith("rotary_emb.inv_freq") and not n.endswith(".weight_scale")]
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in names:
        names.remove("lm_head.weight")
    for name in sorted(names, key=hf._order):
        f = files[name]
        scale_name = name[:-len("weight")] + "weight_scale"
        if not (name.endswith(".weight") and scale_name in files and f.dtype(name) == "U8"):
            yield name, plan.pack(name, f.float32(name))
            continue
        t = unpack_hf_ternary(f.raw(name))
        ws = files[scale_name].float32(scale_name).reshape(-1)
        if ws.size != 1 or not np.isfinite(ws).all() or ws[0] == 0:
            raise ConversionError(f"{src}: tensor {scale_name} must be one finite non-zero value, got {ws[:4]}")
        scale = np.float32(1.0) / ws[0] if mode == "bitlinear" else ws[0]
        kind, _ = plan.kind_for(name, t.shape)
        if kind in ("ternary", "ternary_b3"):
            codes = packed.pack_trits2(t) if kind == "ternary" else packed.pack_trits3(t)
            yield name, PackedTensor(kind, t.shape, {"n": t.shape[1], "per_row": False},
                                     {"codes": codes, "scales": np.array([scale], np.float32)})
        else:                     # another kind asked for: from the dequantized weights
            yield name, plan.pack(name, t.astype(np.float32) * scale)
