"""Shared pieces of the CUDA kernels: warp/block reductions, bit casts, launch sizes.

Under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1, used by CI, which has no GPU) the
kernels run as Python threads. The simulator has no warp shuffles and no libdevice
bit casts, so those two helpers have a simulator twin here: a warp sum through shared
memory and a NumPy view. Every thread of a block must call warp_sum / block_sum (no
divergent calls), which the kernels do anyway.
"""
import math
import os

import numba
import numpy as np
from numba import cuda
from numba.cuda.core import config

SIM = bool(config.ENABLE_CUDASIM)
# shared / local array dtype: numba's float32 type on the GPU; the simulator's dynamic shared
# arrays need a NumPy dtype object (they read its itemsize)
F32 = np.dtype(np.float32) if SIM else numba.float32
U32 = np.uint32
FULL = 0xFFFFFFFF
# threads per block of most kernels: 8 warps on a GPU; 2 under the simulator, which runs every
# thread as a Python thread (same code, fewer threads, tests 4x quicker)
BLOCK = 64 if SIM else 256



def device(fn):
    """An inlined device function; under the simulator the plain Python function (its device
    functions swap module globals on every call, which made the GEMV tests 10x slower).
    Only for helpers that don't touch ``cuda.`` (thread indices, shared memory)."""
    return fn if SIM else cuda.jit(device=True, inline=True)(fn)


if SIM:      # device functions, so that the simulator gives them its fake cuda module
    def bits_to_f32(i):
        return np.uint32(np.int64(i) & 0xFFFFFFFF).view(np.float32)

    @cuda.jit(device=True)
    def warp_sum(v, red):
        t = cuda.threadIdx.x
        red[t] = v
        cuda.syncthreads()
        base = t - t % 32
        s = np.float32(0.0)
        for i in range(32):
            s += red[base + i]
        cuda.syncthreads()
        return np.float32(s)

    @cuda.jit(device=True)
    def warp_sum4(a, b, c, d, red):
        """Four warp sums behind one pair of barriers (red: shared (4 * blockDim,))."""
        t = cuda.threadIdx.x
        n = cuda.blockDim.x
        red[t], red[n + t], red[2 * n + t], red[3 * n + t] = a, b, c, d
        cuda.syncthreads()
        base = t - t % 32
        s = [np.float32(0.0)] * 4
        for k in range(4):
            acc = np.float32(0.0)
            for i in range(32):
                acc += red[k * n + base + i]
            s[k] = acc
        cuda.syncthreads()
        return s[0], s[1], s[2], s[3]

    @cuda.jit(device=True)
    def group_max(v, red, width):
        """The max of v over each aligned group of width lanes, through shared red (the
        simulator has no shuffles)."""
        t = cuda.threadIdx.x
        red[t] = v
        cuda.syncthreads()
        base = t - t % width
        s = red[base]
        for i in range(1, width):
            s = max(s, red[base + i])
        cuda.syncthreads()
        return np.float32(s)

    @cuda.jit(device=True)
    def warp_max(v, red):
        return group_max(v, red, 32)
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def bits_to_f32(i):
        return libdevice.int_as_float(np.int32(i))

    @cuda.jit(device=True, inline=True)
    def warp_sum(v, red):
        v += cuda.shfl_xor_sync(FULL, v, 16)
        v += cuda.shfl_xor_sync(FULL, v, 8)
        v += cuda.shfl_xor_sync(FULL, v, 4)
        v += cuda.shfl_xor_sync(FULL, v, 2)
        v += cuda.shfl_xor_sync(FULL, v, 1)
        return v

    @cuda.jit(device=True, inline=True)
    def warp_sum4(a, b, c, d, red):
        return warp_sum(a, red), warp_sum(b, red), warp_sum(c, red), warp_sum(d, red)

    @cuda.jit(device=True, inline=True)
    def warp_max(v, red):
        v = max(v, cuda.shfl_xor_sync(FULL, v, 16))
        v = max(v, cuda.shfl_xor_sync(FULL, v, 8))
        v = max(v, cuda.shfl_xor_sync(FULL, v, 4))
        v = max(v, cuda.shfl_xor_sync(FULL, v, 2))
        v = max(v, cuda.shfl_xor_sync(FULL, v, 1))
        return v


# programmatic dependent launch (Hopper+): a GEMV launched with the PDL attribute (_launch.PDL) starts
# while the kernel before it finishes, issues its first weight loads (weights are never written), and
# waits (grid_wait) before it reads anything an earlier kernel wrote; launch_dependents lets the next
# one start likewise. Without the attribute both are no-ops. EDGERUN_CUDA_PDL=0 leaves them out of the code.
PDL_CODE = not SIM and os.environ.get("EDGERUN_CUDA_PDL", "1") != "0"

if PDL_CODE:
    from llvmlite import ir as _ir
    from numba import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic

    def _asm0(text):
        @_intrinsic
        def op(typingctx):
            def codegen(context, builder, sig, args):
                fnty = _ir.FunctionType(_ir.VoidType(), [])
                builder.call(_ir.InlineAsm(fnty, text, "~{memory}", side_effect=True), [])
                return context.get_dummy_value()
            return _types.void(), codegen
        return op

    grid_wait = _asm0("griddepcontrol.wait;")
    launch_dependents = _asm0("griddepcontrol.launch_dependents;")
else:
    def grid_wait():
        pass

    def launch_dependents():
        pass
    if not SIM:
        grid_wait = cuda.jit(device=True, inline=True)(grid_wait)
        launch_dependents = cuda.jit(device=True, inline=True)(launch_dependents)


@cuda.jit(device=True, inline=True)
def block_sum(v, red, part):
    """Sum of v over the whole block (blockDim a multiple of 32, at most 1024); every thread gets it.
    red: shared (blockDim,) scratch for the simulator's warp_sum; part: shared (32,)."""
    t = cuda.threadIdx.x
    nwarps = cuda.blockDim.x // 32
    s = warp_sum(v, red)
    if t % 32 == 0:
        part[t // 32] = s
    cuda.syncthreads()
    tot = np.float32(0.0)
    for i in range(nwarps):
        tot += part[i]
    cuda.syncthreads()
    return tot


def blocks(n: int, per: int) -> int:
    return max(1, -(-int(n) // per))


def log2_exact(n: int) -> int:
    """log2 of a power of two, -1 otherwise."""
    n = int(n)
    return int(math.log2(n)) if n > 0 and n & (n - 1) == 0 else -1
