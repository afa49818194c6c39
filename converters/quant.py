"""Which packed kind each tensor gets, and packing it.

Rules by tensor name: vectors (norms, biases) stay float32; matrices (projections,
embeddings, head) take the requested kind. int4 needs the input size to be a multiple
of the group; a matrix where it is not falls back to int8 per channel, and the file
records the kind each tensor actually got.
"""
from __future__ import annotations

import numpy as np

from edgerun.errors import ConversionError
from edgerun.format import PackedTensor
from edgerun.packed import bf16_bits, f16_bits

QUANT_KINDS = ("f32", "f16", "bf16", "int8", "int4")
INT4_GROUPS = (32, 64, 128)


def check_quant(quant: str, group_size: int | None) -> None:
    if quant not in QUANT_KINDS:
        raise ConversionError(f"unknown --quant {quant!r} (choose one of: {', '.join(QUANT_KINDS)})")
    if group_size is not None and quant == "int4" and group_size not in INT4_GROUPS:
        raise ConversionError(f"--group-size {group_size} is not supported for int4 (choose 32, 64 or 128)")


def kind_for(name: str, shape: tuple, quant: str, group: int, keep_float=()) -> tuple[str, dict]:
    """keep_float: name fragments of matrices that stay float32 (a family's KEEP_FLOAT, e.g. SSM A_log)."""
    if len(shape) != 2 or any(k in name for k in keep_float):
        return "f32", {}
    if quant == "int4":
        if shape[1] % group == 0:
            return "int4", {"group": group}
        return "int8", {}
    if quant == "int8":
        return "int8", {}
    return quant, {}


def pack(name: str, w32: np.ndarray, quant: str, group: int, keep_float=()) -> PackedTensor:
    """float32 weight -> PackedTensor of the kind the rules give."""
    kind, params = kind_for(name, w32.shape, quant, group, keep_float)
    if kind == "f16":
        return PackedTensor("f16", w32.shape, {}, {"w": f16_bits(w32)})
    if kind == "bf16":
        return PackedTensor("bf16", w32.shape, {}, {"w": bf16_bits(w32)})
    try:
        return PackedTensor.from_array(w32, kind, **params)
    except ConversionError as e:
        raise ConversionError(f"tensor {name}: {e}") from None
