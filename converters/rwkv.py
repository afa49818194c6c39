"""RWKV checkpoints -> model file: BlinkDL .pth, rwkv.cpp .bin and HF directories (transformers'
RwkvForCausalLM, v4; the RWKV org's Rwkv5ForCausalLM / Rwkv6ForCausalLM layouts).

Every source is first brought to BlinkDL's state dict (names and meaning as RWKV-LM trains
them), then to the canonical forms models/rwkv.py reads:

    mixing vectors, time_decay, time_first, x_*, w0/a0/v0, k_k/k_a/r_k   flattened to 1-D
    v5/v6 time_first                                                     the real bonus, named time_faaaa
                                                                         (old v5 files store its log)
    v6 time_maa_w1, time_decay_w1/w2; v7 w1/w2 a1/a2 v1/v2 g1/g2         transposed to linear (out, in)
    v6 time_maa_w2                                                       kept (5, D, C)
    v7 blocks.0.att.v0/v1/v2                                             dropped (layer 0 defines v_first)

The version is read from names and shapes as BlinkDL's package does: ln_x -> 5, gate -> 5.1,
per-channel time_decay (H, N) -> 5.2, time_maa -> 6, r_k / x_rwkvag -> 7.
(rwkv.cpp calls BlinkDL's 5 "5.1" and anything with a gate "5.2".)
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from edgerun import format as edr
from edgerun.errors import ConversionError, ModelFileError
from edgerun.models.rwkv import ARCH_OF_VERSION, KEEP_FLOAT

from .quant import pack

RWKV_CPP_MAGIC = 0x67676D66          # 'ggmf'
# rwkv.cpp data types (docs/FILE_FORMAT.md): 4-6 are removed Q4 variants
_CPP_TYPES = {0: "FP32", 1: "FP16", 2: "Q4_0", 3: "Q4_1", 7: "Q5_0", 8: "Q5_1", 9: "Q8_0"}
_VEC_SUFFIXES = (".x_r", ".x_w", ".x_k", ".x_v", ".x_a", ".x_g", ".w0", ".a0", ".v0", ".k_k", ".k_a", ".r_k")
_V7_LORA = tuple(f"att.{n}{i}" for n in "wavg" for i in (1, 2))


# ------------------------------------------------------------------ version and canonical form

def detect_version(names, shapes: dict) -> str:
    """BlinkDL's rule, from tensor names and the shape of blocks.0.att.time_decay."""
    names = set(names)
    if "blocks.0.att.r_k" in names or "blocks.0.att.x_rwkvag" in names:
        return "7"
    if any(".time_maa" in n for n in names):
        return "6"
    if "blocks.0.att.ln_x.weight" in names:
        if "blocks.0.att.gate.weight" not in names:
            return "5"
        td = [s for s in shapes.get("blocks.0.att.time_decay", ()) if s > 1]
        return "5.2" if len(td) > 1 else "5.1"
    if "blocks.0.att.time_decay" in names and "emb.weight" in names:
        return "4"
    raise ConversionError("not an RWKV checkpoint: no blocks.0.att.time_decay / r_k / emb.weight")


def _unsupported(names) -> None:
    for name in names:
        if name.endswith(".time_state") or ".s_emb" in name or ".ffn.s" in name:
            raise ConversionError(f"tensor {name}: state-tuned / DeepEmbed checkpoints are not supported yet")


def canonical_tensor(name: str, a: np.ndarray, version: str) -> tuple[str, np.ndarray] | None:
    """One BlinkDL tensor (float32) -> (name, array) as models/rwkv.py reads it; None if unused."""
    if version == "7" and name.startswith("blocks.0.att.v") and name[-1] in "012":
        return None
    if any(name.endswith(n) for n in _V7_LORA) or name.endswith(("time_maa_w1", "time_decay_w1", "time_decay_w2")):
        a = np.ascontiguousarray(a.T)
    elif name.endswith("time_maa_w2"):
        a = np.ascontiguousarray(a)
    elif ".time_" in name or name.endswith(_VEC_SUFFIXES):
        a = np.ascontiguousarray(a.reshape(-1))
    if version in ("5", "5.1", "5.2", "6") and name.endswith(".time_first"):
        a = np.exp(a.astype(np.float64)).astype(np.float32)
        name = name[: -len("time_first")] + "time_faaaa"
    return name, a


