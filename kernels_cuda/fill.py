"""Random and constant fills made on the device (benchmarks build 1B-parameter models without
moving a byte of weights from the host). A counter-based hash, so results don't depend on the grid."""
import numpy as np
from numba import cuda

from ._common import BLOCK, blocks


@cuda.jit(device=True, inline=True)
def _hash(i, seed):
    x = np.uint64(i) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed) * np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(29)
    return x


@cuda.jit
def _rand_bytes(flat, lo, span, seed):
    """flat[i] = lo + hash(i) % span (int8 or uint8 arrays)."""
    i = cuda.grid(1)
    if i < flat.shape[0]:
        flat[i] = lo + np.int64(_hash(i, seed) % np.uint64(span))


@cuda.jit
def _rand_float(flat, lo, hi, seed):
    i = cuda.grid(1)
    if i < flat.shape[0]:
        u = np.float32(_hash(i, seed) >> np.uint64(40)) * np.float32(1.0 / (1 << 24))
        flat[i] = lo + (hi - lo) * u


def rand_int(a, lo: int, hi: int, seed: int):
    """Uniform integers in [lo, hi] into a contiguous int8 / uint8 device array."""
    flat = a.reshape(a.size)
    _rand_bytes[blocks(a.size, BLOCK), BLOCK](flat, int(lo), int(hi - lo + 1), int(seed))
    return a


def rand_uniform(a, lo: float, hi: float, seed: int):
    """Uniform floats in [lo, hi) into a contiguous float32 / float16 device array."""
    flat = a.reshape(a.size)
    _rand_float[blocks(a.size, BLOCK), BLOCK](flat, np.float32(lo), np.float32(hi), int(seed))
    return a
