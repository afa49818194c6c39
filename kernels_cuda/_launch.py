"""Kernel launches, and launch plans for the decode step.

numba's dispatcher costs about 100 us of Python per launch of a kernel with many array
arguments (measured on an H200 with numba-cuda 0.30: typing, then argument marshalling
through cuda.core). A decode step launches the same ~100 kernels on the same buffers every
token, so the runner records them once (``recording``) into ``Prepared`` launches: each
kernel compiled once, its arguments marshalled into a ctypes parameter block once, and a
launch is then one cuLaunchKernel call. Arguments that change per step (the position, the
token id) are ``Dyn`` ints whose slot the plan rewrites in place.

Under the simulator a Prepared launch just calls the kernel again (same results, no speed).
"""
from __future__ import annotations

import ctypes
import os as _os
from contextlib import contextmanager

from ._common import SIM

_RECORD: list | None = None
# launch the kernels registered with pdl() with programmatic stream serialization (Hopper and later,
# CUDA 12): see _common.grid_wait. Read when a launch is recorded.
PDL = _os.environ.get("EDGERUN_CUDA_PDL", "1") != "0"
_PDL_KERNELS: set = set()


def pdl(kern):
    """Mark a kernel as PDL-safe: it calls grid_wait before reading anything a kernel before it wrote."""
    _PDL_KERNELS.add(id(kern))
    return kern


class Dyn(int):
    """An integer kernel argument that a recorded plan changes per step."""

    def __new__(cls, name: str, value: int = 0):
        o = int.__new__(cls, value)
        o.name = name
        return o


def go(kern, grid, block, stream, smem, args):
    """Launch, or append to the plan being recorded."""
    if _RECORD is not None:
        _RECORD.append(Prepared(kern, grid, block, smem, args))
        return
    if any(isinstance(a, Dyn) for a in args):
        args = [int(a) if isinstance(a, Dyn) else a for a in args]
    if smem and id(kern) in _BIG_SMEM and not SIM:
        allow_smem(kern.compile(tuple(kern.typeof_pyval(a) for a in args)), smem)
    kern[grid, block, stream, smem](*args)


_SMEM_OK: dict = {}
_BIG_SMEM: set = set()


def big_smem(kern):
    """Mark a kernel whose static + dynamic shared memory may pass 48 KB: its launches opt in
    (allow_smem) and prefer the largest shared-memory carveout."""
    _BIG_SMEM.add(id(kern))
    return kern


def allow_smem(compiled, nbytes: int):
    """Let a compiled kernel launch with nbytes (> 48 KB) of dynamic shared memory: the attribute
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES on its CUkernel (numba-cuda loads kernels
    through cuLibrary*, so cuKernelSetAttribute, not cuFuncSetAttribute)."""
    from cuda.bindings import driver as drv
    cf = compiled._codelibrary.get_cufunc()
    key = int(cf.handle)
    if _SMEM_OK.get(key, 0) < nbytes:
        err, = drv.cuKernelSetAttribute(drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                        int(nbytes), drv.CUkernel(key), drv.CUdevice(cf.device.id))
        if err != drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuKernelSetAttribute(max dynamic shared memory {nbytes}) failed: {err}")
        err, = drv.cuKernelSetAttribute(drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                                        100, drv.CUkernel(key), drv.CUdevice(cf.device.id))
        _SMEM_OK[key] = nbytes


def occupancy(kern, block: int, smem: int) -> int:
    """Blocks of `block` threads with `smem` dynamic shared memory that one SM holds at once (the
    kernel's first compiled overload; a report for benchmarks)."""
    from cuda.bindings import driver as drv
    k = next(iter(kern.overloads.values()))
    if smem and id(kern) in _BIG_SMEM:
        allow_smem(k, smem)
    cf = k._codelibrary.get_cufunc()
    err, f = drv.cuKernelGetFunction(drv.CUkernel(int(cf.handle)))
    err, nb = drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(f, block, smem)
    return int(nb)


@contextmanager
def recording():
    """Collect the launches made inside as Prepared launches instead of running them."""
    global _RECORD
    _RECORD = []
    try:
        yield _RECORD
    finally:
        _RECORD = None