def canonical(sd: dict, version: str) -> dict[str, np.ndarray]:
    """BlinkDL state dict (float32 arrays or PthTensors) -> the tensors models/rwkv.py reads."""
    _unsupported(sd)
    pairs = (canonical_tensor(n, _f32(a), version) for n, a in sd.items())
    return dict(p for p in pairs if p is not None)


def _f32(a) -> np.ndarray:
    return a.float32() if hasattr(a, "float32") else np.asarray(a, np.float32)


def make_config(t: dict, version: str, head: int, lnx_eps: float | None = None) -> dict:
    """From the BlinkDL state dict's shapes (arrays or lazy PthTensors)."""
    vocab, C = t["emb.weight"].shape
    n_layer = 1 + max(int(n.split(".")[1]) for n in t if n.startswith("blocks."))
    return {"architecture": ARCH_OF_VERSION[version], "model_type": "rwkv" + version[0], "version": version,
            "vocab_size": int(vocab), "hidden_size": int(C), "num_hidden_layers": n_layer,
            "intermediate_size": int(t["blocks.0.ffn.key.weight"].shape[0]), "head_size": head,
            "attention_hidden_size": int(t["blocks.0.att.key.weight"].shape[0]),
            "layer_norm_epsilon": 1e-5, "lnx_eps": 64e-5 if lnx_eps is None else float(lnx_eps)}


def _head_size(sd: dict[str, np.ndarray], version: str) -> int:
    """From BlinkDL shapes: v5.2/v6 time_faaaa / time_decay (H, N), v7 r_k (H, N), v5.0/5.1 (H,)."""
    C = sd["emb.weight"].shape[1]
    if version == "4":
        return 0
    if version == "7":
        return int(sd["blocks.0.att.r_k"].shape[-1])
    for n in ("blocks.0.att.time_faaaa", "blocks.0.att.time_decay", "blocks.0.att.time_first"):
        if n in sd:
            s = [d for d in sd[n].shape if d > 1] or [1]
            if len(s) >= 2:
                return int(s[-1])
            if version in ("5", "5.1"):
                return C // int(s[0])
    raise ConversionError("cannot infer the RWKV head size")


# ------------------------------------------------------------------ sources

def read_pth(path: Path) -> dict:
    """name -> PthTensor (memory-mapped; turned into float32 one tensor at a time while converting)."""
    from .pth import load_pth
    return load_pth(path)


