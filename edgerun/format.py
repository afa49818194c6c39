"""The model file (.edr): one file holding config, tokenizer, packing descriptors and weights.

Layout (safetensors-compatible, so any safetensors tool can list it):

    u64 little-endian header length N
    N bytes of JSON: {"__metadata__": {...}, "<tensor>.<part>": {dtype, shape, data_offsets}, ...}
    the raw buffers, each starting on a 64-byte boundary of the file

Padding between buffers is itself listed as ``__pad__.<i>`` uint8 entries, since
safetensors requires the buffers to tile the data region. ``__metadata__`` holds
string values only (a safetensors rule):

    format          "edgerun"
    format_version  "1"
    model           JSON: {"arch", "config", "tensors": {name: descriptor}, "quant", "source"}
    tokenizer       JSON: Tokenizer.to_dict()
    content_hash    "sha256:<hex>" over the model JSON, then the tokenizer JSON, then the data region

A descriptor is {"kind": "int4", "shape": [out, in], "params": {"group": 32}}; its
parts are the entries "<name>.<part>" (packed.CODECS[kind].parts, optional ones may be
absent). Weights are memory-mapped when a file is opened, never copied.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import packed
from .errors import ModelFileError

FORMAT_VERSION = 1
ALIGN = 64
MAX_HEADER = 256 * 1024 * 1024

_ST_DTYPES = {  # safetensors dtype name <-> numpy dtype of the stored buffer
    "F32": np.float32, "F16": np.uint16, "BF16": np.uint16, "F64": np.float64,
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "U16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "I64": np.int64, "U64": np.uint64,
}


def _st_dtype(a: np.ndarray, kind: str, part: str) -> str:
    """safetensors dtype for a part buffer. uint16 buffers carry float16/bfloat16 bits."""
    if a.dtype == np.uint16:
        return "BF16" if kind == "bf16" else "F16"
    for name, dt in _ST_DTYPES.items():
        if name not in ("F16", "BF16", "U16") and a.dtype == dt:
            return name
    raise ModelFileError(f"cannot store dtype {a.dtype} (part {part})")


@dataclass
class PackedTensor:
    """A weight ready to be written: its kind, logical shape, parameters and part buffers."""
    kind: str
    shape: tuple
    params: dict
    parts: dict[str, np.ndarray]

    @classmethod
    def from_array(cls, w: np.ndarray, kind: str, **params) -> "PackedTensor":
        parts, p = packed.codec(kind).pack(w, **params)
        return cls(kind, tuple(w.shape), p, parts)


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def write(path: str | os.PathLike, *, arch: str, config: dict, tokenizer: dict,
          tensors: Iterable[tuple[str, PackedTensor]], extra: dict | None = None,
          progress: Callable[[int], None] | None = None) -> str:
    """Write a model file atomically (temp file in the same folder, then rename). Returns the hash.

    Every part buffer is held until the hash is known and the file written; dense
    parts that are memory-mapped views of the source cost no memory.
    """
    path = Path(path)
    entries, bufs, descriptors = {}, [], {}
    offset = 0
    npad = 0
    for name, t in tensors:
        descriptors[name] = {"kind": t.kind, "shape": list(t.shape), "params": t.params}
        for part, a in t.parts.items():
            a = np.ascontiguousarray(a)
            pad = (-offset) % ALIGN
            if pad:
                entries[f"__pad__.{npad}"] = {"dtype": "U8", "shape": [pad],
                                             "data_offsets": [offset, offset + pad]}
                bufs.append(b"\0" * pad)
                npad += 1
                offset += pad
            entries[f"{name}.{part}"] = {"dtype": _st_dtype(a, t.kind, part), "shape": list(a.shape),
                                         "data_offsets": [offset, offset + a.nbytes]}
            bufs.append(a)
            offset += a.nbytes
        if progress:
            progress(1)
    model_json = _canon({"arch": arch, "config": config, "tensors": descriptors, **(extra or {})})
    tok_json = _canon(tokenizer)
    h = hashlib.sha256()
    h.update(model_json.encode())
    h.update(tok_json.encode())
    for b in bufs:
        h.update(memoryview(b).cast("B") if isinstance(b, np.ndarray) else b)
    digest = "sha256:" + h.hexdigest()
    meta = {"format": "edgerun", "format_version": str(FORMAT_VERSION), "model": model_json,
            "tokenizer": tok_json, "content_hash": digest}
    header = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
    header += b" " * ((-(8 + len(header))) % ALIGN)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for b in bufs:
                f.write(memoryview(b).cast("B") if isinstance(b, np.ndarray) else b)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; a model file is ordinary data
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return digest


@dataclass
class ModelFile:
    """An opened .edr: header fields and memory-mapped packed tensors."""
    path: Path
    arch: str
    config: dict
    tokenizer: dict
    descriptors: dict
    content_hash: str
    extra: dict
    entries: dict = field(repr=False)
    data: np.ndarray = field(repr=False)       # uint8 memmap of the data region
    _model_json: str = field(repr=False, default="")
    _tok_json: str = field(repr=False, default="")

    def part(self, name: str) -> np.ndarray:
        e = self.entries[name]
        a, b = e["data_offsets"]
        dt = np.dtype(_ST_DTYPES[e["dtype"]])
        # a plain ndarray view (the mapping stays its base): Numba's dispatcher types an
        # np.memmap subclass on a slow path, ~0.7 us per weight argument on every kernel call
        return self.data[a:b].view(np.ndarray).view(dt).reshape(e["shape"])

    def tensor(self, name: str):
        """The packed container (packed.DenseWeight, Int8Weight, ...) of a weight, memory-mapped."""
        try:
            d = self.descriptors[name]
        except KeyError:
            raise ModelFileError(f"{self.path}: no tensor named {name!r}") from None
        c = packed.codec(d["kind"])
        parts = {p: self.part(f"{name}.{p}") for p in c.parts if f"{name}.{p}" in self.entries}
        return c.container(parts, d.get("params", {}))

    def __contains__(self, name: str) -> bool:
        return name in self.descriptors

    def nbytes(self, name: str) -> int:
        return sum(np.prod(self.entries[k]["shape"], dtype=np.int64) * np.dtype(_ST_DTYPES[self.entries[k]["dtype"]]).itemsize
                   for k in self.entries if k.startswith(name + ".") and k[len(name) + 1:].isidentifier())

    def verify(self) -> None:
        """Recompute the content hash; raise ModelFileError if the file was altered."""
        h = hashlib.sha256()
        h.update(self._model_json.encode())
        h.update(self._tok_json.encode())
        step = 64 << 20
        for i in range(0, len(self.data), step):
            h.update(memoryview(self.data[i:i + step]))
        if "sha256:" + h.hexdigest() != self.content_hash:
            raise ModelFileError(f"{self.path}: content hash mismatch, the file is corrupted")


def _check_layout(path: Path, header: dict, model: dict, data_len: int) -> None:
    """Every entry has a known dtype and fits its shape; buffers tile the data region exactly;
    every tensor has a known kind and its required parts."""
    end = 0
    for name, e in header.items():
        if e["dtype"] not in _ST_DTYPES:
            raise ModelFileError(f"{path}: entry {name} has unknown dtype {e['dtype']!r}")
        a, b = e["data_offsets"]
        want = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(_ST_DTYPES[e["dtype"]]).itemsize
        if b - a != want or a < 0:
            raise ModelFileError(f"{path}: entry {name} has {b - a} bytes, its shape needs {want}")
        end = max(end, b)
    if end != data_len:
        what = "truncated" if end > data_len else "longer than its header says"
        raise ModelFileError(f"{path}: file is {what} (data region {data_len} bytes, header expects {end})")
    str(model["arch"]), dict(model["config"])
    for name, d in model["tensors"].items():
        if d["kind"] not in packed.CODECS:
            raise ModelFileError(f"{path}: tensor {name} has packed kind {d['kind']!r}, which this edgerun "
                                 f"does not know (known: {', '.join(packed.CODECS)}); upgrade edgerun")
        for p in packed.codec(d["kind"]).required():
            if f"{name}.{p}" not in header:
                raise ModelFileError(f"{path}: tensor {name} lacks its part {p!r}")


def open_model(path: str | os.PathLike, verify: bool = False) -> ModelFile:
    """Open a .edr file, memory-mapping its weights. Structural checks always; the hash if ``verify``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: too short to be a model file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise ModelFileError(f"{path}: not an edgerun model file or truncated (header length {n}, file {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or meta.get("format") != "edgerun":
            raise ModelFileError(f"{path}: a safetensors file, but not an edgerun model (no edgerun metadata)")
        version = int(meta["format_version"])
        if version > FORMAT_VERSION:
            raise ModelFileError(f"{path}: format version {version} is newer than this edgerun reads "
                                 f"({FORMAT_VERSION}); upgrade edgerun")
        model = json.loads(meta["model"])
        tok = json.loads(meta["tokenizer"])
        _check_layout(path, header, model, size - 8 - n)
    except ModelFileError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ModelFileError(f"{path}: header is corrupted ({type(e).__name__}: {e})") from None
    data_len = size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_len,)) if data_len else np.zeros(0, np.uint8)
    _advise(data)
    mf = ModelFile(path=path, arch=model["arch"], config=model["config"], tokenizer=tok,
                   descriptors=model["tensors"], content_hash=meta.get("content_hash", ""),
                   extra={k: v for k, v in model.items() if k not in ("arch", "config", "tensors")},
                   entries=header, data=data, _model_json=meta["model"], _tok_json=meta["tokenizer"])
    if verify:
        mf.verify()
    return mf


def _advise(data) -> None:
    """Ask the kernel for huge pages under the weights' mapping where it can give them (Linux,
    transparent huge pages for file mappings): a decode step streams through every weight, and
    with 4 KiB pages the TLB misses cost (measured: see README, "Where the time goes")."""
    import mmap
    mm = getattr(data, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
