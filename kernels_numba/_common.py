"""Shared pieces of the CPU kernels: JIT options and float16 decoding."""
import numpy as np
from numba import njit, types
from numba.extending import overload

JIT = dict(cache=True, nogil=True)
# Reassociation and contraction are safe in dot products and sums; nnan/ninf are
# left out so that a NaN or Inf in activations stays visible instead of being optimised away.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


# 2**(e - 25) for each float16 exponent e; e == 0 (subnormal) uses 2**-24 with no implicit bit
_POW2 = np.array([2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 32)], dtype=np.float32)


@njit(inline="always", **JIT)
def half_to_float(h):
    """IEEE float16 bits (uint16) -> float32, handling zero, subnormals, inf and nan."""
    h = np.int32(h)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(m + (1024 if e else 0)) * _POW2[e]
    return -v if h & 0x8000 else v


def as_float(x):
    """Scale element -> float32: float16 bits are decoded, floats pass through."""


@overload(as_float, jit_options=JIT)
def _as_float(x):
    if isinstance(x, types.Integer):
        return lambda x: half_to_float(x)
    return lambda x: np.float32(x)
