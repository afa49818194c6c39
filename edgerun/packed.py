"""Packed weight kinds: typed containers and their NumPy codecs.

Each kind is a small codec class registered by name. Its ``pack`` / ``unpack``
pair is the single source of truth for the layout; kernels take the fields of
the container, never the container, so they stay pure and cacheable.

In a model file a packed tensor is a *descriptor* (kind, logical shape, the
kind's parameters) plus one raw buffer per part, stored as ordinary
safetensors entries named ``<tensor>.<part>``. New kinds (ternary, binary,
sparse) add a codec and new parts; the file format does not change.

Scales may be float16 (stored as their raw uint16 bits, decoded in the
kernels) or float32: the part's dtype says which.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import ConversionError, ModelFileError


# ---------------------------------------------------------------- containers

class DenseWeight(NamedTuple):
    """Unquantized weight. float32 as is; float16 and bfloat16 as their raw uint16 bits."""
    w: np.ndarray          # float32 | uint16   (out, in) or any shape
    dtype: str             # "f32" | "f16" | "bf16"


class Int8Weight(NamedTuple):
    """Symmetric int8, one scale per group of ``group`` inputs (group == in: per output channel).
    Written by converters/quant.py (per channel) and converters/gguf.py (Q8_0, group 32)."""
    q: np.ndarray          # int8   (out, in)
    scales: np.ndarray     # float32 | uint16 (f16 bits)  (out, in // group)
    group: int


class Int4Weight(NamedTuple):
    """Group-wise int4, two per byte. Within a group of g inputs, byte j holds input j
    in its low nibble and input j + g/2 in its high nibble (GGML's Q4_0/Q4_1 order for g=32).
    Symmetric: w = scale * (q - 8).  With mins: w = scale * q + min.
    Written by converters/quant.py and converters/gguf.py (Q4_0, Q4_1)."""
    qs: np.ndarray         # uint8  (out, in // 2)
    scales: np.ndarray     # float32 | uint16 (f16 bits)  (out, in // group)
    mins: np.ndarray       # same dtype as scales (out, in // group), or shape (0, 0) when symmetric
    group: int


class TernaryWeight(NamedTuple):
    """BitNet b1.58 ternary, 2 bits a weight: w = scale * t, t in {-1, 0, +1}, stored as code t + 1.
    Rows are padded with t = 0 to a multiple of 128 inputs. In block b of 128 inputs (32 bytes),
    byte j holds inputs b*128 + j (bits 0-1), + 32 (bits 2-3), + 64 (bits 4-5), + 96 (bits 6-7),
    so one 32-byte load and four shift-and-masks give four contiguous runs of 32 codes.
    Kernels quantize activations to int8 per token (BitLinear) and accumulate in int32.
    Written by converters/quant.py (absmean) and converters/bitnet.py (microsoft's packed 2-bit)."""
    codes: np.ndarray      # uint8  (out, ceil(in / 128) * 32)
    scales: np.ndarray     # float32 (1,) per tensor (BitNet) or (out,) per row
    n: int                 # logical input size


class TernaryB3Weight(NamedTuple):
    """Ternary, base 3: five weights a byte (1.6 bits). Rows padded with t = 0 to a multiple of 160.
    In block b of 160 inputs (32 bytes), byte j holds the trits c_i = t + 1 of inputs
    b*160 + i*32 + j, i = 0..4, as v = sum c_i * 3**(4 - i) stored as ceil(v * 256 / 243):
    digit i is then ((byte * 3**i) & 255) * 3 >> 8, multiplies and shifts only (llama.cpp's TQ1_0 trick)."""
    codes: np.ndarray      # uint8  (out, ceil(in / 160) * 32)
    scales: np.ndarray     # float32 (1,) or (out,)
    n: int


class BinaryWeight(NamedTuple):
    """1 bit a weight: w = scale_g * (+1 if bit else -1), one scale (mean |w|) per group of inputs.
    Rows padded to a multiple of group (padding bits 0, ignored: the activations there are 0).
    In group g (group/8 bytes), bit i of byte j is input g*group + i*group/8 + j.
    Kernels quantize activations to int8 per token, like the ternary kinds."""
    bits: np.ndarray       # uint8  (out, ceil(in / group) * group / 8)
    scales: np.ndarray     # uint16 f16 bits (out, ceil(in / group))
    group: int
    n: int


class Sparse24Weight(NamedTuple):
    """2:4 semi-structured sparsity: in every group of 4 inputs 2 values are kept, in input order.
    The 2-bit positions p0 < p1 of a group are stored as its 4-bit mask (1 << p0) | (1 << p1) (the
    same 4 bits): meta byte k holds groups 2k (low nibble) and 2k+1 (high), so bit j of a row's
    meta read as little-endian words is input j, which AVX-512's vpexpandb takes as is to scatter
    the kept values back into place. Values int8 (w = scales[row] * v) or float16 bits (scales empty).
    Written by converters/quant.py after converters/sparsify.py's pruning."""
    vals: np.ndarray       # int8 | uint16 (f16 bits)  (out, in // 2)
    meta: np.ndarray       # uint8 (out, ceil(in / 8))
    scales: np.ndarray     # float32 (out,) for int8 values, (0,) for f16


class CsrWeight(NamedTuple):
    """Unstructured sparsity, compressed rows: row r keeps vals[row_ptr[r]:row_ptr[r+1]] at input
    columns cols[...] (ascending). Only non-zero values are stored. Values int8 (w = scales[r] * v)
    or float16 bits (scales all 1). cols are uint16 when in <= 65536, else int32."""
    scales: np.ndarray     # float32 (out,)
    row_ptr: np.ndarray    # int64 (out + 1,)
    cols: np.ndarray       # uint16 | int32 (nnz,)
    vals: np.ndarray       # int8 | uint16 (f16 bits) (nnz,)
    n: int


# ---------------------------------------------------------------- helpers

def f16_bits(a: np.ndarray) -> np.ndarray:
    """float -> float16 raw bits (uint16)."""
    return np.ascontiguousarray(a, dtype=np.float16).view(np.uint16)


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 raw bits, round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def scales_to_f32(s: np.ndarray) -> np.ndarray:
    return s.view(np.float16).astype(np.float32) if s.dtype == np.uint16 else s.astype(np.float32)


def dense_to_f32(w: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return np.asarray(w, dtype=np.float32)
    if dtype == "f16":
        return w.view(np.float16).astype(np.float32)
    if dtype == "bf16":
        return (w.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(dtype)


# ---------------------------------------------------------------- codecs

CODECS: dict[str, type] = {}


def register(cls):
    CODECS[cls.kind] = cls
    return cls


class Codec:
    """A packed kind. ``pack`` returns (parts, params); ``unpack`` is its exact inverse on the grid."""
    kind: str
    parts: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @classmethod
    def required(cls) -> tuple[str, ...]:
        return tuple(p for p in cls.parts if p not in cls.optional)

    @classmethod
    def pack(cls, w: np.ndarray, **params) -> tuple[dict[str, np.ndarray], dict]:
        raise NotImplementedError

    @classmethod
    def container(cls, parts: dict[str, np.ndarray], params: dict):
        raise NotImplementedError

    @classmethod
    def unpack(cls, c) -> np.ndarray:
        raise NotImplementedError


def _dense_codec(name: str, to_bits):
    @register
    class _Dense(Codec):
        kind = name
        parts = ("w",)

        @classmethod
        def pack(cls, w, **params):
            return {"w": to_bits(w)}, {}

        @classmethod
        def container(cls, parts, params):
            return DenseWeight(parts["w"], name)

        @classmethod
        def unpack(cls, c):
            return dense_to_f32(c.w, c.dtype)

    _Dense.__name__ = f"Dense{name.upper()}"
    return _Dense


F32 = _dense_codec("f32", lambda w: np.ascontiguousarray(w, dtype=np.float32))
F16 = _dense_codec("f16", f16_bits)
BF16 = _dense_codec("bf16", bf16_bits)


def _check_groups(w: np.ndarray, group: int, kind: str):
    if w.ndim != 2:
        raise ConversionError(f"{kind} needs a 2-D weight, got shape {w.shape}")
    if group <= 0 or w.shape[1] % group:
        raise ConversionError(
            f"{kind}: input size {w.shape[1]} is not a multiple of the group size {group}")


@register
class Int8(Codec):
    kind = "int8"
    parts = ("q", "scales")

    @classmethod
    def pack(cls, w, group=None, **params):
        w = np.asarray(w, dtype=np.float32)
        group = group or (w.shape[1] if w.ndim == 2 else 0)
        _check_groups(w, group, cls.kind)
        g = w.reshape(w.shape[0], -1, group)
        scales = np.abs(g).max(axis=2) / 127.0
        inv = np.where(scales > 0, 1.0 / np.where(scales > 0, scales, 1), 0)
        q = np.clip(np.rint(g * inv[..., None]), -127, 127).astype(np.int8)
        return {"q": q.reshape(w.shape), "scales": scales.astype(np.float32)}, {"group": group}

    @classmethod
    def container(cls, parts, params):
        return Int8Weight(parts["q"], parts["scales"], int(params["group"]))

    @classmethod
    def unpack(cls, c):
        out, n = c.q.shape
        s = scales_to_f32(c.scales)
        return (c.q.reshape(out, -1, c.group) * s[..., None]).reshape(out, n).astype(np.float32)


def int4_interleave(q: np.ndarray, group: int) -> np.ndarray:
    """(out, in) nibbles in 0..15 -> (out, in // 2) bytes in the Int4Weight layout."""
    out, n = q.shape
    g = q.reshape(out, n // group, 2, group // 2).astype(np.uint8)
    return (g[:, :, 0, :] | (g[:, :, 1, :] << 4)).reshape(out, n // 2)


def int4_deinterleave(qs: np.ndarray, group: int) -> np.ndarray:
    """Inverse of int4_interleave: (out, in // 2) bytes -> (out, in) nibbles."""
    out, nb = qs.shape
    b = qs.reshape(out, -1, group // 2)
    return np.stack([b & 15, b >> 4], axis=2).reshape(out, nb * 2)


@register
class Int4(Codec):
    kind = "int4"
    parts = ("qs", "scales", "mins")
    optional = ("mins",)

    @classmethod
    def pack(cls, w, group=32, symmetric=True, **params):
        w = np.asarray(w, dtype=np.float32)
        _check_groups(w, group, cls.kind)
        if group % 2:
            raise ConversionError(f"int4 group size must be even, got {group}")
        g = w.reshape(w.shape[0], -1, group)
        if symmetric:
            # q - 8 in -8..7; the largest magnitude maps to -8 so the full range is used
            idx = np.abs(g).argmax(axis=2)[..., None]
            peak = np.take_along_axis(g, idx, axis=2)[..., 0]
            scales = (peak / -8.0 + 0.0).astype(np.float16)      # + 0.0: an all-zero group gets +0, not -0
            s = scales.astype(np.float32)
            inv = np.where(s != 0, 1.0 / np.where(s != 0, s, 1), 0)
            q = np.clip(np.rint(g * inv[..., None]) + 8, 0, 15)
            parts = {"scales": f16_bits(scales)}
        else:
            lo, hi = g.min(axis=2), g.max(axis=2)
            scales = ((hi - lo) / 15.0).astype(np.float16)
            mins = lo.astype(np.float16)
            s, m = scales.astype(np.float32), mins.astype(np.float32)
            inv = np.where(s != 0, 1.0 / np.where(s != 0, s, 1), 0)
            q = np.clip(np.rint((g - m[..., None]) * inv[..., None]), 0, 15)
            parts = {"scales": f16_bits(scales), "mins": f16_bits(mins)}
        parts["qs"] = int4_interleave(q.reshape(w.shape).astype(np.uint8), group)
        return parts, {"group": group}

    @classmethod
    def container(cls, parts, params):
        mins = parts.get("mins")
        if mins is None:
            mins = np.zeros((0, 0), dtype=parts["scales"].dtype)
        return Int4Weight(parts["qs"], parts["scales"], mins, int(params["group"]))

    @classmethod
    def unpack(cls, c):
        q = int4_deinterleave(c.qs, c.group).astype(np.float32)
        out, n = q.shape
        q = q.reshape(out, -1, c.group)
        s = scales_to_f32(c.scales)[..., None]
        if c.mins.size:
            w = q * s + scales_to_f32(c.mins)[..., None]
        else:
            w = (q - 8) * s
        return w.reshape(out, n).astype(np.float32)


# ---------------------------------------------------------------- low-bit kinds

TERNARY_BLOCK = 128        # inputs per 32-byte block, 2-bit packing
TERNARY_B3_BLOCK = 160     # inputs per 32-byte block, base-3 packing
_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.int32)


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


def pack_trits2(t: np.ndarray) -> np.ndarray:
    """(out, n) trits in {-1, 0, 1} -> (out, ceil(n/128)*32) uint8 codes, TernaryWeight layout."""
    out, n = t.shape
    c = np.ones((out, _padded(n, TERNARY_BLOCK)), np.uint8)
    c[:, :n] = t + 1
    c = c.reshape(out, -1, 4, 32)
    return (c[:, :, 0] | c[:, :, 1] << 2 | c[:, :, 2] << 4 | c[:, :, 3] << 6).reshape(out, -1)


def unpack_trits2(codes: np.ndarray, n: int) -> np.ndarray:
    """Inverse of pack_trits2 -> (out, n) int8 trits."""
    out = codes.shape[0]
    b = codes.reshape(out, -1, 1, 32)
    c = (b >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3           # (out, blocks, 4, 32)
    return (c.reshape(out, -1)[:, :n].astype(np.int8) - 1)


def pack_trits3(t: np.ndarray) -> np.ndarray:
    """(out, n) trits -> (out, ceil(n/160)*32) uint8, TernaryB3Weight layout."""
    out, n = t.shape
    c = np.ones((out, _padded(n, TERNARY_B3_BLOCK)), np.int32)
    c[:, :n] = t + 1
    v = (c.reshape(out, -1, 5, 32) * _POW3[:, None]).sum(axis=2)       # (out, blocks, 32) in 0..242
    return ((v * 256 + 242) // 243).astype(np.uint8).reshape(out, -1)


def unpack_trits3(codes: np.ndarray, n: int) -> np.ndarray:
    out = codes.shape[0]
    q = codes.reshape(out, -1, 1, 32).astype(np.int32)
    mul = np.array([1, 3, 9, 27, 81], np.int32)[:, None]
    d = (((q * mul) & 255) * 3) >> 8                                    # (out, blocks, 5, 32)
    return (d.reshape(out, -1)[:, :n] - 1).astype(np.int8)


def ternarize(w: np.ndarray, per_row: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """BitNet b1.58 absmean: gamma = mean |w| (per tensor, or per row), t = clip(round(w / gamma), -1, 1),
    as transformers' WeightQuant (scale 1 / gamma.clamp(1e-5)). Weights already on a grid {-s, 0, s}
    keep s, so quantizing a dequantized tensor gives it back. -> (trits int8, scales float32)."""
    w = np.asarray(w, dtype=np.float32)
    rows = w if per_row else w.reshape(1, -1)
    a = np.abs(rows)
    gamma = np.maximum(a.mean(axis=1, dtype=np.float64).astype(np.float32), np.float32(1e-5))
    inv = (np.float32(1.0) / gamma).astype(np.float32)
    t = np.clip(np.rint(rows * inv[:, None]), -1, 1).astype(np.int8)
    # already ternary (every non-zero |w| equal): keep that value as the scale
    nz = a > 0
    hi = np.where(nz, a, 0).max(axis=1)
    lo = np.where(nz, a, np.inf).min(axis=1)
    grid = (hi == lo) & nz.any(axis=1)
    if grid.any():
        t[grid] = np.sign(rows[grid]).astype(np.int8)
        gamma = np.where(grid, hi, gamma).astype(np.float32)
    return t.reshape(w.shape), gamma


class _TernaryCodec(Codec):
    parts = ("codes", "scales")
    packer = staticmethod(pack_trits2)
    unpacker = staticmethod(unpack_trits2)
    cls = TernaryWeight

    @classmethod
    def pack(cls, w, per_row=False, **params):
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise ConversionError(f"{cls.kind} needs a 2-D weight, got shape {w.shape}")
        t, scales = ternarize(w, per_row)
        return {"codes": cls.packer(t), "scales": scales}, {"n": w.shape[1], "per_row": bool(per_row)}

    @classmethod
    def container(cls, parts, params):
        return cls.cls(parts["codes"], parts["scales"], int(params["n"]))

    @classmethod
    def trits(cls, c) -> np.ndarray:
        return cls.unpacker(c.codes, c.n)

    @classmethod
    def unpack(cls, c):
        s = c.scales.astype(np.float32)
        return (cls.trits(c) * (s[:, None] if s.shape[0] > 1 else s[0])).astype(np.float32)


@register
class Ternary(_TernaryCodec):
    kind = "ternary"


@register
class TernaryB3(_TernaryCodec):
    kind = "ternary_b3"
    packer = staticmethod(pack_trits3)
    unpacker = staticmethod(unpack_trits3)
    cls = TernaryB3Weight


@register
class Binary(Codec):
    kind = "binary"
    parts = ("bits", "scales")

    @classmethod
    def pack(cls, w, group=128, **params):
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise ConversionError(f"binary needs a 2-D weight, got shape {w.shape}")
        if group <= 0 or group % 8:
            raise ConversionError(f"binary group size must be a positive multiple of 8, got {group}")
        out, n = w.shape
        npad = _padded(n, group)
        wp = np.zeros((out, npad), np.float32)
        wp[:, :n] = w
        g = wp.reshape(out, -1, group)
        counts = np.full(npad // group, group, np.float64)
        counts[-1] = n - (npad - group)
        scales = (np.abs(g).sum(axis=2, dtype=np.float64) / counts).astype(np.float16)
        b = (wp >= 0).astype(np.uint8)
        b[:, n:] = 0
        b = b.reshape(out, -1, 8, group // 8)
        bits = np.zeros(b.shape[:2] + (group // 8,), np.uint8)
        for i in range(8):
            bits |= b[:, :, i] << i
        return {"bits": bits.reshape(out, -1), "scales": f16_bits(scales)}, {"group": group, "n": n}

    @classmethod
    def container(cls, parts, params):
        return BinaryWeight(parts["bits"], parts["scales"], int(params["group"]), int(params["n"]))

    @classmethod
    def signs(cls, c) -> np.ndarray:
        """(out, n) int8 in {-1, +1}."""
        out = c.bits.shape[0]
        b = c.bits.reshape(out, -1, 1, c.group // 8)
        s = (b >> np.arange(8, dtype=np.uint8)[:, None]) & 1
        return (s.reshape(out, -1)[:, :c.n].astype(np.int8) * 2 - 1)

    @classmethod
    def unpack(cls, c):
        s = np.repeat(scales_to_f32(c.scales), c.group, axis=1)[:, :c.n]
        return (cls.signs(c) * s).astype(np.float32)


def _values(v: np.ndarray, values: str, axis_rows: bool = True):
    """Kept values (out, k) float32 -> (stored values, scales): int8 with a scale per row, or f16 bits."""
    if values == "f16":
        return f16_bits(v + np.float32(0.0)), np.zeros(0, np.float32)   # + 0: no -0.0 on the way back
    if values != "int8":
        raise ConversionError(f"sparse values must be int8 or f16, got {values!r}")
    scales = (np.abs(v).max(axis=1) / 127.0).astype(np.float32) if v.shape[1] else np.zeros(v.shape[0], np.float32)
    inv = np.where(scales > 0, 1.0 / np.where(scales > 0, scales, 1), 0)
    q = np.clip(np.rint(v * inv[:, None]), -127, 127).astype(np.int8)
    return q, scales


def _values_f32(vals: np.ndarray, scales: np.ndarray) -> np.ndarray:
    if vals.dtype == np.uint16:
        return vals.view(np.float16).astype(np.float32)
    return vals.astype(np.float32) * scales.reshape(-1, *([1] * (vals.ndim - 1)))


@register
class Sparse24(Codec):
    """Keeps the 2 largest |w| of every 4 (ties: the lower input); the pruning itself."""
    kind = "sparse24"
    parts = ("vals", "meta", "scales")
    optional = ("scales",)

    @classmethod
    def pack(cls, w, values="int8", **params):
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 2 or w.shape[1] % 4:
            raise ConversionError(f"2:4 sparsity needs an input size that is a multiple of 4, got shape {w.shape}")
        out, n = w.shape
        g = w.reshape(out, -1, 4)
        pos = np.sort(np.argsort(-np.abs(g), axis=2, kind="stable")[:, :, :2], axis=2)
        v = np.take_along_axis(g, pos, axis=2)                         # (out, n/4, 2)
        stored, scales = _values(v.reshape(out, -1), values)
        # a kept value that stores as 0 gives its slot to the lowest free position: canonical
        zero = (_values_f32(stored, scales) == 0).reshape(out, -1, 2)
        if zero.any():
            pos, stored = _canonical_positions(pos, zero, stored.reshape(out, -1, 2))
            stored = stored.reshape(out, -1)
        nib = ((1 << pos[:, :, 0]) | (1 << pos[:, :, 1])).astype(np.uint8)     # (out, n/4) 4-bit masks
        if nib.shape[1] % 2:
            nib = np.concatenate([nib, np.zeros((out, 1), np.uint8)], axis=1)
        meta = nib[:, 0::2] | nib[:, 1::2] << 4
        parts = {"vals": stored, "meta": meta}
        if values == "int8":
            parts["scales"] = scales
        return parts, {"values": values}

    @classmethod
    def container(cls, parts, params):
        return Sparse24Weight(parts["vals"], parts["meta"], parts.get("scales", np.zeros(0, np.float32)))

    @classmethod
    def positions(cls, c) -> np.ndarray:
        """(out, n/4, 2) kept positions."""
        out, half = c.vals.shape
        nib = np.stack([c.meta & 15, c.meta >> 4], axis=2).reshape(out, -1)[:, :half // 2]
        return np.stack([MASK_P0[nib], MASK_P1[nib]], axis=2).astype(np.int64)

    @classmethod
    def unpack(cls, c):
        out, half = c.vals.shape
        w = np.zeros((out, half // 2, 4), np.float32)
        v = _values_f32(c.vals, c.scales).reshape(out, -1, 2)
        np.put_along_axis(w, cls.positions(c), v, axis=2)
        return w.reshape(out, half * 2)


# 4-bit group mask -> its lower and upper set bit (masks with other than 2 bits set never occur)
MASK_P0 = np.array([(m & -m).bit_length() - 1 if m else 0 for m in range(16)], np.int64)
MASK_P1 = np.array([m.bit_length() - 1 if m else 0 for m in range(16)], np.int64)


def _canonical_positions(pos, zero, stored):
    """Kept values that store as zero give their slots to the lowest positions not holding a
    non-zero, so that packing the unpacked weight picks the same positions (ties: lower input)."""
    out, G, _ = pos.shape
    nz = np.zeros((out, G, 4), bool)
    np.put_along_axis(nz, pos, ~zero, axis=2)
    dense = np.zeros((out, G, 4), stored.dtype)
    np.put_along_axis(dense, pos, np.where(zero, 0, stored).astype(stored.dtype), axis=2)
    key = np.where(nz, -1, np.arange(4))
    new = np.sort(np.argsort(key, axis=2, kind="stable")[:, :, :2], axis=2)
    return new, np.take_along_axis(dense, new, axis=2)


@register
class Csr(Codec):
    """Stores the non-zero weights of each row (prune first: converters/sparsify.py)."""
    kind = "csr"
    parts = ("scales", "row_ptr", "cols", "vals")

    @classmethod
    def pack(cls, w, values="int8", **params):
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise ConversionError(f"csr needs a 2-D weight, got shape {w.shape}")
        out, n = w.shape
        if values == "int8":
            scales = (np.abs(w).max(axis=1) / 127.0).astype(np.float32) if n else np.zeros(out, np.float32)
            inv = np.where(scales > 0, 1.0 / np.where(scales > 0, scales, 1), 0)
            q = np.clip(np.rint(w * inv[:, None]), -127, 127).astype(np.int8)
        elif values == "f16":
            scales = np.ones(out, np.float32)
            q = (w + np.float32(0.0)).astype(np.float16)
        else:
            raise ConversionError(f"sparse values must be int8 or f16, got {values!r}")
        rows, cols = np.nonzero(q)                      # values that store as 0 are not stored
        row_ptr = np.zeros(out + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=out), out=row_ptr[1:])
        vals = q[rows, cols]
        if values == "f16":
            vals = vals.view(np.uint16)
        return ({"scales": scales, "row_ptr": row_ptr,
                 "cols": cols.astype(np.uint16 if n <= 65536 else np.int32), "vals": vals},
                {"values": values, "n": n})

    @classmethod
    def container(cls, parts, params):
        return CsrWeight(parts["scales"], parts["row_ptr"], parts["cols"], parts["vals"], int(params["n"]))

    @classmethod
    def unpack(cls, c):
        out = c.row_ptr.shape[0] - 1
        w = np.zeros((out, c.n), np.float32)
        rows = np.repeat(np.arange(out), np.diff(c.row_ptr))
        v = c.vals.view(np.float16).astype(np.float32) if c.vals.dtype == np.uint16 else \
            c.vals.astype(np.float32) * c.scales[rows]
        w[rows, c.cols.astype(np.int64)] = v
        return w


def codec(kind: str) -> type:
    try:
        return CODECS[kind]
    except KeyError:
        raise ModelFileError(f"unknown packed kind {kind!r} (known: {', '.join(CODECS)})") from None


def unpack(c) -> np.ndarray:
    """Any container -> float32 array (for references and tests)."""
    return codec(kind_of(c)).unpack(c)


_KINDS = {Int8Weight: "int8", Int4Weight: "int4", TernaryWeight: "ternary", TernaryB3Weight: "ternary_b3",
          BinaryWeight: "binary", Sparse24Weight: "sparse24", CsrWeight: "csr"}


def kind_of(c) -> str:
    """The packed kind of a container."""
    return c.dtype if isinstance(c, DenseWeight) else _KINDS[type(c)]


def nbytes(c) -> int:
    return sum(a.nbytes for a in c if isinstance(a, np.ndarray))
