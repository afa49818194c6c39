"""Which packed kind each tensor gets, and packing it.

Rules by tensor name, first match wins:
  1. vectors (norms, biases) and a family's KEEP_FLOAT matrices stay float32;
  2. ``--rules`` (``PATTERN=KIND,...``, PATTERN a regular expression searched in the tensor name,
     ``*`` for any): e.g. ``embed_tokens|lm_head=int8,*=int4``;
  3. with a low-bit --quant (ternary, ternary_b3, binary), embeddings and the output head stay f16
     (as BitNet keeps them in bf16): ternarizing the vocabulary table ruins a model;
  4. --quant for every other matrix.
int4 (and int4_asym, with a min per group) needs the input size to be a multiple of the group; a
matrix where it is not falls back to int8 per channel. Sparsity (--sparsity S --sparsity-pattern 2:4|unstructured) prunes the layers'
matrices by magnitude (converters/sparsify.py; never embeddings or the head) and stores them as
sparse24 / csr with int8 values when their kind is int8, f16 values otherwise; low-bit and int4
matrices cannot also be sparse. The file records every tensor's kind and parameters, and the
plan itself (quant, rules, sparsity) in its metadata.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from edgerun.errors import ConversionError
from edgerun.format import PackedTensor
from edgerun.packed import bf16_bits, f16_bits

from . import sparsify

# int4: symmetric, a scale per group (as Q4_0); int4_asym: a scale and a min per group (as Q4_1)
QUANT_KINDS = ("f32", "f16", "bf16", "int8", "int4", "int4_asym", "ternary", "ternary_b3", "binary")
LOWBIT = ("ternary", "ternary_b3", "binary")
INT4_GROUPS = (32, 64, 128)
BINARY_GROUP = 128
SPARSITY_PATTERNS = ("2:4", "unstructured")
# embeddings and output heads of the supported families (HF, RWKV, xLSTM names)
EMBED_OR_HEAD = re.compile(r"embed|lm_head|(^|\.)(emb|head|wte|output)\.")


def check_quant(quant: str, group_size: int | None) -> None:
    if quant not in QUANT_KINDS:
        raise ConversionError(f"unknown --quant {quant!r} (choose one of: {', '.join(QUANT_KINDS)})")
    if group_size is not None and quant in ("int4", "int4_asym") and group_size not in INT4_GROUPS:
        raise ConversionError(f"--group-size {group_size} is not supported for int4 (choose 32, 64 or 128)")
    if group_size is not None and quant == "binary" and (group_size <= 0 or group_size % 8):
        raise ConversionError(f"--group-size {group_size} is not supported for binary (a multiple of 8, e.g. 128)")


def parse_rules(text: str | None) -> tuple[tuple[str, str], ...]:
    """'embed_tokens|lm_head=int8,*=int4' -> (('embed_tokens|lm_head', 'int8'), ('*', 'int4'))."""
    if not text:
        return ()
    rules = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        pat, eq, kind = item.rpartition("=")
        pat, kind = pat.strip(), kind.strip()
        if not eq or not pat:
            raise ConversionError(f"--rules: {item!r} is not PATTERN=KIND (e.g. 'embed_tokens|lm_head=int8,*=int4')")
        if kind not in QUANT_KINDS:
            raise ConversionError(f"--rules: unknown kind {kind!r} in {item!r} (choose one of: {', '.join(QUANT_KINDS)})")
        if pat != "*":
            try:
                re.compile(pat)
            except re.error as e:
                raise ConversionError(f"--rules: {pat!r} is not a regular expression ({e})") from None
        rules.append((pat, kind))
    return tuple(rules)


@dataclass
class QuantPlan:
    """How a conversion packs each tensor. ``record()`` goes into the file's metadata."""
    quant: str = "f16"
    group: int | None = None                  # --group-size: int4 (default 32) and binary (default 128)
    rules: tuple = ()                         # ((pattern, kind), ...)
    sparsity: float = 0.0
    pattern: str | None = None                # "2:4" | "unstructured" | None (dense)
    keep_float: tuple = ()
    _compiled: list = field(default_factory=list, repr=False)

    @classmethod
    def make(cls, quant="f16", group=None, rules=None, sparsity=None, pattern=None, keep_float=()):
        check_quant(quant, group)
        parsed = parse_rules(rules) if isinstance(rules, (str, type(None))) else tuple(rules)
        for _, kind in parsed:
            check_quant(kind, group)
        if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
            raise ConversionError(f"--sparsity must be a fraction in [0, 1) (e.g. 0.5 or 0.9), got {sparsity}")
        if pattern is not None and pattern not in SPARSITY_PATTERNS:
            raise ConversionError(f"--sparsity-pattern must be one of {', '.join(SPARSITY_PATTERNS)}, got {pattern!r}")
        if pattern == "2:4":
            if sparsity not in (None, 0.5):
                raise ConversionError(f"--sparsity-pattern 2:4 keeps 2 of every 4 weights (sparsity 0.5); "
                                      f"--sparsity {sparsity} does not fit it")
            sparsity = 0.5
        elif sparsity:
            pattern = pattern or "unstructured"
        elif pattern == "unstructured":
            raise ConversionError("--sparsity-pattern unstructured needs --sparsity S (the fraction to prune, e.g. 0.9)")
        else:
            sparsity, pattern = 0.0, None
        if pattern and quant not in ("f32", "f16", "bf16", "int8"):
            raise ConversionError(f"--sparsity stores the kept weights as f16 or int8: use --quant f16 or int8 "
                                  f"with it, not {quant}")
        plan = cls(quant, group, parsed, float(sparsity), pattern, tuple(keep_float))
        plan._compiled = [(None if p == "*" else re.compile(p), k) for p, k in parsed]
        return plan

    def record(self) -> dict:
        r = {"quant": self.quant}
        if self.rules:
            r["rules"] = ",".join(f"{p}={k}" for p, k in self.rules)
        if self.pattern:
            r["sparsity"] = self.sparsity
            r["sparsity_pattern"] = self.pattern
        return r

    def kind_for(self, name: str, shape: tuple) -> tuple[str, dict]:
        if len(shape) != 2 or any(k in name for k in self.keep_float):
            return "f32", {}
        kind = next((k for pat, k in self._compiled if pat is None or pat.search(name)), None)
        if kind is None:
            kind = "f16" if self.quant in LOWBIT and EMBED_OR_HEAD.search(name) else self.quant
        if kind in ("int4", "int4_asym"):
            group = self.group or 32
            params = {"group": group} if kind == "int4" else {"group": group, "symmetric": False}
            return ("int4", params) if shape[1] % group == 0 else ("int8", {})
        if kind == "binary":
            return "binary", {"group": self.group or BINARY_GROUP}
        if self.pattern and kind in ("f32", "f16", "bf16", "int8") and not EMBED_OR_HEAD.search(name):
            values = "int8" if kind == "int8" else "f16"
            return ("sparse24" if self.pattern == "2:4" else "csr"), {"values": values}
        return kind, {}

    def pack(self, name: str, w32: np.ndarray) -> PackedTensor:
        """float32 weight -> PackedTensor of the kind the rules give."""
        kind, params = self.kind_for(name, w32.shape)
        if kind == "f16":
            return PackedTensor("f16", w32.shape, {}, {"w": f16_bits(w32)})
        if kind == "bf16":
            return PackedTensor("bf16", w32.shape, {}, {"w": bf16_bits(w32)})
        try:
            if kind == "sparse24":
                w32 = sparsify.prune_2_4(w32, name)
            elif kind == "csr":
                w32 = sparsify.prune_unstructured(w32, self.sparsity, name)
            return PackedTensor.from_array(w32, kind, **params)
        except ConversionError as e:
            msg = str(e)
            raise ConversionError(msg if msg.startswith(name) else f"tensor {name}: {msg}") from None


def kind_for(name: str, shape: tuple, quant: str, group: int, keep_float=()) -> tuple[str, dict]:
    """keep_float: name fragments of matrices that stay float32 (a family's KEEP_FLOAT, e.g. SSM A_log)."""
    return QuantPlan.make(quant, group, keep_float=keep_float).kind_for(name, shape)


def pack(name: str, w32: np.ndarray, quant: str, group: int, keep_float=()) -> PackedTensor:
    """float32 weight -> PackedTensor of the kind --quant gives (no rules, no sparsity)."""
    return QuantPlan.make(quant, group, keep_float=keep_float).pack(name, w32)
