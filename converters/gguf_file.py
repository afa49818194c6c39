"""GGUF files (llama.cpp) -> edgerun tensors, config and tokenizer.

The `gguf` package parses the file and dequantizes what has no packed twin. Blocks
that do have one are copied bit for bit, never through floats:
    Q8_0 -> int8, group 32        (block: f16 d, 32 x int8)
    Q4_0 -> int4 symmetric, g 32  (block: f16 d, 16 bytes of nibbles; w = d * (q - 8))
    Q4_1 -> int4 with mins, g 32  (block: f16 d, f16 m, 16 bytes;  w = d * q + m)
GGML's nibble order inside a block (byte j = element j | element j+16) is the
Int4Weight layout, so the bytes are reused as they are.

K-quants and Q5_0 have no bit-identical twin, but each is an affine code per small group,
so they map exactly (the same real values) onto a packed kind with float32 scales:
    Q5_0 -> int8, group 32        w = d * (q - 16)
    Q6_K -> int8, group 16        w = (d * sc) * (q - 32)
    Q4_K -> int4 with mins, g 32  w = (d * sc) * q - dmin * m
The integer codes are recovered from the `gguf` package's dequantization with the block's
own scales, and checked to reproduce it. Other types are dequantized and requantized to
int8 (lossy); each tensor's descriptor records its GGML type and whether it is exact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from edgerun.errors import ConversionError, ModelFileError, UnsupportedArchitectureError
from edgerun.format import PackedTensor

from edgerun.packed import int4_interleave

from .names import gguf_to_hf
from .quant import pack

SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                   "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def open_gguf(path: Path):
    import gguf
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:       # the reader raises ValueError, struct.error, IndexError... on bad files
        raise ModelFileError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception:        # a field type the package cannot decode: not one we need
            pass
    return out


def config_from_metadata(md: dict, tensor_names: set[str], where) -> dict:
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedArchitectureError(
            f"{where}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    g = lambda k, d=None: md.get(f"{arch}.{k}", d)   # noqa: E731
    n_head = g("attention.head_count")
    hidden = g("embedding_length")
    cfg = {
        "architecture": SUPPORTED_ARCHS[arch], "model_type": arch,
        "vocab_size": g("vocab_size") or len(md.get("tokenizer.ggml.tokens", [])),
        "hidden_size": hidden, "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": g("attention.head_count_kv", n_head),
        "head_dim": g("attention.key_length", hidden // n_head),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": g("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    if g("rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    elif g("rope.scaling.type") not in (None, "none"):
        raise UnsupportedArchitectureError(f"{where}: rope scaling {g('rope.scaling.type')!r} is not supported")
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedArchitectureError(f"{where}: per-frequency rope factors (rope_freqs, Llama 3.1 style) "
                                           "are not supported yet")
    if arch == "qwen3":
        cfg["qk_norm"] = True
    if arch == "gemma3":
        # what transformers' GGUF loader assumes too: Gemma 3's defaults for what GGUF leaves out
        cfg.update(model_type="gemma3_text", sliding_window=g("attention.sliding_window"),
                   query_pre_attn_scalar=256, rope_local_base_freq=10000.0, tie_word_embeddings=True)
    return cfg


def _unpermute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (it makes HF's rotate-half RoPE act on adjacent pairs)."""
    return a.reshape(n_head, a.shape[0] // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def iter_tensors(reader, cfg: dict, quant: str | None, group: int) -> Iterator[tuple[str, PackedTensor]]:
    """(HF name, PackedTensor) for each tensor. quant None keeps each block type's native kind."""
    import gguf
    T = gguf.GGMLQuantizationType
    permute = cfg["model_type"] in ("llama", "mistral")
    norm_shift = cfg["model_type"] == "gemma3_text"      # llama.cpp stores Gemma norms as 1 + w
    for t in reader.tensors:
        name = gguf_to_hf(t.name, cfg["model_type"])
        if name is None:
            raise ConversionError(f"GGUF tensor {t.name!r} has no known role in {cfg['architecture']}")
        shape = tuple(int(s) for s in reversed(t.shape))          # GGUF lists ne0 (inputs) first
        heads = None
        if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
        native = quant is None and t.tensor_type in (T.Q8_0, T.Q4_0, T.Q4_1, T.F32, T.F16, T.BF16)
        if len(shape) == 1 or not native:
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            if norm_shift and len(shape) == 1 and name.endswith("norm.weight"):
                w = w - np.float32(1.0)
            if heads:
                w = _unpermute_rows(w, heads)
            exact = None
            if quant is None and len(shape) == 2 and t.tensor_type in (T.Q5_0, T.Q6_K, T.Q4_K):
                raw = np.asarray(t.data)
                exact = _affine_exact(_unpermute_rows(raw, heads) if heads else raw, t.tensor_type, w, shape)
            if exact is not None:
                exact.params.update(gguf=t.tensor_type.name, exact=True)
                yield name, exact
            else:
                pt = pack(name, w, quant or "int8", group)
                if quant is None and len(shape) == 2 and t.tensor_type not in (T.F32, T.F16, T.BF16):
                    pt.params.update(gguf=t.tensor_type.name, exact=False)
                yield name, pt
            continue
        raw = np.asarray(t.data)
        if heads:
            raw = _unpermute_rows(raw, heads)
        yield name, _native(name, t.tensor_type, raw, shape)


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 -> (...) float32 from little-endian float16 bytes."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _q4k_scales(s: np.ndarray):
    """(..., 12) packed 6-bit scales and mins of Q4_K -> (..., 8) sc, (..., 8) m."""
    s = s.astype(np.int32)
    sc = np.empty(s.shape[:-1] + (8,), np.int32)
    m = np.empty_like(sc)
    sc[..., :4], m[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, m


def _affine_exact(raw: np.ndarray, ttype, w: np.ndarray, shape: tuple) -> PackedTensor | None:
    """Q5_0 / Q6_K / Q4_K rows -> the packed tensor holding exactly the same values, or None.
    raw: (out, bytes per row) after any row permutation; w: its float32 dequantization."""
    import gguf
    T = gguf.GGMLQuantizationType
    out, n = shape
    if ttype == T.Q5_0:
        group, lo, hi = 32, -16, 15
        scales = _f16(raw.reshape(out, n // 32, 22)[:, :, 0:2])
        mins = None
    elif ttype == T.Q6_K:
        group, lo, hi = 16, -32, 31
        b = raw.reshape(out, n // 256, 210)
        sc = b[:, :, 192:208].view(np.int8).astype(np.float32)                 # (out, nb, 16)
        scales = (_f16(b[:, :, 208:210])[..., None] * sc).reshape(out, n // 16)
        mins = None
    elif ttype == T.Q4_K:
        group, lo, hi = 32, 0, 15
        b = raw.reshape(out, n // 256, 144)
        sc, m = _q4k_scales(b[:, :, 4:16])
        scales = (_f16(b[:, :, 0:2])[..., None] * sc).reshape(out, n // 32)
        mins = (-_f16(b[:, :, 2:4])[..., None] * m).reshape(out, n // 32)
    else:
        return None
    g = w.reshape(out, -1, group)
    off = 0.0 if mins is None else mins[..., None]
    safe = np.where(scales != 0, scales, 1.0)[..., None]
    k = np.clip(np.rint((g - off) / safe), lo, hi)
    if not np.array_equal((k * scales[..., None] + off).astype(np.float32), g):
        return None                       # not the affine code we took it for: requantize instead
    scales = scales.astype(np.float32)
    if ttype == T.Q4_K:
        qs = int4_interleave(k.reshape(out, n).astype(np.uint8), 32)
        return PackedTensor("int4", shape, {"group": 32}, {"qs": qs, "scales": scales,
                                                          "mins": mins.astype(np.float32)})
    return PackedTensor("int8", shape, {"group": group}, {"q": k.reshape(out, n).astype(np.int8), "scales": scales})


def _native(name: str, ttype, raw: np.ndarray, shape: tuple) -> PackedTensor:
    import gguf
    T = gguf.GGMLQuantizationType
    out, n = shape
    if ttype == T.F32:
        return PackedTensor("f32", shape, {}, {"w": raw.reshape(shape)})
    if ttype in (T.F16, T.BF16):
        kind = "f16" if ttype == T.F16 else "bf16"
        return PackedTensor(kind, shape, {}, {"w": raw.view(np.uint16).reshape(shape)})
    nb = n // 32
    if ttype == T.Q8_0:
        blocks = raw.reshape(out, nb, 34)
        d = blocks[:, :, 0:2].copy().view(np.uint16).reshape(out, nb)
        q = blocks[:, :, 2:].copy().view(np.int8).reshape(out, n)
        return PackedTensor("int8", shape, {"group": 32}, {"q": q, "scales": d})
    if ttype == T.Q4_0:
        blocks = raw.reshape(out, nb, 18)
        d = blocks[:, :, 0:2].copy().view(np.uint16).reshape(out, nb)
        qs = blocks[:, :, 2:].reshape(out, nb * 16).copy()
        return PackedTensor("int4", shape, {"group": 32}, {"qs": qs, "scales": d})
    if ttype == T.Q4_1:
        blocks = raw.reshape(out, nb, 20)
        d = blocks[:, :, 0:2].copy().view(np.uint16).reshape(out, nb)
        m = blocks[:, :, 2:4].copy().view(np.uint16).reshape(out, nb)
        qs = blocks[:, :, 4:].reshape(out, nb * 16).copy()
        return PackedTensor("int4", shape, {"group": 32}, {"qs": qs, "scales": d, "mins": m})
    raise ConversionError(f"tensor {name}: GGML type {ttype!r} has no native packed kind")
