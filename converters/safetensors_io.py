"""Reading safetensors checkpoints by memory map, bfloat16 included.

The `safetensors` package's NumPy API cannot return bfloat16 (NumPy has no such
dtype), and most checkpoints are bfloat16; so the header (8-byte length, JSON) is
read here and each tensor is a view into one np.memmap of the file, with
bfloat16 and float16 kept as their raw uint16 bits.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from edgerun.errors import ConversionError

_DTYPES = {"F32": np.float32, "F16": np.uint16, "BF16": np.uint16, "F64": np.float64,
           "I8": np.int8, "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
           "U16": np.uint16, "U32": np.uint32, "BOOL": np.bool_}


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise ConversionError(f"{path}: truncated safetensors header")
            try:
                self.header = json.loads(f.read(n))
            except ValueError as e:
                raise ConversionError(f"{path}: corrupted safetensors header ({e})") from None
        self.header.pop("__metadata__", None)
        self.data = np.memmap(path, np.uint8, "r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
        end = max((e["data_offsets"][1] for e in self.header.values()), default=0)
        if end > len(self.data):
            raise ConversionError(f"{path}: truncated (data region {len(self.data)} bytes, header needs {end})")

    def keys(self):
        return self.header.keys()

    def dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def raw(self, name: str) -> np.ndarray:
        e = self.header[name]
        if e["dtype"] not in _DTYPES:
            raise ConversionError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        a, b = e["data_offsets"]
        return self.data[a:b].view(_DTYPES[e["dtype"]]).reshape(e["shape"])

    def float32(self, name: str) -> np.ndarray:
        a, dt = self.raw(name), self.dtype(name)
        if dt == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        if dt == "F16":
            return a.view(np.float16).astype(np.float32)
        return a.astype(np.float32, copy=False)
