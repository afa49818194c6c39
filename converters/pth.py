"""PyTorch checkpoints (.pth / .pt, the zip format of torch >= 1.6) read without torch.

A .pth is a zip: ``<name>/data.pkl`` (a pickle of the state dict) and one raw buffer per
storage under ``<name>/data/<key>``. Unpickling can run any code a file asks for, so the pickle
is read by an Unpickler whose ``find_class`` knows only the handful of names a state dict uses
(OrderedDict, torch's tensor-rebuild functions, typed storages) and answers each with our own
harmless stand-in; any other global (os.system, builtins.eval, ...) is refused with a
ConversionError before anything is called. Storages are memory-mapped when the zip stores them
uncompressed (torch always does), so a multi-GB checkpoint is not read into memory.
"""
from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgerun.errors import ConversionError, ModelFileError

# torch storage class -> (numpy dtype of the raw buffer, our dtype name)
_STORAGES = {
    "FloatStorage": (np.float32, "f32"), "HalfStorage": (np.float16, "f16"),
    "BFloat16Storage": (np.uint16, "bf16"), "DoubleStorage": (np.float64, "f64"),
    "LongStorage": (np.int64, "i64"), "IntStorage": (np.int32, "i32"),
    "ShortStorage": (np.int16, "i16"), "CharStorage": (np.int8, "i8"),
    "ByteStorage": (np.uint8, "u8"), "BoolStorage": (np.bool_, "bool"),
}


class PthTensor(NamedTuple):
    """One tensor of a checkpoint: a (memory-mapped) view of its storage; bf16 as raw uint16 bits."""
    data: np.ndarray
    dtype: str              # "f32" | "f16" | "bf16" | "f64" | "i64" | ...

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    def float32(self) -> np.ndarray:
        if self.dtype == "bf16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(self.data, dtype=np.float32)


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.np_dtype, self.dtype = _STORAGES[name]


class _Storage(NamedTuple):
    array: np.ndarray       # 1-D, the whole storage
    dtype: str


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise ConversionError("malformed checkpoint: a tensor without a storage")
    a = storage.array
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    n = int(np.prod(size, dtype=np.int64)) if size else 1
    last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if n else offset
    if offset < 0 or last >= max(a.shape[0], 1) or any(st < 0 for st in stride):
        raise ConversionError("malformed checkpoint: a tensor reaches outside its storage")
    item = a.itemsize
    view = np.lib.stride_tricks.as_strided(a[offset:], shape=size, strides=[st * item for st in stride],
                                           writeable=False)
    return PthTensor(view, storage.dtype)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


def _empty_ordered_dict(*args):
    return OrderedDict(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): _empty_ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path, load_storage):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._load_storage = load_storage
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise ConversionError(
                f"{self._path}: refused: the checkpoint's pickle asks for {module}.{name}, which is not "
                f"a tensor or storage; a state dict needs only tensors, and unpickling other objects can "
                f"run arbitrary code. Nothing was executed.")
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ConversionError(f"{self._path}: refused: unknown persistent id in the pickle ({pid!r:.80})")
        _, st, key, _location, numel = pid[:5]
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(self._load_storage(key, st.np_dtype, int(numel)), st.dtype)
        return self._storages[key]


def _member_offset(f, info: zipfile.ZipInfo) -> int:
    """File offset of a stored (uncompressed) zip member's data: after its local header."""
    f.seek(info.header_offset)
    local = f.read(30)
    if local[:4] != b"PK\x03\x04":
        raise ModelFileError(f"bad zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def load_pth(path: str | os.PathLike) -> dict[str, PthTensor]:
    """name -> PthTensor for every tensor of a PyTorch zip checkpoint, without torch or code execution.

    Raises ConversionError for a pickle that asks for anything but tensors, ModelFileError for a
    file that is not a readable zip checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a PyTorch zip checkpoint (the legacy pre-1.6 torch format is not "
                             f"read; re-save it with a recent torch.save)")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ModelFileError(f"{path}: damaged zip ({e})") from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise ModelFileError(f"{path}: not a PyTorch checkpoint (no single data.pkl in the zip)")
        prefix = pkls[0][: -len("data.pkl")]
        order = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in zf.namelist() else "little"
        if order != "little":
            raise ModelFileError(f"{path}: big-endian checkpoints are not supported")
        raw = open(path, "rb")
        mm = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else None

        def load_storage(key: str, dtype, numel: int) -> np.ndarray:
            name = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(name)
            except KeyError:
                raise ModelFileError(f"{path}: storage {key} is missing from the zip") from None
            nbytes = numel * np.dtype(dtype).itemsize
            if info.file_size < nbytes:
                raise ModelFileError(f"{path}: storage {key} has {info.file_size} bytes, needs {nbytes}")
            if info.compress_type == zipfile.ZIP_STORED:
                off = _member_offset(raw, info)
                if off + nbytes > len(mm):
                    raise ModelFileError(f"{path}: storage {key} is truncated")
                return np.frombuffer(mm, dtype=dtype, count=numel, offset=off)
            return np.frombuffer(zf.read(name), dtype=dtype, count=numel)

        try:
            obj = _RestrictedUnpickler(zf.read(pkls[0]), path, load_storage).load()
        except (ConversionError, ModelFileError):
            raise
        except Exception as e:       # a damaged pickle: truncated, bad opcodes, wrong arity
            raise ModelFileError(f"{path}: cannot read the checkpoint's pickle ({type(e).__name__}: {e})") from None
        finally:
            raw.close()              # the mmap keeps its own handle
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if isinstance(v, PthTensor):
            out[str(k)] = v
    if not out:
        raise ConversionError(f"{path}: the checkpoint holds no tensors")
    return out