def read_rwkv_cpp(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """An rwkv.cpp model file (docs/FILE_FORMAT.md of rwkv.cpp): header and name -> float32 array,
    still in rwkv.cpp's stored forms (see from_rwkv_cpp)."""
    size = path.stat().st_size
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    if size < 24:
        raise ModelFileError(f"{path}: too short to be an rwkv.cpp model file")
    magic, version, n_vocab, n_embed, n_layer, dtype = struct.unpack("<6i", bytes(mm[:24]))
    if magic != RWKV_CPP_MAGIC:
        raise ModelFileError(f"{path}: not an rwkv.cpp model file (magic {magic:#x})")
    if version not in (100, 101):
        raise ModelFileError(f"{path}: rwkv.cpp file version {version} is not supported (100, 101 are)")
    off, tensors = 24, {}
    while off < size:
        if off + 12 > size:
            raise ModelFileError(f"{path}: truncated tensor header at byte {off}")
        dims, klen, dt = struct.unpack("<3i", bytes(mm[off:off + 12]))
        off += 12
        if not (0 < dims <= 4 and 0 < klen < 1024):
            raise ModelFileError(f"{path}: corrupted tensor header at byte {off - 12}")
        ne = struct.unpack(f"<{dims}i", bytes(mm[off:off + 4 * dims]))
        off += 4 * dims
        name = bytes(mm[off:off + klen]).decode("utf-8", errors="replace")
        off += klen
        kind = _CPP_TYPES.get(dt)
        if kind is None:
            raise ModelFileError(f"{path}: tensor {name} has rwkv.cpp data type {dt}, which is not supported "
                                 f"(supported: {', '.join(_CPP_TYPES.values())})")
        if version == 100 and kind.startswith("Q"):
            raise ModelFileError(f"{path}: quantized rwkv.cpp files of version 100 use ggml's old block layout; "
                                 f"re-quantize with a current rwkv.cpp (version 101)")
        shape = tuple(reversed(ne))                     # ggml order -> numpy order
        n = int(np.prod(shape))
        nbytes = _cpp_nbytes(kind, n, ne[0])
        if off + nbytes > size:
            raise ModelFileError(f"{path}: tensor {name} is truncated")
        tensors[name] = _cpp_decode(kind, mm[off:off + nbytes], n).reshape(shape)
        off += nbytes
    header = {"version": version, "n_vocab": n_vocab, "n_embed": n_embed, "n_layer": n_layer, "data_type": dtype}
    return header, tensors


def read_rwkv_cpp_header(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise ModelFileError(f"{path}: too short to be an rwkv.cpp model file")
    magic, version, n_vocab, n_embed, n_layer, dtype = struct.unpack("<6i", head)
    if magic != RWKV_CPP_MAGIC:
        raise ModelFileError(f"{path}: not an rwkv.cpp model file (magic {magic:#x})")
    return {"version": version, "n_vocab": n_vocab, "n_embed": n_embed, "n_layer": n_layer, "data_type": dtype}


_QBLOCK = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}     # bytes per 32 values


def _cpp_nbytes(kind: str, n: int, row: int) -> int:
    if kind == "FP32":
        return 4 * n
    if kind == "FP16":
        return 2 * n
    if row % 32:
        raise ModelFileError(f"quantized rwkv.cpp rows must be multiples of 32 (got {row})")
    return n // 32 * _QBLOCK[kind]


def _cpp_decode(kind: str, raw: np.ndarray, n: int) -> np.ndarray:
    if kind == "FP32":
        return raw.view(np.float32).astype(np.float32)
    if kind == "FP16":
        return raw.view(np.float16).astype(np.float32)
    return _dequant_ggml(kind, np.asarray(raw).reshape(-1, _QBLOCK[kind]))


def _dequant_ggml(kind: str, b: np.ndarray) -> np.ndarray:
    """GGML block formats (32 values a block), as ggml's dequantize_row_* computes them."""
    d = b[:, :2].copy().view(np.float16).astype(np.float32)                # (nb, 1)
    if kind == "Q8_0":
        return (d * b[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    if kind in ("Q4_1", "Q5_1"):
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        rest = b[:, 4:]
    else:
        m, rest = None, b[:, 2:]
    if kind in ("Q5_0", "Q5_1"):
        qh = rest[:, :4].copy().view("<u4")                                 # (nb, 1) high bits
        qs = rest[:, 4:]
        bits = (qh >> np.arange(32, dtype=np.uint32)) & 1                    # (nb, 32)
        lo = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int32) | (bits.astype(np.int32) << 4)
        q = lo - (16 if m is None else 0)
    else:
        qs = rest
        q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int32) - (8 if m is None else 0)
    y = d * q.astype(np.float32)
    if m is not None:
        y = y + m
    return y.reshape(-1).astype(np.float32)


def from_rwkv_cpp(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """rwkv.cpp's stored forms -> BlinkDL's state dict (rwkv.cpp's convert_pytorch_to_ggml inverted)."""
    names = set(t)
    v7 = "blocks.0.att.x_rwkvag" in names
    v6 = "blocks.0.att.time_maa_x" in names
    v5 = "blocks.0.att.ln_x.weight" in names
    out = {}
    for name, a in t.items():
        if v7 and name.endswith(".att.x_rwkvag"):
            six = a.reshape(6, -1)
            for j, c in enumerate("rwkvag"):
                out[name[: -len("x_rwkvag")] + "x_" + c] = six[j].copy()
            continue
        if v7 and any(name.endswith(n) for n in _V7_LORA):
            a = np.ascontiguousarray(a.T)
        elif v6 and name.endswith(("time_maa_w1", "time_decay_w1", "time_decay_w2")):
            a = np.ascontiguousarray(a.T)
        elif v6 and name.endswith("time_maa_w2"):
            a = np.ascontiguousarray(a.transpose(0, 2, 1))
        elif not v6 and not v7 and name.endswith(".time_decay"):
            if v5:   # stored exp(-exp(decay)); float64 keeps the round trip within float32 ulps
                a = np.log(-np.log(a.astype(np.float64))).astype(np.float32)
            else:    # v4: stored -exp(decay)
                a = np.log(-a.astype(np.float64)).astype(np.float32)
        elif v5 and not v6 and name.endswith(".time_first"):
            name = name[: -len("time_first")] + "time_faaaa"                 # stored exp(first): the real bonus
        out[name] = a
    if v5 and not v6:
        # time_faaaa shapes: keep (H, N) when per channel so the head size stays readable
        for n in [k for k in out if k.endswith(".time_faaaa") or k.endswith(".time_decay")]:
            s = [d for d in out[n].shape if d > 1]
            out[n] = out[n].reshape(s if s else (1,))
    if v6:
        for n in [k for k in out if k.endswith(".time_faaaa")]:
            s = [d for d in out[n].shape if d > 1]
            out[n] = out[n].reshape(s)
    return out


# HF layouts with BlinkDL's parameter names under rwkv.blocks.{i}.attention / feed_forward:
# transformers' RwkvForCausalLM (v4) and the RWKV org's Rwkv5/Rwkv6ForCausalLM (remote code)
HF_ARCHITECTURES = ("RwkvForCausalLM", "Rwkv5ForCausalLM", "Rwkv6ForCausalLM")
_HF_NAMES = [
    ("rwkv.embeddings.weight", "emb.weight"), ("rwkv.ln_out.", "ln_out."), ("head.weight", "head.weight"),
    (".pre_ln.", ".ln0."), (".attention.time_mix_key", ".att.time_mix_k"),
    (".attention.time_mix_value", ".att.time_mix_v"), (".attention.time_mix_receptance", ".att.time_mix_r"),
    (".feed_forward.time_mix_key", ".ffn.time_mix_k"), (".feed_forward.time_mix_receptance", ".ffn.time_mix_r"),
    (".attention.", ".att."), (".feed_forward.", ".ffn."),
]


def hf_to_blinkdl(name: str) -> str:
    for a, b in _HF_NAMES:
        name = name.replace(a, b)
    return name[len("rwkv."):] if name.startswith("rwkv.") else name


def read_hf(src: Path) -> dict[str, np.ndarray]:
    """safetensors weights, or the pytorch_model*.bin the RWKV HF repos ship (read by the restricted
    .pth reader: tensors only, no code)."""
    from . import hf
    from .pth import load_pth
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not (src / "model.safetensors").is_file() and not (src / "model.safetensors.index.json").is_file() and bins:
        out = {}
        for b in bins:
            out.update({hf_to_blinkdl(n): t.float32() for n, t in load_pth(b).items()})
        return out
    files = hf.open_weights(src)
    return {hf_to_blinkdl(n): f.float32(n) for n, f in files.items()}


# ------------------------------------------------------------------ tokenizer

def tokenizer_for(src: Path, vocab_size: int, tokenizer: str | Path | None = None) -> dict:
    """The model file's tokenizer: an explicit file, else one beside the source, else byte-level for
    256-token models. World vocabularies (rwkv_vocab_*.txt) and tokenizer.json (20B, Pile) are read."""
    from edgerun.tokenizer import Tokenizer
    from edgerun.tokenizer_rwkv import ByteTokenizer, WorldTokenizer
    folder = src if src.is_dir() else src.parent
    cands = [Path(tokenizer)] if tokenizer else (sorted(folder.glob("rwkv_vocab*.txt"))
                                                  + [folder / "tokenizer.json", folder / "20B_tokenizer.json"])
    for c in cands:
        if c.is_file() and c.suffix == ".txt":
            return WorldTokenizer.from_vocab_file(c).to_dict()
        if c.is_file() and c.suffix == ".json":
            return Tokenizer.from_file(c).to_dict()
    if tokenizer:
        raise ConversionError(f"{tokenizer}: no such tokenizer file")
    if vocab_size == 256:
        return ByteTokenizer().to_dict()
    if vocab_size == 65536:
        raise ConversionError(f"{src}: an RWKV World model needs its vocabulary: put rwkv_vocab_v20230424.txt "
                              f"beside it or pass tokenizer=PATH")
    raise ConversionError(f"{src}: no tokenizer found beside the checkpoint (tokenizer.json or rwkv_vocab_*.txt)")


# ------------------------------------------------------------------ conversion

def source_kind(src: Path) -> str | None:
    """'pth', 'rwkv_cpp', 'hf_rwkv' or None when src is none of these."""
    if src.is_dir():
        cfg = src / "config.json"
        if cfg.is_file():
            try:
                archs = json.loads(cfg.read_text()).get("architectures") or []
            except ValueError:
                return None
            if set(archs) & set(HF_ARCHITECTURES):
                return "hf_rwkv"
        return None
    if src.suffix.lower() in (".pth", ".pt"):
        return "pth"
    if src.is_file():
        with open(src, "rb") as f:
            head = f.read(4)
        if len(head) == 4 and struct.unpack("<I", head)[0] == RWKV_CPP_MAGIC:
            return "rwkv_cpp"
    return None


def load_blinkdl(src: Path) -> tuple[dict[str, np.ndarray], str]:
    """Any RWKV source -> (BlinkDL state dict, what it was)."""
    kind = source_kind(src)
    if kind == "pth":
        return read_pth(src), kind
    if kind == "rwkv_cpp":
        return from_rwkv_cpp(read_rwkv_cpp(src)[1]), kind
    if kind == "hf_rwkv":
        return read_hf(src), kind
    raise ConversionError(f"{src}: not an RWKV checkpoint (.pth, rwkv.cpp .bin or RwkvForCausalLM directory)")


def convert_rwkv(src, out, quant: str | None = None, group_size: int = 32, *, lnx_eps: float | None = None,
                 tokenizer=None, progress=None) -> str:
    """Convert an RWKV source into the model file ``out``; returns the content hash.

    lnx_eps: the ln_x GroupNorm epsilon. Default: BlinkDL's 64e-5, except rwkv.cpp files of v5,
    whose graph uses 1e-5 (so that they give rwkv.cpp's logits)."""
    src = Path(src)
    sd, kind = load_blinkdl(src)
    shapes = {k: v.shape for k, v in sd.items()}
    version = detect_version(sd, shapes)
    head = _head_size(sd, version)
    if lnx_eps is None and kind == "rwkv_cpp" and version in ("5", "5.1", "5.2"):
        lnx_eps = 1e-5
    _unsupported(sd)
    cfg = make_config(sd, version, head, lnx_eps)
    if kind == "hf_rwkv":       # HF's rescale_every only guards fp16 overflow; float32 runs need none
        hf_cfg = json.loads((src / "config.json").read_text())
        cfg["layer_norm_epsilon"] = float(hf_cfg.get("layer_norm_epsilon", 1e-5))
    cfg["source_format"] = kind
    tok = tokenizer_for(src, cfg["vocab_size"], tokenizer)
    if quant is None and kind == "rwkv_cpp":
        # FP32 files that are small stay exact; already-quantized ones (Q5_1...) become int8, not bigger floats
        dtype = read_rwkv_cpp_header(src)["data_type"]
        quant = "int8" if dtype >= 2 else ("f32" if src.stat().st_size < (64 << 20) else "f16")
    quant = quant or "f16"

    def tensors() -> Iterator:                  # one source tensor in float32 at a time
        for name in sorted(sd, key=_order):
            c = canonical_tensor(name, _f32(sd[name]), version)
            if c is not None:
                yield c[0], pack(c[0], c[1], quant, group_size, KEEP_FLOAT)

    return edr.write(out, arch=cfg["architecture"], config=cfg, tokenizer=tok, tensors=tensors(),
                     extra={"quant": quant, "source": src.name}, progress=progress)


def _order(name: str):
    p = name.split(".")
    if p[0] == "blocks":
        return (1, int(p[1]), name)
    return (0 if name.startswith("emb") else 2, 0, name)