_CC: list = []


def _cc_major() -> int:
    if not _CC:
        from numba import cuda
        _CC.append(cuda.get_current_device().compute_capability[0])
    return _CC[0]


def _dim3(d):
    d = tuple(d) if isinstance(d, tuple) else (d,)
    return tuple(int(v) for v in d) + (1,) * (3 - len(d))


class Prepared:
    """One kernel launch with its arguments marshalled once (numba's kernel ABI: an array is
    meminfo, parent, size, itemsize, data, shape..., strides...)."""

    def __init__(self, kern, grid, block, smem, args):
        self.kern, self.grid, self.block, self.smem = kern, grid, block, int(smem)
        self.args = list(args)
        self.dyn: dict[str, list] = {}
        if SIM:
            return
        from cuda.bindings import driver as drv
        self._drv = drv
        plain = [int(a) if isinstance(a, Dyn) else a for a in args]
        k = kern.compile(tuple(kern.typeof_pyval(a) for a in plain))
        self.func = drv.CUfunction(int(k._codelibrary.get_cufunc().handle))
        if self.smem and id(kern) in _BIG_SMEM:
            allow_smem(k, self.smem)
        vals = []
        for t, a in zip(k.argument_types, args):
            if hasattr(t, "ndim") and hasattr(t, "layout"):
                ptr = a.__cuda_array_interface__["data"][0] or 0
                vals += [ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_int64(a.size),
                         ctypes.c_int64(a.dtype.itemsize), ctypes.c_void_p(ptr)]
                vals += [ctypes.c_int64(s) for s in a.shape] + [ctypes.c_int64(s) for s in a.strides]
            elif str(t) in ("int64", "int32", "uint32", "uint64", "int8", "uint8", "int16", "uint16"):
                c = getattr(ctypes, f"c_{t}")(int(a))
                vals.append(c)
                if isinstance(a, Dyn):
                    self.dyn.setdefault(a.name, []).append(c)
            elif str(t) == "float32":
                vals.append(ctypes.c_float(a))
            elif str(t) == "float64":
                vals.append(ctypes.c_double(a))
            elif str(t) == "bool":
                vals.append(ctypes.c_bool(a))
            else:
                raise NotImplementedError(f"kernel argument type {t}")
        self._vals = vals                                  # keep the ctypes objects alive
        self._params = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        self._addr = ctypes.addressof(self._params)
        self._g, self._b = _dim3(grid), _dim3(block)
        self._stream = drv.CUstream(0)
        self._cfg = None
        if PDL and id(kern) in _PDL_KERNELS and _cc_major() >= 9:
            cfg = drv.CUlaunchConfig()
            cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = self._g
            cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = self._b
            cfg.sharedMemBytes, cfg.hStream = self.smem, self._stream
            at = drv.CUlaunchAttribute()
            at.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            at.value.programmaticStreamSerializationAllowed = 1
            cfg.attrs, cfg.numAttrs = [at], 1
            self._cfg, self._at = cfg, at

    def set(self, name: str, value: int) -> None:
        if SIM:
            self.args = [Dyn(a.name, value) if isinstance(a, Dyn) and a.name == name else a for a in self.args]
            return
        for c in self.dyn.get(name, ()):
            c.value = value

    def __call__(self):
        if SIM:
            args = [int(a) if isinstance(a, Dyn) else a for a in self.args]
            self.kern[self.grid, self.block, 0, self.smem](*args)
            return
        if self._cfg is not None:
            err, = self._drv.cuLaunchKernelEx(self._cfg, self.func, self._addr, 0)
            if err != self._drv.CUresult.CUDA_SUCCESS:
                raise RuntimeError(f"cuLaunchKernelEx failed: {err}")
            return
        g, b = self._g, self._b
        err, = self._drv.cuLaunchKernel(self.func, g[0], g[1], g[2], b[0], b[1], b[2], self.smem, self._stream,
                                        self._addr, 0)
        if err != self._drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuLaunchKernel failed: {err}")
