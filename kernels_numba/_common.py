"""Shared pieces of the CPU kernels: JIT options and float16 decoding."""
import numpy as np
from numba import njit, types
from numba.extending import overload

JIT = dict(cache=True, nogil=True)
# Reassociation and contraction are safe in dot products and sums; nnan/ninf are
# left out so that a NaN or Inf in activations stays visible instead of being optimised away.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@njit(**JIT)
def half_to_float(h):
    """IEEE float16 bits (uint16) -> float32, handling zero, subnormals, inf and nan."""
    h = np.int32(h)
    sign = -1.0 if h & 0x8000 else 1.0
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = m * 5.960464477539063e-08          # m * 2**-24
    elif e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = (1024 + m) * 2.0 ** (e - 25)
    return np.float32(sign * v)


def as_float(x):
    """Scale element -> float32: float16 bits are decoded, floats pass through."""


@overload(as_float, jit_options=JIT)
def _as_float(x):
    if isinstance(x, types.Integer):
        return lambda x: half_to_float(x)
    return lambda x: np.float32(x)
