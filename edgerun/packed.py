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


def codec(kind: str) -> type:
    try:
        return CODECS[kind]
    except KeyError:
        raise ModelFileError(f"unknown packed kind {kind!r} (known: {', '.join(CODECS)})") from None


def unpack(c) -> np.ndarray:
    """Any container -> float32 array (for references and tests)."""
    kind = {DenseWeight: None, Int8Weight: "int8", Int4Weight: "int4"}[type(c)]
    return codec(kind or c.dtype).unpack(c)


def nbytes(c) -> int:
    return sum(a.nbytes for a in c if isinstance(a, np.ndarray))
